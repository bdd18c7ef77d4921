//! The gateway's upload bodies, driven natively: the chunks of a `PATCH` (or of a `PUT`/`POST`
//! turned into one) come in as the host cuts them, and the machine answers what goes upstream
//! in their place. The oracle is the layer cipher itself, run once over the whole blob with the
//! same key and nonce (drawn from a copy of the world's randomness).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
    pub mod queues;
}

use common::gateway::*;
use common::queues::Queues;
use ocicrypt_core::config::Config;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::format::blockcipher::LayerEncryptor;
use ocicrypt_core::format::recipients::fingerprint;
use ocicrypt_core::gateway::prefetch::{Keystream, Report, Worker};
use ocicrypt_core::gateway::{Command, Env, Flow, Metric, Stream};
use rand::SeedableRng;
use serde_json::json;

/// A gzip-looking layer of `n` bytes (what the gateway encrypts).
fn layer(n: usize) -> Vec<u8> {
    let mut blob = b"\x1f\x8b\x08\x00".to_vec();
    blob.extend((0..n.saturating_sub(4)).map(|i| (i * 7 + i / 251) as u8));
    blob.truncate(n);
    blob
}

/// `blob` cut at `cuts` (each the length of one host chunk; the rest is the last chunk).
fn cut<'a>(blob: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = blob;
    for &n in cuts {
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

/// What the registry receives for one chunk: the replacement when the machine answered one
/// (always for the chunk's whole length), else the chunk as the host holds it. Every answer
/// ends with `Continue`.
fn forwarded(chunk: &[u8], out: &[Command]) -> Vec<u8> {
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    match out
        .iter()
        .find(|c| matches!(c, Command::ReplaceRequestBody(..)))
    {
        Some(Command::ReplaceRequestBody(n, body)) => {
            assert_eq!(*n, chunk.len(), "the whole chunk is replaced");
            body.clone()
        }
        _ => chunk.to_vec(),
    }
}

/// Feeds `pieces` as the body of `stream` (the last with end-of-stream); the bytes forwarded.
fn stream_body(world: &mut World, stream: &mut Stream, pieces: &[&[u8]]) -> Vec<u8> {
    let mut sent = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let end = i + 1 == pieces.len();
        let out = body(world, stream, piece, end);
        sent.extend(forwarded(piece, &out));
    }
    sent
}

fn body(world: &mut World, stream: &mut Stream, chunk: &[u8], end: bool) -> Vec<Command> {
    let bytes = chunk.to_vec();
    stream.on_request_body(chunk.len(), end, &|| Ok(bytes.clone()), &mut world.env())
}

/// The ciphertext of `blob` under the key and nonce the next draw of `world`'s randomness
/// gives (the stream draws them when its first window decides).
fn reference_ciphertext(world: &World, blob: &[u8]) -> Vec<u8> {
    let mut rng = world.rng.clone();
    let mut enc = LayerEncryptor::generate(&mut rng);
    let mut out = blob.to_vec();
    enc.encrypt_in_place(&mut out);
    out
}

/// skopeo's `PATCH` of a fresh session in `repository`, declaring `len` bytes.
fn patch(world: &mut World, repository: &str, len: u64) -> Stream {
    let (stream, out) = world.send(
        &req("PATCH", &upload_path(repository, 0, ""))
            .header("content-type", b"application/octet-stream")
            .body(len),
    );
    assert_eq!(out, vec![Command::Continue]);
    assert!(matches!(stream.flow, Flow::Chunk(_)));
    stream
}

/// ctr's monolithic `PUT ?digest=` of `len` bytes (a `PATCH` upstream, finished at its end);
/// of unknown length (HTTP/2 without `Content-Length`) when `len` is `None`.
fn monolithic_put(world: &mut World, digest: &Digest, len: Option<u64>) -> Stream {
    let put = req(
        "PUT",
        &upload_path("demo/app", 0, &format!("&digest={digest}")),
    )
    .header("content-type", b"application/octet-stream");
    let put = match len {
        Some(len) => put.body(len),
        None => put.chunked(),
    };
    let (stream, out) = world.send(&put);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    stream
}

/// A world whose `ci/**` repositories encrypt but let ciphertext the pipeline made pass.
fn accepting_encrypted() -> World {
    let mut world = World::new();
    world.config = Config::parse(
        &serde_json::to_vec(&json!({
            "registry": {"cluster": "registry", "timeout_ms": 30000},
            "policy": {"default": "passthrough", "rules": [
                {"repositories": "demo/**", "action": "encrypt"},
                {"repositories": "ci/**", "action": "encrypt", "accept_encrypted": true}]}
        }))
        .unwrap(),
    )
    .unwrap();
    world
}

/// Bytes that look like ciphertext (a pipeline's encrypted layer).
fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut out = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Chunked uploads: each chunk goes on as ciphertext.

#[test]
fn patch_chunks_go_on_as_the_ciphertext_of_the_whole_however_cut() {
    let blob = layer(70_000);
    // Host chunks as Envoy hands them: whole, byte-sized at first, under and over the window
    // that decides the treatment, many small ones.
    let cuts: Vec<Vec<usize>> = vec![
        vec![],
        vec![1, 1, 1],
        vec![100, 1000],
        vec![512],
        vec![511, 1, 20_000],
        vec![4096; 16],
    ];
    for cuts in cuts {
        let mut world = World::new();
        let mut stream = patch(&mut world, "demo/app", blob.len() as u64);
        let expected = reference_ciphertext(&world, &blob);
        let sent = stream_body(&mut world, &mut stream, &cut(&blob, &cuts));
        assert_eq!(sent.len(), blob.len(), "CTR keeps the length ({cuts:?})");
        assert!(sent == expected, "ciphertext differs for cuts {cuts:?}");
        let Flow::Chunk(flow) = &stream.flow else {
            panic!("the flow changed")
        };
        let chunks = flow.stream.as_ref().unwrap();
        assert_eq!(chunks.offset(), blob.len() as u64);
        assert!(chunks.encryptor().is_some());
        assert!(flow.finish.is_none(), "a PATCH finishes nothing");
    }
}

#[test]
fn the_first_window_is_held_until_it_decides() {
    let blob = layer(600);
    let mut world = World::new();
    let mut stream = patch(&mut world, "demo/app", 600);
    let expected = reference_ciphertext(&world, &blob);
    // 100 bytes cannot tell a layer from JSON: they are held (replaced by nothing).
    let out = body(&mut world, &mut stream, &blob[..100], false);
    assert_eq!(
        out,
        vec![
            Command::ReplaceRequestBody(100, Vec::new()),
            Command::Continue
        ]
    );
    // With the next 500 the window is full: everything taken so far goes on, encrypted.
    let out = body(&mut world, &mut stream, &blob[100..], true);
    assert_eq!(
        out,
        vec![
            Command::ReplaceRequestBody(500, expected),
            Command::Continue
        ]
    );
}

#[test]
fn blobs_are_told_apart_by_their_first_window() {
    let mut tar = vec![0u8; 1024];
    tar[..10].copy_from_slice(b"{evil}.txt");
    let json = br#"  {"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#.to_vec();
    // (repository, blob, goes on as it is)
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("demo/app", json.clone(), true, "JSON (a config) passes"),
        (
            "demo/app",
            tar,
            false,
            "a tar whose first member is named {…} is encrypted",
        ),
        ("demo/app", layer(5000), false, "gzip is encrypted"),
        (
            "demo/app",
            random_bytes(5000),
            false,
            "random-looking bytes are encrypted by default",
        ),
        (
            "ci/app",
            random_bytes(10_000),
            true,
            "ciphertext passes where the policy accepts it",
        ),
        (
            "ci/app",
            layer(5000),
            false,
            "a layer is encrypted where ciphertext is accepted",
        ),
        ("ci/app", json, true, "JSON passes there too"),
    ];
    for (repository, blob, passes, why) in cases {
        let mut world = accepting_encrypted();
        let mut stream = patch(&mut world, repository, blob.len() as u64);
        let expected = reference_ciphertext(&world, &blob);
        let sent = stream_body(&mut world, &mut stream, &cut(&blob, &[300, 2000]));
        if passes {
            assert_eq!(sent, blob, "{why}");
        } else {
            assert!(sent == expected, "{why}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals mid-body: the chunk that would carry plaintext is never forwarded.

#[test]
fn a_blob_that_began_like_json_and_turns_binary_is_refused() {
    let mut world = World::new();
    let mut stream = patch(&mut world, "demo/app", 2000);
    let json = format!("{{\"a\":\"{}\"}}", "x".repeat(600));
    let out = body(&mut world, &mut stream, json.as_bytes(), false);
    assert_eq!(forwarded(json.as_bytes(), &out), json.as_bytes());
    let out = body(&mut world, &mut stream, b"\0\0tar", false);
    assert_refused(&out, Code::BlobUploadInvalid, "began like JSON");
    assert!(
        !out.iter()
            .any(|c| matches!(c, Command::ReplaceRequestBody(..) | Command::Continue)),
        "the refused chunk goes nowhere: {out:?}"
    );
    // The rest of the body is not looked at.
    assert_eq!(
        body(&mut world, &mut stream, b"more", true),
        vec![Command::Pause]
    );
}

#[test]
fn ciphertext_that_goes_on_as_plaintext_is_refused() {
    let mut world = accepting_encrypted();
    let mut stream = patch(&mut world, "ci/app", 20_000);
    let first = random_bytes(8192);
    let out = body(&mut world, &mut stream, &first, false);
    assert_eq!(out.last(), Some(&Command::Continue));
    let out = body(&mut world, &mut stream, &layer(8192), false);
    assert_refused(&out, Code::BlobUploadInvalid, "");
}

#[test]
fn a_body_the_host_cannot_hand_over_is_refused() {
    let mut world = World::new();
    let mut stream = patch(&mut world, "demo/app", 10);
    let out = stream.on_request_body(
        10,
        false,
        &|| Err(OciError::new(Code::Unknown, "host refused the body")),
        &mut world.env(),
    );
    assert_refused(&out, Code::Unknown, "host refused");
}

// ---------------------------------------------------------------------------------------------
// Monolithic uploads: the completion at the end of the body.

#[test]
fn a_monolithic_body_completes_with_the_clients_digest() {
    let blob = layer(50_000);
    let digest = Digest::of(&blob);
    let mut world = World::new();
    let mut stream = monolithic_put(&mut world, &digest, Some(blob.len() as u64));
    let expected = reference_ciphertext(&world, &blob);
    let sent = stream_body(&mut world, &mut stream, &cut(&blob, &[1000, 30_000]));
    assert!(sent == expected);
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("the flow changed")
    };
    assert!(
        flow.stream.is_none(),
        "the cipher state went into the completion"
    );
    let completion = flow.finish.as_ref().unwrap().completion.as_ref().unwrap();
    assert_eq!(completion.client_digest, digest);
    assert_eq!(completion.stored_digest, Digest::of(&sent));
    let ledger = completion.ledger.as_ref().unwrap();
    assert_eq!(ledger.encrypted_digest, Digest::of(&sent));
    assert_eq!(ledger.size, blob.len() as u64);
    assert_eq!(
        ledger.recipients.as_deref(),
        Some(fingerprint(&demo_recipients()).as_str()),
        "wrapped for the recipients resolved before the body"
    );
    assert!(ledger
        .annotations
        .contains_key("org.opencontainers.image.enc.keys.jwe"));
}

/// With hashing helpers (the native build's threads), the bytes sent and the completion are
/// those of hashing in line; a helper that declines leaves the stream hashing in line.
#[test]
fn ciphertext_hashed_by_helpers_completes_as_hashed_in_line() {
    let blob = layer(50_000);
    let digest = Digest::of(&blob);
    for (helping, took) in [(Helping::Whole, 1), (Helping::Decline, 0)] {
        for cuts in [vec![], vec![1000, 30_000], vec![100, 100, 400, 4096, 4096]] {
            let mut world = World::new();
            let (helpers, lanes) = TestHelpers::lent(helping);
            world.hashing = Some(helpers);
            let mut stream = monolithic_put(&mut world, &digest, Some(blob.len() as u64));
            let expected = reference_ciphertext(&world, &blob);
            let sent = stream_body(&mut world, &mut stream, &cut(&blob, &cuts));
            assert!(sent == expected, "{helping:?} {cuts:?}");
            assert_eq!(lanes.load(std::sync::atomic::Ordering::SeqCst), took);
            let Flow::Chunk(flow) = &stream.flow else {
                panic!("{helping:?} {cuts:?}: the flow changed")
            };
            let completion = flow.finish.as_ref().unwrap().completion.as_ref().unwrap();
            assert_eq!(completion.client_digest, digest);
            assert_eq!(completion.stored_digest, Digest::of(&sent));
            let ledger = completion.ledger.as_ref().unwrap();
            assert_eq!(ledger.encrypted_digest, Digest::of(&sent));
        }
    }
}

/// A helper that died or lost bytes: the last chunk (ciphertext) is followed by a refusal and
/// nothing is finished, so the registry never commits the blob.
#[test]
fn a_monolithic_body_whose_hashing_helper_failed_is_refused_at_its_end() {
    let blob = layer(50_000);
    let digest = Digest::of(&blob);
    for helping in [Helping::Die, Helping::LoseAByte] {
        let mut world = World::new();
        let (helpers, _) = TestHelpers::lent(helping);
        world.hashing = Some(helpers);
        let mut stream = monolithic_put(&mut world, &digest, Some(blob.len() as u64));
        let pieces = cut(&blob, &[1000, 30_000]);
        for piece in &pieces[..2] {
            let out = body(&mut world, &mut stream, piece, false);
            assert_eq!(out.last(), Some(&Command::Continue), "{helping:?}: {out:?}");
        }
        let out = body(&mut world, &mut stream, pieces[2], true);
        assert_refused(&out, Code::Unavailable, "hashing helper failed");
        assert!(matches!(stream.flow, Flow::Refused), "{helping:?}");
    }
}

#[test]
fn a_monolithic_json_blob_completes_unencrypted() {
    let blob = br#"{"architecture":"amd64","os":"linux"}"#;
    let digest = Digest::of(blob);
    let mut world = World::new();
    let mut stream = monolithic_put(&mut world, &digest, None);
    let sent = stream_body(&mut world, &mut stream, &[blob]);
    assert_eq!(sent, blob);
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("the flow changed")
    };
    let completion = flow.finish.as_ref().unwrap().completion.as_ref().unwrap();
    assert_eq!(completion.stored_digest, digest);
    assert!(completion.ledger.is_none());
}

#[test]
fn a_monolithic_body_of_another_digest_is_refused_at_its_end() {
    let blob = layer(3000);
    let mut world = World::new();
    let mut stream = monolithic_put(&mut world, &gz_digest(), Some(blob.len() as u64));
    let expected = reference_ciphertext(&world, &blob);
    let out = body(&mut world, &mut stream, &blob, true);
    // The last chunk is ciphertext already; the refusal follows it and nothing is finished.
    assert_eq!(
        out[0],
        Command::ReplaceRequestBody(blob.len(), expected),
        "{out:?}"
    );
    assert_refused(&out, Code::DigestInvalid, "the client named");
    assert!(matches!(stream.flow, Flow::Refused));
}

#[test]
fn an_empty_body_forwards_nothing_and_completes_as_the_empty_blob() {
    let mut world = World::new();
    let mut stream = patch(&mut world, "demo/app", 0);
    assert_eq!(
        body(&mut world, &mut stream, b"", true),
        vec![Command::Continue]
    );
    stream.on_end(&world.store, &world.held);

    // A PUT declaring no bytes finishes the session by its request line; one of unknown
    // length whose body turns out empty finishes here.
    let empty = Digest::of(b"");
    let mut stream = monolithic_put(&mut world, &empty, None);
    assert_eq!(
        body(&mut world, &mut stream, b"", true),
        vec![Command::Continue]
    );
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("the flow changed")
    };
    let completion = flow.finish.as_ref().unwrap().completion.as_ref().unwrap();
    // Zero bytes encrypt to zero bytes: the stored digest is the empty blob's.
    assert_eq!(completion.stored_digest, empty);
    assert_eq!(completion.ledger.as_ref().unwrap().size, 0);
}

#[test]
fn a_body_over_its_declared_length_is_encrypted_whole() {
    // Envoy stops a body that overruns its Content-Length; whatever reaches the filter is
    // encrypted all the same (the declared length only bounds the keystream asked ahead).
    let blob = layer(9000);
    let mut world = World::new();
    let mut stream = patch(&mut world, "demo/app", 1000);
    let expected = reference_ciphertext(&world, &blob);
    let sent = stream_body(&mut world, &mut stream, &cut(&blob, &[4000]));
    assert!(sent == expected);
}

#[test]
fn bodies_of_flows_that_do_not_encrypt_go_on_untouched() {
    let mut world = World::new();
    let (mut stream, _) = world.send(&req("PATCH", "/v2/plain/app/blobs/uploads/x").body(4));
    assert_eq!(
        body(&mut world, &mut stream, b"data", true),
        vec![Command::Continue]
    );
}

// ---------------------------------------------------------------------------------------------
// With the worker's keystream prefetch lent: the same bytes, and its tally at the body's end.

#[test]
fn a_body_helped_by_another_worker_goes_on_as_the_same_ciphertext() {
    let blob = layer(3 << 20);
    let mut world = World::new();
    let mut queues = Queues::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut mine = Worker::default();
    let mut helper = Worker::default();
    for w in [&mut mine, &mut helper] {
        w.on_stream(NOW, &world.store, &mut queues, &mut rng);
    }
    let mut stream = patch(&mut world, "demo/app", blob.len() as u64);
    let expected = reference_ciphertext(&world, &blob);
    let pieces = cut(&blob, &[256 << 10; 11]);
    let mut sent = Vec::new();
    let mut last = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let bytes = piece.to_vec();
        let mut q = queues.clone();
        let mut env = Env {
            keystream: Some(Keystream {
                worker: &mut mine,
                queues: &mut q,
            }),
            hashing: None,
            ..world.env()
        };
        last = stream.on_request_body(
            piece.len(),
            i + 1 == pieces.len(),
            &|| Ok(bytes.clone()),
            &mut env,
        );
        sent.extend(forwarded(piece, &last));
        // The helper's VM serves what was asked, one request per queue event.
        let requests = helper.queues().unwrap().requests;
        while queues.waiting(requests) > 0 {
            helper.on_queue_ready(requests, &mut queues);
        }
    }
    assert!(
        sent == expected,
        "helped bytes differ from the layer cipher"
    );
    // The end of the body ends the job and reports what this worker's prefetch did.
    let Some(Command::Metric(Metric::Keystream(report))) = last.first() else {
        panic!("no tally at the end: {last:?}")
    };
    assert!(report.used > 0 && report.used <= report.asked, "{report:?}");
    assert_eq!(mine.jobs(), 0);
    assert_eq!(helper.report().served, report.asked);
    // The stream's end finds nothing more to report.
    assert_eq!(stream.end_keystream(&mut mine), Report::default());
}
