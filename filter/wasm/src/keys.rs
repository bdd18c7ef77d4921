//! Recipient keys in the adapter: verified records in Envoy shared data, and the callouts that
//! run a key-service [`Lookup`]. Both the root context's timer and a stream that finds no usable
//! record drive lookups; whoever finishes one publishes its result to every worker.
//!
//! What a flood of requests naming projects costs is bounded (issue 13):
//! - the projects the gateway remembers live in one [`ProjectTable`] (shared data, at most
//!   `key_service.max_projects` lines): the timer refreshes only the known projects used
//!   lately; a verified "no such project" and other failures are answered from it for a while,
//!   without a lookup; a project the key service does not have never gets a shared-data key of
//!   its own (Envoy cannot delete keys);
//! - a lookup made for a request starts from the metadata a full refresh verified lately
//!   ([`keyservice::reuse_seconds`]), fetching only the project's target (nothing at all for a
//!   project no role lists); at most one request-path full refresh runs at a time per Envoy
//!   (a lease), and after a failed one every lookup is answered from the failure for
//!   [`keyservice::RETRY_AFTER_FAILURE_SECS`];
//! - each worker keeps the verified metadata set it last used, so that resuming does not verify
//!   every signature again.
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::host::{self, SharedData};
use ocicrypt_core::config::{self, Config, KeyServiceConfig};
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::keyservice::{
    self, KeyRecord, Lookup, Next, ProjectTable, Request, TableLimits, TrustedMetadata,
};
use ocicrypt_core::recipients::Recipient;
use ocicrypt_core::tuf::{MetadataCache, Updater};
use ocicrypt_core::upload::Store;
use proxy_wasm::types::MetricType;

/// Shared-data key of the [`ProjectTable`]. (The list of the previous versions,
/// `ocicrypt/keys/projects`, is no longer read.)
const TABLE_KEY: &str = "ocicrypt/keys/table";
/// Shared-data key of the timer lease (one worker refreshes per period).
const LEASE_KEY: &str = "ocicrypt/tuf/lease";
/// Shared-data key of the request-path refresh lease (one full refresh at a time).
const REFRESHING_KEY: &str = "ocicrypt/tuf/refreshing";
/// Shared-data key of the last failed full refresh: `{"at": <unix s>, "reason": "…"}`.
const FAILURE_KEY: &str = "ocicrypt/tuf/failure";
/// Answers a worker keeps for the requests that waited for its lookups.
const RECENT_ANSWERS: usize = 64;
/// Projects a worker remembers having marked used lately (saves reading the table per push).
const TOUCHED_MEMO: usize = 256;
/// Tries of a compare-and-set update of the table before giving up (another worker kept
/// writing it; the update is dropped, never a wrong answer).
const CAS_TRIES: usize = 8;

/// Unix seconds from the host clock.
pub fn now() -> i64 {
    host::now_since_epoch().map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// [`TrustedMetadata::stamp`]: root and timestamp versions, time of the full refresh.
type Stamp = (u64, u64, i64);

thread_local! {
    /// The verified metadata set this worker last used, by its stamp.
    static VERIFIED: RefCell<Option<(Stamp, Updater)>> = const { RefCell::new(None) };
    /// Results of this worker's lookups, newest last: the request that waited for a lookup
    /// reads its answer here even when the shared table could not take it.
    static RECENT: RefCell<VecDeque<(String, KeyRecord)>> = const { RefCell::new(VecDeque::new()) };
    /// Projects this worker marked used in the table, with when.
    static TOUCHED: RefCell<BTreeMap<String, i64>> = const { RefCell::new(BTreeMap::new()) };
    /// Set when the timer took its lease: the next [`start`] is the timer's full refresh.
    static TIMER_TURN: Cell<bool> = const { Cell::new(false) };
    /// Set by [`drive`] when the lookup it finished refreshed in full (for [`publish`]).
    static FULL_REFRESH_DONE: Cell<bool> = const { Cell::new(false) };
    /// The key-service metrics this module defines (ids; 0 until defined).
    static METRICS: Cell<Option<KeyMetrics>> = const { Cell::new(None) };
}

/// Metrics of the bounds (defined here, next to what they count).
#[derive(Clone, Copy)]
struct KeyMetrics {
    /// Gauge: projects in the shared table.
    remembered: u32,
    /// Counter: fetches sent to the key service (timer and requests).
    fetches: u32,
    /// Counter: requests refused from a remembered answer, without a lookup.
    from_memory: u32,
    /// Counter: request-path lookups that started from recently verified metadata.
    resumed: u32,
}

fn metrics() -> KeyMetrics {
    METRICS.with(|m| match m.get() {
        Some(k) => k,
        None => {
            let k = KeyMetrics {
                remembered: host::define_metric(
                    MetricType::Gauge,
                    "ocicrypt.keyservice.projects_remembered",
                ),
                fetches: host::define_metric(MetricType::Counter, "ocicrypt.keyservice.fetches"),
                from_memory: host::define_metric(
                    MetricType::Counter,
                    "ocicrypt.keyservice.answered_from_memory",
                ),
                resumed: host::define_metric(
                    MetricType::Counter,
                    "ocicrypt.keyservice.resumed_lookups",
                ),
            };
            m.set(Some(k));
            k
        }
    })
}

/// What a stream can do about a project's recipients right now.
pub enum Resolution {
    /// Encrypt to these.
    Ready(Vec<Recipient>),
    /// Run a lookup for the project, then ask again.
    LookUp,
}

fn unavailable(project: &str, reason: &str) -> OciError {
    OciError::new(
        Code::Unavailable,
        format!(
            "no verified recipient keys for project {project:?}: {reason}; nothing was stored. \
             Retry later, or ask the key-service owners to publish the project's recipients"
        ),
    )
}

fn read_table() -> (ProjectTable, u32) {
    match SharedData.get_cas(TABLE_KEY) {
        Some((value, cas)) => (
            value.map_or_else(ProjectTable::default, |v| ProjectTable::from_bytes(&v)),
            cas,
        ),
        None => (ProjectTable::default(), 0),
    }
}

/// Applies `update` to the shared table (compare-and-set, retried); `update` returns whether
/// it changed anything. Sets the gauge of remembered projects.
fn update_table(mut update: impl FnMut(&mut ProjectTable) -> bool) {
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = SharedData.get_cas(TABLE_KEY) else {
            return;
        };
        let mut table = value.map_or_else(ProjectTable::default, |v| ProjectTable::from_bytes(&v));
        if !update(&mut table) {
            return;
        }
        // cas 0 for a key not written yet would write unconditionally: a first table written
        // by two workers at once loses one line, which its next lookup adds back.
        if SharedData.set_cas(TABLE_KEY, &table.to_bytes(), cas) {
            host::record_metric(
                metrics().remembered,
                u64::try_from(table.len()).unwrap_or(u64::MAX),
            );
            return;
        }
    }
}

/// Marks `project` used (its keys were needed now), at most once a minute per worker.
fn touch(project: &str, now: i64) {
    let fresh = TOUCHED.with(|t| {
        t.borrow()
            .get(project)
            .is_some_and(|at| now.saturating_sub(*at) < keyservice::TOUCH_EVERY_SECS)
    });
    if fresh {
        return;
    }
    let limits = LIMITS.with(Cell::get);
    update_table(|table| table.touch(project, now, &limits));
    TOUCHED.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() >= TOUCHED_MEMO {
            t.clear();
        }
        t.insert(project.to_string(), now);
    });
}

fn recent_answer(project: &str) -> Option<KeyRecord> {
    RECENT.with(|r| {
        r.borrow()
            .iter()
            .rev()
            .find(|(p, _)| p == project)
            .map(|(_, rec)| rec.clone())
    })
}

/// The last failed full refresh since the last one that succeeded: when, and why.
fn last_failure() -> Option<(i64, String)> {
    let bytes = SharedData.get(FAILURE_KEY)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let at = v.get("at")?.as_i64().filter(|at| *at > 0)?;
    let reason = v
        .get("reason")
        .and_then(|r| r.as_str())
        .unwrap_or("the key service failed");
    Some((at, reason.to_string()))
}

/// The last failed full refresh, if younger than the retry delay.
fn recent_failure(now: i64) -> Option<String> {
    let (at, reason) = last_failure()?;
    if now.saturating_sub(at) >= keyservice::RETRY_AFTER_FAILURE_SECS || at > now {
        return None;
    }
    Some(reason)
}

/// The recipients of `project`: inline ones from the configuration (explicit, untouched by
/// TUF), else a fresh verified record of the key service. A project the gateway has an answer
/// for in memory (a verified "no such project", a recent failure) is refused without a lookup;
/// so is a new project when `key_service.max_projects` projects are in use.
pub fn resolve(
    config: &Config,
    project: &str,
    now: i64,
    looked_up: bool,
) -> Result<Resolution, OciError> {
    if let Some(inline) = config.recipients(project) {
        return Ok(Resolution::Ready(inline.to_vec()));
    }
    let Some(ks) = &config.key_service else {
        return Err(unavailable(
            project,
            "the gateway has no key service and no inline recipients for it",
        ));
    };
    configure(ks);
    if !config::is_project_name(project) {
        // No key service can hold it (nor Harbor): never worth a lookup.
        return Err(unavailable(
            project,
            "it is not a project name (lowercase letters, digits, '.', '_', '-', starting and ending with a letter or digit)",
        ));
    }
    let max_age = i64::try_from(ks.max_age_seconds).unwrap_or(i64::MAX);
    if looked_up {
        // The answer of the lookup this request waited for (this worker ran it).
        if let Some(record) = recent_answer(project) {
            return match record.usable(project, now, max_age) {
                Ok(recipients) => Ok(Resolution::Ready(recipients)),
                Err(reason) => Err(unavailable(project, &reason)),
            };
        }
    }
    let record = SharedData
        .get(&keyservice::record_key(project))
        .and_then(|b| KeyRecord::from_bytes(&b));
    let reason = match record.as_ref().map(|r| r.usable(project, now, max_age)) {
        Some(Ok(recipients)) => {
            touch(project, now);
            return Ok(Resolution::Ready(recipients));
        }
        Some(Err(reason)) => Some(reason),
        None => None,
    };
    let limits = TableLimits::of(ks);
    let (table, _) = read_table();
    if let Some(answer) = table.answer(project, now) {
        host::increment_metric(metrics().from_memory, 1);
        return Err(unavailable(project, &answer));
    }
    if let Some(failure) = recent_failure(now) {
        host::increment_metric(metrics().from_memory, 1);
        return Err(unavailable(project, &failure));
    }
    if let Some((_, failure)) = last_failure() {
        // The key service failed, and a request is asking it again right now: wait for that
        // one (one full refresh at a time while it fails) instead of piling up.
        if lease_held(REFRESHING_KEY, now) {
            host::increment_metric(metrics().from_memory, 1);
            return Err(unavailable(project, &failure));
        }
    }
    if looked_up {
        return Err(unavailable(
            project,
            reason
                .as_deref()
                .unwrap_or("the key service lookup gave no answer"),
        ));
    }
    if !table.has_room(project, now, &limits) {
        return Err(unavailable(
            project,
            &format!(
                "the gateway already keeps the keys of key_service.max_projects ({}) projects in use; raise the limit",
                limits.max_projects
            ),
        ));
    }
    Ok(Resolution::LookUp)
}

fn shared_metadata() -> Option<TrustedMetadata> {
    SharedData
        .get(keyservice::METADATA_KEY)
        .and_then(|b| TrustedMetadata::from_bytes(&b))
}

/// Takes the request-path refresh lease (one full refresh at a time per Envoy) for about as
/// long as a full refresh may take.
fn take_refresh_lease(ks: &KeyServiceConfig, now: i64) -> bool {
    let secs = i64::try_from(ks.timeout_ms.saturating_mul(4) / 1000)
        .unwrap_or(i64::MAX)
        .clamp(1, 30);
    take(REFRESHING_KEY, now, secs)
}

/// Starts a lookup of `projects`. The timer's (it took its lease just before) is a full
/// refresh. A request's starts from the metadata a full refresh verified lately when there is
/// one ([`keyservice::reuse_seconds`]); otherwise it refreshes in full, unless another request
/// is doing so already and metadata younger than `max_age_seconds` exists, which it then
/// starts from (records count their age from that refresh, never from now).
pub fn start(ks: &KeyServiceConfig, projects: Vec<String>, now: i64) -> (Lookup, Next) {
    configure(ks);
    let timer = TIMER_TURN.with(|t| t.replace(false));
    let shared = shared_metadata();
    // A full refresh that failed since the metadata was verified (the key service down, or
    // serving what does not verify) is not ignored: the next lookup refreshes in full again.
    let failed_since =
        |m: &TrustedMetadata| last_failure().is_some_and(|(at, _)| at >= m.verified_at);
    if !timer {
        if let Some(meta) = shared.as_ref().filter(|m| !failed_since(m)) {
            let age = now.saturating_sub(meta.verified_at);
            let max_age = i64::try_from(ks.max_age_seconds).unwrap_or(i64::MAX);
            let recent = meta.verified_at > 0 && (0..keyservice::reuse_seconds(ks)).contains(&age);
            let usable = meta.verified_at > 0 && (0..max_age).contains(&age);
            // Without anything usable to start from, this request refreshes in full (and so do
            // concurrent ones: bounded by the requests in flight, and after a failure every
            // lookup is answered from it for a while).
            if recent || (usable && !take_refresh_lease(ks, now)) {
                if let Some(started) = resume(ks, meta, projects.clone(), now) {
                    host::increment_metric(metrics().resumed, 1);
                    return started;
                }
            }
        }
        // This request refreshes in full: others wait for it while the key service fails.
        let _ = take_refresh_lease(ks, now);
    }
    let cache = shared.map_or_else(|| MetadataCache::new(ks.trusted_root.clone()), |m| m.cache);
    Lookup::start(ks, cache, projects, now)
}

fn resume(
    ks: &KeyServiceConfig,
    meta: &TrustedMetadata,
    projects: Vec<String>,
    now: i64,
) -> Option<(Lookup, Next)> {
    let stamp = meta.stamp();
    let kept = VERIFIED.with(|v| {
        v.borrow()
            .as_ref()
            .filter(|(s, _)| *s == stamp)
            .map(|(_, u)| u.clone())
    });
    match kept {
        Some(updater) => {
            Lookup::resume_verified(ks, updater, meta.verified_at, projects.clone(), now)
                .or_else(|| Lookup::resume(ks, meta.cache.clone(), meta.verified_at, projects, now))
        }
        None => Lookup::resume(ks, meta.cache.clone(), meta.verified_at, projects, now),
    }
}

/// Sends a lookup's fetch; `Err` when the host refused the callout.
pub fn dispatch(ks: &KeyServiceConfig, req: &Request) -> Result<u32, ()> {
    let headers = vec![
        (":method", "GET"),
        (":path", req.path.as_str()),
        (":authority", ks.authority.as_str()),
    ];
    host::increment_metric(metrics().fetches, 1);
    host::dispatch(
        &ks.cluster,
        headers,
        None,
        Duration::from_millis(ks.timeout_ms),
    )
}

/// Where a lookup stands after being driven.
pub enum Driven {
    /// Waiting for the answer to this callout token.
    Waiting(Box<Lookup>, u32),
    /// Finished (not yet published).
    Done(Vec<(String, KeyRecord)>, Option<TrustedMetadata>),
}

/// Runs a lookup until it waits on a callout or is finished. A callout the host refuses
/// counts as an unanswered fetch (the lookup then fails closed).
pub fn drive(ks: &KeyServiceConfig, mut lookup: Lookup, mut next: Next) -> Driven {
    loop {
        match next {
            Next::Fetch(req) => match dispatch(ks, &req) {
                Ok(token) => return Driven::Waiting(Box::new(lookup), token),
                Err(()) => next = lookup.on_response(0, &[]),
            },
            Next::Done { records, metadata } => {
                FULL_REFRESH_DONE.with(|f| f.set(!lookup.resumed()));
                // Keep the verified set for the next lookups this worker resumes.
                if let (Some(meta), Some(updater)) = (&metadata, lookup.verified_updater()) {
                    let updater = updater.clone();
                    VERIFIED.with(|v| *v.borrow_mut() = Some((meta.stamp(), updater)));
                }
                return Driven::Done(records, metadata);
            }
        }
    }
}

/// Status and body of the callout answer being delivered. A callout that failed after its
/// headers (a body cut short, a timeout, an answer over Envoy's limit) has no answer to read:
/// status 0, which the lookup counts as unanswered (fails closed), never a panic.
pub fn response(body_size: usize) -> (u16, Vec<u8>) {
    let status = host::call_status().unwrap_or(0);
    let body = if status == 0 {
        Vec::new()
    } else {
        host::call_body(body_size).unwrap_or_default()
    };
    (status, body)
}

/// Publishes a finished lookup: records for every worker (only for projects the key service
/// has, or had: a project it does not know gets no shared-data key), the table's lines, and
/// the newer trusted metadata; a failed refresh is remembered for every lookup.
pub fn publish(records: &[(String, KeyRecord)], metadata: Option<TrustedMetadata>) {
    let now = now();
    if FULL_REFRESH_DONE.with(|f| f.replace(false)) {
        // The request-path refresh lease is for a refresh in flight: this one is over.
        let _ = SharedData.set(REFRESHING_KEY, b"0");
    }
    match metadata {
        Some(new) => {
            // Newer metadata, a later full refresh, or the same with delegated roles added
            // (a resumed lookup that loaded them); not the same bytes again.
            let current = shared_metadata();
            if current.is_none_or(|c| new.supersedes(&c) && new != c) {
                let _ = SharedData.set(keyservice::METADATA_KEY, &new.to_bytes());
            }
            if last_failure().is_some_and(|(at, _)| at <= new.verified_at) {
                let _ = SharedData.set(FAILURE_KEY, b"{\"at\":0}");
            }
        }
        None => {
            // The refresh itself failed (key service down, metadata that does not verify):
            // every project would fail the same way for a while.
            if let Some(reason) = records.iter().find_map(|(_, r)| r.error.clone()) {
                let v = serde_json::json!({ "at": now, "reason": reason });
                let _ = SharedData.set(FAILURE_KEY, &serde_json::to_vec(&v).unwrap_or_default());
            }
        }
    }
    for (project, record) in records {
        let key = keyservice::record_key(project);
        // A failure overwrites a record that exists (its keys must stop being used at once);
        // a project without one keeps its answer in the table only. Never a record from a
        // later refresh with one from an earlier (a lookup that started from older metadata
        // and finished after the timer's refresh: a rotation must not be undone).
        let existing = SharedData.get(&key).map(|b| KeyRecord::from_bytes(&b));
        let newer_there = existing
            .as_ref()
            .and_then(Option::as_ref)
            .is_some_and(|e| e.checked_at > record.checked_at);
        if (record.error.is_none() || existing.is_some()) && !newer_there {
            let _ = SharedData.set(&key, &record.to_bytes());
        }
        RECENT.with(|r| {
            let mut r = r.borrow_mut();
            if r.len() >= RECENT_ANSWERS {
                r.pop_front();
            }
            r.push_back((project.clone(), record.clone()));
        });
    }
    if records.is_empty() {
        return;
    }
    // The configuration is the same in every worker; the limits come with the records' owner.
    let limits = LIMITS.with(Cell::get);
    update_table(|table| {
        let mut changed = false;
        for (project, record) in records {
            changed |= table.record(project, record, now, &limits);
        }
        changed
    });
}

thread_local! {
    /// The table's limits from this worker's configuration ([`configure`]).
    static LIMITS: Cell<TableLimits> = const { Cell::new(TableLimits {
        max_projects: keyservice::DEFAULT_MAX_PROJECTS,
        unknown_seconds: 60,
        failure_seconds: keyservice::RETRY_AFTER_FAILURE_SECS,
        idle_seconds: 3600,
    }) };
}

/// Takes the table's limits from the key-service configuration. Called by every entry point
/// that has the configuration ([`resolve`], [`start`]); a worker that has done neither yet
/// prunes with the default idle time (it differs only for `refresh_seconds` above 360).
fn configure(ks: &KeyServiceConfig) {
    LIMITS.with(|l| l.set(TableLimits::of(ks)));
}

/// Projects the timer refreshes: the known ones in use. Prunes the table of what expired.
pub fn projects() -> Vec<String> {
    let now = now();
    let limits = LIMITS.with(Cell::get);
    let (table, _) = read_table();
    let mut pruned = table.clone();
    if pruned.prune(now, &limits) > 0 {
        update_table(|t| t.prune(now, &limits) > 0);
    }
    host::record_metric(
        metrics().remembered,
        u64::try_from(pruned.len()).unwrap_or(u64::MAX),
    );
    pruned.refresh_list(now, &limits)
}

fn lease_held(key: &str, now: i64) -> bool {
    SharedData
        .get(key)
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
        .is_some_and(|until| until > now)
}

fn take(key: &str, now: i64, secs: i64) -> bool {
    let Some((value, cas)) = SharedData.get_cas(key) else {
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
    SharedData.set_cas(key, next.as_bytes(), cas)
}

/// Takes the refresh lease for `secs` when no other worker holds it. The lookup the timer
/// starts right after is a full refresh.
pub fn take_lease(now: i64, secs: i64) -> bool {
    let taken = take(LEASE_KEY, now, secs);
    TIMER_TURN.with(|t| t.set(taken));
    taken
}
