//! Sans-I/O core of ocicrypt-filter.
//!
//! Every entry point takes an event (request line, a body chunk, a callout answer, the current
//! time, randomness) and returns what to do; nothing here touches the host. The proxy-wasm
//! adapter in `filter/wasm` executes the returned commands.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod blockcipher;
pub mod config;
pub mod digest;
pub mod distribution;
pub mod error;
pub mod form;
pub mod gateway;
pub mod index;
pub mod key_records;
pub mod keyservice;
pub mod keystream;
pub mod keywrap;
pub mod ledger;
pub mod ledger_cache;
pub mod manifest;
pub mod policy;
pub mod prefetch;
pub mod recipients;
pub mod session;
pub mod sha256;
pub mod simd;
pub mod slots;
pub mod spec;
pub mod tags_list;
pub mod tuf;
pub mod upload;
pub mod upload_table;
