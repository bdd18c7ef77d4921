//! Helpers shared by the TUF and key-service tests (`tuf_fixtures`, `tuf_workflow`,
//! `keyservice_lookup`): the fixtures' clock and files, and a driver for the sans-I/O updater.
//! These tests also run as wasm32-wasip1 (`scripts/test-wasm`): files only, no processes.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use ocicrypt_core::config::KeyServiceConfig;
use ocicrypt_core::tuf::{Fetch, Outcome, Progress, RepositoryError, TufError, Updater};

/// 2030-01-01T00:00:00Z, the time the fixtures are made for (manifest.json `test_now`).
pub const NOW: i64 = 1_893_456_000;

/// The repositories python-tuf generated (`scripts/tuf-fixtures`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tuf")
}

/// The directories serving `good/` with the `variants` overlaid on top: the first directory
/// holding a file wins.
pub fn overlay(variants: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = variants
        .iter()
        .map(|v| fixtures().join("variants").join(v))
        .collect();
    dirs.push(fixtures().join("good"));
    dirs
}

/// The root metadata a client of the fixtures is shipped with.
pub fn initial_root() -> Vec<u8> {
    fs::read(fixtures().join("good/metadata/1.root.json"))
        .expect("fixtures: run scripts/tuf-fixtures")
}

/// A key service at the fixtures' repository, keeping at most `max_projects` projects.
pub fn key_service(max_projects: usize) -> KeyServiceConfig {
    KeyServiceConfig {
        cluster: "keyservice".into(),
        authority: "keys".into(),
        metadata_path: "/metadata".into(),
        targets_path: "/targets".into(),
        trusted_root: initial_root(),
        refresh_seconds: 60,
        timeout_ms: 1000,
        max_age_seconds: 180,
        max_projects,
    }
}

/// The key service's answer to `path`: the good repository with `variants` overlaid, `404`
/// where none of them holds the file.
pub fn serve(variants: &[&str], path: &str) -> (u16, Vec<u8>) {
    let rel = path.trim_start_matches('/');
    for d in overlay(variants) {
        if let Ok(bytes) = fs::read(d.join(rel)) {
            return (200, bytes);
        }
    }
    (404, Vec::new())
}

/// Runs the updater from `start` to its outcome, answering each request with `get`, which also
/// sees the updater (to check what it says it is waiting for).
pub fn drive(
    up: &mut Updater,
    start: Result<Progress, TufError>,
    mut get: impl FnMut(&Updater, &Fetch) -> (u16, Vec<u8>),
) -> Result<Outcome, TufError> {
    let mut progress = start?;
    loop {
        match progress {
            Progress::Done(outcome) => return Ok(outcome),
            Progress::Fetch(fetch) => {
                let (status, body) = get(up, &fetch);
                progress = up.on_response(status, &body)?;
            }
        }
    }
}

/// The repository error of a failed TUF operation.
pub fn repo_err(result: Result<impl std::fmt::Debug, TufError>) -> RepositoryError {
    match result {
        Err(TufError::Repository(e)) => e,
        other => panic!("expected a repository error, got {other:?}"),
    }
}
