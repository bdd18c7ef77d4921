//! The ledger entries a gateway process keeps in its shared store (Envoy shared data): a
//! bounded cache.
//!
//! Every encrypted blob leaves ledger entries (under its plaintext and its ciphertext digest),
//! every stored manifest one, and every record read back from the registry's ledger one more.
//! Envoy's shared data has no delete, so a key per entry would grow for as long as the process
//! lives (≈ 6 KiB per encrypted layer with two recipients, measured). The entries are kept in a
//! fixed set of slots instead ([`crate::distribution::slots`]): an entry's key hashes to one slot,
//! a slot holds at most [`Shape::per_slot`] entries in the order they were last written, and
//! writing one more to a full slot evicts the least recently written one. The capacity
//! (`limits.ledger_cache_entries`) bounds the entries held, whatever is pushed; a write is
//! never refused for room.
//!
//! What an eviction costs depends on where else the ledger lives:
//! - with `replicas.state_key`, the registry holds the authenticated ledger: an evicted entry
//!   is read back from it the next time a manifest or a `HEAD` names the digest (one `GET`);
//! - without, the cache is the only record: an evicted blob is unknown again (a `HEAD` answers
//!   `404` and the client uploads it again, to be encrypted again), and a manifest naming it is
//!   refused until it is pushed again.
//!
//! An entry is stored as `[key length: u16 BE][key][`[`LedgerEntry::to_bytes`]`]` under the
//! SHA-256 of its key ([`crate::distribution::ledger::key`]: repository and digest) as the slot id.
//! It is found only when the key stored in it is exactly the one asked for and the entry parses in
//! full: a slot value that does not parse, or an entry that does not, is never trusted (and is
//! dropped when the slot is next written).

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::distribution::ledger::{self, LedgerEntry};
use crate::distribution::slots::{self, encode, entries, Entry};
use crate::error::{Code, OciError};
use crate::store::Store;

/// Entries one slot holds at most: a write copies the slot's value (≤ 16 × 3 KiB) in and out.
pub const ENTRIES_PER_SLOT: usize = 16;
/// Default `limits.ledger_cache_entries`: ≈ 8 000 encrypted layers (two entries each), 31 to
/// 48 MiB of slot values with two recipients (1.9 to 3.1 KiB an entry, see the tests).
pub const DEFAULT_ENTRIES: usize = 16_384;
/// Largest accepted `limits.ledger_cache_entries`.
pub const MAX_ENTRIES: u64 = 1 << 20;

/// How the cache's capacity is laid out: `slots` slots of at most `per_slot` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Slot keys used.
    pub slots: u32,
    /// Entries a slot holds at most.
    pub per_slot: usize,
}

impl Shape {
    /// The layout for a capacity of `entries` (at least 1): as many slots of at most
    /// [`ENTRIES_PER_SLOT`] as it takes, evenly filled, never more than `entries` in all.
    pub fn for_entries(entries: usize) -> Shape {
        let entries = entries.max(1);
        let slots = entries.div_ceil(ENTRIES_PER_SLOT);
        Shape {
            slots: u32::try_from(slots).unwrap_or(u32::MAX),
            per_slot: entries / slots,
        }
    }

    /// Entries the cache holds at most.
    pub fn capacity(&self) -> usize {
        usize::try_from(self.slots)
            .unwrap_or(usize::MAX)
            .saturating_mul(self.per_slot)
    }
}

/// Shared-store key of slot number `n`.
pub fn slot_key_of(n: u32) -> String {
    format!("ocicrypt/ledger-cache/{n}")
}

/// An entry's key and its slot id.
struct Item {
    key: String,
    id: [u8; 32],
}

impl Item {
    fn new(repository: &str, digest: &Digest) -> Item {
        let key = ledger::key(repository, digest);
        let id = Sha256::digest(key.as_bytes()).into();
        Item { key, id }
    }

    fn slot_key(&self, shape: Shape) -> String {
        slot_key_of(slots::index(&self.id, shape.slots))
    }

    fn record(&self, entry: &LedgerEntry) -> Option<Vec<u8>> {
        let len = u16::try_from(self.key.len()).ok()?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&entry.to_bytes());
        Some(out)
    }
}

/// The key and entry a record holds; `None` when it does not parse in full.
fn read_record(record: &[u8]) -> Option<(&[u8], LedgerEntry)> {
    let (len, rest) = record.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let key = rest.get(..len)?;
    let entry = LedgerEntry::from_bytes(rest.get(len..)?)?;
    Some((key, entry))
}

/// The entry of `repository` and `digest` in a slot's value: the most recently written entry
/// with its id, if it holds exactly that key and parses.
pub fn find(slot: &[u8], repository: &str, digest: &Digest) -> Option<LedgerEntry> {
    let item = Item::new(repository, digest);
    let latest = entries(slot).into_iter().rev().find(|e| e.id == item.id)?;
    let (key, entry) = read_record(latest.record)?;
    (key == item.key.as_bytes()).then_some(entry)
}

/// What a write did to the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// How the number of entries held changed.
    pub entries: i64,
    /// Entries evicted to make room.
    pub evicted: u64,
}

/// A slot's value with the entry of `repository` and `digest` set to `entry`, written at `now`
/// and the most recent; the least recently written entries are evicted down to `per_slot`,
/// entries that do not parse are dropped. `None` for a key too long to store (no repository
/// name is).
pub fn put(
    slot: &[u8],
    per_slot: usize,
    repository: &str,
    digest: &Digest,
    entry: &LedgerEntry,
    now: u64,
) -> Option<(Vec<u8>, Change)> {
    let item = Item::new(repository, digest);
    let record = item.record(entry)?;
    let valid: Vec<Entry<'_>> = entries(slot)
        .into_iter()
        .filter(|e| read_record(e.record).is_some())
        .collect();
    let before = valid.len();
    let mut kept: Vec<Entry<'_>> = valid.into_iter().filter(|e| e.id != item.id).collect();
    kept.push(Entry {
        id: &item.id,
        written: now,
        record: &record,
    });
    let excess = kept.len().saturating_sub(per_slot.max(1));
    kept.drain(..excess);
    let after = kept.len();
    Some((
        encode(&kept),
        Change {
            entries: count(after) - count(before),
            evicted: u64::try_from(excess).unwrap_or(u64::MAX),
        },
    ))
}

/// Entries a slot's value holds (that parse).
pub fn held(slot: &[u8]) -> usize {
    entries(slot)
        .iter()
        .filter(|e| read_record(e.record).is_some())
        .count()
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn busy() -> OciError {
    OciError::new(
        Code::Unavailable,
        "the gateway could not record the encrypted blob in its ledger (busy); retry",
    )
}

/// The entry of `repository` and `digest` in the cache in `store`.
pub fn get_in(
    store: &dyn Store,
    shape: Shape,
    repository: &str,
    digest: &Digest,
) -> Option<LedgerEntry> {
    let slot = slots::read(store, &Item::new(repository, digest).slot_key(shape));
    find(&slot, repository, digest)
}

/// Writes the entry of `repository` and `digest` to the cache in `store` (compare-and-set,
/// retried when another worker wrote the slot meanwhile); a full slot evicts its least
/// recently written entry. Fails only when the store does (`503`, retry).
pub fn put_in(
    store: &dyn Store,
    shape: Shape,
    repository: &str,
    digest: &Digest,
    entry: &LedgerEntry,
    now: u64,
) -> Result<Change, OciError> {
    let key = Item::new(repository, digest).slot_key(shape);
    let change = slots::update(store, &key, busy, |slot| {
        put(slot, shape.per_slot, repository, digest, entry, now)
            .map(Some)
            .ok_or_else(|| {
                OciError::new(
                    Code::Unknown,
                    "repository name too long for the gateway's ledger",
                )
            })
    })?;
    Ok(change.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn entry(n: u32) -> LedgerEntry {
        LedgerEntry {
            encrypted_digest: Digest::of(&n.to_be_bytes()),
            size: u64::from(n),
            annotations: BTreeMap::from([(
                "org.opencontainers.image.enc.pubopts".to_string(),
                format!("opts-{n}"),
            )]),
            media_type: None,
            recipients: Some("fp".into()),
        }
    }

    fn digest(n: u32) -> Digest {
        Digest::of(format!("layer {n}").as_bytes())
    }

    /// Envoy's shared data as the adapter sees it: values with a CAS token that changes on
    /// every write; `interfere` makes the next writes lose to another worker's.
    #[derive(Default)]
    struct SharedStore {
        values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        interfere: Cell<usize>,
        lost: Cell<usize>,
    }

    impl SharedStore {
        fn write(&self, key: &str, value: &[u8]) {
            self.next_cas.set(self.next_cas.get() + 1);
            self.values
                .borrow_mut()
                .insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        }
        fn total_entries(&self) -> usize {
            self.values.borrow().values().map(|(v, _)| held(v)).sum()
        }
    }

    impl Store for SharedStore {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.values.borrow().get(key).map(|(v, _)| v.clone())
        }
        fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError> {
            self.write(key, value);
            Ok(())
        }
        fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
            let values = self.values.borrow();
            Some(match values.get(key) {
                Some((v, cas)) => (Some(v.clone()), *cas),
                None => (None, 0),
            })
        }
        fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
            if self.interfere.get() > 0 {
                // Another worker writes the slot first (an entry of its own).
                self.interfere.set(self.interfere.get() - 1);
                self.lost.set(self.lost.get() + 1);
                let current = self.get(key).unwrap_or_default();
                let (theirs, _) =
                    put(&current, 16, "other/repo", &digest(999), &entry(999), 1).unwrap();
                self.write(key, &theirs);
                return false;
            }
            let current = self.values.borrow().get(key).map(|(_, c)| *c);
            let matches = match current {
                Some(c) => c == cas,
                None => cas == u32::MAX,
            };
            if matches {
                self.write(key, value);
            }
            matches
        }
    }

    #[test]
    fn shapes_never_exceed_the_capacity() {
        for n in [0, 1, 2, 15, 16, 17, 31, 33, 1000, DEFAULT_ENTRIES, 1 << 20] {
            let shape = Shape::for_entries(n);
            assert!(
                shape.per_slot >= 1 && shape.per_slot <= ENTRIES_PER_SLOT,
                "{n}"
            );
            assert!(shape.capacity() <= n.max(1), "{n}: {shape:?}");
            assert!(
                shape.capacity() + shape.slots as usize > n,
                "{n}: {shape:?}"
            );
        }
        assert_eq!(
            Shape::for_entries(4),
            Shape {
                slots: 1,
                per_slot: 4
            }
        );
        assert_eq!(
            Shape::for_entries(DEFAULT_ENTRIES),
            Shape {
                slots: 1024,
                per_slot: 16
            }
        );
    }

    #[test]
    fn entries_round_trip_and_replace() {
        let (slot, c) = put(&[], 4, "demo/app", &digest(1), &entry(1), 10).unwrap();
        assert_eq!(
            c,
            Change {
                entries: 1,
                evicted: 0
            }
        );
        assert_eq!(find(&slot, "demo/app", &digest(1)), Some(entry(1)));
        assert_eq!(find(&slot, "demo/app", &digest(2)), None);
        let (slot, c) = put(&slot, 4, "demo/app", &digest(1), &entry(7), 11).unwrap();
        assert_eq!(
            c,
            Change {
                entries: 0,
                evicted: 0
            }
        );
        assert_eq!(find(&slot, "demo/app", &digest(1)), Some(entry(7)));
        assert_eq!(held(&slot), 1);
    }

    #[test]
    fn a_full_slot_evicts_the_least_recently_written() {
        let mut slot = Vec::new();
        for n in 0..4 {
            let (s, c) = put(&slot, 4, "demo/app", &digest(n), &entry(n), 10).unwrap();
            assert_eq!(c.evicted, 0);
            slot = s;
        }
        // Rewriting 0 makes it the most recent: 1 is now the least recently written.
        slot = put(&slot, 4, "demo/app", &digest(0), &entry(0), 11)
            .unwrap()
            .0;
        let (slot, c) = put(&slot, 4, "demo/app", &digest(4), &entry(4), 12).unwrap();
        assert_eq!(
            c,
            Change {
                entries: 0,
                evicted: 1
            }
        );
        assert_eq!(find(&slot, "demo/app", &digest(1)), None, "1 was evicted");
        for n in [0, 2, 3, 4] {
            assert_eq!(find(&slot, "demo/app", &digest(n)), Some(entry(n)), "{n}");
        }
        let (slot, _) = put(&slot, 4, "demo/app", &digest(5), &entry(5), 13).unwrap();
        assert_eq!(find(&slot, "demo/app", &digest(2)), None, "then 2");
        assert_eq!(held(&slot), 4);
    }

    #[test]
    fn repositories_are_never_confused() {
        let d = digest(1);
        let (slot, _) = put(&[], 16, "demo/app", &d, &entry(1), 1).unwrap();
        let (slot, _) = put(&slot, 16, "demo/other", &d, &entry(2), 1).unwrap();
        assert_eq!(find(&slot, "demo/app", &d), Some(entry(1)));
        assert_eq!(find(&slot, "demo/other", &d), Some(entry(2)));
        assert_eq!(find(&slot, "demo/ap", &d), None);
        assert_eq!(find(&slot, "demo/app2", &d), None);
        assert_eq!(find(&slot, "other/app", &d), None);
        // An entry filed under one key's id but holding another key is not taken for either.
        let wrong = Item::new("demo/other", &d).record(&entry(3)).unwrap();
        let forged = encode(&[Entry {
            id: &Item::new("demo/app", &d).id,
            written: 2,
            record: &wrong,
        }]);
        let slot = [slot, forged].concat();
        assert_eq!(find(&slot, "demo/app", &d), None);
        assert_eq!(find(&slot, "demo/other", &d), Some(entry(2)));
    }

    #[test]
    fn hostile_or_corrupt_slot_values_are_not_trusted() {
        let d = digest(1);
        let (good, _) = put(&[], 16, "demo/app", &d, &entry(1), 1).unwrap();
        // Truncated, padded or overlong values read as empty.
        for bad in [
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            [good.clone(), vec![32]].concat(),
            vec![0xff; 64],
        ] {
            assert_eq!(find(&bad, "demo/app", &d), None);
            assert_eq!(held(&bad), 0);
            // Written again, the slot holds the new entry only.
            let (next, c) = put(&bad, 16, "demo/app", &digest(2), &entry(2), 2).unwrap();
            assert_eq!(c.entries, 1);
            assert_eq!(held(&next), 1);
            assert_eq!(find(&next, "demo/app", &d), None);
        }
        // A well-framed entry whose record is not a ledger entry (unknown field, other shape,
        // a length past its end) is not found, and is dropped on the next write.
        let item = Item::new("demo/app", &d);
        let key = item.key.as_bytes();
        let mut json = entry(1).to_bytes();
        json.truncate(json.len() - 1);
        json.extend_from_slice(br#","extra":1}"#);
        for record in [
            [&(key.len() as u16).to_be_bytes()[..], key, &json].concat(),
            [&(key.len() as u16).to_be_bytes()[..], key, b"{}"].concat(),
            [&u16::MAX.to_be_bytes()[..], key].concat(),
            vec![],
        ] {
            let slot = encode(&[Entry {
                id: &item.id,
                written: 1,
                record: &record,
            }]);
            assert_eq!(held(&slot), 0);
            assert_eq!(find(&slot, "demo/app", &d), None);
            let (next, c) = put(&slot, 16, "demo/app", &digest(2), &entry(2), 2).unwrap();
            assert_eq!((c.entries, held(&next)), (1, 1));
        }
        // A slot stuffed with more entries than it may hold is cut back to its bound (the
        // oldest go) by the next write.
        let mut stuffed = Vec::new();
        for n in 0..40 {
            stuffed = put(&stuffed, 64, "demo/app", &digest(n), &entry(n), 1)
                .unwrap()
                .0;
        }
        let (next, c) = put(&stuffed, 4, "demo/app", &digest(40), &entry(40), 2).unwrap();
        assert_eq!(held(&next), 4);
        assert_eq!(
            c,
            Change {
                entries: -36,
                evicted: 37
            }
        );
        assert_eq!(find(&next, "demo/app", &digest(37)), Some(entry(37)));
        assert_eq!(find(&next, "demo/app", &digest(36)), None);
    }

    #[test]
    fn the_store_stays_bounded_and_counts_its_entries() {
        let store = SharedStore::default();
        let shape = Shape::for_entries(100);
        let mut gauge = 0i64;
        let mut evicted = 0u64;
        for n in 0..5000 {
            let c = put_in(&store, shape, "demo/app", &digest(n), &entry(n), 1).unwrap();
            gauge += c.entries;
            evicted += c.evicted;
        }
        let held_now = store.total_entries();
        assert!(
            held_now <= shape.capacity() && held_now <= 100,
            "{held_now}"
        );
        assert_eq!(gauge, held_now as i64);
        assert_eq!(evicted, 5000 - held_now as u64);
        assert!(store.values.borrow().len() <= shape.slots as usize);
        // The most recent entries are all still there (each slot keeps its newest).
        for n in 4990..5000 {
            assert_eq!(
                get_in(&store, shape, "demo/app", &digest(n)),
                Some(entry(n)),
                "{n}"
            );
        }
        assert_eq!(get_in(&store, shape, "demo/app", &digest(0)), None);
    }

    #[test]
    fn a_lost_compare_and_set_is_retried_and_keeps_the_other_write() {
        let store = SharedStore::default();
        let shape = Shape::for_entries(16);
        put_in(&store, shape, "demo/app", &digest(1), &entry(1), 1).unwrap();
        store.interfere.set(3);
        let c = put_in(&store, shape, "demo/app", &digest(2), &entry(2), 2).unwrap();
        assert_eq!(store.lost.get(), 3);
        assert_eq!(
            c,
            Change {
                entries: 1,
                evicted: 0
            }
        );
        assert_eq!(
            get_in(&store, shape, "demo/app", &digest(1)),
            Some(entry(1))
        );
        assert_eq!(
            get_in(&store, shape, "demo/app", &digest(2)),
            Some(entry(2))
        );
        assert_eq!(
            get_in(&store, shape, "other/repo", &digest(999)),
            Some(entry(999)),
            "the other worker's write is kept"
        );
        // Losing every attempt is a 503, not a silent loss.
        store.interfere.set(100);
        let e = put_in(&store, shape, "demo/app", &digest(3), &entry(3), 3).unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
    }

    /// Test keys made with OpenSSL 3 for this test only.
    const RSA2048_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw1qYFczDajgGcNfqhMze
c5r98hkrIFqvDkESAqyOWxsdcoPklHm2izYJ20ayIpGlIrnP/mvZcN315oOVO9W7
j5kQI4a00iCL/1qyMT/+Oi8r3QI0QgkGZRYAHjYjXxtUgAcgzQ9jUN84AN77cP+b
23OFwDxrVsNufguRd+vCBRAFNpEwP689R0nETghwZMA1mW2BmDqXVvVr099+wAZ8
AaVXIZ8zFqMODoDCMPScKuHCI4FLlONHwjKLp5a3LD4aV3PWI5p0hYfoWMcFi40k
7w5yqM7mePpuTJNB+iWdJiWTTjvjbvTQh4aS5hXuULq2qXIEQxgaIzUqxVXox4E1
PwIDAQAB
-----END PUBLIC KEY-----
";
    const RSA4096_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEApoOuImJIR+W3g7/7CPdX
3Y3LHYPDGV+PLngOC51GLWWsMrABYvqvoH1F8slcNasvyWMxJmnSKQjOchXskDFr
kiDavG15LomHO+n6xPgD8aUrjxYb2d4TNoWg9o+YF8MQ6UUHfIMuFYjV0CQVqiKQ
A6VDrLoL73JqGQnWCD8SyTZ9F5j7cw//6OISfZ8d25CVvRz+TSm40L/pa9/Zng1o
pAXRZD4DbTqQl3GjUzdHgvGVY9wOGIE+1iH7sZBn2ZpdITDNLwxHKb2DfMkHWDVT
3IAtGgW6WJe+iNgHrHKEqQT/7TcAbOLNucwEq1dkKfOIPTrK6v8Dd6tl3bAez+Bh
oOHuBNi74XfWBNaaYuaAsReCMSGNkeD4QdFxxHpqXB9tTLbtO5e8D1EXzYQ0R723
aPzTtinOZDFls5EI93UEB13BBaXWCHu+pzzQ+fuo8TpAc5vsbM5pHgnotbRE+2Id
xDOgdcxLNSpJ7H3epgEngccETUbxpLES6mvcXPT42VGVghBFJKN5QvW9mDmsivFx
2AvRR0pasi4q/G8D07qahJsqkoJWAR0SKPnl0EEEVI+ymWygoZcQVCxv1GX9CiT0
wwfVdWGg7PrzkkpecgYh2nKpRxvzOqt3cPIJ91GxxCTnJqoks/ODJIA9sbQTTk4y
2O3bz4HZ2d8CGUUZNSX+YzECAwEAAQ==
-----END PUBLIC KEY-----
";

    /// What one cached entry of an encrypted layer costs in its slot, with real wrapped keys:
    /// the figure the documentation gives per entry.
    #[test]
    fn entry_sizes_with_two_recipients() {
        use crate::format::recipients::Recipient;
        let rsa = |bits| {
            Recipient::from_pem(if bits == 2048 {
                RSA2048_PEM
            } else {
                RSA4096_PEM
            })
            .unwrap()
        };
        let p256 = || Recipient::P256(p256::SecretKey::random(&mut rand_core::OsRng).public_key());
        let layer = crate::format::blockcipher::EncryptedLayer {
            plaintext_digest: digest(1),
            encrypted_digest: digest(2),
            size: 123_456_789,
            hmac: [7; 32],
            symkey: zeroize::Zeroizing::new([9; 32]),
            nonce: [3; 16],
        };
        for (name, recipients, most) in [
            ("RSA-2048 + P-256", vec![rsa(2048), p256()], 3 << 10),
            ("2 x RSA-2048", vec![rsa(2048), rsa(2048)], 3 << 10),
            ("2 x RSA-4096", vec![rsa(4096), rsa(4096)], 4 << 10),
        ] {
            let annotations = crate::format::keywrap::layer_annotations(
                &layer,
                &recipients,
                &mut rand_core::OsRng,
            )
            .unwrap();
            let e = LedgerEntry {
                encrypted_digest: layer.encrypted_digest,
                size: layer.size,
                annotations,
                media_type: None,
                recipients: Some(crate::format::recipients::fingerprint(&recipients)),
            };
            let (slot, _) = put(&[], 16, "tribe-a/some/service", &digest(1), &e, 1).unwrap();
            println!("ledger cache entry, {name}: {} bytes", slot.len());
            assert!(slot.len() < most, "{name}: {}", slot.len());
        }
    }
}
