//! The gateway's request-line decision, driven natively with the request sequences real
//! clients send and every refusal before the body: the exact commands the machine answers, and
//! which requests cost the key service a lookup (only those that are otherwise valid).
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
use ocicrypt_core::distribution::ledger::{self, LedgerEntry};
use ocicrypt_core::distribution::upload::{self, UploadRecord};
use ocicrypt_core::distribution::upload_table;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::format::recipients::fingerprint;
use ocicrypt_core::gateway::{
    Callout, CalloutAnswer, Command, Flow, Level, Metric, Stream, MANIFEST_BUDGET_PER_WORKER,
};

// ---------------------------------------------------------------------------------------------
// Every refusal before the body, and what it cost the key service: nothing.

#[test]
fn every_refusal_before_the_body_costs_the_key_service_nothing() {
    let bad_seal = upload_path("demo/app", 0, "&_ocicrypt=AAAA");
    let d = gz_digest();
    let cases: Vec<(&str, Req, Code, &str)> = vec![
        (
            "write with a non-UTF-8 path",
            req("POST", "").raw_path(b"/v2/demo/app/blobs/uploads/\xff"),
            Code::Denied,
            "not UTF-8",
        ),
        (
            "manifest under a reserved tag",
            req("PUT", "/v2/demo/app/manifests/ocicrypt.sha256-00"),
            Code::Denied,
            "reserved",
        ),
        (
            "delete of a reserved tag",
            req("DELETE", "/v2/plain/app/manifests/ocicrypt.x"),
            Code::Denied,
            "reserved",
        ),
        (
            "dot segment in a write path",
            req("PATCH", "/v2/demo/app/blobs/uploads/x/.."),
            Code::Denied,
            "non-canonical",
        ),
        (
            "form Content-Type on an upload",
            req("POST", "/v2/demo/app/blobs/uploads/?mount=x&from=y")
                .header("content-type", b"application/x-www-form-urlencoded"),
            Code::BlobUploadInvalid,
            "form Content-Type",
        ),
        (
            "multipart Content-Type, second value",
            req("POST", "/v2/demo/app/blobs/uploads/")
                .header("content-type", b"application/octet-stream")
                .header("content-type", b"multipart/form-data; boundary=x"),
            Code::BlobUploadInvalid,
            "form Content-Type",
        ),
        (
            "repeated mount",
            req(
                "POST",
                "/v2/demo/app/blobs/uploads/?mount=a&mount=b&from=demo/x",
            ),
            Code::BlobUploadInvalid,
            "more than once",
        ),
        (
            "encoded parameter name",
            req("POST", "/v2/demo/app/blobs/uploads/?mo%75nt=a&from=plain/x"),
            Code::BlobUploadInvalid,
            "ambiguous",
        ),
        (
            "semicolon in the query",
            req("POST", "/v2/demo/app/blobs/uploads/?mount=a;from=plain/x"),
            Code::BlobUploadInvalid,
            "ambiguous",
        ),
        (
            "bad escape in the query",
            req("POST", "/v2/demo/app/blobs/uploads/?digest=%zz"),
            Code::BlobUploadInvalid,
            "ambiguous",
        ),
        (
            "POST ?digest= with a body and a bad digest",
            req("POST", "/v2/demo/app/blobs/uploads/?digest=sha256:nothex").body(5),
            Code::DigestInvalid,
            "",
        ),
        (
            "non-UTF-8 Authorization",
            req("POST", "/v2/demo/app/blobs/uploads/").header("authorization", b"Basic \xff"),
            Code::BlobUploadInvalid,
            "authorization is not valid UTF-8",
        ),
        (
            "PUT ?digest= with a bad digest",
            req("PUT", &upload_path("demo/app", 0, "&digest=md5:1")),
            Code::DigestInvalid,
            "",
        ),
        (
            "PUT without the registry's _state",
            req(
                "PUT",
                &format!("/v2/demo/app/blobs/uploads/{UUID}?digest={d}"),
            ),
            Code::BlobUploadInvalid,
            "_state",
        ),
        (
            "PUT with _state of another repository",
            req(
                "PUT",
                &format!(
                    "{}&digest={d}",
                    upload_path("demo/other", 0, "").replace("/demo/other/", "/demo/app/")
                ),
            ),
            Code::BlobUploadInvalid,
            "_state",
        ),
        (
            "PUT whose content is not the digest",
            req("PUT", &upload_path("demo/app", 0, &format!("&digest={d}"))),
            Code::DigestInvalid,
            "named",
        ),
        (
            "PUT ahead of the gateway's state",
            req("PUT", &upload_path("demo/app", 7, &format!("&digest={d}"))).body(3),
            Code::BlobUploadInvalid,
            "",
        ),
        (
            "PUT with a non-UTF-8 Content-Range",
            req("PUT", &upload_path("demo/app", 0, &format!("&digest={d}")))
                .body(3)
                .header("content-range", b"0-\xff"),
            Code::BlobUploadInvalid,
            "content-range",
        ),
        (
            "PATCH with a sealed state but no state key",
            req("PATCH", &bad_seal)
                .body(3)
                .header("content-range", b"5-7"),
            Code::BlobUploadInvalid,
            "",
        ),
        (
            "manifest PUT without a body",
            req("PUT", "/v2/demo/app/manifests/v1"),
            Code::ManifestInvalid,
            "without a body",
        ),
        (
            "manifest PUT by a bad digest, no body",
            req("PUT", "/v2/demo/app/manifests/sha256:abc"),
            Code::DigestInvalid,
            "",
        ),
    ];
    for (name, request, code, needle) in cases {
        let mut world = World::new();
        let (_, out) = world.send(&request);
        eprintln!("{name}: {out:?}");
        assert_refused(&out, code, needle);
        assert!(
            world.keys.asked.is_empty(),
            "{name}: asked for keys {:?}",
            world.keys.asked
        );
        assert!(
            !out.iter()
                .any(|c| matches!(c, Command::Dispatch(_) | Command::SetRequestHeader(..))),
            "{name}: {out:?}"
        );
    }
}

/// A manifest refused while its body is still coming is answered once the body has been read
/// (containerd hangs on an earlier answer); the key service is not asked either.
#[test]
fn a_refused_manifest_with_a_body_is_drained_first() {
    let cases: Vec<(&str, Req, Code)> = vec![
        (
            "bad digest reference",
            req("PUT", "/v2/demo/app/manifests/sha256:abc").body(100),
            Code::DigestInvalid,
        ),
        (
            "declared over the limit",
            req("PUT", "/v2/demo/app/manifests/v1").body(4097),
            Code::SizeInvalid,
        ),
        (
            "non-UTF-8 Content-Type",
            req("PUT", "/v2/demo/app/manifests/v1")
                .body(100)
                .header("content-type", b"application/\xffjson"),
            Code::ManifestInvalid,
        ),
        (
            "non-UTF-8 Content-Length",
            req("PUT", "/v2/demo/app/manifests/v1")
                .chunked()
                .header("content-length", b"1\xff"),
            Code::ManifestInvalid,
        ),
        (
            "reserved tag",
            req("PUT", "/v2/demo/app/manifests/ocicrypt.sha256-1").body(100),
            Code::Denied,
        ),
    ];
    for (name, request, code) in cases {
        let mut world = World::new();
        let (stream, out) = world.send(&request);
        assert_eq!(out, vec![Command::Continue], "{name}");
        match &stream.flow {
            Flow::Draining(e) => assert_eq!(e.code, code, "{name}: {e}"),
            _ => panic!("{name}: not draining"),
        }
        assert!(world.keys.asked.is_empty(), "{name}");
        assert_eq!(world.held.get(), 0, "{name}: holds budget");
    }
}

#[test]
fn a_full_manifest_budget_refuses_before_any_lookup_and_reserves_after() {
    let mut world = World::new();
    world.held.set(MANIFEST_BUDGET_PER_WORKER - 100);
    let (stream, out) = world.send(&req("PUT", "/v2/demo/app/manifests/v1").body(200));
    assert_eq!(out, vec![Command::Continue]);
    assert!(matches!(&stream.flow, Flow::Draining(e) if e.code == Code::Unavailable));
    assert!(world.keys.asked.is_empty());

    world.held.set(0);
    let (stream, _) = world.send(&req("PUT", "/v2/demo/app/manifests/v1").body(200));
    assert_eq!((world.held.get(), stream.manifest_reserved), (200, 200));
    // A body of unknown length holds the largest allowed.
    let (stream, _) = world.send(&req("PUT", "/v2/demo/app/manifests/v2").chunked());
    assert_eq!((world.held.get(), stream.manifest_reserved), (4296, 4096));
}

#[test]
fn key_service_refusal_and_wait() {
    // No recipients: 503 naming the project, after every other check passed.
    let mut world = World::new();
    world.keys.answer = Err(OciError::new(
        Code::Unavailable,
        "no verified recipient keys for project \"demo\"",
    ));
    let (_, out) = world.send(&req("POST", "/v2/demo/app/blobs/uploads/"));
    assert_refused(&out, Code::Unavailable, "\"demo\"");
    assert_eq!(world.keys.asked, ["demo"]);

    // A lookup under way: the request waits with nothing changed, then is decided again.
    let mut world = World::new();
    world.keys.answer = Ok(None);
    let (mut stream, out) = world.send(&req(
        "POST",
        "/v2/demo/app/blobs/uploads/?mount=sha256:00&from=other/x",
    ));
    assert_eq!(out, vec![Command::Pause]);
    world.keys.answer = Ok(Some(demo_recipients()));
    let out = stream.on_keys_ready(&mut world.env());
    assert_eq!(
        out,
        vec![
            Command::Log(
                Level::Info,
                "demo/app: cross-repository mount turned into an upload".into()
            ),
            Command::Metric(Metric::MountRewritten),
            set(":path", "/v2/demo/app/blobs/uploads/"),
            Command::Continue,
        ]
    );
    assert_eq!(world.keys.asked, ["demo", "demo"]);

    // The lookup's answer is a refusal: refused then, the body never read.
    let mut world = World::new();
    world.keys.answer = Ok(None);
    let (mut stream, _) = world.send(&req("PUT", "/v2/demo/app/manifests/v1").body(10));
    world.keys.answer = Err(OciError::new(Code::Unavailable, "key service down"));
    assert_refused(
        &stream.on_keys_ready(&mut world.env()),
        Code::Unavailable,
        "down",
    );
    assert_eq!(
        world.held.get(),
        0,
        "a request waiting for keys holds no budget"
    );
}

// ---------------------------------------------------------------------------------------------
// What passes untouched.

#[test]
fn requests_the_gateway_does_not_act_on_pass_untouched_without_a_lookup() {
    let cases = [
        req("GET", "/v2/"),
        req("GET", "/v2/demo/app/manifests/v1"),
        req("HEAD", "/v2/demo/app/manifests/v1"),
        req("GET", "").raw_path(b"/v2/demo/app/blobs/\xff"),
        req(
            "POST",
            "/v2/plain/app/blobs/uploads/?mount=sha256:00&from=demo/app",
        ),
        req("PUT", "/v2/plain/app/manifests/v1").body(10),
        req("PATCH", "/v2/plain/app/blobs/uploads/x?mo%75nt=1"),
        req("DELETE", "/v2/plain/app/manifests/sha256:00"),
        req("GET", &upload_path("demo/app", 0, "")),
        req("HEAD", "/v2/demo/app/blobs/sha256:not-a-digest"),
    ];
    for request in cases {
        let mut world = World::new();
        let (stream, out) = world.send(&request);
        assert_eq!(out, vec![Command::Continue], "{:?}", request.headers[1]);
        assert!(world.keys.asked.is_empty());
        assert!(matches!(stream.flow, Flow::Pass));
    }
}

// ---------------------------------------------------------------------------------------------
// Client sequences.

/// skopeo/podman: POST, PATCH (the whole blob), PUT ?digest= without a body.
#[test]
fn skopeo_chunked_upload() {
    let mut world = World::new();
    let (_, out) =
        world.send(&req("POST", "/v2/demo/app/blobs/uploads/").header("content-length", b"0"));
    assert_eq!(
        out,
        vec![Command::Continue],
        "the project's keys are checked before any byte"
    );
    assert_eq!(world.keys.asked, ["demo"]);

    let patch = req("PATCH", &upload_path("demo/app", 0, ""))
        .header("content-type", b"application/octet-stream")
        .body(LAYER.len() as u64);
    let (mut stream, out) = world.send(&patch);
    assert_eq!(out, vec![Command::Continue]);
    assert_eq!(world.keys.asked, ["demo"], "a PATCH needs no key");
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("not a chunk")
    };
    assert!(flow.finish.is_none() && !flow.had_state);
    assert_eq!(stream.claimed.as_deref(), Some(UUID));

    // A second request of the session while the first is in flight is refused.
    let (_, out) = world.send(&patch);
    assert_refused(&out, Code::BlobUploadInvalid, "in progress");
    stream.on_end(&world.store, &world.held);

    // The adapter saves the record on the registry's 202; the PUT finishes from it.
    let record = encrypted_record(&mut world, LAYER);
    save_record(&world, &record);
    let offset = LAYER.len() as u64;
    let put = req(
        "PUT",
        &upload_path("demo/app", offset, &format!("&digest={}", gz_digest())),
    );
    let (stream, out) = world.send(&put);
    let Flow::Finishing {
        completion, upload, ..
    } = &stream.flow
    else {
        panic!("not finishing")
    };
    let stored = completion.stored_digest;
    assert_ne!(stored, gz_digest());
    assert_eq!(upload, &Some((UUID.to_string(), true)));
    let ledger = completion.ledger.as_ref().unwrap();
    assert_eq!(
        ledger.recipients.as_deref(),
        Some(fingerprint(&demo_recipients()).as_str())
    );
    assert_eq!(
        out,
        vec![
            set(
                ":path",
                &format!(
                    "/v2/demo/app/blobs/uploads/{UUID}?_state={}&digest={stored}",
                    registry_state("demo/app", offset)
                )
            ),
            Command::Continue,
        ]
    );
}

/// ctr and BuildKit: POST, then PUT ?digest= carrying the whole blob.
#[test]
fn ctr_monolithic_put_becomes_a_patch() {
    let mut world = World::new();
    let put = req(
        "PUT",
        &upload_path("demo/app", 0, &format!("&digest={}", gz_digest())),
    )
    .header("content-type", b"application/octet-stream")
    .body(LAYER.len() as u64);
    let (stream, out) = world.send(&put);
    assert_eq!(
        out,
        vec![
            set(":method", "PATCH"),
            set(
                ":path",
                &format!(
                    "/v2/demo/app/blobs/uploads/{UUID}?_state={}",
                    registry_state("demo/app", 0)
                )
            ),
            set("content-type", "application/octet-stream"),
            Command::Continue,
        ]
    );
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("not a chunk")
    };
    let finish = flow.finish.as_ref().unwrap();
    assert_eq!(finish.client_digest, gz_digest());
    assert_eq!(finish.recipients, demo_recipients());
    assert_eq!(stream.content_length, Some(LAYER.len() as u64));
}

/// oras and others: `POST ?digest=` with the blob as body: a session is opened by callout.
#[test]
fn post_with_digest_opens_a_session_by_callout() {
    let mut world = World::new();
    let post = req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?digest={}", gz_digest()),
    )
    .header("authorization", b"Bearer t0ken")
    .body(LAYER.len() as u64);
    let (mut stream, out) = world.send(&post);
    let [Command::Dispatch(callout), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(callout.cluster, "registry");
    assert_eq!(callout.timeout_ms, 30000);
    assert_eq!(
        callout.headers,
        [(":method", "POST"), (":path", "/v2/demo/app/blobs/uploads/"), (":authority", "gateway:5000"),
         ("accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"),
         ("content-length", "0"), ("authorization", "Bearer t0ken")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
    );

    let location = format!("/v2/demo/app/blobs/uploads/{UUID}?_state=abc");
    let answer = CalloutAnswer::new(202, &[("location", &location)], b"");
    let out = stream.on_callout(callout.id, &answer, &mut world.env());
    assert_eq!(
        out,
        vec![
            set(":method", "PATCH"),
            set(":path", &location),
            set("content-type", "application/octet-stream"),
            Command::Continue
        ]
    );
    let Flow::Chunk(flow) = &stream.flow else {
        panic!("not a chunk")
    };
    assert_eq!(flow.upload_id.as_deref(), Some(UUID));
    assert_eq!(flow.finish.as_ref().unwrap().client_digest, gz_digest());
}

/// A `POST ?digest=` with a 3-byte body in a fresh world: the stream waits for the callout
/// that opens its session.
fn opening_session() -> (World, Stream, Callout) {
    let mut world = World::new();
    let post = req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?digest={}", gz_digest()),
    )
    .body(3);
    let (stream, out) = world.send(&post);
    let [Command::Dispatch(callout), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    let callout = callout.clone();
    (world, stream, callout)
}

#[test]
fn post_with_digest_session_failures() {
    let cases: Vec<(CalloutAnswer, Code, &str)> = vec![
        (CalloutAnswer::new(401, &[], b""), Code::Denied, "401"),
        (CalloutAnswer::default(), Code::Unavailable, "503"),
        (
            CalloutAnswer::new(202, &[], b""),
            Code::Unknown,
            "without a Location",
        ),
        (
            CalloutAnswer::new(307, &[("location", "http://elsewhere/")], b""),
            Code::Unavailable,
            "307",
        ),
        (
            CalloutAnswer::new(202, &[("location", "/v2/demo/other/blobs/uploads/x")], b""),
            Code::BadGateway,
            "outside",
        ),
    ];
    for (answer, code, needle) in cases {
        let (mut world, mut stream, callout) = opening_session();
        let out = stream.on_callout(callout.id, &answer, &mut world.env());
        assert_refused(&out, code, needle);
    }
    // A session opened in another repository is deleted where the gateway reaches it.
    let (mut world, mut stream, callout) = opening_session();
    let answer = CalloutAnswer::new(202, &[("location", "/v2/demo/other/blobs/uploads/x")], b"");
    let out = stream.on_callout(callout.id, &answer, &mut world.env());
    let Command::Dispatch(delete) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(
        delete.headers[..2],
        [
            (":method".into(), "DELETE".into()),
            (":path".into(), "/v2/demo/other/blobs/uploads/x".into())
        ]
    );
    // Its failure to dispatch is silent (nobody waits for it); the refusal stands.
    assert!(stream
        .on_dispatch_failed(delete.id, &mut world.env())
        .is_empty());
    // An unreachable registry refuses the waiting request.
    let (mut world, mut stream, callout) = opening_session();
    assert_refused(
        &stream.on_dispatch_failed(callout.id, &mut world.env()),
        Code::Unavailable,
        "reach the registry",
    );
}

/// `POST ?digest=` without a body opens a plain session (the digest is dropped).
#[test]
fn post_with_digest_without_body() {
    let mut world = World::new();
    let (_, out) = world.send(&req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?digest={}", gz_digest()),
    ));
    assert_eq!(
        out,
        vec![
            set(":path", "/v2/demo/app/blobs/uploads/"),
            Command::Continue
        ]
    );
}

/// docker: mounts from another repository. Only the ciphertext the gateway wrote in the same
/// project, for the current recipients, is mounted; anything else becomes an upload.
#[test]
fn docker_mount_attempts() {
    let mut world = World::new();
    let entry = ledger_layer(&mut world, "demo/base", &demo_recipients());
    let d = gz_digest();
    let (stream, out) = world.send(&req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?mount={d}&from=demo/base"),
    ));
    assert_eq!(
        out,
        vec![
            set(
                ":path",
                &format!(
                    "/v2/demo/app/blobs/uploads/?mount={}&from=demo/base",
                    entry.encrypted_digest
                )
            ),
            Command::Log(
                Level::Info,
                format!(
                    "demo/app: mount of {d} from demo/base as its ciphertext {}",
                    entry.encrypted_digest
                )
            ),
            Command::Continue,
        ]
    );
    assert!(matches!(stream.flow, Flow::Known { mounted: true, .. }));

    let upload_instead = vec![
        Command::Log(
            Level::Info,
            "demo/app: cross-repository mount turned into an upload".into(),
        ),
        Command::Metric(Metric::MountRewritten),
        set(":path", "/v2/demo/app/blobs/uploads/"),
        Command::Continue,
    ];
    for from in ["plain/base", "demo/unknown", "other/base"] {
        let (stream, out) = world.send(&req(
            "POST",
            &format!("/v2/demo/app/blobs/uploads/?mount={d}&from={from}"),
        ));
        assert_eq!(out, upload_instead, "{from}");
        assert!(matches!(stream.flow, Flow::Pass));
    }
    // After a rotation the old ciphertext is not mounted.
    world.keys.answer = Ok(Some(vec![]));
    let (_, out) = world.send(&req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?mount={d}&from=demo/base"),
    ));
    assert_eq!(out, upload_instead);
}

/// Re-pushes: `HEAD` of a blob the gateway encrypted asks the registry about the ciphertext.
#[test]
fn head_dedupe() {
    let mut world = World::new();
    let entry = ledger_layer(&mut world, "demo/app", &demo_recipients());
    let (stream, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", gz_digest())));
    assert_eq!(
        out,
        vec![
            set(
                ":path",
                &format!("/v2/demo/app/blobs/{}", entry.encrypted_digest)
            ),
            Command::Continue
        ]
    );
    assert!(matches!(stream.flow, Flow::Known { mounted: false, .. }));
    // Another repository, or other recipients: the client uploads it (again).
    let (_, out) = world.send(&req(
        "HEAD",
        &format!("/v2/demo/other/blobs/{}", gz_digest()),
    ));
    assert_eq!(out, vec![Command::Continue]);
    assert_eq!(
        world.keys.asked,
        ["demo"],
        "an unknown digest costs no lookup"
    );
    world.keys.answer = Ok(Some(vec![]));
    let (_, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", gz_digest())));
    assert_eq!(out, vec![Command::Continue]);
}

/// With replicas, a digest this process does not know is looked up in the registry's ledger once.
#[test]
fn head_reads_the_registrys_ledger_with_replicas() {
    let world = World::with(true);
    let d = gz_digest();
    let tag_path = format!("/v2/demo/app/manifests/{}", ledger::ledger_tag(&d));
    let record = {
        let mut w = World::new();
        let r = encrypted_record(&mut w, LAYER);
        upload::complete(r, d, &demo_recipients(), &mut w.rng)
            .unwrap()
            .ledger
            .unwrap()
    };
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let authentic = ledger::ledger_manifest_authenticated(&key, "demo/app", &d, &record);
    let forged = ledger::ledger_manifest(&d, &record);
    let cases: Vec<(CalloutAnswer, bool)> = vec![
        (CalloutAnswer::new(404, &[], b"{\"errors\":[]}"), false),
        (CalloutAnswer::default(), false),
        (CalloutAnswer::new(200, &[], &forged), false),
        (CalloutAnswer::new(200, &[], &authentic), true),
    ];
    for (answer, known) in cases {
        let mut world = World::with(true);
        let (mut stream, out) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{d}")));
        let [Command::Dispatch(callout), Command::Pause] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            callout.headers[..2],
            [
                (":method".into(), "GET".into()),
                (":path".into(), tag_path.clone())
            ]
        );
        assert!(world.keys.asked.is_empty());
        let out = stream.on_callout(callout.id, &answer, &mut world.env());
        if known {
            assert_eq!(
                out,
                vec![
                    Command::Metric(Metric::LedgerCache(
                        ocicrypt_core::distribution::ledger_cache::Change {
                            entries: 1,
                            evicted: 0
                        }
                    )),
                    set(
                        ":path",
                        &format!("/v2/demo/app/blobs/{}", record.encrypted_digest)
                    ),
                    Command::Continue
                ]
            );
            assert_eq!(world.keys.asked, ["demo"]);
        } else {
            assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
            assert!(
                !out.iter().any(|c| matches!(c, Command::Dispatch(_))),
                "the ledger is read once"
            );
            assert!(matches!(stream.flow, Flow::Pass));
        }
    }
}

/// Manifests by tag, by digest (index children, referrers), indexes.
#[test]
fn manifest_puts() {
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let cases = [
        (
            "v1",
            "application/vnd.docker.distribution.manifest.v2+json",
            None,
            oci,
        ),
        ("v1", oci, None, oci),
        (
            "latest",
            "application/vnd.oci.image.index.v1+json",
            None,
            "application/vnd.oci.image.index.v1+json",
        ),
        (
            "v2",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            None,
            "application/vnd.oci.image.index.v1+json",
        ),
        // By digest: the request line stays (the gateway stores the rewritten manifest by
        // callout; the client's request never goes on).
        (
            "sha256:0000000000000000000000000000000000000000000000000000000000000001",
            oci,
            Some(()),
            oci,
        ),
    ];
    for (reference, content_type, path, stored_type) in cases {
        let mut world = World::new();
        let request = req("PUT", &format!("/v2/demo/app/manifests/{reference}"))
            .header("content-type", content_type.as_bytes())
            .body(300);
        let (stream, out) = world.send(&request);
        let expected = vec![
            set("content-type", stored_type),
            Command::RemoveRequestHeader("content-length".into()),
            Command::Continue,
        ];
        assert_eq!(out, expected, "{reference} {content_type}");
        let Flow::Manifest {
            content_type: ct,
            by_digest,
            recipients,
            ..
        } = &stream.flow
        else {
            panic!()
        };
        assert_eq!(ct, content_type);
        assert_eq!(by_digest.is_some(), path.is_some());
        assert_eq!(recipients, &fingerprint(&demo_recipients()));
        assert_eq!(stream.manifest_reserved, 300);
    }
}

/// `DELETE` of a manifest by digest: the gateway's ledger records cannot be deleted.
#[test]
fn manifest_delete_by_digest() {
    let d = gz_digest();
    let record = LedgerEntry {
        encrypted_digest: d,
        size: 1,
        annotations: Default::default(),
        media_type: None,
        recipients: None,
    };
    let cases: Vec<(CalloutAnswer, Option<Code>)> = vec![
        (
            CalloutAnswer::new(200, &[], &ledger::ledger_manifest(&d, &record)),
            Some(Code::Denied),
        ),
        (CalloutAnswer::new(200, &[], b"{\"schemaVersion\":2}"), None),
        (CalloutAnswer::new(404, &[], b""), None),
        (CalloutAnswer::new(401, &[], b""), None),
    ];
    for (answer, refused) in cases {
        let mut world = World::new();
        let (mut stream, out) = world.send(&req("DELETE", &format!("/v2/demo/app/manifests/{d}")));
        let [Command::Dispatch(callout), Command::Pause] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            callout.headers[..2],
            [
                (":method".into(), "GET".into()),
                (":path".into(), format!("/v2/demo/app/manifests/{d}"))
            ]
        );
        let out = stream.on_callout(callout.id, &answer, &mut world.env());
        match refused {
            Some(code) => assert_refused(&out, code, "ledger"),
            None => assert_eq!(out, vec![Command::Continue]),
        }
        assert!(world.keys.asked.is_empty());
    }
}

#[test]
fn upload_delete_drops_the_gateways_state() {
    let mut world = World::new();
    save_record(&world, &UploadRecord::new("demo/app"));
    let (_, out) = world.send(&req("DELETE", &upload_path("demo/app", 0, "")));
    assert_eq!(
        out,
        vec![Command::Metric(Metric::UploadState(-1)), Command::Continue]
    );
    let idle = world.config.upload_idle_seconds;
    assert!(!upload_table::has_in(&world.store, UUID, NOW, idle));
    let (_, out) = world.send(&req("DELETE", &upload_path("demo/app", 0, "")));
    assert_eq!(out, vec![Command::Continue]);
}

/// Replicas: the state travels sealed in the URL; the parameter goes no further than the
/// gateway, and a state that does not open is refused.
/// A replicas world, `LAYER` encrypted, and the sealed state of it as `sealed_by` (this
/// process when `None`) would put it in the next request's path: (world, token, path, offset).
fn sealed_layer(sealed_by: Option<upload::Replica>) -> (World, String, String, u64) {
    let mut world = World::with(true);
    let record = encrypted_record(&mut world, LAYER);
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let replica = sealed_by
        .unwrap_or_else(|| upload::Replica::of_this_process(&world.store, &mut world.rng).unwrap());
    let sealed = upload::seal(&key, UUID, &record, replica, &mut world.rng);
    let offset = LAYER.len() as u64;
    let path = upload_path(
        "demo/app",
        offset,
        &format!("&_ocicrypt_session={UUID}&_ocicrypt={sealed}"),
    );
    (world, sealed, path, offset)
}

#[test]
fn sealed_state_is_opened_and_stripped() {
    let (mut world, sealed, path, offset) = sealed_layer(None);
    let (stream, out) = world.send(&req("PATCH", &path).body(10));
    assert_eq!(
        out,
        vec![
            set(":path", &upload_path("demo/app", offset, "")),
            Command::Continue
        ]
    );
    assert!(
        matches!(&stream.flow, Flow::Chunk(f) if f.stream.as_ref().unwrap().offset() == offset)
    );

    let tampered = path.replace("&_ocicrypt=", "&_ocicrypt=A");
    let (_, out) = world.send(&req("PATCH", &tampered).body(10));
    assert_refused(&out, Code::BlobUploadInvalid, "does not open");
    // An older sealed state with a newer registry offset would reuse keystream.
    let newer = upload_path(
        "demo/app",
        offset + 5,
        &format!("&_ocicrypt_session={UUID}&_ocicrypt={sealed}"),
    );
    let (_, out) = world.send(&req("PATCH", &newer).body(10));
    assert_refused(&out, Code::BlobUploadInvalid, "");
}

/// Replicas: a state another replica sealed is taken (the session moved here: a replica went
/// away, or the balancer does not keep sessions together), and the move is counted.
#[test]
fn a_session_moved_from_another_replica_is_counted() {
    let (mut world, _, moved, offset) = sealed_layer(Some(upload::Replica(42)));
    let (_, out) = world.send(&req("PATCH", &moved).body(10));
    assert_eq!(
        out,
        vec![
            Command::Metric(Metric::SessionMoved),
            set(":path", &upload_path("demo/app", offset, "")),
            Command::Continue
        ]
    );
}

/// Replicas: a request on a session must name it exactly as the gateway's `Location` did, or a
/// load balancer hashing on the parameter could send two requests of one session, spelled two
/// ways, to two replicas that would both encrypt from the same offset.
#[test]
fn a_session_is_named_as_the_gateway_named_it() {
    let (mut world, sealed, _, offset) = sealed_layer(None);
    let other = "1b7e5a8c-1c2d-4e3f-9a8b-7c6d5e4f3a2b";
    let spelled_otherwise = UUID.replacen('0', "%30", 1);
    for (what, extra) in [
        ("absent", String::new()),
        ("another session's", format!("&_ocicrypt_session={other}")),
        ("escaped", format!("&_ocicrypt_session={spelled_otherwise}")),
        ("empty", "&_ocicrypt_session=".to_string()),
        ("bare", "&_ocicrypt_session".to_string()),
    ] {
        for method in ["PATCH", "PUT"] {
            let path = upload_path(
                "demo/app",
                offset,
                &format!("{extra}&_ocicrypt={sealed}&digest={}", gz_digest()),
            );
            let (_, out) = world.send(&req(method, &path).body(10));
            assert_refused(&out, Code::BlobUploadInvalid, "_ocicrypt_session=");
            assert!(
                !out.iter().any(|c| matches!(c, Command::Continue)),
                "{what} session parameter on a {method}: {out:?}"
            );
        }
    }
    // Twice, even the right value twice: each reader could take another one.
    let twice = upload_path(
        "demo/app",
        offset,
        &format!("&_ocicrypt_session={UUID}&_ocicrypt_session={UUID}&_ocicrypt={sealed}"),
    );
    let (_, out) = world.send(&req("PATCH", &twice).body(10));
    assert_refused(&out, Code::BlobUploadInvalid, "_ocicrypt_session");

    // A first chunk (no sealed state yet) must name the session too.
    let first = upload_path("demo/app", 0, "");
    let (_, out) = world.send(&req("PATCH", &first).body(10));
    assert_refused(&out, Code::BlobUploadInvalid, "_ocicrypt_session=");
    let named = upload_path("demo/app", 0, &format!("&_ocicrypt_session={UUID}"));
    let (_, out) = world.send(&req("PATCH", &named).body(10));
    assert_eq!(
        out,
        vec![
            set(":path", &upload_path("demo/app", 0, "")),
            Command::Continue
        ]
    );

    // One gateway (no state key): nothing to route, the parameter is not required.
    let mut single = World::new();
    let (_, out) = single.send(&req("PATCH", &first).body(10));
    assert_eq!(out, vec![Command::Continue]);
}

#[test]
fn trailers_on_an_encrypted_write_are_refused() {
    let mut world = World::new();
    let (mut stream, _) = world.send(&req("PATCH", &upload_path("demo/app", 0, "")).chunked());
    let out = stream.on_request_trailers();
    assert_eq!(out[0], Command::DropRequestBody);
    assert_refused(&out, Code::BlobUploadInvalid, "trailers");

    let (mut stream, _) = world.send(&req("PUT", "/v2/plain/app/manifests/v1").chunked());
    assert_eq!(stream.on_request_trailers(), vec![Command::Continue]);

    // A drained refusal is answered at the trailers (no end-of-stream body event follows).
    let (mut stream, _) = world.send(&req("PUT", "/v2/demo/app/manifests/v1").body(5000));
    assert_refused(&stream.on_request_trailers(), Code::SizeInvalid, "exceeds");
}

/// Every client retries after a `401` with credentials: the first attempt leaves nothing
/// behind that refuses the second (no claim held once the stream ends, no budget).
#[test]
fn a_retry_after_401_is_decided_the_same() {
    let mut world = World::new();
    let put = req(
        "PUT",
        &upload_path("demo/app", 0, &format!("&digest={}", gz_digest())),
    )
    .body(LAYER.len() as u64);
    let (first, out1) = world.send(&put);
    // The stream ends (the registry answered 401): its claim is released.
    let mut first = first;
    first.on_end(&world.store, &world.held);
    let (_, out2) = world.send(&put.header("authorization", b"Basic dXNlcjpwYXNz"));
    assert_eq!(out1, out2);
}
