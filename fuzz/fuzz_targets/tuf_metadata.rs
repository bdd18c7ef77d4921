//! TUF metadata: each role's parsing (`Envelope::parse`, `Root`/`Timestamp`/`Snapshot`/
//! `Targets::from_signed`), the verification steps of `TrustedMetadataSet` from the fixtures'
//! pinned root, `parse_expires` and delegation path patterns.
//!
//! Modes (first byte):
//! - 0: the rest as a metadata file of the role the next byte picks: parsing never panics,
//!   the canonical form is that of the `signed` object and stable, delegations answer for
//!   any path;
//! - 1: a sequence of updates of a trusted set started from the pinned root, each fed a
//!   fixture file, a fixture file with an edit, or raw bytes: whatever is accepted is
//!   metadata the fixtures' keys signed (no forged or attack payload is ever trusted);
//! - 2: the rest as the pinned root itself: accepted only if legitimately signed;
//! - 3: `parse_expires`: what it accepts is exactly the `YYYY-MM-DDTHH:MM:SSZ` text of the
//!   time it returns;
//! - 4: `pattern::path_matches` against a plain glob model (patterns without `[`).
#![no_main]

use fuzz_support::{check, text, tuf_acceptable, tuf_file_list, tuf_fixtures, TUF_NOW};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::tuf::canonical::to_canonical;
use ocicrypt_core::tuf::metadata::{parse_expires, Envelope};
use ocicrypt_core::tuf::pattern::path_matches;
use ocicrypt_core::tuf::{Root, Snapshot, Targets, Timestamp, TrustedMetadataSet};

const ROLES: [&str; 8] = [
    "root",
    "timestamp",
    "snapshot",
    "targets",
    "tribe-a",
    "bins",
    "bin-3",
    "prefixed",
];
const PATHS: [&str; 6] = [
    "projects/demo.json",
    "projects/tribe-a-web.json",
    "projects/tribe-a-shadow.json",
    "projects/tribe-b-1.json",
    "projects/tribe-c-0.json",
    "projects/x/y.json",
];

fn parse_role(role: &str, bytes: &[u8]) {
    let Ok(envelope) = Envelope::parse(role, bytes) else {
        return;
    };
    let canonical = to_canonical(&envelope.signed);
    check!(
        canonical.as_ref() == Ok(&envelope.canonical),
        "the envelope's canonical bytes are not those of its signed object"
    );
    // Canonical JSON without control characters is JSON, and canonicalizes to itself.
    if !envelope.canonical.iter().any(|&b| b < 0x20) {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&envelope.canonical) {
            check!(
                to_canonical(&value).as_ref() == Ok(&envelope.canonical),
                "canonical JSON is not a fixed point"
            );
        }
    }
    let signed = &envelope.signed;
    match role {
        "root" => {
            if let Ok(root) = Root::from_signed(signed) {
                // The keys are the metadata's own here (any key material): only no panic.
                for key in root.keys.values() {
                    let _ = key.identity();
                    let _ = key.unusable_reason();
                    for signature in &envelope.signatures {
                        if let Some(sig) = &signature.sig {
                            let _ = key.verify(envelope.canonical.as_slice(), sig);
                        }
                    }
                }
            }
        }
        "timestamp" => {
            let _ = Timestamp::from_signed(signed);
        }
        "snapshot" => {
            let _ = Snapshot::from_signed(signed);
        }
        _ => {
            if let Ok(targets) = Targets::from_signed(signed, role) {
                if let Some(delegations) = &targets.delegations {
                    for path in PATHS {
                        let roles = delegations.roles_for_target(path);
                        for (name, _) in &roles {
                            let _ = delegations.role_keys(name);
                        }
                    }
                }
                for (path, target) in &targets.targets {
                    check!(
                        *path == target.path,
                        "target {path:?} listed as {:?}",
                        target.path
                    );
                    check!(!target.hashes.is_empty(), "target {path:?} without hashes");
                }
            }
        }
    }
}

/// The bytes an update is fed: a fixture file, one edited, or raw input.
fn feed(u: &mut Unstructured) -> Vec<u8> {
    let files = tuf_file_list();
    let pick = |u: &mut Unstructured| {
        let i = u.int_in_range(0..=files.len() - 1).unwrap_or(0);
        files[i].1.to_vec()
    };
    match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 | 1 => pick(u),
        2 => {
            let mut bytes = pick(u);
            for _ in 0..u.int_in_range(1..=4u8).unwrap_or(1) {
                if bytes.is_empty() {
                    break;
                }
                let at = u.int_in_range(0..=bytes.len() - 1).unwrap_or(0);
                match u.int_in_range(0..=2u8).unwrap_or(0) {
                    0 => bytes[at] = u.arbitrary().unwrap_or(b' '),
                    1 => bytes.insert(at, u.arbitrary().unwrap_or(b' ')),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            bytes
        }
        _ => {
            let n = u.int_in_range(0..=2048usize).unwrap_or(0);
            u.bytes(n.min(u.len())).unwrap_or(&[]).to_vec()
        }
    }
}

fn trusted_set(data: &[u8]) {
    let Some(root) = tuf_fixtures().get("good/metadata/1.root.json") else {
        return;
    };
    let mut u = Unstructured::new(data);
    let now = TUF_NOW + i64::from(u.arbitrary::<i16>().unwrap_or(0)) * 3600;
    let Ok(mut set) = TrustedMetadataSet::new(root, now) else {
        panic!("property broken: the pinned fixture root does not load");
    };
    for _ in 0..12 {
        if u.is_empty() {
            break;
        }
        let op = u.int_in_range(0..=6u8).unwrap_or(0);
        let bytes = feed(&mut u);
        let (what, accepted) = match op {
            0 => ("root", set.update_root(&bytes).is_ok()),
            1 => ("timestamp", set.update_timestamp(&bytes).is_ok()),
            2 => ("snapshot", set.update_snapshot(&bytes, false).is_ok()),
            3 => ("cached snapshot", set.update_snapshot(&bytes, true).is_ok()),
            4 => ("targets", set.update_targets(&bytes).is_ok()),
            5 => {
                let role = ROLES[u.int_in_range(4..=ROLES.len() - 1).unwrap_or(4)];
                let delegator = if role.starts_with("bin-") {
                    "bins"
                } else {
                    "targets"
                };
                (
                    role,
                    set.update_delegated_targets(&bytes, role, delegator)
                        .is_ok(),
                )
            }
            _ => {
                let _ = set.check_final_root();
                let _ = set.check_final_timestamp();
                let _ = set.check_final_snapshot();
                continue;
            }
        };
        if accepted {
            check!(
                tuf_acceptable(&bytes),
                "{what} metadata accepted whose signed payload the fixture keys never signed (or only an attack did)"
            );
        }
    }
    check!(
        tuf_acceptable(&set.root().raw),
        "the trusted root is not a legitimately signed one"
    );
    for meta in [
        set.timestamp().map(|t| &t.raw),
        set.snapshot().map(|s| &s.raw),
    ]
    .into_iter()
    .flatten()
    {
        check!(
            tuf_acceptable(meta),
            "trusted metadata is not legitimately signed"
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of unix seconds (civil-from-days, proleptic Gregorian).
fn format_time(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Shell glob of one segment, `*` and `?` only (no classes): the model of `fnmatch` there.
/// A table over (pattern prefix, text prefix), so a pattern of many `*` stays polynomial (a
/// backtracking model took longer than libFuzzer's timeout on `*******3d*`).
fn glob(p: &[char], t: &[char]) -> bool {
    // matches[j] after row i: whether p[..i] matches t[..j].
    let mut matches = vec![false; t.len() + 1];
    matches[0] = true;
    for pc in p {
        let mut next = vec![false; t.len() + 1];
        match pc {
            '*' => {
                let mut any = false;
                for j in 0..=t.len() {
                    any |= matches[j];
                    next[j] = any;
                }
            }
            _ => {
                for j in 1..=t.len() {
                    next[j] = matches[j - 1] && (*pc == '?' || *pc == t[j - 1]);
                }
            }
        }
        matches = next;
    }
    matches[t.len()]
}

fn glob_model(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('/').collect();
    let t: Vec<&str> = path.split('/').collect();
    p.len() == t.len()
        && p.iter().zip(&t).all(|(p, t)| {
            let p: Vec<char> = p.chars().collect();
            let t: Vec<char> = t.chars().collect();
            glob(&p, &t)
        })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => {
            let Some((&role, rest)) = rest.split_first() else {
                return;
            };
            parse_role(ROLES[usize::from(role) % ROLES.len()], rest);
        }
        1 => trusted_set(rest),
        2 => {
            if TrustedMetadataSet::new(rest, TUF_NOW).is_ok() {
                check!(
                    tuf_acceptable(rest),
                    "a root not signed by the fixture keys was trusted"
                );
            }
        }
        3 => {
            let s = text(rest);
            if let Some(t) = parse_expires(&s) {
                check!(
                    format_time(t) == s,
                    "parse_expires({s:?}) = {t}, which is {}",
                    format_time(t)
                );
            }
            // Every time in years 0..=9999 reads back.
            let t = i64::from_le_bytes(
                rest.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or_default(),
            )
            .rem_euclid(253_402_300_800 + 62_167_219_200)
                - 62_167_219_200;
            let formatted = format_time(t);
            check!(
                parse_expires(&formatted) == Some(t),
                "parse_expires({formatted:?}) does not give {t}"
            );
        }
        _ => {
            let s = text(rest);
            let (pattern, path) = s.split_once('\0').unwrap_or((&s, ""));
            // The model is quadratic: keep it well under the per-input timeout.
            if pattern.len() > 256 || path.len() > 1024 {
                return;
            }
            let ours = path_matches(pattern, path);
            if !pattern.contains('[') {
                check!(
                    ours == glob_model(pattern, path),
                    "path_matches({pattern:?}, {path:?}) = {ours}, a glob says otherwise"
                );
            }
        }
    }
});
