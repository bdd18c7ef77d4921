//! What the workers share about keys, in the [`Store`]: the project table, the leases, the last
//! failed full refresh, the trusted metadata and the projects' records. Envoy cannot delete a
//! shared-data key: values are overwritten, never removed.
use crate::keys::keyservice::{self, KeyRecord, ProjectTable, TrustedMetadata};
use crate::store::Store;

/// Store key of the [`ProjectTable`]. (The list of the previous versions,
/// `ocicrypt/keys/projects`, is no longer read.)
pub const TABLE_KEY: &str = "ocicrypt/keys/table";
/// Store key of the last failed full refresh: `{"at": <unix s>, "reason": "…"}`.
pub const FAILURE_KEY: &str = "ocicrypt/tuf/failure";
/// Tries of a compare-and-set update of the table before giving up (another worker kept
/// writing it; the update is dropped, never a wrong answer).
const CAS_TRIES: usize = 8;

/// The shared project table (empty when absent, unreadable, or the store fails).
pub fn read_table(store: &dyn Store) -> ProjectTable {
    store
        .get_cas(TABLE_KEY)
        .and_then(|(value, _)| value)
        .map_or_else(ProjectTable::default, |v| ProjectTable::from_bytes(&v))
}

/// Applies `update` to the shared table (compare-and-set, retried); `update` returns whether
/// it changed anything. The number of projects in the table when it was written.
pub(super) fn update_table(
    store: &dyn Store,
    mut update: impl FnMut(&mut ProjectTable) -> bool,
) -> Option<usize> {
    for _ in 0..CAS_TRIES {
        let (value, cas) = store.get_cas(TABLE_KEY)?;
        let mut table = value.map_or_else(ProjectTable::default, |v| ProjectTable::from_bytes(&v));
        if !update(&mut table) {
            return None;
        }
        // cas 0 for a key not written yet would write unconditionally: a first table written
        // by two workers at once loses one line, which its next lookup adds back.
        if store.set_cas(TABLE_KEY, &table.to_bytes(), cas) {
            return Some(table.len());
        }
    }
    None
}

/// The last failed full refresh since the last one that succeeded: when, and why.
pub fn last_failure(store: &dyn Store) -> Option<(i64, String)> {
    let bytes = store.get(FAILURE_KEY)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let at = v.get("at")?.as_i64().filter(|at| *at > 0)?;
    let reason = v
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("the key service failed");
    Some((at, reason.to_string()))
}

/// The last failed full refresh, if younger than the retry delay.
pub(super) fn recent_failure(store: &dyn Store, now: i64) -> Option<String> {
    let (at, reason) = last_failure(store)?;
    if now.saturating_sub(at) >= keyservice::RETRY_AFTER_FAILURE_SECS || at > now {
        return None;
    }
    Some(reason)
}

/// Remembers a failed full refresh for every worker.
pub(super) fn record_failure(store: &dyn Store, now: i64, reason: &str) {
    let v = serde_json::json!({ "at": now, "reason": reason });
    let _ = store.set(FAILURE_KEY, &serde_json::to_vec(&v).unwrap_or_default());
}

/// Forgets the failed full refresh (a later one succeeded).
pub(super) fn clear_failure(store: &dyn Store) {
    let _ = store.set(FAILURE_KEY, b"{\"at\":0}");
}

/// The newest trusted metadata the workers share.
pub(super) fn metadata(store: &dyn Store) -> Option<TrustedMetadata> {
    store
        .get(keyservice::METADATA_KEY)
        .and_then(|b| TrustedMetadata::from_bytes(&b))
}

/// A project's record as stored: `None` without one, `Some(None)` when it does not read.
pub(super) fn record(store: &dyn Store, project: &str) -> Option<Option<KeyRecord>> {
    store
        .get(&keyservice::record_key(project))
        .map(|b| KeyRecord::from_bytes(&b))
}

/// A lease in the store: until when (unix seconds, as text) one worker holds a turn. Taken by
/// compare-and-set, so that of the workers that find it free, one gets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    key: &'static str,
}

impl Lease {
    /// The timer's: one worker refreshes per period.
    pub const TIMER: Lease = Lease {
        key: "ocicrypt/tuf/lease",
    };
    /// The request path's: one full refresh at a time per Envoy.
    pub const REFRESHING: Lease = Lease {
        key: "ocicrypt/tuf/refreshing",
    };

    /// Its store key.
    pub fn key(self) -> &'static str {
        self.key
    }

    /// Whether some worker holds it at `now`.
    pub fn held(self, store: &dyn Store, now: i64) -> bool {
        store
            .get(self.key)
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
            .is_some_and(|until| until > now)
    }

    /// Takes it for `secs` when nobody holds it; `false` when another worker does (or took it
    /// first), or the store fails.
    pub fn take(self, store: &dyn Store, now: i64, secs: i64) -> bool {
        let Some((value, cas)) = store.get_cas(self.key) else {
            return false;
        };
        let until = value
            .and_then(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
            })
            .unwrap_or(0);
        if until > now {
            return false;
        }
        let next = now.saturating_add(secs).to_string();
        store.set_cas(self.key, next.as_bytes(), cas)
    }

    /// Gives it back before its time (the turn is over).
    pub fn release(self, store: &dyn Store) {
        let _ = store.set(self.key, b"0");
    }
}
