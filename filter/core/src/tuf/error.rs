//! Errors of the TUF client, in the categories of the specification's client workflow (§5) and
//! of python-tuf's `tuf.api.exceptions`: repository errors (the metadata or a target is not
//! trustworthy), download errors (the bytes could not be had), and workflow errors.

use std::fmt;

use thiserror::Error;

/// Any failure of the TUF client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TufError {
    /// Metadata or a target file failed verification.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// A file could not be downloaded.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// No role trusted for the path lists the target (spec 5.7.2).
    #[error("target {path:?} is not listed by any role trusted for it")]
    TargetNotFound {
        /// The target path that was looked up.
        path: String,
    },
    /// A call that the workflow order does not allow (a programming error of the caller).
    #[error("{operation} is not allowed now: {reason}")]
    OutOfOrder {
        /// The refused operation.
        operation: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// The version a check expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Exactly this version.
    Exactly(u64),
    /// This version or a higher one.
    AtLeast(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Exactly(v) => write!(f, "{v}"),
            ExpectedVersion::AtLeast(v) => write!(f, ">= {v}"),
        }
    }
}

/// Metadata or a target file is not trustworthy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RepositoryError {
    /// The bytes are not well-formed TUF metadata.
    #[error("{role} metadata is malformed: {reason}")]
    Malformed {
        /// Role whose metadata was being loaded.
        role: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// The metadata's `_type` is not the expected one.
    #[error("{role} metadata has _type {found:?}, expected {expected:?}")]
    WrongType {
        /// Role whose metadata was being loaded.
        role: String,
        /// The expected `_type`.
        expected: String,
        /// The `_type` in the metadata.
        found: String,
    },
    /// The major `spec_version` is not 1.
    #[error("{role} metadata has unsupported spec_version {spec_version:?}")]
    UnsupportedSpecVersion {
        /// Role whose metadata was being loaded.
        role: String,
        /// The `spec_version` in the metadata.
        spec_version: String,
    },
    /// The `signatures` array names the same keyid twice (spec §4.2: keyids MUST be unique).
    #[error("{role} metadata carries several signatures for keyid {keyid}")]
    DuplicateSignature {
        /// Role whose metadata was being loaded.
        role: String,
        /// The repeated keyid.
        keyid: String,
    },
    /// Fewer than a threshold of distinct trusted keys signed (arbitrary software attack).
    #[error(
        "{role} metadata is signed by {valid} of the {threshold} required keys (of {delegator})"
    )]
    BadSignature {
        /// Role whose metadata was being verified.
        role: String,
        /// Role whose keys and threshold were applied (`root` for top-level roles).
        delegator: String,
        /// Distinct keys with a valid signature.
        valid: u64,
        /// Required number of keys.
        threshold: u64,
    },
    /// A version check failed (rollback attack, or metadata that does not match its reference).
    #[error("{role} version {found} where {expected} was expected")]
    BadVersion {
        /// Role (or `<role>.json` meta entry) whose version is wrong.
        role: String,
        /// The version that was expected.
        expected: ExpectedVersion,
        /// The version that was found.
        found: u64,
    },
    /// The new timestamp has the trusted version: keep the trusted one (spec 5.4.3.1). Not a
    /// failure of the update cycle.
    #[error("{role} version {version} is already trusted")]
    EqualVersion {
        /// Role (always `timestamp`).
        role: String,
        /// The version both copies have.
        version: u64,
    },
    /// The metadata expired before the fixed update start time (freeze attack).
    #[error("{role} metadata expired at {expires} (unix), update started at {now}")]
    Expired {
        /// Role whose metadata expired.
        role: String,
        /// Expiry, unix seconds.
        expires: i64,
        /// The fixed update start time, unix seconds.
        now: i64,
    },
    /// Length or a hash differs from what the referring metadata lists (mix-and-match or
    /// arbitrary software attack), or a hash algorithm is not supported.
    #[error("{what}: {reason}")]
    LengthOrHashMismatch {
        /// The file checked (`snapshot.json`, `targets.json`, target path).
        what: String,
        /// What differs.
        reason: String,
    },
    /// A role listed in the trusted snapshot is missing from the new one (spec 5.5.5).
    #[error("new snapshot no longer lists {meta}")]
    MetaRemoved {
        /// The vanished entry, e.g. `tribe-a.json`.
        meta: String,
    },
    /// The trusted snapshot does not list the role's metadata.
    #[error("snapshot does not list {role}.json")]
    NotInSnapshot {
        /// The role whose meta entry is missing.
        role: String,
    },
    /// The delegator does not delegate to the role.
    #[error("{delegator} does not delegate to {role}")]
    NotDelegated {
        /// The role being loaded.
        role: String,
        /// The role that was expected to delegate to it.
        delegator: String,
    },
}

/// A file could not be downloaded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DownloadError {
    /// The server answered with a status other than 200.
    #[error("GET {path} answered HTTP {status}")]
    Http {
        /// Requested path, relative to its base URL.
        path: String,
        /// The HTTP status (0 when the transport failed).
        status: u16,
    },
    /// The body is longer than the limit for this file.
    #[error("GET {path} returned {got} bytes, more than the {max_len} allowed")]
    TooLarge {
        /// Requested path, relative to its base URL.
        path: String,
        /// Byte limit.
        max_len: u64,
        /// Bytes received.
        got: u64,
    },
}
