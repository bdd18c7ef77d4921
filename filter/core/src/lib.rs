//! Sans-I/O core of ocicrypt-filter.
//!
//! Every entry point takes an event (request line, a body chunk, a callout answer, the current
//! time, randomness) and returns what to do; nothing here touches the host. The proxy-wasm
//! adapter in `filter/wasm` executes the returned commands.
//!
//! The modules below are parts, each importing only the parts listed before it (checked by
//! `tests/layout.rs`, which also refuses a module cycle inside a part): [`error`], [`spec`],
//! [`digest`] and [`store`] are the shared vocabulary; [`format`](mod@format) the ocicrypt
//! format and its ciphers; [`tuf`] the TUF client; [`distribution`] the registry's protocol as
//! the gateway acts on it; [`config`] the plugin configuration; [`keys`] the recipients' keys
//! from the key service; [`gateway`] the stream machine the host drives.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod digest;
pub mod error;
pub mod spec;
pub mod store;

pub mod format;

pub mod tuf;

pub mod distribution;

pub mod config;

pub mod keys;

pub mod gateway;
