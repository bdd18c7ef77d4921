//! The gateway's table of upload records in Envoy shared data, for a gateway without
//! `replicas` (see `ocicrypt_core::distribution::upload_table`): slots read and written with
//! compare-and-set, as every worker shares them, and swept on the root context's timer.
use ocicrypt_core::distribution::upload_table as table;

use crate::host::SharedData;
use crate::keys;
use crate::metrics::Metrics;

/// Slots one timer tick sweeps (a shared-data read each, a write where records went idle):
/// with ticks every 2 s, all of them in about half a minute.
const SWEEP_PER_TICK: u32 = 256;

fn now() -> u64 {
    keys::now().max(0).unsigned_abs()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Drops the idle records of the next [`SWEEP_PER_TICK`] slots after `*cursor`.
pub fn sweep(cursor: &mut u32, idle_seconds: u64, metrics: &Metrics) {
    for _ in 0..SWEEP_PER_TICK {
        *cursor = (*cursor + 1) % table::SLOTS;
        let key = table::slot_key_of(*cursor);
        let Some((Some(value), cas)) = SharedData.get_cas(&key) else {
            continue;
        };
        if let Some((next, gone)) = table::sweep(&value, now(), idle_seconds) {
            // Lost to a concurrent write: that write dropped the idle records itself.
            if SharedData.set_cas(&key, &next, cas) {
                metrics.upload_state(-count(gone));
            }
        }
    }
}
