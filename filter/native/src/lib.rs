//! Envoy dynamic-module adapter (`libocicrypt_filter.so`): Envoy's hooks go to `ocicrypt_core`,
//! whose answers become Envoy callbacks, as the wasm adapter does for proxy-wasm. Everything
//! unsafe is in [`ffi`]; the rest is safe Rust over its handles.
//!
//! Process-wide state is ordinary Rust: the shared store ([`store`]) replaces Envoy's shared
//! data, the key records are one per configuration behind a lock, and a module thread drives
//! the key-service refresh through the configuration's scheduler ([`module`]). Upload bodies
//! are encrypted by the stream that carries them (no keystream prefetch across workers), and
//! their ciphertext hashed beside it on the process's helper threads ([`hashing`]).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod ffi;
mod hashing;
mod keys;
mod metrics;
mod module;
mod store;
mod stream;
