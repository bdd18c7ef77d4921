//! The states of a stream, named for what each waits on.
use crate::digest::Digest;
use crate::distribution::ledger::LedgerEntry;
use crate::distribution::upload::{ChunkStream, Completion};
use crate::error::OciError;
use crate::format::recipients::Recipient;

use super::CalloutId;

/// What the stream is doing.
#[derive(Default)]
pub enum Flow {
    /// Not an encrypted-repository write: untouched.
    #[default]
    Pass,
    /// A refusal was sent; ignore the rest of the stream.
    Refused,
    /// A refused request whose body is read (and dropped) before the refusal is sent.
    Draining(OciError),
    /// Request body bytes of an upload session (`PATCH`, or a `PUT`/`POST` turned into one).
    Chunk(Box<ChunkFlow>),
    /// `POST ?digest=` with a body: headers paused while a callout opens a session.
    OpeningSession {
        /// The callout opening it.
        callout: CalloutId,
        /// Repository name.
        repository: String,
        /// The digest the client named.
        client_digest: Digest,
        /// The project's recipients, resolved before the body.
        recipients: Vec<Recipient>,
    },
    /// An upload being finished: a `PUT ?digest=` with no body whose request line now names the
    /// ciphertext (the registry's answer finishes it), or a monolithic upload whose finishing
    /// `PUT` the gateway sent itself while the registry's `202` is held.
    Finishing {
        /// The finishing `PUT` the gateway sent, if it sent one.
        callout: Option<CalloutId>,
        /// Repository name.
        repository: String,
        /// What to record once the registry committed it.
        completion: Completion,
        /// The session whose saved state is dropped once the registry committed the blob (a
        /// refused finish, e.g. a 401 the client retries with credentials, must find it again),
        /// and whether the store had state for it.
        upload: Option<(String, bool)>,
    },
    /// The blob is committed; its ledger entry is being written to the registry (replicas)
    /// while the client's answer waits.
    Recording {
        /// Repository name.
        repository: String,
        /// What is being recorded.
        completion: Completion,
        /// As in [`Flow::Finishing`].
        upload: Option<(String, bool)>,
        /// Where the recording stands.
        stage: RecordingStage,
        /// The callout of that stage.
        callout: CalloutId,
    },
    /// A `HEAD` paused while the registry's ledger is read.
    HeadLookup {
        /// The ledger read.
        callout: CalloutId,
        /// Repository name.
        repository: String,
        /// The plaintext digest asked about.
        digest: Digest,
    },
    /// A manifest `DELETE` by digest paused while the manifest is read: ledger manifests are
    /// the gateway's, and clients cannot delete them.
    DeleteCheck {
        /// The read.
        callout: CalloutId,
        /// Repository name.
        repository: String,
    },
    /// A `HEAD` or mount answered from the ledger: the registry is asked about the ciphertext.
    Known {
        /// Repository name.
        repository: String,
        /// The plaintext digest the client named.
        client_digest: Digest,
        /// What the gateway stored for it.
        entry: LedgerEntry,
        /// A mount (answer 201, record the blob in this repository) rather than a `HEAD`.
        mounted: bool,
    },
    /// `GET …/tags/list` in an encrypted repository, paused while the gateway reads the list by
    /// callout: it answers the client itself, without its reserved tags.
    TagsList {
        /// The read.
        callout: CalloutId,
        /// Repository name.
        repository: String,
        /// Pages of reserved tags only skipped so far.
        skipped: u32,
    },
    /// A manifest pushed by digest, rewritten: the gateway stores it under its new digest by
    /// callout (the client's request line names the old one and cannot change after the body),
    /// and answers the client itself.
    Storing {
        /// The `PUT /v2/<name>/manifests/<stored digest>`.
        callout: CalloutId,
        /// Repository name.
        repository: String,
        /// The digest the client pushed it by.
        client_digest: Digest,
        /// What is being stored, ledgered under the client's digest once the registry took it.
        entry: LedgerEntry,
        /// Stored under the reserved tag of the client's digest (a referrer), where it is its
        /// own ledger record, rather than under its new digest.
        tagged: bool,
    },
    /// `PUT` of a manifest: buffered, then rewritten.
    Manifest {
        /// Repository name.
        repository: String,
        /// The Content-Type the client sent.
        content_type: String,
        /// The digest the client pushed it by (`PUT …/manifests/sha256:…`).
        by_digest: Option<Digest>,
        /// Digest of the body the client pushed, once seen: the answer names it (containerd
        /// refuses a `Docker-Content-Digest` other than its own).
        client_digest: Option<Digest>,
        /// What was stored, recorded in the ledger once the registry took it.
        entry: Option<LedgerEntry>,
        /// Fingerprint of the project's current recipients: a layer the ledger holds for other
        /// recipients (before a rotation) must be pushed again.
        recipients: String,
    },
}

impl Flow {
    /// The callout whose answer the flow waits for, if it waits for one.
    pub fn callout(&self) -> Option<CalloutId> {
        match self {
            Flow::DeleteCheck { callout, .. }
            | Flow::HeadLookup { callout, .. }
            | Flow::OpeningSession { callout, .. }
            | Flow::TagsList { callout, .. }
            | Flow::Storing { callout, .. }
            | Flow::Recording { callout, .. } => Some(*callout),
            Flow::Finishing { callout, .. } => *callout,
            _ => None,
        }
    }
}

/// An upload request's body in flight.
pub struct ChunkFlow {
    /// Repository name.
    pub repository: String,
    /// The session had saved state before this request (for the in-flight gauge).
    pub had_state: bool,
    /// The upload session id, when known.
    pub upload_id: Option<String>,
    /// The cipher and hash state (taken when the body ends on a finishing request).
    pub stream: Option<ChunkStream>,
    /// Set when the client meant to finish the blob with this request (monolithic upload).
    pub finish: Option<Finish>,
}

/// A monolithic upload's finish, prepared before its body.
pub struct Finish {
    /// The digest the client named.
    pub client_digest: Digest,
    /// Resolved before the body: a body callback cannot wait for the key service.
    pub recipients: Vec<Recipient>,
    /// Set at the end of the body.
    pub completion: Option<Completion>,
}

/// Where the recording of a blob in the registry's ledger stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordingStage {
    /// A session for the ledger manifests' empty config is being opened.
    ConfigSession,
    /// The empty config is being uploaded.
    Config,
    /// The ledger manifest is being written.
    Manifest,
}
