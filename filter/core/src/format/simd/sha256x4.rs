//! Four SHA-256 compressions at once, one per 32-bit lane (FIPS 180-4 §6.2.2, vectorised
//! across independent messages).
//!
//! The layer cipher feeds lane 0 the plaintext and lanes 1–3 the ciphertext (lane 1 the
//! ciphertext digest, lane 2 HMAC's inner hash, whose 64-byte pad block leaves it block-aligned
//! with the ciphertext, lane 3 a spare): [`Sha256x4::compress_pc_pair`] takes two such
//! blocks at once and computes their message schedules together, two lanes each.

use super::vector::shuffle32;
use super::U32x4;

/// FIPS 180-4 §4.2.2 round constants, one per lane.
#[allow(clippy::indexing_slicing)] // evaluated at compile time: a bad index fails the build
const K: [[U32x4; 16]; 4] = {
    const K32: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut out = [[U32x4::ZERO; 16]; 4];
    let mut i = 0;
    while i < 64 {
        out[i / 16][i % 16] = U32x4::splat(K32[i]);
        i += 1;
    }
    out
};

/// Four SHA-256 chaining values, word `i` of lane `j` in `h[i]` lane `j`.
#[derive(Clone, Copy)]
pub struct Sha256x4 {
    h: [U32x4; 8],
}

/// The 16 message words of four blocks, word `t` of block `j` in lane `j` of `w[t]`.
#[derive(Clone, Copy)]
pub struct Schedule {
    w: [U32x4; 16],
}

#[inline(always)]
fn byteswap32(x: U32x4) -> U32x4 {
    U32x4(super::vector::shuffle!(x.0; 3 2 1 0 7 6 5 4 11 10 9 8 15 14 13 12))
}

/// 4x4 transpose: lane `j` of result `i` is lane `i` of input `j`.
#[inline(always)]
fn transpose4(a: U32x4, b: U32x4, c: U32x4, d: U32x4) -> [U32x4; 4] {
    let (a, b, c, d) = (a.0, b.0, c.0, d.0);
    let ab_lo = shuffle32!(a, b; 0 4 1 5);
    let ab_hi = shuffle32!(a, b; 2 6 3 7);
    let cd_lo = shuffle32!(c, d; 0 4 1 5);
    let cd_hi = shuffle32!(c, d; 2 6 3 7);
    [
        U32x4(shuffle32!(ab_lo, cd_lo; 0 1 4 5)),
        U32x4(shuffle32!(ab_lo, cd_lo; 2 3 6 7)),
        U32x4(shuffle32!(ab_hi, cd_hi; 0 1 4 5)),
        U32x4(shuffle32!(ab_hi, cd_hi; 2 3 6 7)),
    ]
}

/// A 64-byte block as four vectors in memory order.
#[inline(always)]
pub fn vectors(block: &[u8; 64]) -> [U32x4; 4] {
    let mut out = [U32x4::ZERO; 4];
    for (o, piece) in out.iter_mut().zip(block.as_chunks::<16>().0) {
        *o = U32x4::from_bytes(piece);
    }
    out
}

impl Schedule {
    /// Lane 0 from the block `first`, lanes 1, 2 and 3 from the block `rest`, each given as
    /// four vectors of 16 bytes in memory order ([`U32x4::from_bytes`]).
    #[inline(always)]
    pub fn pc_vectors(first: [U32x4; 4], rest: [U32x4; 4]) -> Self {
        let mut w = [U32x4::ZERO; 16];
        for ((out, p), c) in w.chunks_exact_mut(4).zip(first).zip(rest) {
            let (p, c) = (byteswap32(p).0, byteswap32(c).0);
            if let [w0, w1, w2, w3] = out {
                *w0 = U32x4(shuffle32!(p, c; 0 4 4 4));
                *w1 = U32x4(shuffle32!(p, c; 1 5 5 5));
                *w2 = U32x4(shuffle32!(p, c; 2 6 6 6));
                *w3 = U32x4(shuffle32!(p, c; 3 7 7 7));
            }
        }
        Schedule { w }
    }

    /// Lane 0 reads `first`, lanes 1, 2 and 3 read `rest`.
    #[inline(always)]
    pub fn pc(first: &[u8; 64], rest: &[u8; 64]) -> Self {
        Self::pc_vectors(vectors(first), vectors(rest))
    }

    /// Lane `j` reads `blocks[j]`.
    pub fn four(blocks: [&[u8; 64]; 4]) -> Self {
        let [a, b, c, d] = blocks.map(|b| vectors(b).map(byteswap32));
        let mut w = [U32x4::ZERO; 16];
        for (k, out) in w.chunks_exact_mut(4).enumerate() {
            let (Some(a), Some(b), Some(c), Some(d)) = (a.get(k), b.get(k), c.get(k), d.get(k))
            else {
                continue;
            };
            out.copy_from_slice(&transpose4(*a, *b, *c, *d));
        }
        Schedule { w }
    }
}

#[inline(always)]
fn big_sigma0(x: U32x4) -> U32x4 {
    x.rotr::<2, 30>() ^ x.rotr::<13, 19>() ^ x.rotr::<22, 10>()
}

#[inline(always)]
fn big_sigma1(x: U32x4) -> U32x4 {
    x.rotr::<6, 26>() ^ x.rotr::<11, 21>() ^ x.rotr::<25, 7>()
}

#[inline(always)]
fn small_sigma0(x: U32x4) -> U32x4 {
    x.rotr::<7, 25>() ^ x.rotr::<18, 14>() ^ x.shr::<3>()
}

#[inline(always)]
fn small_sigma1(x: U32x4) -> U32x4 {
    x.rotr::<17, 15>() ^ x.rotr::<19, 13>() ^ x.shr::<10>()
}

/// One round; the caller rotates the roles of the eight working variables.
macro_rules! round {
    ($a:ident $b:ident $c:ident $d:ident $e:ident $f:ident $g:ident $h:ident, $kw:expr) => {
        // Ch(e, f, g) = (e & f) ^ (!e & g); Maj(a, b, c) = c where a == b, else a.
        // Ordered so that the sums independent of this round's e and a go first, leaving
        // one add after each Σ on the critical path (the JIT does not reassociate).
        let t1 = ($h + $kw) + U32x4::bitselect($f, $g, $e) + big_sigma1($e);
        let t2 = U32x4::bitselect($a, $b, $b ^ $c) + big_sigma0($a);
        $d = $d + t1;
        $h = t1 + t2;
    };
}

/// Eight rounds over `kw[$i..$i + 8]` (round constant plus message word).
macro_rules! eight_rounds {
    ($a:ident $b:ident $c:ident $d:ident $e:ident $f:ident $g:ident $h:ident,
     $kw:ident, $i:literal) => {
        round!($a $b $c $d $e $f $g $h, $kw[$i]);
        round!($h $a $b $c $d $e $f $g, $kw[$i + 1]);
        round!($g $h $a $b $c $d $e $f, $kw[$i + 2]);
        round!($f $g $h $a $b $c $d $e, $kw[$i + 3]);
        round!($e $f $g $h $a $b $c $d, $kw[$i + 4]);
        round!($d $e $f $g $h $a $b $c, $kw[$i + 5]);
        round!($c $d $e $f $g $h $a $b, $kw[$i + 6]);
        round!($b $c $d $e $f $g $h $a, $kw[$i + 7]);
    };
}

/// Sixteen rounds over `kw[0..16]`.
macro_rules! sixteen_rounds {
    ($a:ident $b:ident $c:ident $d:ident $e:ident $f:ident $g:ident $h:ident, $kw:ident) => {
        eight_rounds!($a $b $c $d $e $f $g $h, $kw, 0);
        eight_rounds!($a $b $c $d $e $f $g $h, $kw, 8);
    };
}

/// Message schedule step `W[t] = σ1(W[t-2]) + W[t-7] + σ0(W[t-15]) + W[t-16]` in a ring of 16.
macro_rules! schedule {
    ($w:ident; $($i:literal)*) => {
        $(
            $w[$i] = $w[$i]
                + small_sigma0($w[($i + 1) & 15])
                + $w[($i + 9) & 15]
                + small_sigma1($w[($i + 14) & 15]);
        )*
    };
}

impl Sha256x4 {
    /// Lane `j` continues the chaining value `states[j]`.
    pub fn new(states: [&[u32; 8]; 4]) -> Self {
        let [a, b, c, d] = states;
        let mut h = [U32x4::ZERO; 8];
        for (i, out) in h.iter_mut().enumerate() {
            let (Some(&a), Some(&b), Some(&c), Some(&d)) = (a.get(i), b.get(i), c.get(i), d.get(i))
            else {
                continue;
            };
            *out = U32x4::new(a, b, c, d);
        }
        Sha256x4 { h }
    }

    /// The four chaining values.
    pub fn states(&self) -> [[u32; 8]; 4] {
        let mut out = [[0u32; 8]; 4];
        for (i, v) in self.h.iter().enumerate() {
            for (lane, o) in v.lanes().into_iter().zip(out.iter_mut()) {
                if let Some(word) = o.get_mut(i) {
                    *word = lane;
                }
            }
        }
        out
    }

    /// Compresses one block per lane.
    #[inline(always)]
    pub fn compress(&mut self, schedule: &Schedule) {
        let mut w = schedule.w;
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for (group, k) in K.iter().enumerate() {
            if group > 0 {
                schedule!(w; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
            let mut kw = [U32x4::ZERO; 16];
            for ((o, k), w) in kw.iter_mut().zip(k).zip(&w) {
                *o = *k + *w;
            }
            sixteen_rounds!(a b c d e f g h, kw);
        }
        for (h, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *h = *h + v;
        }
    }

    /// Compresses two blocks per lane, one after the other: the block `p0` in lane 0 and
    /// `c0` in lanes 1–3, then `p1` in lane 0 and `c1` in lanes 1–3 (each given as in
    /// [`Schedule::pc_vectors`]). The four message schedules are computed in the four lanes of
    /// one vector, so each word costs half of what it does in [`Self::compress`].
    #[inline(always)]
    pub fn compress_pc_pair(
        &mut self,
        p0: [U32x4; 4],
        c0: [U32x4; 4],
        p1: [U32x4; 4],
        c1: [U32x4; 4],
    ) {
        // w[t] lanes: word t of p0, c0, p1, c1.
        let mut w = [U32x4::ZERO; 16];
        let [p0, c0, p1, c1] = [p0, c0, p1, c1].map(|v| v.map(byteswap32));
        for ((out, (a, b)), (c, d)) in w
            .chunks_exact_mut(4)
            .zip(p0.into_iter().zip(c0))
            .zip(p1.into_iter().zip(c1))
        {
            out.copy_from_slice(&transpose4(a, b, c, d));
        }
        // First block; the second block's round inputs are kept for after.
        let mut second = [[U32x4::ZERO; 16]; 4];
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for ((group, k), kw1) in K.iter().enumerate().zip(second.iter_mut()) {
            if group > 0 {
                schedule!(w; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            }
            let mut kw0 = [U32x4::ZERO; 16];
            for (((o0, o1), k), w) in kw0.iter_mut().zip(kw1.iter_mut()).zip(k).zip(&w) {
                *o0 = *k + U32x4(shuffle32!(w.0, w.0; 0 1 1 1));
                *o1 = *k + U32x4(shuffle32!(w.0, w.0; 2 3 3 3));
            }
            sixteen_rounds!(a b c d e f g h, kw0);
        }
        for (h, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *h = *h + v;
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = self.h;
        for kw1 in &second {
            sixteen_rounds!(a b c d e f g h, kw1);
        }
        for (h, v) in self.h.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *h = *h + v;
        }
    }
}
