//! SHA-256 whose running state can be written out and read back, so one digest (and one
//! HMAC) can span several HTTP requests of a chunked blob upload, on any worker.
//!
//! `sha2` 0.10 hides the midstate of its hasher, so this drives its compression function
//! directly and keeps the padding and length bookkeeping here.

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;
use zeroize::Zeroize;

const BLOCK: usize = 64;

/// FIPS 180-4 §5.3.3 initial hash value.
const H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A SHA-256 computation in progress.
///
/// The buffered tail may hold plaintext or key-derived bytes, so it is wiped on drop and
/// never printed by `Debug`.
#[derive(Clone)]
pub struct Sha256State {
    h: [u32; 8],
    /// Bytes absorbed so far; `total % 64` of them wait in `buf`.
    total: u64,
    buf: [u8; BLOCK],
}

impl Sha256State {
    /// Size of [`Sha256State::write_to`] output: 8 state words, the byte count, one block.
    pub const SERIALIZED_LEN: usize = 32 + 8 + BLOCK;

    /// A fresh hash of the empty message.
    pub fn new() -> Self {
        Sha256State {
            h: H0,
            total: 0,
            buf: [0; BLOCK],
        }
    }

    fn buffered(&self) -> usize {
        // Always < 64, so the cast cannot truncate.
        (self.total % BLOCK as u64) as usize
    }

    /// Absorbs `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        let held = self.buffered();
        self.total = self.total.wrapping_add(data.len() as u64);
        if held > 0 {
            let want = BLOCK - held;
            let (head, rest) = data.split_at(want.min(data.len()));
            if let Some(dst) = self.buf.get_mut(held..held + head.len()) {
                dst.copy_from_slice(head);
            }
            if head.len() < want {
                return;
            }
            compress_block(&mut self.h, &self.buf);
            data = rest;
        }
        let (blocks, tail) = data.as_chunks::<BLOCK>();
        compress_blocks(&mut self.h, blocks);
        if let Some(dst) = self.buf.get_mut(..tail.len()) {
            dst.copy_from_slice(tail);
        }
    }

    /// Pads, finishes and returns the digest.
    pub fn finalize(mut self) -> [u8; 32] {
        let held = self.buffered();
        let bit_len = self.total.wrapping_mul(8);
        let mut block = [0u8; BLOCK];
        if let (Some(dst), Some(src)) = (block.get_mut(..held), self.buf.get(..held)) {
            dst.copy_from_slice(src);
        }
        if let Some(b) = block.get_mut(held) {
            *b = 0x80;
        }
        // The 8-byte length must fit after the 0x80 marker, else it goes into an extra block.
        if held >= BLOCK - 8 {
            compress_block(&mut self.h, &block);
            block.zeroize();
        }
        if let Some(dst) = block.get_mut(BLOCK - 8..) {
            dst.copy_from_slice(&bit_len.to_be_bytes());
        }
        compress_block(&mut self.h, &block);
        block.zeroize();
        let mut out = [0u8; 32];
        for (dst, word) in out.chunks_exact_mut(4).zip(self.h.iter()) {
            dst.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Appends exactly [`Self::SERIALIZED_LEN`] bytes: state words and byte count big-endian,
    /// then the buffered tail zero-padded to a block (so equal states serialize equally).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.reserve(Self::SERIALIZED_LEN);
        for word in &self.h {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&self.total.to_be_bytes());
        let held = self.buffered();
        out.extend_from_slice(self.buf.get(..held).unwrap_or_default());
        out.resize(out.len() + (BLOCK - held), 0);
    }

    /// Reads a state written by [`Self::write_to`] from the front of `bytes` and returns it with
    /// the bytes that follow. `None` if `bytes` is too short or the padding after the buffered
    /// tail is not zero (the bytes were not written by `write_to`).
    pub fn read_from(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let (mine, rest) = bytes.split_at_checked(Self::SERIALIZED_LEN)?;
        let (words, after) = mine.split_at_checked(32)?;
        let (total, tail) = after.split_at_checked(8)?;
        let mut state = Sha256State::new();
        for (dst, src) in state.h.iter_mut().zip(words.chunks_exact(4)) {
            *dst = u32::from_be_bytes(src.try_into().ok()?);
        }
        state.total = u64::from_be_bytes(total.try_into().ok()?);
        let held = state.buffered();
        let (data, padding) = tail.split_at_checked(held)?;
        if padding.iter().any(|&b| b != 0) {
            return None;
        }
        state.buf.get_mut(..held)?.copy_from_slice(data);
        Some((state, rest))
    }

    /// The chaining value, if the state sits on a block boundary (nothing buffered), so that
    /// whole blocks can be compressed elsewhere (e.g. several states at once in SIMD lanes)
    /// and handed back with [`Self::advance_blocks`].
    pub(crate) fn chaining_value(&self) -> Option<[u32; 8]> {
        (self.buffered() == 0).then_some(self.h)
    }

    /// Takes the chaining value `h` reached by compressing `blocks` more whole blocks from the
    /// boundary where [`Self::chaining_value`] was read.
    pub(crate) fn advance_blocks(&mut self, h: [u32; 8], blocks: u64) {
        self.h = h;
        self.total = self.total.wrapping_add(blocks.wrapping_mul(BLOCK as u64));
    }

    /// Number of bytes absorbed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing has been absorbed.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl Default for Sha256State {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Sha256State {
    fn drop(&mut self) {
        self.h.zeroize();
        self.buf.zeroize();
    }
}

impl std::fmt::Debug for Sha256State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sha256State")
            .field("len", &self.total)
            .finish_non_exhaustive()
    }
}

/// Whole blocks in few calls: `sha2` loads and stores the state (and picks its SHA-NI path)
/// once per call, not once per block.
fn compress_blocks(h: &mut [u32; 8], blocks: &[[u8; BLOCK]]) {
    // `sha2` takes `GenericArray` blocks, and a slice of arrays cannot become a slice of them
    // without `unsafe`: copy a batch at a time (cheap against compressing it).
    if blocks.is_empty() {
        // Short updates (a chunk's unaligned head or tail) skip the batch and its wipe.
        return;
    }
    const BATCH: usize = 16;
    let mut batch: [GenericArray<u8, U64>; BATCH] = Default::default();
    for group in blocks.chunks(BATCH) {
        for (dst, src) in batch.iter_mut().zip(group) {
            dst.copy_from_slice(src);
        }
        sha2::compress256(h, batch.get(..group.len()).unwrap_or_default());
    }
    for block in &mut batch {
        block.zeroize();
    }
}

fn compress_block(h: &mut [u32; 8], block: &[u8]) {
    // Callers pass exactly 64 bytes (chunks_exact / the internal buffer), which is what
    // `from_slice` requires.
    let block: &GenericArray<u8, U64> = GenericArray::from_slice(block);
    sha2::compress256(h, std::slice::from_ref(block));
}

fn hmac_pad(key: &[u8; 32], byte: u8) -> [u8; BLOCK] {
    let mut pad = [byte; BLOCK];
    for (p, k) in pad.iter_mut().zip(key.iter()) {
        *p ^= k;
    }
    pad
}

/// HMAC-SHA256 inner hash after absorbing `key XOR ipad` (RFC 2104); feed the message with
/// [`Sha256State::update`] and close with [`hmac_finish`]. A 32-byte key is shorter than the
/// block, so it is used as is, zero-padded.
pub fn hmac_init(key: &[u8; 32]) -> Sha256State {
    let mut pad = hmac_pad(key, 0x36);
    let mut inner = Sha256State::new();
    inner.update(&pad);
    pad.zeroize();
    inner
}

/// Finishes an HMAC-SHA256 begun with [`hmac_init`] under the same `key`.
pub fn hmac_finish(key: &[u8; 32], inner: Sha256State) -> [u8; 32] {
    let inner_digest = inner.finalize();
    let mut pad = hmac_pad(key, 0x5c);
    let mut outer = Sha256State::new();
    outer.update(&pad);
    pad.zeroize();
    outer.update(&inner_digest);
    outer.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_boundary_lengths_match_sha2() {
        use sha2::Digest as _;
        for len in [0usize, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129] {
            let data = vec![0xa5u8; len];
            let mut s = Sha256State::new();
            s.update(&data);
            let want: [u8; 32] = sha2::Sha256::digest(&data).into();
            assert_eq!(s.finalize(), want, "len {len}");
        }
    }

    #[test]
    fn serialized_len_is_fixed() {
        let mut s = Sha256State::new();
        s.update(b"hello");
        let mut out = Vec::new();
        s.write_to(&mut out);
        assert_eq!(out.len(), Sha256State::SERIALIZED_LEN);
        out[45] = 1;
        assert!(
            Sha256State::read_from(&out).is_none(),
            "non-zero padding is refused"
        );
        assert!(Sha256State::read_from(&out[..10]).is_none());
    }
}
