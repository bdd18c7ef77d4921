//! What one worker of the gateway keeps between streams, as a machine driven by the host's
//! worker-level events: the configuration, the key records' memory ([`KeyWorker`]) and the
//! timer's key-service refresh, the keystream prefetch ([`prefetch::Worker`]), the manifest
//! budget and the sweep of idle upload records. Streams borrow it for each of their events
//! ([`Plugin::on_stream_event`]), which lends them an [`Env`].
//!
//! A host whose streams run on several threads at once over one configuration (the native
//! module) cannot lend one `Plugin` per event without serializing them: it keeps the parts
//! itself — the [`Config`] from [`configure`], the [`KeyWorker`] behind a lock that
//! [`super::WorkerKeys`] borrows per call, and the [`Timer`] for ticks and the refresh's
//! callouts — and gets the same commands.
//!
//! | event | method | answers |
//! | --- | --- | --- |
//! | the plugin configuration (bytes; the VM's environment for secrets) | [`Plugin::on_configure`] | the timer period, a log line; or the reason to refuse it |
//! | the timer ticks | [`Plugin::on_tick`] | helper heartbeat, sweep, the key-service refresh's fetch |
//! | a callout the plugin dispatched is answered / could not be dispatched | [`Plugin::on_callout`] / [`Plugin::on_dispatch_failed`] | the refresh's next fetch |
//! | a shared queue has items | [`Plugin::on_queue_ready`] | the prefetch's metrics |
//! | a stream starts / has an event / ends | [`Plugin::on_stream_start`] / [`Plugin::on_stream_event`] / [`Plugin::on_stream_end`] | the stream's commands |
use std::cell::Cell;
use std::time::Duration;

use rand_core::CryptoRngCore;

use crate::config::Config;
use crate::distribution::upload_table;
use crate::error::{Code, OciError};
use crate::gateway::prefetch::{self, Keystream, SharedQueues};
use crate::keys::keyservice::Request;
use crate::keys::records::{KeyCommand, KeyLevel, KeyWorker};
use crate::store::Store;

use super::{
    fetch_status, key_fetch, Callout, CalloutAnswer, CalloutId, Command, Env, Level, Metric,
    Stream, WorkerKeys,
};

/// Prefix of the plugin's own log lines (a stream's carry its id: [`stream_line`]).
pub const PREFIX: &str = "ocicrypt-filter: ";

/// Upload-record slots one tick sweeps (a store read each, a write where records went idle):
/// with ticks every 2 s, all of them in about half a minute.
pub const SWEEP_PER_TICK: u32 = 256;

/// What the host does for the plugin, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginCommand {
    /// Sets the timer's period; a host that cannot refuses the configuration
    /// ([`NO_TIMER`]): without ticks, keys would never be refreshed.
    SetTickPeriod(Duration),
    /// Dispatches a callout (the key-service refresh's fetch); its answer goes to
    /// [`Plugin::on_callout`], a failure to dispatch to [`Plugin::on_dispatch_failed`].
    Dispatch(Callout),
    /// Counts a metric.
    Metric(Metric),
    /// Logs a whole line.
    Log(Level, String),
}

/// The line a host logs (at its most severe level) when it cannot set the timer.
pub const NO_TIMER: &str = "ocicrypt-filter: cannot set the key-service refresh timer";

/// What the host lends the plugin for one event.
pub struct Host<'a> {
    /// State shared by the workers.
    pub store: &'a dyn Store,
    /// The host's shared queues (keystream prefetch).
    pub queues: &'a mut dyn SharedQueues,
    /// Randomness.
    pub rng: &'a mut dyn CryptoRngCore,
    /// Unix seconds.
    pub now: u64,
}

/// One worker's gateway state.
#[derive(Default)]
pub struct Plugin {
    config: Option<Config>,
    keys: KeyWorker,
    prefetch: prefetch::Worker,
    /// Manifest bytes the worker's streams hold right now.
    held_manifest_bytes: Cell<usize>,
    timer: Timer,
}

/// What the timer drives beside the keystream prefetch: the sweep of idle upload records and
/// the key-service refresh, whose fetches are callouts of the timer's own.
#[derive(Default)]
pub struct Timer {
    /// The last upload-record slot swept.
    sweep_cursor: u32,
    /// The refresh's fetch in flight.
    refresh: Option<CalloutId>,
    next_callout: u32,
}

/// A stream's log line as the host logs it.
pub fn stream_line(stream: u64, line: &str) -> String {
    format!("[ocicrypt #{stream}] {line}")
}

/// The refusal of a stream event when the worker's state is in use (no host runs one event
/// inside another, so never: it fails closed all the same).
pub fn busy() -> OciError {
    OciError::new(Code::Unknown, "the worker's gateway state is in use")
}

/// The timer's period: the key-service refresh, and at most the prefetch heartbeat (an idle
/// worker must list itself as a helper), never under a second.
pub fn tick_period(config: &Config) -> Duration {
    let heartbeat = prefetch::HEARTBEAT_SECS;
    let seconds = config
        .key_service
        .as_ref()
        .map_or(heartbeat, |ks| ks.refresh_seconds.min(heartbeat));
    Duration::from_secs(seconds.max(1))
}

/// Reads the plugin configuration (`None`: the host has none to give); `env` answers the
/// environment's variables (secrets never sit in the configuration a host dumps). `Err` is the
/// line to log, at the host's most severe level, when it is refused; with the configuration
/// come the commands a host carries out: the line saying so, the timer's period.
pub fn configure(
    bytes: Option<&[u8]>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<PluginCommand>), String> {
    let Some(bytes) = bytes else {
        return Err(format!(
            "{PREFIX}no plugin configuration; refusing to start"
        ));
    };
    let config = Config::parse_with_env(bytes, env)
        .map_err(|e| format!("{PREFIX}invalid configuration: {e}"))?;
    let commands = vec![
        PluginCommand::Log(Level::Info, format!("{PREFIX}configuration loaded")),
        PluginCommand::SetTickPeriod(tick_period(&config)),
    ];
    Ok((config, commands))
}

fn signed(now: u64) -> i64 {
    i64::try_from(now).unwrap_or(i64::MAX)
}

fn level(level: KeyLevel) -> Level {
    match level {
        KeyLevel::Info => Level::Info,
        KeyLevel::Warn => Level::Warn,
    }
}

impl Plugin {
    /// A worker before its configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// The configuration, once one was accepted.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Manifest bytes the worker's streams hold right now.
    pub fn held_manifest_bytes(&self) -> usize {
        self.held_manifest_bytes.get()
    }

    /// The plugin configuration arrived ([`configure`]).
    pub fn on_configure(
        &mut self,
        bytes: Option<&[u8]>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<PluginCommand>, String> {
        let (config, commands) = configure(bytes, env)?;
        self.prefetch.set_budget(config.keystream_prefetch_bytes);
        self.config = Some(config);
        Ok(commands)
    }

    /// The timer ticked: this worker's helper line renewed, a share of the idle upload records
    /// dropped (without replicas they live in the store), and the key-service refresh started
    /// when it is this worker's turn.
    pub fn on_tick(&mut self, host: Host<'_>) -> Vec<PluginCommand> {
        let mut out = Vec::new();
        if let Some(warning) = self
            .prefetch
            .on_tick(host.now, host.store, host.queues, host.rng)
        {
            out.push(PluginCommand::Log(Level::Warn, warning.to_string()));
        }
        if let Some(config) = &self.config {
            out.extend(
                self.timer
                    .on_tick(config, &mut self.keys, host.store, host.now),
            );
        }
        out
    }

    /// The answer to a callout the plugin dispatched (one it no longer waits for is dropped).
    pub fn on_callout(
        &mut self,
        id: CalloutId,
        answer: &CalloutAnswer,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        let config = self.config.as_ref();
        self.timer
            .on_callout(id, answer, config, &mut self.keys, store, now)
    }

    /// A callout the plugin asked for could not be dispatched, or its answer cannot be read:
    /// the refresh counts it as unanswered.
    pub fn on_dispatch_failed(
        &mut self,
        id: CalloutId,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        let config = self.config.as_ref();
        self.timer
            .on_dispatch_failed(id, config, &mut self.keys, store, now)
    }

    /// A shared queue of this worker has items (keystream requests or segments).
    pub fn on_queue_ready(
        &mut self,
        queue: u32,
        queues: &mut dyn SharedQueues,
    ) -> Vec<PluginCommand> {
        self.prefetch.on_queue_ready(queue, queues);
        let report = self.prefetch.report();
        if report == prefetch::Report::default() {
            return Vec::new();
        }
        vec![PluginCommand::Metric(Metric::Keystream(report))]
    }

    /// A stream starts on this worker (so it is a worker: it may help others prefetch).
    pub fn on_stream_start(&mut self, host: Host<'_>) -> Vec<PluginCommand> {
        self.prefetch
            .on_stream(host.now, host.store, host.queues, host.rng)
            .map(|w| PluginCommand::Log(Level::Warn, w.to_string()))
            .into_iter()
            .collect()
    }

    /// Feeds `stream` one event with the worker's [`Env`]; without a configuration the request
    /// is refused. The key records' metrics and log lines of the event come first.
    pub fn on_stream_event(
        &mut self,
        stream: &mut Stream,
        host: Host<'_>,
        event: impl FnOnce(&mut Stream, &mut Env) -> Vec<Command>,
    ) -> Vec<Command> {
        let Some(config) = &self.config else {
            return stream.refuse(OciError::new(
                Code::Unavailable,
                "the gateway has no valid configuration",
            ));
        };
        let mut keys = WorkerKeys {
            worker: &mut self.keys,
            config,
            store: host.store,
            now: signed(host.now),
        };
        let mut env = Env {
            config,
            store: host.store,
            keys: &mut keys,
            held_manifest_bytes: &self.held_manifest_bytes,
            now: host.now,
            rng: host.rng,
            keystream: Some(Keystream {
                worker: &mut self.prefetch,
                queues: host.queues,
            }),
            hashing: None,
        };
        let out = event(stream, &mut env);
        let mut all: Vec<Command> = self
            .keys
            .take_commands()
            .into_iter()
            .map(|c| match c {
                KeyCommand::Metric(m) => Command::Metric(Metric::Key(m)),
                KeyCommand::Log(l, line) => Command::Log(level(l), line),
            })
            .collect();
        all.extend(out);
        all
    }

    /// `stream` ends: its prefetch job, session claim and manifest budget are given back.
    pub fn on_stream_end(&mut self, stream: &mut Stream, store: &dyn Store) -> Vec<Command> {
        let report = stream.end_keystream(&mut self.prefetch);
        stream.on_end(store, &self.held_manifest_bytes);
        if report == prefetch::Report::default() {
            return Vec::new();
        }
        vec![Command::Metric(Metric::Keystream(report))]
    }
}

impl Timer {
    /// The timer ticked: a share of the idle upload records dropped (without replicas they
    /// live in the store), and the key-service refresh started when it is this worker's turn
    /// (one worker per period, [`KeyWorker::on_tick`]).
    pub fn on_tick(
        &mut self,
        config: &Config,
        keys: &mut KeyWorker,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        let mut out = Vec::new();
        if config.state_key.is_none() {
            out.extend(self.sweep(store, now, config.upload_idle_seconds));
        }
        if let Some(ks) = &config.key_service {
            let fetch = keys.on_tick(ks, store, signed(now));
            out.extend(self.refresh_fetch(fetch, Some(config), keys, store, now));
        }
        out
    }

    /// Drops the idle records of the next [`SWEEP_PER_TICK`] slots.
    fn sweep(&mut self, store: &dyn Store, now: u64, idle_seconds: u64) -> Vec<PluginCommand> {
        let mut out = Vec::new();
        for _ in 0..SWEEP_PER_TICK {
            self.sweep_cursor = (self.sweep_cursor + 1) % upload_table::SLOTS;
            let key = upload_table::slot_key_of(self.sweep_cursor);
            let Some((Some(value), cas)) = store.get_cas(&key) else {
                continue;
            };
            let Some((next, gone)) = upload_table::sweep(&value, now, idle_seconds) else {
                continue;
            };
            // Lost to a concurrent write: that write dropped the idle records itself.
            if store.set_cas(&key, &next, cas) && gone > 0 {
                let gone = i64::try_from(gone).unwrap_or(i64::MAX);
                out.push(PluginCommand::Metric(Metric::UploadState(-gone)));
            }
        }
        out
    }

    /// The answer to a callout the timer dispatched (one it no longer waits for is dropped).
    pub fn on_callout(
        &mut self,
        id: CalloutId,
        answer: &CalloutAnswer,
        config: Option<&Config>,
        keys: &mut KeyWorker,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        let status = fetch_status(answer);
        self.refresh_answer(id, status, &answer.body, config, keys, store, now)
    }

    /// A callout the timer asked for could not be dispatched, or its answer cannot be read:
    /// the refresh counts it as unanswered.
    pub fn on_dispatch_failed(
        &mut self,
        id: CalloutId,
        config: Option<&Config>,
        keys: &mut KeyWorker,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        self.refresh_answer(id, 0, &[], config, keys, store, now)
    }

    #[allow(clippy::too_many_arguments)] // the answer's parts and what it is lent
    fn refresh_answer(
        &mut self,
        id: CalloutId,
        status: u16,
        body: &[u8],
        config: Option<&Config>,
        keys: &mut KeyWorker,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        if self.refresh != Some(id) {
            return Vec::new();
        }
        self.refresh = None;
        let next = keys.on_timer_answer(store, status, body, signed(now));
        self.refresh_fetch(next, config, keys, store, now)
    }

    /// The refresh's next fetch as a callout, after what the key records asked for. Without a
    /// key service to send it to, the fetch goes back unanswered.
    fn refresh_fetch(
        &mut self,
        mut fetch: Option<Request>,
        config: Option<&Config>,
        keys: &mut KeyWorker,
        store: &dyn Store,
        now: u64,
    ) -> Vec<PluginCommand> {
        let mut out = Vec::new();
        while let Some(req) = fetch.take() {
            if let Some(ks) = config.and_then(|c| c.key_service.as_ref()) {
                self.next_callout = self.next_callout.wrapping_add(1);
                let id = CalloutId(self.next_callout);
                self.refresh = Some(id);
                out.push(PluginCommand::Dispatch(key_fetch(ks, id, &req)));
                break;
            }
            fetch = keys.on_timer_answer(store, 0, &[], signed(now));
        }
        let mut all: Vec<PluginCommand> = keys
            .take_commands()
            .into_iter()
            .map(|c| match c {
                KeyCommand::Metric(m) => PluginCommand::Metric(Metric::Key(m)),
                KeyCommand::Log(l, line) => PluginCommand::Log(level(l), format!("{PREFIX}{line}")),
            })
            .collect();
        all.extend(out);
        all
    }
}
