//! The TUF updater (`tuf::Updater`) driven by a fetcher whose answers the input chooses, from
//! the fixtures' pinned root: each file it asks for is served from the good repository, from
//! an attack variant, edited, cut, replaced by another file or raw bytes, or answered with an
//! HTTP error. Jobs: a refresh, target look-ups and downloads, a second refresh from the
//! persisted cache.
//!
//! Properties:
//! - every metadata file the updater persists was signed by the fixtures' keys (none only an
//!   attack variant carries);
//! - a resolved or downloaded target is one that legitimately signed targets metadata of the
//!   fixtures lists for that path (by sha256), downloaded bytes of the listed length;
//! - the target shadowed by a terminating delegation is never found;
//! - served the good repository unchanged, at the fixtures' time, every job succeeds.
#![no_main]

use fuzz_support::{check, tuf_acceptable, tuf_file_list, tuf_fixtures, TUF_NOW};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::tuf::{
    Fetch, FetchBase, MetadataCache, Outcome, Progress, TufError, Updater, UpdaterConfig,
};
use sha2::{Digest as _, Sha256};

const VARIANTS: [&str; 13] = [
    "fast-forward-attack",
    "fast-forward-recovery",
    "freeze",
    "mix-and-match",
    "rollback-snapshot",
    "rollback-targets",
    "rollback-timestamp",
    "root-unsigned-by-old-keys",
    "substituted-key",
    "substituted-key-tribe",
    "tampered-target",
    "too-few-signatures",
    "wrong-signature",
];
const TARGETS: [&str; 7] = [
    "projects/demo.json",
    "projects/tribe-a-api.json",
    "projects/tribe-a-web.json",
    "projects/tribe-b-1.json",
    "projects/tribe-c-0.json",
    "projects/tribe-a-shadow.json",
    "projects/none.json",
];
const SHADOWED: &str = "projects/tribe-a-shadow.json";

fn served_path(base: FetchBase, path: &str) -> String {
    let dir = match base {
        FetchBase::Metadata => "metadata",
        FetchBase::Targets => "targets",
    };
    format!("{dir}/{path}")
}

/// The answer to `fetch`, as the input chooses; sets `*deviated` when it is not the good
/// repository's own.
fn answer(u: &mut Unstructured, fetch: &Fetch, deviated: &mut bool) -> (u16, Vec<u8>) {
    let files = tuf_fixtures();
    let path = served_path(fetch.base, &fetch.path);
    let good = files.get(&format!("good/{path}"));
    let good_answer = || match good {
        Some(bytes) => (200, bytes.clone()),
        None => (404, Vec::new()),
    };
    if u.is_empty() {
        return good_answer();
    }
    let action = u.int_in_range(0..=15u8).unwrap_or(0);
    if action <= 6 {
        return good_answer();
    }
    *deviated = true;
    match action {
        7 | 8 => {
            let v = VARIANTS[u.int_in_range(0..=VARIANTS.len() - 1).unwrap_or(0)];
            match files.get(&format!("variants/{v}/{path}")) {
                Some(bytes) => (200, bytes.clone()),
                None => good_answer(),
            }
        }
        9 => (404, Vec::new()),
        10 => (
            [403, 500, 204, 301][u.int_in_range(0..=3usize).unwrap_or(0)],
            good_answer().1,
        ),
        11 => {
            let (status, mut bytes) = good_answer();
            for _ in 0..u.int_in_range(1..=3u8).unwrap_or(1) {
                if bytes.is_empty() {
                    break;
                }
                let at = u.int_in_range(0..=bytes.len() - 1).unwrap_or(0);
                bytes[at] = u.arbitrary().unwrap_or(b' ');
            }
            (status, bytes)
        }
        12 => {
            let (status, mut bytes) = good_answer();
            let keep = u.int_in_range(0..=bytes.len()).unwrap_or(0);
            bytes.truncate(keep);
            (status, bytes)
        }
        13 => {
            let list = tuf_file_list();
            let i = u.int_in_range(0..=list.len() - 1).unwrap_or(0);
            (200, list[i].1.to_vec())
        }
        14 => {
            let (status, mut bytes) = good_answer();
            let extra = u.int_in_range(1..=64usize).unwrap_or(1);
            bytes.extend(std::iter::repeat_n(b' ', extra));
            (status, bytes)
        }
        _ => {
            let n = u.int_in_range(0..=4096usize).unwrap_or(0);
            (200, u.bytes(n.min(u.len())).unwrap_or(&[]).to_vec())
        }
    }
}

fn run(
    up: &mut Updater,
    start: Result<Progress, TufError>,
    u: &mut Unstructured,
    deviated: &mut bool,
) -> Result<Outcome, TufError> {
    let mut progress = start?;
    // The updater asks at most root versions + a handful of files per job.
    for _ in 0..400 {
        match progress {
            Progress::Done(outcome) => return Ok(outcome),
            Progress::Fetch(fetch) => {
                check!(
                    up.next_request() == Some(&fetch),
                    "the pending request is not the one asked for"
                );
                let (status, body) = answer(u, &fetch, deviated);
                progress = up.on_response(status, &body)?;
            }
        }
    }
    panic!("property broken: a job did not end within 400 fetches");
}

/// (target path, sha256) of every target that legitimately signed targets metadata of the
/// fixtures lists (attack variants' metadata excluded): what a client may resolve or
/// download. (A client with no trusted state may be served an older, validly signed and
/// unexpired, set of metadata: TUF's rollback protection starts from what it trusts.)
fn legit_targets() -> &'static std::collections::BTreeSet<(String, String)> {
    static SET: std::sync::OnceLock<std::collections::BTreeSet<(String, String)>> =
        std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let mut out = std::collections::BTreeSet::new();
        for (path, bytes) in tuf_fixtures() {
            if !path.contains("/metadata/") || !tuf_acceptable(bytes) {
                continue;
            }
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
                continue;
            };
            let targets = doc.pointer("/signed/targets").and_then(|t| t.as_object());
            for (name, target) in targets.into_iter().flatten() {
                if let Some(sha) = target.pointer("/hashes/sha256").and_then(|h| h.as_str()) {
                    out.insert((name.clone(), sha.to_string()));
                }
            }
        }
        out
    })
}

fn check_outcome(outcome: &Outcome, path: &str) {
    check!(path != SHADOWED, "the shadowed target {path} was found");
    let legit = legit_targets();
    match outcome {
        Outcome::Downloaded { target, bytes } => {
            let sha = hex::encode(Sha256::digest(bytes));
            check!(
                legit.contains(&(path.to_string(), sha)),
                "downloaded {path}: bytes no legitimately signed targets metadata lists"
            );
            check!(
                target.length == bytes.len() as u64,
                "downloaded {path}: length differs"
            );
            check!(target.path == path, "downloaded {path} as {}", target.path);
        }
        Outcome::Resolved(target) => {
            let sha = target
                .hashes
                .iter()
                .find(|(alg, _)| alg == "sha256")
                .map(|(_, h)| h);
            if let Some(sha) = sha {
                check!(
                    legit.contains(&(path.to_string(), sha.clone())),
                    "resolved {path} to a hash no legitimately signed targets metadata lists"
                );
            }
            check!(target.path == path, "resolved {path} as {}", target.path);
        }
        Outcome::Refreshed => {}
    }
}

fn check_cache(up: &Updater) {
    for (role, bytes) in up.cache().files() {
        check!(
            tuf_acceptable(bytes),
            "persisted {role} metadata that the fixture keys did not sign"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(root) = tuf_fixtures().get("good/metadata/1.root.json") else {
        return;
    };
    let mut u = Unstructured::new(data);
    let skew = i64::from(u.arbitrary::<i8>().unwrap_or(0));
    let now = TUF_NOW + skew * 86_400 * 30;
    let mut deviated = skew != 0;
    let mut up = Updater::new(MetadataCache::new(root.clone()), UpdaterConfig::default());

    let start = up.start_refresh(now);
    let refreshed = run(&mut up, start, &mut u, &mut deviated);
    check_cache(&up);
    check!(
        refreshed.is_ok() || deviated,
        "refresh from the good repository failed: {refreshed:?}"
    );
    if refreshed.is_err() {
        // A failed refresh leaves nothing to look up; a second refresh from the cache is the
        // recovery path.
        let start = up.start_refresh(now);
        let again = run(&mut up, start, &mut u, &mut deviated);
        check_cache(&up);
        if again.is_err() {
            return;
        }
    }
    for _ in 0..3 {
        let path = if u.is_empty() {
            TARGETS[0].to_string()
        } else {
            match u.int_in_range(0..=TARGETS.len()).unwrap_or(0) {
                i if i < TARGETS.len() => TARGETS[i].to_string(),
                _ => String::from_utf8_lossy(u.bytes(u.len().min(24)).unwrap_or(&[])).into_owned(),
            }
        };
        let download = u.arbitrary::<bool>().unwrap_or(true);
        let start = if download {
            up.start_fetch_target(&path)
        } else {
            up.start_resolve(&path)
        };
        let deviated_before = deviated;
        let outcome = run(&mut up, start, &mut u, &mut deviated);
        check_cache(&up);
        match &outcome {
            Ok(outcome) => check_outcome(outcome, &path),
            Err(e) => check!(
                deviated || !TARGETS[..5].contains(&path.as_str()) || deviated_before,
                "looking up {path} in the good repository failed: {e}"
            ),
        }
        if u.is_empty() {
            break;
        }
    }
    // A new cycle from what was persisted.
    let start = up.start_refresh(now);
    let again = run(&mut up, start, &mut u, &mut deviated);
    check_cache(&up);
    check!(
        again.is_ok() || deviated,
        "a second refresh from the good repository failed: {again:?}"
    );
});
