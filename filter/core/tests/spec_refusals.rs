//! The operator's guide's table of refusals (`docs/operators-guide.md`, 7.2 Refusals), as a
//! specification run natively: every message the table quotes is provoked here from the
//! requests and registry answers that cause it, and the refusal must carry the table's status,
//! code and the message as the table quotes it (`<…>` stands for values, `…` for any text).
//! The table is read from the guide itself, so a row added there without a case here, or a
//! message reworded on one side only, fails this test.
//!
//! Rows not provoked here are listed in [`NOT_HERE`], each with the reason: the host's own
//! failures (the adapter raises them around host calls), the registry's own refusals relayed
//! as they are, and the flows that still run in the wasm adapter while issue 16 moves them into
//! the core.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod finish;
    pub mod gateway;
    pub mod queues;
    pub mod scenarios;
}

use common::finish::{finishing, monolithic};
use common::gateway::*;
use common::scenarios::{chunk_sent, single_post};
use ocicrypt_core::config::KeyServiceConfig;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::plugin::{Host, Plugin};
use ocicrypt_core::gateway::{CalloutAnswer, Command, ResponseHead, Stream};
use ocicrypt_core::keys::keyservice::{self, KeyRecord};
use ocicrypt_core::keys::records::KeyWorker;
use ocicrypt_core::store::Store as _;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The guide's table.

/// One quoted message of the table: the status and code of its row, and the quote.
#[derive(Debug, Clone, PartialEq)]
struct Quoted {
    status: u16,
    code: String,
    text: String,
}

/// Every backquoted text of the message column of 7.2's first table, and each reason of its
/// second table (those are `503 UNAVAILABLE`, inside `no verified recipient keys …`).
fn guide_quotes() -> Vec<Quoted> {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/operators-guide.md"
    ))
    .unwrap();
    let start = guide.find("### 7.2 Refusals").unwrap();
    let end = guide.find("### 7.3 ").unwrap();
    let mut quotes = Vec::new();
    for line in guide[start..end].lines() {
        if !line.starts_with("| ") || line.starts_with("| ---") {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(str::trim)
            .collect();
        let (status, code, column) = match cells[0].split_once(' ') {
            Some((status, code)) if status.parse::<u16>().is_ok() => (
                status.parse().unwrap(),
                code.trim_matches('`').to_string(),
                cells[1],
            ),
            _ if cells[0] == "status, code" || cells[0] == "reason begins with" => continue,
            _ => (503, "UNAVAILABLE".to_string(), cells[0]),
        };
        for (i, piece) in column.split('`').enumerate() {
            if i % 2 == 1 {
                quotes.push(Quoted {
                    status,
                    code: code.clone(),
                    text: piece.to_string(),
                });
            }
        }
    }
    quotes
}

/// Whether `message` reads as the table's `pattern`: its literal parts in order, `<…>` and
/// `…` standing for any text; anchored at the start unless the pattern starts with a wildcard.
fn reads_as(message: &str, pattern: &str) -> bool {
    let mut parts = Vec::new();
    let mut rest = pattern;
    let mut literal = String::new();
    while let Some(c) = rest.chars().next() {
        if c == '<' {
            if let Some(close) = rest.find('>') {
                parts.push(std::mem::take(&mut literal));
                rest = &rest[close + 1..];
                continue;
            }
        }
        if c == '…' {
            parts.push(std::mem::take(&mut literal));
            rest = &rest[c.len_utf8()..];
            continue;
        }
        literal.push(c);
        rest = &rest[c.len_utf8()..];
    }
    parts.push(literal);
    let mut at = 0;
    for (i, part) in parts.iter().enumerate() {
        let part = part.trim_matches(' ');
        if part.is_empty() {
            continue;
        }
        match message[at..].find(part) {
            Some(0) => at += part.len(),
            Some(found) if i > 0 => at += found + part.len(),
            _ => return false,
        }
    }
    true
}

#[test]
fn the_pattern_reader_itself() {
    assert!(reads_as(
        "tag \"ocicrypt.x\" is reserved for the encrypting gateway's ledger (…)",
        "tag \"<tag>\" is reserved for the encrypting gateway's ledger"
    ));
    assert!(!reads_as(
        "the tag \"x\" is reserved for the encrypting gateway's ledger",
        "tag \"<tag>\" is reserved for the encrypting gateway's ledger"
    ));
    assert!(reads_as("x names 3 digests y", "… names <n> digests"));
    assert!(!reads_as("names 3", "… names <n> digests"));
}

// ---------------------------------------------------------------------------------------------
// Scenarios: the requests and answers that cause each refusal.

fn oci_manifest(layers: Value) -> Vec<u8> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(config).to_string(), "size": config.len()},
        "layers": layers
    }))
    .unwrap()
}

fn gz_layer() -> Value {
    json!([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": gz_digest().to_string(), "size": LAYER.len()}])
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A manifest `PUT` of `body` to `reference` in `demo/app`: its headers, then the whole body.
fn push_manifest(
    world: &mut World,
    reference: &str,
    content_type: &str,
    body: &[u8],
) -> Vec<Command> {
    let request = req("PUT", &format!("/v2/demo/app/manifests/{reference}"))
        .header("content-type", content_type.as_bytes())
        .body(body.len() as u64);
    let (mut stream, out) = world.send(&request);
    if refusal(&out).is_some() {
        return out;
    }
    let whole = body.to_vec();
    stream.on_request_body(body.len(), true, &|| Ok(whole.clone()), &mut world.env())
}

/// The push of an OCI manifest naming `layers`, in a world where the test layer was encrypted
/// by the gateway (for the demo recipients).
fn push_layers(layers: Value) -> Vec<Command> {
    let mut world = World::new();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    push_manifest(&mut world, "v1", OCI_MANIFEST, &oci_manifest(layers))
}

/// A manifest pushed by digest (a platform manifest) whose store callout, the gateway's own
/// `PUT` under the new digest, the registry answers with `status`.
fn stored_by_digest_answered(status: u16) -> Vec<Command> {
    let mut world = World::new();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    let body = oci_manifest(gz_layer());
    let request = req(
        "PUT",
        &format!("/v2/demo/app/manifests/{}", Digest::of(&body)),
    )
    .header("content-type", OCI_MANIFEST.as_bytes())
    .body(body.len() as u64);
    let (mut stream, _) = world.send(&request);
    let whole = body.clone();
    let out = stream.on_request_body(body.len(), true, &|| Ok(whole.clone()), &mut world.env());
    let Some(Command::Dispatch(put)) = out.iter().rev().find(|c| matches!(c, Command::Dispatch(_)))
    else {
        return out;
    };
    let id = put.id;
    stream.on_callout(id, &CalloutAnswer::new(status, &[], b""), &mut world.env())
}

/// The push of an OCI manifest naming `layers`, none of them known to the gateway.
fn push_unknown_layers(layers: Value) -> Vec<Command> {
    let mut world = World::new();
    push_manifest(&mut world, "v1", OCI_MANIFEST, &oci_manifest(layers))
}

/// A `POST` that opens a session, answered by the registry with `status` and `location`.
fn post_answered(status: &str, location: &str) -> Vec<Command> {
    let mut world = World::new();
    let (mut stream, out) = world.send(&req("POST", "/v2/demo/app/blobs/uploads/"));
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    let head = ResponseHead::new(&[(":status", status), ("location", location)]);
    stream.on_response_headers(&head, &mut world.env())
}

/// A `PATCH` of the test session at the registry's `offset` with a saved gateway record of
/// `saved` bytes (none: `None`), carrying `content_range`.
fn patch(offset: u64, saved: Option<&[u8]>, content_range: &str) -> Vec<Command> {
    let mut world = World::new();
    if let Some(bytes) = saved {
        let record = encrypted_record(&mut world, bytes);
        save_record(&world, &record);
    }
    let request = req("PATCH", &upload_path("demo/app", offset, ""))
        .body(3)
        .header("content-range", content_range.as_bytes());
    world.send(&request).1
}

/// A manifest `DELETE` by digest whose check read finds one of the gateway's ledger records.
fn delete_ledger_record() -> Vec<Command> {
    let mut world = World::new();
    let entry = ledger_layer(&mut world, "demo/app", &demo_recipients());
    let record = ledger::ledger_manifest(&gz_digest(), &entry);
    let request = req(
        "DELETE",
        &format!("/v2/demo/app/manifests/{}", Digest::of(&record)),
    );
    let (mut stream, out) = world.send(&request);
    let Command::Dispatch(callout) = &out[0] else {
        panic!("{out:?}")
    };
    let answer = CalloutAnswer::new(200, &[], &record);
    stream.on_callout(callout.id, &answer, &mut world.env())
}

/// A manifest push with `replicas` whose unknown layer's ledger record, read from the
/// registry, is `record`.
fn push_reading_ledger(record: &[u8]) -> Vec<Command> {
    let mut world = World::with(true);
    let body = oci_manifest(gz_layer());
    let request = req("PUT", "/v2/demo/app/manifests/v1")
        .header("content-type", OCI_MANIFEST.as_bytes())
        .body(body.len() as u64);
    let (mut stream, _) = world.send(&request);
    let out = stream.on_request_body(body.len(), true, &|| Ok(body.clone()), &mut world.env());
    let Command::Dispatch(read) = &out[0] else {
        panic!("{out:?}")
    };
    let answer = CalloutAnswer::new(200, &[], record);
    stream.on_callout(read.id, &answer, &mut world.env())
}

/// Two requests of one session: the second arrives while the first is at the gateway.
fn concurrent_patches() -> Vec<Command> {
    let mut world = World::new();
    let request = req("PATCH", &upload_path("demo/app", 0, ""))
        .body(3)
        .header("content-range", b"0-2");
    let (_first, out) = world.send(&request);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    world.send(&request).1
}

/// A chunk the registry answered with a `Range` other than the bytes the gateway sent.
fn chunk_answered_with_range(range: &str) -> Vec<Command> {
    let mut world = World::new();
    let (mut stream, _) = chunk_sent(&mut world);
    let location = upload_path("demo/app", LAYER.len() as u64, "");
    let head = ResponseHead::new(&[
        (":status", "202"),
        ("location", &location),
        ("range", range),
    ]);
    stream.on_response_headers(&head, &mut world.env())
}

fn refused_by_keys(reason: &str) -> Vec<Command> {
    let mut world = World::new();
    world.keys.answer = Err(OciError::new(Code::Unavailable, reason));
    world.send(&req("POST", "/v2/demo/app/blobs/uploads/")).1
}

/// A push to `demo` refused with the reason the core's key records give for `project`: the
/// worker's memory over the world's store, `record` stored for the project first (if any),
/// after the request's lookup when `looked_up`.
fn refused_by_key_records(
    project: &str,
    key_service: bool,
    record: Option<KeyRecord>,
    looked_up: bool,
) -> Vec<Command> {
    let mut world = World::new();
    if key_service {
        world.config.key_service = Some(KeyServiceConfig {
            cluster: "keyservice".into(),
            authority: "keys".into(),
            metadata_path: "/metadata".into(),
            targets_path: "/targets".into(),
            trusted_root: Vec::new(),
            refresh_seconds: 60,
            timeout_ms: 1000,
            max_age_seconds: 180,
            max_projects: 1024,
        });
    }
    if let Some(record) = record {
        world
            .store
            .set(&keyservice::record_key(project), &record.to_bytes())
            .unwrap();
    }
    let now = i64::try_from(NOW).unwrap();
    let answer = KeyWorker::new().resolve(&world.config, &world.store, project, now, looked_up);
    let Err(err) = answer else {
        panic!("{project}: the key records did not refuse")
    };
    refused_by_keys_with(world, err)
}

/// A record of `demo` verified `age` seconds ago, valid until `expires_in` from now.
fn demo_record(document: &str, age: i64, expires_in: i64) -> Option<KeyRecord> {
    let now = i64::try_from(NOW).unwrap();
    Some(KeyRecord {
        checked_at: now - age,
        expires_at: now + expires_in,
        document: Some(document.to_string()),
        error: None,
        versions: Vec::new(),
        unknown: false,
    })
}

fn refused_by_keys_with(mut world: World, err: OciError) -> Vec<Command> {
    world.keys.answer = Err(err);
    world.send(&req("POST", "/v2/demo/app/blobs/uploads/")).1
}

const CHALLENGE: &str =
    "Bearer realm=\"https://harbor.example/service/token\",service=\"harbor-registry\"";

/// A refusal's scenario: the requests and answers, and what the stream answered last.
type Scenario = Box<dyn Fn() -> Vec<Command>>;

/// The table's quotes provoked here: (the quote as the guide has it, what the message must
/// read as when the quote is not itself the message, the scenario).
/// A `PATCH` in a repository whose policy accepts ciphertext: a first chunk that looks like
/// ciphertext, then one that does not.
fn ciphertext_then_plaintext() -> Vec<Command> {
    use rand::{RngCore, SeedableRng};
    let mut world = World::new();
    world.config = ocicrypt_core::config::Config::parse(
        &serde_json::to_vec(&json!({
            "registry": {"cluster": "registry"},
            "policy": {"default": "passthrough", "rules": [
                {"repositories": "ci/**", "action": "encrypt", "accept_encrypted": true}]}
        }))
        .unwrap(),
    )
    .unwrap();
    let (mut stream, out) = world.send(&req("PATCH", &upload_path("ci/app", 0, "")).body(16384));
    assert_eq!(out, vec![Command::Continue]);
    let mut ciphertext = vec![0u8; 8192];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut ciphertext);
    let out = stream.on_request_body(8192, false, &|| Ok(ciphertext.clone()), &mut world.env());
    assert_eq!(out.last(), Some(&Command::Continue));
    let tar = vec![0u8; 8192];
    stream.on_request_body(8192, true, &|| Ok(tar.clone()), &mut world.env())
}

fn cases() -> Vec<(&'static str, Option<&'static str>, Scenario)> {
    let d = gz_digest().to_string();
    let other = Digest::of(b"another body").to_string();
    vec![
        (
            "gateway host call failed (<what>); nothing was stored, retry",
            None,
            Box::new(|| Stream::new().on_host_failed("set header :path: host status 2 (BadArgument)")),
        ),
        (
            "the gateway has no valid configuration",
            None,
            Box::new(|| {
                let world = World::new();
                let mut queues = common::queues::Queues::default();
                let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
                let host = Host { store: &world.store, queues: &mut queues, rng: &mut rng, now: NOW };
                Plugin::new().on_stream_event(&mut Stream::new(), host, |s, env| {
                    s.on_request_headers(req("GET", "/v2/").head(), env)
                })
            }),
        ),
        (
            "the registry's tags list of <repo> is <n> bytes, over the <limit> bytes the gateway reads to leave out its own tags (limits.max_manifest_bytes); ask for it in pages (?n=) or raise the limit",
            None,
            Box::new(|| {
                let mut world = World::new();
                let (mut stream, out) = world.send(&req("GET", "/v2/demo/app/tags/list"));
                let [Command::Dispatch(read), Command::Pause] = out.as_slice() else {
                    panic!("{out:?}")
                };
                let big = format!(r#"{{"name":"demo/app","tags":["{}"]}}"#, "x".repeat(5000));
                let answer = CalloutAnswer::new(200, &[], big.as_bytes());
                stream.on_callout(read.id, &answer, &mut world.env())
            }),
        ),
        (
            "tag \"<tag>\" is reserved for the encrypting gateway's ledger",
            None,
            Box::new(|| {
                let mut world = World::new();
                push_manifest(&mut world, "ocicrypt.mine", OCI_MANIFEST, b"{}")
            }),
        ),
        (
            "this manifest of <repo> is the encrypting gateway's ledger; clients cannot delete it",
            None,
            Box::new(delete_ledger_record),
        ),
        (
            "ambiguous upload request (<why>); send each parameter once, with its name unencoded",
            None,
            Box::new(|| {
                let mut world = World::new();
                let path = "/v2/demo/app/blobs/uploads/?mount=sha256:a&mount=sha256:b&from=demo/x";
                world.send(&req("POST", path)).1
            }),
        ),
        (
            "the blob began like ciphertext but goes on like plaintext",
            None,
            Box::new(ciphertext_then_plaintext),
        ),
        (
            "the blob began like JSON but holds binary data; nothing was stored, push it again",
            None,
            Box::new(|| {
                let mut world = World::new();
                let request = req("PATCH", &upload_path("demo/app", 0, "")).body(1024);
                let (mut stream, _) = world.send(&request);
                let json = br#"{"name": "a tar whose first member is named like JSON"}"#.repeat(10);
                let out = stream.on_request_body(json.len(), false, &|| Ok(json.clone()), &mut world.env());
                assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
                let binary = vec![0u8; 512];
                stream.on_request_body(512, true, &|| Ok(binary.clone()), &mut world.env())
            }),
        ),
        (
            "upload requests with a form Content-Type are refused on encrypted repositories",
            None,
            Box::new(|| {
                let mut world = World::new();
                let post = req("POST", "/v2/demo/app/blobs/uploads/")
                    .header("content-type", b"application/x-www-form-urlencoded")
                    .body(3);
                world.send(&post).1
            }),
        ),
        (
            "request trailers are refused on writes to an encrypted repository",
            None,
            Box::new(|| {
                let mut world = World::new();
                let request = req("PATCH", &upload_path("demo/app", 0, "")).chunked();
                let (mut stream, _) = world.send(&request);
                stream.on_request_trailers()
            }),
        ),
        (
            "the upload URL carries no registry state (_state) for this session",
            None,
            Box::new(|| {
                let mut world = World::new();
                let path = format!("/v2/demo/app/blobs/uploads/{UUID}");
                world.send(&req("PATCH", &path).body(3)).1
            }),
        ),
        (
            "the gateway's state of this upload is at byte <n> but the registry's is at byte <m>",
            None,
            Box::new(|| patch(3, Some(LAYER), "3-5")),
        ),
        (
            "the registry holds <n> bytes of this upload but the request carries no gateway state for them",
            None,
            Box::new(|| patch(5, None, "5-7")),
        ),
        (
            "another request of this upload session is in progress at the gateway",
            None,
            Box::new(concurrent_patches),
        ),
        (
            "layer <digest> was encrypted for recipients project \"<p>\" no longer has (a key rotation)",
            None,
            Box::new(|| {
                let mut world = World::new();
                let rotated = vec![ocicrypt_core::format::recipients::Recipient::from_jwk(&json!({
                    "kty": "EC", "crv": "P-256",
                    "x": "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0",
                    "y": "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps"}))
                .unwrap()];
                ledger_layer(&mut world, "demo/app", &rotated);
                push_manifest(&mut world, "v1", OCI_MANIFEST, &oci_manifest(gz_layer()))
            }),
        ),
        (
            "\"<type>\"",
            Some("layers[<i>] <digest> has media type \"<type>\", which an encrypted repository"),
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["mediaType"] = json!("application/octet-stream");
                push_unknown_layers(layers)
            }),
        ),
        (
            "+encrypted",
            Some("layers[<i>] <digest> (<type>+encrypted)"),
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip+encrypted");
                push_layers(layers)
            }),
        ),
        (
            "the registry's ledger record for <digest> in <repo> was not written by this gateway (or was altered)",
            None,
            Box::new(|| {
                let mut world = World::new();
                let entry = ledger_layer(&mut world, "demo/app", &demo_recipients());
                push_reading_ledger(&ledger::ledger_manifest(&gz_digest(), &entry))
            }),
        ),
        (
            "the manifest names <n> digests the gateway has no ledger entry for, more than the <max> it looks up per manifest (limits.max_ledger_lookups)",
            None,
            Box::new(|| {
                let mut world = World::with_limits(true, json!({"max_ledger_lookups": 1}));
                let mut layers = gz_layer();
                let second = Digest::of(b"a second layer").to_string();
                layers.as_array_mut().unwrap().push(json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": second, "size": 14}));
                push_manifest(&mut world, "v1", OCI_MANIFEST, &oci_manifest(layers))
            }),
        ),
        (
            "the registry answered a Location outside encrypted repository <repo> (or off this gateway)",
            None,
            Box::new(|| post_answered("202", "/v2/demo/other/blobs/uploads/x")),
        ),
        (
            "… a redirect (<status>) …",
            None,
            Box::new(|| post_answered("307", "http://elsewhere.example/v2/demo/app/blobs/uploads/x")),
        ),
        (
            "the registry's Range (<r>) does not match the <n> bytes the gateway sent for this upload",
            None,
            Box::new(|| chunk_answered_with_range("0-2")),
        ),
        (
            "the gateway's hashing helper failed on this upload; nothing of it was committed, push it again",
            None,
            Box::new(|| {
                // A monolithic upload whose helper thread (native build) died: refused at its end.
                let mut world = World::new();
                let (helpers, _) = TestHelpers::lent(Helping::Die);
                world.hashing = Some(helpers);
                let blob = vec![0x1f; 4096];
                let put = req(
                    "PUT",
                    &upload_path("demo/app", 0, &format!("&digest={}", Digest::of(&blob))),
                )
                .body(blob.len() as u64);
                let (mut stream, _) = world.send(&put);
                stream.on_request_body(blob.len(), true, &|| Ok(blob.clone()), &mut world.env())
            }),
        ),
        (
            "write request with an encoded or non-canonical path",
            None,
            Box::new(|| {
                let mut world = World::new();
                world.send(&req("POST", "/v2/plain/x/../../demo/app/blobs/uploads/")).1
            }),
        ),
        (
            "the registry answered 401 when the gateway tried to open an upload session",
            None,
            Box::new(|| single_post(CalloutAnswer::new(401, &[("www-authenticate", CHALLENGE)], b""))),
        ),
        (
            "the registry answered 401 when the gateway tried to",
            None,
            Box::new(|| single_post(CalloutAnswer::new(401, &[], b""))),
        ),
        (
            "403",
            Some("the registry answered 403 when the gateway tried to"),
            Box::new(|| single_post(CalloutAnswer::new(403, &[], b""))),
        ),
        (
            "the registry answered <status> when the gateway tried to open an upload session",
            None,
            Box::new(|| single_post(CalloutAnswer::new(500, &[], b""))),
        ),
        (
            "could not reach the registry; nothing was stored",
            None,
            Box::new(|| {
                let mut world = World::new();
                let post = req("POST", &format!("/v2/demo/app/blobs/uploads/?digest={}", gz_digest()))
                    .body(3);
                let (mut stream, out) = world.send(&post);
                let Command::Dispatch(callout) = &out[0] else {
                    panic!("{out:?}")
                };
                stream.on_dispatch_failed(callout.id, &mut world.env())
            }),
        ),
        (
            "the uploaded content has digest <D1> but the client named <D2>; nothing was stored, push again",
            None,
            Box::new(move || {
                let mut world = World::new();
                let record = encrypted_record(&mut world, LAYER);
                save_record(&world, &record);
                let path = upload_path("demo/app", LAYER.len() as u64, &format!("&digest={other}"));
                world.send(&req("PUT", &path)).1
            }),
        ),
        (
            "malformed digest \"<d>\": expected sha256:<64 lowercase hex>",
            None,
            Box::new(|| {
                let mut world = World::new();
                world.send(&req("PUT", &upload_path("demo/app", 0, "&digest=sha256:nothex"))).1
            }),
        ),
        (
            "unsupported digest algorithm in \"<d>\": only sha256 is accepted",
            None,
            Box::new(|| {
                let mut world = World::new();
                world.send(&req("PUT", &upload_path("demo/app", 0, "&digest=md5:1"))).1
            }),
        ),
        (
            "the manifest body has digest <D1> but was pushed as <D2>",
            None,
            Box::new(move || {
                let mut world = World::new();
                ledger_layer(&mut world, "demo/app", &demo_recipients());
                let body = oci_manifest(gz_layer());
                push_manifest(&mut world, &d, OCI_MANIFEST, &body)
            }),
        ),
        (
            "chunk starts at byte <n> but the upload holds <m> bytes; resume from there",
            None,
            Box::new(|| patch(0, None, "7-9")),
        ),
        (
            "the gateway's state of this upload is unreadable; restart the upload",
            None,
            Box::new(|| {
                let mut world = World::new();
                // A record another module version wrote: the same bytes under another version.
                let record = encrypted_record(&mut world, LAYER);
                save_record(&world, &record);
                let key = ocicrypt_core::distribution::upload_table::slot_key(UUID);
                let mut slot = world.store.get(&key).unwrap();
                let saved = record.to_bytes();
                let at = slot.windows(saved.len()).position(|w| w == &saved[..]).unwrap();
                slot[at] ^= 0x80;
                world.store.set(&key, &slot).unwrap();
                let at_registry = LAYER.len() as u64;
                let request = req("PATCH", &upload_path("demo/app", at_registry, ""))
                    .body(3)
                    .header("content-range", format!("{at_registry}-{}", at_registry + 2).as_bytes());
                world.send(&request).1
            }),
        ),
        (
            "upload <id> does not belong to repository <repo>",
            None,
            Box::new(|| {
                let mut world = World::new();
                let record = encrypted_record(&mut world, LAYER);
                save_record(&world, &record);
                let path = upload_path("demo/other", LAYER.len() as u64, "");
                let request = req("PATCH", &path).body(3);
                world.send(&request).1
            }),
        ),
        (
            "layers[<i>] <digest> (<type>) was not uploaded through the encrypting gateway",
            None,
            Box::new(|| {
                let mut world = World::new();
                push_manifest(&mut world, "v1", OCI_MANIFEST, &oci_manifest(gz_layer()))
            }),
        ),
        (
            "manifests[<i>] <digest> (platform <os/arch>) was not pushed through the encrypting gateway into this repository",
            None,
            Box::new(|| {
                let mut world = World::new();
                let child = Digest::of(b"a platform manifest").to_string();
                let index = serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 19,
                                   "platform": {"os": "linux", "architecture": "arm64"}}]
                }))
                .unwrap();
                push_manifest(&mut world, "v1", "application/vnd.oci.image.index.v1+json", &index)
            }),
        ),
        (
            "layers[<i>] <digest>: the blob was encrypted but media type \"<type>\" has no decryptor",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["mediaType"] = json!("application/vnd.cncf.helm.chart.content.v1.tar+gzip");
                push_layers(layers)
            }),
        ),
        (
            "the config blob <digest> (<type>) was encrypted on upload because it is not JSON",
            None,
            Box::new(|| {
                let mut world = World::new();
                ledger_layer(&mut world, "demo/app", &demo_recipients());
                let body = serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": gz_digest().to_string(), "size": LAYER.len()},
                    "layers": []
                }))
                .unwrap();
                push_manifest(&mut world, "v1", OCI_MANIFEST, &body)
            }),
        ),
        (
            "layers[<i>] <digest> is already encrypted (<type>) but the gateway encrypted its blob again",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip+encrypted");
                push_layers(layers)
            }),
        ),
        (
            "layers[<i>] <digest> has encrypted media type \"<type>\", which no runtime decrypts",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["mediaType"] = json!("application/vnd.example.layer+encrypted");
                push_unknown_layers(layers)
            }),
        ),
        (
            "layers[<i>] <digest> declares size <n>, but the blob uploaded through the gateway has <m> bytes",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["size"] = json!(LAYER.len() + 1);
                push_layers(layers)
            }),
        ),
        (
            "layers[<i>] (<type>) has digest \"<d>\", which the gateway cannot have encrypted",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["digest"] = json!("sha512:abcd");
                push_layers(layers)
            }),
        ),
        (
            "Docker schema 1 manifests cannot carry encrypted layers",
            None,
            Box::new(|| {
                let mut world = World::new();
                let body = br#"{"schemaVersion":1,"name":"demo/app","tag":"v1","fsLayers":[]}"#;
                push_manifest(&mut world, "v1", "application/vnd.docker.distribution.manifest.v1+prettyjws", body)
            }),
        ),
        (
            "manifest Content-Type \"<type>\" is not an image manifest the gateway can encrypt",
            None,
            Box::new(|| {
                let mut world = World::new();
                push_manifest(&mut world, "v1", "application/octet-stream", &oci_manifest(gz_layer()))
            }),
        ),
        (
            "manifest is not valid JSON",
            None,
            Box::new(|| {
                let mut world = World::new();
                push_manifest(&mut world, "v1", OCI_MANIFEST, b"{not json")
            }),
        ),
        (
            "manifest schemaVersion is <v>, expected 2",
            None,
            Box::new(|| {
                let mut world = World::new();
                let body = br#"{"schemaVersion":3,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
                push_manifest(&mut world, "v1", OCI_MANIFEST, body)
            }),
        ),
        (
            "manifest mediaType \"<t>\" does not match the request Content-Type",
            None,
            Box::new(|| {
                let mut world = World::new();
                let body = oci_manifest(gz_layer());
                push_manifest(&mut world, "v1", "application/vnd.docker.distribution.manifest.v2+json", &body)
            }),
        ),
        (
            "manifest field <field> <problem>",
            None,
            Box::new(|| {
                let mut layers = gz_layer();
                layers[0]["size"] = json!("three");
                push_layers(layers)
            }),
        ),
        (
            "differs from \"<name>\" only in letter case",
            Some("manifest field <field> differs from \"<name>\" only in letter case"),
            Box::new(|| {
                let mut world = World::new();
                ledger_layer(&mut world, "demo/app", &demo_recipients());
                let body = String::from_utf8(oci_manifest(gz_layer()))
                    .unwrap()
                    .replacen("\"layers\"", "\"Layers\"", 1);
                push_manifest(&mut world, "v1", OCI_MANIFEST, body.as_bytes())
            }),
        ),
        (
            "manifest PUT without a body",
            None,
            Box::new(|| {
                let mut world = World::new();
                world.send(&req("PUT", "/v2/demo/app/manifests/v1")).1
            }),
        ),
        (
            "manifest of <n> bytes exceeds the gateway's limit of <limit> bytes (limits.max_manifest_bytes)",
            None,
            Box::new(|| {
                let mut world = World::new();
                let body = vec![b' '; 5000];
                push_manifest(&mut world, "v1", OCI_MANIFEST, &body)
            }),
        ),
        (
            "the registry opened a session without a Location",
            None,
            Box::new(|| single_post(CalloutAnswer::new(202, &[], b""))),
        ),
        (
            "the registry answered the upload without a Location",
            None,
            Box::new(|| {
                let mut world = World::new();
                let mut stream = monolithic(&mut world);
                let head = ResponseHead::new(&[(":status", "202")]);
                stream.on_response_headers(&head, &mut world.env())
            }),
        ),
        (
            "… store the rewritten manifest; nothing was stored",
            Some("the registry answered <status> when the gateway tried to store the rewritten manifest; nothing was stored"),
            Box::new(|| stored_by_digest_answered(500)),
        ),
        (
            "… commit the encrypted blob; nothing was stored",
            Some("the registry answered <status> when the gateway tried to commit the encrypted blob; nothing was stored"),
            Box::new(|| {
                let mut world = World::new();
                let mut stream = monolithic(&mut world);
                let put = finishing(&mut world, &mut stream);
                let answer = CalloutAnswer::new(500, &[], b"");
                stream.on_callout(put.id, &answer, &mut world.env())
            }),
        ),
        (
            "the gateway has no key service and no inline recipients for it",
            Some("no verified recipient keys for project \"demo\": the gateway has no key service and no inline recipients for it; nothing was stored"),
            Box::new(|| refused_by_key_records("demo", false, None, false)),
        ),
        (
            "it is not a project name",
            Some("no verified recipient keys for project \"Demo\": it is not a project name (…); nothing was stored"),
            Box::new(|| refused_by_key_records("Demo", true, None, false)),
        ),
        (
            "the recipients were last verified <n>s ago (limit <m>s)",
            Some("no verified recipient keys for project \"demo\": the recipients were last verified <n>s ago (limit <m>s); nothing was stored"),
            Box::new(|| refused_by_key_records("demo", true, demo_record("{}", 181, 3600), true)),
        ),
        (
            "the key service metadata has expired",
            Some("no verified recipient keys for project \"demo\": the key service metadata has expired; nothing was stored"),
            Box::new(|| refused_by_key_records("demo", true, demo_record("{}", 1, 0), true)),
        ),
        (
            "the verified recipients document of project \"<p>\" is invalid:",
            Some("no verified recipient keys for project \"demo\": the verified recipients document of project \"demo\" is invalid: …; nothing was stored"),
            Box::new(|| refused_by_key_records("demo", true, demo_record("not json", 1, 3600), true)),
        ),
        (
            "the key service lookup gave no answer",
            Some("no verified recipient keys for project \"demo\": the key service lookup gave no answer; nothing was stored"),
            Box::new(|| refused_by_key_records("demo", true, None, true)),
        ),
        (
            "no verified recipient keys for project \"<p>\": <reason>; nothing was stored",
            Some("no verified recipient keys for project \"<p>\": <reason>; nothing was stored"),
            Box::new(|| refused_by_keys("no verified recipient keys for project \"demo\": the key service has no recipients for this project; nothing was stored")),
        ),
    ]
}

/// Quotes of the table not provoked here, and why.
const NOT_HERE: &[(&str, &str)] = &[
    // Not messages: parts of a row's prose.
    ("WWW-Authenticate", "a header name in the 401 row's prose"),
    ("error=\"invalid_token\"", "the registry's own challenge, passed through as it is"),
    // The host's failures: a host cannot nest callbacks.
    ("the worker's gateway state is in use", "a stream event while another holds the worker's state: no host runs one callback inside another"),
    ("authentication required", "the registry's own body, relayed as it is (Command::Relay: gateway_finish::the_finishing_put_refused)"),
    // Unreachable with valid inputs: the guide lists them for completeness.
    ("could not wrap the layer key", "wrapping to recipients the configuration already parsed does not fail"),
    ("the rewritten manifest could not be serialized", "serializing a JSON value the rewrite built does not fail"),
    // Key refusals that need a key service's answers (the TUF fixtures) or cannot happen
    // (a lookup without a key service): provoked in key_records.rs and keyservice_lookup.rs.
    ("key lookup without a key service", "key records (key_records.rs)"),
    ("the key service has no recipients for this project", "key records (key_records.rs)"),
    ("key service unreachable or failing (HTTP <status> for <path>)", "key lookups (key_records.rs, keyservice_lookup.rs)"),
    ("key service answer too large (<n> bytes for <path>, at most <m> accepted)", "key lookups (key_records.rs, keyservice_lookup.rs)"),
    ("the gateway already keeps the keys of key_service.max_projects (<n>) projects in use; raise the limit", "key records (key_records.rs)"),
    ("key service metadata did not verify:", "key lookups (key_records.rs, keyservice_lookup.rs)"),
];

#[test]
fn every_refusal_the_guide_quotes_is_provoked_with_its_status_code_and_message() {
    let quotes = guide_quotes();
    assert!(
        quotes.len() > 60,
        "the guide's table was not read: {quotes:?}"
    );
    let cases = cases();
    let mut failures = Vec::new();
    for quote in &quotes {
        let here = cases.iter().find(|(q, _, _)| *q == quote.text);
        let excused = NOT_HERE.iter().any(|(q, _)| *q == quote.text);
        let Some((_, reads, scenario)) = here else {
            if !excused {
                failures.push(format!("no case for the guide's {quote:?}"));
            }
            continue;
        };
        if excused {
            failures.push(format!("{:?} is both provoked and excused", quote.text));
        }
        let out = scenario();
        let Some(err) = refusal(&out) else {
            failures.push(format!("{:?}: not refused: {out:?}", quote.text));
            continue;
        };
        let pattern = reads.unwrap_or(&quote.text);
        if err.status() != quote.status
            || err.code.as_str() != quote.code
            || !reads_as(&err.message, pattern)
        {
            failures.push(format!(
                "the guide says {} {} {:?}; the gateway answers {} {} {:?}",
                quote.status,
                quote.code,
                pattern,
                err.status(),
                err.code.as_str(),
                err.message
            ));
        }
    }
    for (text, _, _) in &cases {
        if !quotes.iter().any(|q| q.text == *text) {
            failures.push(format!("case {text:?} quotes nothing the guide says"));
        }
    }
    for (text, _) in NOT_HERE {
        if !quotes.iter().any(|q| q.text == *text) {
            failures.push(format!("excuse {text:?} is for nothing the guide says"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A refusal is the whole of the stream's answer: nothing goes on after it.
#[test]
fn a_refusal_ends_with_the_reply_and_a_pause() {
    for (text, _, scenario) in cases() {
        let out = scenario();
        if refusal(&out).is_some() {
            assert_eq!(out.last(), Some(&Command::Pause), "{text}: {out:?}");
            assert!(!out.contains(&Command::Continue), "{text}: {out:?}");
        }
    }
}
