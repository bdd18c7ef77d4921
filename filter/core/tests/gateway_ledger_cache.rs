//! The ledger cache through the gateway's stream machine: a small cache evicts, and what an
//! eviction does — with replicas the entry is read back from the registry's ledger (and kept by
//! the request until its rewrite), without replicas the blob is unknown again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
}

use common::gateway::*;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::{self, LedgerEntry};
use ocicrypt_core::distribution::ledger_cache::{self, Change};
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{CalloutAnswer, Command, Metric};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn layer(n: u8) -> Digest {
    Digest::of(&[0x1f, 0x8b, n])
}

/// An entry for layer `n` as the gateway would have recorded it (for the demo recipients).
fn entry_for(n: u8) -> LedgerEntry {
    let mut entry = ledger_layer(&mut World::new(), "demo/app", &demo_recipients());
    entry.encrypted_digest = Digest::of(&[0xee, n]);
    entry
}

fn manifest(layers: &[u8]) -> Vec<u8> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layers: Vec<Value> = layers
        .iter()
        .map(|n| {
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer(*n).to_string(), "size": LAYER.len()})
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": layers
    }))
    .unwrap()
}

fn record(world: &World, n: u8, entry: &LedgerEntry) -> Change {
    ledger_cache::put_in(
        &world.store,
        world.config.ledger_cache(),
        "demo/app",
        &layer(n),
        entry,
        NOW,
    )
    .unwrap()
}

fn manifest_put(world: &mut World, body: &[u8]) -> (ocicrypt_core::gateway::Stream, Vec<Command>) {
    let request = req("PUT", "/v2/demo/app/manifests/v1")
        .header("content-type", OCI_MANIFEST.as_bytes())
        .body(body.len() as u64);
    let (mut stream, out) = world.send(&request);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    let whole = body.to_vec();
    let out = stream.on_request_body(body.len(), true, &|| Ok(whole.clone()), &mut world.env());
    (stream, out)
}

/// Without replicas the cache is the only record: an evicted layer is unknown again, its
/// `HEAD` passes to the registry as asked (which answers 404: the client uploads it again) and
/// a manifest naming it is refused.
#[test]
fn without_replicas_an_evicted_layer_is_unknown() {
    let mut world = World::with_limits(false, json!({"ledger_cache_entries": 2}));
    let entries: Vec<LedgerEntry> = (0..3).map(entry_for).collect();
    assert_eq!(record(&world, 0, &entries[0]).evicted, 0);
    assert_eq!(record(&world, 1, &entries[1]).evicted, 0);
    assert_eq!(
        record(&world, 2, &entries[2]),
        Change {
            entries: 0,
            evicted: 1
        }
    );
    assert_eq!(ledgered(&world, "demo/app", &layer(0)), None);

    let (_, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", layer(0))));
    assert_eq!(out, vec![Command::Continue], "asked as pushed: 404");
    let (_, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", layer(2))));
    assert_eq!(
        out,
        vec![
            set(
                ":path",
                &format!("/v2/demo/app/blobs/{}", entries[2].encrypted_digest)
            ),
            Command::Continue
        ],
        "a layer still held is asked about as its ciphertext"
    );

    let (_, out) = manifest_put(&mut world, &manifest(&[0, 2]));
    assert_refused(&out, Code::ManifestInvalid, &layer(0).to_string());
    let (_, out) = manifest_put(&mut world, &manifest(&[1, 2]));
    assert!(
        out.iter()
            .any(|c| matches!(c, Command::ReplaceRequestBody(..))),
        "{out:?}"
    );
}

/// With replicas, the records a manifest needs are read back from the registry's ledger; a
/// cache too small to hold them all at once still rewrites the manifest, as the request keeps
/// what it read back.
#[test]
fn with_replicas_read_back_entries_outlive_their_eviction() {
    let mut world = World::with_limits(true, json!({"ledger_cache_entries": 1}));
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let entries: Vec<LedgerEntry> = (0..3).map(entry_for).collect();
    let body = manifest(&[0, 1, 2]);
    let (mut stream, out) = manifest_put(&mut world, &body);
    // The config and the three layers are unknown: four reads.
    let reads: Vec<_> = out
        .iter()
        .filter_map(|c| match c {
            Command::Dispatch(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reads.len(), 4, "{out:?}");
    let mut evicted = 0;
    let mut last = Vec::new();
    for (i, read) in reads.iter().enumerate() {
        let path = &read.headers[1].1;
        let answer = match (0..3u8).find(|n| path.ends_with(&ledger::ledger_tag(&layer(*n)))) {
            Some(n) => {
                let record = ledger::ledger_manifest_authenticated(
                    &key,
                    "demo/app",
                    &layer(n),
                    &entries[usize::from(n)],
                );
                CalloutAnswer::new(200, &[], &record)
            }
            None => CalloutAnswer::new(404, &[], b""),
        };
        last = stream.on_callout(read.id, &answer, &mut world.env());
        for c in &last {
            if let Command::Metric(Metric::LedgerCache(change)) = c {
                evicted += change.evicted;
            }
        }
        if i < 3 {
            assert!(!last
                .iter()
                .any(|c| matches!(c, Command::ReplaceRequestBody(..))));
        }
    }
    assert_eq!(
        evicted, 2,
        "a cache of one entry held one of the three at a time"
    );
    assert_eq!(
        (0..3)
            .filter(|n| ledgered(&world, "demo/app", &layer(*n)).is_some())
            .count(),
        1
    );
    let Some(Command::ReplaceRequestBody(_, rewritten)) = last
        .iter()
        .find(|c| matches!(c, Command::ReplaceRequestBody(..)))
    else {
        panic!("not rewritten: {last:?}")
    };
    let doc: Value = serde_json::from_slice(rewritten).unwrap();
    for n in 0..3 {
        assert_eq!(
            doc["layers"][n]["digest"],
            entries[n].encrypted_digest.to_string(),
            "layer {n}"
        );
    }
}

/// A `HEAD` answered from the cache (the client skips the upload and names the layer in its
/// manifest next) makes the entry the most recently written of its slot: the next write evicts
/// another.
#[test]
fn a_head_keeps_its_layer_in_the_cache() {
    let mut world = World::with_limits(false, json!({"ledger_cache_entries": 2}));
    let entries: Vec<LedgerEntry> = (0..3).map(entry_for).collect();
    record(&world, 0, &entries[0]);
    record(&world, 1, &entries[1]);
    let (_, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", layer(0))));
    assert_eq!(out.last(), Some(&Command::Continue));
    assert_eq!(record(&world, 2, &entries[2]).evicted, 1);
    assert_eq!(
        ledgered(&world, "demo/app", &layer(0)),
        Some(entries[0].clone())
    );
    assert_eq!(
        ledgered(&world, "demo/app", &layer(1)),
        None,
        "1 went instead"
    );
}
