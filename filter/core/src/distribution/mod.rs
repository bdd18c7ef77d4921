//! The OCI distribution protocol as the gateway acts on it: what a request is ([`route`],
//! [`form`]), upload sessions ([`upload`], one request at a time by [`session`], their records
//! in [`upload_table`] over [`slots`]), manifests and indexes ([`manifest`]), the [`ledger`]
//! that maps what a client pushed to what the registry stores (cached by [`ledger_cache`]),
//! and the tags a user sees ([`tags_list`]). Imports the shared vocabulary and
//! [`crate::format`].
pub mod form;
pub mod ledger;
pub mod ledger_cache;
pub mod manifest;
pub mod route;
pub mod session;
pub mod slots;
pub mod tags_list;
pub mod upload;
pub mod upload_table;
