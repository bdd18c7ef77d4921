//! The registry's answer to a chunk the gateway encrypted, driven natively: on `202` the
//! registry must hold exactly the bytes sent, and the session's state then goes where the next
//! request finds it (the store, or sealed into the `Location` with replicas); anything else
//! keeps nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
    pub mod scenarios;
}

use common::gateway::*;
use common::scenarios::chunk_sent;
use ocicrypt_core::distribution::upload::{self, Replica};
use ocicrypt_core::distribution::upload_table;
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{Command, Metric, ResponseHead, Stream};

/// A first PATCH of the session carrying `LAYER`, encrypted as the adapter would have it; the
/// stream waits for the registry's answer.
fn patched(world: &mut World) -> Stream {
    let (stream, out) = chunk_sent(world);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    stream
}

fn location(offset: u64) -> String {
    upload_path("demo/app", offset, "")
}

fn answer(status: &str, range: Option<String>, offset: u64) -> ResponseHead {
    let location = location(offset);
    let mut headers = vec![(":status", status), ("location", location.as_str())];
    let range = range.unwrap_or_default();
    if !range.is_empty() {
        headers.push(("range", range.as_str()));
    }
    ResponseHead::new(&headers)
}

fn held() -> u64 {
    LAYER.len() as u64
}

fn took_it() -> ResponseHead {
    answer("202", Some(format!("0-{}", held() - 1)), held())
}

/// The answer to a `202` that keeps nothing: the session is deleted at the registry's own
/// offset (distribution refuses a stale `_state`, v3 without cancelling the session), the
/// client gets the refusal and no `Location`, and no state is saved.
fn assert_abandoned(world: &World, out: &[Command], code: Code, needle: &str) {
    let Command::Dispatch(callout) = &out[0] else {
        panic!("no cleanup: {out:?}")
    };
    assert!(
        callout
            .headers
            .contains(&(":method".into(), "DELETE".into())),
        "{callout:?}"
    );
    assert!(
        callout
            .headers
            .contains(&(":path".into(), location(held()))),
        "{callout:?}"
    );
    assert_refused(out, code, needle);
    assert!(!out
        .iter()
        .any(|c| matches!(c, Command::SetResponseHeader(n, _) if n == "location")));
    assert!(!upload_table::has_in(
        &world.store,
        UUID,
        NOW,
        world.config.upload_idle_seconds
    ));
}

#[test]
fn a_202_saves_the_state_in_the_store_without_replicas() {
    let mut world = World::new();
    let mut stream = patched(&mut world);
    let out = stream.on_response_headers(&took_it(), &mut world.env());
    assert_eq!(
        out,
        vec![Command::Metric(Metric::UploadState(1)), Command::Continue]
    );
    assert_eq!(stream.claimed, None, "the claim is released on the 202");
    let (record, found) = upload_table::load_in(
        &world.store,
        UUID,
        "demo/app",
        NOW,
        world.config.upload_idle_seconds,
    )
    .unwrap();
    assert!(found);
    assert_eq!(record.offset, held());
}

#[test]
fn a_202_seals_the_state_into_the_location_with_replicas() {
    let mut world = World::with(true);
    let mut stream = patched(&mut world);
    let out = stream.on_response_headers(&took_it(), &mut world.env());
    let [Command::SetResponseHeader(name, value), Command::Continue] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(name, "location");
    let prefix = format!("{}&_ocicrypt_session={UUID}&_ocicrypt=", location(held()));
    let token = value
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{value}"));
    let key = world.config.state_key.as_ref().unwrap().0.clone();
    let (record, sealed_by) = upload::unseal(&key, UUID, token).unwrap();
    assert_eq!(record.offset, held());
    let here = Replica::of_this_process(&world.store, &mut world.rng).unwrap();
    assert_eq!(sealed_by, here);
    assert!(
        !upload_table::has_in(&world.store, UUID, NOW, world.config.upload_idle_seconds),
        "replicas keep nothing per upload"
    );
    assert_eq!(stream.claimed, None);
}

/// The registry says it holds other bytes than the gateway sent (or says nothing): keeping a
/// state would encrypt the next chunk at the wrong offset of the keystream. The upload is
/// abandoned (a DELETE of the session) and nothing is kept.
#[test]
fn a_range_other_than_what_was_sent_abandons_the_upload() {
    for replicas in [false, true] {
        for range in [
            Some(format!("0-{}", held() - 2)),
            Some(format!("0-{}", held())),
            Some("bytes".to_string()),
            None,
        ] {
            let mut world = World::with(replicas);
            let mut stream = patched(&mut world);
            let out =
                stream.on_response_headers(&answer("202", range.clone(), held()), &mut world.env());
            assert_abandoned(&world, &out, Code::BadGateway, "does not match");
        }
    }
}

/// The helper that hashed the chunk's ciphertext failed: the gateway cannot name the blob by
/// its digest, so the registry's `202` keeps nothing and the session is abandoned at the
/// registry's offset (with and without replicas). (A helper that lost bytes is refused the
/// same way: `gateway_body.rs`.)
#[test]
fn a_202_whose_hashing_helper_failed_abandons_the_upload() {
    for replicas in [false, true] {
        let mut world = World::with(replicas);
        let (helpers, lanes) = TestHelpers::lent(Helping::Die);
        world.hashing = Some(helpers);
        let extra = if replicas {
            format!("&_ocicrypt_session={UUID}")
        } else {
            String::new()
        };
        let patch = req("PATCH", &upload_path("demo/app", 0, &extra)).body(held());
        let (mut stream, out) = world.send(&patch);
        assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
        let out =
            stream.on_request_body(LAYER.len(), true, &|| Ok(LAYER.to_vec()), &mut world.env());
        assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
        assert_eq!(lanes.load(std::sync::atomic::Ordering::SeqCst), 1);
        let out = stream.on_response_headers(&took_it(), &mut world.env());
        assert_abandoned(&world, &out, Code::Unavailable, "hashing helper failed");
    }
}

#[test]
fn an_answer_other_than_202_keeps_nothing() {
    for replicas in [false, true] {
        let mut world = World::with(replicas);
        let mut stream = patched(&mut world);
        let out = stream.on_response_headers(&answer("400", None, held()), &mut world.env());
        assert_eq!(out, vec![Command::Continue]);
        assert!(!upload_table::has_in(
            &world.store,
            UUID,
            NOW,
            world.config.upload_idle_seconds
        ));
    }
}
