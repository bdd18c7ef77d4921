//! Recipient keys in the adapter: verified records in Envoy shared data, and the callouts that
//! run a key-service [`Lookup`]. Both the root context's timer and a stream that finds no usable
//! record drive lookups; whoever finishes one publishes its result to every worker.
use std::time::Duration;

use crate::host::{self, SharedData};
use ocicrypt_core::config::{Config, KeyServiceConfig};
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::keyservice::{self, KeyRecord, Lookup, Next, Request, TrustedMetadata};
use ocicrypt_core::recipients::Recipient;
use ocicrypt_core::tuf::MetadataCache;
use ocicrypt_core::upload::Store;

/// Shared-data key listing the projects whose keys the timer keeps fresh.
const PROJECTS_KEY: &str = "ocicrypt/keys/projects";
/// Shared-data key of the timer lease (one worker refreshes per period).
const LEASE_KEY: &str = "ocicrypt/tuf/lease";
/// A failure younger than this is answered from the record instead of asking again, so a
/// failing key service is not hammered by every push.
const RETRY_AFTER_FAILURE_SECS: i64 = 5;

/// Unix seconds from the host clock.
pub fn now() -> i64 {
    host::now_since_epoch().map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What a stream can do about a project's recipients right now.
pub enum Resolution {
    /// Encrypt to these.
    Ready(Vec<Recipient>),
    /// Run a lookup for the project, then ask again.
    LookUp,
}

fn unavailable(project: &str, reason: &str) -> OciError {
    OciError::new(
        Code::Unavailable,
        format!(
            "no verified recipient keys for project {project:?}: {reason}; nothing was stored. \
             Retry later, or ask the key-service owners to publish the project's recipients"
        ),
    )
}

/// The recipients of `project`: inline ones from the configuration (explicit, untouched by
/// TUF), else a fresh verified record of the key service.
pub fn resolve(
    config: &Config,
    project: &str,
    now: i64,
    looked_up: bool,
) -> Result<Resolution, OciError> {
    if let Some(inline) = config.recipients(project) {
        return Ok(Resolution::Ready(inline.to_vec()));
    }
    let Some(ks) = &config.key_service else {
        return Err(unavailable(
            project,
            "the gateway has no key service and no inline recipients for it",
        ));
    };
    let max_age = i64::try_from(ks.max_age_seconds).unwrap_or(i64::MAX);
    let record = SharedData
        .get(&keyservice::record_key(project))
        .and_then(|b| KeyRecord::from_bytes(&b));
    match record {
        Some(record) => match record.usable(project, now, max_age) {
            Ok(recipients) => Ok(Resolution::Ready(recipients)),
            Err(reason)
                if looked_up
                    || (record.error.is_some()
                        && now - record.checked_at < RETRY_AFTER_FAILURE_SECS) =>
            {
                Err(unavailable(project, &reason))
            }
            Err(_) => Ok(Resolution::LookUp),
        },
        None if looked_up => Err(unavailable(
            project,
            "the key service lookup gave no answer",
        )),
        None => Ok(Resolution::LookUp),
    }
}

/// The trusted metadata to start a cycle from: the newest any worker verified, else the pin.
pub fn trusted_metadata(ks: &KeyServiceConfig) -> MetadataCache {
    SharedData
        .get(keyservice::METADATA_KEY)
        .and_then(|b| TrustedMetadata::from_bytes(&b))
        .map_or_else(|| MetadataCache::new(ks.trusted_root.clone()), |m| m.cache)
}

/// Starts a lookup of `projects`.
pub fn start(ks: &KeyServiceConfig, projects: Vec<String>, now: i64) -> (Lookup, Next) {
    Lookup::start(ks, trusted_metadata(ks), projects, now)
}

/// Sends a lookup's fetch; `Err` when the host refused the callout.
pub fn dispatch(ks: &KeyServiceConfig, req: &Request) -> Result<u32, ()> {
    let headers = vec![
        (":method", "GET"),
        (":path", req.path.as_str()),
        (":authority", ks.authority.as_str()),
    ];
    host::dispatch(
        &ks.cluster,
        headers,
        None,
        Duration::from_millis(ks.timeout_ms),
    )
}

/// Where a lookup stands after being driven.
pub enum Driven {
    /// Waiting for the answer to this callout token.
    Waiting(Box<Lookup>, u32),
    /// Finished (not yet published).
    Done(Vec<(String, KeyRecord)>, Option<TrustedMetadata>),
}

/// Runs a lookup until it waits on a callout or is finished. A callout the host refuses
/// counts as an unanswered fetch (the lookup then fails closed).
pub fn drive(ks: &KeyServiceConfig, mut lookup: Lookup, mut next: Next) -> Driven {
    loop {
        match next {
            Next::Fetch(req) => match dispatch(ks, &req) {
                Ok(token) => return Driven::Waiting(Box::new(lookup), token),
                Err(()) => next = lookup.on_response(0, &[]),
            },
            Next::Done { records, metadata } => return Driven::Done(records, metadata),
        }
    }
}

/// Status and body of the callout answer being delivered. A callout that failed after its
/// headers (a body cut short, a timeout, an answer over Envoy's limit) has no answer to read:
/// status 0, which the lookup counts as unanswered (fails closed), never a panic.
pub fn response(body_size: usize) -> (u16, Vec<u8>) {
    let status = host::call_status().unwrap_or(0);
    let body = if status == 0 {
        Vec::new()
    } else {
        host::call_body(body_size).unwrap_or_default()
    };
    (status, body)
}

/// Publishes a finished lookup: records for every worker, and the newer trusted metadata.
pub fn publish(records: &[(String, KeyRecord)], metadata: Option<TrustedMetadata>) {
    if let Some(new) = metadata {
        let current = SharedData
            .get(keyservice::METADATA_KEY)
            .and_then(|b| TrustedMetadata::from_bytes(&b));
        if current.is_none_or(|c| new.supersedes(&c)) {
            let _ = SharedData.set(keyservice::METADATA_KEY, &new.to_bytes());
        }
    }
    for (project, record) in records {
        let _ = SharedData.set(&keyservice::record_key(project), &record.to_bytes());
        remember(project);
    }
}

/// Adds a project to the set the timer refreshes.
fn remember(project: &str) {
    for _ in 0..4 {
        let Some((value, cas)) = SharedData.get_cas(PROJECTS_KEY) else {
            return;
        };
        let mut projects: Vec<String> = value
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        if projects.iter().any(|p| p == project) {
            return;
        }
        projects.push(project.to_string());
        let bytes = serde_json::to_vec(&projects).unwrap_or_default();
        // Compare-and-set: two workers adding projects at once must not lose one.
        if SharedData.set_cas(PROJECTS_KEY, &bytes, cas) {
            return;
        }
    }
}

/// Projects the timer refreshes.
pub fn projects() -> Vec<String> {
    SharedData
        .get(PROJECTS_KEY)
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default()
}

/// Takes the refresh lease for `secs` when no other worker holds it.
pub fn take_lease(now: i64, secs: i64) -> bool {
    let Some((value, cas)) = SharedData.get_cas(LEASE_KEY) else {
        return false;
    };
    let until = value
        .and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
        })
        .unwrap_or(0);
    if until > now {
        return false;
    }
    let next = (now + secs).to_string();
    SharedData.set_cas(LEASE_KEY, next.as_bytes(), cas)
}
