//! proxy-wasm adapter: Envoy's callbacks go to `ocicrypt_core`, whose answers become host
//! calls. Only `proxy_wasm::hostcalls::*` are used: they return `Result`, where the SDK's trait
//! helpers panic on a host error and trap the VM.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod gateway;
mod host;
mod metrics;

use std::rc::Rc;

use ocicrypt_core::config::Config;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};

// The macro defines the module's `_start`; it cannot carry a doc comment.
#[allow(missing_docs)]
mod entry {
    use super::*;
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Info);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None, metrics: Rc::new(metrics::Metrics::default()) }) });
    }}
}

/// One per worker VM: holds the compiled configuration shared by the worker's streams.
struct Root {
    config: Option<Rc<Config>>,
    metrics: Rc<metrics::Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes =
            match proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
                Ok(Some(b)) => b,
                _ => {
                    host::log(
                        LogLevel::Critical,
                        "ocicrypt-filter: no plugin configuration; refusing to start",
                    );
                    return false;
                }
            };
        match Config::parse(&bytes) {
            Ok(config) => {
                host::log(LogLevel::Info, "ocicrypt-filter: configuration loaded");
                self.config = Some(Rc::new(config));
                self.metrics = Rc::new(metrics::Metrics::define());
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

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(gateway::Gateway::new(
            context_id,
            self.config.clone(),
            self.metrics.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
