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
    pub mod scenarios;
}

use common::gateway::*;
use common::scenarios::single_post;
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::CalloutAnswer;

const CHALLENGE: &str = "Bearer realm=\"https://harbor.example/service/token\",service=\"harbor-registry\",scope=\"repository:demo/app:pull,push\"";

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
