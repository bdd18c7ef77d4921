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

use ocicrypt_core::config::{Config, KeyServiceConfig};
use ocicrypt_core::keyservice::{Lookup, Next};
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
    /// The timer's key-service refresh in progress, with its callout token.
    refresh: Option<(Lookup, u32)>,
    /// Keystream prefetch: this worker's queues, jobs and segments.
    worker: prefetch::SharedWorker,
    /// The last slot of the upload-record table this worker swept.
    sweep_cursor: u32,
}

impl Root {
    fn drive(&mut self, ks: &KeyServiceConfig, lookup: Lookup, next: Next) {
        match keys::drive(ks, lookup, next) {
            keys::Driven::Waiting(lookup, token) => self.refresh = Some((*lookup, token)),
            keys::Driven::Done(records, metadata) => {
                for (project, record) in &records {
                    match &record.error {
                        Some(e) => host::log(LogLevel::Warn, &format!("ocicrypt-filter: key service refresh: project {project}: {e}")),
                        None => host::log(LogLevel::Info, &format!("ocicrypt-filter: key service refresh: project {project}: verified ({:?})", record.versions)),
                    }
                }
                self.metrics.key_lookup(&records, metadata.as_ref());
                keys::publish(&records, metadata);
            }
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
        let Some((mut lookup, expected)) = self.refresh.take() else {
            return;
        };
        if token != expected {
            self.refresh = Some((lookup, expected));
            return;
        }
        let Some(ks) = self.config.as_ref().and_then(|c| c.key_service.clone()) else {
            return;
        };
        let (status, body) = keys::response(body_size);
        let next = lookup.on_response(status, &body);
        self.drive(&ks, lookup, next);
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
                let heartbeat = ocicrypt_core::prefetch::HEARTBEAT_SECS;
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
        let Some(ks) = self.config.as_ref().and_then(|c| c.key_service.clone()) else {
            return;
        };
        if self.refresh.is_some() {
            return;
        }
        let now = keys::now();
        let period = i64::try_from(ks.refresh_seconds).unwrap_or(i64::MAX);
        // Every worker ticks; one per period refreshes, and publishes for all.
        let projects = keys::projects();
        if projects.is_empty() || !keys::take_lease(now, period.saturating_sub(1).max(1)) {
            return;
        }
        let (lookup, next) = keys::start(&ks, projects, now);
        self.drive(&ks, lookup, next);
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
