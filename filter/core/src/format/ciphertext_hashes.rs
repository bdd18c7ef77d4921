//! A layer's two hashes of its ciphertext — the digest that names the stored blob and the inner
//! hash of ocicrypt's HMAC — computed apart from the cipher: on a helper thread where the host
//! has threads (the native build), so that one stream's hashing runs beside its encryption.
//!
//! Only hashing moves. The stream keeps the cipher and the plaintext digest, so no byte goes
//! upstream before it is encrypted; a lane gets a copy of each chunk's ciphertext after the
//! chunk was encrypted. The encryptor takes the states back at the request's end only if they
//! absorbed exactly the bytes it encrypted (a lost, skipped or doubled chunk refuses the
//! upload instead of naming the blob by a wrong digest).

use crate::format::sha256::Sha256State;

/// The ciphertext's digest state and the HMAC's inner state, as a lane carries them.
pub struct CiphertextHashes {
    pub(crate) digest: Sha256State,
    /// Starts one pad block ahead of the ciphertext (`hmac_init`).
    pub(crate) hmac_inner: Sha256State,
}

impl CiphertextHashes {
    /// Absorbs the next ciphertext bytes into both states.
    pub fn absorb(&mut self, ciphertext: &[u8]) {
        self.digest.update(ciphertext);
        self.hmac_inner.update(ciphertext);
    }

    /// Ciphertext bytes absorbed so far.
    pub fn len(&self) -> u64 {
        self.digest.len()
    }

    /// True before any ciphertext was absorbed.
    pub fn is_empty(&self) -> bool {
        self.digest.is_empty()
    }
}

impl std::fmt::Debug for CiphertextHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CiphertextHashes")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// Where one request's ciphertext hashes are computed while it streams.
pub trait CiphertextLane: Send {
    /// The next ciphertext bytes of the layer, in stream order. The lane copies what it keeps:
    /// the bytes go upstream when this returns. May wait for room (a lane's memory is bounded).
    fn absorb(&mut self, ciphertext: &[u8]);

    /// Waits until every byte given is absorbed and hands the states back; `None` when the
    /// helper failed (the upload is then refused, never committed under a guessed digest).
    fn join(self: Box<Self>) -> Option<CiphertextHashes>;
}

/// The host's helpers for hashing beside the stream.
pub trait HashHelpers {
    /// A lane that goes on from `hashes`, or `hashes` back when no helper takes it (the
    /// stream then hashes in line, as without helpers).
    fn lane(
        &mut self,
        hashes: CiphertextHashes,
    ) -> Result<Box<dyn CiphertextLane>, Box<CiphertextHashes>>;
}

/// A lane without a helper: hashes on the calling thread when given the bytes. For tests of
/// the lane protocol, and a reference for hosts.
pub struct InlineLane(pub CiphertextHashes);

impl CiphertextLane for InlineLane {
    fn absorb(&mut self, ciphertext: &[u8]) {
        self.0.absorb(ciphertext);
    }

    fn join(self: Box<Self>) -> Option<CiphertextHashes> {
        Some(self.0)
    }
}
