//! The filter's Envoy stats, defined in `config_new` with the wasm build's names (Envoy prefixes
//! them with the filter's `metrics_namespace`, `dynamicmodulescustom` by default).
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::Metric;
use ocicrypt_core::keys::records::KeyMetric;

use crate::ffi::{ConfigHost, MetricKind};

const REFUSAL_CODES: [Code; 10] = [
    Code::DigestInvalid,
    Code::ManifestInvalid,
    Code::BlobUploadInvalid,
    Code::BlobUploadUnknown,
    Code::SizeInvalid,
    Code::Denied,
    Code::Unsupported,
    Code::Unavailable,
    Code::Unknown,
    Code::Unauthorized,
];

const TUF_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];

/// Ids of the defined metrics (`None` when Envoy refused a definition: its updates are skipped).
pub struct Metrics {
    host: ConfigHost,
    layers_encrypted: Option<usize>,
    bytes_encrypted: Option<usize>,
    blobs_passed: Option<usize>,
    manifests_rewritten: Option<usize>,
    mounts_rewritten: Option<usize>,
    uploads_in_flight: Option<usize>,
    ledger_entries: Option<usize>,
    ledger_evictions: Option<usize>,
    sessions_moved: Option<usize>,
    layer_size: Option<usize>,
    refusals: Vec<(Code, Option<usize>)>,
    key_lookups: Option<usize>,
    key_failures: Option<usize>,
    tuf_versions: [Option<usize>; 4],
    keys_remembered: Option<usize>,
    key_fetches: Option<usize>,
    keys_from_memory: Option<usize>,
    keys_resumed: Option<usize>,
    /// The keystream prefetch counters, defined so that both builds export the same names;
    /// this build has no prefetch across workers, so they stay at zero.
    _keystream: [Option<usize>; 5],
}

impl Metrics {
    /// Defines every metric of the filter (inside `config_new` only).
    pub fn define(host: ConfigHost) -> Self {
        let counter = |name: &str| host.define(MetricKind::Counter, name);
        let gauge = |name: &str| host.define(MetricKind::Gauge, name);
        Metrics {
            host,
            layers_encrypted: counter("ocicrypt.layers_encrypted"),
            bytes_encrypted: counter("ocicrypt.bytes_encrypted"),
            blobs_passed: counter("ocicrypt.json_blobs_passed"),
            manifests_rewritten: counter("ocicrypt.manifests_rewritten"),
            mounts_rewritten: counter("ocicrypt.mounts_rewritten"),
            uploads_in_flight: gauge("ocicrypt.uploads_in_flight"),
            ledger_entries: gauge("ocicrypt.ledger_cache_entries"),
            ledger_evictions: counter("ocicrypt.ledger_evictions"),
            sessions_moved: counter("ocicrypt.upload_sessions_moved"),
            layer_size: host.define(MetricKind::Histogram, "ocicrypt.layer_bytes"),
            key_lookups: counter("ocicrypt.keyservice.project_lookups"),
            key_failures: counter("ocicrypt.keyservice.project_failures"),
            tuf_versions: TUF_ROLES.map(|r| gauge(&format!("ocicrypt.keyservice.{r}_version"))),
            keys_remembered: gauge("ocicrypt.keyservice.projects_remembered"),
            key_fetches: counter("ocicrypt.keyservice.fetches"),
            keys_from_memory: counter("ocicrypt.keyservice.answered_from_memory"),
            keys_resumed: counter("ocicrypt.keyservice.resumed_lookups"),
            _keystream: [
                "asked_bytes",
                "used_bytes",
                "refused_segments",
                "served_bytes",
                "declined_requests",
            ]
            .map(|n| counter(&format!("ocicrypt.keystream.{n}"))),
            refusals: REFUSAL_CODES
                .iter()
                .map(|c| {
                    let name = format!("ocicrypt.refusals.{}", c.as_str().to_ascii_lowercase());
                    (*c, counter(&name))
                })
                .collect(),
        }
    }

    fn add(&self, id: Option<usize>, v: u64) {
        if let Some(id) = id {
            self.host.count(id, v);
        }
    }

    fn gauge_add(&self, id: Option<usize>, delta: i64) {
        if let (Some(id), false) = (id, delta == 0) {
            self.host.gauge_add(id, delta);
        }
    }

    fn gauge_set(&self, id: Option<usize>, v: u64) {
        if let Some(id) = id {
            self.host.gauge_set(id, v);
        }
    }

    /// Counts what the stream machine reports.
    pub fn stream(&self, metric: Metric) {
        match metric {
            Metric::Refused(code) => {
                if let Some((_, id)) = self.refusals.iter().find(|(c, _)| *c == code) {
                    self.add(*id, 1);
                }
            }
            Metric::MountRewritten => self.add(self.mounts_rewritten, 1),
            Metric::ManifestRewritten => self.add(self.manifests_rewritten, 1),
            Metric::UploadState(delta) => self.gauge_add(self.uploads_in_flight, delta),
            Metric::LedgerCache(change) => {
                self.gauge_add(self.ledger_entries, change.entries);
                if change.evicted > 0 {
                    self.add(self.ledger_evictions, change.evicted);
                }
            }
            Metric::SessionMoved => self.add(self.sessions_moved, 1),
            // No keystream prefetch in this build: every stream encrypts its own body.
            Metric::Keystream(_) => {}
            Metric::LayerEncrypted(size) => {
                self.add(self.layers_encrypted, 1);
                self.add(self.bytes_encrypted, size);
                if let Some(id) = self.layer_size {
                    self.host.record(id, size);
                }
            }
            Metric::BlobPassed => self.add(self.blobs_passed, 1),
        }
    }

    /// Counts what the key records report.
    pub fn keys(&self, metric: &KeyMetric) {
        match metric {
            KeyMetric::Remembered(v) => self.gauge_set(self.keys_remembered, *v),
            KeyMetric::Fetch => self.add(self.key_fetches, 1),
            KeyMetric::FromMemory => self.add(self.keys_from_memory, 1),
            KeyMetric::Resumed => self.add(self.keys_resumed, 1),
            KeyMetric::ProjectLookup => self.add(self.key_lookups, 1),
            KeyMetric::ProjectFailure => self.add(self.key_failures, 1),
            KeyMetric::TufVersion(role, version) => {
                if let Some(i) = TUF_ROLES.iter().position(|r| r == role) {
                    if let Some(id) = self.tuf_versions.get(i) {
                        self.gauge_set(*id, *version);
                    }
                }
            }
        }
    }

    /// Upload records the timer swept.
    pub fn uploads_dropped(&self, gone: usize) {
        self.gauge_add(
            self.uploads_in_flight,
            -i64::try_from(gone).unwrap_or(i64::MAX),
        );
    }
}
