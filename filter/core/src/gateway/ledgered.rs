//! What the stream reads from and writes to the ledger: the process's bounded cache
//! ([`crate::distribution::ledger_cache`]) and the entries this request read back from the
//! registry's ledger.
//!
//! A request keeps the entries it read back itself (at most `limits.max_ledger_lookups` of
//! them), so that a small or busy cache cannot evict one between its read and the rewrite that
//! needs it.
use crate::config::policy::project_of;
use crate::digest::Digest;
use crate::distribution::ledger::LedgerEntry;
use crate::distribution::ledger_cache;
use crate::error::OciError;

use super::{Command, Env, Metric};

/// An entry this request read back from the registry's ledger.
pub(super) struct ReadBack {
    repository: String,
    digest: Digest,
    entry: LedgerEntry,
}

/// What the ledger records for `digest` in `repository`: an entry the request read back, else
/// the process's cache.
pub(super) fn ledger_entry(
    env: &Env,
    read_back: &[ReadBack],
    repository: &str,
    digest: &Digest,
) -> Option<LedgerEntry> {
    read_back
        .iter()
        .find(|r| r.repository == repository && r.digest == *digest)
        .map(|r| r.entry.clone())
        .or_else(|| ledger_cache::get_in(env.store, env.config.ledger_cache(), repository, digest))
}

/// The ledger entry of a blob (not a manifest) the gateway encrypted in `repository`.
pub(super) fn blob_entry(
    env: &Env,
    read_back: &[ReadBack],
    repository: &str,
    digest: &Digest,
) -> Option<LedgerEntry> {
    ledger_entry(env, read_back, repository, digest).filter(|e| e.media_type.is_none())
}

/// A mount of plaintext digest `mount` from `from` into `repository` that could mount the
/// ciphertext instead: both repositories belong to one project and the gateway encrypted the
/// blob in `from` (whether for the current recipients is checked once they are known).
pub(super) fn mountable(
    env: &Env,
    repository: &str,
    mount: &str,
    from: &str,
) -> Option<(Digest, LedgerEntry)> {
    if project_of(from) != project_of(repository)
        || !crate::distribution::route::is_repository_name(from)
    {
        return None;
    }
    let client_digest = Digest::parse(mount).ok()?;
    blob_entry(env, &[], from, &client_digest).map(|entry| (client_digest, entry))
}

/// Records `entry` for `digest` in `repository` in the process's cache; the commands count
/// what that changed (entries held, evictions), if anything.
pub(super) fn record(
    env: &Env,
    repository: &str,
    digest: &Digest,
    entry: &LedgerEntry,
) -> Result<Vec<Command>, OciError> {
    let change = ledger_cache::put_in(
        env.store,
        env.config.ledger_cache(),
        repository,
        digest,
        entry,
        env.now,
    )?;
    if change == ledger_cache::Change::default() {
        return Ok(Vec::new());
    }
    Ok(vec![Command::Metric(Metric::LedgerCache(change))])
}

/// Records an entry read back from the registry's ledger: in the cache, and in the request
/// (`read_back`) until it ends.
pub(super) fn record_read_back(
    env: &Env,
    read_back: &mut Vec<ReadBack>,
    repository: &str,
    digest: Digest,
    entry: LedgerEntry,
) -> Result<Vec<Command>, OciError> {
    let out = record(env, repository, &digest, &entry)?;
    read_back.push(ReadBack {
        repository: repository.to_string(),
        digest,
        entry,
    });
    Ok(out)
}
