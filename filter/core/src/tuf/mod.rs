//! TUF client (The Update Framework, specification 1.0), sans-I/O.
//!
//! The key service that hands out per-project recipient keys is a TUF repository (DESIGN §6);
//! this module is the client side of the specification's detailed workflow (§5), shaped like
//! python-tuf's `ngclient`:
//!
//! - [`TrustedMetadataSet`] does every verification step: bytes in, verified metadata or a
//!   typed [`TufError`] out; no I/O, no clock (the caller passes the fixed update start time);
//! - [`Updater`] drives the workflow as a state machine: it names the next file to fetch
//!   ([`Fetch`]), takes the response and ends in refreshed metadata, a resolved target or a
//!   verified target file; the trusted bytes to persist are in its [`MetadataCache`].
//!
//! Signatures are verified over the OLPC canonical JSON ([`canonical`]) of the `signed`
//! object as received, unknown fields included. Keys: ed25519, ECDSA P-256/P-384, RSA-PSS
//! (and PKCS#1 v1.5) with SHA-2 ([`keys`]). Keyids are not recomputed from key content (as
//! in python-tuf: deployed repositories, Sigstore's among them, carry keyids computed other
//! ways); instead a key counts once toward a threshold however many keyids name it.

pub mod canonical;
pub mod error;
pub mod keys;
pub mod metadata;
pub mod pattern;
pub mod trusted;
pub mod updater;

pub use error::{DownloadError, ExpectedVersion, RepositoryError, TufError};
pub use keys::Key;
pub use metadata::{
    DelegatedRole, DelegatedRoles, Delegations, MetaFile, PathSpec, Root, Snapshot, SuccinctRoles,
    TargetFile, Targets, Timestamp,
};
pub use trusted::{TrustedMetadataSet, Verified};
pub use updater::{
    decode_role_name, encode_role_name, metadata_path, target_path, Fetch, FetchBase,
    MetadataCache, Outcome, Progress, Updater, UpdaterConfig,
};
