//! ocicrypt's `AES_256_CTR_HMAC_SHA256` layer cipher, streamed chunk by chunk across
//! requests.
//!
//! Ciphertext = AES-256-CTR(symkey, nonce as the whole 128-bit big-endian counter block),
//! same length as the plaintext, no framing; `hmac` = HMAC-SHA256(symkey, ciphertext) —
//! byte-compatible with `containers/ocicrypt` `blockcipher_aes_ctr.go`. Besides the cipher the
//! encryptor hashes plaintext and ciphertext, because the gateway must check the client's
//! plaintext digest and name the ciphertext blob by its own digest.

use crate::digest::Digest;
use crate::format::ciphertext_hashes::{CiphertextHashes, CiphertextLane};
use crate::format::sha256::{hmac_finish, hmac_init, Sha256State};
use crate::format::simd::aes256x8::Aes256x8;
use crate::format::simd::sha256x4::{self, Schedule, Sha256x4};
use crate::format::simd::U32x4;
use aes::cipher::{InnerIvInit, KeyInit, KeyIvInit, StreamCipher, StreamCipherSeek};
use hmac::Mac;
use std::borrow::Cow;
use zeroize::{Zeroize, Zeroizing};

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// First byte of [`LayerEncryptor::to_bytes`]; bump when the layout changes so a state saved
/// by an older filter build is refused rather than misread.
const STATE_VERSION: u8 = 1;
const STATE_LEN: usize = 1 + 32 + 16 + 8 + 3 * Sha256State::SERIALIZED_LEN;
/// `hmac_init` absorbs one 64-byte pad block before any ciphertext.
const HMAC_PAD_LEN: u64 = 64;
/// SHA-256 block: the data-parallel path works on whole blocks from a block boundary.
const BLOCK: usize = 64;

/// The expanded key in the form this build's fast path uses: fixsliced for eight blocks in
/// `simd128` lanes on wasm, the `aes` crate (AES-NI when the CPU has it) elsewhere.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
type Keys = Aes256x8;
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
type Keys = aes::Aes256;

/// Why a cipher state or a ciphertext was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CipherError {
    /// Saved state of the wrong size (truncated, or not a state at all).
    #[error("saved layer cipher state is {actual} bytes, expected {expected}")]
    StateLength {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// Saved state written by a different layout version.
    #[error("saved layer cipher state has version {found}, this build reads version {supported}")]
    StateVersion {
        /// Version byte found.
        found: u8,
        /// Version this build writes and reads.
        supported: u8,
    },
    /// Saved state whose parts disagree about how many bytes were processed.
    #[error(
        "saved layer cipher state is inconsistent: offset {offset}, plaintext hash saw {plain}, \
         ciphertext hash saw {cipher}, HMAC saw {mac} (pad included)"
    )]
    StateInconsistent {
        /// Stream offset recorded.
        offset: u64,
        /// Bytes the plaintext hash absorbed.
        plain: u64,
        /// Bytes the ciphertext hash absorbed.
        cipher: u64,
        /// Bytes the HMAC inner hash absorbed.
        mac: u64,
    },
    /// A hash state inside the saved state is malformed.
    #[error("saved layer cipher state holds a malformed hash state")]
    StateHash,
    /// The counter could not be positioned at the saved offset.
    #[error("cannot position AES-CTR at byte offset {0}")]
    Seek(u64),
    /// The ciphertext does not carry the expected HMAC: wrong key, or altered data.
    #[error("HMAC-SHA256 of the {len}-byte ciphertext does not match the expected value")]
    HmacMismatch {
        /// Ciphertext length.
        len: usize,
    },
}

/// A keystream handed in for a chunk is not this stream's keystream at this offset (or not
/// as long as the chunk): refused before any byte changed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("the given keystream is not this layer's keystream at this offset")]
pub struct KeystreamMismatch;

/// Streaming encryptor of one layer blob. Holds the layer key; wiped on drop.
#[derive(Clone)]
pub struct LayerEncryptor {
    symkey: Zeroizing<[u8; 32]>,
    nonce: [u8; 16],
    /// The expanded key; the CTR position is derived from `offset` on every call.
    keys: Keys,
    offset: u64,
    plain: Sha256State,
    encrypted: Sha256State,
    mac: Sha256State,
}

/// Outcome of encrypting one layer: what the descriptor and the annotations need.
#[derive(Clone)]
pub struct EncryptedLayer {
    /// Digest of the plaintext blob as pushed (goes into the private options).
    pub plaintext_digest: Digest,
    /// Digest of the ciphertext blob (the new descriptor digest).
    pub encrypted_digest: Digest,
    /// Blob size, the same before and after encryption.
    pub size: u64,
    /// HMAC-SHA256(symkey, ciphertext), for the public options.
    pub hmac: [u8; 32],
    /// The layer key, to be wrapped for the recipients.
    pub symkey: Zeroizing<[u8; 32]>,
    /// The initial counter block.
    pub nonce: [u8; 16],
}

impl std::fmt::Debug for EncryptedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedLayer")
            .field("plaintext_digest", &self.plaintext_digest)
            .field("encrypted_digest", &self.encrypted_digest)
            .field("size", &self.size)
            .field("symkey", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LayerEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerEncryptor")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl LayerEncryptor {
    /// Starts a layer with the given key and initial counter block.
    pub fn new(symkey: [u8; 32], nonce: [u8; 16]) -> Self {
        let symkey = Zeroizing::new(symkey);
        let keys = expand(&symkey);
        let mac = hmac_init(&symkey);
        LayerEncryptor {
            symkey,
            nonce,
            keys,
            offset: 0,
            plain: Sha256State::new(),
            encrypted: Sha256State::new(),
            mac,
        }
    }

    /// Starts a layer with a fresh random key and nonce, as ocicrypt does for every layer.
    pub fn generate<R: rand_core::CryptoRngCore>(rng: &mut R) -> Self {
        let mut symkey = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(symkey.as_mut());
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        Self::new(*symkey, nonce)
    }

    /// Encrypts the next `chunk` of the blob in place and updates the digests and the HMAC.
    ///
    /// On wasm with `simd128` this is [`Self::encrypt_in_place_lanes`], elsewhere
    /// [`Self::encrypt_in_place_scalar`]; both give the same bytes and state.
    pub fn encrypt_in_place(&mut self, chunk: &mut [u8]) {
        if crate::format::simd::HARDWARE {
            self.encrypt_in_place_lanes(chunk);
        } else {
            self.encrypt_in_place_scalar(chunk);
        }
    }

    /// One pass per function: hash the plaintext, encrypt, hash the ciphertext twice. Fastest
    /// where AES and SHA-256 have instructions (`aes` and `sha2` detect AES-NI and SHA-NI).
    pub fn encrypt_in_place_scalar(&mut self, chunk: &mut [u8]) {
        self.encrypt_scalar_into(chunk, None);
    }

    /// The scalar path, the ciphertext hashed here or by `lane`.
    fn encrypt_scalar_into(&mut self, chunk: &mut [u8], lane: Option<&mut dyn CiphertextLane>) {
        self.plain.update(chunk);
        self.apply_keystream_at(self.offset, chunk);
        self.absorb_ciphertext(chunk, lane);
        self.offset = self.offset.wrapping_add(chunk.len() as u64);
    }

    /// Hashes ciphertext into the encryptor's own states, or hands it to the `lane` they are
    /// lent to.
    fn absorb_ciphertext(&mut self, ciphertext: &[u8], lane: Option<&mut dyn CiphertextLane>) {
        match lane {
            Some(lane) => lane.absorb(ciphertext),
            None => {
                self.encrypted.update(ciphertext);
                self.mac.update(ciphertext);
            }
        }
    }

    /// One pass over the data for all four functions, in `simd128` lanes on wasm (see
    /// [`crate::format::simd`]): eight AES blocks of keystream at a time, XORed into the data as it
    /// is loaded for hashing, and the three hashes advancing together in the lanes of one
    /// vector. Whole blocks from a block boundary take this path; the bytes before the first
    /// boundary and after the last one are hashed one state at a time.
    pub fn encrypt_in_place_lanes(&mut self, chunk: &mut [u8]) {
        let to_boundary = (BLOCK as u64 - self.offset % BLOCK as u64) as usize % BLOCK;
        let (head, rest) = chunk.split_at_mut(to_boundary.min(chunk.len()));
        self.encrypt_partial_lanes(head);
        let (body, tail) = rest.as_chunks_mut::<BLOCK>();
        self.encrypt_blocks_lanes(body, None);
        self.encrypt_partial_lanes(tail);
    }

    /// A piece shorter than a block, or not on a block boundary.
    fn encrypt_partial_lanes(&mut self, data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        self.plain.update(data);
        self.aes_x8()
            .apply_keystream(&self.nonce, self.offset, data);
        self.encrypted.update(data);
        self.mac.update(data);
        self.offset = self.offset.wrapping_add(data.len() as u64);
    }

    /// Encrypts whole blocks from a block boundary of the stream (all three hash states are
    /// then on a block boundary too: the HMAC's is one pad block ahead). With `given`, its
    /// blocks are the keystream (as long as `blocks`); without, the keystream is computed here.
    fn encrypt_blocks_lanes(&mut self, blocks: &mut [[u8; BLOCK]], given: Option<&[[u8; BLOCK]]>) {
        if blocks.is_empty() {
            return;
        }
        let (Some(p), Some(c), Some(m)) = (
            self.plain.chaining_value(),
            self.encrypted.chaining_value(),
            self.mac.chaining_value(),
        ) else {
            // Unreachable while the states agree with `offset` (checked on restore).
            match given {
                Some(ks) => {
                    self.encrypt_partial_given(blocks.as_flattened_mut(), ks.as_flattened())
                }
                None => self.encrypt_in_place_scalar(blocks.as_flattened_mut()),
            }
            return;
        };
        let mut lanes = Sha256x4::new([&p, &c, &m, &c]);
        match given {
            Some(ks) => {
                let (pairs, odd) = blocks.as_chunks_mut::<2>();
                let (ks_pairs, ks_odd) = ks.as_chunks::<2>();
                for ([first, second], [k_first, k_second]) in pairs.iter_mut().zip(ks_pairs) {
                    let (p0, c0) = encrypt_block(first, sha256x4::vectors(k_first));
                    let (p1, c1) = encrypt_block(second, sha256x4::vectors(k_second));
                    lanes.compress_pc_pair(p0, c0, p1, c1);
                }
                for (last, k) in odd.iter_mut().zip(ks_odd) {
                    let (p, c) = encrypt_block(last, sha256x4::vectors(k));
                    lanes.compress(&Schedule::pc_vectors(p, c));
                }
            }
            None => {
                let aes = self.aes_x8();
                // The offset is a multiple of 64, so the keystream starts on a whole AES block.
                let mut counter =
                    u128::from_be_bytes(self.nonce).wrapping_add(u128::from(self.offset / 16));
                let (pairs, odd) = blocks.as_chunks_mut::<2>();
                for [first, second] in pairs {
                    let [k0, k1, k2, k3, k4, k5, k6, k7] = aes.keystream(counter);
                    counter = counter.wrapping_add(8);
                    let (p0, c0) = encrypt_block(first, [k0, k1, k2, k3]);
                    let (p1, c1) = encrypt_block(second, [k4, k5, k6, k7]);
                    lanes.compress_pc_pair(p0, c0, p1, c1);
                }
                for last in odd {
                    let [k0, k1, k2, k3, ..] = aes.keystream(counter);
                    let (p, c) = encrypt_block(last, [k0, k1, k2, k3]);
                    lanes.compress(&Schedule::pc_vectors(p, c));
                }
            }
        }
        let [p, c, m, _] = lanes.states();
        let n = blocks.len() as u64;
        self.offset = self.offset.wrapping_add(n.wrapping_mul(BLOCK as u64));
        self.plain.advance_blocks(p, n);
        self.encrypted.advance_blocks(c, n);
        self.mac.advance_blocks(m, n);
    }

    /// Encrypts the next `chunk` with `keystream`, the CTR keystream of these very bytes that
    /// another worker computed ([`keystream`]); hashes as [`Self::encrypt_in_place`] does.
    ///
    /// The keystream is checked before use: its first block must equal the one computed here
    /// (one AES batch), so a segment of another stream or offset is refused, never applied.
    /// On refusal nothing changes and the caller encrypts those bytes itself.
    pub fn encrypt_in_place_given(
        &mut self,
        chunk: &mut [u8],
        keystream: &[u8],
    ) -> Result<(), KeystreamMismatch> {
        self.check_given(chunk.len(), keystream)?;
        if crate::format::simd::HARDWARE {
            self.encrypt_given_lanes(chunk, keystream);
        } else {
            self.encrypt_partial_given(chunk, keystream);
        }
        Ok(())
    }

    /// Whether `keystream` is this stream's keystream for the next `len` bytes.
    fn check_given(&self, len: usize, keystream: &[u8]) -> Result<(), KeystreamMismatch> {
        if keystream.len() != len {
            return Err(KeystreamMismatch);
        }
        // The first and the last (up to) 16 bytes must be this stream's keystream at these
        // offsets: a segment of another stream, offset or length never gets applied.
        let n = keystream.len().min(16);
        let last = keystream.len() - n;
        for (at, expected) in [
            (0, keystream.get(..n).unwrap_or_default()),
            (last, keystream.get(last..).unwrap_or_default()),
        ] {
            let mut probe = Zeroizing::new([0u8; 16]);
            let probe = probe.get_mut(..n).unwrap_or_default();
            let offset = self.offset.wrapping_add(at as u64);
            if crate::format::simd::HARDWARE {
                self.aes_x8().apply_keystream(&self.nonce, offset, probe);
            } else {
                self.apply_keystream_at(offset, probe);
            }
            if !bool::from(subtle::ConstantTimeEq::ct_eq(&*probe, expected)) {
                return Err(KeystreamMismatch);
            }
        }
        Ok(())
    }

    /// Hands the ciphertext's hash states over to a lane ([`crate::format::ciphertext_hashes`])
    /// until [`Self::take_back_ciphertext_hashes`]; meanwhile the encryptor's own are empty,
    /// so a state saved or a layer finished without them fails its checks.
    pub fn lend_ciphertext_hashes(&mut self) -> CiphertextHashes {
        CiphertextHashes {
            digest: std::mem::take(&mut self.encrypted),
            hmac_inner: std::mem::take(&mut self.mac),
        }
    }

    /// Takes back the states a lane went on with: they must have absorbed exactly the bytes
    /// encrypted so far, and nothing may have been hashed here meanwhile.
    pub fn take_back_ciphertext_hashes(
        &mut self,
        hashes: CiphertextHashes,
    ) -> Result<(), CipherError> {
        let CiphertextHashes { digest, hmac_inner } = hashes;
        if !self.encrypted.is_empty()
            || !self.mac.is_empty()
            || digest.len() != self.offset
            || hmac_inner.len() != self.offset.wrapping_add(HMAC_PAD_LEN)
        {
            return Err(CipherError::StateInconsistent {
                offset: self.offset,
                plain: self.plain.len(),
                cipher: digest.len(),
                mac: hmac_inner.len(),
            });
        }
        self.encrypted = digest;
        self.mac = hmac_inner;
        Ok(())
    }

    /// [`Self::encrypt_in_place`] with the ciphertext hashed by `lane` (its states lent with
    /// [`Self::lend_ciphertext_hashes`]): here only the plaintext digest and the cipher.
    pub fn encrypt_in_place_beside(&mut self, chunk: &mut [u8], lane: &mut dyn CiphertextLane) {
        self.encrypt_scalar_into(chunk, Some(lane));
    }

    /// [`Self::encrypt_in_place_given`] with the ciphertext hashed by `lane`.
    pub fn encrypt_in_place_given_beside(
        &mut self,
        chunk: &mut [u8],
        keystream: &[u8],
        lane: &mut dyn CiphertextLane,
    ) -> Result<(), KeystreamMismatch> {
        self.check_given(chunk.len(), keystream)?;
        self.encrypt_given_into(chunk, keystream, Some(lane));
        Ok(())
    }

    /// [`Self::encrypt_in_place_given`] after its check, hashing in `simd128` lanes like
    /// [`Self::encrypt_in_place_lanes`] (public for tests of both paths natively).
    #[doc(hidden)]
    pub fn encrypt_given_lanes(&mut self, chunk: &mut [u8], keystream: &[u8]) {
        if keystream.len() != chunk.len() {
            // Only a caller that skipped the check gets here: never leave plaintext.
            self.encrypt_in_place_lanes(chunk);
            return;
        }
        let to_boundary = (BLOCK as u64 - self.offset % BLOCK as u64) as usize % BLOCK;
        let split = to_boundary.min(chunk.len());
        let (head, rest) = chunk.split_at_mut(split);
        let (ks_head, ks_rest) = keystream.split_at(split);
        self.encrypt_partial_given(head, ks_head);
        // Same lengths, same splits: `ks_body` has as many blocks as `body`.
        let (body, tail) = rest.as_chunks_mut::<BLOCK>();
        let (ks_body, ks_tail) = ks_rest.as_chunks::<BLOCK>();
        self.encrypt_blocks_lanes(body, Some(ks_body));
        self.encrypt_partial_given(tail, ks_tail);
    }

    /// One state at a time, with a given keystream of the same length.
    fn encrypt_partial_given(&mut self, data: &mut [u8], keystream: &[u8]) {
        self.encrypt_given_into(data, keystream, None);
    }

    /// [`Self::encrypt_partial_given`], the ciphertext hashed here or by `lane`.
    fn encrypt_given_into(
        &mut self,
        data: &mut [u8],
        keystream: &[u8],
        lane: Option<&mut dyn CiphertextLane>,
    ) {
        if data.is_empty() {
            return;
        }
        self.plain.update(data);
        for (d, k) in data.iter_mut().zip(keystream) {
            *d ^= k;
        }
        self.absorb_ciphertext(data, lane);
        self.offset = self.offset.wrapping_add(data.len() as u64);
    }

    /// The key for [`Aes256x8`]: the one held on wasm, expanded on the spot elsewhere (where
    /// only tests of the lanes path need it).
    fn aes_x8(&self) -> Cow<'_, Aes256x8> {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        return Cow::Borrowed(&self.keys);
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        return Cow::Owned(Aes256x8::new(&self.symkey));
    }

    /// The key for the `aes` crate: the one held natively, expanded on the spot on wasm
    /// (where only tests of the scalar path need it).
    fn aes_crate(&self) -> Cow<'_, aes::Aes256> {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        return Cow::Owned(aes::Aes256::new((&*self.symkey).into()));
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        return Cow::Borrowed(&self.keys);
    }

    /// XORs `data` with the keystream from stream byte `offset` on, with the `aes` crate (does
    /// not move `self.offset`).
    fn apply_keystream_at(&self, offset: u64, data: &mut [u8]) {
        if !ctr_xor_at(&self.aes_crate(), &self.nonce, offset, data) {
            // Unreachable: a 128-bit counter that starts at block 0 outlasts any u64 offset.
            // Should it ever happen, plaintext must still not leave the gateway (and a zeroed
            // keystream probe matches no real keystream).
            data.zeroize();
        }
    }

    /// The layer key and initial counter block, for a helper to compute keystream
    /// ([`crate::format::keystream::SegmentRequest`]).
    pub(crate) fn key_material(&self) -> (&[u8; 32], &[u8; 16]) {
        (&self.symkey, &self.nonce)
    }

    /// Bytes encrypted so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Saves the whole state (key included — keep it secret) to resume in a later request:
    /// version byte, symkey, nonce, offset (u64 big-endian), then the plaintext, ciphertext and
    /// HMAC-inner hash states.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(STATE_LEN));
        out.push(STATE_VERSION);
        out.extend_from_slice(self.symkey.as_ref());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.offset.to_be_bytes());
        self.plain.write_to(&mut out);
        self.encrypted.write_to(&mut out);
        self.mac.write_to(&mut out);
        out
    }

    /// Restores a state saved by [`Self::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CipherError> {
        if bytes.len() != STATE_LEN {
            return Err(CipherError::StateLength {
                expected: STATE_LEN,
                actual: bytes.len(),
            });
        }
        let (&version, rest) = bytes.split_first().ok_or(CipherError::StateLength {
            expected: STATE_LEN,
            actual: 0,
        })?;
        if version != STATE_VERSION {
            return Err(CipherError::StateVersion {
                found: version,
                supported: STATE_VERSION,
            });
        }
        let (key, rest) = take::<32>(rest)?;
        let symkey = Zeroizing::new(key);
        let (nonce, rest) = take::<16>(rest)?;
        let (offset, rest) = take::<8>(rest)?;
        let offset = u64::from_be_bytes(offset);
        let (plain, rest) = Sha256State::read_from(rest).ok_or(CipherError::StateHash)?;
        let (encrypted, rest) = Sha256State::read_from(rest).ok_or(CipherError::StateHash)?;
        let (mac, _) = Sha256State::read_from(rest).ok_or(CipherError::StateHash)?;
        if plain.len() != offset
            || encrypted.len() != offset
            || mac.len() != offset.wrapping_add(HMAC_PAD_LEN)
        {
            return Err(CipherError::StateInconsistent {
                offset,
                plain: plain.len(),
                cipher: encrypted.len(),
                mac: mac.len(),
            });
        }
        let keys = expand(&symkey);
        Ok(LayerEncryptor {
            symkey,
            nonce,
            keys,
            offset,
            plain,
            encrypted,
            mac,
        })
    }

    /// Ends the stream: digests, size and HMAC for the descriptor and the annotations.
    pub fn finish(self) -> EncryptedLayer {
        EncryptedLayer {
            plaintext_digest: Digest(self.plain.clone().finalize()),
            encrypted_digest: Digest(self.encrypted.clone().finalize()),
            size: self.offset,
            hmac: hmac_finish(&self.symkey, self.mac.clone()),
            symkey: self.symkey.clone(),
            nonce: self.nonce,
        }
    }
}

/// `len` bytes of the AES-256-CTR keystream of (`symkey`, `nonce`) from byte `offset` of the
/// stream on: what [`LayerEncryptor::encrypt_in_place_given`] takes, computed on another
/// worker.
pub fn keystream(symkey: &[u8; 32], nonce: &[u8; 16], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if !write_keystream(symkey, nonce, offset, &mut out) {
        out.clear();
    }
    out
}

/// Writes into `out` the keystream of (`symkey`, `nonce`) from byte `offset` on (what a
/// helper answers, computed in place). `false` (and `out` not to be used) only if the counter
/// cannot be positioned, which a 128-bit counter starting at block 0 never hits for a u64
/// offset.
pub fn write_keystream(symkey: &[u8; 32], nonce: &[u8; 16], offset: u64, out: &mut [u8]) -> bool {
    if crate::format::simd::HARDWARE {
        Aes256x8::new(symkey).write_keystream(nonce, offset, out);
        true
    } else {
        out.fill(0);
        ctr_xor_at(&aes::Aes256::new(symkey.into()), nonce, offset, out)
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn expand(symkey: &[u8; 32]) -> Keys {
    Aes256x8::new(symkey)
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn expand(symkey: &[u8; 32]) -> Keys {
    aes::Aes256::new(symkey.into())
}

/// XORs one block of data with its four keystream vectors in place; returns the plaintext
/// and the ciphertext as vectors, for hashing. The data is read and written once.
#[inline(always)]
fn encrypt_block(block: &mut [u8; BLOCK], keystream: [U32x4; 4]) -> ([U32x4; 4], [U32x4; 4]) {
    let plain = sha256x4::vectors(block);
    let mut cipher = [U32x4::ZERO; 4];
    for (((c, p), k), out) in cipher
        .iter_mut()
        .zip(plain)
        .zip(keystream)
        .zip(block.as_chunks_mut::<16>().0)
    {
        *c = p ^ k;
        *out = c.to_bytes();
    }
    (plain, cipher)
}

/// XORs `data` with the CTR keystream of an already expanded key from stream byte `offset`
/// on; `false` (nothing applied) if the counter cannot be positioned there.
fn ctr_xor_at(aes: &aes::Aes256, nonce: &[u8; 16], offset: u64, data: &mut [u8]) -> bool {
    let mut ctr = Aes256Ctr::from_core(ctr::CtrCore::inner_iv_init(aes.clone(), nonce.into()));
    ctr.try_seek(offset).is_ok() && ctr.try_apply_keystream(data).is_ok()
}

fn take<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), CipherError> {
    let short = CipherError::StateLength {
        expected: STATE_LEN,
        actual: bytes.len(),
    };
    let (head, rest) = bytes.split_at_checked(N).ok_or(short.clone())?;
    let head: [u8; N] = head.try_into().map_err(|_| short)?;
    Ok((head, rest))
}

/// Verifies `expected_hmac` over `ciphertext` (constant time) and only then decrypts it —
/// the whole-blob counterpart of [`LayerEncryptor`], for tests and tooling.
pub fn decrypt_layer(
    symkey: &[u8; 32],
    nonce: &[u8; 16],
    expected_hmac: &[u8; 32],
    ciphertext: &[u8],
) -> Result<Vec<u8>, CipherError> {
    // HMAC accepts any key length, so this cannot fail; a mismatch error is still the
    // conservative answer if it did.
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(symkey).map_err(|_| {
        CipherError::HmacMismatch {
            len: ciphertext.len(),
        }
    })?;
    mac.update(ciphertext);
    mac.verify_slice(expected_hmac)
        .map_err(|_| CipherError::HmacMismatch {
            len: ciphertext.len(),
        })?;
    let mut plain = ciphertext.to_vec();
    let mut cipher = Aes256Ctr::new(symkey.into(), nonce.into());
    cipher
        .try_apply_keystream(&mut plain)
        .map_err(|_| CipherError::Seek(ciphertext.len() as u64))?;
    Ok(plain)
}

/// Streaming decryptor of one layer blob, the chunk-by-chunk counterpart of
/// [`decrypt_layer`] for tooling that re-encrypts stored layers in bounded memory
/// (`tools/rotate`). The HMAC covers the whole ciphertext, so plaintext is handed out before it
/// can be checked: the caller must keep each chunk's plaintext where nothing outlives a failed
/// [`LayerDecryptor::finish`] (e.g. encrypt it again at once, and commit nothing on failure).
pub struct LayerDecryptor {
    /// The HMAC key is the layer key.
    symkey: Zeroizing<[u8; 32]>,
    nonce: [u8; 16],
    /// Always the `aes` crate's key: tooling runs natively, where that is the fast path.
    keys: aes::Aes256,
    offset: u64,
    ciphertext: Sha256State,
    plaintext: Sha256State,
    mac: Sha256State,
}

impl std::fmt::Debug for LayerDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerDecryptor")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// What [`LayerDecryptor::finish`] checked: the digests of both forms of the blob and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecryptedLayer {
    /// Digest of the ciphertext read (the stored descriptor's digest, if the blob is intact).
    pub encrypted_digest: Digest,
    /// Digest of the plaintext produced (the private options' `digest`, if the key is right).
    pub plaintext_digest: Digest,
    /// Bytes decrypted.
    pub size: u64,
}

impl LayerDecryptor {
    /// Starts decrypting a layer encrypted with `symkey` from initial counter block `nonce`.
    pub fn new(symkey: &[u8; 32], nonce: [u8; 16]) -> Self {
        LayerDecryptor {
            symkey: Zeroizing::new(*symkey),
            nonce,
            keys: aes::Aes256::new(symkey.into()),
            offset: 0,
            ciphertext: Sha256State::new(),
            plaintext: Sha256State::new(),
            mac: hmac_init(symkey),
        }
    }

    /// Decrypts the next `chunk` of ciphertext in place. On an error the chunk is wiped.
    pub fn decrypt_in_place(&mut self, chunk: &mut [u8]) -> Result<(), CipherError> {
        self.ciphertext.update(chunk);
        self.mac.update(chunk);
        if !ctr_xor_at(&self.keys, &self.nonce, self.offset, chunk) {
            chunk.zeroize();
            return Err(CipherError::Seek(self.offset));
        }
        self.plaintext.update(chunk);
        self.offset = self.offset.wrapping_add(chunk.len() as u64);
        Ok(())
    }

    /// Ends the stream: checks the HMAC of all the ciphertext against `expected_hmac`
    /// (constant time) and returns both digests and the size.
    pub fn finish(self, expected_hmac: &[u8; 32]) -> Result<DecryptedLayer, CipherError> {
        let hmac = hmac_finish(&self.symkey, self.mac.clone());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            hmac.as_slice(),
            expected_hmac.as_slice(),
        )) {
            return Err(CipherError::HmacMismatch {
                len: usize::try_from(self.offset).unwrap_or(usize::MAX),
            });
        }
        Ok(DecryptedLayer {
            encrypted_digest: Digest(self.ciphertext.clone().finalize()),
            plaintext_digest: Digest(self.plaintext.clone().finalize()),
            size: self.offset,
        })
    }
}
