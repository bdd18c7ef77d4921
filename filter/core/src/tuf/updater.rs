//! A sans-I/O driver of the TUF client workflow (spec §5): it says which file to fetch next,
//! takes the response, verifies it through a [`TrustedMetadataSet`], and ends in a refreshed
//! metadata set, a resolved target, or a verified target file.
//!
//! The host (the proxy-wasm adapter with its callouts, or the conformance CLI with plain HTTP)
//! runs the loop:
//!
//! ```text
//! let mut progress = updater.start_refresh(now)?;
//! while let Progress::Fetch(fetch) = progress {
//!     let (status, body) = host_get(base_url(fetch.base) + &fetch.path, fetch.max_len);
//!     progress = updater.on_response(status, &body)?;
//! }
//! ```
//!
//! What the client trusts between cycles lives in a [`MetadataCache`] of exact received
//! bytes (what a client persists as `root.json`, `timestamp.json`, …). Each refresh starts a
//! new [`TrustedMetadataSet`] from the cached root with a fixed start time, updates root,
//! re-verifies the cached timestamp/snapshot/targets against the new root and fetches only
//! what changed, like python-tuf's `Updater`.

use std::collections::{BTreeMap, BTreeSet};

use super::error::{DownloadError, RepositoryError, TufError};
use super::metadata::{TargetFile, ROOT, SNAPSHOT, TARGETS, TIMESTAMP};
use super::trusted::TrustedMetadataSet;

/// Limits of the client workflow (defaults as python-tuf's `UpdaterConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdaterConfig {
    /// Most root versions fetched in one cycle (spec 5.3.3 "Y").
    pub max_root_rotations: u64,
    /// Most bytes of a root file (5.3.3 "W").
    pub root_max_len: u64,
    /// Most bytes of the timestamp file (5.4.1 "X").
    pub timestamp_max_len: u64,
    /// Most bytes of a snapshot file when timestamp lists no length (5.5.1 "Y").
    pub snapshot_max_len: u64,
    /// Most bytes of a targets file when snapshot lists no length (5.6.1 "Z").
    pub targets_max_len: u64,
    /// Most targets roles visited in one search (5.6.7.1).
    pub max_delegations: usize,
    /// With consistent snapshots, fetch targets as `<hash>.<name>` (§7.1).
    pub prefix_targets_with_hash: bool,
}

impl Default for UpdaterConfig {
    fn default() -> Self {
        UpdaterConfig {
            max_root_rotations: 256,
            root_max_len: 512_000,
            timestamp_max_len: 16_384,
            snapshot_max_len: 2_000_000,
            targets_max_len: 5_000_000,
            max_delegations: 32,
            prefix_targets_with_hash: true,
        }
    }
}

/// Metadata the client trusts, as the exact bytes received: what it persists between update
/// cycles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataCache {
    /// `root.json`: the pinned root at first, then the newest verified root.
    pub root: Vec<u8>,
    /// `timestamp.json`.
    pub timestamp: Option<Vec<u8>>,
    /// `snapshot.json`.
    pub snapshot: Option<Vec<u8>>,
    /// Targets metadata by role name, `targets` included.
    pub targets: BTreeMap<String, Vec<u8>>,
}

impl MetadataCache {
    /// A cache holding only the trusted root (spec §5.2: shipped out of band).
    pub fn new(trusted_root: Vec<u8>) -> MetadataCache {
        MetadataCache {
            root: trusted_root,
            ..MetadataCache::default()
        }
    }

    /// Every cached file as (role name, bytes).
    pub fn files(&self) -> Vec<(&str, &[u8])> {
        let mut out: Vec<(&str, &[u8])> = vec![(ROOT, &self.root)];
        if let Some(t) = &self.timestamp {
            out.push((TIMESTAMP, t));
        }
        if let Some(s) = &self.snapshot {
            out.push((SNAPSHOT, s));
        }
        out.extend(
            self.targets
                .iter()
                .map(|(role, b)| (role.as_str(), b.as_slice())),
        );
        out
    }

    /// Put a persisted file back by role name (`root`, `timestamp`, `snapshot`, any targets
    /// role).
    pub fn insert(&mut self, role: &str, bytes: Vec<u8>) {
        match role {
            ROOT => self.root = bytes,
            TIMESTAMP => self.timestamp = Some(bytes),
            SNAPSHOT => self.snapshot = Some(bytes),
            _ => {
                self.targets.insert(role.to_owned(), bytes);
            }
        }
    }
}

/// Which base URL a fetch is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchBase {
    /// The repository's metadata URL.
    Metadata,
    /// The repository's targets URL.
    Targets,
}

/// A file the updater needs: `GET <base>/<path>`, reading at most `max_len` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// Base URL to resolve `path` against.
    pub base: FetchBase,
    /// Path relative to the base, already percent-encoded.
    pub path: String,
    /// Bytes the body may have; a longer body is an error. A host may stop reading after
    /// `max_len + 1` bytes.
    pub max_len: u64,
    /// `max_len` is the length trusted metadata lists for the file (not a configured limit):
    /// a longer body is then a length mismatch (a repository error), not a download error.
    pub exact_len: bool,
}

/// What a finished job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Top-level metadata is up to date and valid.
    Refreshed,
    /// The target's metadata, from the most trusted role that lists it.
    Resolved(TargetFile),
    /// The target file, verified against its metadata.
    Downloaded {
        /// The target's metadata.
        target: TargetFile,
        /// The verified content.
        bytes: Vec<u8>,
    },
}

/// Where a job stands after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Fetch this file and pass the answer to [`Updater::on_response`].
    Fetch(Fetch),
    /// The job is finished.
    Done(Outcome),
}

#[derive(Clone, Debug)]
struct Walk {
    target_path: String,
    stack: Vec<(String, String)>,
    visited: BTreeSet<String>,
    loading: Option<(String, String)>,
    then_download: bool,
}

#[derive(Clone, Debug)]
enum Job {
    Idle,
    Root { next_version: u64, remaining: u64 },
    Timestamp,
    Snapshot,
    Targets,
    Walk(Walk),
    Download(TargetFile),
}

/// The client workflow as a state machine. One job at a time: a refresh, then target
/// look-ups and downloads against the refreshed metadata.
#[derive(Clone, Debug)]
pub struct Updater {
    config: UpdaterConfig,
    cache: MetadataCache,
    trusted: Option<TrustedMetadataSet>,
    refreshed: bool,
    job: Job,
    pending: Option<Fetch>,
}

/// Percent-encode a role name for a file name or URL, as python-tuf does
/// (`urllib.parse.quote(name, safe="")`): everything but ASCII letters, digits and `_.-~`.
pub fn encode_role_name(role: &str) -> String {
    percent_encode(role, false)
}

/// Undo [`encode_role_name`]; `None` if the escapes are not valid UTF-8.
pub fn decode_role_name(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = encoded.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'_' | b'.' | b'-' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Path of a metadata file relative to the metadata URL: `<version>.<role>.json` when a
/// version is given (root always, other roles under consistent snapshots, §7.1), else
/// `<role>.json`.
pub fn metadata_path(role: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("{v}.{}.json", encode_role_name(role)),
        None => format!("{}.json", encode_role_name(role)),
    }
}

/// Path of a target file relative to the targets URL: with consistent snapshots and
/// `prefix_with_hash`, `<dir>/<hash>.<name>` with the first listed hash (§7.1, 5.7.3).
pub fn target_path(
    target: &TargetFile,
    consistent_snapshot: bool,
    prefix_with_hash: bool,
) -> String {
    let path = match (
        consistent_snapshot && prefix_with_hash,
        target.hashes.first(),
    ) {
        (true, Some((_, hash))) => match target.path.rsplit_once('/') {
            Some((dir, name)) => format!("{dir}/{hash}.{name}"),
            None => format!("{hash}.{}", target.path),
        },
        _ => target.path.clone(),
    };
    percent_encode(&path, true)
}

impl Updater {
    /// An idle updater over `cache` (at least the trusted root).
    pub fn new(cache: MetadataCache, config: UpdaterConfig) -> Updater {
        Updater {
            config,
            cache,
            trusted: None,
            refreshed: false,
            job: Job::Idle,
            pending: None,
        }
    }

    /// The trusted metadata bytes to persist (updated as each file verifies).
    pub fn cache(&self) -> &MetadataCache {
        &self.cache
    }

    /// Consume the updater, keeping the cache.
    pub fn into_cache(self) -> MetadataCache {
        self.cache
    }

    /// The metadata set of the current (or last) update cycle.
    pub fn trusted(&self) -> Option<&TrustedMetadataSet> {
        self.trusted.as_ref()
    }

    /// Whether the last refresh completed: target look-ups are allowed.
    pub fn is_refreshed(&self) -> bool {
        self.refreshed
    }

    /// Whether a job waits for a response.
    pub fn is_busy(&self) -> bool {
        !matches!(self.job, Job::Idle)
    }

    /// The file the current job waits for.
    pub fn next_request(&self) -> Option<&Fetch> {
        self.pending.as_ref()
    }

    fn ensure_idle(&self, operation: &'static str) -> Result<(), TufError> {
        if self.is_busy() {
            return Err(TufError::OutOfOrder {
                operation,
                reason: "another job is running",
            });
        }
        Ok(())
    }

    fn set(&mut self) -> Result<&mut TrustedMetadataSet, TufError> {
        self.trusted.as_mut().ok_or(TufError::OutOfOrder {
            operation: "update",
            reason: "no update cycle started",
        })
    }

    fn fetch(&mut self, job: Job, fetch: Fetch) -> Progress {
        self.job = job;
        self.pending = Some(fetch.clone());
        Progress::Fetch(fetch)
    }

    fn done(&mut self, outcome: Outcome) -> Progress {
        self.job = Job::Idle;
        self.pending = None;
        Progress::Done(outcome)
    }

    fn fail<T>(&mut self, result: Result<T, TufError>) -> Result<T, TufError> {
        if result.is_err() {
            self.job = Job::Idle;
            self.pending = None;
        }
        result
    }

    /// Start an update cycle at `now` (unix seconds), the fixed start time every expiry is
    /// checked against (§5.1).
    pub fn start_refresh(&mut self, now: i64) -> Result<Progress, TufError> {
        self.ensure_idle("start_refresh")?;
        self.refreshed = false;
        self.trusted = None;
        // §5.2
        let set = TrustedMetadataSet::new(&self.cache.root, now)?;
        let next_version = set.root().signed.common.version.saturating_add(1);
        self.trusted = Some(set);
        let result = self.next_root(next_version, self.config.max_root_rotations);
        self.fail(result)
    }

    /// Take the cached metadata as refreshed at `now` without fetching anything, as a client
    /// that completed a refresh a moment ago and looks up more targets against it (python-tuf:
    /// one `refresh()`, then several `get_targetinfo()`). For a host that knows when the cache
    /// was last refreshed in full and decides it is recent enough; the spec's workflow (a new
    /// root, a new timestamp) is [`Updater::start_refresh`].
    ///
    /// Every cached file is verified again (signatures, thresholds, versions, hashes) and must
    /// be valid as *final* at `now` (unexpired, snapshot matching the timestamp, targets
    /// matching the snapshot): otherwise the error, nothing is trusted, and the host refreshes.
    pub fn resume(&mut self, now: i64) -> Result<(), TufError> {
        self.ensure_idle("resume")?;
        self.refreshed = false;
        self.trusted = None;
        let missing = |reason| TufError::OutOfOrder {
            operation: "resume",
            reason,
        };
        let mut set = TrustedMetadataSet::new(&self.cache.root, now)?;
        set.check_final_root()?;
        let timestamp = self
            .cache
            .timestamp
            .as_deref()
            .ok_or(missing("no cached timestamp"))?;
        set.update_timestamp(timestamp)?;
        set.check_final_timestamp()?;
        let snapshot = self
            .cache
            .snapshot
            .as_deref()
            .ok_or(missing("no cached snapshot"))?;
        // Not `from_cache`: the snapshot must be the one the cached timestamp names (hashes
        // included), as at the end of the refresh that left this cache.
        set.update_snapshot(snapshot, false)?;
        set.check_final_snapshot()?;
        let targets = self
            .cache
            .targets
            .get(TARGETS)
            .ok_or(missing("no cached targets"))?;
        set.update_delegated_targets(targets, TARGETS, ROOT)?;
        self.trusted = Some(set);
        self.refreshed = true;
        Ok(())
    }

    /// 5.3.3: try root N+1, unless Y versions were fetched already.
    fn next_root(&mut self, next_version: u64, remaining: u64) -> Result<Progress, TufError> {
        if remaining == 0 {
            return self.after_root();
        }
        let fetch = Fetch {
            base: FetchBase::Metadata,
            path: metadata_path(ROOT, Some(next_version)),
            max_len: self.config.root_max_len,
            exact_len: false,
        };
        Ok(self.fetch(
            Job::Root {
                next_version,
                remaining,
            },
            fetch,
        ))
    }

    fn after_root(&mut self) -> Result<Progress, TufError> {
        let set = self.trusted.as_mut().ok_or(TufError::OutOfOrder {
            operation: "refresh",
            reason: "no update cycle",
        })?;
        // 5.3.11: recover from fast-forward attacks by forgetting timestamp and snapshot.
        if set.timestamp_or_snapshot_keys_rotated() {
            self.cache.timestamp = None;
            self.cache.snapshot = None;
        }
        // 5.3.10
        set.check_final_root()?;
        // Reload the persisted timestamp as the reference for rollback checks; if it no
        // longer verifies it is simply not used.
        if let Some(cached) = &self.cache.timestamp {
            let _ = set.update_timestamp(cached);
        }
        // 5.4.1
        let fetch = Fetch {
            base: FetchBase::Metadata,
            path: metadata_path(TIMESTAMP, None),
            max_len: self.config.timestamp_max_len,
            exact_len: false,
        };
        Ok(self.fetch(Job::Timestamp, fetch))
    }

    fn after_timestamp(&mut self) -> Result<Progress, TufError> {
        let consistent = self.set()?.root().signed.consistent_snapshot;
        let set = self.trusted.as_mut().ok_or(TufError::OutOfOrder {
            operation: "refresh",
            reason: "no update cycle",
        })?;
        set.check_final_timestamp()?;
        // A persisted snapshot that is still valid as final needs no download.
        if let Some(cached) = &self.cache.snapshot {
            if set.update_snapshot(cached, true).is_ok() {
                return self.after_snapshot();
            }
        }
        let meta = set
            .timestamp()
            .map(|t| t.signed.snapshot_meta.clone())
            .ok_or(TufError::OutOfOrder {
                operation: "refresh",
                reason: "timestamp not loaded",
            })?;
        // 5.5.1
        let fetch = Fetch {
            base: FetchBase::Metadata,
            path: metadata_path(SNAPSHOT, consistent.then_some(meta.version)),
            max_len: meta.length.unwrap_or(self.config.snapshot_max_len),
            exact_len: meta.length.is_some(),
        };
        Ok(self.fetch(Job::Snapshot, fetch))
    }

    fn after_snapshot(&mut self) -> Result<Progress, TufError> {
        match self.load_or_fetch(TARGETS, ROOT)? {
            None => {
                self.refreshed = true;
                Ok(self.done(Outcome::Refreshed))
            }
            Some(fetch) => Ok(self.fetch(Job::Targets, fetch)),
        }
    }

    /// Load `role` from the cache if it is still the version snapshot lists, else say what to
    /// download (5.6.1).
    fn load_or_fetch(&mut self, role: &str, delegator: &str) -> Result<Option<Fetch>, TufError> {
        let cached = self.cache.targets.get(role);
        let set = self.trusted.as_mut().ok_or(TufError::OutOfOrder {
            operation: "targets",
            reason: "no update cycle",
        })?;
        if let Some(cached) = cached {
            if set
                .update_delegated_targets(cached, role, delegator)
                .is_ok()
            {
                return Ok(None);
            }
        }
        set.check_final_snapshot()?;
        let consistent = set.root().signed.consistent_snapshot;
        let meta = set
            .snapshot()
            .and_then(|s| s.signed.meta.get(&format!("{role}.json")))
            .ok_or_else(|| RepositoryError::NotInSnapshot {
                role: role.to_owned(),
            })?;
        Ok(Some(Fetch {
            base: FetchBase::Metadata,
            path: metadata_path(role, consistent.then_some(meta.version)),
            max_len: meta.length.unwrap_or(self.config.targets_max_len),
            exact_len: meta.length.is_some(),
        }))
    }

    /// Look up a target's metadata (5.6.7) in the refreshed metadata, fetching delegated
    /// roles as needed.
    pub fn start_resolve(&mut self, target_path: &str) -> Result<Progress, TufError> {
        self.start_walk(target_path, false)
    }

    /// Look up a target and download it, verified (5.6.7, §5.7).
    pub fn start_fetch_target(&mut self, target_path: &str) -> Result<Progress, TufError> {
        self.start_walk(target_path, true)
    }

    fn start_walk(&mut self, target_path: &str, then_download: bool) -> Result<Progress, TufError> {
        self.ensure_idle("target look-up")?;
        if !self.refreshed {
            return Err(TufError::OutOfOrder {
                operation: "target look-up",
                reason: "metadata is not refreshed",
            });
        }
        let walk = Walk {
            target_path: target_path.to_owned(),
            stack: vec![(TARGETS.to_owned(), ROOT.to_owned())],
            visited: BTreeSet::new(),
            loading: None,
            then_download,
        };
        let result = self.walk(walk);
        self.fail(result)
    }

    /// 5.6.7: pre-order depth-first search of the delegation graph.
    fn walk(&mut self, mut walk: Walk) -> Result<Progress, TufError> {
        // 5.6.7.1: stop after a maximum number of roles.
        while walk.visited.len() <= self.config.max_delegations {
            let Some((role, delegator)) = walk.stack.pop() else {
                break;
            };
            // 5.6.7.1: skip visited roles (cycles).
            if walk.visited.contains(&role) {
                continue;
            }
            let loaded = self.set()?.delegated_targets(&role, &delegator)?.is_some();
            if !loaded {
                if let Some(fetch) = self.load_or_fetch(&role, &delegator)? {
                    walk.loading = Some((role, delegator));
                    return Ok(self.fetch(Job::Walk(walk), fetch));
                }
            }
            let targets = self.set()?.targets(&role).map(|t| t.signed.clone()).ok_or(
                TufError::OutOfOrder {
                    operation: "target look-up",
                    reason: "role not loaded",
                },
            )?;
            if let Some(found) = targets.targets.get(&walk.target_path) {
                return self.found(found.clone(), walk.then_download);
            }
            walk.visited.insert(role.clone());
            // 5.6.7.2: children in order of appearance; a terminating one ends backtracking.
            if let Some(delegations) = &targets.delegations {
                let mut children = Vec::new();
                for (child, terminating) in delegations.roles_for_target(&walk.target_path) {
                    children.push((child, role.clone()));
                    if terminating {
                        walk.stack.clear();
                        break;
                    }
                }
                walk.stack.extend(children.into_iter().rev());
            }
        }
        // §5.7.2
        Err(TufError::TargetNotFound {
            path: walk.target_path,
        })
    }

    fn found(&mut self, target: TargetFile, then_download: bool) -> Result<Progress, TufError> {
        if then_download {
            self.download(target)
        } else {
            Ok(self.done(Outcome::Resolved(target)))
        }
    }

    /// Download a target resolved earlier and verify it (§5.7).
    pub fn start_download(&mut self, target: TargetFile) -> Result<Progress, TufError> {
        self.ensure_idle("start_download")?;
        let result = self.download(target);
        self.fail(result)
    }

    fn download(&mut self, target: TargetFile) -> Result<Progress, TufError> {
        let consistent = self.set()?.root().signed.consistent_snapshot;
        let fetch = Fetch {
            base: FetchBase::Targets,
            path: target_path(&target, consistent, self.config.prefix_targets_with_hash),
            max_len: target.length,
            exact_len: true,
        };
        Ok(self.fetch(Job::Download(target), fetch))
    }

    /// Feed the answer to [`Updater::next_request`]: HTTP status (0 for a transport failure)
    /// and body. On an error the job ends; the cache keeps everything verified so far.
    pub fn on_response(&mut self, status: u16, body: &[u8]) -> Result<Progress, TufError> {
        let result = self.handle_response(status, body);
        self.fail(result)
    }

    fn handle_response(&mut self, status: u16, body: &[u8]) -> Result<Progress, TufError> {
        let fetch = self.pending.take().ok_or(TufError::OutOfOrder {
            operation: "on_response",
            reason: "no request is pending",
        })?;
        let job = std::mem::replace(&mut self.job, Job::Idle);
        // 5.3.3: no root N+1 (404, or 403 as some stores answer) ends the root chain.
        if matches!(job, Job::Root { .. }) && (status == 404 || status == 403) {
            return self.after_root();
        }
        if status != 200 {
            return Err(DownloadError::Http {
                path: fetch.path,
                status,
            }
            .into());
        }
        // A body longer than a length trusted metadata lists fails that check below (5.5.2,
        // 5.6.2, 5.7.3); only a configured limit is a download error.
        let got = body.len() as u64;
        if got > fetch.max_len && !fetch.exact_len {
            return Err(DownloadError::TooLarge {
                path: fetch.path,
                max_len: fetch.max_len,
                got,
            }
            .into());
        }
        match job {
            Job::Idle => Err(TufError::OutOfOrder {
                operation: "on_response",
                reason: "no job",
            }),
            Job::Root {
                next_version,
                remaining,
            } => {
                let set = self.set()?;
                set.update_root(body)?;
                let rotated = set.timestamp_or_snapshot_keys_rotated();
                // 5.3.8
                self.cache.root = body.to_vec();
                // 5.3.11 as soon as the rotated root is persisted, so that a later failure in
                // this cycle cannot leave the old timestamp/snapshot next to it.
                if rotated {
                    self.cache.timestamp = None;
                    self.cache.snapshot = None;
                }
                self.next_root(next_version.saturating_add(1), remaining.saturating_sub(1))
            }
            Job::Timestamp => {
                match self.set()?.update_timestamp(body) {
                    // 5.4.5
                    Ok(_) => self.cache.timestamp = Some(body.to_vec()),
                    // 5.4.3.1: same version: keep the trusted timestamp, carry on with it.
                    Err(TufError::Repository(RepositoryError::EqualVersion { .. })) => {}
                    Err(e) => return Err(e),
                }
                self.after_timestamp()
            }
            Job::Snapshot => {
                self.set()?.update_snapshot(body, false)?;
                // 5.5.7
                self.cache.snapshot = Some(body.to_vec());
                self.after_snapshot()
            }
            Job::Targets => {
                self.set()?.update_targets(body)?;
                // 5.6.6
                self.cache.targets.insert(TARGETS.to_owned(), body.to_vec());
                self.refreshed = true;
                Ok(self.done(Outcome::Refreshed))
            }
            Job::Walk(mut walk) => {
                let (role, delegator) = walk.loading.take().ok_or(TufError::OutOfOrder {
                    operation: "on_response",
                    reason: "no role loading",
                })?;
                self.set()?
                    .update_delegated_targets(body, &role, &delegator)?;
                self.cache.targets.insert(role.clone(), body.to_vec());
                walk.stack.push((role, delegator));
                self.walk(walk)
            }
            Job::Download(target) => {
                // 5.7.3
                target.verify(body)?;
                Ok(self.done(Outcome::Downloaded {
                    target,
                    bytes: body.to_vec(),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_encode_like_python_quote() {
        assert_eq!(encode_role_name("../delegatedrole"), "..%2Fdelegatedrole");
        assert_eq!(encode_role_name("?"), "%3F");
        assert_eq!(encode_role_name("#"), "%23");
        assert_eq!(encode_role_name("tribe-a_x.y~"), "tribe-a_x.y~");
        assert_eq!(encode_role_name("é"), "%C3%A9");
        assert_eq!(
            decode_role_name("..%2Fdelegatedrole").as_deref(),
            Some("../delegatedrole")
        );
        assert_eq!(decode_role_name("%C3%A9").as_deref(), Some("é"));
        assert_eq!(decode_role_name("%zz"), None);
    }

    #[test]
    fn paths() {
        assert_eq!(metadata_path("root", Some(3)), "3.root.json");
        assert_eq!(metadata_path("timestamp", None), "timestamp.json");
        assert_eq!(metadata_path("/x", Some(1)), "1.%2Fx.json");
        let t = TargetFile {
            path: "projects/demo file.json".into(),
            length: 1,
            hashes: vec![("sha256".into(), "ab".into())],
            custom: None,
        };
        assert_eq!(target_path(&t, true, true), "projects/ab.demo%20file.json");
        assert_eq!(target_path(&t, false, true), "projects/demo%20file.json");
        let t = TargetFile {
            path: "top".into(),
            ..t
        };
        assert_eq!(target_path(&t, true, true), "ab.top");
    }
}
