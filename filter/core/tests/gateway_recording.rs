//! Recording a committed blob in the registry's ledger (replicas), driven natively: the empty
//! config's session, the empty config, the authenticated ledger manifest, then the commit and
//! the held answer resumed; every stage's failure refuses the request saying the blob was
//! stored but not recorded.
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
use ocicrypt_core::distribution::ledger::{self, LedgerEntry};
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{
    empty_config_key, Callout, CalloutAnswer, CalloutId, Command, Flow, RecordingStage,
    ResponseHead, Stream,
};
use ocicrypt_core::spec;
use ocicrypt_core::store::Store;

fn header<'a>(callout: &'a Callout, name: &str) -> Option<&'a str> {
    callout
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The ledger entry the stream is recording.
fn recorded(stream: &Stream) -> LedgerEntry {
    let Flow::Recording { completion, .. } = &stream.flow else {
        panic!("not recording")
    };
    completion.ledger.clone().unwrap()
}

fn at(stream: &Stream, stage: RecordingStage, id: CalloutId) {
    assert!(
        matches!(&stream.flow, Flow::Recording { stage: s, callout, .. } if *s == stage && *callout == id),
        "not waiting in {stage:?}"
    );
}

fn one_dispatch(out: &[Command]) -> Callout {
    let [Command::Dispatch(callout)] = out else {
        panic!("{out:?}")
    };
    callout.clone()
}

/// The recording stages, in the order the stream goes through them.
const STAGES: [RecordingStage; 3] = [
    RecordingStage::ConfigSession,
    RecordingStage::Config,
    RecordingStage::Manifest,
];

/// The registry stores the ledger manifest: `entry` is committed (ledgered for `digest` in
/// `demo/app`) and the held answer resumed.
fn assert_recorded_and_resumed(
    world: &mut World,
    stream: &mut Stream,
    manifest: &Callout,
    entry: LedgerEntry,
    digest: &Digest,
) {
    let out = stream.on_callout(
        manifest.id,
        &CalloutAnswer::new(201, &[], b""),
        &mut world.env(),
    );
    let mut expected = committed(&entry);
    expected.push(Command::ResumeResponse);
    assert_eq!(out, expected);
    assert_eq!(ledgered(world, "demo/app", digest), Some(entry));
}

/// A monolithic upload with replicas, finished by the registry and recorded up to `stage`:
/// the stream and the callout that stage waits for.
fn up_to(world: &mut World, stage: RecordingStage) -> (Stream, Callout) {
    let mut stream = monolithic(world);
    let put = finishing(world, &mut stream);
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    let mut callout = one_dispatch(&out[4..]);
    at(&stream, RecordingStage::ConfigSession, callout.id);
    if stage == RecordingStage::ConfigSession {
        return (stream, callout);
    }
    let session = upload_path("demo/app", 0, "");
    let answer = CalloutAnswer::new(202, &[("location", &session)], b"");
    callout = one_dispatch(&stream.on_callout(callout.id, &answer, &mut world.env()));
    at(&stream, RecordingStage::Config, callout.id);
    if stage == RecordingStage::Config {
        return (stream, callout);
    }
    let answer = CalloutAnswer::new(201, &[], b"");
    callout = one_dispatch(&stream.on_callout(callout.id, &answer, &mut world.env()));
    at(&stream, RecordingStage::Manifest, callout.id);
    (stream, callout)
}

#[test]
fn a_blob_is_recorded_in_three_stages_then_committed() {
    let mut world = World::with(true);
    let (mut stream, post) = up_to(&mut world, RecordingStage::ConfigSession);
    assert_eq!(header(&post, ":method"), Some("POST"));
    assert_eq!(header(&post, ":path"), Some("/v2/demo/app/blobs/uploads/"));
    assert_eq!(post.body, None);
    let entry = recorded(&stream);

    // The session for the empty config: its upload, at the newest `_state`.
    let session = upload_path("demo/app", 0, "");
    let answer = CalloutAnswer::new(202, &[("Location", &session)], b"");
    let put = one_dispatch(&stream.on_callout(post.id, &answer, &mut world.env()));
    assert_eq!(header(&put, ":method"), Some("PUT"));
    let empty = Digest::of(ledger::EMPTY_CONFIG);
    assert_eq!(
        header(&put, ":path"),
        Some(format!("{session}&digest={empty}").as_str())
    );
    assert_eq!(put.body.as_deref(), Some(ledger::EMPTY_CONFIG));
    assert_eq!(
        header(&put, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(world.store.get(&empty_config_key("demo/app")), None);

    // The empty config stored: marked, and the ledger manifest follows.
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    assert_eq!(
        world.store.get(&empty_config_key("demo/app")),
        Some(b"1".to_vec())
    );
    let manifest = one_dispatch(&out);
    assert_eq!(header(&manifest, ":method"), Some("PUT"));
    let tag = ledger::ledger_tag(&gz_digest());
    assert_eq!(
        header(&manifest, ":path"),
        Some(format!("/v2/demo/app/manifests/{tag}").as_str())
    );
    assert_eq!(
        header(&manifest, "content-type"),
        Some(spec::MEDIA_TYPE_OCI_MANIFEST)
    );
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let body = manifest.body.as_deref().unwrap();
    assert_eq!(
        ledger::read_stored(&key, "demo/app", &gz_digest(), body).unwrap(),
        entry,
        "the record authenticates under the replicas' key"
    );
    assert_eq!(ledgered(&world, "demo/app", &gz_digest()), None);

    // Recorded: committed, and the held answer goes on.
    assert_recorded_and_resumed(&mut world, &mut stream, &manifest, entry, &gz_digest());
    assert!(matches!(stream.flow, Flow::Pass));
}

/// The empty config is uploaded once per repository: once marked, straight to the ledger
/// manifest.
#[test]
fn a_marked_repository_goes_straight_to_the_ledger_manifest() {
    let mut world = World::with(true);
    world
        .store
        .set(&empty_config_key("demo/app"), b"1")
        .unwrap();
    let mut stream = monolithic(&mut world);
    let put = finishing(&mut world, &mut stream);
    let out = stream.on_callout(put.id, &CalloutAnswer::new(201, &[], b""), &mut world.env());
    assert_eq!(out[..4], made_201()[..]);
    let manifest = one_dispatch(&out[4..]);
    at(&stream, RecordingStage::Manifest, manifest.id);
    let tag = ledger::ledger_tag(&gz_digest());
    assert_eq!(
        header(&manifest, ":path"),
        Some(format!("/v2/demo/app/manifests/{tag}").as_str())
    );
}

/// Every stage answered otherwise than it expects, or failed, refuses the request: the
/// ciphertext is stored but not recorded, so the message says so and asks for a push again.
/// Nothing is committed and the held answer is not resumed.
#[test]
fn a_failed_stage_refuses_the_request() {
    let session = upload_path("demo/app", 0, "");
    let failed = CalloutAnswer::default();
    let mut cases: Vec<(RecordingStage, CalloutAnswer, Code, &str)> = vec![
        (
            RecordingStage::ConfigSession,
            CalloutAnswer::new(201, &[("location", &session)], b""),
            Code::Unavailable,
            "tried to open a session for the ledger's empty config",
        ),
        (
            RecordingStage::ConfigSession,
            CalloutAnswer::new(202, &[], b""),
            Code::Unavailable,
            "answered 202 when the gateway tried to open a session",
        ),
        (
            RecordingStage::ConfigSession,
            CalloutAnswer::new(403, &[], b""),
            Code::Denied,
            "answered 403",
        ),
        (
            RecordingStage::Config,
            CalloutAnswer::new(400, &[], br#"{"errors":[]}"#),
            Code::Unavailable,
            "tried to store the ledger's empty config",
        ),
        (
            RecordingStage::Config,
            CalloutAnswer::new(401, &[], b""),
            Code::Denied,
            "answered 401",
        ),
        (
            RecordingStage::Manifest,
            CalloutAnswer::new(202, &[], b""),
            Code::Unavailable,
            "tried to record the encrypted blob in the registry's ledger",
        ),
        (
            RecordingStage::Manifest,
            CalloutAnswer::new(500, &[], b""),
            Code::Unavailable,
            "answered 500",
        ),
    ];
    // A failed callout (no answer: 503) refuses the request at every stage alike.
    for stage in STAGES {
        cases.push((stage, failed.clone(), Code::Unavailable, "answered 503"));
    }
    for (stage, answer, code, needle) in cases {
        let mut world = World::with(true);
        let (mut stream, callout) = up_to(&mut world, stage);
        let out = stream.on_callout(callout.id, &answer, &mut world.env());
        assert_refused(&out, code, needle);
        assert_eq!(out.len(), 4, "{stage:?}: {out:?}");
        let err = refusal(&out).unwrap();
        assert!(
            err.message
                .ends_with("the encrypted blob was stored but not recorded, push again"),
            "{err}"
        );
        assert!(matches!(stream.flow, Flow::Refused));
        assert_eq!(
            ledgered(&world, "demo/app", &gz_digest()),
            None,
            "{stage:?}"
        );
        if stage == RecordingStage::Config {
            assert_eq!(world.store.get(&empty_config_key("demo/app")), None);
        }
    }
}

/// The empty config's session is an answer in the encrypted repository like any other: a
/// `Location` outside it is refused, and that session deleted where the gateway reaches it.
#[test]
fn a_config_session_opened_elsewhere_is_refused_and_deleted() {
    let mut world = World::with(true);
    let (mut stream, post) = up_to(&mut world, RecordingStage::ConfigSession);
    let elsewhere = format!("/v2/other/app/blobs/uploads/{UUID}");
    let answer = CalloutAnswer::new(202, &[("location", &elsewhere)], b"");
    let out = stream.on_callout(post.id, &answer, &mut world.env());
    let Command::Dispatch(delete) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(header(delete, ":method"), Some("DELETE"));
    assert_eq!(header(delete, ":path"), Some(elsewhere.as_str()));
    assert_refused(&out[1..], Code::BadGateway, "outside encrypted repository");
}

/// A stage the host could not dispatch: the registry is unreachable.
#[test]
fn a_stage_not_dispatched_is_refused() {
    for stage in STAGES {
        let mut world = World::with(true);
        let (mut stream, callout) = up_to(&mut world, stage);
        let out = stream.on_dispatch_failed(callout.id, &mut world.env());
        assert_refused(&out, Code::Unavailable, "could not reach the registry");
    }
}

/// skopeo's bodiless `PUT ?digest=` with replicas: the registry's `201` is held while the blob
/// is recorded.
#[test]
fn a_bodiless_put_is_recorded_before_its_201() {
    let mut world = World::with(true);
    let record = encrypted_record(&mut world, LAYER);
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let replica =
        ocicrypt_core::distribution::upload::Replica::of_this_process(&world.store, &mut world.rng)
            .unwrap();
    let token =
        ocicrypt_core::distribution::upload::seal(&key, UUID, &record, replica, &mut world.rng);
    let put = req(
        "PUT",
        &upload_path(
            "demo/app",
            len(),
            &format!(
                "&_ocicrypt_session={UUID}&_ocicrypt={token}&digest={}",
                gz_digest()
            ),
        ),
    );
    let (mut stream, out) = world.send(&put);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    let head = ResponseHead::new(&[(":status", "201")]);
    let out = stream.on_response_headers(&head, &mut world.env());
    let [Command::Dispatch(post), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(header(post, ":path"), Some("/v2/demo/app/blobs/uploads/"));
    at(&stream, RecordingStage::ConfigSession, post.id);
}

/// docker's mount of a blob the gateway encrypted, with replicas: ledgered in the registry
/// like an upload (any replica finishes the push), then answered in the client's digest.
#[test]
fn a_mount_is_recorded_before_its_201() {
    let mut world = World::with(true);
    world
        .store
        .set(&empty_config_key("demo/app"), b"1")
        .unwrap();
    let entry = ledger_layer(&mut world, "demo/base", &demo_recipients());
    let d = gz_digest();
    let (mut stream, _) = world.send(&req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?mount={d}&from=demo/base"),
    ));
    let location = format!("/v2/demo/app/blobs/{}", entry.encrypted_digest);
    let head = ResponseHead::new(&[(":status", "201"), ("location", &location)]);
    let out = stream.on_response_headers(&head, &mut world.env());
    let [Command::Dispatch(manifest), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    at(&stream, RecordingStage::Manifest, manifest.id);
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    assert_eq!(
        ledger::read_stored(&key, "demo/app", &d, manifest.body.as_deref().unwrap()).unwrap(),
        entry
    );
    assert_recorded_and_resumed(&mut world, &mut stream, manifest, entry, &d);
}
