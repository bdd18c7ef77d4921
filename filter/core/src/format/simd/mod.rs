//! Data-parallel SHA-256 and AES-256 on 128-bit vectors, for the layer cipher's hot loop.
//!
//! WebAssembly has no AES or SHA instructions, but it has `simd128`. This module computes four
//! SHA-256 streams in the four 32-bit lanes of one vector (multi-buffer hashing: the plaintext
//! digest, the ciphertext digest and HMAC's inner hash advance together) and eight AES blocks
//! at once in a bitsliced, fixsliced representation (constant time: only bitwise logic and
//! fixed byte permutations, no table indexed by secret data).
//!
//! Everything is written against [`U32x4`], which is a `core::arch::wasm32::v128` when the
//! target is wasm32 with `simd128` enabled at compile time (the intrinsics are then safe
//! functions, so no `unsafe` is needed), and a plain `[u32; 4]` elsewhere. The portable twin
//! is what native tests exercise; the same tests run as wasm under V8 (`scripts/bench-micro
//! --test`), where the vector code is what runs. Natively the layer cipher keeps the scalar
//! path (`aes` with AES-NI, `sha2` with SHA-NI), which is faster there.

pub mod aes256x8;
pub mod sha256x4;
mod vector;

pub use vector::U32x4;

/// True when [`U32x4`] is a real wasm `simd128` vector in this build (false: the portable
/// `[u32; 4]` twin).
pub const HARDWARE: bool = cfg!(all(target_arch = "wasm32", target_feature = "simd128"));
