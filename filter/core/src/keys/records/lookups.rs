//! Key-service lookups driven by the host's events: the timer's refresh of the projects in use
//! (one worker per period, [`Lease::TIMER`]), and the lookup a stream runs for a project without
//! a usable record. Whoever finishes a lookup publishes its result to every worker.
use crate::config::{Config, KeyServiceConfig};
use crate::error::{Code, OciError};
use crate::format::recipients::Recipient;
use crate::keys::keyservice::{
    self, KeyRecord, Lookup, Next, Request, TableLimits, TrustedMetadata,
};
use crate::store::Store;
use crate::tuf::MetadataCache;

use super::shared::{self, last_failure, read_table, Lease};
use super::{unavailable, KeyCommand, KeyLevel, KeyMetric, KeyWorker, Resolution, RECENT_ANSWERS};

/// Who a lookup runs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// The timer, having taken its lease: a full refresh of the projects in use.
    Timer,
    /// A request that found no usable record.
    Request,
}

/// A lookup in flight.
pub(super) struct KeyLookup {
    lookup: Lookup,
    purpose: Purpose,
}

/// What a lookup needs next.
enum Step {
    /// Fetch this from the key service.
    Fetch(Request),
    /// Finished and published.
    Done,
}

/// Where a stream stands with a project's recipients.
#[derive(Debug)]
pub enum KeyStep {
    /// Encrypt to these.
    Ready(Vec<Recipient>),
    /// Fetch this for the stream's lookup: its answer goes to
    /// [`KeyWorker::on_stream_answer`], and so does a fetch the host cannot dispatch (as no
    /// answer, status 0).
    Fetch(Request),
}

/// A stream's part in the key lookups: one lookup per request at most (after it, the record
/// decides).
#[derive(Default)]
pub struct StreamLookup {
    /// Whether this request already ran a lookup.
    looked_up: bool,
    /// The lookup the paused request waits for.
    lookup: Option<KeyLookup>,
}

impl StreamLookup {
    /// Whether the request waits for a lookup's fetch.
    pub fn waiting(&self) -> bool {
        self.lookup.is_some()
    }
}

impl KeyWorker {
    /// The timer ticked: unless this worker's refresh is still in flight, prunes the table of
    /// what expired and, when projects are in use and no other worker refreshed this period,
    /// starts a full refresh of them. The fetch to dispatch, if any.
    pub fn on_tick(
        &mut self,
        ks: &KeyServiceConfig,
        store: &dyn Store,
        now: i64,
    ) -> Option<Request> {
        if self.timer.is_some() {
            return None;
        }
        self.limits = TableLimits::of(ks);
        let projects = self.projects(store, now);
        let period = i64::try_from(ks.refresh_seconds).unwrap_or(i64::MAX);
        // Every worker ticks; one per period refreshes, and publishes for all.
        if projects.is_empty() || !Lease::TIMER.take(store, now, period.saturating_sub(1).max(1)) {
            return None;
        }
        let (lookup, step) = self.start(ks, store, Purpose::Timer, projects, now);
        self.hold_timer(lookup, step)
    }

    /// The answer to the timer's fetch (`status` 0: none came, or the fetch could not be
    /// dispatched). The next fetch to dispatch, if any.
    pub fn on_timer_answer(
        &mut self,
        store: &dyn Store,
        status: u16,
        body: &[u8],
        now: i64,
    ) -> Option<Request> {
        let mut lookup = self.timer.take()?;
        let step = self.answer(store, &mut lookup, status, body, now);
        self.hold_timer(lookup, step)
    }

    /// Whether the timer's refresh waits for a fetch.
    pub fn timer_waiting(&self) -> bool {
        self.timer.is_some()
    }

    fn hold_timer(&mut self, lookup: KeyLookup, step: Step) -> Option<Request> {
        match step {
            Step::Fetch(req) => {
                self.timer = Some(lookup);
                Some(req)
            }
            Step::Done => None,
        }
    }

    /// The recipients of `project` for a stream ([`KeyWorker::resolve`]), starting the stream's
    /// lookup when it needs one.
    pub fn recipients(
        &mut self,
        config: &Config,
        store: &dyn Store,
        project: &str,
        now: i64,
        stream: &mut StreamLookup,
    ) -> Result<KeyStep, OciError> {
        // Twice at most: after its lookup, a request is answered from the result.
        for _ in 0..2 {
            match self.resolve(config, store, project, now, stream.looked_up)? {
                Resolution::Ready(r) => return Ok(KeyStep::Ready(r)),
                Resolution::LookUp => {
                    let Some(ks) = &config.key_service else {
                        return Err(OciError::new(
                            Code::Unknown,
                            "key lookup without a key service",
                        ));
                    };
                    stream.looked_up = true;
                    let projects = vec![project.to_string()];
                    let (lookup, step) = self.start(ks, store, Purpose::Request, projects, now);
                    if let Step::Fetch(req) = step {
                        stream.lookup = Some(lookup);
                        return Ok(KeyStep::Fetch(req));
                    }
                }
            }
        }
        Err(unavailable(
            project,
            "the key service lookup gave no answer",
        ))
    }

    /// The answer to the stream lookup's fetch (`status` 0: none came). The next fetch to
    /// dispatch; `None` when the lookup is over (published): ask for the recipients again.
    pub fn on_stream_answer(
        &mut self,
        config: &Config,
        store: &dyn Store,
        stream: &mut StreamLookup,
        status: u16,
        body: &[u8],
        now: i64,
    ) -> Option<Request> {
        let mut lookup = stream.lookup.take()?;
        // The configuration lost its key service meanwhile: the lookup is dropped.
        config.key_service.as_ref()?;
        match self.answer(store, &mut lookup, status, body, now) {
            Step::Fetch(req) => {
                stream.lookup = Some(lookup);
                Some(req)
            }
            Step::Done => None,
        }
    }

    /// Starts a lookup of `projects`. The timer's (it took its lease just before) is a full
    /// refresh. A request's starts from the metadata a full refresh verified lately when there
    /// is one ([`keyservice::reuse_seconds`]); otherwise it refreshes in full, unless another
    /// request is doing so already and metadata younger than `max_age_seconds` exists, which it
    /// then starts from (records count their age from that refresh, never from now).
    fn start(
        &mut self,
        ks: &KeyServiceConfig,
        store: &dyn Store,
        purpose: Purpose,
        projects: Vec<String>,
        now: i64,
    ) -> (KeyLookup, Step) {
        self.limits = TableLimits::of(ks);
        let shared = shared::metadata(store);
        // A full refresh that failed since the metadata was verified (the key service down, or
        // serving what does not verify) is not ignored: the next lookup refreshes in full again.
        let failed_since =
            |m: &TrustedMetadata| last_failure(store).is_some_and(|(at, _)| at >= m.verified_at);
        if purpose == Purpose::Request {
            if let Some(meta) = shared.as_ref().filter(|m| !failed_since(m)) {
                let age = now.saturating_sub(meta.verified_at);
                let max_age = i64::try_from(ks.max_age_seconds).unwrap_or(i64::MAX);
                let recent =
                    meta.verified_at > 0 && (0..keyservice::reuse_seconds(ks)).contains(&age);
                let usable = meta.verified_at > 0 && (0..max_age).contains(&age);
                // Without anything usable to start from, this request refreshes in full (and so
                // do concurrent ones: bounded by the requests in flight, and after a failure
                // every lookup is answered from it for a while).
                if recent || (usable && !take_refresh_lease(ks, store, now)) {
                    if let Some((lookup, next)) = self.resume(ks, meta, projects.clone(), now) {
                        self.count(KeyMetric::Resumed);
                        return self.begin(store, lookup, purpose, next, now);
                    }
                }
            }
            // This request refreshes in full: others wait for it while the key service fails.
            let _ = take_refresh_lease(ks, store, now);
        }
        let cache = shared.map_or_else(|| MetadataCache::new(ks.trusted_root.clone()), |m| m.cache);
        let (lookup, next) = Lookup::start(ks, cache, projects, now);
        self.begin(store, lookup, purpose, next, now)
    }

    fn resume(
        &self,
        ks: &KeyServiceConfig,
        meta: &TrustedMetadata,
        projects: Vec<String>,
        now: i64,
    ) -> Option<(Lookup, Next)> {
        let stamp = meta.stamp();
        let kept = self
            .verified
            .as_ref()
            .filter(|(s, _)| *s == stamp)
            .map(|(_, u)| u.clone());
        match kept {
            Some(updater) => {
                Lookup::resume_verified(ks, updater, meta.verified_at, projects.clone(), now)
                    .or_else(|| {
                        Lookup::resume(ks, meta.cache.clone(), meta.verified_at, projects, now)
                    })
            }
            None => Lookup::resume(ks, meta.cache.clone(), meta.verified_at, projects, now),
        }
    }

    fn answer(
        &mut self,
        store: &dyn Store,
        lookup: &mut KeyLookup,
        status: u16,
        body: &[u8],
        now: i64,
    ) -> Step {
        let next = lookup.lookup.on_response(status, body);
        self.drive(store, lookup, next, now)
    }

    /// A fetch to make (counted as sent: the host dispatches it now), or the lookup finished:
    /// the verified set kept for resuming, the result logged, counted and published.
    fn drive(&mut self, store: &dyn Store, lookup: &mut KeyLookup, next: Next, now: i64) -> Step {
        match next {
            Next::Fetch(req) => {
                self.count(KeyMetric::Fetch);
                Step::Fetch(req)
            }
            Next::Done { records, metadata } => {
                if let (Some(meta), Some(updater)) = (&metadata, lookup.lookup.verified_updater()) {
                    self.verified = Some((meta.stamp(), updater.clone()));
                }
                self.report(lookup.purpose, &records, metadata.as_ref());
                let full_refresh = !lookup.lookup.resumed();
                self.publish(store, &records, metadata, full_refresh, now);
                Step::Done
            }
        }
    }

    /// Starts `lookup` where `next` says.
    fn begin(
        &mut self,
        store: &dyn Store,
        lookup: Lookup,
        purpose: Purpose,
        next: Next,
        now: i64,
    ) -> (KeyLookup, Step) {
        let mut lookup = KeyLookup { lookup, purpose };
        let step = self.drive(store, &mut lookup, next, now);
        (lookup, step)
    }

    /// Log lines and metrics of a finished lookup: per project a success or a failure, and the
    /// versions of the metadata it verified.
    fn report(
        &mut self,
        purpose: Purpose,
        records: &[(String, KeyRecord)],
        metadata: Option<&TrustedMetadata>,
    ) {
        for (project, record) in records {
            let line = match (purpose, &record.error) {
                (Purpose::Timer, Some(e)) => Some((
                    KeyLevel::Warn,
                    format!("key service refresh: project {project}: {e}"),
                )),
                (Purpose::Timer, None) => Some((
                    KeyLevel::Info,
                    format!(
                        "key service refresh: project {project}: verified ({:?})",
                        record.versions
                    ),
                )),
                (Purpose::Request, Some(e)) => Some((
                    KeyLevel::Warn,
                    format!("key service: project {project}: {e}"),
                )),
                (Purpose::Request, None) => None,
            };
            if let Some((level, line)) = line {
                self.commands.push(KeyCommand::Log(level, line));
            }
        }
        for (_, record) in records {
            self.count(KeyMetric::ProjectLookup);
            if record.error.is_some() {
                self.count(KeyMetric::ProjectFailure);
            }
            if metadata.is_some() {
                for (role, version) in &record.versions {
                    self.count(KeyMetric::TufVersion(role.clone(), *version));
                }
            }
        }
    }

    /// Publishes a finished lookup: records for every worker (only for projects the key
    /// service has, or had: a project it does not know gets no store key), the table's lines,
    /// and the newer trusted metadata; a failed refresh is remembered for every lookup.
    fn publish(
        &mut self,
        store: &dyn Store,
        records: &[(String, KeyRecord)],
        metadata: Option<TrustedMetadata>,
        full_refresh: bool,
        now: i64,
    ) {
        if full_refresh {
            // The request-path refresh lease is for a refresh in flight: this one is over.
            Lease::REFRESHING.release(store);
        }
        match metadata {
            Some(new) => {
                // Newer metadata, a later full refresh, or the same with delegated roles added
                // (a resumed lookup that loaded them); not the same bytes again.
                let current = shared::metadata(store);
                if current.is_none_or(|c| new.supersedes(&c) && new != c) {
                    let _ = store.set(keyservice::METADATA_KEY, &new.to_bytes());
                }
                if last_failure(store).is_some_and(|(at, _)| at <= new.verified_at) {
                    shared::clear_failure(store);
                }
            }
            None => {
                // The refresh itself failed (key service down, metadata that does not verify):
                // every project would fail the same way for a while.
                if let Some(reason) = records.iter().find_map(|(_, r)| r.error.clone()) {
                    shared::record_failure(store, now, &reason);
                }
            }
        }
        for (project, record) in records {
            // A failure overwrites a record that exists (its keys must stop being used at
            // once); a project without one keeps its answer in the table only. Never a record
            // from a later refresh with one from an earlier (a lookup that started from older
            // metadata and finished after the timer's refresh: a rotation must not be undone).
            let existing = shared::record(store, project);
            let newer_there = existing
                .as_ref()
                .and_then(Option::as_ref)
                .is_some_and(|e| e.checked_at > record.checked_at);
            if (record.error.is_none() || existing.is_some()) && !newer_there {
                let _ = store.set(&keyservice::record_key(project), &record.to_bytes());
            }
            if self.recent.len() >= RECENT_ANSWERS {
                self.recent.pop_front();
            }
            self.recent.push_back((project.clone(), record.clone()));
        }
        if records.is_empty() {
            return;
        }
        let limits = self.limits;
        let written = shared::update_table(store, |table| {
            let mut changed = false;
            for (project, record) in records {
                changed |= table.record(project, record, now, &limits);
            }
            changed
        });
        if let Some(len) = written {
            self.remembered(len);
        }
    }

    /// Projects the timer refreshes: the known ones in use. Prunes the table of what expired.
    fn projects(&mut self, store: &dyn Store, now: i64) -> Vec<String> {
        let limits = self.limits;
        let mut pruned = read_table(store);
        if pruned.prune(now, &limits) > 0 {
            if let Some(len) = shared::update_table(store, |t| t.prune(now, &limits) > 0) {
                self.remembered(len);
            }
        }
        self.remembered(pruned.len());
        pruned.refresh_list(now, &limits)
    }
}

/// Takes the request-path refresh lease (one full refresh at a time per Envoy) for about as
/// long as a full refresh may take.
fn take_refresh_lease(ks: &KeyServiceConfig, store: &dyn Store, now: i64) -> bool {
    let secs = i64::try_from(ks.timeout_ms.saturating_mul(4) / 1000)
        .unwrap_or(i64::MAX)
        .clamp(1, 30);
    Lease::REFRESHING.take(store, now, secs)
}
