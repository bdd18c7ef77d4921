//! One HTTP stream through the gateway, as a machine that takes events and answers commands.
//!
//! The host (the proxy-wasm adapter in `filter/wasm`, later a native Envoy module) turns what
//! Envoy tells it into events on a [`Stream`] and carries out the [`Command`]s it answers; the
//! machine never calls the host. Time, randomness, the shared store, the worker's manifest
//! budget and the project's recipient keys come in through an [`Env`], which the worker's
//! [`plugin::Plugin`] lends for each event; the plugin is also the machine of the worker's
//! own events (configuration, ticks, the key-service refresh, shared queues). The stats a host
//! defines, and what each [`Metric`] does to them, are [`metrics`]'s; the local reply a
//! command sends is [`Command::local_reply`].
//!
//! # Events
//!
//! | event | method |
//! | --- | --- |
//! | request headers (names lowercased, values as bytes, with the end-of-stream flag) | [`Stream::on_request_headers`] |
//! | a key lookup run elsewhere ([`KeyAnswer::Waiting`]) is finished | [`Stream::on_keys_ready`] |
//! | a callout the machine dispatched (to the registry, or its key lookup's fetch from the key service) is answered (or failed: an answer without `:status`) | [`Stream::on_callout`] |
//! | a callout could not be dispatched (a key fetch: as no answer) | [`Stream::on_dispatch_failed`] |
//! | a host call the commands needed failed | [`Stream::on_host_failed`] |
//! | request body bytes (an upload chunk, a manifest, a refusal being drained) | [`Stream::on_request_body`] |
//! | request trailers | [`Stream::on_request_trailers`] |
//! | response headers (every flow: uploads, mounts, `HEAD`s, manifests, passthrough) | [`Stream::on_response_headers`] |
//! | the stream ends | [`Stream::on_end`] |
//!
//! # Commands
//!
//! Set or remove a request header, replace or drop the buffered request body, set or remove a
//! response header, dispatch a callout (its
//! [`CalloutId`] comes back with the answer), answer the client with an OCI error
//! ([`Command::Reply`]) or with the registry's own refusal ([`Command::Relay`]), let the
//! request go on ([`Command::Continue`]: in a headers callback, continue; after a pause,
//! resume the request) or keep it waiting ([`Command::Pause`]; in the response headers
//! callback, the response waits), resume a held response ([`Command::ResumeResponse`]), count
//! a metric, log a line. Commands are carried out in order; a refusal always ends with
//! [`Command::Reply`] (or [`Command::Relay`]) then [`Command::Pause`]. Shared state (upload
//! records, session claims, the ledger cache, the ledger's empty-config marks) is read and
//! written through the [`Store`] in the [`Env`], synchronously, as Envoy's shared data is; the
//! ledger cache is bounded ([`crate::distribution::ledger_cache`]), and the entries a request reads
//! back from the registry's ledger stay with the request until it ends.
//!
//! # The request line (what a request is, decided before any byte of its body)
//!
//! Every request, in this order; the first that applies decides:
//! 1. A write (not `GET`/`HEAD`) whose method or path is not UTF-8 is refused `403`: the gateway
//!    could not see where it lands. Reads pass.
//! 2. `PUT`/`DELETE` of a manifest under a reserved tag (`ocicrypt.…`, the ledger's) is
//!    refused `403`, whatever the repository.
//! 3. Any write with a non-canonical path (`%`, `\`, `//`, dot segments) is refused `403`,
//!    whatever it routes to: the registry could read another repository out of it
//!    (`plain/x/../../demo/y` routes as a passthrough name).
//! 4. A `DELETE` of a manifest by digest in an encrypted repository reads the manifest first
//!    (callout with the client's credentials); a ledger record is refused `403`, anything else
//!    goes on. A `GET` of a tags list in an encrypted repository is read by callout (with the
//!    client's credentials) and answered by the gateway without its reserved tags
//!    ([`crate::distribution::tags_list`]). Any other request the distribution routes do not name
//!    passes.
//! 5. A request in a repository the policy does not encrypt passes untouched.
//! 6. Upload requests are read as the registry reads them: a form `Content-Type` or a query
//!    the registry could read differently (a parameter it acts on repeated, an encoded
//!    parameter name, `;`, a bad escape) is refused `400 BLOB_UPLOAD_INVALID`. `:authority`,
//!    `Authorization`, `Content-Range`, `Content-Length` and `Content-Type` are read as
//!    UTF-8 only where the gateway interprets them, and refused `400` when they are not.
//! 7. Then the route's own checks, **all before the project's recipients are asked for**: a
//!    request that will be refused anyway costs the key service nothing.
//!    - `POST …/uploads/`: the `digest` of a single-POST upload with a body must parse; a
//!      `mount`/`from` of the same project is looked up in the ledger. Then the recipients
//!      (none: `503`). A mount of a blob the gateway encrypted in the same project for the
//!      current recipients mounts the ciphertext; any other mount becomes a plain upload. A
//!      `digest` with a body opens a session by callout and turns the request into a `PATCH`
//!      of it; without a body the `digest` is dropped.
//!    - `PATCH …/uploads/<id>`: the registry's `_state` must name this session, the gateway's
//!      state (sealed in the URL, or in the store) must open and be at the registry's offset,
//!      the session must not be in use by another request (claimed in the store). No key.
//!    - `PUT …/uploads/<id>?digest=D`: `D` must parse, the state must load as for a `PATCH`;
//!      without a body the content must hash to `D`. Then the recipients, the claim, and: with
//!      a body, a `PATCH` of the session (finished by callout on the registry's `202`); without,
//!      the key wrapped and the request line rewritten to the ciphertext's digest.
//!    - `HEAD …/blobs/D`: a digest the ledger does not know passes (after one read of the
//!      registry's ledger when replicas share it); a known one needs the recipients, and is
//!      asked about as its ciphertext only when wrapped for the current ones.
//!    - `PUT …/manifests/<ref>`: a digest reference must parse, a body must come, a declared
//!      length must be within `limits.max_manifest_bytes` and the worker's manifest budget
//!      must have room; then the recipients, the budget reserved, and the headers set for the
//!      rewritten body (stored Content-Type, no Content-Length; by digest the request line
//!      stays: that request never goes on).
//!    - `DELETE …/uploads/<id>` drops the gateway's state; `GET` of a session passes.
//! 8. A refused manifest `PUT` that has a body is answered only once the body has been read
//!    (containerd hangs on an answer that comes before it has sent the manifest).
//!
//! Request trailers on any request the gateway acts on in an encrypted repository are refused
//! `400`: they end a body without an end-of-stream body event, so a held manifest would go
//! on unrewritten and a monolithic upload unfinished.
//!
//! # A manifest push, after its request line
//!
//! The body is held until its end; past `limits.max_manifest_bytes` it is dropped as it comes
//! and refused `413` at its end. Then: pushed by digest, it must hash to that digest; more than
//! 65 536 JSON values is refused before anything parses it; with replicas, the ledger records
//! of the digests it names that this process lacks are read from the registry (at most
//! `limits.max_ledger_lookups`, else refused before any read; a record that does not
//! authenticate refuses the push); then it is rewritten (a layer the ledger holds for recipients
//! the project no longer has is refused). Pushed by tag, the new body replaces the old, and on
//! the registry's `201` the mapping is ledgered and `Docker-Content-Digest` names the client's
//! digest (the stored one goes in `X-Ocicrypt-Stored-Digest`). Pushed by digest, the gateway
//! stores it by callout under its new digest (a referrer under its reserved tag) and answers
//! the client itself: `201`, `Location` and `Docker-Content-Digest` naming the client's digest,
//! the mapping ledgered first (with replicas, recorded in the registry's ledger while the
//! answer waits); the registry's own 4xx refusal is relayed, anything else refused.
//!
//! Every registry answer to a request in an encrypted repository is checked first: a redirect,
//! or a `Location` out of the repository or off the gateway, is refused `502` (a session opened
//! elsewhere is deleted where the gateway reaches it).
//!
//! # An upload body, after its request line
//!
//! Each chunk is encrypted as it streams and replaces itself (CTR keeps the length); the blob's
//! first 512 bytes are held until they decide its treatment (JSON passes, ciphertext passes
//! where the policy accepts it, judged window by window, anything else is encrypted), and a
//! blob taken for JSON that turns binary, or for ciphertext that turns plaintext, is refused
//! before that chunk goes on. The keystream may come from another worker
//! ([`crate::gateway::prefetch`], lent through [`Env::keystream`]): the bytes are the same. At the
//! end of a monolithic body the blob is completed (its plaintext checked against the client's
//! digest, its key wrapped to the recipients resolved before the body); a mismatch is refused
//! there.
//!
//! # An upload's end, after its body
//!
//! - A monolithic body (sent as a `PATCH`) answered `202`: the response is held and the
//!   gateway finishes the upload by callout, `PUT <Location>&digest=<ciphertext>`. A body that
//!   had not ended here when the registry answered (HTTP/2 trailers) has no ciphertext digest:
//!   the session is deleted at the answer's `Location` and the request refused `400`. No
//!   `Location` in the `202`: refused `500`. Any other answer goes to the client as it is.
//! - The finishing `PUT` answered `201`: the held `202` becomes the client's `201` (`:status`,
//!   `Content-Length: 0`; `Range` and `Docker-Upload-UUID` removed) and the blob is committed.
//!   A 4xx with an OCI error body is the client's answer as the registry gave it (a `401`
//!   with its challenge); anything else, a failed callout included, is refused (`503`, or
//!   `403` for a `401`/`403` without such a body).
//! - A `PUT ?digest=` without a body answered `201` is committed; any other answer passes.
//! - Committing: the upload's saved state is dropped, an encrypted blob ledgered under the
//!   client's digest and the ciphertext's, and `Docker-Content-Digest` and `Location` name the
//!   client's digest. With replicas an encrypted blob is first recorded in the registry's
//!   ledger while the answer waits, in up to three callouts: a session for the repository's
//!   empty config (skipped once the store marks it uploaded), the empty config, the
//!   authenticated ledger manifest. A stage answered otherwise than expected (`202`, `201`,
//!   `201`), or failed, refuses the request saying the blob was stored but not recorded.
//! - A mount of a blob the ledger knows answered `201`: ledgered in this repository (with
//!   replicas: recorded in the registry's ledger first, as above) and answered in the client's
//!   digest and `Location`. A `HEAD` of one answered `200`: `Docker-Content-Digest` names the
//!   client's digest. Other answers pass.
pub mod prefetch;

mod answer;
mod body;
mod by_digest;
mod finish;
mod flow;
mod head;
mod keys;
mod ledgered;
mod manifest_push;
pub mod metrics;
pub mod plugin;
mod recording;
mod reply;
mod request;
mod tags_list;

use std::cell::Cell;

use rand_core::CryptoRngCore;

use crate::config::Config;
use crate::error::{Code, OciError};
use crate::store::Store;

pub use answer::registry_refusal;
pub use flow::{ChunkFlow, Finish, Flow, RecordingStage};
pub use head::{CalloutAnswer, RequestHead, ResponseHead};
pub use keys::{fetch_status, key_fetch, KeyAnswer, Keys, WorkerKeys};
pub use recording::empty_config_key;
pub use reply::{host_failure, LocalReply, MARKER};
pub use request::too_large;
pub use tags_list::MAX_SKIPPED_PAGES;

/// What the machine reads and writes outside itself, lent for one event.
pub struct Env<'a> {
    /// The worker's compiled configuration.
    pub config: &'a Config,
    /// State shared by the workers (upload records, session claims, the ledger cache).
    pub store: &'a dyn Store,
    /// The project's recipient keys.
    pub keys: &'a mut dyn Keys,
    /// Manifest bytes the worker's streams hold right now (see [`MANIFEST_BUDGET_PER_WORKER`]).
    pub held_manifest_bytes: &'a Cell<usize>,
    /// Unix seconds.
    pub now: u64,
    /// Randomness (layer keys, nonces, key wrapping).
    pub rng: &'a mut dyn CryptoRngCore,
    /// The worker's keystream prefetch, when the host lends it (without, upload bodies are
    /// encrypted locally: the same bytes).
    pub keystream: Option<crate::gateway::prefetch::Keystream<'a>>,
    /// Helpers that hash an upload's ciphertext beside its stream, when the host has threads
    /// (without, the stream hashes in line: the same digests).
    pub hashing: Option<&'a mut dyn crate::format::ciphertext_hashes::HashHelpers>,
}

/// Names a callout the machine dispatched, so that its answer finds its way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalloutId(pub u32);

/// An HTTP callout to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Callout {
    /// Its name for [`Stream::on_callout`].
    pub id: CalloutId,
    /// Envoy cluster.
    pub cluster: String,
    /// Headers, pseudo-headers first.
    pub headers: Vec<(String, String)>,
    /// Body, if any.
    pub body: Option<Vec<u8>>,
    /// Timeout in milliseconds.
    pub timeout_ms: u64,
}

/// Log levels the machine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// What the gateway did.
    Info,
    /// A refusal, or something odd it worked around.
    Warn,
}

/// Metrics the machines count (what each does to the host's stats: [`Metric::updates`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Metric {
    /// A request refused with this code.
    Refused(Code),
    /// A cross-repository mount turned into an upload.
    MountRewritten,
    /// A manifest rewritten.
    ManifestRewritten,
    /// Upload records kept in the store changed by this much.
    UploadState(i64),
    /// A write to the ledger cache changed the entries held, and evicted some.
    LedgerCache(crate::distribution::ledger_cache::Change),
    /// A request continued an upload session whose previous request another replica served.
    SessionMoved,
    /// The worker's keystream prefetch since its last report.
    Keystream(crate::gateway::prefetch::Report),
    /// A blob was committed encrypted: its size in bytes.
    LayerEncrypted(u64),
    /// A blob (a config, a JSON artifact) was committed as pushed.
    BlobPassed,
    /// The key records and lookups.
    Key(crate::keys::records::KeyMetric),
}

/// What the host does for the stream, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Sets a request header (replacing every value).
    SetRequestHeader(String, String),
    /// Removes a request header.
    RemoveRequestHeader(String),
    /// Replaces the first `.0` bytes of the buffered request body with `.1`.
    ReplaceRequestBody(usize, Vec<u8>),
    /// Sets a response header (replacing every value).
    SetResponseHeader(String, String),
    /// Answers the client with this status, these headers and body (local reply); the request
    /// goes no further.
    Respond {
        /// HTTP status.
        status: u16,
        /// Headers besides the gateway's own marker.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
    },
    /// Removes a response header.
    RemoveResponseHeader(String),
    /// Drops whatever request body the host buffers (best effort: a request refused at its
    /// trailers may have none left to drop).
    DropRequestBody,
    /// Dispatches a callout.
    Dispatch(Callout),
    /// Answers the client with this OCI error (local reply); the request goes no further.
    Reply(OciError),
    /// The request goes on: a headers callback continues; a paused request is resumed.
    Continue,
    /// The request waits (for a callout, a key lookup, or for good after a reply); in a
    /// response headers callback, the response waits (for the finishing and recording
    /// callouts).
    Pause,
    /// The response held in its headers callback goes on (after the callouts it waited for).
    ResumeResponse,
    /// Answers the client with the registry's own refusal of a callout made on its behalf, as
    /// the registry gave it (a 4xx whose body is an OCI error document, with the registry's
    /// `WWW-Authenticate` challenge on a 401); the request goes no further.
    Relay {
        /// The registry's status.
        status: u16,
        /// The registry's body.
        body: Vec<u8>,
        /// The registry's challenge, as its bytes.
        challenge: Option<Vec<u8>>,
    },
    /// Counts a metric.
    Metric(Metric),
    /// Logs a line (the host prefixes the stream's id).
    Log(Level, String),
}

/// Manifest bytes one worker may hold at once, whatever the number of streams: 200 connections
/// each holding a 4 MiB manifest took Envoy from 302 to 1 133 MiB. At least two manifests of
/// `limits.max_manifest_bytes`.
pub const MANIFEST_BUDGET_PER_WORKER: usize = 32 * 1024 * 1024;

/// One request through the gateway.
#[derive(Default)]
pub struct Stream {
    /// What the stream is doing.
    pub flow: Flow,
    /// `METHOD path` without upload state, for log lines.
    pub request: String,
    /// The repository of a request the gateway acts on (an encrypted repository): every answer
    /// the registry gives it is checked before the client sees it.
    pub encrypted: Option<String>,
    /// The request's `:authority` (callouts go to the registry under it).
    pub authority: String,
    /// The client's `Authorization`, carried on the callouts made for it.
    pub authorization: Option<String>,
    /// The path the request went upstream with (a session to delete when the registry's answer
    /// cannot be followed).
    pub upstream_path: String,
    /// The request's `Content-Length` (body callbacks cannot read headers).
    pub content_length: Option<u64>,
    /// The upload session this stream holds the claim of (released when the stream ends).
    pub claimed: Option<String>,
    /// Bytes of the worker's manifest budget the stream holds (released when it ends).
    pub manifest_reserved: usize,
    /// The request headers, kept to decide again after a wait.
    head: Option<RequestHead>,
    /// Whether this request already read the registry's ledger for its blob.
    ledger_checked: bool,
    /// Ledger reads in flight for the held manifest: (callout, plaintext digest).
    ledger_reads: Vec<(CalloutId, crate::digest::Digest)>,
    /// Entries this request read back from the registry's ledger.
    read_back: Vec<ledgered::ReadBack>,
    /// The manifest body held while its ledger entries are read from the registry.
    held_manifest: Option<Vec<u8>>,
    next_callout: u32,
    /// The request's key-service lookup (one at most).
    lookup: crate::keys::records::StreamLookup,
    /// The lookup's fetch, to go out with the pause.
    key_fetch: Option<Callout>,
    /// The lookup's fetch the request waits for.
    key_waits: Option<CalloutId>,
    /// The upload body's part in the worker's keystream prefetch.
    prefetch: crate::gateway::prefetch::RequestPrefetch,
}

impl Stream {
    /// A new stream, before its request headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuses the request: one log line (the request and the reason), the metric, the answer.
    pub fn refuse(&mut self, err: OciError) -> Vec<Command> {
        self.flow = Flow::Refused;
        // Answers still in flight find nothing waiting for them.
        self.ledger_reads.clear();
        self.held_manifest = None;
        vec![
            Command::Log(Level::Warn, format!("refused {}: {err}", self.request)),
            Command::Metric(Metric::Refused(err.code)),
            Command::Reply(err),
            Command::Pause,
        ]
    }

    /// Request headers arrived.
    pub fn on_request_headers(&mut self, head: RequestHead, env: &mut Env) -> Vec<Command> {
        self.content_length = head
            .text("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let drain = !head.end_of_stream && head.is_manifest_put();
        self.head = Some(head);
        match self.decide(env) {
            Ok(commands) => commands,
            Err(e) if drain => {
                // containerd may hang forever on an answer that comes before it has sent the
                // manifest body: take the body (forwarding none of it), answer at its end.
                self.flow = Flow::Draining(e);
                vec![Command::Continue]
            }
            Err(e) => self.refuse(e),
        }
    }

    /// The key lookup the paused request waited for is finished: decide the request again
    /// (the keys now answer from the lookup's result).
    pub fn on_keys_ready(&mut self, env: &mut Env) -> Vec<Command> {
        self.redecide(env)
    }

    /// The stream ends (answered, reset or refused): the session claim and the manifest
    /// budget it holds are given back.
    pub fn on_end(&mut self, store: &dyn Store, held_manifest_bytes: &Cell<usize>) {
        if let Some(id) = self.claimed.take() {
            crate::distribution::session::release_in(store, &id);
        }
        let reserved = std::mem::take(&mut self.manifest_reserved);
        held_manifest_bytes.set(held_manifest_bytes.get().saturating_sub(reserved));
    }

    /// Request trailers arrived.
    pub fn on_request_trailers(&mut self) -> Vec<Command> {
        match &self.flow {
            Flow::Refused => vec![Command::Pause],
            Flow::Draining(e) => {
                let e = e.clone();
                self.refuse(e)
            }
            _ if self.encrypted.is_some() => {
                let mut out = vec![Command::DropRequestBody];
                out.extend(self.refuse(OciError::new(
                    Code::BlobUploadInvalid,
                    "request trailers are refused on writes to an encrypted repository; send the body without trailers",
                )));
                out
            }
            _ => vec![Command::Continue],
        }
    }

    /// A callout to the registry with the client's credentials.
    pub fn registry_callout(
        &mut self,
        config: &Config,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Callout {
        let mut headers = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), self.authority.clone()),
            (
                "accept".to_string(),
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
                    .to_string(),
            ),
        ];
        // A bodiless POST/PUT still says so (distribution wants a length on uploads).
        if method != "GET" {
            headers.push((
                "content-length".to_string(),
                body.map_or(0, <[u8]>::len).to_string(),
            ));
        }
        if let Some(ct) = content_type {
            headers.push(("content-type".to_string(), ct.to_string()));
        }
        if let Some(auth) = &self.authorization {
            headers.push(("authorization".to_string(), auth.clone()));
        }
        Callout {
            id: self.next_id(),
            cluster: config.registry.cluster.clone(),
            headers,
            body: body.map(<[u8]>::to_vec),
            timeout_ms: config.registry.timeout_ms,
        }
    }

    /// A fresh callout id.
    fn next_id(&mut self) -> CalloutId {
        self.next_callout = self.next_callout.wrapping_add(1);
        CalloutId(self.next_callout)
    }

    /// A callout the machine asked for could not be dispatched: the key lookup's counts as
    /// unanswered; otherwise the registry is unreachable. (A best-effort callout nobody waits
    /// for fails silently.)
    pub fn on_dispatch_failed(&mut self, id: CalloutId, env: &mut Env) -> Vec<Command> {
        if self.is_key_fetch(id) {
            self.on_key_answer(0, &[], env)
        } else if self.awaits(id) {
            self.refuse(unreachable_registry())
        } else {
            Vec::new()
        }
    }

    fn redecide(&mut self, env: &mut Env) -> Vec<Command> {
        match self.decide(env) {
            Ok(commands) => commands,
            Err(e) => self.refuse(e),
        }
    }
}

/// The refusal when a callout to the registry cannot be made.
pub fn unreachable_registry() -> OciError {
    OciError::new(
        Code::Unavailable,
        "could not reach the registry; nothing was stored",
    )
}
