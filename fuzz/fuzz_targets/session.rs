//! `session::claim` / `release` on a fuzzed slot value: one live claim per upload id, release
//! frees it, the slot stays bounded, and nothing but `id time` lines is ever written.
#![no_main]

use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::distribution::session::{claim, release, MAX_CLAIMS_PER_SLOT, STALE_AFTER_SECS};

/// Live claims in a slot value at `now`, as the core counts them.
fn live(value: &[u8], now: u64) -> Vec<(String, u64)> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            let (id, t) = l.split_once(' ')?;
            Some((id.to_string(), t.parse().ok()?))
        })
        .filter(|(_, t)| now.saturating_sub(*t) < STALE_AFTER_SECS)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // [now: 8 bytes][id length][id][slot value...]
    let Some((now, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let now = u64::from_le_bytes(*now);
    let Some((&id_len, rest)) = rest.split_first() else {
        return;
    };
    let id_len = usize::from(id_len % 40).min(rest.len());
    let (id, value) = rest.split_at(id_len);
    let id = String::from_utf8_lossy(id).into_owned();

    let before = live(value, now);
    match claim(value, &id, now) {
        Some(claimed) => {
            check!(
                !before.iter().any(|(i, _)| *i == id),
                "a live claim of {id:?} was there and claim() still succeeded"
            );
            let after = live(&claimed, now);
            check!(
                after.len() <= MAX_CLAIMS_PER_SLOT,
                "slot holds {} live claims, more than {MAX_CLAIMS_PER_SLOT}",
                after.len()
            );
            check!(
                after.iter().filter(|(i, _)| *i == id).count() == 1,
                "claim of {id:?} not recorded exactly once: {after:?}"
            );
            // Every claim kept is one that was live before, plus the new one.
            for (i, t) in &after {
                check!(
                    (*i == id && *t == now) || before.contains(&(i.clone(), *t)),
                    "claim() invented an entry {i:?} {t}"
                );
            }
            // Only well-formed lines: nothing else grows the value.
            check!(
                std::str::from_utf8(&claimed).is_ok_and(|s| s.lines().count() == after.len()),
                "claim() wrote lines that are not live claims"
            );
            check!(
                claim(&claimed, &id, now).is_none(),
                "a second claim of {id:?} at the same time succeeded"
            );
            check!(
                claim(&claimed, &id, now.saturating_add(1)).is_none() || STALE_AFTER_SECS <= 1,
                "a second claim of {id:?} a second later succeeded"
            );
            let released = release(&claimed, &id);
            check!(
                !live(&released, now).iter().any(|(i, _)| *i == id),
                "release() left {id:?} claimed"
            );
            check!(
                claim(&released, &id, now).is_some(),
                "claim after release of {id:?} failed"
            );
        }
        None => {
            let reason_ok = before.iter().any(|(i, _)| *i == id)
                || before.len() >= MAX_CLAIMS_PER_SLOT
                || id.contains(['\n', ' ']);
            check!(
                reason_ok,
                "claim of {id:?} refused without a live claim, a full slot or a bad id"
            );
        }
    }
    // release never grows the value (but for a final newline), and drops only `id`.
    let released = release(value, &id);
    check!(
        released.len() <= value.len() + 1,
        "release() grew the slot value"
    );
    let kept: Vec<_> = live(value, now)
        .into_iter()
        .filter(|(i, _)| *i != id)
        .collect();
    check!(
        live(&released, now) == kept,
        "release() of {id:?} changed other claims"
    );
});
