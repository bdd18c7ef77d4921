//! A `401` to a callout the gateway made with the client's credentials reaches the client as
//! the registry's `401` with its `WWW-Authenticate` challenge: the client learns from it which
//! token to fetch (Harbor, distribution's `auth: token`). Without a challenge, or on a `403`,
//! the refusal stays `403 DENIED`.
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
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{CalloutAnswer, Command};

const CHALLENGE: &str = "Bearer realm=\"https://harbor.example/service/token\",service=\"harbor-registry\",scope=\"repository:demo/app:pull,push\"";

/// A `POST ?digest=` with a body (the filter opens the session by callout) whose callout gets
/// `answer`.
fn single_post(answer: CalloutAnswer) -> Vec<Command> {
    let mut world = World::new();
    let post = req(
        "POST",
        &format!("/v2/demo/app/blobs/uploads/?digest={}", gz_digest()),
    )
    .body(3);
    let (mut stream, out) = world.send(&post);
    let Command::Dispatch(callout) = &out[0] else {
        panic!("{out:?}")
    };
    stream.on_callout(callout.id, &answer, &mut world.env())
}

#[test]
fn a_401_to_the_session_callout_carries_the_registrys_challenge() {
    let out = single_post(CalloutAnswer::new(
        401,
        &[("www-authenticate", CHALLENGE)],
        b"",
    ));
    assert_refused(&out, Code::Unauthorized, "401");
    let err = refusal(&out).unwrap();
    assert_eq!(err.status(), 401);
    assert_eq!(err.challenge.as_deref(), Some(CHALLENGE));
}

#[test]
fn without_a_challenge_or_on_a_403_the_refusal_stays_denied() {
    for answer in [
        CalloutAnswer::new(401, &[], b""),
        CalloutAnswer::new(403, &[("www-authenticate", CHALLENGE)], b""),
    ] {
        let out = single_post(answer);
        assert_refused(&out, Code::Denied, "nothing was stored");
        assert_eq!(refusal(&out).unwrap().challenge, None);
    }
}
