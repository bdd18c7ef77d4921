//! Bounded tables in a shared store that has no delete and no listing (Envoy shared data).
//!
//! A key per item would leave a key behind for every item ever stored. A bounded table uses a
//! fixed set of keys ("slots") instead, an item hashing to one of them, and rewrites a slot's
//! value to add, replace or drop items. Several workers share the slots, so every change is a
//! compare-and-set that is retried when another worker wrote the slot in between
//! ([`update`]). Used by the upload records ([`crate::distribution::upload_table`]) and the ledger
//! cache ([`crate::distribution::ledger_cache`]).
//!
//! A slot's value: entries of `[id length: u8][id][written: u64 BE][record length: u32 BE]
//! [record]`. A value that does not parse to its end is read as empty: its entries are
//! neither trusted nor kept.

use sha2::{Digest as _, Sha256};

use crate::error::OciError;
use crate::store::Store;

/// One entry of a slot.
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    /// The item's id (at most 255 bytes).
    pub id: &'a [u8],
    /// Unix seconds of its last write.
    pub written: u64,
    /// The item.
    pub record: &'a [u8],
}

/// The entries of a slot's value, in the order they are stored; a value that does not parse
/// to the end is taken as empty.
pub fn entries(value: &[u8]) -> Vec<Entry<'_>> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let Some(entry) = next_entry(&mut rest) else {
            return Vec::new();
        };
        out.push(entry);
    }
    out
}

fn next_entry<'a>(rest: &mut &'a [u8]) -> Option<Entry<'a>> {
    let (&id_len, tail) = rest.split_first()?;
    let id = tail.get(..usize::from(id_len))?;
    let tail = tail.get(usize::from(id_len)..)?;
    let (written, tail) = tail.split_first_chunk::<8>()?;
    let (len, tail) = tail.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let record = tail.get(..len)?;
    *rest = tail.get(len..)?;
    Some(Entry {
        id,
        written: u64::from_be_bytes(*written),
        record,
    })
}

/// A slot's value holding `entries` (ids must fit a u8 length: checked before they are
/// stored).
pub fn encode(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.push(u8::try_from(e.id.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(e.id);
        out.extend_from_slice(&e.written.to_be_bytes());
        out.extend_from_slice(&u32::try_from(e.record.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(e.record);
    }
    out
}

/// The slot, out of `slots`, that `id` hashes to.
pub fn index(id: &[u8], slots: u32) -> u32 {
    let h = Sha256::digest(id);
    let head: [u8; 4] = h
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .unwrap_or_default();
    u32::from_be_bytes(head) % slots.max(1)
}

/// The value of slot `key` in `store` (empty when absent or unreadable).
pub fn read(store: &dyn Store, key: &str) -> Vec<u8> {
    store.get_cas(key).and_then(|(v, _)| v).unwrap_or_default()
}

/// Compare-and-set attempts on one slot before giving up (another worker wrote it each time).
const ATTEMPTS: usize = 8;

/// Applies `change` to slot `key` in `store` until the write wins; `change` answers the new
/// value (`None`: nothing to write) and what it did. A store that fails, or that another
/// worker wins [`ATTEMPTS`] times in a row, gives `busy()`.
pub fn update<T>(
    store: &dyn Store,
    key: &str,
    busy: fn() -> OciError,
    mut change: impl FnMut(&[u8]) -> Result<Option<(Vec<u8>, T)>, OciError>,
) -> Result<Option<T>, OciError> {
    for _ in 0..ATTEMPTS {
        let Some((value, cas)) = store.get_cas(key) else {
            return Err(busy());
        };
        let Some((next, done)) = change(value.as_deref().unwrap_or_default())? else {
            return Ok(None);
        };
        // An absent slot is created only if still absent: a CAS token no live value has.
        let cas = if value.is_none() { u32::MAX } else { cas };
        if store.set_cas(key, &next, cas) {
            return Ok(Some(done));
        }
    }
    Err(busy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_reads_empty() {
        let value = encode(&[
            Entry {
                id: b"a",
                written: 7,
                record: b"one",
            },
            Entry {
                id: b"",
                written: u64::MAX,
                record: b"",
            },
        ]);
        let back = entries(&value);
        assert_eq!(back.len(), 2);
        assert_eq!(
            (back[0].id, back[0].written, back[0].record),
            (&b"a"[..], 7, &b"one"[..])
        );
        assert_eq!(back[1].written, u64::MAX);
        // Every truncation of a valid value but the entry boundaries reads as empty.
        for cut in 1..value.len() {
            let n = entries(&value[..cut]).len();
            assert!(n == 0 || cut == 1 + 1 + 8 + 4 + 3, "cut {cut}: {n}");
        }
        assert!(entries(&[200, 1, 2]).is_empty());
        assert!(entries(&[]).is_empty());
    }

    #[test]
    fn index_spreads_and_stays_in_range() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u32 {
            let n = index(&i.to_be_bytes(), 16);
            assert!(n < 16);
            seen.insert(n);
        }
        assert_eq!(seen.len(), 16);
        assert_eq!(index(b"x", 0), 0);
        assert_eq!(index(b"x", 1), 0);
    }
}
