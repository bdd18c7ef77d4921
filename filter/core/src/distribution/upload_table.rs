//! The gateway's own table of upload records, for a gateway without `replicas` (whose records
//! travel sealed in the `Location` instead).
//!
//! Records live in one process's shared store (Envoy shared data), which has no delete and no
//! listing: a key per upload session would leave a key behind for every upload ever made, and
//! an abandoned session's record (layer key and hash state) for good. So records are kept in a
//! fixed number of slots (a session id hashes to one), each holding at most
//! [`RECORDS_PER_SLOT`] records stamped with the time they were last written. A record not
//! written for the idle limit (`limits.upload_idle_seconds`) is dropped — when its slot is next
//! written, and by a sweep the adapter runs on its timer — and its session then cannot go on
//! (the registry holds bytes the gateway has no state for: the client restarts the upload). A
//! slot full of live records refuses a new session (`503`, retry) instead of growing. The store
//! is therefore bounded by `SLOTS × RECORDS_PER_SLOT` records, whatever clients do.
//!
//! A slot's value is [`crate::distribution::slots`]'s. Pure functions over that value; the adapter
//! reads and writes slots with compare-and-set, as several workers share them.

use crate::distribution::slots::{self, encode, entries, Entry};
use crate::distribution::upload::UploadRecord;
use crate::error::{Code, OciError};
use crate::store::Store;

/// Slots the records are spread over: enough that 10 000 sessions in progress fill none
/// (2.4 per slot on average).
pub const SLOTS: u32 = 4096;
/// Records one slot holds at most: with [`SLOTS`], 65 536 upload sessions in progress, about
/// 25 MB of records at most.
pub const RECORDS_PER_SLOT: usize = 16;
/// Default `limits.upload_idle_seconds`: a session not continued for an hour is dead for every
/// client we know (they send a blob's requests back to back).
pub const DEFAULT_IDLE_SECONDS: u64 = 3600;

/// Shared-store key of the slot holding `upload_id`'s record.
pub fn slot_key(upload_id: &str) -> String {
    slot_key_of(slot_of(upload_id))
}

/// Shared-store key of slot number `n` (for the sweep).
pub fn slot_key_of(n: u32) -> String {
    format!("ocicrypt/uploads/{n}")
}

fn slot_of(upload_id: &str) -> u32 {
    slots::index(upload_id.as_bytes(), SLOTS)
}

fn live(e: &Entry<'_>, now: u64, idle_seconds: u64) -> bool {
    now.saturating_sub(e.written) < idle_seconds
}

/// `upload_id`'s record in a slot, unless it has been idle for `idle_seconds` or more.
pub fn find(slot: &[u8], upload_id: &str, now: u64, idle_seconds: u64) -> Option<Vec<u8>> {
    entries(slot)
        .into_iter()
        .find(|e| e.id == upload_id.as_bytes() && live(e, now, idle_seconds))
        .map(|e| e.record.to_vec())
}

/// What writing a record did to a slot.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    /// The slot's new value.
    pub slot: Vec<u8>,
    /// Whether the session had no live record before (a new entry).
    pub added: bool,
    /// Idle records dropped on the way.
    pub expired: usize,
}

/// Why a record could not be written.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The slot holds [`RECORDS_PER_SLOT`] live records of other sessions.
    Full,
    /// An upload id longer than 255 bytes (distribution's are 36).
    IdTooLong,
}

/// The slot with `upload_id`'s record set to `record`, written at `now`; idle records are
/// dropped on the way.
pub fn put(
    slot: &[u8],
    upload_id: &str,
    record: &[u8],
    now: u64,
    idle_seconds: u64,
) -> Result<Written, Refused> {
    if upload_id.len() > usize::from(u8::MAX) {
        return Err(Refused::IdTooLong);
    }
    let all = entries(slot);
    let before = all.len();
    let mut kept: Vec<Entry<'_>> = all
        .into_iter()
        .filter(|e| live(e, now, idle_seconds))
        .collect();
    let expired = before - kept.len();
    let existing = kept.iter().position(|e| e.id == upload_id.as_bytes());
    let added = existing.is_none();
    let entry = Entry {
        id: upload_id.as_bytes(),
        written: now,
        record,
    };
    if let Some(slot_entry) = existing.and_then(|i| kept.get_mut(i)) {
        *slot_entry = entry;
    } else if kept.len() >= RECORDS_PER_SLOT {
        return Err(Refused::Full);
    } else {
        kept.push(entry);
    }
    Ok(Written {
        slot: encode(&kept),
        added,
        expired,
    })
}

/// The slot without `upload_id`'s record, and how many entries went (that one if live, and the
/// idle ones on the way), or `None` when nothing changes.
pub fn remove(
    slot: &[u8],
    upload_id: &str,
    now: u64,
    idle_seconds: u64,
) -> Option<(Vec<u8>, usize)> {
    let all = entries(slot);
    let before = all.len();
    let kept: Vec<Entry<'_>> = all
        .into_iter()
        .filter(|e| e.id != upload_id.as_bytes() && live(e, now, idle_seconds))
        .collect();
    let gone = before - kept.len();
    (gone > 0).then(|| (encode(&kept), gone))
}

/// The slot without its idle records and how many went, or `None` when none is idle.
pub fn sweep(slot: &[u8], now: u64, idle_seconds: u64) -> Option<(Vec<u8>, usize)> {
    let all = entries(slot);
    let before = all.len();
    let kept: Vec<Entry<'_>> = all
        .into_iter()
        .filter(|e| live(e, now, idle_seconds))
        .collect();
    let gone = before - kept.len();
    (gone > 0).then(|| (encode(&kept), gone))
}

/// Live records in a slot.
pub fn count(slot: &[u8], now: u64, idle_seconds: u64) -> usize {
    entries(slot)
        .iter()
        .filter(|e| live(e, now, idle_seconds))
        .count()
}

fn busy() -> OciError {
    OciError::new(
        Code::Unavailable,
        "the gateway could not record this upload request (busy); retry",
    )
}

/// Applies `change` to the slot holding `upload_id` in `store` until the write wins.
fn update<T>(
    store: &dyn Store,
    upload_id: &str,
    change: impl FnMut(&[u8]) -> Result<Option<(Vec<u8>, T)>, OciError>,
) -> Result<Option<T>, OciError> {
    slots::update(store, &slot_key(upload_id), busy, change)
}

/// `upload_id`'s record in `store` at `now` (a fresh one for `repository` when it has none),
/// and whether one was saved. A record of another repository is refused: a session id must
/// not be replayed across repositories to continue someone else's keystream.
pub fn load_in(
    store: &dyn Store,
    upload_id: &str,
    repository: &str,
    now: u64,
    idle_seconds: u64,
) -> Result<(UploadRecord, bool), OciError> {
    let slot = slots::read(store, &slot_key(upload_id));
    let Some(bytes) = find(&slot, upload_id, now, idle_seconds) else {
        return Ok((UploadRecord::new(repository), false));
    };
    Ok((
        UploadRecord::saved_for(&bytes, upload_id, repository)?,
        true,
    ))
}

/// Whether `upload_id` has a live record in `store` at `now`.
pub fn has_in(store: &dyn Store, upload_id: &str, now: u64, idle_seconds: u64) -> bool {
    find(
        &slots::read(store, &slot_key(upload_id)),
        upload_id,
        now,
        idle_seconds,
    )
    .is_some()
}

/// Saves `record` as `upload_id`'s in `store`; a slot full of live sessions refuses (503,
/// retry). Answers how the number of live records changed.
pub fn save_in(
    store: &dyn Store,
    upload_id: &str,
    record: &UploadRecord,
    now: u64,
    idle_seconds: u64,
) -> Result<i64, OciError> {
    let bytes = record.to_bytes();
    let written = update(store, upload_id, |slot| {
        match put(slot, upload_id, &bytes, now, idle_seconds) {
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
    Ok(written.map_or(0, |w| i64::from(w.added) - signed(w.expired)))
}

/// Drops `upload_id`'s record from `store` (the upload finished or was cancelled). Answers
/// how many live records went (idle ones dropped on the way included).
pub fn remove_in(
    store: &dyn Store,
    upload_id: &str,
    now: u64,
    idle_seconds: u64,
) -> Result<i64, OciError> {
    let gone = update(store, upload_id, |slot| {
        Ok(remove(slot, upload_id, now, idle_seconds))
    })?;
    Ok(gone.map_or(0, signed))
}

fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: u64 = 60;

    #[test]
    fn records_round_trip_and_replace() {
        let w = put(&[], "a", b"one", 100, IDLE).unwrap();
        assert!(w.added);
        assert_eq!(find(&w.slot, "a", 110, IDLE).as_deref(), Some(&b"one"[..]));
        assert_eq!(find(&w.slot, "b", 110, IDLE), None);
        let w2 = put(&w.slot, "a", b"two", 120, IDLE).unwrap();
        assert!(!w2.added);
        assert_eq!(find(&w2.slot, "a", 121, IDLE).as_deref(), Some(&b"two"[..]));
        assert_eq!(count(&w2.slot, 121, IDLE), 1);
        let (empty, gone) = remove(&w2.slot, "a", 122, IDLE).unwrap();
        assert_eq!(gone, 1);
        assert!(empty.is_empty());
        assert_eq!(remove(&empty, "a", 122, IDLE), None);
    }

    #[test]
    fn idle_records_are_gone_and_dropped() {
        let w = put(&[], "old", b"x", 100, IDLE).unwrap();
        assert_eq!(
            find(&w.slot, "old", 100 + IDLE, IDLE),
            None,
            "idle: not found"
        );
        let w2 = put(&w.slot, "new", b"y", 100 + IDLE, IDLE).unwrap();
        assert_eq!(w2.expired, 1);
        assert_eq!(count(&w2.slot, 100 + IDLE, IDLE), 1);
        let w3 = put(&w2.slot, "other", b"z", 100 + IDLE, IDLE).unwrap();
        let (swept, gone) = sweep(&w3.slot, 100 + 3 * IDLE, IDLE).unwrap();
        assert_eq!(gone, 2);
        assert!(swept.is_empty());
        assert_eq!(sweep(&swept, 100 + 3 * IDLE, IDLE), None);
    }

    #[test]
    fn a_full_slot_refuses_new_sessions_until_one_goes_idle() {
        let mut slot = Vec::new();
        for i in 0..RECORDS_PER_SLOT {
            slot = put(&slot, &format!("s{i}"), &[7u8; 300], 1000, IDLE)
                .unwrap()
                .slot;
        }
        assert_eq!(put(&slot, "one-more", b"r", 1001, IDLE), Err(Refused::Full));
        // A session already there is still written.
        assert!(put(&slot, "s3", b"r", 1001, IDLE).is_ok());
        // Once the others are idle, the new one gets in.
        let w = put(&slot, "one-more", b"r", 1000 + IDLE, IDLE).unwrap();
        assert_eq!(w.expired, RECORDS_PER_SLOT);
        assert_eq!(count(&w.slot, 1000 + IDLE, IDLE), 1);
    }

    #[test]
    fn the_store_is_bounded_whatever_the_ids() {
        // 50 000 sessions opened and abandoned at one instant: at most SLOTS x RECORDS_PER_SLOT
        // are kept, every slot value stays under its bound.
        let mut slots = std::collections::HashMap::<String, Vec<u8>>::new();
        let (mut kept, mut refused) = (0usize, 0usize);
        for i in 0..50_000 {
            let id = format!("{:08x}-upload-{i}", i * 2_654_435_761u64);
            let key = slot_key(&id);
            let slot = slots.get(&key).cloned().unwrap_or_default();
            match put(&slot, &id, &[1u8; 320], 5, IDLE) {
                Ok(w) => {
                    kept += 1;
                    slots.insert(key, w.slot);
                }
                Err(Refused::Full) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(kept <= SLOTS as usize * RECORDS_PER_SLOT);
        assert_eq!(kept + refused, 50_000);
        let bound = RECORDS_PER_SLOT * (1 + 255 + 8 + 4 + 320);
        assert!(slots.values().all(|v| v.len() <= bound));
        assert!(slots.len() <= SLOTS as usize);
    }

    #[test]
    fn garbage_and_long_ids() {
        assert_eq!(find(&[200, 1, 2], "a", 0, IDLE), None);
        assert!(put(&[200, 1, 2], "a", b"r", 0, IDLE).unwrap().added);
        assert_eq!(
            put(&[], &"x".repeat(256), b"r", 0, IDLE),
            Err(Refused::IdTooLong)
        );
    }
}
