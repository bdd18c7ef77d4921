//! The end of an upload, driven natively: the registry's answer to the request that completes a
//! blob, the finishing `PUT` the gateway sends itself after a monolithic body, the commit, and
//! mounts and `HEAD`s of blobs the ledger knows. Recording in the registry's ledger (replicas)
//! is in `gateway_recording.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod finish;
    pub mod gateway;
}

use common::finish::*;
use common::gateway::*;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger_cache::Change;
use ocicrypt_core::distribution::upload_table;
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{
    CalloutAnswer, Command, Flow, Level, Metric, RecordingStage, ResponseHead,
};

#[test]
fn a_monolithic_body_is_finished_by_callout_and_answered_201() {
    let mut world = World::new();
    let mut stream = monolithic(&mut world);
    let digest = stored(&stream);
    let put = finishing(&mut world, &mut stream);
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let entry = ledgered(&world, "demo/app", &gz_digest()).expect("ledgered");
    assert_eq!(entry.encrypted_digest, digest);
    assert_eq!(entry.size, len());
    assert_eq!(
        ledgered(&world, "demo/app", &digest),
        Some(entry.clone()),
        "also under the ciphertext's digest"
    );
    let mut expected = made_201();
    expected.extend(committed(&entry));
    expected.push(Command::ResumeResponse);
    assert_eq!(out, expected);
    assert!(matches!(stream.flow, Flow::Pass));
    // A late answer to the same callout finds nothing waiting.
    let again = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    assert_eq!(again, vec![]);
}

/// The registry's other answers to the monolithic `PATCH` are the client's, and nothing is
/// finished; a `202` the gateway cannot follow is refused.
#[test]
fn the_registrys_answer_to_a_monolithic_body() {
    // A refusal of the PATCH itself (e.g. the token expired) goes to the client as it is.
    for status in ["400", "401", "404", "500"] {
        let mut world = World::new();
        let mut stream = monolithic(&mut world);
        let head = ResponseHead::new(&[(":status", status)]);
        let out = stream.on_response_headers(&head, &mut world.env());
        assert_eq!(out, vec![Command::Continue], "{status}");
        assert!(matches!(stream.flow, Flow::Pass));
    }
    // A 202 without a Location: nowhere to finish.
    let mut world = World::new();
    let mut stream = monolithic(&mut world);
    let head = ResponseHead::new(&[(":status", "202")]);
    let out = stream.on_response_headers(&head, &mut world.env());
    assert_refused(&out, Code::Unknown, "without a Location");
    assert_eq!(refusal(&out).unwrap().status(), 500);
    assert_eq!(out.len(), 4, "nothing but the refusal: {out:?}");
    assert!(matches!(stream.flow, Flow::Refused));
}

/// The registry took the declared length before the body ended here (HTTP/2 trailers sent
/// late): what it holds is an unfinished encryption. The session is deleted at the answer's
/// `Location` (its `_state` names the registry's offset) and the client refused `400`.
#[test]
fn a_202_before_the_body_ended_abandons_the_session() {
    let mut world = World::new();
    let put = req(
        "PUT",
        &upload_path("demo/app", 0, &format!("&digest={}", gz_digest())),
    )
    .body(len());
    let (mut stream, _) = world.send(&put);
    let out = stream.on_response_headers(&took_the_body(), &mut world.env());
    let Command::Dispatch(delete) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(
        delete.headers[..2],
        [
            (":method".to_string(), "DELETE".to_string()),
            (":path".to_string(), location()),
        ]
    );
    assert_refused(
        &out[1..],
        Code::BlobUploadInvalid,
        "did not end where the registry's did",
    );
    assert_eq!(out.len(), 5);
    // Its answer is nobody's.
    let answer = CalloutAnswer::new(204, &[], b"");
    assert_eq!(
        stream.on_callout(delete.id, &answer, &mut world.env()),
        vec![]
    );
}

const OCI_BODY: &[u8] = br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}"#;
const CHALLENGE: &str = r#"Bearer realm="https://auth.example/token",service="registry",scope="repository:demo/app:pull,push""#;

/// The finishing `PUT` refused by the registry: its own OCI refusal is the client's answer as
/// it gave it (a `401` keeps its challenge: the client needs it for a fresh token); anything
/// else is refused by the gateway. Nothing is committed: the ledger holds nothing, and the
/// session's state stays for a retry.
#[test]
fn the_finishing_put_refused() {
    struct Case {
        answer: CalloutAnswer,
        /// The registry's refusal passed on, with its challenge.
        relayed: Option<(u16, Option<&'static str>)>,
        /// Else the gateway's refusal: code, status, a word of its message.
        refused: Option<(Code, u16, &'static str)>,
    }
    let relay = |status, challenge| Some((status, challenge));
    let cases = [
        Case {
            answer: CalloutAnswer::new(400, &[("content-type", "application/json")], OCI_BODY),
            relayed: relay(400, None),
            refused: None,
        },
        Case {
            answer: CalloutAnswer::new(401, &[("WWW-Authenticate", CHALLENGE)], OCI_BODY),
            relayed: relay(401, Some(CHALLENGE)),
            refused: None,
        },
        Case {
            // A challenge only travels with a 401.
            answer: CalloutAnswer::new(403, &[("www-authenticate", CHALLENGE)], OCI_BODY),
            relayed: relay(403, None),
            refused: None,
        },
        Case {
            // Not an OCI body: the gateway says what happened.
            answer: CalloutAnswer::new(401, &[("www-authenticate", CHALLENGE)], b"denied"),
            relayed: None,
            refused: Some((Code::Denied, 403, "commit the encrypted blob")),
        },
        Case {
            answer: CalloutAnswer::new(404, &[], br#"{"error":"not OCI"}"#),
            relayed: None,
            refused: Some((Code::Unavailable, 503, "answered 404")),
        },
        Case {
            // A 5xx's body is not passed on, OCI or not.
            answer: CalloutAnswer::new(500, &[], OCI_BODY),
            relayed: None,
            refused: Some((Code::Unavailable, 503, "answered 500")),
        },
        Case {
            // The callout failed (reset, timed out): no status.
            answer: CalloutAnswer::default(),
            relayed: None,
            refused: Some((Code::Unavailable, 503, "answered 503")),
        },
        Case {
            // A 200 is not a commit either.
            answer: CalloutAnswer::new(200, &[], b""),
            relayed: None,
            refused: Some((Code::Unavailable, 503, "answered 200")),
        },
    ];
    for case in cases {
        let mut world = World::new();
        let mut stream = monolithic(&mut world);
        let put = finishing(&mut world, &mut stream);
        let out = stream.on_callout(put.id, &case.answer, &mut world.env());
        let status = case.answer.status();
        if let Some((code, challenge)) = case.relayed {
            assert_eq!(
                out,
                vec![
                    Command::Log(
                        Level::Warn,
                        format!(
                            "refused PUT /v2/demo/app/blobs/uploads/{UUID}?digest={}: the registry answered {code}",
                            gz_digest()
                        )
                    ),
                    Command::Relay {
                        status: code,
                        body: OCI_BODY.to_vec(),
                        challenge: challenge.map(|c| c.as_bytes().to_vec()),
                    },
                    Command::Pause,
                ],
                "{status}"
            );
        }
        if let Some((code, http, needle)) = case.refused {
            assert_refused(&out, code, needle);
            assert_eq!(refusal(&out).unwrap().status(), http, "{status}");
            assert_eq!(refusal(&out).unwrap().challenge, None, "{status}");
            assert_eq!(out.len(), 4, "{status}: {out:?}");
        }
        assert!(matches!(stream.flow, Flow::Refused), "{status}");
        assert_eq!(ledgered(&world, "demo/app", &gz_digest()), None, "{status}");
    }
}

/// A finishing `PUT` the host could not dispatch: the registry is unreachable.
#[test]
fn a_finishing_put_not_dispatched_is_refused() {
    let mut world = World::new();
    let mut stream = monolithic(&mut world);
    let put = finishing(&mut world, &mut stream);
    let out = stream.on_dispatch_failed(put.id, &mut world.env());
    assert_refused(&out, Code::Unavailable, "could not reach the registry");
    assert!(matches!(stream.flow, Flow::Refused));
}

/// skopeo and podman: a `PUT ?digest=` without a body after the PATCHes. The registry's `201`
/// commits the blob: the session's saved state goes (the gauge with it) and the answer names
/// the client's digest; any other answer passes as it is and keeps the state for a retry.
#[test]
fn a_bodiless_put_is_committed_on_the_registrys_201() {
    for status in ["201", "401", "400", "500"] {
        let mut world = World::new();
        let record = encrypted_record(&mut world, LAYER);
        save_record(&world, &record);
        let put = req(
            "PUT",
            &upload_path("demo/app", len(), &format!("&digest={}", gz_digest())),
        );
        let (mut stream, _) = world.send(&put);
        assert!(matches!(stream.flow, Flow::Finishing { callout: None, .. }));
        let stored = stored(&stream);
        let location = format!("/v2/demo/app/blobs/{stored}");
        let head = ResponseHead::new(&[
            (":status", status),
            ("location", &location),
            ("docker-content-digest", &stored.to_string()),
        ]);
        let out = stream.on_response_headers(&head, &mut world.env());
        let idle = world.config.upload_idle_seconds;
        let kept = upload_table::has_in(&world.store, UUID, NOW, idle);
        if status != "201" {
            assert_eq!(out, vec![Command::Continue], "{status}");
            assert!(kept, "{status}: a retry finds the state");
            assert_eq!(ledgered(&world, "demo/app", &gz_digest()), None);
            continue;
        }
        let entry = ledgered(&world, "demo/app", &gz_digest()).unwrap();
        assert_eq!(entry.encrypted_digest, stored);
        let mut expected = vec![Command::Metric(Metric::UploadState(-1))];
        expected.extend(committed(&entry));
        expected.push(Command::Continue);
        assert_eq!(out, expected);
        assert!(!kept, "the state goes with the commit");
    }
}

/// A JSON blob (a config) is committed as pushed: no ledger entry, counted as passed.
#[test]
fn a_json_blob_is_committed_as_pushed() {
    let config = br#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let mut world = World::new();
    let post = req(
        "PUT",
        &upload_path("demo/app", 0, &format!("&digest={}", Digest::of(config))),
    )
    .body(config.len() as u64);
    let (mut stream, _) = world.send(&post);
    let out = send_body(&mut world, &mut stream, config);
    assert_eq!(
        out,
        vec![
            Command::ReplaceRequestBody(config.len(), config.to_vec()),
            Command::Continue
        ],
        "passed through as it is"
    );
    let out = stream.on_response_headers(&took_the_body(), &mut world.env());
    let [Command::Dispatch(put), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(put.headers[1]
        .1
        .ends_with(&format!("&digest={}", Digest::of(config))));
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let mut expected = made_201();
    expected.extend([
        Command::Metric(Metric::BlobPassed),
        Command::SetResponseHeader(
            "docker-content-digest".into(),
            Digest::of(config).to_string(),
        ),
        Command::SetResponseHeader(
            "location".into(),
            format!("/v2/demo/app/blobs/{}", Digest::of(config)),
        ),
        Command::ResumeResponse,
    ]);
    assert_eq!(out, expected);
    assert_eq!(ledgered(&world, "demo/app", &Digest::of(config)), None);
}

/// docker: a mount of a blob the gateway encrypted in the same project mounts its ciphertext.
/// The registry's `201` ledgers it here and answers in the client's digest and `Location`; a
/// `202` (the registry could not mount: a session) goes to the client as it is.
#[test]
fn a_mount_of_a_known_blob() {
    for status in ["201", "202", "401"] {
        let mut world = World::new();
        let entry = ledger_layer(&mut world, "demo/base", &demo_recipients());
        let d = gz_digest();
        let (mut stream, _) = world.send(&req(
            "POST",
            &format!("/v2/demo/app/blobs/uploads/?mount={d}&from=demo/base"),
        ));
        let location = match status {
            "201" => format!("/v2/demo/app/blobs/{}", entry.encrypted_digest),
            _ => format!("/v2/demo/app/blobs/uploads/{UUID}"),
        };
        let head = ResponseHead::new(&[(":status", status), ("location", &location)]);
        let out = stream.on_response_headers(&head, &mut world.env());
        if status != "201" {
            assert_eq!(out, vec![Command::Continue], "{status}");
            assert_eq!(ledgered(&world, "demo/app", &d), None);
            continue;
        }
        assert_eq!(
            out,
            vec![
                Command::Metric(Metric::LedgerCache(Change {
                    entries: 1,
                    evicted: 0
                })),
                Command::SetResponseHeader("docker-content-digest".into(), d.to_string()),
                Command::SetResponseHeader("location".into(), format!("/v2/demo/app/blobs/{d}")),
                Command::Continue,
            ]
        );
        assert_eq!(ledgered(&world, "demo/app", &d), Some(entry));
    }
}

/// A re-push: a `HEAD` of a blob the gateway encrypted asks the registry about its ciphertext;
/// the registry's `200` is answered in the client's digest (its `Location`, if any, is the
/// registry's). A `404` (the ciphertext is gone) passes: the client uploads it again.
#[test]
fn a_head_of_a_known_blob() {
    for status in ["200", "404", "401"] {
        let mut world = World::new();
        let entry = ledger_layer(&mut world, "demo/app", &demo_recipients());
        let (mut stream, _) =
            world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", gz_digest())));
        let stored = entry.encrypted_digest.to_string();
        let head = ResponseHead::new(&[(":status", status), ("docker-content-digest", &stored)]);
        let out = stream.on_response_headers(&head, &mut world.env());
        let expected = match status {
            "200" => vec![
                Command::SetResponseHeader("docker-content-digest".into(), gz_digest().to_string()),
                Command::Continue,
            ],
            _ => vec![Command::Continue],
        };
        assert_eq!(out, expected, "{status}");
        assert!(matches!(stream.flow, Flow::Pass));
    }
}

/// A mount or `HEAD` answered with a redirect, or a `Location` off the repository, is refused
/// as every answer in an encrypted repository is.
#[test]
fn known_blob_answers_are_checked_first() {
    let mut world = World::new();
    ledger_layer(&mut world, "demo/app", &demo_recipients());
    let (mut stream, _) = world.send(&req("HEAD", &format!("/v2/demo/app/blobs/{}", gz_digest())));
    let head = ResponseHead::new(&[(":status", "307"), ("location", "http://elsewhere/x")]);
    let out = stream.on_response_headers(&head, &mut world.env());
    assert_refused(&out, Code::BadGateway, "redirect");
}

/// With replicas the finishing `201` is held while the blob is recorded in the registry's ledger
/// (its stages in `gateway_recording.rs`): nothing is committed yet.
#[test]
fn with_replicas_the_finishing_201_starts_the_recording() {
    let mut world = World::with(true);
    let mut stream = monolithic(&mut world);
    let put = finishing(&mut world, &mut stream);
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let (first, rest) = out.split_at(4);
    assert_eq!(first, made_201().as_slice());
    let [Command::Dispatch(post)] = rest else {
        panic!("{out:?}")
    };
    assert_eq!(post.headers[1].1, "/v2/demo/app/blobs/uploads/");
    assert!(matches!(
        stream.flow,
        Flow::Recording { stage: RecordingStage::ConfigSession, callout, .. } if callout == post.id
    ));
    assert_eq!(
        ledgered(&world, "demo/app", &gz_digest()),
        None,
        "nothing is committed before the registry's ledger has it"
    );
}
