//! `ledger_cache::put` / `find` / `held` on a fuzzed slot value (what any writer of Envoy's
//! shared data could leave there): nothing panics; the entry written is found, exactly, under
//! its repository and digest; the slot holds at most `per_slot` entries afterwards; the gauge's
//! change and the evictions add up; every other entry found afterwards was found before.
#![no_main]

use std::collections::BTreeMap;

use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::ledger_cache::{find, held, put};

fuzz_target!(|data: &[u8]| {
    // [per_slot][digest seed][repository length][repository][slot value...]
    let Some((&[per_slot, seed, repo_len], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let per_slot = usize::from(per_slot % 20);
    let repo_len = usize::from(repo_len % 64).min(rest.len());
    let (repo, value) = rest.split_at(repo_len);
    let repository = String::from_utf8_lossy(repo).into_owned();
    let digest = Digest::of(&[seed]);
    let other = Digest::of(&[seed.wrapping_add(1)]);
    let entry = LedgerEntry {
        encrypted_digest: Digest::of(value),
        size: value.len() as u64,
        annotations: BTreeMap::from([("k".to_string(), repository.clone())]),
        media_type: None,
        recipients: Some("fp".to_string()),
    };

    let before = held(value);
    let other_before = find(value, &repository, &other);
    let _ = find(value, &repository, &digest);
    let Some((next, change)) = put(value, per_slot, &repository, &digest, &entry, 7) else {
        panic!("put refused a short repository name");
    };
    let after = held(&next);
    check!(
        find(&next, &repository, &digest).as_ref() == Some(&entry),
        "the entry written is not found"
    );
    check!(
        find(&next, &format!("{repository}x"), &digest).is_none(),
        "found under another repository"
    );
    check!(
        after <= per_slot.max(1),
        "{after} entries in a slot of {per_slot}"
    );
    check!(
        change.entries == after as i64 - before as i64,
        "gauge change {} but {before} -> {after}",
        change.entries
    );
    check!(
        change.evicted as usize <= before + 1,
        "{} evicted from {before} entries",
        change.evicted
    );
    if let Some(found) = find(&next, &repository, &other) {
        check!(
            other_before.as_ref() == Some(&found),
            "put() made up an entry for another digest"
        );
    }
});
