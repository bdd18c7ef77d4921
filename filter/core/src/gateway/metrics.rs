//! The filter's stats: every name and kind a host defines ([`Stat::ALL`]), and what each
//! [`Metric`] the machines count does to them ([`Metric::updates`]).
//!
//! Every worker defines the same names and the host keeps one stat per name, so counters and
//! gauges add up across workers. The names carry no host prefix (Envoy adds `wasmcustom.` to a
//! wasm module's, or the filter's namespace to a native module's).
use crate::error::Code;
use crate::keys::records::KeyMetric;

use super::Metric;

/// How the host keeps a stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up.
    Counter,
    /// Goes up and down, or is set.
    Gauge,
    /// A distribution of recorded values.
    Histogram,
}

/// One stat of the filter; its position in [`Stat::ALL`] is [`Stat::index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Blobs committed encrypted.
    LayersEncrypted,
    /// Bytes of the blobs committed encrypted.
    BytesEncrypted,
    /// JSON blobs (configs, artifacts) committed as pushed.
    JsonBlobsPassed,
    /// Manifests rewritten.
    ManifestsRewritten,
    /// Cross-repository mounts turned into uploads.
    MountsRewritten,
    /// Upload sessions with saved state.
    UploadsInFlight,
    /// Entries the ledger cache holds.
    LedgerCacheEntries,
    /// Entries evicted from the ledger cache.
    LedgerEvictions,
    /// Upload sessions continued from another replica's request.
    UploadSessionsMoved,
    /// Sizes of the blobs committed encrypted.
    LayerBytes,
    /// Projects looked up at the key service.
    ProjectLookups,
    /// Projects whose lookup failed.
    ProjectFailures,
    /// Keystream bytes asked of helpers.
    KeystreamAsked,
    /// Bytes encrypted with a helper's keystream.
    KeystreamUsed,
    /// Keystream segments refused by the check.
    KeystreamRefused,
    /// Keystream bytes computed for other workers.
    KeystreamServed,
    /// Keystream requests declined.
    KeystreamDeclined,
    /// The version of a TUF role the last refresh verified.
    TufVersion(TufRole),
    /// Requests refused with this code (only the codes of [`REFUSAL_CODES`] are counted).
    Refusals(Code),
    /// Projects in the shared key table.
    ProjectsRemembered,
    /// Fetches sent to the key service.
    KeyFetches,
    /// Requests refused from a remembered answer, without a lookup.
    AnsweredFromMemory,
    /// Request-path lookups started from recently verified metadata.
    ResumedLookups,
}

/// The top-level TUF roles whose versions are gauged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TufRole {
    /// `root.json`.
    Root,
    /// `timestamp.json`.
    Timestamp,
    /// `snapshot.json`.
    Snapshot,
    /// `targets.json`.
    Targets,
}

impl TufRole {
    /// The gauged role named `role` (delegated roles are not gauged).
    pub fn of(role: &str) -> Option<TufRole> {
        match role {
            "root" => Some(TufRole::Root),
            "timestamp" => Some(TufRole::Timestamp),
            "snapshot" => Some(TufRole::Snapshot),
            "targets" => Some(TufRole::Targets),
            _ => None,
        }
    }
}

/// The refusal codes counted, one stat each (`ocicrypt.refusals.<code>`).
pub const REFUSAL_CODES: [Code; 11] = [
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
    Code::BadGateway,
];

/// What a [`Metric`] does to one stat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Adds this to a counter or a gauge.
    Add(i64),
    /// Sets a gauge.
    Set(u64),
    /// Records a value in a histogram.
    Record(u64),
}

/// One stat update for the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    /// The stat.
    pub stat: Stat,
    /// What happens to it.
    pub change: Change,
}

impl Stat {
    /// Every stat, in the order hosts define them.
    pub const ALL: [Stat; 36] = [
        Stat::LayersEncrypted,
        Stat::BytesEncrypted,
        Stat::JsonBlobsPassed,
        Stat::ManifestsRewritten,
        Stat::MountsRewritten,
        Stat::UploadsInFlight,
        Stat::LedgerCacheEntries,
        Stat::LedgerEvictions,
        Stat::UploadSessionsMoved,
        Stat::LayerBytes,
        Stat::ProjectLookups,
        Stat::ProjectFailures,
        Stat::KeystreamAsked,
        Stat::KeystreamUsed,
        Stat::KeystreamRefused,
        Stat::KeystreamServed,
        Stat::KeystreamDeclined,
        Stat::TufVersion(TufRole::Root),
        Stat::TufVersion(TufRole::Timestamp),
        Stat::TufVersion(TufRole::Snapshot),
        Stat::TufVersion(TufRole::Targets),
        Stat::Refusals(Code::DigestInvalid),
        Stat::Refusals(Code::ManifestInvalid),
        Stat::Refusals(Code::BlobUploadInvalid),
        Stat::Refusals(Code::BlobUploadUnknown),
        Stat::Refusals(Code::SizeInvalid),
        Stat::Refusals(Code::Denied),
        Stat::Refusals(Code::Unsupported),
        Stat::Refusals(Code::Unavailable),
        Stat::Refusals(Code::Unknown),
        Stat::Refusals(Code::Unauthorized),
        Stat::Refusals(Code::BadGateway),
        Stat::ProjectsRemembered,
        Stat::KeyFetches,
        Stat::AnsweredFromMemory,
        Stat::ResumedLookups,
    ];

    /// Its position in [`Stat::ALL`]; `None` for a stat that is not defined (a refusal code
    /// outside [`REFUSAL_CODES`]).
    pub fn index(self) -> Option<usize> {
        Stat::ALL.iter().position(|s| *s == self)
    }

    /// Its name.
    pub fn name(self) -> String {
        let name = match self {
            Stat::LayersEncrypted => "layers_encrypted",
            Stat::BytesEncrypted => "bytes_encrypted",
            Stat::JsonBlobsPassed => "json_blobs_passed",
            Stat::ManifestsRewritten => "manifests_rewritten",
            Stat::MountsRewritten => "mounts_rewritten",
            Stat::UploadsInFlight => "uploads_in_flight",
            Stat::LedgerCacheEntries => "ledger_cache_entries",
            Stat::LedgerEvictions => "ledger_evictions",
            Stat::UploadSessionsMoved => "upload_sessions_moved",
            Stat::LayerBytes => "layer_bytes",
            Stat::ProjectLookups => "keyservice.project_lookups",
            Stat::ProjectFailures => "keyservice.project_failures",
            Stat::KeystreamAsked => "keystream.asked_bytes",
            Stat::KeystreamUsed => "keystream.used_bytes",
            Stat::KeystreamRefused => "keystream.refused_segments",
            Stat::KeystreamServed => "keystream.served_bytes",
            Stat::KeystreamDeclined => "keystream.declined_requests",
            Stat::TufVersion(role) => {
                let role = match role {
                    TufRole::Root => "root",
                    TufRole::Timestamp => "timestamp",
                    TufRole::Snapshot => "snapshot",
                    TufRole::Targets => "targets",
                };
                return format!("ocicrypt.keyservice.{role}_version");
            }
            // A 502 goes out as `UNKNOWN` (the distribution spec has no code for it), but it
            // means the registry misbehaved, not the gateway: counted apart from the 500s.
            Stat::Refusals(Code::BadGateway) => "refusals.bad_gateway",
            Stat::Refusals(code) => {
                return format!("ocicrypt.refusals.{}", code.as_str().to_ascii_lowercase())
            }
            Stat::ProjectsRemembered => "keyservice.projects_remembered",
            Stat::KeyFetches => "keyservice.fetches",
            Stat::AnsweredFromMemory => "keyservice.answered_from_memory",
            Stat::ResumedLookups => "keyservice.resumed_lookups",
        };
        format!("ocicrypt.{name}")
    }

    /// How the host keeps it.
    pub fn kind(self) -> Kind {
        match self {
            Stat::UploadsInFlight
            | Stat::LedgerCacheEntries
            | Stat::TufVersion(_)
            | Stat::ProjectsRemembered => Kind::Gauge,
            Stat::LayerBytes => Kind::Histogram,
            _ => Kind::Counter,
        }
    }
}

fn add(stat: Stat, n: u64) -> Update {
    Update {
        stat,
        change: Change::Add(i64::try_from(n).unwrap_or(i64::MAX)),
    }
}

fn one(stat: Stat) -> Vec<Update> {
    vec![add(stat, 1)]
}

impl Metric {
    /// What this metric does to the stats, in order (nothing for a refusal code that is not
    /// counted, a delegated role's version, or a change of zero).
    pub fn updates(&self) -> Vec<Update> {
        match self {
            Metric::Refused(code) if REFUSAL_CODES.contains(code) => one(Stat::Refusals(*code)),
            Metric::Refused(_) => Vec::new(),
            Metric::MountRewritten => one(Stat::MountsRewritten),
            Metric::ManifestRewritten => one(Stat::ManifestsRewritten),
            Metric::UploadState(delta) => vec![Update {
                stat: Stat::UploadsInFlight,
                change: Change::Add(*delta),
            }],
            Metric::LedgerCache(change) => {
                let mut out = Vec::new();
                if change.entries != 0 {
                    out.push(Update {
                        stat: Stat::LedgerCacheEntries,
                        change: Change::Add(change.entries),
                    });
                }
                if change.evicted > 0 {
                    out.push(add(Stat::LedgerEvictions, change.evicted));
                }
                out
            }
            Metric::SessionMoved => one(Stat::UploadSessionsMoved),
            Metric::Keystream(report) => [
                (Stat::KeystreamAsked, report.asked),
                (Stat::KeystreamUsed, report.used),
                (Stat::KeystreamRefused, report.refused),
                (Stat::KeystreamServed, report.served),
                (Stat::KeystreamDeclined, report.declined),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(stat, n)| add(stat, n))
            .collect(),
            Metric::LayerEncrypted(size) => vec![
                add(Stat::LayersEncrypted, 1),
                add(Stat::BytesEncrypted, *size),
                Update {
                    stat: Stat::LayerBytes,
                    change: Change::Record(*size),
                },
            ],
            Metric::BlobPassed => one(Stat::JsonBlobsPassed),
            Metric::Key(key) => match key {
                KeyMetric::Remembered(n) => vec![Update {
                    stat: Stat::ProjectsRemembered,
                    change: Change::Set(*n),
                }],
                KeyMetric::Fetch => one(Stat::KeyFetches),
                KeyMetric::FromMemory => one(Stat::AnsweredFromMemory),
                KeyMetric::Resumed => one(Stat::ResumedLookups),
                KeyMetric::ProjectLookup => one(Stat::ProjectLookups),
                KeyMetric::ProjectFailure => one(Stat::ProjectFailures),
                KeyMetric::TufVersion(role, version) => TufRole::of(role)
                    .map(|role| Update {
                        stat: Stat::TufVersion(role),
                        change: Change::Set(*version),
                    })
                    .into_iter()
                    .collect(),
            },
        }
    }
}
