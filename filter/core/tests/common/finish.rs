//! An upload's end as the flow tests (`gateway_finish`, `gateway_recording`) drive it: a
//! monolithic body up to the registry's `202`, the finishing `PUT`, what a commit answers.
#![allow(dead_code)]

use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::ledger_cache::Change;
use ocicrypt_core::gateway::{Callout, Command, Flow, Level, Metric, ResponseHead, Stream};

use super::gateway::*;

/// ctr and BuildKit: a monolithic `PUT ?digest=` carrying the whole blob, its body encrypted
/// and completed as the adapter does at its end; the stream waits for the registry's answer to
/// the `PATCH` it became.
pub fn monolithic(world: &mut World) -> Stream {
    let mut extra = format!("&digest={}", gz_digest());
    if world.config.state_key.is_some() {
        extra.push_str(&format!("&_ocicrypt_session={UUID}"));
    }
    let put = req("PUT", &upload_path("demo/app", 0, &extra)).body(LAYER.len() as u64);
    let (mut stream, out) = world.send(&put);
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    body_ends(world, &mut stream);
    stream
}

/// The monolithic body arrives in one piece, is encrypted and, at its end, completed.
pub fn body_ends(world: &mut World, stream: &mut Stream) {
    send_body(world, stream, LAYER);
}

/// `body`, the whole of an upload's body, in one body event: what the stream answered.
pub fn send_body(world: &mut World, stream: &mut Stream, body: &[u8]) -> Vec<Command> {
    let owned = body.to_vec();
    let out = stream.on_request_body(body.len(), true, &|| Ok(owned.clone()), &mut world.env());
    assert_eq!(out.last(), Some(&Command::Continue), "{out:?}");
    out
}

pub fn len() -> u64 {
    LAYER.len() as u64
}

/// The registry's `Location` once it holds the whole body.
pub fn location() -> String {
    upload_path("demo/app", len(), "")
}

/// The registry's `202` to the `PATCH` the monolithic body became.
pub fn took_the_body() -> ResponseHead {
    let location = location();
    let range = format!("0-{}", len() - 1);
    ResponseHead::new(&[
        (":status", "202"),
        ("location", &location),
        ("range", &range),
        ("docker-upload-uuid", UUID),
        ("content-length", "0"),
    ])
}

/// The ciphertext's digest the stream will commit.
pub fn stored(stream: &Stream) -> Digest {
    match &stream.flow {
        Flow::Chunk(flow) => {
            flow.finish
                .as_ref()
                .unwrap()
                .completion
                .as_ref()
                .unwrap()
                .stored_digest
        }
        Flow::Finishing { completion, .. } | Flow::Recording { completion, .. } => {
            completion.stored_digest
        }
        _ => panic!("nothing to commit"),
    }
}

/// The registry's `202` held, the finishing `PUT` dispatched: its callout.
pub fn finishing(world: &mut World, stream: &mut Stream) -> Callout {
    let digest = stored(stream);
    let out = stream.on_response_headers(&took_the_body(), &mut world.env());
    let [Command::Dispatch(put), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        put.headers[..3],
        [
            (":method".to_string(), "PUT".to_string()),
            (
                ":path".to_string(),
                format!("{}&digest={digest}", location())
            ),
            (":authority".to_string(), "gateway:5000".to_string()),
        ]
    );
    assert_eq!(put.body, None);
    assert!(matches!(stream.flow, Flow::Finishing { callout: Some(id), .. } if id == put.id));
    put.clone()
}

/// What the commit of `LAYER` answers: the ledger written twice, the log line, the layer
/// counted, the answer in the client's digest.
pub fn committed(entry: &LedgerEntry) -> Vec<Command> {
    let added = Command::Metric(Metric::LedgerCache(Change {
        entries: 1,
        evicted: 0,
    }));
    vec![
        added.clone(),
        added,
        Command::Log(
            Level::Info,
            format!(
                "demo/app: blob {} stored encrypted as {} ({} bytes)",
                gz_digest(),
                entry.encrypted_digest,
                len()
            ),
        ),
        Command::Metric(Metric::LayerEncrypted(len())),
        Command::SetResponseHeader("docker-content-digest".into(), gz_digest().to_string()),
        Command::SetResponseHeader(
            "location".into(),
            format!("/v2/demo/app/blobs/{}", gz_digest()),
        ),
    ]
}

/// The held `202` made a commit's `201`.
pub fn made_201() -> Vec<Command> {
    vec![
        Command::SetResponseHeader(":status".into(), "201".into()),
        Command::RemoveResponseHeader("range".into()),
        Command::RemoveResponseHeader("docker-upload-uuid".into()),
        Command::SetResponseHeader("content-length".into(), "0".into()),
    ]
}
