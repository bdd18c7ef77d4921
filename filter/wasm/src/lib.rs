//! proxy-wasm adapter: Envoy's callbacks go to `ocicrypt_core`, whose answers become host
//! calls. Host calls go through `host` on our own bindings (`abi`), which return `Result` for
//! every host status and never decode bytes as UTF-8 behind the caller's back: the SDK's
//! `hostcalls` panic on an unexpected status or a header value that is not UTF-8, and a panic
//! traps the VM (see "Host calls audited" in docs/operators-guide.md).
//!
//! The worker's state is the core's [`Plugin`], shared by the root context (configuration,
//! ticks, queues, the key-service refresh's callouts) and the stream contexts.
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
mod metrics;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use host::{HostQueues, SharedData};
use ocicrypt_core::gateway::plugin::{Host, Plugin, PluginCommand, NO_TIMER};
use ocicrypt_core::gateway::{CalloutAnswer, CalloutId, Level};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};
use rand_core::OsRng;

// The macro defines the module's `_start`; it cannot carry a doc comment.
#[allow(missing_docs)]
mod entry {
    use super::*;
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
    }}
}

/// The worker's state, shared by its root context and its stream contexts (one thread).
pub type SharedPlugin = Rc<RefCell<Plugin>>;

/// One per worker VM.
#[derive(Default)]
struct Root {
    plugin: SharedPlugin,
    metrics: Rc<metrics::Metrics>,
    /// Callouts the plugin dispatched: host token → the plugin's id.
    callouts: Cell<Vec<(u32, CalloutId)>>,
}

/// The host's log level of a core level.
pub fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
    }
}

/// What the host lends the core for one event.
fn lent<'a>(queues: &'a mut HostQueues, rng: &'a mut OsRng) -> Host<'a> {
    Host {
        store: &SharedData,
        queues,
        rng,
        now: host::now(),
    }
}

impl Root {
    /// Runs `event` on the plugin and carries out its commands; whether every command could be
    /// (`false` also when the plugin is in use: no callback runs inside another, so never).
    fn with_plugin(&self, event: impl FnOnce(&mut Plugin) -> Vec<PluginCommand>) -> bool {
        let Ok(mut plugin) = self.plugin.try_borrow_mut() else {
            return false;
        };
        let mut commands = event(&mut plugin);
        drop(plugin);
        let mut ok = true;
        // A callout the host refuses goes back to the plugin, whose answer is carried out next.
        while !commands.is_empty() {
            let mut next = Vec::new();
            for command in commands {
                match command {
                    PluginCommand::SetTickPeriod(period) => {
                        if !host::set_tick_period(period) {
                            host::log(LogLevel::Critical, NO_TIMER);
                            ok = false;
                        }
                    }
                    PluginCommand::Dispatch(c) => {
                        let headers = c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                        let timeout = Duration::from_millis(c.timeout_ms);
                        let body = c.body.as_deref();
                        match host::dispatch(&c.cluster, headers.collect(), body, timeout) {
                            Ok(token) => {
                                let mut callouts = self.callouts.take();
                                callouts.push((token, c.id));
                                self.callouts.set(callouts);
                            }
                            Err(()) => {
                                if let Ok(mut plugin) = self.plugin.try_borrow_mut() {
                                    let now = host::now();
                                    next.extend(plugin.on_dispatch_failed(c.id, &SharedData, now));
                                }
                            }
                        }
                    }
                    PluginCommand::Metric(metric) => self.metrics.count(&metric),
                    PluginCommand::Log(level, line) => host::log(log_level(level), &line),
                }
            }
            commands = next;
        }
        ok
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
        let mut callouts = self.callouts.take();
        let found = callouts.iter().position(|(t, _)| *t == token);
        let id = found.map(|i| callouts.swap_remove(i).1);
        self.callouts.set(callouts);
        let Some(id) = id else {
            return;
        };
        // Host contract: a callout that failed after its headers (a body cut short, a timeout,
        // an answer over Envoy's limit) has no answer to read: that is no answer, never a panic.
        let now = host::now();
        self.with_plugin(
            |plugin| match host::body(BufferType::HttpCallResponseBody, body_size) {
                Ok(body) => {
                    let headers = host::pairs(MapType::HttpCallResponseHeaders);
                    let answer = CalloutAnswer { headers, body };
                    plugin.on_callout(id, &answer, &SharedData, now)
                }
                Err(_) => plugin.on_dispatch_failed(id, &SharedData, now),
            },
        );
    }
}

impl RootContext for Root {
    fn on_queue_ready(&mut self, queue_id: u32) {
        self.with_plugin(|plugin| plugin.on_queue_ready(queue_id, &mut HostQueues));
    }

    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::plugin_configuration(size);
        // Secrets (replicas.state_key_env) come from the VM's environment, which Envoy fills
        // from vm_config.environment_variables: never from the configuration it dumps.
        let env = |name: &str| std::env::var(name).ok();
        let mut refused = None;
        let ok = self.with_plugin(|plugin| match plugin.on_configure(bytes.as_deref(), &env) {
            Ok(commands) => commands,
            Err(line) => {
                refused = Some(line);
                Vec::new()
            }
        });
        if let Some(line) = refused {
            host::log(LogLevel::Critical, &line);
            return false;
        }
        self.metrics = Rc::new(metrics::Metrics::define());
        ok
    }

    fn on_tick(&mut self) {
        let (mut queues, mut rng) = (HostQueues, OsRng);
        self.with_plugin(|plugin| plugin.on_tick(lent(&mut queues, &mut rng)));
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Only worker threads create streams.
        let (mut queues, mut rng) = (HostQueues, OsRng);
        self.with_plugin(|plugin| plugin.on_stream_start(lent(&mut queues, &mut rng)));
        Some(Box::new(gateway::Gateway::new(
            context_id,
            self.plugin.clone(),
            self.metrics.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
