//! One filter configuration: the parsed plugin configuration, its metrics, the process's key
//! records, and the timer that drives the key-service refresh and the upload-record sweep.
//!
//! Envoy gives dynamic modules no timer: a thread of the module waits the period and commits
//! an event to the configuration's scheduler, and Envoy runs it on its main thread
//! ([`Module::on_scheduled`]), where the refresh's callouts are sent as configuration callouts.
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use ocicrypt_core::config::Config;
use ocicrypt_core::distribution::upload_table as table;
use ocicrypt_core::keys::keyservice::Request;
use ocicrypt_core::keys::records::{KeyCommand, KeyLevel, KeyWorker};

use crate::ffi::{self, Answer, ConfigHost, LogLevel, Scheduler};
use crate::metrics::Metrics;
use crate::store::STORE;

/// Log prefix of the module's own lines (the timer's).
pub const PREFIX: &str = "ocicrypt-filter: ";

/// The scheduler event of a timer tick.
const TICK: u64 = 1;

/// Slots one tick sweeps (as the wasm build: all of them in about half a minute).
const SWEEP_PER_TICK: u32 = 256;

/// A key-service fetch to send.
pub struct Fetch {
    /// Envoy cluster of the key service.
    pub cluster: String,
    path: String,
    authority: String,
    /// Timeout of one fetch.
    pub timeout_ms: u64,
}

impl Fetch {
    /// The request's headers.
    pub fn headers(&self) -> Vec<(&[u8], &[u8])> {
        vec![
            (b":method", b"GET"),
            (b":path", self.path.as_bytes()),
            (b":authority", self.authority.as_bytes()),
        ]
    }
}

/// What every stream of the configuration shares.
pub struct Shared {
    /// The compiled plugin configuration.
    pub config: Config,
    /// The filter's stats.
    pub metrics: Metrics,
    /// The key records of the process (the wasm build has one per worker VM).
    pub keys: Mutex<KeyWorker>,
    host: ConfigHost,
    /// The configuration callout of the timer's refresh in flight.
    refresh: Mutex<Option<u64>>,
    /// The last slot of the upload-record table the timer swept.
    sweep_cursor: Mutex<u32>,
}

/// Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State behind these locks is whole between calls: a panic elsewhere does not spoil it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Runs `event` on the key records, then logs and counts what it left, prefixed by
    /// `prefix` (who drove it). No Envoy callback runs while the records are locked.
    pub fn with_keys<T>(&self, prefix: &str, event: impl FnOnce(&mut KeyWorker) -> T) -> T {
        let (out, commands) = {
            let mut worker = lock(&self.keys);
            let out = event(&mut worker);
            (out, worker.take_commands())
        };
        for command in commands {
            match command {
                KeyCommand::Metric(metric) => self.metrics.keys(&metric),
                KeyCommand::Log(level, line) => {
                    let level = match level {
                        KeyLevel::Info => LogLevel::Info,
                        KeyLevel::Warn => LogLevel::Warn,
                    };
                    ffi::log(level, &format!("{prefix}{line}"));
                }
            }
        }
        out
    }

    /// The callout of a key-service fetch (`None` without a key service).
    pub fn fetch(&self, req: &Request) -> Option<Fetch> {
        let ks = self.config.key_service.as_ref()?;
        Some(Fetch {
            cluster: ks.cluster.clone(),
            path: req.path.clone(),
            authority: ks.authority.clone(),
            timeout_ms: ks.timeout_ms,
        })
    }

    /// Sends the timer refresh's fetch (main thread); one Envoy refuses is an unanswered fetch.
    fn send_refresh(&self, mut fetch: Option<Request>) {
        *lock(&self.refresh) = None;
        while let Some(req) = fetch.take() {
            if let Some(f) = self.fetch(&req) {
                if let Some(id) = self.host.callout(&f.cluster, &f.headers(), f.timeout_ms) {
                    *lock(&self.refresh) = Some(id);
                    return;
                }
            }
            fetch = self.with_keys(PREFIX, |w| w.on_timer_answer(&*STORE, 0, &[], now()));
        }
    }

    fn tick(&self) {
        if self.config.state_key.is_none() {
            self.sweep();
        }
        let Some(ks) = &self.config.key_service else {
            return;
        };
        let fetch = self.with_keys(PREFIX, |w| w.on_tick(ks, &*STORE, now()));
        if fetch.is_some() {
            self.send_refresh(fetch);
        }
    }

    /// Drops the idle upload records of the next slots (without replicas they live here).
    fn sweep(&self) {
        let mut cursor = lock(&self.sweep_cursor);
        let now = now().max(0).unsigned_abs();
        for _ in 0..SWEEP_PER_TICK {
            *cursor = (*cursor + 1) % table::SLOTS;
            let key = table::slot_key_of(*cursor);
            let Some((Some(value), cas)) = ocicrypt_core::store::Store::get_cas(&*STORE, &key)
            else {
                continue;
            };
            if let Some((next, gone)) = table::sweep(&value, now, self.config.upload_idle_seconds) {
                // Lost to a concurrent write: that write dropped the idle records itself.
                if ocicrypt_core::store::Store::set_cas(&*STORE, &key, &next, cas) {
                    self.metrics.uploads_dropped(gone);
                }
            }
        }
    }

    fn on_refresh_answer(&self, answer: Answer) {
        {
            let mut refresh = lock(&self.refresh);
            if *refresh != Some(answer.id) {
                return;
            }
            *refresh = None;
        }
        let status = if answer.answered {
            crate::stream::status_of(&answer.headers).unwrap_or(0)
        } else {
            0
        };
        let body = if status == 0 { Vec::new() } else { answer.body };
        let fetch = self.with_keys(PREFIX, |w| w.on_timer_answer(&*STORE, status, &body, now()));
        self.send_refresh(fetch);
    }
}

/// The thread that ticks, and how to stop it.
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// Deleted after the thread stopped (field order: dropped after `thread` is joined).
    _scheduler: Arc<Scheduler>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (stopped, wake) = &*self.stop;
        *lock(stopped) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A configuration as Envoy holds it.
pub struct Module {
    shared: Arc<Shared>,
    _ticker: Option<Ticker>,
}

impl Module {
    /// Parses and checks the plugin configuration; `None` (logged, naming the field) refuses it.
    pub fn new(host: ConfigHost, _name: &[u8], config: &[u8]) -> Option<Module> {
        // Secrets (replicas.state_key_env) come from Envoy's environment, never from the
        // configuration it dumps.
        let config = match Config::parse_with_env(config, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                ffi::log(
                    LogLevel::Critical,
                    &format!("{PREFIX}invalid configuration: {e}"),
                );
                return None;
            }
        };
        ffi::log(LogLevel::Info, &format!("{PREFIX}configuration loaded"));
        let heartbeat = ocicrypt_core::gateway::prefetch::HEARTBEAT_SECS;
        let seconds = config
            .key_service
            .as_ref()
            .map_or(heartbeat, |ks| ks.refresh_seconds.min(heartbeat));
        let shared = Arc::new(Shared {
            config,
            metrics: Metrics::define(host),
            keys: Mutex::new(KeyWorker::new()),
            host,
            refresh: Mutex::new(None),
            sweep_cursor: Mutex::new(0),
        });
        let Some(scheduler) = host.scheduler().map(Arc::new) else {
            ffi::log(
                LogLevel::Critical,
                &format!("{PREFIX}cannot set the key-service refresh timer"),
            );
            return None;
        };
        let ticker = start_ticker(scheduler, Duration::from_secs(seconds.max(1)))?;
        Some(Module {
            shared,
            _ticker: Some(ticker),
        })
    }

    /// What the configuration's streams share.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A scheduled event on the main thread.
    pub fn on_scheduled(&self, event: u64) {
        if event == TICK {
            self.shared.tick();
        }
    }

    /// A configuration callout's answer on the main thread.
    pub fn on_callout_done(&self, answer: Answer) {
        self.shared.on_refresh_answer(answer);
    }
}

fn start_ticker(scheduler: Arc<Scheduler>, period: Duration) -> Option<Ticker> {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let (s, sched) = (stop.clone(), scheduler.clone());
    let thread = std::thread::Builder::new()
        .name("ocicrypt-timer".into())
        .spawn(move || {
            let (stopped, wake) = &*s;
            let mut guard = lock(stopped);
            while !*guard {
                let (g, _) = wake
                    .wait_timeout(guard, period)
                    .unwrap_or_else(PoisonError::into_inner);
                guard = g;
                if *guard {
                    return;
                }
                sched.commit(TICK);
            }
        })
        .ok();
    let Some(thread) = thread else {
        ffi::log(
            LogLevel::Critical,
            &format!("{PREFIX}cannot start the key-service refresh timer"),
        );
        return None;
    };
    Some(Ticker {
        stop,
        thread: Some(thread),
        _scheduler: scheduler,
    })
}
