//! Recipient keys shared by the workers of one Envoy: the verified records of each project in
//! the [`Store`] (Envoy's shared data), which of them a push may use now, and the key-service
//! lookups that renew them, driven by the host's events (a tick, a callout's answer, a stream
//! that needs a project's keys). The host dispatches the fetches a lookup asks for and carries
//! out the [`KeyCommand`]s (metrics, log lines) this answers; time is passed in.
//!
//! What a flood of requests naming projects costs is bounded (issue 13):
//! - the projects the gateway remembers live in one [`ProjectTable`] (at most
//!   `key_service.max_projects` lines): the timer refreshes only the known projects used
//!   lately; a verified "no such project" and other failures are answered from it for a while,
//!   without a lookup; a project the key service does not have never gets a store key of its
//!   own (Envoy cannot delete keys);
//! - a lookup made for a request starts from the metadata a full refresh verified lately
//!   ([`keyservice::reuse_seconds`]), fetching only the project's target (nothing at all for a
//!   project no role lists); at most one request-path full refresh runs at a time per Envoy
//!   (the [`Lease::REFRESHING`] lease), and after a failed one every lookup is answered from the
//!   failure for [`keyservice::RETRY_AFTER_FAILURE_SECS`];
//! - each worker keeps the verified metadata set it last used ([`KeyWorker`]), so that resuming
//!   does not verify every signature again.
mod lookups;
mod shared;

use std::collections::{BTreeMap, VecDeque};

use crate::config::{self, Config};
use crate::error::{Code, OciError};
use crate::format::recipients::Recipient;
use crate::keys::keyservice::{self, KeyRecord, TableLimits};
use crate::store::Store;
use crate::tuf::Updater;

use lookups::KeyLookup;
pub use lookups::{KeyStep, StreamLookup};
pub use shared::{last_failure, read_table, Lease, FAILURE_KEY, TABLE_KEY};

/// Answers a worker keeps for the requests that waited for its lookups.
pub const RECENT_ANSWERS: usize = 64;
/// Projects a worker remembers having marked used lately (saves reading the table per push).
pub const TOUCHED_MEMO: usize = 256;

/// Log levels of the key lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLevel {
    /// A project verified.
    Info,
    /// A project's lookup failed.
    Warn,
}

/// Metrics of the key records and lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyMetric {
    /// Gauge: projects in the shared table.
    Remembered(u64),
    /// A fetch sent to the key service (timer and requests).
    Fetch,
    /// A request refused from a remembered answer, without a lookup.
    FromMemory,
    /// A request-path lookup started from recently verified metadata.
    Resumed,
    /// A project looked up (one per project of a finished lookup).
    ProjectLookup,
    /// A project whose lookup failed.
    ProjectFailure,
    /// Gauge: the version of a TUF role (`root`, `timestamp`, …) a refresh verified.
    TufVersion(String, u64),
}

/// What the host does for the key records, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyCommand {
    /// Counts or sets a metric.
    Metric(KeyMetric),
    /// Logs a line (the host prefixes who drove the lookup: the timer or a stream).
    Log(KeyLevel, String),
}

/// What a stream can do about a project's recipients right now.
#[derive(Debug)]
pub enum Resolution {
    /// Encrypt to these.
    Ready(Vec<Recipient>),
    /// Run a lookup for the project, then ask again.
    LookUp,
}

/// [`crate::keys::keyservice::TrustedMetadata::stamp`]: root and timestamp versions, time of the
/// full refresh.
type Stamp = (u64, u64, i64);

/// What one worker keeps of the keys between events, beside the shared store.
pub struct KeyWorker {
    /// The verified metadata set this worker last used, by its stamp.
    verified: Option<(Stamp, Updater)>,
    /// Results of this worker's lookups, newest last: the request that waited for a lookup
    /// reads its answer here even when the shared table could not take it.
    recent: VecDeque<(String, KeyRecord)>,
    /// Projects this worker marked used in the table, with when.
    touched: BTreeMap<String, i64>,
    /// The table's limits from the configuration last seen. A worker that has seen none yet
    /// prunes with the default idle time (it differs only for `refresh_seconds` above 360).
    limits: TableLimits,
    /// The timer's refresh in flight.
    timer: Option<KeyLookup>,
    commands: Vec<KeyCommand>,
}

impl Default for KeyWorker {
    fn default() -> Self {
        KeyWorker {
            verified: None,
            recent: VecDeque::new(),
            touched: BTreeMap::new(),
            limits: TableLimits {
                max_projects: config::DEFAULT_MAX_PROJECTS,
                unknown_seconds: 60,
                failure_seconds: keyservice::RETRY_AFTER_FAILURE_SECS,
                idle_seconds: 3600,
            },
            timer: None,
            commands: Vec::new(),
        }
    }
}

/// The refusal when a project has no usable recipients.
pub fn unavailable(project: &str, reason: &str) -> OciError {
    OciError::new(
        Code::Unavailable,
        format!(
            "no verified recipient keys for project {project:?}: {reason}; nothing was stored. \
             Retry later, or ask the key-service owners to publish the project's recipients"
        ),
    )
}

impl KeyWorker {
    /// A worker that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The commands the last events asked for, oldest first; the host carries them out.
    pub fn take_commands(&mut self) -> Vec<KeyCommand> {
        std::mem::take(&mut self.commands)
    }

    fn count(&mut self, metric: KeyMetric) {
        self.commands.push(KeyCommand::Metric(metric));
    }

    fn remembered(&mut self, projects: usize) {
        self.count(KeyMetric::Remembered(
            u64::try_from(projects).unwrap_or(u64::MAX),
        ));
    }

    /// The recipients of `project`: inline ones from the configuration (explicit, untouched by
    /// TUF), else a fresh verified record of the key service. A project the gateway has an
    /// answer for in memory (a verified "no such project", a recent failure) is refused without
    /// a lookup; so is a new project when `key_service.max_projects` projects are in use.
    /// `looked_up`: the request already ran its lookup (never a second one).
    pub fn resolve(
        &mut self,
        config: &Config,
        store: &dyn Store,
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
        self.limits = TableLimits::of(ks);
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
            if let Some(record) = self.recent_answer(project) {
                return match record.usable(project, now, max_age) {
                    Ok(recipients) => Ok(Resolution::Ready(recipients)),
                    Err(reason) => Err(unavailable(project, &reason)),
                };
            }
        }
        let record = store
            .get(&keyservice::record_key(project))
            .and_then(|b| KeyRecord::from_bytes(&b));
        let reason = match record.as_ref().map(|r| r.usable(project, now, max_age)) {
            Some(Ok(recipients)) => {
                self.touch(store, project, now);
                return Ok(Resolution::Ready(recipients));
            }
            Some(Err(reason)) => Some(reason),
            None => None,
        };
        let table = read_table(store);
        if let Some(answer) = table.answer(project, now) {
            self.count(KeyMetric::FromMemory);
            return Err(unavailable(project, &answer));
        }
        if let Some(failure) = shared::recent_failure(store, now) {
            self.count(KeyMetric::FromMemory);
            return Err(unavailable(project, &failure));
        }
        if let Some((_, failure)) = last_failure(store) {
            // The key service failed, and a request is asking it again right now: wait for that
            // one (one full refresh at a time while it fails) instead of piling up.
            if Lease::REFRESHING.held(store, now) {
                self.count(KeyMetric::FromMemory);
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
        if !table.has_room(project, now, &self.limits) {
            return Err(unavailable(
                project,
                &format!(
                    "the gateway already keeps the keys of key_service.max_projects ({}) projects in use; raise the limit",
                    self.limits.max_projects
                ),
            ));
        }
        Ok(Resolution::LookUp)
    }

    /// Marks `project` used (its keys were needed now), at most once a minute per worker.
    fn touch(&mut self, store: &dyn Store, project: &str, now: i64) {
        let fresh = self
            .touched
            .get(project)
            .is_some_and(|at| now.saturating_sub(*at) < keyservice::TOUCH_EVERY_SECS);
        if fresh {
            return;
        }
        let limits = self.limits;
        if let Some(len) = shared::update_table(store, |table| table.touch(project, now, &limits)) {
            self.remembered(len);
        }
        if self.touched.len() >= TOUCHED_MEMO {
            self.touched.clear();
        }
        self.touched.insert(project.to_string(), now);
    }

    fn recent_answer(&self, project: &str) -> Option<KeyRecord> {
        self.recent
            .iter()
            .rev()
            .find(|(p, _)| p == project)
            .map(|(_, rec)| rec.clone())
    }
}
