//! AES-256 on eight blocks at once, bitsliced and fixsliced over 128-bit vectors, and the
//! CTR keystream built on it (FIPS 197; NIST SP 800-38A §6.5 with the whole 128-bit block
//! as the big-endian counter, as Go's `cipher.NewCTR` and ocicrypt use it).
//!
//! Representation: bit `j` of every state byte of the eight blocks lives in `planes[j]`; in
//! a plane, byte `4r + c` (lane `r`, byte `c` of the lane) holds state row `r`, column `c`,
//! and its bit `b` belongs to block `b`. The S-box is Boyar–Peralta's 113-gate circuit
//! (`SLP_AES_113`, with its four NOTs moved into the key schedule), so every block costs the
//! same fixed sequence of AND/XOR/OR — no lookup tables, constant time. ShiftRows is folded
//! into the key schedule and into four variants of MixColumns that rotate rows and columns
//! differently per round ("fully fixsliced" AES, Adomnicai & Peyrin, TCHES 2021/1), which in
//! this layout are single byte shuffles. This is the 4-blocks-in-64-bits fixslicing of the
//! RustCrypto `aes` crate widened to 8 blocks in 128 bits: a nibble there is a byte here.

use super::vector::shuffle;
use super::U32x4;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Eight bit-planes of eight AES states (or round keys).
type State = [U32x4; 8];

/// Byte permutation of every plane: byte `k` of the result is byte `idx[k]` of the input.
macro_rules! permute {
    ($name:ident, $doc:literal, $($i:literal)*) => {
        #[doc = $doc]
        #[inline(always)]
        fn $name(x: U32x4) -> U32x4 {
            U32x4(shuffle!(x.0; $($i)*))
        }
    };
}

permute!(rotate_rows_1, "Rows rotated by one.", 4 5 6 7 8 9 10 11 12 13 14 15 0 1 2 3);
permute!(rotate_rows_2, "Rows rotated by two.", 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7);
permute!(rotate_rc_1_1, "Rows by one, columns by one.", 5 6 7 4 9 10 11 8 13 14 15 12 1 2 3 0);
permute!(rotate_rc_1_2, "Rows by one, columns by two.", 6 7 4 5 10 11 8 9 14 15 12 13 2 3 0 1);
permute!(rotate_rc_1_3, "Rows by one, columns by three.", 7 4 5 6 11 8 9 10 15 12 13 14 3 0 1 2);
permute!(rotate_rc_2_2, "Rows by two, columns by two.", 10 11 8 9 14 15 12 13 2 3 0 1 6 7 4 5);
permute!(shift_rows_1, "ShiftRows.", 0 1 2 3 5 6 7 4 10 11 8 9 15 12 13 14);
permute!(shift_rows_2, "ShiftRows twice.", 0 1 2 3 6 7 4 5 8 9 10 11 14 15 12 13);
permute!(shift_rows_3, "ShiftRows three times.", 0 1 2 3 7 4 5 6 10 11 8 9 13 14 15 12);
permute!(ror_bytes_7, "Whole vector rotated right by 7 bytes.", 7 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6);
permute!(ror_bytes_3, "Whole vector rotated right by 3 bytes.", 3 4 5 6 7 8 9 10 11 12 13 14 15 0 1 2);
permute!(
    transpose,
    "AES byte order (column-major, `4c + r`) to the plane order (`4r + c`), and back.",
    0 4 8 12 1 5 9 13 2 6 10 14 3 7 11 15
);
permute!(
    counter_to_planes,
    "A counter as `from_u64s(lo, hi)` (little-endian) to the big-endian block in plane order.",
    15 11 7 3 14 10 6 2 13 9 5 1 12 8 4 0
);

/// Swaps the bits of `a` selected by `mask` with the bits of `b` `N` places higher.
#[inline(always)]
fn delta_swap<const N: u32>(a: &mut U32x4, b: &mut U32x4, mask: U32x4) {
    let t = (*a ^ b.shr::<N>()) & mask;
    *a ^= t;
    *b ^= t.shl::<N>();
}

/// Transposes the 8x8 bit matrix in every byte position: bit `j` of register `i` becomes bit
/// `i` of register `j`. Its own inverse.
#[inline(always)]
fn transpose_bits(s: &mut State) {
    let [t0, t1, t2, t3, t4, t5, t6, t7] = s;
    let m = U32x4::splat(0x5555_5555);
    delta_swap::<1>(t1, t0, m);
    delta_swap::<1>(t3, t2, m);
    delta_swap::<1>(t5, t4, m);
    delta_swap::<1>(t7, t6, m);
    let m = U32x4::splat(0x3333_3333);
    delta_swap::<2>(t2, t0, m);
    delta_swap::<2>(t3, t1, m);
    delta_swap::<2>(t6, t4, m);
    delta_swap::<2>(t7, t5, m);
    let m = U32x4::splat(0x0f0f_0f0f);
    delta_swap::<4>(t4, t0, m);
    delta_swap::<4>(t5, t1, m);
    delta_swap::<4>(t6, t2, m);
    delta_swap::<4>(t7, t3, m);
}

/// Eight blocks, each already in plane byte order, to bit-planes.
#[inline(always)]
fn bitslice(blocks: State) -> State {
    let mut s = blocks;
    transpose_bits(&mut s);
    s
}

/// Bit-planes back to eight blocks in AES byte order.
#[inline(always)]
fn unbitslice(planes: State) -> State {
    let mut s = planes;
    transpose_bits(&mut s);
    s.map(transpose)
}

/// The AES S-box on every byte: Boyar–Peralta's circuit (SLP_AES_113) without its four final
/// NOTs, which the key schedule adds to the round keys instead. `u0` is the most significant
/// bit, i.e. `planes[7]`.
#[inline(always)]
fn sub_bytes(s: &mut State) {
    let [u7, u6, u5, u4, u3, u2, u1, u0] = *s;
    let y14 = u3 ^ u5;
    let y13 = u0 ^ u6;
    let y12 = y13 ^ y14;
    let t1 = u4 ^ y12;
    let y15 = t1 ^ u5;
    let t2 = y12 & y15;
    let y6 = y15 ^ u7;
    let y20 = t1 ^ u1;
    let y9 = u0 ^ u3;
    let y11 = y20 ^ y9;
    let t12 = y9 & y11;
    let y7 = u7 ^ y11;
    let y8 = u0 ^ u5;
    let t0 = u1 ^ u2;
    let y10 = y15 ^ t0;
    let y17 = y10 ^ y11;
    let t13 = y14 & y17;
    let t14 = t13 ^ t12;
    let y19 = y10 ^ y8;
    let t15 = y8 & y10;
    let t16 = t15 ^ t12;
    let y16 = t0 ^ y11;
    let y21 = y13 ^ y16;
    let t7 = y13 & y16;
    let y18 = u0 ^ y16;
    let y1 = t0 ^ u7;
    let y4 = y1 ^ u3;
    let t5 = y4 & u7;
    let t6 = t5 ^ t2;
    let t18 = t6 ^ t16;
    let t22 = t18 ^ y19;
    let y2 = y1 ^ u0;
    let t10 = y2 & y7;
    let t11 = t10 ^ t7;
    let t20 = t11 ^ t16;
    let t24 = t20 ^ y18;
    let y5 = y1 ^ u6;
    let t8 = y5 & y1;
    let t9 = t8 ^ t7;
    let t19 = t9 ^ t14;
    let t23 = t19 ^ y21;
    let y3 = y5 ^ y8;
    let t3 = y3 & y6;
    let t4 = t3 ^ t2;
    let t17 = t4 ^ y20;
    let t21 = t17 ^ t14;
    let t26 = t21 & t23;
    let t27 = t24 ^ t26;
    let t31 = t22 ^ t26;
    let t25 = t21 ^ t22;
    let t28 = t25 & t27;
    let t29 = t28 ^ t22;
    let z14 = t29 & y2;
    let z5 = t29 & y7;
    let t30 = t23 ^ t24;
    let t32 = t31 & t30;
    let t33 = t32 ^ t24;
    let t35 = t27 ^ t33;
    let t36 = t24 & t35;
    let t38 = t27 ^ t36;
    let t39 = t29 & t38;
    let t40 = t25 ^ t39;
    let t43 = t29 ^ t40;
    let z3 = t43 & y16;
    let tc12 = z3 ^ z5;
    let z12 = t43 & y13;
    let z13 = t40 & y5;
    let z4 = t40 & y1;
    let tc6 = z3 ^ z4;
    let t34 = t23 ^ t33;
    let t37 = t36 ^ t34;
    let t41 = t40 ^ t37;
    let z8 = t41 & y10;
    let z17 = t41 & y8;
    let t44 = t33 ^ t37;
    let z0 = t44 & y15;
    let z9 = t44 & y12;
    let z10 = t37 & y3;
    let z1 = t37 & y6;
    let tc5 = z1 ^ z0;
    let tc11 = tc6 ^ tc5;
    let z11 = t33 & y4;
    let t42 = t29 ^ t33;
    let t45 = t42 ^ t41;
    let z7 = t45 & y17;
    let tc8 = z7 ^ tc6;
    let z16 = t45 & y14;
    let z6 = t42 & y11;
    let tc16 = z6 ^ tc8;
    let z15 = t42 & y9;
    let tc20 = z15 ^ tc16;
    let tc1 = z15 ^ z16;
    let tc2 = z10 ^ tc1;
    let tc21 = tc2 ^ z11;
    let tc3 = z9 ^ tc2;
    let s0 = tc3 ^ tc16;
    let s3 = tc3 ^ tc11;
    let s1 = s3 ^ tc16;
    let tc13 = z13 ^ tc1;
    let z2 = t33 & u7;
    let tc4 = z0 ^ z2;
    let tc7 = z12 ^ tc4;
    let tc9 = z8 ^ tc7;
    let tc10 = tc8 ^ tc9;
    let tc17 = z14 ^ tc10;
    let s5 = tc21 ^ tc17;
    let tc26 = tc17 ^ tc20;
    let s2 = tc26 ^ z17;
    let tc14 = tc4 ^ tc12;
    let tc18 = tc13 ^ tc14;
    let s6 = tc10 ^ tc18;
    let s7 = z12 ^ tc18;
    let s4 = tc14 ^ s3;
    *s = [s7, s6, s5, s4, s3, s2, s1, s0];
}

/// The four NOTs [`sub_bytes`] leaves out (S-box output bits 0, 1, 5 and 6 inverted).
#[inline(always)]
fn sub_bytes_nots(s: &mut State) {
    let [s0, s1, _, _, _, s5, s6, _] = s;
    for x in [s0, s1, s5, s6] {
        *x = !*x;
    }
}

/// MixColumns in the fixsliced representation, with the row/column rotations of the round
/// (Käsper–Schwabe formulas).
#[inline(always)]
fn mix_columns(s: &mut State, first: impl Fn(U32x4) -> U32x4, second: impl Fn(U32x4) -> U32x4) {
    let a = *s;
    let b = a.map(&first);
    let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
    let [b0, b1, b2, b3, b4, b5, b6, b7] = b;
    let (c0, c1, c2, c3) = (a0 ^ b0, a1 ^ b1, a2 ^ b2, a3 ^ b3);
    let (c4, c5, c6, c7) = (a4 ^ b4, a5 ^ b5, a6 ^ b6, a7 ^ b7);
    *s = [
        b0 ^ c7 ^ second(c0),
        b1 ^ c0 ^ c7 ^ second(c1),
        b2 ^ c1 ^ second(c2),
        b3 ^ c2 ^ c7 ^ second(c3),
        b4 ^ c3 ^ c7 ^ second(c4),
        b5 ^ c4 ^ second(c5),
        b6 ^ c5 ^ second(c6),
        b7 ^ c6 ^ second(c7),
    ];
}

#[inline(always)]
fn mix_columns_0(s: &mut State) {
    mix_columns(s, rotate_rows_1, rotate_rows_2);
}

#[inline(always)]
fn mix_columns_1(s: &mut State) {
    mix_columns(s, rotate_rc_1_1, rotate_rc_2_2);
}

#[inline(always)]
fn mix_columns_2(s: &mut State) {
    mix_columns(s, rotate_rc_1_2, rotate_rows_2);
}

#[inline(always)]
fn mix_columns_3(s: &mut State) {
    mix_columns(s, rotate_rc_1_3, rotate_rc_2_2);
}

/// Round keys as stored: 15 keys of 8 planes, as bytes so they can be wiped.
type RoundKeys = [[[u8; 16]; 8]; 15];

#[inline(always)]
fn add_round_key(s: &mut State, key: &[[u8; 16]; 8]) {
    for (x, k) in s.iter_mut().zip(key) {
        *x ^= U32x4::from_bytes(k);
    }
}

/// An AES-256 key, expanded and fixsliced for eight blocks at a time. Wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Aes256x8 {
    rk: RoundKeys,
}

impl std::fmt::Debug for Aes256x8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aes256x8(<key>)")
    }
}

/// The same 16 bytes in all eight blocks, in plane order.
fn replicate(block: &[u8; 16]) -> State {
    [transpose(U32x4::from_bytes(block)); 8]
}

/// Column 0 of every row.
const COL0: U32x4 = U32x4::splat(0x0000_00ff);
/// Columns 1 to 3, 2 and 3, and 3 of every row.
const COL123: U32x4 = U32x4::splat(0xffff_ff00);
const COL23: U32x4 = U32x4::splat(0xffff_0000);
const COL3: U32x4 = U32x4::splat(0xff00_0000);

/// Key-schedule step: `prev2 ^ (COL0 & rotated)` then each column XORed into the next ones
/// (FIPS 197 §5.2 `w[i] = w[i-8] ^ temp`, all four words of the round key at once).
fn xor_columns(prev2: &State, rotated: State) -> State {
    let mut out = [U32x4::ZERO; 8];
    for ((o, p), r) in out.iter_mut().zip(prev2).zip(rotated) {
        let rk = *p ^ (COL0 & r);
        *o = rk ^ (COL123 & rk.shl::<8>()) ^ (COL23 & rk.shl::<16>()) ^ (COL3 & rk.shl::<24>());
    }
    out
}

fn to_bytes(s: &State) -> [[u8; 16]; 8] {
    s.map(U32x4::to_bytes)
}

impl Aes256x8 {
    /// Expands `key` (FIPS 197 §5.2) into fixsliced round keys.
    pub fn new(key: &[u8; 32]) -> Self {
        let (k0, k1) = key.split_at(16);
        let mut first = [0u8; 16];
        let mut second = [0u8; 16];
        first.copy_from_slice(k0);
        second.copy_from_slice(k1);
        let mut keys: [State; 15] = [[U32x4::ZERO; 8]; 15];
        let mut prev2 = bitslice(replicate(&first));
        let mut prev1 = bitslice(replicate(&second));
        first.zeroize();
        second.zeroize();
        let [r0, r1, rest @ ..] = &mut keys;
        *r0 = prev2;
        *r1 = prev1;
        for (i, out) in rest.iter_mut().enumerate() {
            let mut t = prev1;
            sub_bytes(&mut t);
            sub_bytes_nots(&mut t);
            let next = if i % 2 == 0 {
                // RotWord, SubWord and Rcon (x^(i/2) in GF(2^8): one bit, its plane).
                if let Some(plane) = t.get_mut(i / 2) {
                    *plane ^= U32x4::new(0, 0xff00_0000, 0, 0);
                }
                xor_columns(&prev2, t.map(ror_bytes_7))
            } else {
                xor_columns(&prev2, t.map(ror_bytes_3))
            };
            prev2 = prev1;
            prev1 = next;
            *out = next;
        }
        // Fold ShiftRows into the keys of the rounds whose MixColumns variant omits it, and
        // add the S-box NOTs.
        for (i, k) in keys.iter_mut().enumerate() {
            match i {
                1 | 5 | 9 | 13 => *k = k.map(shift_rows_3),
                2 | 6 | 10 => *k = k.map(shift_rows_2),
                3 | 7 | 11 => *k = k.map(shift_rows_1),
                _ => {}
            }
            if i > 0 {
                sub_bytes_nots(k);
            }
        }
        let rk = keys.map(|k| to_bytes(&k));
        Aes256x8 { rk }
    }

    /// Encrypts eight states in plane byte order, returning blocks in AES byte order.
    ///
    /// Never inlined: V8 allocates registers far worse when this and a SHA-256 compression
    /// share one function (the layer cipher's loop ran at 85 instead of 128 MB/s).
    #[inline(never)]
    fn encrypt_planes(&self, blocks: State) -> State {
        let [k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14] = &self.rk;
        let mut s = bitslice(blocks);
        add_round_key(&mut s, k0);
        macro_rules! rounds {
            ($($mix:ident $key:ident),*) => {$(
                sub_bytes(&mut s);
                $mix(&mut s);
                add_round_key(&mut s, $key);
            )*};
        }
        rounds!(
            mix_columns_1 k1, mix_columns_2 k2, mix_columns_3 k3, mix_columns_0 k4,
            mix_columns_1 k5, mix_columns_2 k6, mix_columns_3 k7, mix_columns_0 k8,
            mix_columns_1 k9, mix_columns_2 k10, mix_columns_3 k11, mix_columns_0 k12,
            mix_columns_1 k13
        );
        s = s.map(shift_rows_2);
        sub_bytes(&mut s);
        add_round_key(&mut s, k14);
        unbitslice(s)
    }

    /// Encrypts eight blocks (ECB; for known-answer tests).
    pub fn encrypt_blocks(&self, blocks: &mut [[u8; 16]; 8]) {
        let input = blocks.map(|b| transpose(U32x4::from_bytes(&b)));
        let out = self.encrypt_planes(input);
        for (b, o) in blocks.iter_mut().zip(out) {
            *b = o.to_bytes();
        }
    }

    /// Keystream blocks `counter`, `counter + 1`, … `counter + 7` (mod 2^128), each the AES
    /// encryption of the big-endian counter.
    #[inline(always)]
    pub fn keystream(&self, counter: u128) -> [U32x4; 8] {
        let mut blocks = [U32x4::ZERO; 8];
        for (i, b) in (0u128..).zip(blocks.iter_mut()) {
            let c = counter.wrapping_add(i);
            *b = counter_to_planes(U32x4::from_u64s(c as u64, (c >> 64) as u64));
        }
        self.encrypt_planes(blocks)
    }

    /// Writes into `out` the CTR keystream that starts at `nonce` from byte `offset` of the
    /// stream on (whatever `out` held is overwritten). The bulk of it goes eight blocks at a
    /// time straight from the vectors into `out`, with no staging buffer to wipe: this is how
    /// a helper worker produces a megabyte of keystream for another worker's stream.
    pub fn write_keystream(&self, nonce: &[u8; 16], offset: u64, out: &mut [u8]) {
        let head = ((16 - offset % 16) % 16) as usize;
        let (first, rest) = out.split_at_mut(head.min(out.len()));
        first.fill(0);
        self.apply_keystream(nonce, offset, first);
        let start = offset.wrapping_add(first.len() as u64);
        let mut counter = u128::from_be_bytes(*nonce).wrapping_add(u128::from(start / 16));
        let (batches, tail) = rest.as_chunks_mut::<128>();
        for batch in batches.iter_mut() {
            let ks = self.keystream(counter);
            counter = counter.wrapping_add(8);
            for (dst, k) in batch.as_chunks_mut::<16>().0.iter_mut().zip(ks) {
                *dst = k.to_bytes();
            }
        }
        let done = (batches.len() as u64).wrapping_mul(128);
        tail.fill(0);
        self.apply_keystream(nonce, start.wrapping_add(done), tail);
    }

    /// XORs `data` with the CTR keystream that starts at `nonce` (the initial counter block)
    /// from byte `offset` of the stream on.
    pub fn apply_keystream(&self, nonce: &[u8; 16], offset: u64, data: &mut [u8]) {
        let mut counter = u128::from_be_bytes(*nonce).wrapping_add(u128::from(offset / 16));
        // Bytes of the first keystream batch to skip: within-block offset only, as the batch
        // starts at the block holding `offset`.
        let mut skip = (offset % 16) as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let ks = self.keystream(counter);
            counter = counter.wrapping_add(8);
            let mut bytes = [0u8; 128];
            for (dst, k) in bytes.chunks_exact_mut(16).zip(ks) {
                dst.copy_from_slice(&k.to_bytes());
            }
            let avail = bytes.get(skip..).unwrap_or_default();
            let n = avail.len().min(rest.len());
            let (now, later) = rest.split_at_mut(n);
            for (d, k) in now.iter_mut().zip(avail) {
                *d ^= k;
            }
            bytes.zeroize();
            rest = later;
            skip = 0;
        }
    }
}
