//! The filter's Envoy stats. Every worker VM defines the same names, and Envoy keeps one stat per
//! name, so counters and gauges add up across workers. Envoy prefixes them `wasmcustom.`
//! (`wasmcustom_ocicrypt_…` on `/stats/prometheus`).
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::prefetch::Report;
use proxy_wasm::types::MetricType;

use crate::host;

/// Ids of the defined metrics (0 when a definition failed: updates then fail quietly).
#[derive(Default)]
pub struct Metrics {
    layers_encrypted: u32,
    bytes_encrypted: u32,
    blobs_passed: u32,
    manifests_rewritten: u32,
    mounts_rewritten: u32,
    uploads_in_flight: u32,
    ledger_entries: u32,
    ledger_evictions: u32,
    sessions_moved: u32,
    layer_size: u32,
    refusals: Vec<(Code, u32)>,
    key_lookups: u32,
    key_failures: u32,
    tuf_versions: [u32; 4],
    keystream_asked: u32,
    keystream_used: u32,
    keystream_refused: u32,
    keystream_served: u32,
    keystream_declined: u32,
}

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

fn define(kind: MetricType, name: &str) -> u32 {
    host::define_metric(kind, name)
}

impl Metrics {
    /// Defines every metric of the filter.
    pub fn define() -> Self {
        Metrics {
            layers_encrypted: define(MetricType::Counter, "ocicrypt.layers_encrypted"),
            bytes_encrypted: define(MetricType::Counter, "ocicrypt.bytes_encrypted"),
            blobs_passed: define(MetricType::Counter, "ocicrypt.json_blobs_passed"),
            manifests_rewritten: define(MetricType::Counter, "ocicrypt.manifests_rewritten"),
            mounts_rewritten: define(MetricType::Counter, "ocicrypt.mounts_rewritten"),
            uploads_in_flight: define(MetricType::Gauge, "ocicrypt.uploads_in_flight"),
            ledger_entries: define(MetricType::Gauge, "ocicrypt.ledger_cache_entries"),
            ledger_evictions: define(MetricType::Counter, "ocicrypt.ledger_evictions"),
            sessions_moved: define(MetricType::Counter, "ocicrypt.upload_sessions_moved"),
            layer_size: define(MetricType::Histogram, "ocicrypt.layer_bytes"),
            key_lookups: define(MetricType::Counter, "ocicrypt.keyservice.project_lookups"),
            key_failures: define(MetricType::Counter, "ocicrypt.keyservice.project_failures"),
            keystream_asked: define(MetricType::Counter, "ocicrypt.keystream.asked_bytes"),
            keystream_used: define(MetricType::Counter, "ocicrypt.keystream.used_bytes"),
            keystream_refused: define(MetricType::Counter, "ocicrypt.keystream.refused_segments"),
            keystream_served: define(MetricType::Counter, "ocicrypt.keystream.served_bytes"),
            keystream_declined: define(MetricType::Counter, "ocicrypt.keystream.declined_requests"),
            tuf_versions: TUF_ROLES.map(|r| {
                define(
                    MetricType::Gauge,
                    &format!("ocicrypt.keyservice.{r}_version"),
                )
            }),
            refusals: REFUSAL_CODES
                .iter()
                .map(|c| {
                    (
                        *c,
                        define(
                            MetricType::Counter,
                            &format!("ocicrypt.refusals.{}", c.as_str().to_ascii_lowercase()),
                        ),
                    )
                })
                .collect(),
        }
    }

    fn add(id: u32, n: i64) {
        host::increment_metric(id, n);
    }

    /// A blob was committed encrypted.
    pub fn layer_encrypted(&self, size: u64) {
        Self::add(self.layers_encrypted, 1);
        Self::add(
            self.bytes_encrypted,
            i64::try_from(size).unwrap_or(i64::MAX),
        );
        host::record_metric(self.layer_size, size);
    }

    /// A JSON blob was committed as pushed.
    pub fn blob_passed(&self) {
        Self::add(self.blobs_passed, 1);
    }

    /// A manifest was rewritten.
    pub fn manifest_rewritten(&self) {
        Self::add(self.manifests_rewritten, 1);
    }

    /// A cross-repository mount was turned into an upload.
    pub fn mount_rewritten(&self) {
        Self::add(self.mounts_rewritten, 1);
    }

    /// An upload session was continued here from a state another replica sealed: counted on
    /// most requests, sessions are not kept on one replica (operator's guide 6.3).
    pub fn session_moved(&self) {
        Self::add(self.sessions_moved, 1);
    }

    /// An upload session got (`+1`) or dropped (`-1`) its saved state.
    pub fn upload_state(&self, delta: i64) {
        Self::add(self.uploads_in_flight, delta);
    }

    /// A write to the ledger cache: entries held changed, some evicted.
    pub fn ledger_cache(&self, change: ocicrypt_core::distribution::ledger_cache::Change) {
        if change.entries != 0 {
            Self::add(self.ledger_entries, change.entries);
        }
        if change.evicted > 0 {
            Self::add(
                self.ledger_evictions,
                i64::try_from(change.evicted).unwrap_or(i64::MAX),
            );
        }
    }

    /// A key-service lookup finished for a project.
    pub fn key_lookup(&self) {
        Self::add(self.key_lookups, 1);
    }

    /// A key-service lookup failed for a project.
    pub fn key_failure(&self) {
        Self::add(self.key_failures, 1);
    }

    /// A refresh verified this version of a TUF role (other roles are not gauged).
    pub fn tuf_version(&self, role: &str, version: u64) {
        if let Some(i) = TUF_ROLES.iter().position(|r| *r == role) {
            if let Some(&id) = self.tuf_versions.get(i) {
                host::record_metric(id, version);
            }
        }
    }

    /// Keystream prefetch since the last report.
    pub fn keystream(&self, report: Report) {
        for (id, n) in [
            (self.keystream_asked, report.asked),
            (self.keystream_used, report.used),
            (self.keystream_refused, report.refused),
            (self.keystream_served, report.served),
            (self.keystream_declined, report.declined),
        ] {
            if n > 0 {
                Self::add(id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// A request was refused.
    pub fn refused(&self, code: Code) {
        if let Some((_, id)) = self.refusals.iter().find(|(c, _)| *c == code) {
            Self::add(*id, 1);
        }
    }
}
