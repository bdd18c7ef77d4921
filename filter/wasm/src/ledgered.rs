//! The ledger entries this Envoy keeps in shared data: a bounded cache
//! (`ocicrypt_core::ledger_cache`), its slots read and written with compare-and-set as every
//! worker shares them.
use ocicrypt_core::config::Config;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::error::OciError;
use ocicrypt_core::ledger::LedgerEntry;
use ocicrypt_core::ledger_cache::{self, Shape};

use crate::host::SharedData;
use crate::keys;
use crate::metrics::Metrics;

/// Records `entry` for `digest` in `repository` (a full slot evicts its least recently written
/// entry) and counts what changed.
pub fn record(
    config: Option<&Config>,
    repository: &str,
    digest: &Digest,
    entry: &LedgerEntry,
    metrics: &Metrics,
) -> Result<(), OciError> {
    let shape = config.map_or_else(
        || Shape::for_entries(ledger_cache::DEFAULT_ENTRIES),
        Config::ledger_cache,
    );
    let now = keys::now().max(0).unsigned_abs();
    let change = ledger_cache::put_in(&SharedData, shape, repository, digest, entry, now)?;
    metrics.ledger_cache(change);
    Ok(())
}
