//! Recipient keys from the TUF key service (DESIGN §6): which files to fetch, what a verified
//! answer means for each project, and how long it may be used.
//!
//! A [`Lookup`] runs one TUF update cycle (root chain, timestamp, snapshot, targets) and then
//! downloads `projects/<project>.json` for each project asked for, verified through the
//! delegations that cover it. The adapter runs its fetches as callouts. The result for each
//! project is a [`KeyRecord`], kept in shared data so every worker uses the same verified keys;
//! a record is usable only while it is fresh and its metadata unexpired.
//!
//! Lookups are bounded (issue 13): a cycle may start from metadata refreshed a moment ago
//! ([`Lookup::resume`]: no fetch but the target's), and a [`ProjectTable`] remembers, within
//! `key_service.max_projects`, which projects are in use (the timer refreshes only those) and
//! which answers to give from memory for a while (a verified "no such project", a failure).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, KeyServiceConfig};
use crate::format::recipients::Recipient;
use crate::tuf::{
    self, DownloadError, FetchBase, MetadataCache, Outcome, Progress, TufError, Updater,
    UpdaterConfig,
};

/// Target path of a project's recipients document.
pub fn recipients_target(project: &str) -> String {
    format!("projects/{project}.json")
}

/// Shared-data key of a project's record.
pub fn record_key(project: &str) -> String {
    // Under a folder of its own: no project name can collide with the list of projects.
    format!("ocicrypt/keys/project/{project}")
}

/// Shared-data key of the newest trusted TUF metadata (exact bytes).
pub const METADATA_KEY: &str = "ocicrypt/tuf/metadata";

/// Why recipients cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyServiceError {
    /// TUF verification or download failed.
    #[error("key service metadata did not verify: {0}")]
    Tuf(#[from] TufError),
    /// The key service answered with an HTTP error or not at all.
    #[error("key service unreachable or failing (HTTP {status} for {path})")]
    Unreachable {
        /// HTTP status (504 for a timeout, 503 when no answer).
        status: u16,
        /// What was fetched.
        path: String,
    },
    /// The verified document is not a recipients document.
    #[error("the verified recipients document of project {project:?} is invalid: {reason}")]
    Document {
        /// Project.
        project: String,
        /// What is wrong.
        reason: String,
    },
}

/// Verified recipients of one project, or why there are none; what workers share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Unix seconds of the update cycle that produced this record.
    pub checked_at: i64,
    /// Earliest expiry (unix seconds) of the metadata the recipients were verified with.
    pub expires_at: i64,
    /// The verified recipients document (JSON text), when the cycle succeeded.
    pub document: Option<String>,
    /// Why the cycle failed, when it did.
    pub error: Option<String>,
    /// Version of the root, timestamp, snapshot and targets metadata used.
    pub versions: Vec<(String, u64)>,
    /// The failure is a verified "no such project": no role trusted for the project's path
    /// lists it (remembered longer than other failures, see [`ProjectTable`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl KeyRecord {
    /// Serialized form for shared data.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a record; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<KeyRecord> {
        serde_json::from_slice(bytes).ok()
    }

    /// The recipients to encrypt to at `now`, or why they cannot be used. A record is fresh
    /// for `max_age` seconds after its cycle: past that, a refresh must succeed again (the
    /// timer refreshes well before), so a key service that went away, or began serving
    /// metadata that does not verify, stops pushes instead of freezing the keys in place.
    pub fn usable(&self, project: &str, now: i64, max_age: i64) -> Result<Vec<Recipient>, String> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        if now >= self.expires_at {
            return Err("the key service metadata has expired".to_string());
        }
        if now.saturating_sub(self.checked_at) > max_age {
            return Err(format!(
                "the recipients were last verified {}s ago (limit {max_age}s)",
                now - self.checked_at
            ));
        }
        let document = self.document.as_deref().ok_or("no recipients document")?;
        parse_document(document.as_bytes(), project).map_err(|e| e.to_string())
    }
}

/// Parses `{"project": "<p>", "recipients": [{"pem": …} | {"jwk": …}, …]}`.
pub fn parse_document(bytes: &[u8], project: &str) -> Result<Vec<Recipient>, KeyServiceError> {
    let bad = |reason: String| KeyServiceError::Document {
        project: project.to_string(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".to_string()))?;
    if let Some(named) = obj.get("project") {
        let target = recipients_target(project);
        if named.as_str() != Some(project) && named.as_str() != Some(target.as_str()) {
            // A document of another project served under this one's path: a mix-and-match.
            return Err(bad(format!("it names project {named}")));
        }
    }
    let recipients = obj
        .get("recipients")
        .cloned()
        .ok_or_else(|| bad("no \"recipients\" field".to_string()))?;
    config::compile_recipients(recipients, "recipients")
        .map_err(|e: ConfigError| bad(e.to_string()))
}

/// A fetch the adapter must make: `GET <path>` on the key service cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Absolute request path (with the metadata or targets prefix).
    pub path: String,
    /// Largest acceptable body.
    pub max_len: u64,
}

/// What a lookup needs next.
#[derive(Debug)]
pub enum Next {
    /// Fetch this and call [`Lookup::on_response`].
    Fetch(Request),
    /// Finished: a record per project asked for, and the metadata to trust from now on.
    Done {
        /// `(project, record)` in the order asked.
        records: Vec<(String, KeyRecord)>,
        /// Newest trusted metadata (persist in shared data), when the refresh succeeded.
        metadata: Option<TrustedMetadata>,
    },
}

/// One update cycle for a set of projects.
pub struct Lookup {
    updater: Updater,
    projects: Vec<String>,
    done: Vec<(String, KeyRecord)>,
    current: Option<String>,
    now: i64,
    /// When the metadata this cycle trusts was last refreshed in full: `now` for a cycle that
    /// refreshes, earlier for one resumed from a recent refresh. Records count their age
    /// from it (`max_age_seconds`), so resuming never makes keys look fresher than they are.
    verified_at: i64,
    metadata_path: String,
    targets_path: String,
    last_path: String,
}

impl Lookup {
    fn new(cfg: &KeyServiceConfig, updater: Updater, projects: Vec<String>, now: i64) -> Lookup {
        Lookup {
            updater,
            projects,
            done: Vec::new(),
            current: None,
            now,
            verified_at: now,
            metadata_path: cfg.metadata_path.trim_end_matches('/').to_string(),
            targets_path: cfg.targets_path.trim_end_matches('/').to_string(),
            last_path: String::new(),
        }
    }

    /// Starts a cycle at `now` from `metadata` (the pinned root, or newer trusted metadata):
    /// the whole TUF workflow (root chain, timestamp, snapshot, targets), then each project.
    pub fn start(
        cfg: &KeyServiceConfig,
        metadata: MetadataCache,
        projects: Vec<String>,
        now: i64,
    ) -> (Lookup, Next) {
        let mut lookup = Lookup::new(
            cfg,
            Updater::new(metadata, UpdaterConfig::default()),
            projects,
            now,
        );
        let progress = lookup.updater.start_refresh(now);
        let next = lookup.advance(progress);
        (lookup, next)
    }

    /// Starts a cycle at `now` from metadata a full refresh verified at `verified_at`, without
    /// asking the key service for new metadata: only the projects' targets (and delegated roles
    /// not cached yet) are fetched. `None` when the cached metadata is not valid as final at
    /// `now` (expired, incomplete): then [`Lookup::start`]. The caller decides what "recent"
    /// means ([`reuse_seconds`]).
    pub fn resume(
        cfg: &KeyServiceConfig,
        metadata: MetadataCache,
        verified_at: i64,
        projects: Vec<String>,
        now: i64,
    ) -> Option<(Lookup, Next)> {
        let mut updater = Updater::new(metadata, UpdaterConfig::default());
        updater.resume(now).ok()?;
        Lookup::resume_verified(cfg, updater, verified_at, projects, now)
    }

    /// As [`Lookup::resume`] with an updater that already holds the verified set (a worker
    /// keeps one per trusted metadata, [`Lookup::verified_updater`], so that resuming does not
    /// verify every signature again). `None` when `updater` is not refreshed or its metadata
    /// has expired at `now`.
    pub fn resume_verified(
        cfg: &KeyServiceConfig,
        updater: Updater,
        verified_at: i64,
        projects: Vec<String>,
        now: i64,
    ) -> Option<(Lookup, Next)> {
        if !updater.is_refreshed() || expiry_and_versions(&updater)?.0 <= now {
            return None;
        }
        let mut lookup = Lookup::new(cfg, updater, projects, now);
        lookup.verified_at = verified_at.min(now);
        let next = lookup.advance(Ok(Progress::Done(Outcome::Refreshed)));
        Some((lookup, next))
    }

    /// The updater with the verified set, once the cycle's refresh (or resume) succeeded: what
    /// a worker may keep to resume later cycles from.
    pub fn verified_updater(&self) -> Option<&Updater> {
        self.updater.is_refreshed().then_some(&self.updater)
    }

    /// When the metadata of this cycle was last refreshed in full.
    pub fn verified_at(&self) -> i64 {
        self.verified_at
    }

    /// Whether this cycle started from earlier metadata instead of refreshing it.
    pub fn resumed(&self) -> bool {
        self.verified_at != self.now
    }

    /// Takes the answer to the last [`Next::Fetch`]. `status` 0 means no answer at all.
    pub fn on_response(&mut self, status: u16, body: &[u8]) -> Next {
        let progress = self.updater.on_response(status, body);
        self.advance(progress)
    }

    fn advance(&mut self, mut progress: Result<Progress, TufError>) -> Next {
        loop {
            match progress {
                Ok(Progress::Fetch(fetch)) => {
                    let base = match fetch.base {
                        FetchBase::Metadata => &self.metadata_path,
                        FetchBase::Targets => &self.targets_path,
                    };
                    self.last_path = format!("{base}/{}", fetch.path);
                    return Next::Fetch(Request {
                        path: self.last_path.clone(),
                        max_len: fetch.max_len,
                    });
                }
                Ok(Progress::Done(Outcome::Downloaded { bytes, .. })) => {
                    if let Some(project) = self.current.take() {
                        let record = match parse_document(&bytes, &project) {
                            Ok(_) => self
                                .record(Some(String::from_utf8_lossy(&bytes).into_owned()), None),
                            Err(e) => self.record(None, Some(e.to_string())),
                        };
                        self.done.push((project, record));
                    }
                }
                Ok(Progress::Done(_)) => {}
                Err(e) => {
                    let unknown = matches!(e, TufError::TargetNotFound { .. });
                    let error = self.describe(e);
                    match self.current.take() {
                        // A project-level failure (unknown project, tampered document) does
                        // not condemn the other projects.
                        Some(project) if self.updater.is_refreshed() => {
                            let mut record = self.record(None, Some(error));
                            record.unknown = unknown;
                            self.done.push((project, record));
                        }
                        current => {
                            let failed: Vec<String> =
                                current.into_iter().chain(self.projects.drain(..)).collect();
                            for project in failed {
                                let record = self.record(None, Some(error.clone()));
                                self.done.push((project, record));
                            }
                            return self.finish();
                        }
                    }
                }
            }
            // The refresh (or the previous project) is done: next project.
            let Some(project) = self.projects.pop() else {
                return self.finish();
            };
            progress = self
                .updater
                .start_fetch_target(&recipients_target(&project));
            self.current = Some(project);
        }
    }

    fn describe(&self, e: TufError) -> String {
        match &e {
            TufError::Download(DownloadError::Http { status, .. }) => {
                // The status the operator's guide explains (0: not sent; 503: no answer,
                // connection, TLS; 504: timeout; 404: wrong path; 3xx: not followed).
                KeyServiceError::Unreachable {
                    status: *status,
                    path: self.last_path.clone(),
                }
                .to_string()
            }
            TufError::Download(DownloadError::TooLarge { max_len, got, .. }) => format!(
                "key service answer too large ({got} bytes for {}, at most {max_len} accepted)",
                self.last_path
            ),
            TufError::TargetNotFound { .. } => {
                format!("the key service has no recipients for this project ({e})")
            }
            _ => KeyServiceError::Tuf(e).to_string(),
        }
    }

    fn record(&self, document: Option<String>, error: Option<String>) -> KeyRecord {
        let (expires_at, versions) =
            expiry_and_versions(&self.updater).unwrap_or((self.now, Vec::new()));
        KeyRecord {
            checked_at: self.verified_at,
            expires_at,
            document,
            error,
            versions,
            unknown: false,
        }
    }

    fn finish(&mut self) -> Next {
        let metadata = match (self.updater.is_refreshed(), self.updater.trusted()) {
            (true, Some(set)) => Some(TrustedMetadata {
                root_version: set.root().signed.common.version,
                timestamp_version: set.timestamp().map_or(0, |t| t.signed.common.version),
                verified_at: self.verified_at,
                cache: self.updater.cache().clone(),
            }),
            _ => None,
        };
        Next::Done {
            records: std::mem::take(&mut self.done),
            metadata,
        }
    }
}

/// Earliest expiry (unix seconds) of the top-level metadata `updater` trusts, and their
/// versions; `None` before a cycle started.
fn expiry_and_versions(updater: &Updater) -> Option<(i64, Vec<(String, u64)>)> {
    let set = updater.trusted()?;
    let mut expires = set.root().signed.common.expires;
    let mut versions = vec![("root".to_string(), set.root().signed.common.version)];
    if let Some(t) = set.timestamp() {
        expires = expires.min(t.signed.common.expires);
        versions.push(("timestamp".to_string(), t.signed.common.version));
    }
    if let Some(s) = set.snapshot() {
        expires = expires.min(s.signed.common.expires);
        versions.push(("snapshot".to_string(), s.signed.common.version));
    }
    if let Some(t) = set.targets(tuf::metadata::TARGETS) {
        expires = expires.min(t.signed.common.expires);
        versions.push(("targets".to_string(), t.signed.common.version));
    }
    Some((expires, versions))
}

/// Trusted metadata to persist between cycles, with the versions that order it: a worker
/// must never replace newer trusted metadata with older (that would reopen rollbacks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedMetadata {
    /// Version of the trusted root.
    pub root_version: u64,
    /// Version of the trusted timestamp (0 when none).
    pub timestamp_version: u64,
    /// Unix seconds of the last full refresh that verified it (0: unknown, never resumed from).
    pub verified_at: i64,
    /// The exact bytes.
    pub cache: MetadataCache,
}

impl TrustedMetadata {
    /// Whether `self` may replace `current`: never older versions (that would reopen
    /// rollbacks); for the same versions, a later (or equal) full refresh.
    pub fn supersedes(&self, current: &TrustedMetadata) -> bool {
        (self.root_version, self.timestamp_version, self.verified_at)
            >= (
                current.root_version,
                current.timestamp_version,
                current.verified_at,
            )
    }

    /// What identifies this metadata for a worker's cache of its verified set.
    pub fn stamp(&self) -> (u64, u64, i64) {
        (self.root_version, self.timestamp_version, self.verified_at)
    }

    /// Serialized form for shared data (metadata bytes in base64: hashes cover exact bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let targets: std::collections::BTreeMap<&String, String> = self
            .cache
            .targets
            .iter()
            .map(|(k, v)| (k, b64(v)))
            .collect();
        let v = serde_json::json!({
            "root_version": self.root_version,
            "timestamp_version": self.timestamp_version,
            "verified_at": self.verified_at,
            "root": b64(&self.cache.root),
            "timestamp": self.cache.timestamp.as_deref().map(b64),
            "snapshot": self.cache.snapshot.as_deref().map(b64),
            "targets": targets,
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Reads [`TrustedMetadata::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Option<TrustedMetadata> {
        use base64::Engine as _;
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let dec = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str()?)
                .ok()
        };
        let opt = |name: &str| match v.get(name) {
            Some(serde_json::Value::Null) | None => Some(None),
            Some(x) => dec(x).map(Some),
        };
        let mut cache = MetadataCache::new(dec(v.get("root")?)?);
        cache.timestamp = opt("timestamp")?;
        cache.snapshot = opt("snapshot")?;
        for (k, x) in v.get("targets")?.as_object()? {
            cache.targets.insert(k.clone(), dec(x)?);
        }
        Some(TrustedMetadata {
            root_version: v.get("root_version")?.as_u64()?,
            timestamp_version: v.get("timestamp_version")?.as_u64()?,
            verified_at: v
                .get("verified_at")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0),
            cache,
        })
    }
}

/// How long metadata from a full refresh may seed later cycles without asking the key service
/// again ([`Lookup::resume`]): half of `max_age_seconds` (records made from it must stay
/// usable a while), at most two refresh periods; 0 (never) when `max_age_seconds` is 1.
pub fn reuse_seconds(cfg: &KeyServiceConfig) -> i64 {
    let refresh = i64::try_from(cfg.refresh_seconds).unwrap_or(i64::MAX);
    let max_age = i64::try_from(cfg.max_age_seconds).unwrap_or(i64::MAX);
    (max_age / 2).min(refresh.saturating_mul(2))
}

/// A failed lookup (key service unreachable, metadata that does not verify, a bad document)
/// is answered from memory for this long before the key service is asked again.
pub const RETRY_AFTER_FAILURE_SECS: i64 = 5;

/// A project the timer refreshes and [`ProjectTable`] keeps only while it was used (a push
/// needed its keys) within this long: an hour, or ten refresh periods when that is longer.
pub fn idle_seconds(cfg: &KeyServiceConfig) -> i64 {
    let refresh = i64::try_from(cfg.refresh_seconds).unwrap_or(i64::MAX);
    refresh.saturating_mul(10).max(3600)
}

/// The message of a remembered "no such project".
pub const UNKNOWN_PROJECT: &str = "the key service has no recipients for this project \
     (no role trusted for projects/<project>.json lists it; the gateway remembers this answer \
     for key_service.refresh_seconds)";

/// The bounds of a [`ProjectTable`], from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLimits {
    /// Most projects remembered (`key_service.max_projects`).
    pub max_projects: usize,
    /// How long a verified "no such project" is answered from memory.
    pub unknown_seconds: i64,
    /// How long any other failure is answered from memory.
    pub failure_seconds: i64,
    /// A known project unused for longer is no longer refreshed nor remembered.
    pub idle_seconds: i64,
}

impl TableLimits {
    /// The limits `cfg` sets.
    pub fn of(cfg: &KeyServiceConfig) -> TableLimits {
        TableLimits {
            max_projects: cfg.max_projects.max(1),
            unknown_seconds: i64::try_from(cfg.refresh_seconds)
                .unwrap_or(i64::MAX)
                .max(RETRY_AFTER_FAILURE_SECS),
            failure_seconds: RETRY_AFTER_FAILURE_SECS,
            idle_seconds: idle_seconds(cfg),
        }
    }
}

/// What the gateway remembers of one project.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Unix seconds of the last push that needed the project's keys (or of its first lookup).
    #[serde(rename = "u")]
    pub last_used: i64,
    /// The key service had the project at the last lookup that got an answer: its record is in
    /// shared data ([`record_key`]) and the timer refreshes it while it is in use.
    #[serde(rename = "k", default, skip_serializing_if = "std::ops::Not::not")]
    pub known: bool,
    /// The last answer was a verified "no such project".
    #[serde(rename = "n", default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// Until then (unix seconds) pushes are refused from memory, without a lookup.
    #[serde(rename = "r", default, skip_serializing_if = "is_zero")]
    pub retry_at: i64,
    /// The failure to answer meanwhile (none for a verified "no such project").
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Order of the last answer recorded (within a second, the older goes first).
    #[serde(rename = "s", default)]
    pub seq: u64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Longest failure text a table entry keeps (the whole text is in the log).
const MAX_REASON_BYTES: usize = 512;

/// The projects the gateway remembers, shared by every worker (one shared-data value): which
/// are in use (the timer refreshes those, and only those), and which answers to give from
/// memory for a while. Bounded by `max_projects`: a project nobody pushes to, a remembered
/// failure or "no such project" are dropped first; a known project in use is never dropped
/// for an unknown one (beyond the bound, new projects are refused instead,
/// [`ProjectTable::has_room`]). Unknown projects never get a shared-data key of their own
/// (Envoy cannot delete one): what they cost is their line here, which is bounded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectTable {
    #[serde(rename = "p")]
    entries: BTreeMap<String, TableEntry>,
    /// Sequence number of the next answer recorded.
    #[serde(rename = "q", default)]
    next_seq: u64,
}

impl ProjectTable {
    /// Reads a table; an empty one for anything else (a module upgrade, a corrupt value: the
    /// projects in use come back with their next push).
    pub fn from_bytes(bytes: &[u8]) -> ProjectTable {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// Serialized form for shared data.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Number of projects remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no project is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `project`.
    pub fn get(&self, project: &str) -> Option<&TableEntry> {
        self.entries.get(project)
    }

    /// The refusal to answer from memory for `project` at `now`, if any: a failure younger
    /// than [`TableLimits::failure_seconds`], a "no such project" younger than
    /// [`TableLimits::unknown_seconds`].
    pub fn answer(&self, project: &str, now: i64) -> Option<String> {
        let entry = self.entries.get(project)?;
        if entry.retry_at <= now {
            return None;
        }
        Some(match &entry.reason {
            Some(reason) => reason.clone(),
            None if entry.unknown => UNKNOWN_PROJECT.to_string(),
            None => "the key service lookup failed".to_string(),
        })
    }

    fn in_use(entry: &TableEntry, now: i64, limits: &TableLimits) -> bool {
        entry.known && now.saturating_sub(entry.last_used) <= limits.idle_seconds
    }

    fn expired(entry: &TableEntry, now: i64, limits: &TableLimits) -> bool {
        if entry.known {
            !Self::in_use(entry, now, limits)
        } else {
            entry.retry_at <= now
        }
    }

    /// Whether a lookup of `project` may be remembered: it is remembered already, or there is
    /// room, or something can be dropped for it (anything but a known project in use).
    pub fn has_room(&self, project: &str, now: i64, limits: &TableLimits) -> bool {
        self.entries.contains_key(project)
            || self.entries.len() < limits.max_projects
            || self.entries.values().any(|e| !Self::in_use(e, now, limits))
    }

    /// Drops what has expired: remembered answers past their time, known projects unused for
    /// [`TableLimits::idle_seconds`]. Returns how many.
    pub fn prune(&mut self, now: i64, limits: &TableLimits) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| !Self::expired(e, now, limits));
        before - self.entries.len()
    }

    /// Makes room for one more project: drops what expired, then the entry that is not a
    /// known project in use with the oldest use (remembered answers, a failing project nobody
    /// pushes to). `false` when every entry is a known project in use.
    fn make_room(&mut self, now: i64, limits: &TableLimits) -> bool {
        if self.entries.len() < limits.max_projects {
            return true;
        }
        self.prune(now, limits);
        while self.entries.len() >= limits.max_projects {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| !Self::in_use(e, now, limits))
                .min_by_key(|(name, e)| (e.last_used, e.seq, name.as_str()))
                .map(|(name, _)| name.clone());
            match victim {
                Some(name) => {
                    self.entries.remove(&name);
                }
                None => return false,
            }
        }
        true
    }

    /// `project`'s keys were needed at `now` (a push, with a usable record: the project is
    /// known): it is in use. Returns whether the table changed (callers write it back; uses
    /// are recorded at most once a minute per project, so that pushes rarely write shared
    /// data). A known project the table lost (dropped while idle, or a lost write) is added
    /// back, room permitting.
    pub fn touch(&mut self, project: &str, now: i64, limits: &TableLimits) -> bool {
        if let Some(e) = self.entries.get_mut(project) {
            if now.saturating_sub(e.last_used) < TOUCH_EVERY_SECS && e.known {
                return false;
            }
            e.last_used = now;
            e.known = true;
            return true;
        }
        if !self.make_room(now, limits) {
            return false;
        }
        self.entries.insert(
            project.to_string(),
            TableEntry {
                last_used: now,
                known: true,
                ..TableEntry::default()
            },
        );
        true
    }

    /// Takes the result of a lookup of `project` at `now`. A project the table did not have
    /// is added as used now (a push asked for it), making room if needed; a refresh does not
    /// count as a use. Returns whether the table changed (`false` also when the result could
    /// not be remembered: every entry is a known project in use).
    pub fn record(
        &mut self,
        project: &str,
        record: &KeyRecord,
        now: i64,
        limits: &TableLimits,
    ) -> bool {
        if !self.entries.contains_key(project) && !self.make_room(now, limits) {
            return false;
        }
        let entry = self
            .entries
            .entry(project.to_string())
            .or_insert_with(|| TableEntry {
                last_used: now,
                // Marks the entry new, so that it counts as a change below.
                retry_at: -1,
                ..TableEntry::default()
            });
        let before = entry.clone();
        entry.seq = self.next_seq;
        match &record.error {
            None => {
                entry.known = true;
                entry.unknown = false;
                entry.retry_at = 0;
                entry.reason = None;
            }
            Some(_) if record.unknown => {
                // The key service no longer (or never) has it: not refreshed any more.
                entry.known = false;
                entry.unknown = true;
                entry.retry_at = now.saturating_add(limits.unknown_seconds);
                entry.reason = None;
            }
            Some(error) => {
                // A known project stays known (the timer keeps trying it while it is in use).
                entry.unknown = false;
                entry.retry_at = now.saturating_add(limits.failure_seconds);
                entry.reason = Some(truncate(error, MAX_REASON_BYTES));
            }
        }
        if *entry
            == (TableEntry {
                seq: entry.seq,
                ..before
            })
        {
            // The same answer again: nothing to write (its order stays).
            entry.seq = before.seq;
            return false;
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        true
    }

    /// The projects the timer refreshes at `now`: the known ones in use, by name.
    pub fn refresh_list(&self, now: i64, limits: &TableLimits) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| Self::in_use(e, now, limits))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A use of a project is written to the shared table at most this often.
pub const TOUCH_EVERY_SECS: i64 = 60;

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_freshness_and_expiry() {
        let doc = r#"{"project":"demo","recipients":[{"jwk":{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}}]}"#;
        let rec = KeyRecord {
            checked_at: 1000,
            expires_at: 5000,
            document: Some(doc.into()),
            error: None,
            versions: vec![],
            unknown: false,
        };
        assert_eq!(rec.usable("demo", 1100, 180).unwrap().len(), 1);
        assert!(rec
            .usable("demo", 1181, 180)
            .unwrap_err()
            .contains("last verified"));
        assert!(rec
            .usable("demo", 5000, 1_000_000)
            .unwrap_err()
            .contains("expired"));
        assert!(rec
            .usable("other", 1100, 180)
            .unwrap_err()
            .contains("names project"));
        let failed = KeyRecord {
            error: Some("bad signature".into()),
            ..rec.clone()
        };
        assert_eq!(
            failed.usable("demo", 1100, 180).unwrap_err(),
            "bad signature"
        );
        assert_eq!(KeyRecord::from_bytes(&rec.to_bytes()), Some(rec));
    }

    fn limits(max: usize) -> TableLimits {
        TableLimits {
            max_projects: max,
            unknown_seconds: 60,
            failure_seconds: 5,
            idle_seconds: 3600,
        }
    }

    fn verified() -> KeyRecord {
        KeyRecord {
            checked_at: 0,
            expires_at: i64::MAX,
            document: Some("{}".into()),
            error: None,
            versions: vec![],
            unknown: false,
        }
    }

    fn unknown() -> KeyRecord {
        KeyRecord {
            document: None,
            error: Some("the key service has no recipients for this project".into()),
            unknown: true,
            ..verified()
        }
    }

    fn failed(why: &str) -> KeyRecord {
        KeyRecord {
            document: None,
            error: Some(why.into()),
            ..verified()
        }
    }

    #[test]
    fn unknown_projects_are_answered_from_memory_until_they_expire() {
        let l = limits(16);
        let mut t = ProjectTable::default();
        assert!(t.record("ghost", &unknown(), 1000, &l));
        assert_eq!(t.answer("ghost", 1000).as_deref(), Some(UNKNOWN_PROJECT));
        assert!(t.answer("ghost", 1059).is_some());
        assert_eq!(
            t.answer("ghost", 1060),
            None,
            "remembered for unknown_seconds"
        );
        // Never refreshed by the timer, and dropped once expired.
        assert!(t.refresh_list(1000, &l).is_empty());
        assert_eq!(t.prune(1060, &l), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn failures_are_answered_briefly_and_known_projects_stay_refreshed() {
        let l = limits(16);
        let mut t = ProjectTable::default();
        t.record("demo", &verified(), 1000, &l);
        assert_eq!(t.refresh_list(1000, &l), vec!["demo".to_string()]);
        assert!(t.record("demo", &failed("HTTP 503"), 1010, &l));
        assert_eq!(t.answer("demo", 1010).as_deref(), Some("HTTP 503"));
        assert_eq!(t.answer("demo", 1015), None);
        // Still known: the timer keeps trying it.
        assert_eq!(t.refresh_list(1015, &l), vec!["demo".to_string()]);
        assert!(t.record("demo", &verified(), 1020, &l));
        assert_eq!(t.answer("demo", 1020), None);
        // The same answer again changes nothing (no write).
        assert!(!t.record("demo", &verified(), 1080, &l));
        // A project the key service no longer has is no longer refreshed.
        t.record("demo", &unknown(), 1100, &l);
        assert!(t.refresh_list(1100, &l).is_empty());
        let long = "x".repeat(5000);
        t.record("other", &failed(&long), 1100, &l);
        assert!(t.answer("other", 1100).unwrap().len() <= MAX_REASON_BYTES + 3);
    }

    #[test]
    fn idle_projects_leave_the_refresh_list() {
        let l = limits(16);
        let mut t = ProjectTable::default();
        t.record("a", &verified(), 1000, &l);
        t.record("b", &verified(), 1000, &l);
        // A refresh is not a use.
        t.record("a", &verified(), 3000, &l);
        assert!(t.touch("b", 3000, &l));
        assert!(
            !t.touch("b", 3030, &l),
            "uses are written at most once a minute"
        );
        assert_eq!(t.refresh_list(4600, &l).len(), 2);
        assert_eq!(t.refresh_list(4601, &l), vec!["b".to_string()]);
        assert_eq!(t.prune(4601, &l), 1);
        assert!(t.get("a").is_none());
        // A known project the table lost comes back with its next push.
        assert!(t.touch("a", 4700, &l));
        assert_eq!(t.refresh_list(4700, &l).len(), 2);
    }

    #[test]
    fn the_table_is_bounded_and_known_projects_in_use_are_never_dropped() {
        let l = limits(8);
        let mut t = ProjectTable::default();
        for p in ["k1", "k2", "k3"] {
            t.record(p, &verified(), 1000, &l);
        }
        // A flood of unknown names: the table never holds more than max_projects.
        for i in 0..10_000 {
            let name = format!("random-{i}");
            assert!(t.has_room(&name, 1001, &l));
            t.record(&name, &unknown(), 1001 + i / 100, &l);
            assert!(t.len() <= 8);
        }
        for p in ["k1", "k2", "k3"] {
            assert!(t.get(p).is_some_and(|e| e.known), "{p} was dropped");
        }
        assert_eq!(t.refresh_list(1200, &l), vec!["k1", "k2", "k3"]);
        // The newest unknown answers are the ones remembered.
        assert!(t.answer("random-9999", 1100).is_some());
        assert!(t.answer("random-0", 1002).is_none());
        // Within one second too: the older answers go first.
        for i in 0..20 {
            t.record(&format!("same-{i:02}"), &unknown(), 1100, &l);
        }
        assert!((15..20).all(|i| t.answer(&format!("same-{i:02}"), 1100).is_some()));
        assert!(t.answer("same-14", 1100).is_none());
        // Full of known projects in use: a new project has no room and is not remembered;
        // a known one is still served.
        let mut full = ProjectTable::default();
        for i in 0..8 {
            full.record(&format!("known-{i}"), &verified(), 1000, &l);
        }
        assert!(!full.has_room("new", 1000, &l));
        assert!(full.has_room("known-3", 1000, &l));
        assert!(!full.record("new", &unknown(), 1000, &l));
        assert_eq!(full.len(), 8);
        // Once one is idle, it makes room.
        full.touch("known-0", 2000, &l);
        assert!(full.has_room("new", 4700, &l));
        assert!(full.record("new", &unknown(), 4700, &l));
        assert!(full.get("known-0").is_some());
    }

    #[test]
    fn tables_read_back_and_junk_reads_as_empty() {
        let l = limits(16);
        let mut t = ProjectTable::default();
        t.record("demo", &verified(), 1000, &l);
        t.record("ghost", &unknown(), 1000, &l);
        t.record("down", &failed("HTTP 0"), 1000, &l);
        assert_eq!(ProjectTable::from_bytes(&t.to_bytes()), t);
        assert!(ProjectTable::from_bytes(b"[1,2").is_empty());
        assert!(ProjectTable::from_bytes(b"\xff\xfe").is_empty());
        // One line per project, a few dozen bytes each.
        assert!(
            t.to_bytes().len() < 200,
            "{}",
            String::from_utf8_lossy(&t.to_bytes())
        );
    }

    #[test]
    fn reuse_window_is_within_max_age() {
        let base = KeyServiceConfig {
            cluster: "k".into(),
            authority: "k".into(),
            metadata_path: "/metadata".into(),
            targets_path: "/targets".into(),
            trusted_root: vec![],
            refresh_seconds: 60,
            timeout_ms: 5000,
            max_age_seconds: 180,
            max_projects: 1024,
        };
        assert_eq!(reuse_seconds(&base), 90);
        let short = KeyServiceConfig {
            max_age_seconds: 1,
            ..base.clone()
        };
        assert_eq!(reuse_seconds(&short), 0, "never reused");
        let long = KeyServiceConfig {
            max_age_seconds: 86_400,
            ..base.clone()
        };
        assert_eq!(reuse_seconds(&long), 120, "at most two refresh periods");
        assert_eq!(idle_seconds(&base), 3600);
        assert_eq!(TableLimits::of(&base).unknown_seconds, 60);
    }

    #[test]
    fn documents_are_checked() {
        assert!(parse_document(b"[]", "demo").is_err());
        assert!(parse_document(br#"{"project":"demo","recipients":[]}"#, "demo").is_err());
        assert!(parse_document(br#"{"project":"demo"}"#, "demo").is_err());
    }
}
