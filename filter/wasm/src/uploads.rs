//! The gateway's table of upload records in Envoy shared data, for a gateway without
//! `replicas` (see `ocicrypt_core::upload_table`): slots read and written with compare-and-set,
//! as every worker shares them, and swept on the root context's timer.
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::upload::UploadRecord;
use ocicrypt_core::upload_table::{self as table, Refused};

use crate::host::SharedData;
use crate::keys;
use crate::metrics::Metrics;

/// Compare-and-set attempts on one slot before giving up (another worker wrote it each time).
const ATTEMPTS: usize = 8;
/// Slots one timer tick sweeps (a shared-data read each, a write where records went idle):
/// with ticks every 2 s, all of them in about half a minute.
const SWEEP_PER_TICK: u32 = 256;

fn now() -> u64 {
    keys::now().max(0).unsigned_abs()
}

fn busy() -> OciError {
    OciError::new(
        Code::Unavailable,
        "the gateway could not record this upload request (busy); retry",
    )
}

/// Applies `change` to the slot holding `upload_id` until the write wins; `change` answers the
/// new value (`None`: nothing to write) and what it did.
fn update<T>(
    upload_id: &str,
    mut change: impl FnMut(&[u8]) -> Result<Option<(Vec<u8>, T)>, OciError>,
) -> Result<Option<T>, OciError> {
    let key = table::slot_key(upload_id);
    for _ in 0..ATTEMPTS {
        let Some((value, cas)) = SharedData.get_cas(&key) else {
            return Err(busy());
        };
        let Some((next, done)) = change(value.as_deref().unwrap_or_default())? else {
            return Ok(None);
        };
        // An absent slot is created only if still absent: a CAS token no live value has.
        let cas = if value.is_none() { u32::MAX } else { cas };
        if SharedData.set_cas(&key, &next, cas) {
            return Ok(Some(done));
        }
    }
    Err(busy())
}

/// `upload_id`'s record (a fresh one for `repository` when it has none), and whether one was
/// saved. A record of another repository is refused: a session id must not be replayed across
/// repositories to continue someone else's keystream.
pub fn load(
    upload_id: &str,
    repository: &str,
    idle_seconds: u64,
) -> Result<(UploadRecord, bool), OciError> {
    let slot = SharedData
        .get_cas(&table::slot_key(upload_id))
        .and_then(|(v, _)| v)
        .unwrap_or_default();
    let Some(bytes) = table::find(&slot, upload_id, now(), idle_seconds) else {
        return Ok((UploadRecord::new(repository), false));
    };
    let record = UploadRecord::from_bytes(&bytes).ok_or_else(|| {
        OciError::new(
            Code::BlobUploadInvalid,
            "the gateway's state of this upload is unreadable; restart the upload",
        )
    })?;
    if record.repository != repository {
        return Err(OciError::new(
            Code::BlobUploadUnknown,
            format!("upload {upload_id} does not belong to repository {repository}"),
        ));
    }
    Ok((record, true))
}

/// Whether `upload_id` has a live record.
pub fn has(upload_id: &str, idle_seconds: u64) -> bool {
    SharedData
        .get_cas(&table::slot_key(upload_id))
        .and_then(|(v, _)| v)
        .is_some_and(|slot| table::find(&slot, upload_id, now(), idle_seconds).is_some())
}

/// Saves `record` as `upload_id`'s; a slot full of live sessions refuses (503, retry).
pub fn save(
    upload_id: &str,
    record: &UploadRecord,
    idle_seconds: u64,
    metrics: &Metrics,
) -> Result<(), OciError> {
    let bytes = record.to_bytes();
    let written = update(upload_id, |slot| {
        match table::put(slot, upload_id, &bytes, now(), idle_seconds) {
            Ok(w) => Ok(Some((w.slot.clone(), w))),
            Err(Refused::Full) => Err(OciError::new(
                Code::Unavailable,
                "the gateway holds as many upload sessions as it keeps state for; finish or abandon others, or retry later",
            )),
            Err(Refused::IdTooLong) => Err(OciError::new(
                Code::BlobUploadInvalid,
                "the registry's upload id is longer than the gateway keeps",
            )),
        }
    })?;
    if let Some(w) = written {
        metrics.upload_state(i64::from(w.added) - count(w.expired));
    }
    Ok(())
}

/// Drops `upload_id`'s record (the upload finished or was cancelled).
pub fn remove(upload_id: &str, idle_seconds: u64, metrics: &Metrics) -> Result<(), OciError> {
    let gone = update(upload_id, |slot| {
        Ok(table::remove(slot, upload_id, now(), idle_seconds))
    })?;
    if let Some(gone) = gone {
        metrics.upload_state(-count(gone));
    }
    Ok(())
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Drops the idle records of the next [`SWEEP_PER_TICK`] slots after `*cursor`.
pub fn sweep(cursor: &mut u32, idle_seconds: u64, metrics: &Metrics) {
    for _ in 0..SWEEP_PER_TICK {
        *cursor = (*cursor + 1) % table::SLOTS;
        let key = table::slot_key_of(*cursor);
        let Some((Some(value), cas)) = SharedData.get_cas(&key) else {
            continue;
        };
        if let Some((next, gone)) = table::sweep(&value, now(), idle_seconds) {
            // Lost to a concurrent write: that write dropped the idle records itself.
            if SharedData.set_cas(&key, &next, cas) {
                metrics.upload_state(-count(gone));
            }
        }
    }
}
