//! The filter's Envoy stats: the core's table ([`Stat::ALL`]) defined in `config_new` (Envoy
//! prefixes them with the filter's `metrics_namespace`, `dynamicmodulescustom` by default), and
//! each [`Metric`]'s updates carried out. Every stat is defined, the keystream ones too (this
//! build has no prefetch across workers: they stay at zero), so both builds export one set of
//! names.
use ocicrypt_core::gateway::metrics::{Change, Kind, Stat};
use ocicrypt_core::gateway::Metric;

use crate::ffi::{ConfigHost, MetricKind};

/// Ids of the defined stats in [`Stat::ALL`]'s order (`None` when Envoy refused a definition:
/// its updates are skipped).
pub struct Metrics {
    host: ConfigHost,
    ids: Vec<(Kind, Option<usize>)>,
}

impl Metrics {
    /// Defines every stat of the filter (inside `config_new` only).
    pub fn define(host: ConfigHost) -> Self {
        let ids = Stat::ALL
            .iter()
            .map(|stat| {
                let kind = match stat.kind() {
                    Kind::Counter => MetricKind::Counter,
                    Kind::Gauge => MetricKind::Gauge,
                    Kind::Histogram => MetricKind::Histogram,
                };
                (stat.kind(), host.define(kind, &stat.name()))
            })
            .collect();
        Metrics { host, ids }
    }

    /// Carries out `metric`.
    pub fn count(&self, metric: &Metric) {
        for update in metric.updates() {
            let Some(&(kind, Some(id))) = update.stat.index().and_then(|i| self.ids.get(i)) else {
                continue;
            };
            match (update.change, kind) {
                (Change::Add(n), Kind::Gauge) => self.host.gauge_add(id, n),
                (Change::Add(n), _) => self.host.count(id, n.max(0).unsigned_abs()),
                (Change::Set(v), _) => self.host.gauge_set(id, v),
                (Change::Record(v), _) => self.host.record(id, v),
            }
        }
    }
}
