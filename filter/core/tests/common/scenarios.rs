//! Requests the flow tests and the refusal specification (`spec_refusals`) both drive: a
//! session opened by callout, a chunk encrypted on its way to the registry.
#![allow(dead_code)]

use ocicrypt_core::gateway::{CalloutAnswer, Command, Flow, Stream};

use super::gateway::*;

/// A `POST ?digest=` with a body (the filter opens the session by callout) whose callout gets
/// `answer`.
pub fn single_post(answer: CalloutAnswer) -> Vec<Command> {
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

/// A first `PATCH` of the session carrying `LAYER` (sealed to the session with replicas),
/// encrypted as the adapter would have it: the stream, waiting for the registry's answer, and
/// what the request's headers got.
pub fn chunk_sent(world: &mut World) -> (Stream, Vec<Command>) {
    let extra = if world.config.state_key.is_some() {
        format!("&_ocicrypt_session={UUID}")
    } else {
        String::new()
    };
    let patch = req("PATCH", &upload_path("demo/app", 0, &extra)).body(LAYER.len() as u64);
    let (mut stream, out) = world.send(&patch);
    let Flow::Chunk(flow) = &mut stream.flow else {
        panic!("not a chunk: {out:?}")
    };
    let mut body = LAYER.to_vec();
    flow.stream
        .as_mut()
        .unwrap()
        .on_body(&mut body, true, &mut world.rng)
        .unwrap();
    (stream, out)
}
