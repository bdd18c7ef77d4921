//! A key-service lookup (the filter's TUF cycle for projects' recipients) against the python-tuf
//! generated repositories in `tests/fixtures/tuf`: the good repository gives verified
//! recipients; every attack variant, an unknown project and an unreachable key service give a
//! record that refuses.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod tuf;
}

use common::tuf::{initial_root, key_service, serve, NOW};
use ocicrypt_core::config::KeyServiceConfig;
use ocicrypt_core::keys::keyservice::{KeyRecord, Lookup, Next, TrustedMetadata};
use ocicrypt_core::tuf::MetadataCache;

fn config() -> KeyServiceConfig {
    key_service(1024)
}

fn run(
    variants: Option<&[&str]>,
    metadata: MetadataCache,
    projects: &[&str],
) -> (Vec<(String, KeyRecord)>, Option<TrustedMetadata>) {
    let projects = projects.iter().map(|p| p.to_string()).collect();
    let (mut lookup, mut next) = Lookup::start(&config(), metadata, projects, NOW);
    assert!(!lookup.resumed());
    for _ in 0..100 {
        match next {
            Next::Fetch(req) => {
                let (status, body) = match variants {
                    Some(v) => serve(v, &req.path),
                    None => (0, Vec::new()),
                };
                next = lookup.on_response(status, &body);
            }
            Next::Done { records, metadata } => return (records, metadata),
        }
    }
    panic!("lookup did not finish");
}

fn pinned() -> MetadataCache {
    MetadataCache::new(config().trusted_root)
}

#[test]
fn good_repository_gives_verified_recipients_for_each_project() {
    let (records, metadata) = run(Some(&[]), pinned(), &["demo", "tribe-a-web", "tribe-b-1"]);
    assert_eq!(records.len(), 3);
    for (project, record) in &records {
        let recipients = record
            .usable(project, NOW, 180)
            .unwrap_or_else(|e| panic!("{project}: {e}"));
        assert!(!recipients.is_empty());
    }
    let metadata = metadata.unwrap();
    assert_eq!(
        metadata.root_version, 2,
        "the root chain was followed to v2"
    );
    // What a worker persists reads back identically.
    assert_eq!(
        TrustedMetadata::from_bytes(&metadata.to_bytes()),
        Some(metadata)
    );
}

#[test]
fn unknown_project_fails_alone() {
    let (records, metadata) = run(Some(&[]), pinned(), &["demo", "nosuch"]);
    let by = |p: &str| records.iter().find(|(n, _)| n == p).unwrap().1.clone();
    assert!(by("demo").usable("demo", NOW, 180).is_ok());
    let err = by("nosuch").usable("nosuch", NOW, 180).unwrap_err();
    assert!(err.contains("no recipients for this project"), "{err}");
    assert!(metadata.is_some());
}

#[test]
fn key_service_down_refuses() {
    let (records, metadata) = run(None, pinned(), &["demo"]);
    let err = records[0].1.usable("demo", NOW, 180).unwrap_err();
    assert!(err.contains("unreachable"), "{err}");
    assert!(metadata.is_none());
}

#[test]
fn every_attack_variant_refuses() {
    for variant in [
        "tampered-target",
        "freeze",
        "mix-and-match",
        "substituted-key",
        "wrong-signature",
        "too-few-signatures",
        "root-unsigned-by-old-keys",
    ] {
        let (records, _) = run(Some(&[variant]), pinned(), &["demo"]);
        let err = records[0].1.usable("demo", NOW, 180).err();
        assert!(err.is_some(), "{variant}: recipients were accepted");
    }
}

#[test]
fn rollback_after_newer_metadata_refuses() {
    // The worker saw the good repository; then the key service serves older metadata.
    let (_, metadata) = run(Some(&[]), pinned(), &["demo"]);
    let trusted = metadata.unwrap().cache;
    for variant in [
        "rollback-timestamp",
        "rollback-snapshot",
        "rollback-targets",
    ] {
        let (records, _) = run(Some(&[variant]), trusted.clone(), &["demo"]);
        assert!(
            records[0].1.usable("demo", NOW, 180).is_err(),
            "{variant}: accepted"
        );
    }
}

#[test]
fn stale_or_expired_records_refuse() {
    let (records, _) = run(Some(&[]), pinned(), &["demo"]);
    let record = &records[0].1;
    assert!(record
        .usable("demo", NOW + 181, 180)
        .unwrap_err()
        .contains("last verified"));
    assert!(record
        .usable("demo", record.expires_at, i64::MAX)
        .unwrap_err()
        .contains("expired"));
}

/// Drives a started lookup against the good repository, counting fetches by path.
fn drive_counting(
    mut lookup: Lookup,
    mut next: Next,
    fetched: &mut Vec<String>,
) -> (Vec<(String, KeyRecord)>, Option<TrustedMetadata>, Lookup) {
    for _ in 0..100 {
        match next {
            Next::Fetch(req) => {
                fetched.push(req.path.clone());
                let (status, body) = serve(&[], &req.path);
                next = lookup.on_response(status, &body);
            }
            Next::Done { records, metadata } => return (records, metadata, lookup),
        }
    }
    panic!("lookup did not finish");
}

#[test]
fn resumed_lookups_fetch_only_targets_and_keep_the_refresh_time() {
    let (_, metadata) = run(Some(&[]), pinned(), &["demo"]);
    let metadata = metadata.unwrap();
    assert_eq!(metadata.verified_at, NOW);
    let later = NOW + 30;
    let projects = vec![
        "demo".to_string(),
        "nosuch".to_string(),
        "tribe-b-1".to_string(),
    ];
    let (lookup, next) = Lookup::resume(
        &config(),
        metadata.cache.clone(),
        metadata.verified_at,
        projects,
        later,
    )
    .expect("fresh metadata resumes");
    assert!(lookup.resumed());
    let mut fetched = Vec::new();
    let (records, meta, lookup) = drive_counting(lookup, next, &mut fetched);
    // No root, timestamp, snapshot or top-level targets: only the two targets that exist and
    // the delegated role on the way to one of them. Nothing for the unknown project.
    assert!(
        fetched.iter().all(|p| !p.contains("root")
            && !p.contains("timestamp")
            && !p.contains("snapshot")
            && !p.ends_with(".targets.json")),
        "{fetched:?}"
    );
    assert!(
        fetched
            .iter()
            .filter(|p| p.starts_with("/targets/"))
            .count()
            == 2,
        "{fetched:?}"
    );
    let by = |p: &str| records.iter().find(|(n, _)| n == p).unwrap().1.clone();
    let demo = by("demo");
    assert_eq!(
        demo.checked_at, NOW,
        "records age from the full refresh, not from now"
    );
    assert!(demo.usable("demo", later, 180).is_ok());
    assert!(demo.usable("demo", NOW + 181, 180).is_err());
    assert!(by("tribe-b-1").usable("tribe-b-1", later, 180).is_ok());
    let ghost = by("nosuch");
    assert!(ghost.unknown, "a verified \"no such project\"");
    assert!(!demo.unknown);
    let meta = meta.expect("a resumed cycle hands back its metadata");
    assert_eq!(meta.verified_at, NOW);
    assert!(
        meta.supersedes(&metadata),
        "same versions, delegated roles added"
    );

    // With the verified set a worker keeps: no signature checked again, the same answers, and
    // the delegated role is cached now.
    let kept = lookup.verified_updater().unwrap().clone();
    let (lookup, next) = Lookup::resume_verified(
        &config(),
        kept,
        meta.verified_at,
        vec!["tribe-b-1".into(), "nosuch2".into()],
        later,
    )
    .unwrap();
    let mut fetched = Vec::new();
    let (records, _, _) = drive_counting(lookup, next, &mut fetched);
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert!(records.iter().any(|(p, r)| p == "nosuch2" && r.unknown));
}

#[test]
fn resume_refuses_what_a_refresh_must_renew() {
    // Only the pinned root: nothing to resume from.
    assert!(Lookup::resume(&config(), pinned(), NOW, vec!["demo".into()], NOW).is_none());
    let (_, metadata) = run(Some(&[]), pinned(), &["demo"]);
    let metadata = metadata.unwrap();
    // Expired metadata: a full refresh is needed (and would fail closed if nothing newer).
    let far = 4_200_000_000; // after 2099, when the fixtures expire
    assert!(Lookup::resume(&config(), metadata.cache.clone(), NOW, vec![], far).is_none());
    // A cache whose snapshot is not the one its timestamp names.
    let mut mixed = metadata.cache.clone();
    mixed.snapshot = Some(b"{\"signed\":{}}".to_vec());
    assert!(Lookup::resume(&config(), mixed, NOW, vec![], NOW).is_none());
    // A kept set past its expiry is not resumed either.
    let (lookup, next) =
        Lookup::resume(&config(), metadata.cache.clone(), NOW, vec![], NOW).unwrap();
    let (_, _, lookup) = drive_counting(lookup, next, &mut Vec::new());
    let kept = lookup.verified_updater().unwrap().clone();
    assert!(Lookup::resume_verified(&config(), kept, NOW, vec![], far).is_none());
}

#[test]
fn metadata_from_older_modules_reads_back_unverified() {
    let (_, metadata) = run(Some(&[]), pinned(), &["demo"]);
    let metadata = metadata.unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&metadata.to_bytes()).unwrap();
    v.as_object_mut().unwrap().remove("verified_at");
    let old = TrustedMetadata::from_bytes(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(old.verified_at, 0, "never taken as recent");
    assert!(metadata.supersedes(&old));
    assert!(!old.supersedes(&metadata));
}

#[test]
fn max_projects_is_configured_and_bounded() {
    let root = String::from_utf8(initial_root()).unwrap();
    let parse = |extra: &str| {
        let text = format!(
            r#"{{"registry":{{"cluster":"r"}},"key_service":{{"cluster":"k","trusted_root":{root}{extra}}}}}"#
        );
        ocicrypt_core::config::Config::parse(text.as_bytes())
    };
    let ks = |c: ocicrypt_core::config::Config| c.key_service.unwrap();
    assert_eq!(ks(parse("").unwrap()).max_projects, 1024);
    assert_eq!(ks(parse(r#","max_projects":50"#).unwrap()).max_projects, 50);
    for bad in ["0", "16385", "-1", "\"many\""] {
        let err = parse(&format!(r#","max_projects":{bad}"#))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("key_service.max_projects"), "{bad}: {err}");
    }
}
