//! `DELETE` of a manifest by digest in an encrypted repository: the gateway reads the manifest
//! first with the client's credentials, and lets the delete go only when that read says it is
//! not a ledger record. Every other answer fails closed, except a `401` to a client that sent no
//! credentials (the registry's own challenge to the delete is what gets it credentials).
//! (A read answered 200 or 404: `gateway_request.rs`, `manifest_delete_by_digest`.)
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

/// What the gateway does with a delete whose check read got `answer`, the client having sent
/// `authorization`: `None` lets it go, `Some((code, needle))` refuses it.
fn decide(answer: CalloutAnswer, authorization: Option<&[u8]>) -> Vec<Command> {
    let d = gz_digest();
    let mut world = World::new();
    let mut request = req("DELETE", &format!("/v2/demo/app/manifests/{d}"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let (mut stream, out) = world.send(&request);
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
    // The read carries the client's credentials, nothing of the gateway's own.
    let sent = callout
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_bytes().to_vec());
    assert_eq!(sent.as_deref(), authorization);
    let out = stream.on_callout(callout.id, &answer, &mut world.env());
    assert!(world.keys.asked.is_empty());
    out
}

const TOKEN: &[u8] = b"Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln";

#[test]
fn a_token_that_may_delete_but_not_read_deletes_nothing() {
    for status in [401, 403] {
        let out = decide(CalloutAnswer::new(status, &[], b""), Some(TOKEN));
        assert_refused(&out, Code::Denied, "needs pull as well as delete");
    }
}

#[test]
fn a_failed_check_read_deletes_nothing() {
    for status in [500, 502, 503, 429] {
        let out = decide(CalloutAnswer::new(status, &[], b""), Some(TOKEN));
        assert_refused(&out, Code::Unavailable, "before its delete");
    }
    // A callout that came back without a status (reset, timeout): the same.
    let failed = CalloutAnswer {
        headers: Vec::new(),
        body: Vec::new(),
    };
    let out = decide(failed, Some(TOKEN));
    assert_refused(&out, Code::Unavailable, "before its delete");
}

#[test]
fn a_delete_without_credentials_reaches_the_registrys_challenge() {
    let out = decide(CalloutAnswer::new(401, &[], b""), None);
    assert_eq!(out, vec![Command::Continue]);
    // Without credentials a 403 is not a challenge: refused.
    let out = decide(CalloutAnswer::new(403, &[], b""), None);
    assert_refused(&out, Code::Denied, "needs pull as well as delete");
}
