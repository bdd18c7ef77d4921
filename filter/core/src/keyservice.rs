//! Recipient keys from the TUF key service (DESIGN §6): which files to fetch, what a verified
//! answer means for each project, and how long it may be used.
//!
//! A [`Lookup`] runs one TUF update cycle (root chain, timestamp, snapshot, targets) and then
//! downloads `projects/<project>.json` for each project asked for, verified through the
//! delegations that cover it. The adapter runs its fetches as callouts. The result for each
//! project is a [`KeyRecord`], kept in shared data so every worker uses the same verified keys;
//! a record is usable only while it is fresh and its metadata unexpired.
use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigError, KeyServiceConfig};
use crate::recipients::Recipient;
use crate::tuf::{
    self, FetchBase, MetadataCache, Outcome, Progress, TufError, Updater, UpdaterConfig,
};

/// Target path of a project's recipients document.
pub fn recipients_target(project: &str) -> String {
    format!("projects/{project}.json")
}

/// Shared-data key of a project's record.
pub fn record_key(project: &str) -> String {
    // Under a folder of its own: no project name can collide with the list of projects.
    format!("ocicrypt/keys/project/{project}")
}

/// Shared-data key of the newest trusted TUF metadata (exact bytes).
pub const METADATA_KEY: &str = "ocicrypt/tuf/metadata";

/// Why recipients cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyServiceError {
    /// TUF verification or download failed.
    #[error("key service metadata did not verify: {0}")]
    Tuf(#[from] TufError),
    /// The key service answered with an HTTP error or not at all.
    #[error("key service unreachable or failing (HTTP {status} for {path})")]
    Unreachable {
        /// HTTP status (504 for a timeout, 503 when no answer).
        status: u16,
        /// What was fetched.
        path: String,
    },
    /// The verified document is not a recipients document.
    #[error("the verified recipients document of project {project:?} is invalid: {reason}")]
    Document {
        /// Project.
        project: String,
        /// What is wrong.
        reason: String,
    },
}

/// Verified recipients of one project, or why there are none; what workers share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Unix seconds of the update cycle that produced this record.
    pub checked_at: i64,
    /// Earliest expiry (unix seconds) of the metadata the recipients were verified with.
    pub expires_at: i64,
    /// The verified recipients document (JSON text), when the cycle succeeded.
    pub document: Option<String>,
    /// Why the cycle failed, when it did.
    pub error: Option<String>,
    /// Version of the root, timestamp, snapshot and targets metadata used.
    pub versions: Vec<(String, u64)>,
}

impl KeyRecord {
    /// Serialized form for shared data.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a record; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<KeyRecord> {
        serde_json::from_slice(bytes).ok()
    }

    /// The recipients to encrypt to at `now`, or why they cannot be used. A record is fresh
    /// for `max_age` seconds after its cycle: past that, a refresh must succeed again (the
    /// timer refreshes well before), so a key service that went away, or began serving
    /// metadata that does not verify, stops pushes instead of freezing the keys in place.
    pub fn usable(&self, project: &str, now: i64, max_age: i64) -> Result<Vec<Recipient>, String> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        if now >= self.expires_at {
            return Err("the key service metadata has expired".to_string());
        }
        if now.saturating_sub(self.checked_at) > max_age {
            return Err(format!(
                "the recipients were last verified {}s ago (limit {max_age}s)",
                now - self.checked_at
            ));
        }
        let document = self.document.as_deref().ok_or("no recipients document")?;
        parse_document(document.as_bytes(), project).map_err(|e| e.to_string())
    }
}

/// Parses `{"project": "<p>", "recipients": [{"pem": …} | {"jwk": …}, …]}`.
pub fn parse_document(bytes: &[u8], project: &str) -> Result<Vec<Recipient>, KeyServiceError> {
    let bad = |reason: String| KeyServiceError::Document {
        project: project.to_string(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".to_string()))?;
    if let Some(named) = obj.get("project") {
        let target = recipients_target(project);
        if named.as_str() != Some(project) && named.as_str() != Some(target.as_str()) {
            // A document of another project served under this one's path: a mix-and-match.
            return Err(bad(format!("it names project {named}")));
        }
    }
    let recipients = obj
        .get("recipients")
        .cloned()
        .ok_or_else(|| bad("no \"recipients\" field".to_string()))?;
    config::compile_recipients(recipients, "recipients")
        .map_err(|e: ConfigError| bad(e.to_string()))
}

/// A fetch the adapter must make: `GET <path>` on the key service cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Absolute request path (with the metadata or targets prefix).
    pub path: String,
    /// Largest acceptable body.
    pub max_len: u64,
}

/// What a lookup needs next.
#[derive(Debug)]
pub enum Next {
    /// Fetch this and call [`Lookup::on_response`].
    Fetch(Request),
    /// Finished: a record per project asked for, and the metadata to trust from now on.
    Done {
        /// `(project, record)` in the order asked.
        records: Vec<(String, KeyRecord)>,
        /// Newest trusted metadata (persist in shared data), when the refresh succeeded.
        metadata: Option<TrustedMetadata>,
    },
}

/// One update cycle for a set of projects.
pub struct Lookup {
    updater: Updater,
    projects: Vec<String>,
    done: Vec<(String, KeyRecord)>,
    current: Option<String>,
    now: i64,
    metadata_path: String,
    targets_path: String,
    last_path: String,
}

impl Lookup {
    /// Starts a cycle at `now` from `metadata` (the pinned root, or newer trusted metadata).
    pub fn start(
        cfg: &KeyServiceConfig,
        metadata: MetadataCache,
        projects: Vec<String>,
        now: i64,
    ) -> (Lookup, Next) {
        let mut lookup = Lookup {
            updater: Updater::new(metadata, UpdaterConfig::default()),
            projects,
            done: Vec::new(),
            current: None,
            now,
            metadata_path: cfg.metadata_path.trim_end_matches('/').to_string(),
            targets_path: cfg.targets_path.trim_end_matches('/').to_string(),
            last_path: String::new(),
        };
        let progress = lookup.updater.start_refresh(now);
        let next = lookup.advance(progress);
        (lookup, next)
    }

    /// Takes the answer to the last [`Next::Fetch`]. `status` 0 means no answer at all.
    pub fn on_response(&mut self, status: u16, body: &[u8]) -> Next {
        let progress = self.updater.on_response(status, body);
        self.advance(progress)
    }

    fn advance(&mut self, mut progress: Result<Progress, TufError>) -> Next {
        loop {
            match progress {
                Ok(Progress::Fetch(fetch)) => {
                    let base = match fetch.base {
                        FetchBase::Metadata => &self.metadata_path,
                        FetchBase::Targets => &self.targets_path,
                    };
                    self.last_path = format!("{base}/{}", fetch.path);
                    return Next::Fetch(Request {
                        path: self.last_path.clone(),
                        max_len: fetch.max_len,
                    });
                }
                Ok(Progress::Done(Outcome::Downloaded { bytes, .. })) => {
                    if let Some(project) = self.current.take() {
                        let record = match parse_document(&bytes, &project) {
                            Ok(_) => self
                                .record(Some(String::from_utf8_lossy(&bytes).into_owned()), None),
                            Err(e) => self.record(None, Some(e.to_string())),
                        };
                        self.done.push((project, record));
                    }
                }
                Ok(Progress::Done(_)) => {}
                Err(e) => {
                    let error = self.describe(e);
                    match self.current.take() {
                        // A project-level failure (unknown project, tampered document) does
                        // not condemn the other projects.
                        Some(project) if self.updater.is_refreshed() => {
                            let record = self.record(None, Some(error));
                            self.done.push((project, record));
                        }
                        current => {
                            let failed: Vec<String> =
                                current.into_iter().chain(self.projects.drain(..)).collect();
                            for project in failed {
                                let record = self.record(None, Some(error.clone()));
                                self.done.push((project, record));
                            }
                            return self.finish();
                        }
                    }
                }
            }
            // The refresh (or the previous project) is done: next project.
            let Some(project) = self.projects.pop() else {
                return self.finish();
            };
            progress = self
                .updater
                .start_fetch_target(&recipients_target(&project));
            self.current = Some(project);
        }
    }

    fn describe(&self, e: TufError) -> String {
        match &e {
            TufError::Download(_) => {
                KeyServiceError::Unreachable {
                    status: 0,
                    path: self.last_path.clone(),
                }
                .to_string()
                    + &format!(" ({e})")
            }
            TufError::TargetNotFound { .. } => {
                format!("the key service has no recipients for this project ({e})")
            }
            _ => KeyServiceError::Tuf(e).to_string(),
        }
    }

    fn record(&self, document: Option<String>, error: Option<String>) -> KeyRecord {
        let (expires_at, versions) = match self.updater.trusted() {
            Some(set) => {
                let mut expires = set.root().signed.common.expires;
                let mut versions = vec![("root".to_string(), set.root().signed.common.version)];
                if let Some(t) = set.timestamp() {
                    expires = expires.min(t.signed.common.expires);
                    versions.push(("timestamp".to_string(), t.signed.common.version));
                }
                if let Some(s) = set.snapshot() {
                    expires = expires.min(s.signed.common.expires);
                    versions.push(("snapshot".to_string(), s.signed.common.version));
                }
                if let Some(t) = set.targets(tuf::metadata::TARGETS) {
                    expires = expires.min(t.signed.common.expires);
                    versions.push(("targets".to_string(), t.signed.common.version));
                }
                (expires, versions)
            }
            None => (self.now, Vec::new()),
        };
        KeyRecord {
            checked_at: self.now,
            expires_at,
            document,
            error,
            versions,
        }
    }

    fn finish(&mut self) -> Next {
        let metadata = match (self.updater.is_refreshed(), self.updater.trusted()) {
            (true, Some(set)) => Some(TrustedMetadata {
                root_version: set.root().signed.common.version,
                timestamp_version: set.timestamp().map_or(0, |t| t.signed.common.version),
                cache: self.updater.cache().clone(),
            }),
            _ => None,
        };
        Next::Done {
            records: std::mem::take(&mut self.done),
            metadata,
        }
    }
}

/// Trusted metadata to persist between cycles, with the versions that order it: a worker
/// must never replace newer trusted metadata with older (that would reopen rollbacks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedMetadata {
    /// Version of the trusted root.
    pub root_version: u64,
    /// Version of the trusted timestamp (0 when none).
    pub timestamp_version: u64,
    /// The exact bytes.
    pub cache: MetadataCache,
}

impl TrustedMetadata {
    /// Whether `self` may replace `current`.
    pub fn supersedes(&self, current: &TrustedMetadata) -> bool {
        (self.root_version, self.timestamp_version)
            >= (current.root_version, current.timestamp_version)
    }

    /// Serialized form for shared data (metadata bytes in base64: hashes cover exact bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let targets: std::collections::BTreeMap<&String, String> = self
            .cache
            .targets
            .iter()
            .map(|(k, v)| (k, b64(v)))
            .collect();
        let v = serde_json::json!({
            "root_version": self.root_version,
            "timestamp_version": self.timestamp_version,
            "root": b64(&self.cache.root),
            "timestamp": self.cache.timestamp.as_deref().map(b64),
            "snapshot": self.cache.snapshot.as_deref().map(b64),
            "targets": targets,
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// Reads [`TrustedMetadata::to_bytes`] output.
    pub fn from_bytes(bytes: &[u8]) -> Option<TrustedMetadata> {
        use base64::Engine as _;
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let dec = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str()?)
                .ok()
        };
        let opt = |name: &str| match v.get(name) {
            Some(serde_json::Value::Null) | None => Some(None),
            Some(x) => dec(x).map(Some),
        };
        let mut cache = MetadataCache::new(dec(v.get("root")?)?);
        cache.timestamp = opt("timestamp")?;
        cache.snapshot = opt("snapshot")?;
        for (k, x) in v.get("targets")?.as_object()? {
            cache.targets.insert(k.clone(), dec(x)?);
        }
        Some(TrustedMetadata {
            root_version: v.get("root_version")?.as_u64()?,
            timestamp_version: v.get("timestamp_version")?.as_u64()?,
            cache,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_freshness_and_expiry() {
        let doc = r#"{"project":"demo","recipients":[{"jwk":{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}}]}"#;
        let rec = KeyRecord {
            checked_at: 1000,
            expires_at: 5000,
            document: Some(doc.into()),
            error: None,
            versions: vec![],
        };
        assert_eq!(rec.usable("demo", 1100, 180).unwrap().len(), 1);
        assert!(rec
            .usable("demo", 1181, 180)
            .unwrap_err()
            .contains("last verified"));
        assert!(rec
            .usable("demo", 5000, 1_000_000)
            .unwrap_err()
            .contains("expired"));
        assert!(rec
            .usable("other", 1100, 180)
            .unwrap_err()
            .contains("names project"));
        let failed = KeyRecord {
            error: Some("bad signature".into()),
            ..rec.clone()
        };
        assert_eq!(
            failed.usable("demo", 1100, 180).unwrap_err(),
            "bad signature"
        );
        assert_eq!(KeyRecord::from_bytes(&rec.to_bytes()), Some(rec));
    }

    #[test]
    fn documents_are_checked() {
        assert!(parse_document(b"[]", "demo").is_err());
        assert!(parse_document(br#"{"project":"demo","recipients":[]}"#, "demo").is_err());
        assert!(parse_document(br#"{"project":"demo"}"#, "demo").is_err());
    }
}
