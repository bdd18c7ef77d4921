//! The ledger: what the gateway encrypted, keyed by repository and plaintext digest, so that the
//! manifest (which names layers by their plaintext digests) can be rewritten to the ciphertext.
use std::collections::BTreeMap;

use crate::digest::Digest;

/// One encrypted blob, as the manifest rewrite needs it. Holds no secret: the symkey only
/// appears wrapped inside the `keys.jwe` annotation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Digest of the ciphertext blob the registry stores.
    pub encrypted_digest: Digest,
    /// Blob size (CTR keeps the plaintext size).
    pub size: u64,
    /// `org.opencontainers.image.enc.*` annotations to add to the layer descriptor.
    pub annotations: BTreeMap<String, String>,
}

/// Shared-data key of a ledger entry. Repository names are `[a-z0-9._/-]`, so `@` separates.
pub fn key(repository: &str, plaintext: &Digest) -> String {
    format!("ocicrypt/ledger/{repository}@{plaintext}")
}

impl LedgerEntry {
    /// Serialized form kept in shared data.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an entry written by [`LedgerEntry::to_bytes`]; `None` for anything else (an empty
    /// value marks a removed entry).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}
