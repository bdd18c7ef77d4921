//! A manifest push through the gateway's stream machine, after its request line: the body held
//! and refused past the limit, checked against the digest it was pushed by, rewritten with the
//! ledger (read from the registry for what this process lacks, with replicas), and the
//! registry's answer turned into the client's. Exact commands, natively.
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
use ocicrypt_core::distribution::ledger_cache::Change;
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{
    Callout, CalloutAnswer, Command, Flow, Level, Metric, ResponseHead, Stream,
};
use ocicrypt_core::store::Store as _;
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn config_blob() -> Vec<u8> {
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec()
}

/// An image manifest with one gzip layer (the test layer) and a JSON config.
fn image_manifest() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(&config_blob()).to_string(), "size": config_blob().len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": gz_digest().to_string(), "size": LAYER.len()}]
    }))
    .unwrap()
}

/// Sends a manifest PUT's headers, then its body in two pieces.
fn push(
    world: &mut World,
    reference: &str,
    content_type: &str,
    body: &[u8],
) -> (Stream, Vec<Command>) {
    let request = req("PUT", &format!("/v2/demo/app/manifests/{reference}"))
        .header("content-type", content_type.as_bytes())
        .header("authorization", b"Bearer client-token")
        .body(body.len() as u64);
    let (mut stream, out) = world.send(&request);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    let half = body.len() / 2;
    let first = body[..half].to_vec();
    let out = stream.on_request_body(half, false, &|| Ok(first.clone()), &mut world.env());
    assert_eq!(out, vec![Command::Pause], "held until its end");
    let whole = body.to_vec();
    let out = stream.on_request_body(body.len(), true, &|| Ok(whole.clone()), &mut world.env());
    (stream, out)
}

/// The rewritten body of a push that went through.
fn rewritten(out: &[Command], pushed_len: usize) -> Value {
    let n = out.len();
    assert_eq!(
        out[0],
        Command::Metric(Metric::ManifestRewritten),
        "{out:?}"
    );
    assert!(
        matches!(&out[1], Command::Log(Level::Info, l) if l.starts_with("demo/app: manifest rewritten ("))
    );
    assert_eq!(out[n - 1], Command::Continue);
    let Command::ReplaceRequestBody(len, body) = &out[n - 2] else {
        panic!("{out:?}")
    };
    assert_eq!(*len, pushed_len);
    serde_json::from_slice(body).unwrap()
}

fn registry_201(stored: &Digest) -> ResponseHead {
    ResponseHead::new(&[
        (":status", "201"),
        ("docker-content-digest", &stored.to_string()),
        ("location", &format!("/v2/demo/app/manifests/{stored}")),
    ])
}

#[test]
fn a_manifest_by_tag_is_rewritten_and_answered_in_the_clients_digest() {
    let mut world = World::new();
    let entry = ledger_layer(&mut world, "demo/app", &demo_recipients());
    let body = image_manifest();
    let (mut stream, out) = push(&mut world, "v1", OCI_MANIFEST, &body);
    let doc = rewritten(&out, body.len());
    let layer = &doc["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
    );
    assert_eq!(layer["digest"], entry.encrypted_digest.to_string());
    assert!(layer["annotations"]["org.opencontainers.image.enc.keys.jwe"].is_string());
    assert_eq!(
        doc["config"]["digest"],
        Digest::of(&config_blob()).to_string(),
        "configs stay"
    );
    let Command::ReplaceRequestBody(_, new_body) = &out[2] else {
        panic!()
    };
    let stored = Digest::of(new_body);

    let out = stream.on_response_headers(&registry_201(&stored), &mut world.env());
    let client = Digest::of(&body);
    assert_eq!(
        out,
        vec![
            Command::Metric(Metric::LedgerCache(Change {
                entries: 1,
                evicted: 0
            })),
            Command::SetResponseHeader("x-ocicrypt-stored-digest".into(), stored.to_string()),
            Command::SetResponseHeader("docker-content-digest".into(), client.to_string()),
            Command::Continue,
        ]
    );
    let ledgered = ledgered(&world, "demo/app", &client).unwrap();
    assert_eq!(ledgered.encrypted_digest, stored);
    assert!(ledgered.is_manifest());
}

/// The child pushed by digest, its request at the end of its body: the gateway's `PUT` of the
/// rewritten child under its new digest (dispatched, the request paused), and that body.
fn child_stored_by_callout(world: &mut World, child: &[u8]) -> (Stream, Callout, Vec<u8>) {
    let child_digest = Digest::of(child);
    let (stream, out) = push(world, &child_digest.to_string(), OCI_MANIFEST, child);
    let n = out.len();
    assert_eq!(
        out[0],
        Command::Metric(Metric::ManifestRewritten),
        "{out:?}"
    );
    assert_eq!(
        out[n - 1],
        Command::Pause,
        "the client's request goes nowhere"
    );
    assert!(
        !out.iter().any(|c| matches!(
            c,
            Command::ReplaceRequestBody(..) | Command::Continue | Command::SetRequestHeader(..)
        )),
        "{out:?}"
    );
    let Command::Dispatch(put) = &out[n - 2] else {
        panic!("{out:?}")
    };
    let stored_body = put.body.clone().unwrap();
    let stored = Digest::of(&stored_body);
    let h = |name: &str| {
        put.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h(":method").as_deref(), Some("PUT"));
    assert_eq!(
        h(":path"),
        Some(format!("/v2/demo/app/manifests/{stored}")),
        "stored under its new digest, no tag"
    );
    assert_eq!(h("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(h("authorization").as_deref(), Some("Bearer client-token"));
    let stored_doc: Value = serde_json::from_slice(&stored_body).unwrap();
    assert!(stored_doc["layers"][0]["mediaType"]
        .as_str()
        .unwrap()
        .ends_with("+encrypted"));
    (stream, put.clone(), stored_body)
}

/// The client's answer to a manifest pushed by digest, made by the gateway.
fn answered_201(repository: &str, client: &Digest, stored: &Digest) -> Command {
    Command::Respond {
        status: 201,
        headers: vec![
            (
                "location".into(),
                format!("/v2/{repository}/manifests/{client}"),
            ),
            ("docker-content-digest".into(), client.to_string()),
            ("x-ocicrypt-stored-digest".into(), stored.to_string()),
        ],
        body: vec![],
    }
}

/// `skopeo copy --all`, BuildKit, crane, oras: children by digest, then the index that names
/// them. The child is stored under its new digest by the gateway's own `PUT` and answered in
/// the client's digest; the index names what was stored.
#[test]
fn an_index_after_its_children_pushed_by_digest() {
    let mut world = World::new();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    let child = image_manifest();
    let child_digest = Digest::of(&child);
    let (mut stream, put, new_child) = child_stored_by_callout(&mut world, &child);
    let stored_child = Digest::of(&new_child);
    let out = stream.on_callout(
        put.id,
        &CalloutAnswer::new(
            201,
            &[("Docker-Content-Digest", &stored_child.to_string())],
            b"",
        ),
        &mut world.env(),
    );
    assert_eq!(
        out,
        vec![
            Command::Metric(Metric::LedgerCache(Change {
                entries: 1,
                evicted: 0
            })),
            Command::Log(
                Level::Info,
                format!("demo/app: manifest {child_digest} stored as {stored_child}")
            ),
            answered_201("demo/app", &child_digest, &stored_child),
            Command::Pause,
        ]
    );
    let entry = ledgered(&world, "demo/app", &child_digest).unwrap();
    assert_eq!(entry.encrypted_digest, stored_child);
    assert_eq!(entry.media_type.as_deref(), Some(OCI_MANIFEST));

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child_digest.to_string(), "size": child.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    let (_, out) = push(&mut world, "v1", OCI_INDEX, &index);
    let doc = rewritten(&out, index.len());
    assert_eq!(doc["manifests"][0]["digest"], stored_child.to_string());
    assert_eq!(doc["manifests"][0]["size"], new_child.len());
}

/// The registry's answers to the gateway's `PUT` of a manifest pushed by digest: stored, the
/// client gets its `201`; the registry's own refusal reaches the client as it is (a `401` with
/// its challenge, so the client fetches a token); a callout that fails, times out, is reset or
/// answered otherwise is refused. Nothing but a stored manifest is ledgered.
#[test]
fn registry_answers_to_a_manifest_stored_by_digest() {
    let challenge = r#"Bearer realm="http://gw/service/token",service="reg",scope="repository:demo/app:pull,push""#;
    let oci_401 = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    let unknown_blob =
        br#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#;
    enum Then {
        Stored,
        Relayed(u16, Option<&'static str>),
        Refused(Code, &'static str),
    }
    // name, the registry's answer (None: the callout could not be dispatched), the outcome
    let cases: Vec<(&str, Option<CalloutAnswer>, Then)> = vec![
        ("201", Some(CalloutAnswer::new(201, &[], b"")), Then::Stored),
        (
            "200 (some registries)",
            Some(CalloutAnswer::new(200, &[], b"")),
            Then::Stored,
        ),
        (
            "401 with the challenge",
            Some(CalloutAnswer::new(
                401,
                &[("WWW-Authenticate", challenge)],
                oci_401,
            )),
            Then::Relayed(401, Some(challenge)),
        ),
        (
            "400 MANIFEST_BLOB_UNKNOWN (a layer collected meanwhile)",
            Some(CalloutAnswer::new(400, &[], unknown_blob)),
            Then::Relayed(400, None),
        ),
        (
            "403 without an OCI body",
            Some(CalloutAnswer::new(403, &[], b"forbidden")),
            Then::Refused(Code::Denied, "store the rewritten manifest"),
        ),
        (
            "500",
            Some(CalloutAnswer::new(500, &[], b"oops")),
            Then::Refused(Code::Unavailable, "answered 500"),
        ),
        (
            "timed out (Envoy answers 504)",
            Some(CalloutAnswer::new(504, &[], b"upstream request timeout")),
            Then::Refused(Code::Unavailable, "answered 504"),
        ),
        (
            "reset (an answer without status)",
            Some(CalloutAnswer::default()),
            Then::Refused(Code::Unavailable, "store the rewritten manifest"),
        ),
        (
            "a redirect",
            Some(CalloutAnswer::new(
                307,
                &[("location", "http://elsewhere/")],
                b"",
            )),
            Then::Refused(Code::Unavailable, "answered 307"),
        ),
        (
            "refused by the host",
            None,
            Then::Refused(Code::Unavailable, "reach the registry"),
        ),
    ];
    for (name, answer, then) in cases {
        let mut world = World::new();
        ledger_layer(&mut world, "demo/app", &demo_recipients());
        let child = image_manifest();
        let client = Digest::of(&child);
        let (mut stream, put, stored_body) = child_stored_by_callout(&mut world, &child);
        let stored = Digest::of(&stored_body);
        let out = match &answer {
            Some(a) => stream.on_callout(put.id, a, &mut world.env()),
            None => stream.on_dispatch_failed(put.id, &mut world.env()),
        };
        match then {
            Then::Stored => {
                assert_eq!(
                    out[2..],
                    [answered_201("demo/app", &client, &stored), Command::Pause],
                    "{name}"
                );
                assert!(ledgered(&world, "demo/app", &client).is_some(), "{name}");
                continue;
            }
            Then::Relayed(status, challenge) => {
                let n = out.len();
                assert_eq!(
                    out[n - 2],
                    Command::Relay {
                        status,
                        body: answer.as_ref().unwrap().body.clone(),
                        challenge: challenge.map(|c| c.as_bytes().to_vec()),
                    },
                    "{name}"
                );
                assert_eq!(out[n - 1], Command::Pause, "{name}");
                assert!(matches!(stream.flow, Flow::Refused), "{name}");
            }
            Then::Refused(code, needle) => assert_refused(&out, code, needle),
        }
        assert!(
            !out.iter().any(|c| matches!(c, Command::Respond { .. })),
            "{name}: {out:?}"
        );
        assert_eq!(ledgered(&world, "demo/app", &client), None, "{name}");
        // A late answer to the same callout finds nothing waiting.
        let late = CalloutAnswer::new(201, &[], b"");
        assert!(
            stream
                .on_callout(put.id, &late, &mut world.env())
                .is_empty(),
            "{name}"
        );
    }
}

/// With replicas the mapping is recorded in the registry's ledger (an authenticated record
/// under the client's digest, naming the stored manifest in annotations only) before the
/// client is answered; another replica reads it back as the manifest's entry.
#[test]
fn with_replicas_a_manifest_stored_by_digest_is_recorded_before_the_answer() {
    let mut world = World::with(true);
    world
        .store
        .set(&ocicrypt_core::gateway::empty_config_key("demo/app"), b"1")
        .unwrap();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    let child = image_manifest();
    let client = Digest::of(&child);
    // Replicas read the registry's ledger for what the process lacks (the config): not there.
    let request = req("PUT", &format!("/v2/demo/app/manifests/{client}"))
        .header("content-type", OCI_MANIFEST.as_bytes())
        .header("authorization", b"Bearer client-token")
        .body(child.len() as u64);
    let (mut stream, _) = world.send(&request);
    let whole = child.clone();
    let out = stream.on_request_body(child.len(), true, &|| Ok(whole.clone()), &mut world.env());
    let [Command::Dispatch(read), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    let out = stream.on_callout(
        read.id,
        &CalloutAnswer::new(404, &[], b""),
        &mut world.env(),
    );
    let n = out.len();
    let Command::Dispatch(put) = &out[n - 2] else {
        panic!("{out:?}")
    };
    assert_eq!(out[n - 1], Command::Pause);
    let stored = Digest::of(put.body.as_deref().unwrap());

    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let [Command::Dispatch(record)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let path = record.headers.iter().find(|(k, _)| k == ":path").unwrap();
    assert_eq!(
        path.1,
        format!("/v2/demo/app/manifests/{}", ledger::ledger_tag(&client))
    );
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let body = record.body.as_deref().unwrap();
    let entry = ledger::read_stored(&key, "demo/app", &client, body).unwrap();
    assert_eq!(entry.encrypted_digest, stored);
    assert_eq!(entry.media_type.as_deref(), Some(OCI_MANIFEST));
    assert!(
        !ocicrypt_core::distribution::manifest::referenced_digests(body).contains(&stored),
        "the record keeps nothing from garbage collection"
    );
    assert_eq!(
        ledgered(&world, "demo/app", &client),
        None,
        "not before it is recorded"
    );

    let out = stream.on_callout(
        record.id,
        &CalloutAnswer::new(201, &[], b""),
        &mut world.env(),
    );
    let n = out.len();
    assert_eq!(
        out[n - 2..],
        [answered_201("demo/app", &client, &stored), Command::Pause]
    );
    assert_eq!(ledgered(&world, "demo/app", &client), Some(entry));

    // The record refused: the client is told the manifest is stored but not recorded.
    let mut world = World::with(true);
    world
        .store
        .set(&ocicrypt_core::gateway::empty_config_key("demo/app"), b"1")
        .unwrap();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    let (mut stream, _) = world.send(&request);
    let whole = child.clone();
    let out = stream.on_request_body(child.len(), true, &|| Ok(whole.clone()), &mut world.env());
    let Command::Dispatch(read) = &out[0] else {
        panic!()
    };
    let out = stream.on_callout(
        read.id,
        &CalloutAnswer::new(404, &[], b""),
        &mut world.env(),
    );
    let Command::Dispatch(put) = &out[out.len() - 2] else {
        panic!()
    };
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let Command::Dispatch(record) = &out[0] else {
        panic!()
    };
    let out = stream.on_callout(
        record.id,
        &CalloutAnswer::new(500, &[], b""),
        &mut world.env(),
    );
    assert_refused(
        &out,
        Code::Unavailable,
        "the manifest was stored but not recorded",
    );
    assert_eq!(ledgered(&world, "demo/app", &client), None);
}

#[test]
fn manifest_refusals_at_the_end_of_the_body() {
    let body = image_manifest();
    let not_ledgered = |_: &mut World| {};
    // The project's recipients changed (a rotation) since the layer was encrypted.
    let stale = |w: &mut World| {
        ledger_layer(w, "demo/app", &demo_recipients());
        w.keys.answer = Ok(Some(vec![]));
    };
    let ledgered = |w: &mut World| {
        ledger_layer(w, "demo/app", &demo_recipients());
    };
    type Setup = fn(&mut World);
    /// name, world, reference, body, refusal code, words of its message
    type Case<'a> = (&'a str, Setup, String, Vec<u8>, Code, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a layer that would stay plaintext",
            not_ledgered,
            "v1".into(),
            body.clone(),
            Code::ManifestInvalid,
            "",
        ),
        (
            "a layer encrypted before a rotation",
            stale,
            "v1".into(),
            body.clone(),
            Code::ManifestInvalid,
            "no longer has",
        ),
        (
            "pushed by another digest",
            ledgered,
            Digest::of(b"other").to_string(),
            body.clone(),
            Code::DigestInvalid,
            "own digest",
        ),
        (
            "not JSON",
            ledgered,
            "v1".into(),
            b"\x00\x01".to_vec(),
            Code::ManifestInvalid,
            "",
        ),
        (
            "a manifest shaped like the ledger",
            ledgered,
            "v1".into(),
            ledger::ledger_manifest(
                &gz_digest(),
                &LedgerEntry {
                    encrypted_digest: gz_digest(),
                    size: 1,
                    annotations: Default::default(),
                    media_type: None,
                    recipients: None,
                },
            ),
            Code::ManifestInvalid,
            "",
        ),
    ];
    for (name, setup, reference, body, code, needle) in cases {
        let mut world = World::new();
        setup(&mut world);
        let (stream, out) = push(&mut world, &reference, OCI_MANIFEST, &body);
        let err = refusal(&out).unwrap_or_else(|| panic!("{name}: not refused {out:?}"));
        assert_eq!(err.code, code, "{name}: {err}");
        assert!(err.message.contains(needle), "{name}: {err}");
        assert!(matches!(stream.flow, Flow::Refused), "{name}");
        assert!(
            !out.iter()
                .any(|c| matches!(c, Command::ReplaceRequestBody(..))),
            "{name}"
        );
    }
}

#[test]
fn too_many_json_values_are_refused_before_parsing() {
    let mut world = World::new();
    world.config.max_manifest_bytes = 1 << 20;
    let body = format!("[{}0]", "0,".repeat(70_000)).into_bytes();
    let (_, out) = push(&mut world, "v1", OCI_MANIFEST, &body);
    assert_refused(&out, Code::ManifestInvalid, "");
}

#[test]
fn a_body_over_the_limit_is_dropped_as_it_comes_and_refused_at_its_end() {
    let mut world = World::new();
    let request = req("PUT", "/v2/demo/app/manifests/v1").chunked();
    let (mut stream, _) = world.send(&request);
    let out = stream.on_request_body(4000, false, &|| Ok(vec![b' '; 4000]), &mut world.env());
    assert_eq!(out, vec![Command::Pause]);
    let out = stream.on_request_body(5000, false, &|| panic!("not read"), &mut world.env());
    assert_eq!(
        out,
        vec![Command::ReplaceRequestBody(5000, vec![]), Command::Continue]
    );
    let out = stream.on_request_body(100, false, &|| panic!("not read"), &mut world.env());
    assert_eq!(
        out,
        vec![Command::ReplaceRequestBody(100, vec![]), Command::Continue]
    );
    assert_refused(
        &stream.on_request_body(0, true, &|| panic!(), &mut world.env()),
        Code::SizeInvalid,
        "5000 bytes",
    );

    // Over the limit in one piece at its end: refused at once.
    let (mut stream, _) = world.send(&req("PUT", "/v2/demo/app/manifests/v1").chunked());
    assert_refused(
        &stream.on_request_body(4097, true, &|| panic!(), &mut world.env()),
        Code::SizeInvalid,
        "",
    );
}

/// Replicas: the ledger records this process lacks are read from the registry first.
#[test]
fn with_replicas_unknown_digests_are_read_from_the_registrys_ledger() {
    let mut world = World::with(true);
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let entry = {
        let mut scratch = World::new();
        ledger_layer(&mut scratch, "demo/app", &demo_recipients())
    };
    let body = image_manifest();
    let (mut stream, out) = push(&mut world, "v1", OCI_MANIFEST, &body);
    let n = out.len();
    assert_eq!((n, &out[n - 1]), (3, &Command::Pause), "{out:?}");
    let reads: Vec<_> = out[..2]
        .iter()
        .map(|c| match c {
            Command::Dispatch(c) => c.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let config_tag = format!(
        "/v2/demo/app/manifests/{}",
        ledger::ledger_tag(&Digest::of(&config_blob()))
    );
    let layer_tag = format!(
        "/v2/demo/app/manifests/{}",
        ledger::ledger_tag(&gz_digest())
    );
    let paths: Vec<_> = reads.iter().map(|c| c.headers[1].1.clone()).collect();
    assert_eq!(paths, [config_tag, layer_tag]);

    let record = ledger::ledger_manifest_authenticated(&key, "demo/app", &gz_digest(), &entry);
    let out = stream.on_callout(
        reads[1].id,
        &CalloutAnswer::new(200, &[], &record),
        &mut world.env(),
    );
    assert_eq!(
        out,
        [Command::Metric(Metric::LedgerCache(Change {
            entries: 1,
            evicted: 0
        }))],
        "cached, and waits for the other read"
    );
    let out = stream.on_callout(
        reads[0].id,
        &CalloutAnswer::new(404, &[], b""),
        &mut world.env(),
    );
    let doc = rewritten(&out, body.len());
    assert_eq!(
        doc["layers"][0]["digest"],
        entry.encrypted_digest.to_string()
    );
}

#[test]
fn with_replicas_a_forged_record_or_too_many_lookups_refuse_the_push() {
    // A record without the gateway's MAC stops the rewrite; the other answer finds nothing.
    let mut world = World::with(true);
    let entry = ledger_layer(&mut World::new(), "demo/app", &demo_recipients());
    let (mut stream, out) = push(&mut world, "v1", OCI_MANIFEST, &image_manifest());
    let [Command::Dispatch(first), Command::Dispatch(second), Command::Pause] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    let forged = ledger::ledger_manifest(&gz_digest(), &entry);
    let out = stream.on_callout(
        second.id,
        &CalloutAnswer::new(200, &[], &forged),
        &mut world.env(),
    );
    assert_refused(&out, Code::ManifestInvalid, "not written by this gateway");
    assert!(stream
        .on_callout(
            first.id,
            &CalloutAnswer::new(404, &[], b""),
            &mut world.env()
        )
        .is_empty());

    // A read that cannot be dispatched: the registry is unreachable.
    let mut world = World::with(true);
    let (mut stream, out) = push(&mut world, "v1", OCI_MANIFEST, &image_manifest());
    let Command::Dispatch(first) = &out[0] else {
        panic!()
    };
    assert_refused(
        &stream.on_dispatch_failed(first.id, &mut world.env()),
        Code::Unavailable,
        "reach the registry",
    );

    // More unknown digests than limits.max_ledger_lookups: refused before any read.
    let mut world = World::with(true);
    world.config.max_ledger_lookups = 1;
    let (_, out) = push(&mut world, "v1", OCI_MANIFEST, &image_manifest());
    assert_refused(&out, Code::ManifestInvalid, "");
    assert!(!out.iter().any(|c| matches!(c, Command::Dispatch(_))));
}

#[test]
fn registry_answers_to_a_manifest_push() {
    let body = image_manifest();
    /// the registry's answer; `None` passes it, else the refusal's code and words
    type Case<'a> = (ResponseHead, Option<(Code, &'a str)>);
    let cases: Vec<Case> = vec![
        // The registry's own refusal goes to the client as it is; nothing is ledgered.
        (ResponseHead::new(&[(":status", "400")]), None),
        (ResponseHead::new(&[(":status", "401")]), None),
        (
            ResponseHead::new(&[(":status", "307"), ("location", "http://elsewhere/")]),
            Some((Code::BadGateway, "redirect")),
        ),
        (
            ResponseHead::new(&[
                (":status", "201"),
                ("location", "http://other-host/v2/demo/app/manifests/x"),
            ]),
            Some((Code::BadGateway, "outside")),
        ),
    ];
    for (head, expected) in cases {
        let mut world = World::new();
        ledger_layer(&mut world, "demo/app", &demo_recipients());
        let (mut stream, _) = push(&mut world, "v1", OCI_MANIFEST, &body);
        let out = stream.on_response_headers(&head, &mut world.env());
        match expected {
            None => assert_eq!(out, vec![Command::Continue]),
            Some((code, needle)) => assert_refused(&out, code, needle),
        }
        assert_eq!(ledgered(&world, "demo/app", &Digest::of(&body)), None);
    }
}

#[test]
fn answers_to_requests_the_gateway_does_not_act_on_pass() {
    let mut world = World::new();
    let (mut stream, _) = world.send(&req("GET", "/v2/demo/app/manifests/v1"));
    let head = ResponseHead::new(&[(":status", "307"), ("location", "http://cdn/blob")]);
    assert_eq!(
        stream.on_response_headers(&head, &mut world.env()),
        vec![Command::Continue]
    );
}

/// A referrer (a manifest with a `subject`) pushed by digest is stored by the same callout under
/// the reserved tag of the client's digest: a registry without the referrers API lists it
/// nowhere else, and there it is its own ledger record (no record is written for it, even
/// with replicas).
#[test]
fn a_referrer_pushed_by_digest_is_stored_under_its_reserved_tag() {
    let empty = json!({"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": Digest::of(b"{}").to_string(), "size": 2});
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1+json",
        "config": empty, "layers": [{"mediaType": "application/json",
                                     "digest": Digest::of(b"{}").to_string(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": Digest::of(b"subject").to_string(),
                    "size": 7}
    }))
    .unwrap();
    let client = Digest::of(&referrer);
    for replicas in [false, true] {
        let mut world = World::with(replicas);
        let (mut stream, out) = push(&mut world, &client.to_string(), OCI_MANIFEST, &referrer);
        // With replicas the unknown digests (`{}`, the subject) are looked up first: not in
        // the registry's ledger.
        let mut out = out;
        if replicas {
            let reads: Vec<_> = out
                .iter()
                .filter_map(|c| match c {
                    Command::Dispatch(c) => Some(c.id),
                    _ => None,
                })
                .collect();
            assert_eq!(reads.len(), 2, "{out:?}");
            for id in reads {
                out = stream.on_callout(id, &CalloutAnswer::new(404, &[], b""), &mut world.env());
            }
        }
        let n = out.len();
        let Command::Dispatch(put) = &out[n - 2] else {
            panic!("{out:?}")
        };
        let path = &put.headers.iter().find(|(k, _)| k == ":path").unwrap().1;
        assert_eq!(
            path,
            &format!("/v2/demo/app/manifests/{}", ledger::ledger_tag(&client)),
            "replicas: {replicas}"
        );
        let stored = Digest::of(put.body.as_deref().unwrap());
        let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
        let n = out.len();
        assert_eq!(
            out[n - 2..],
            [answered_201("demo/app", &client, &stored), Command::Pause],
            "replicas: {replicas}: answered at once, no record: {out:?}"
        );
        assert!(!out.iter().any(|c| matches!(c, Command::Dispatch(_))));
    }
}
