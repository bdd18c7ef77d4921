//! The recipients' public keys from the TUF key service: what a lookup fetches and what a
//! verified answer means for each project ([`keyservice`]), and the key records the workers
//! share, driven by the host's ticks and answers ([`records`]). Imports the shared vocabulary,
//! [`crate::format`] (recipient keys), [`crate::tuf`] and [`crate::config`].
pub mod keyservice;
pub mod records;
