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
use ocicrypt_core::gateway::plugin::{configure, PluginCommand, Timer, NO_TIMER, PREFIX};
use ocicrypt_core::gateway::{CalloutAnswer, CalloutId, Level, Metric};
use ocicrypt_core::keys::records::{KeyCommand, KeyLevel, KeyWorker};

use crate::ffi::{self, Answer, ConfigHost, LogLevel, Scheduler};
use crate::metrics::Metrics;
use crate::store::STORE;

/// The scheduler event of a timer tick.
const TICK: u64 = 1;

/// What every stream of the configuration shares.
pub struct Shared {
    /// The compiled plugin configuration.
    pub config: Config,
    /// The filter's stats.
    pub metrics: Metrics,
    /// The key records of the process (the wasm build has one per worker VM).
    pub keys: Mutex<KeyWorker>,
    host: ConfigHost,
    /// The sweep and the key-service refresh (locked before `keys` when both are).
    timer: Mutex<Timer>,
    /// The timer's callouts in flight: Envoy's id → the timer's.
    callouts: Mutex<Vec<(u64, CalloutId)>>,
}

/// Unix seconds.
pub fn now() -> i64 {
    i64::try_from(now_secs()).unwrap_or(i64::MAX)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State behind these locks is whole between calls: a panic elsewhere does not spoil it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
    }
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
                KeyCommand::Metric(metric) => self.metrics.count(&Metric::Key(metric)),
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

    /// Runs `event` on the timer and the key records (main thread), then carries out its
    /// commands; a callout Envoy refuses goes back to the timer as unanswered.
    fn with_timer(&self, event: impl FnOnce(&mut Timer, &mut KeyWorker) -> Vec<PluginCommand>) {
        let mut commands = {
            let mut timer = lock(&self.timer);
            let mut keys = lock(&self.keys);
            event(&mut timer, &mut keys)
        };
        while !commands.is_empty() {
            let mut next = Vec::new();
            for command in commands {
                match command {
                    PluginCommand::Dispatch(c) => {
                        let headers: Vec<(&[u8], &[u8])> = c
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                            .collect();
                        match self.host.callout(&c.cluster, &headers, c.timeout_ms) {
                            Some(id) => lock(&self.callouts).push((id, c.id)),
                            None => {
                                let mut timer = lock(&self.timer);
                                let mut keys = lock(&self.keys);
                                let config = Some(&self.config);
                                next.extend(timer.on_dispatch_failed(
                                    c.id,
                                    config,
                                    &mut keys,
                                    &*STORE,
                                    now_secs(),
                                ));
                            }
                        }
                    }
                    PluginCommand::Metric(metric) => self.metrics.count(&metric),
                    PluginCommand::Log(level, line) => ffi::log(log_level(level), &line),
                    // The period is the ticker's, set once at configuration.
                    PluginCommand::SetTickPeriod(_) => {}
                }
            }
            commands = next;
        }
    }

    fn tick(&self) {
        self.with_timer(|timer, keys| timer.on_tick(&self.config, keys, &*STORE, now_secs()));
    }

    fn on_refresh_answer(&self, answer: Answer) {
        let id = {
            let mut callouts = lock(&self.callouts);
            let Some(i) = callouts.iter().position(|(t, _)| *t == answer.id) else {
                return;
            };
            callouts.swap_remove(i).1
        };
        let config = Some(&self.config);
        let now = now_secs();
        if !answer.answered {
            self.with_timer(|timer, keys| timer.on_dispatch_failed(id, config, keys, &*STORE, now));
            return;
        }
        let answer = CalloutAnswer {
            headers: crate::stream::pairs(answer.headers),
            body: answer.body,
        };
        self.with_timer(|timer, keys| timer.on_callout(id, &answer, config, keys, &*STORE, now));
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
        let (config, commands) = match configure(Some(config), &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(line) => {
                ffi::log(LogLevel::Critical, &line);
                return None;
            }
        };
        let mut period = None;
        for command in commands {
            match command {
                PluginCommand::Log(level, line) => ffi::log(log_level(level), &line),
                PluginCommand::SetTickPeriod(p) => period = Some(p),
                PluginCommand::Dispatch(_) | PluginCommand::Metric(_) => {}
            }
        }
        let shared = Arc::new(Shared {
            config,
            metrics: Metrics::define(host),
            keys: Mutex::new(KeyWorker::new()),
            host,
            timer: Mutex::new(Timer::default()),
            callouts: Mutex::new(Vec::new()),
        });
        let (Some(scheduler), Some(period)) = (host.scheduler().map(Arc::new), period) else {
            ffi::log(LogLevel::Critical, NO_TIMER);
            return None;
        };
        let ticker = start_ticker(scheduler, period)?;
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
