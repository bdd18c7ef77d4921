//! [`U32x4`]: four 32-bit lanes, a wasm `v128` or a portable array with the same semantics
//! (lane `i` holds bytes `4i..4i+4` of the vector, little-endian, as in wasm memory).

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub(crate) mod imp {
    use core::arch::wasm32::*;

    pub type Inner = v128;

    #[inline(always)]
    pub const fn new(a: u32, b: u32, c: u32, d: u32) -> Inner {
        u32x4(a, b, c, d)
    }
    #[inline(always)]
    pub fn lanes(x: Inner) -> [u32; 4] {
        [
            u32x4_extract_lane::<0>(x),
            u32x4_extract_lane::<1>(x),
            u32x4_extract_lane::<2>(x),
            u32x4_extract_lane::<3>(x),
        ]
    }
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 16]) -> Inner {
        // LLVM folds this into one `v128.load` (sixteen byte lanes would stay sixteen
        // `v128.load8_lane`s where the bytes come from a sliced block).
        let (lo, hi) = b
            .split_first_chunk::<8>()
            .map_or(([0; 8], [0; 8]), |(lo, rest)| {
                (*lo, rest.first_chunk::<8>().copied().unwrap_or([0; 8]))
            });
        u64x2(u64::from_le_bytes(lo), u64::from_le_bytes(hi))
    }
    #[inline(always)]
    pub fn to_bytes(x: Inner) -> [u8; 16] {
        // LLVM folds this into one `v128.store`.
        let lo = u64x2_extract_lane::<0>(x).to_le_bytes();
        let hi = u64x2_extract_lane::<1>(x).to_le_bytes();
        [
            lo[0], lo[1], lo[2], lo[3], lo[4], lo[5], lo[6], lo[7], hi[0], hi[1], hi[2], hi[3],
            hi[4], hi[5], hi[6], hi[7],
        ]
    }
    #[inline(always)]
    pub fn from_u64s(lo: u64, hi: u64) -> Inner {
        u64x2(lo, hi)
    }
    #[inline(always)]
    pub fn xor(a: Inner, b: Inner) -> Inner {
        v128_xor(a, b)
    }
    #[inline(always)]
    pub fn and(a: Inner, b: Inner) -> Inner {
        v128_and(a, b)
    }
    #[inline(always)]
    pub fn or(a: Inner, b: Inner) -> Inner {
        v128_or(a, b)
    }
    #[inline(always)]
    pub fn not(a: Inner) -> Inner {
        v128_not(a)
    }
    #[inline(always)]
    pub fn add(a: Inner, b: Inner) -> Inner {
        i32x4_add(a, b)
    }
    #[inline(always)]
    pub fn bitselect(a: Inner, b: Inner, mask: Inner) -> Inner {
        v128_bitselect(a, b, mask)
    }
    #[inline(always)]
    pub fn shl(a: Inner, n: u32) -> Inner {
        u32x4_shl(a, n)
    }
    #[inline(always)]
    pub fn shr(a: Inner, n: u32) -> Inner {
        u32x4_shr(a, n)
    }
    #[inline(always)]
    pub fn eq(a: Inner, b: Inner) -> bool {
        !v128_any_true(v128_xor(a, b))
    }

    macro_rules! shuffle {
        ($x:expr; $($i:literal)*) => {
            core::arch::wasm32::i8x16_shuffle::<$($i),*>($x, $x)
        };
    }
    macro_rules! shuffle32 {
        ($a:expr, $b:expr; $($i:literal)*) => {
            core::arch::wasm32::i32x4_shuffle::<$($i),*>($a, $b)
        };
    }
    pub(crate) use {shuffle, shuffle32};
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
pub(crate) mod imp {
    pub type Inner = [u32; 4];

    #[inline(always)]
    pub const fn new(a: u32, b: u32, c: u32, d: u32) -> Inner {
        [a, b, c, d]
    }
    #[inline(always)]
    pub fn lanes(x: Inner) -> [u32; 4] {
        x
    }
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 16]) -> Inner {
        let mut out = [0u32; 4];
        for (o, w) in out.iter_mut().zip(b.as_chunks::<4>().0) {
            *o = u32::from_le_bytes(*w);
        }
        out
    }
    #[inline(always)]
    pub fn to_bytes(x: Inner) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (o, w) in out.chunks_exact_mut(4).zip(x) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
    #[inline(always)]
    pub fn from_u64s(lo: u64, hi: u64) -> Inner {
        [lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32]
    }
    #[inline(always)]
    fn map2(a: Inner, b: Inner, f: impl Fn(u32, u32) -> u32) -> Inner {
        [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])]
    }
    #[inline(always)]
    pub fn xor(a: Inner, b: Inner) -> Inner {
        map2(a, b, |x, y| x ^ y)
    }
    #[inline(always)]
    pub fn and(a: Inner, b: Inner) -> Inner {
        map2(a, b, |x, y| x & y)
    }
    #[inline(always)]
    pub fn or(a: Inner, b: Inner) -> Inner {
        map2(a, b, |x, y| x | y)
    }
    #[inline(always)]
    pub fn not(a: Inner) -> Inner {
        a.map(|x| !x)
    }
    #[inline(always)]
    pub fn add(a: Inner, b: Inner) -> Inner {
        map2(a, b, u32::wrapping_add)
    }
    #[inline(always)]
    pub fn bitselect(a: Inner, b: Inner, mask: Inner) -> Inner {
        or(and(a, mask), and(b, not(mask)))
    }
    #[inline(always)]
    pub fn shl(a: Inner, n: u32) -> Inner {
        a.map(|x| x << n)
    }
    #[inline(always)]
    pub fn shr(a: Inner, n: u32) -> Inner {
        a.map(|x| x >> n)
    }
    #[inline(always)]
    pub fn eq(a: Inner, b: Inner) -> bool {
        a == b
    }

    /// Byte `k` of the result is byte `i_k` of `x` (`i8x16.shuffle` of `x` with itself).
    macro_rules! shuffle {
        ($x:expr; $($i:literal)*) => {{
            let from = $crate::format::simd::vector::imp::to_bytes($x);
            $crate::format::simd::vector::imp::from_bytes(&[$(from[$i & 15]),*])
        }};
    }
    /// Lane `k` of the result is lane `i_k` of `a ++ b` (`i32x4.shuffle`).
    macro_rules! shuffle32 {
        ($a:expr, $b:expr; $($i:literal)*) => {{
            let both = [$a, $b];
            [$(both[$i >> 2][$i & 3]),*]
        }};
    }
    pub(crate) use {shuffle, shuffle32};
}

pub(crate) use imp::{shuffle, shuffle32};

/// Four 32-bit lanes; see the module documentation. Arithmetic wraps.
#[derive(Clone, Copy)]
pub struct U32x4(pub(crate) imp::Inner);

impl U32x4 {
    /// All lanes zero.
    pub const ZERO: U32x4 = U32x4::new(0, 0, 0, 0);

    /// Lanes `[a, b, c, d]`.
    #[inline(always)]
    pub const fn new(a: u32, b: u32, c: u32, d: u32) -> Self {
        U32x4(imp::new(a, b, c, d))
    }

    /// `x` in every lane.
    #[inline(always)]
    pub const fn splat(x: u32) -> Self {
        U32x4::new(x, x, x, x)
    }

    /// The four lanes.
    #[inline(always)]
    pub fn lanes(self) -> [u32; 4] {
        imp::lanes(self.0)
    }

    /// 16 bytes as they lie in memory (lane `i` = little-endian bytes `4i..4i+4`).
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        U32x4(imp::from_bytes(b))
    }

    /// Inverse of [`Self::from_bytes`].
    #[inline(always)]
    pub fn to_bytes(self) -> [u8; 16] {
        imp::to_bytes(self.0)
    }

    /// Lanes `[lo, lo >> 32, hi, hi >> 32]`: the little-endian bytes of `lo` then of `hi`.
    #[inline(always)]
    pub fn from_u64s(lo: u64, hi: u64) -> Self {
        U32x4(imp::from_u64s(lo, hi))
    }

    /// `(a & mask) | (b & !mask)`.
    #[inline(always)]
    pub fn bitselect(a: Self, b: Self, mask: Self) -> Self {
        U32x4(imp::bitselect(a.0, b.0, mask.0))
    }

    /// Each lane shifted left by `N` bits.
    #[inline(always)]
    pub fn shl<const N: u32>(self) -> Self {
        U32x4(imp::shl(self.0, N))
    }

    /// Each lane shifted right (logical) by `N` bits.
    #[inline(always)]
    pub fn shr<const N: u32>(self) -> Self {
        U32x4(imp::shr(self.0, N))
    }

    /// Each lane rotated right by `R` bits; `L` must be `32 - R` (stable Rust cannot compute it).
    #[inline(always)]
    pub fn rotr<const R: u32, const L: u32>(self) -> Self {
        U32x4(imp::or(imp::shr(self.0, R), imp::shl(self.0, L)))
    }

    /// Lane-wise equality of all lanes (variable time; for tests and public data).
    pub fn bits_eq(self, other: Self) -> bool {
        imp::eq(self.0, other.0)
    }
}

impl core::ops::BitXor for U32x4 {
    type Output = U32x4;
    #[inline(always)]
    fn bitxor(self, rhs: Self) -> Self {
        U32x4(imp::xor(self.0, rhs.0))
    }
}

impl core::ops::BitXorAssign for U32x4 {
    #[inline(always)]
    fn bitxor_assign(&mut self, rhs: Self) {
        *self = *self ^ rhs;
    }
}

impl core::ops::BitAnd for U32x4 {
    type Output = U32x4;
    #[inline(always)]
    fn bitand(self, rhs: Self) -> Self {
        U32x4(imp::and(self.0, rhs.0))
    }
}

impl core::ops::BitOr for U32x4 {
    type Output = U32x4;
    #[inline(always)]
    fn bitor(self, rhs: Self) -> Self {
        U32x4(imp::or(self.0, rhs.0))
    }
}

impl core::ops::Not for U32x4 {
    type Output = U32x4;
    #[inline(always)]
    fn not(self) -> Self {
        U32x4(imp::not(self.0))
    }
}

impl core::ops::Add for U32x4 {
    type Output = U32x4;
    #[inline(always)]
    fn add(self, rhs: Self) -> Self {
        U32x4(imp::add(self.0, rhs.0))
    }
}

impl core::fmt::Debug for U32x4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "U32x4({:08x?})", self.lanes())
    }
}
