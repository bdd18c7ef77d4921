//! The filter's stats as Envoy stats: the core's table ([`Stat::ALL`]) defined by name and
//! kind, and each [`Metric`]'s updates carried out. Envoy prefixes a wasm module's stats
//! `wasmcustom.` (`wasmcustom_ocicrypt_…` on `/stats/prometheus`).
use ocicrypt_core::gateway::metrics::{Change, Kind, Stat};
use ocicrypt_core::gateway::Metric;
use proxy_wasm::types::MetricType;

use crate::host;

/// Host ids of the defined stats, in [`Stat::ALL`]'s order (0 when a definition failed:
/// updates of it are then skipped).
#[derive(Default)]
pub struct Metrics {
    ids: Vec<u32>,
}

impl Metrics {
    /// Defines every stat of the filter.
    pub fn define() -> Self {
        let ids = Stat::ALL
            .iter()
            .map(|stat| {
                let kind = match stat.kind() {
                    Kind::Counter => MetricType::Counter,
                    Kind::Gauge => MetricType::Gauge,
                    Kind::Histogram => MetricType::Histogram,
                };
                host::define_metric(kind, &stat.name())
            })
            .collect();
        Metrics { ids }
    }

    /// Carries out `metric`.
    pub fn count(&self, metric: &Metric) {
        for update in metric.updates() {
            let Some(&id) = update.stat.index().and_then(|i| self.ids.get(i)) else {
                continue;
            };
            match update.change {
                Change::Add(n) => host::increment_metric(id, n),
                // Host contract: proxy-wasm's record sets a gauge and records a histogram value.
                Change::Set(v) | Change::Record(v) => host::record_metric(id, v),
            }
        }
    }
}
