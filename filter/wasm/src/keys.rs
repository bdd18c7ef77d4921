//! Recipient keys in the adapter: the worker's [`KeyWorker`] (the core decides what is fresh,
//! what to look up, what to publish, whom to refuse), the callouts of its lookups, and its
//! metrics and log lines. Both the root context's timer and a stream that finds no usable
//! record drive lookups.
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use crate::host::{self, SharedData};
use crate::metrics::Metrics;
use ocicrypt_core::config::Config;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::{KeyAnswer, Keys};
use ocicrypt_core::keys::keyservice::Request;
use ocicrypt_core::keys::records::{
    KeyCommand, KeyLevel, KeyMetric, KeyStep, KeyWorker, StreamLookup,
};
use proxy_wasm::types::{LogLevel, MetricType};

/// Unix seconds from the host clock.
pub fn now() -> i64 {
    host::now_since_epoch().map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

thread_local! {
    /// What this worker keeps of the keys (each VM is one thread).
    static WORKER: RefCell<KeyWorker> = RefCell::new(KeyWorker::new());
    /// The key-service metrics this module defines (ids; defined on first use).
    static METRICS: Cell<Option<KeyMetrics>> = const { Cell::new(None) };
}

/// Runs `event` on this worker's key memory, then carries out the commands it left, with log
/// lines prefixed by `prefix` (who drove it). `None` if the memory is in use: no callback
/// re-enters another, so never; the caller fails closed.
pub fn with_worker<T>(
    prefix: &str,
    metrics: &Metrics,
    event: impl FnOnce(&mut KeyWorker) -> T,
) -> Option<T> {
    let (out, commands) = WORKER.with(|w| {
        let mut worker = w.try_borrow_mut().ok()?;
        let out = event(&mut worker);
        Some((out, worker.take_commands()))
    })?;
    for command in commands {
        match command {
            KeyCommand::Metric(metric) => count(metrics, &metric),
            KeyCommand::Log(level, line) => {
                let level = match level {
                    KeyLevel::Info => LogLevel::Info,
                    KeyLevel::Warn => LogLevel::Warn,
                };
                host::log(level, &format!("{prefix}{line}"));
            }
        }
    }
    Some(out)
}

/// Metrics of the bounds (defined here, next to what they count).
#[derive(Clone, Copy)]
struct KeyMetrics {
    remembered: u32,
    fetches: u32,
    from_memory: u32,
    resumed: u32,
}

fn key_metrics() -> KeyMetrics {
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

fn count(metrics: &Metrics, metric: &KeyMetric) {
    match metric {
        KeyMetric::Remembered(n) => host::record_metric(key_metrics().remembered, *n),
        KeyMetric::Fetch => host::increment_metric(key_metrics().fetches, 1),
        KeyMetric::FromMemory => host::increment_metric(key_metrics().from_memory, 1),
        KeyMetric::Resumed => host::increment_metric(key_metrics().resumed, 1),
        KeyMetric::ProjectLookup => metrics.key_lookup(),
        KeyMetric::ProjectFailure => metrics.key_failure(),
        KeyMetric::TufVersion(role, version) => metrics.tuf_version(role, *version),
    }
}

/// Sends a lookup's fetch; `Err` when the host refused the callout (or there is no key
/// service to send it to).
pub fn dispatch(config: &Config, req: &Request) -> Result<u32, ()> {
    let ks = config.key_service.as_ref().ok_or(())?;
    let headers = vec![
        (":method", "GET"),
        (":path", req.path.as_str()),
        (":authority", ks.authority.as_str()),
    ];
    host::dispatch(
        &ks.cluster,
        headers,
        None,
        Duration::from_millis(ks.timeout_ms),
    )
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

/// A stream's recipients: the worker's key memory, and the lookup the stream runs when the
/// memory says so.
pub struct StreamKeys {
    /// Log prefix of the stream's key lines.
    prefix: String,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    lookup: StreamLookup,
    /// The callout token of the lookup's fetch the paused request waits for.
    token: Option<u32>,
}

impl Keys for StreamKeys {
    fn recipients(&mut self, project: &str) -> Result<KeyAnswer, OciError> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
        let lookup = &mut self.lookup;
        let step = with_worker(&self.prefix, &self.metrics, |w| {
            w.recipients(&config, &SharedData, project, now(), lookup)
        })
        .ok_or_else(|| OciError::new(Code::Unknown, "the worker's key memory is in use"))??;
        match step {
            KeyStep::Ready(r) => Ok(KeyAnswer::Ready(r)),
            KeyStep::Fetch(req) => {
                if self.send(&config, Some(req)) {
                    return Ok(KeyAnswer::Waiting);
                }
                // Over before any fetch could be sent: its result decides (never a second
                // lookup, so this asks once more at most).
                self.recipients(project)
            }
        }
    }
}

impl StreamKeys {
    /// The keys of stream `id`.
    pub fn new(id: u32, config: Option<Rc<Config>>, metrics: Rc<Metrics>) -> Self {
        StreamKeys {
            prefix: format!("[ocicrypt #{id}] "),
            config,
            metrics,
            lookup: StreamLookup::default(),
            token: None,
        }
    }

    /// The answer to a callout: `None` when `token` is not the lookup's fetch, else whether the
    /// lookup goes on (`Some(false)`: it is over, ask for the recipients again).
    pub fn on_answer(&mut self, token: u32, body_size: usize) -> Option<bool> {
        if self.token != Some(token) {
            return None;
        }
        self.token = None;
        let Some(config) = self.config.clone() else {
            return Some(false);
        };
        let (status, body) = response(body_size);
        let fetch = self.answer(&config, status, &body);
        Some(self.send(&config, fetch))
    }

    /// Dispatches the lookup's fetch; one the host refuses goes back as unanswered. Whether a
    /// fetch is in flight.
    fn send(&mut self, config: &Config, mut fetch: Option<Request>) -> bool {
        while let Some(req) = fetch {
            if let Ok(token) = dispatch(config, &req) {
                self.token = Some(token);
                return true;
            }
            fetch = self.answer(config, 0, &[]);
        }
        false
    }

    fn answer(&mut self, config: &Config, status: u16, body: &[u8]) -> Option<Request> {
        let lookup = &mut self.lookup;
        with_worker(&self.prefix, &self.metrics, |w| {
            w.on_stream_answer(config, &SharedData, lookup, status, body, now())
        })
        .flatten()
    }
}
