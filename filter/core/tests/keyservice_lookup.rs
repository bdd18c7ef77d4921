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

use std::fs;

use common::tuf::{initial_root, overlay, NOW};
use ocicrypt_core::config::KeyServiceConfig;
use ocicrypt_core::keyservice::{KeyRecord, Lookup, Next, TrustedMetadata};
use ocicrypt_core::tuf::MetadataCache;

fn config() -> KeyServiceConfig {
    KeyServiceConfig {
        cluster: "keyservice".into(),
        authority: "keys".into(),
        metadata_path: "/metadata".into(),
        targets_path: "/targets".into(),
        trusted_root: initial_root(),
        refresh_seconds: 60,
        timeout_ms: 1000,
        max_age_seconds: 180,
    }
}

/// Serves the good repository with `variants` layered on top; `None` = key service down.
fn serve(variants: &[&str], path: &str) -> (u16, Vec<u8>) {
    let rel = path.trim_start_matches('/');
    for d in overlay(variants) {
        if let Ok(bytes) = fs::read(d.join(rel)) {
            return (200, bytes);
        }
    }
    (404, Vec::new())
}

fn run(
    variants: Option<&[&str]>,
    metadata: MetadataCache,
    projects: &[&str],
) -> (Vec<(String, KeyRecord)>, Option<TrustedMetadata>) {
    let projects = projects.iter().map(|p| p.to_string()).collect();
    let (mut lookup, mut next) = Lookup::start(&config(), metadata, projects, NOW);
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
