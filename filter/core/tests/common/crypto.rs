//! Helpers shared by the crypto_* tests: hex known answers, seeded randomness and reference
//! results from the RustCrypto crates. Pure code: these tests also run as wasm32-wasip1
//! (`scripts/test-wasm`, `scripts/bench-micro --test`).
#![allow(dead_code)]

use hmac::Mac;
use rand::{Rng, SeedableRng};

/// Bytes from hex; spaces (for readability) are ignored.
pub fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(s.replace(' ', ""), &mut out).unwrap();
    out
}

/// A random generator and its seed (to print in failure messages, so a failure can be replayed).
pub fn seeded_rng() -> (u64, rand::rngs::StdRng) {
    let seed = rand::thread_rng().gen::<u64>();
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// HMAC-SHA256 of `data` by the `hmac` crate.
pub fn hmac_ref(key: &[u8; 32], data: &[u8]) -> [u8; 32] {
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// NIST SP 800-38A F.5.5 CTR-AES256.Encrypt: key, initial counter block, plaintext, ciphertext.
pub fn sp800_38a_f55() -> ([u8; 32], [u8; 16], [u8; 64], [u8; 64]) {
    let key = unhex::<32>("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
    let counter = unhex::<16>("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
    let plain = unhex::<64>(
        "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51 \
         30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710",
    );
    let cipher = unhex::<64>(
        "601ec313775789a5b7a7f504bbf3d228 f443e3ca4d62b59aca84e990cacaf5c5 \
         2b0930daa23de94ce87017ba2d84988d dfc9c58db67aada613c2dd08457941a6",
    );
    (key, counter, plain, cipher)
}
