//! The ledger kept in the registry: `ledger::read_stored` / `entry_from_stored_authenticated`
//! under a fixed state key, `LedgerEntry::from_bytes` / `to_bytes`, and
//! `manifest::referenced_digests_bounded`.
//!
//! Modes (first byte):
//! - 0: the rest as a manifest read from under a ledger tag (repository and digest fixed):
//!   whatever is accepted as a blob entry is byte for byte the record the gateway would write
//!   for it; anything else is a manifest entry for the body itself;
//! - 1: a record the gateway writes, built from the input, then edited at fuzzer-chosen places
//!   (or not): unedited it reads back to the same entry, edited it never reads back as a blob
//!   entry unless the bytes are the record's own;
//! - 2: the rest as a shared-data ledger value: one that parses round-trips;
//! - 3: the rest as a manifest: the lookups it needs are bounded, distinct, unknown.
#![no_main]

use std::collections::BTreeMap;

use fuzz_support::{check, STATE_KEY};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::{
    entry_from_stored_authenticated, is_ledger_record, ledger_manifest_authenticated, read_stored,
    LedgerEntry, StoredEntryError,
};
use ocicrypt_core::distribution::manifest::{referenced_digests, referenced_digests_bounded};

const REPOSITORY: &str = "demo/app";

fn plaintext() -> Digest {
    Digest::of(b"the layer")
}

/// What reading `body` may give, whatever it is.
fn check_read(repository: &str, plaintext: &Digest, body: &[u8]) {
    let read = read_stored(&STATE_KEY, repository, plaintext, body);
    check!(
        read.clone().ok()
            == entry_from_stored_authenticated(&STATE_KEY, repository, plaintext, body),
        "entry_from_stored_authenticated disagrees with read_stored"
    );
    match read {
        Ok(entry) if !entry.is_manifest() => {
            let expected = ledger_manifest_authenticated(&STATE_KEY, repository, plaintext, &entry);
            check!(
                expected == body,
                "a body accepted as a blob entry is not the record the gateway writes for it"
            );
            check!(
                is_ledger_record(body),
                "an accepted blob record is not a ledger record"
            );
        }
        Ok(entry) => {
            check!(
                !is_ledger_record(body),
                "a ledger-looking manifest gave a manifest entry"
            );
            check!(
                entry.encrypted_digest == Digest::of(body)
                    && entry.size == body.len() as u64
                    && entry.annotations.is_empty()
                    && entry.recipients.is_none(),
                "a manifest entry does not describe the stored manifest itself: {entry:?}"
            );
        }
        Err(StoredEntryError::Unauthenticated | StoredEntryError::Superseded) => {
            check!(
                is_ledger_record(body),
                "refused as a record a manifest that does not look like a ledger record"
            );
        }
        Err(StoredEntryError::NotJson) => {
            check!(
                serde_json::from_slice::<serde_json::Value>(body).map_or(true, |v| !v.is_object()),
                "NotJson for a JSON object"
            );
        }
    }
}

fn built_entry(u: &mut Unstructured) -> Result<LedgerEntry> {
    let encrypted: [u8; 32] = u.arbitrary()?;
    let mut annotations = BTreeMap::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let known = [
            "org.opencontainers.image.enc.keys.jwe",
            "org.opencontainers.image.enc.pubopts",
            "org.opencontainers.image.enc.x",
        ];
        let k = known[u.int_in_range(0..=2usize)?];
        let v: String = u.arbitrary()?;
        annotations.insert(k.to_string(), v);
    }
    Ok(LedgerEntry {
        encrypted_digest: Digest(encrypted),
        size: u.arbitrary()?,
        annotations,
        media_type: None,
        recipients: if u.arbitrary()? {
            Some(u.arbitrary()?)
        } else {
            None
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => check_read(REPOSITORY, &plaintext(), rest),
        1 => {
            let mut u = Unstructured::new(rest);
            let Ok(entry) = built_entry(&mut u) else {
                return;
            };
            let body = ledger_manifest_authenticated(&STATE_KEY, REPOSITORY, &plaintext(), &entry);
            check!(!body.is_empty(), "no record written");
            check!(
                read_stored(&STATE_KEY, REPOSITORY, &plaintext(), &body).as_ref() == Ok(&entry),
                "the gateway's own record does not read back to its entry"
            );
            // Read under another repository or digest: refused.
            check!(
                read_stored(&STATE_KEY, "demo/other", &plaintext(), &body)
                    == Err(StoredEntryError::Unauthenticated),
                "a record read back in another repository"
            );
            check!(
                read_stored(&STATE_KEY, REPOSITORY, &Digest::of(b"other"), &body)
                    == Err(StoredEntryError::Unauthenticated),
                "a record read back under another digest"
            );
            check!(
                read_stored(&[1; 32], REPOSITORY, &plaintext(), &body)
                    == Err(StoredEntryError::Unauthenticated),
                "a record read back under another key"
            );
            // Edits chosen by the input: byte changes, insertions, deletions.
            let mut edited = body.clone();
            while let Ok(op) = u.int_in_range(0..=2u8) {
                if edited.is_empty() || u.is_empty() {
                    break;
                }
                let at = u.int_in_range(0..=edited.len() - 1).unwrap_or(0);
                let byte: u8 = u.arbitrary().unwrap_or(b' ');
                match op {
                    0 => edited[at] = byte,
                    1 => edited.insert(at, byte),
                    _ => {
                        edited.remove(at);
                    }
                }
            }
            check_read(REPOSITORY, &plaintext(), &edited);
            if edited != body {
                check!(
                    read_stored(&STATE_KEY, REPOSITORY, &plaintext(), &edited)
                        .map_or(true, |e| e.is_manifest()),
                    "an edited record still read back as a blob entry"
                );
            }
        }
        2 => {
            if let Some(entry) = LedgerEntry::from_bytes(rest) {
                let bytes = entry.to_bytes();
                check!(
                    LedgerEntry::from_bytes(&bytes).as_ref() == Some(&entry),
                    "a ledger value does not round-trip: {entry:?}"
                );
            }
        }
        _ => {
            let max = usize::from(mode / 4) % 8;
            let known = |d: &Digest| d.0[0] & 1 == 0;
            let all = referenced_digests(rest);
            match referenced_digests_bounded(rest, &known, max) {
                Ok(unknown) => {
                    check!(
                        unknown.len() <= max,
                        "{} lookups over the limit {max}",
                        unknown.len()
                    );
                    for (i, d) in unknown.iter().enumerate() {
                        check!(!known(d), "a known digest is looked up");
                        check!(
                            all.contains(d),
                            "a lookup of a digest the manifest does not name"
                        );
                        check!(!unknown[..i].contains(d), "a digest looked up twice");
                    }
                    let expected: Vec<&Digest> = all.iter().filter(|d| !known(d)).collect();
                    check!(
                        unknown.iter().collect::<Vec<_>>() == expected,
                        "lookups are not the unknown digests in order"
                    );
                }
                Err(_) => {
                    let count = all.iter().filter(|d| !known(d)).count();
                    check!(
                        count > max,
                        "refused with only {count} unknown digests (max {max})"
                    );
                }
            }
        }
    }
});
