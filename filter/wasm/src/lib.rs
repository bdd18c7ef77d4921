//! proxy-wasm adapter: Envoy's callbacks go to `ocicrypt_core`, whose answers become host
//! calls. Host calls go through `host` on our own bindings (`abi`), which return `Result` for
//! every host status and never decode bytes as UTF-8 behind the caller's back: the SDK's
//! `hostcalls` panic on an unexpected status or a header value that is not UTF-8, and a panic
//! traps the VM (see "Host calls audited" in docs/operators-guide.md).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod abi;
mod gateway;
mod host;
mod keys;
mod metrics;
mod prefetch;
mod uploads;

use std::rc::Rc;

use std::time::Duration;

use host::SharedData;
use ocicrypt_core::config::Config;
use ocicrypt_core::keys::keyservice::Request;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use rand_core::OsRng;

// The macro defines the module's `_start`; it cannot carry a doc comment.
#[allow(missing_docs)]
mod entry {
    use super::*;
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None, metrics: Rc::new(metrics::Metrics::default()), refresh: None, worker: prefetch::SharedWorker::default(), sweep_cursor: 0 }) });
    }}
}

/// One per worker VM: holds the compiled configuration shared by the worker's streams.
struct Root {
    config: Option<Rc<Config>>,
    metrics: Rc<metrics::Metrics>,
    /// The callout token of the timer's key-service refresh in flight.
    refresh: Option<u32>,
    /// Keystream prefetch: this worker's queues, jobs and segments.
    worker: prefetch::SharedWorker,
    /// The last slot of the upload-record table this worker swept.
    sweep_cursor: u32,
}

/// Log prefix of the timer's key lines.
const TIMER_PREFIX: &str = "ocicrypt-filter: ";

impl Root {
    /// Dispatches the timer refresh's fetch; one the host refuses is an unanswered fetch.
    fn fetch(&mut self, config: &Config, mut fetch: Option<Request>) {
        self.refresh = None;
        while let Some(req) = fetch.take() {
            if let Ok(token) = keys::dispatch(config, &req) {
                self.refresh = Some(token);
                return;
            }
            fetch = keys::with_worker(TIMER_PREFIX, &self.metrics, |w| {
                w.on_timer_answer(&SharedData, 0, &[], keys::now())
            })
            .flatten();
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.refresh != Some(token) {
            return;
        }
        self.refresh = None;
        let (status, body) = keys::response(body_size);
        let fetch = keys::with_worker(TIMER_PREFIX, &self.metrics, |w| {
            w.on_timer_answer(&SharedData, status, &body, keys::now())
        })
        .flatten();
        if let Some(config) = self.config.clone() {
            self.fetch(&config, fetch);
        }
    }
}

impl RootContext for Root {
    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            worker.on_queue_ready(queue_id, &mut prefetch::HostQueues);
            self.metrics.keystream(worker.report());
        }
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let Some(bytes) = host::plugin_configuration(size) else {
            host::log(
                LogLevel::Critical,
                "ocicrypt-filter: no plugin configuration; refusing to start",
            );
            return false;
        };
        // Secrets (replicas.state_key_env) come from the VM's environment, which Envoy fills
        // from vm_config.environment_variables: never from the configuration it dumps.
        match Config::parse_with_env(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                host::log(LogLevel::Info, "ocicrypt-filter: configuration loaded");
                if let Ok(mut worker) = self.worker.try_borrow_mut() {
                    worker.set_budget(config.keystream_prefetch_bytes);
                }
                self.config = Some(Rc::new(config));
                self.metrics = Rc::new(metrics::Metrics::define());
                // Ticks renew this worker's line in the keystream helper list, and drive the
                // key-service refresh (leased: one refresh per period over all workers).
                let refresh = self.config.as_ref().and_then(|c| c.key_service.as_ref());
                let heartbeat = ocicrypt_core::gateway::prefetch::HEARTBEAT_SECS;
                let seconds = refresh.map_or(heartbeat, |ks| ks.refresh_seconds.min(heartbeat));
                {
                    let period = Duration::from_secs(seconds.max(1));
                    if !host::set_tick_period(period) {
                        host::log(
                            LogLevel::Critical,
                            "ocicrypt-filter: cannot set the key-service refresh timer",
                        );
                        return false;
                    }
                }
                true
            }
            Err(e) => {
                host::log(
                    LogLevel::Critical,
                    &format!("ocicrypt-filter: invalid configuration: {e}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            let now = keys::now().max(0).unsigned_abs();
            let queues = &mut prefetch::HostQueues;
            if let Some(warning) = worker.on_tick(now, &host::SharedData, queues, &mut OsRng) {
                host::log(LogLevel::Warn, warning);
            }
        }
        // Without replicas, upload records live here: drop the abandoned ones.
        if let Some(config) = self.config.as_ref().filter(|c| c.state_key.is_none()) {
            uploads::sweep(
                &mut self.sweep_cursor,
                config.upload_idle_seconds,
                &self.metrics,
            );
        }
        let Some(config) = self.config.clone() else {
            return;
        };
        let Some(ks) = &config.key_service else {
            return;
        };
        let fetch = keys::with_worker(TIMER_PREFIX, &self.metrics, |w| {
            w.on_tick(ks, &SharedData, keys::now())
        })
        .flatten();
        if fetch.is_some() {
            self.fetch(&config, fetch);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Only worker threads create streams.
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            let now = keys::now().max(0).unsigned_abs();
            let queues = &mut prefetch::HostQueues;
            if let Some(warning) = worker.on_stream(now, &host::SharedData, queues, &mut OsRng) {
                host::log(LogLevel::Warn, warning);
            }
        }
        Some(Box::new(gateway::Gateway::new(
            context_id,
            self.config.clone(),
            self.metrics.clone(),
            self.worker.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
