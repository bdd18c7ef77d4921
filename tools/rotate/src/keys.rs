//! The target recipient set: the project's recipients as the gateway itself would verify them
//! (`ocicrypt_core::keys::keyservice::Lookup`: the whole TUF client workflow from the pinned root,
//! then the project's target through the delegations that cover it). Nothing typed on the
//! command line can add a key to it.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use ocicrypt_core::config::KeyServiceConfig;
use ocicrypt_core::format::recipients::Recipient;
use ocicrypt_core::keys::keyservice::{Lookup, Next};
use ocicrypt_core::tuf::MetadataCache;
use ureq::Agent;

/// Where the key service is and what to trust.
pub struct KeyService {
    /// `https://host:port` (the metadata and targets paths are appended).
    pub url: String,
    /// Path prefix of the metadata.
    pub metadata_path: String,
    /// Path prefix of the targets.
    pub targets_path: String,
    /// The pinned `root.json`.
    pub trusted_root: Vec<u8>,
}

/// Metadata versions the recipients were verified with (role, version).
pub type Versions = Vec<(String, u64)>;

/// Unix seconds now.
pub fn now() -> Result<i64, String> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?;
    i64::try_from(d.as_secs()).map_err(|e| e.to_string())
}

/// The verified recipients of `project`, and the metadata versions they were verified with.
pub fn verified_recipients(
    agent: &Agent,
    ks: &KeyService,
    project: &str,
) -> Result<(Vec<Recipient>, Versions), String> {
    let cfg = KeyServiceConfig {
        cluster: String::new(),
        authority: String::new(),
        metadata_path: ks.metadata_path.clone(),
        targets_path: ks.targets_path.clone(),
        trusted_root: ks.trusted_root.clone(),
        refresh_seconds: 60,
        timeout_ms: 30_000,
        max_age_seconds: 180,
        max_projects: 1,
    };
    let now = now()?;
    let (mut lookup, mut next) = Lookup::start(
        &cfg,
        MetadataCache::new(ks.trusted_root.clone()),
        vec![project.to_owned()],
        now,
    );
    let base = ks.url.trim_end_matches('/');
    loop {
        match next {
            Next::Fetch(request) => {
                let url = format!("{base}{}", request.path);
                // Status 0 is "no answer" to the lookup (503 in its messages).
                let (status, body) = match agent.get(&url).call() {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let mut body = Vec::new();
                        // One byte more than allowed, so that the updater sees an over-long
                        // answer as such.
                        let read = resp
                            .into_body()
                            .into_reader()
                            .take(request.max_len.saturating_add(1))
                            .read_to_end(&mut body);
                        match read {
                            Ok(_) => (status, body),
                            Err(e) => {
                                eprintln!("rotate: key service GET {url}: {e}");
                                (0, Vec::new())
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("rotate: key service GET {url}: {e}");
                        (0, Vec::new())
                    }
                };
                next = lookup.on_response(status, &body);
            }
            Next::Done { records, .. } => {
                let record = records
                    .into_iter()
                    .find(|(p, _)| p == project)
                    .map(|(_, r)| r)
                    .ok_or_else(|| {
                        format!("the key service lookup gave no answer for {project}")
                    })?;
                let recipients = record
                    .usable(project, now, i64::MAX)
                    .map_err(|e| format!("project {project}: {e}"))?;
                if recipients.is_empty() {
                    return Err(format!("project {project} has no recipients"));
                }
                return Ok((recipients, record.versions));
            }
        }
    }
}
