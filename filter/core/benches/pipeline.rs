//! Throughput of the layer cipher and its parts, in MB/s (10^6 bytes per second).
//!
//!     cargo bench -p ocicrypt-filter-core --bench pipeline [-- FILTER] [--quick]
//!     scripts/bench-micro            # the same natively and as wasm under Node (V8)
//!
//! A plain harness (no criterion) so the very same binary builds for `wasm32-wasip1` and runs
//! under a WASI host. Each case runs for about a second and reports the best of five rounds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use aes::cipher::{KeyIvInit, StreamCipher};
use ocicrypt_core::format::blockcipher::LayerEncryptor;
use ocicrypt_core::format::keystream::{SegmentRequest, Wiped};
use ocicrypt_core::format::sha256::Sha256State;
use ocicrypt_core::format::simd::aes256x8::Aes256x8;
use ocicrypt_core::format::simd::sha256x4::{Schedule, Sha256x4};
use ocicrypt_core::format::simd::U32x4;
use std::hint::black_box;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

struct Bench {
    filter: Vec<String>,
    round: Duration,
}

impl Bench {
    /// Runs `f` (which processes `bytes` bytes per call) repeatedly and prints MB/s.
    fn case(&self, name: &str, bytes: usize, mut f: impl FnMut()) {
        if !self.filter.is_empty() && !self.filter.iter().any(|p| name.contains(p.as_str())) {
            return;
        }
        f(); // warm-up (and JIT tier-up under V8)
        let mut best = 0f64;
        for _ in 0..5 {
            let start = Instant::now();
            let mut calls = 0u64;
            while start.elapsed() < self.round {
                f();
                calls += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            best = best.max(calls as f64 * bytes as f64 / secs / 1e6);
        }
        println!("{name:<44} {best:9.1} MB/s");
    }
}

impl Bench {
    /// Runs `f` repeatedly and prints microseconds per call.
    fn case_ops(&self, name: &str, mut f: impl FnMut()) {
        if !self.filter.is_empty() && !self.filter.iter().any(|p| name.contains(p.as_str())) {
            return;
        }
        f();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            let mut calls = 0u64;
            while start.elapsed() < self.round {
                f();
                calls += 1;
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
        }
        println!("{name:<44} {best:9.1} us/call");
    }
}

fn main() {
    let mut filter = Vec::new();
    let mut round = Duration::from_millis(200);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => round = Duration::from_millis(50),
            other if other.starts_with('-') => {}
            other => filter.push(other.to_string()),
        }
    }
    let b = Bench { filter, round };
    println!("target: {} ({} bits)", std::env::consts::ARCH, usize::BITS);

    let mut buf = vec![0u8; MIB];
    for (i, x) in buf.iter_mut().enumerate() {
        *x = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    let key = [7u8; 32];
    let nonce = [9u8; 16];

    let mut enc = LayerEncryptor::new(key, nonce);
    b.case("layer encrypt, 1 MiB chunks", MIB, || {
        enc.encrypt_in_place(black_box(&mut buf));
    });
    let mut enc = LayerEncryptor::new(key, nonce);
    b.case("layer encrypt, 64 KiB chunks", MIB, || {
        for chunk in buf.chunks_mut(64 * 1024) {
            enc.encrypt_in_place(black_box(chunk));
        }
    });
    let mut enc = LayerEncryptor::new(key, nonce);
    b.case("layer encrypt, 16000-byte chunks (unaligned)", MIB, || {
        for chunk in buf.chunks_mut(16_000) {
            enc.encrypt_in_place(black_box(chunk));
        }
    });

    let mut enc = LayerEncryptor::new(key, nonce);
    b.case("layer encrypt, scalar path, 1 MiB chunks", MIB, || {
        enc.encrypt_in_place_scalar(black_box(&mut buf));
    });
    let mut enc = LayerEncryptor::new(key, nonce);
    b.case("layer encrypt, lanes path, 1 MiB chunks", MIB, || {
        enc.encrypt_in_place_lanes(black_box(&mut buf));
    });

    // Keystream prefetch: what the stream's worker does with a helper's keystream, what the
    // helper does to produce it, and what wiping a segment costs.
    let given = ocicrypt_core::format::blockcipher::keystream(&key, &nonce, 0, MIB);
    b.case("layer encrypt, given keystream, 1 MiB chunks", MIB, || {
        // A fresh stream each time, so the keystream matches its position (key expansion is
        // microseconds against a megabyte of hashing).
        let mut enc = LayerEncryptor::new(key, nonce);
        enc.encrypt_in_place_given(black_box(&mut buf), &given)
            .unwrap();
    });
    let request = SegmentRequest::for_layer(&LayerEncryptor::new(key, nonce), 1, 1, 0, MIB as u32);
    b.case("keystream segment, helper's answer (1 MiB)", MIB, || {
        black_box(request.answer());
    });
    let mut scratch = vec![0u8; MIB];
    b.case("wipe 1 MiB (fill + black_box, Wiped)", MIB, || {
        drop(Wiped(std::mem::take(&mut scratch)));
        scratch = vec![0u8; MIB];
    });
    b.case("wipe 1 MiB (zeroize crate)", MIB, || {
        drop(zeroize::Zeroizing::new(std::mem::take(&mut scratch)));
        scratch = vec![0u8; MIB];
    });
    black_box(&given);

    let saved = LayerEncryptor::new(key, nonce).to_bytes();
    b.case_ops("restore a saved encryptor (from_bytes)", || {
        black_box(LayerEncryptor::from_bytes(black_box(&saved)).unwrap());
    });

    let mut ctr = ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &nonce.into());
    b.case("aes-256-ctr (aes crate)", MIB, || {
        ctr.apply_keystream(black_box(&mut buf));
    });

    let mut sha = Sha256State::new();
    b.case("sha-256 x1 (Sha256State)", MIB, || {
        sha.update(black_box(&buf));
    });
    let mut three = [Sha256State::new(), Sha256State::new(), Sha256State::new()];
    b.case("sha-256 x3 sequential (per input byte)", MIB, || {
        for s in three.iter_mut() {
            s.update(black_box(&buf));
        }
    });
    let lanes = if ocicrypt_core::format::simd::HARDWARE {
        "simd128"
    } else {
        "portable"
    };
    let aes = Aes256x8::new(&key);
    b.case(&format!("aes-256-ctr fixsliced x8 ({lanes})"), MIB, || {
        aes.apply_keystream(&nonce, 0, black_box(&mut buf));
    });
    let mut x4 = Sha256x4::new([&[0u32; 8]; 4]);
    b.case(
        &format!("sha-256 x4 lanes, per input byte ({lanes})"),
        MIB,
        || {
            for block in black_box(&buf).chunks_exact(64) {
                let block = block.try_into().unwrap();
                x4.compress(&Schedule::pc(block, block));
            }
        },
    );
    b.case(
        &format!("sha-256 x4 lanes, block pairs, per input byte ({lanes})"),
        MIB,
        || {
            for pair in black_box(&buf).chunks_exact(128) {
                let v: [U32x4; 8] = std::array::from_fn(|i| {
                    U32x4::from_bytes(pair[16 * i..][..16].try_into().unwrap())
                });
                let [a, b, c, d, e, f, g, h] = v;
                x4.compress_pc_pair([a, b, c, d], [a, b, c, d], [e, f, g, h], [e, f, g, h]);
            }
        },
    );
    black_box((sha.len(), three[0].len(), x4.states()));
}
