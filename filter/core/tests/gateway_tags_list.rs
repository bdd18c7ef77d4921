//! `GET /v2/<name>/tags/list` through the gateway shows a user of an encrypted repository only
//! the tags clients pushed (issue 19): the gateway's reserved `ocicrypt.…` tags are left out,
//! every other member of the answer kept, pagination (`n`, `last`, `Link`) left to the
//! registry, the answer's body held within `limits.max_manifest_bytes` and the worker's budget
//! (over the limit it passes as the registry sent it).
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
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::{Command, ResponseHead, Stream};
use ocicrypt_core::ledger::ledger_tag;
use ocicrypt_core::tags_list::without_reserved;

fn reserved(n: u8) -> String {
    ledger_tag(&ocicrypt_core::digest::Digest::of(&[n]))
}

/// What the answer becomes: `None` when it is sent as the registry wrote it.
#[test]
fn answers_lose_their_reserved_tags_and_nothing_else() {
    let r1 = reserved(1);
    let r2 = reserved(2);
    let cases: Vec<(&str, String, Option<String>)> = vec![
        (
            "no reserved tag: sent as it came",
            r#"{"name":"demo/app","tags":["v1","latest"]}"#.into(),
            None,
        ),
        (
            "reserved tags among the user's",
            format!(r#"{{"name":"demo/app","tags":["{r1}","v1","{r2}","latest"]}}"#),
            Some(r#"{"name":"demo/app","tags":["v1","latest"]}"#.into()),
        ),
        (
            "only reserved tags: an empty list",
            format!(r#"{{"name":"demo/app","tags":["{r1}","{r2}"]}}"#),
            Some(r#"{"name":"demo/app","tags":[]}"#.into()),
        ),
        (
            "reserved in any letter case",
            r#"{"name":"demo/app","tags":["OCICRYPT.x","Ocicrypt.sha256-00","v1"]}"#.into(),
            Some(r#"{"name":"demo/app","tags":["v1"]}"#.into()),
        ),
        (
            "a reserved tag spelled with a JSON escape",
            r#"{"name":"demo/app","tags":["\u006fcicrypt.sha256-00","v\u0031"]}"#.into(),
            Some(r#"{"name":"demo/app","tags":["v1"]}"#.into()),
        ),
        (
            "names that only look alike stay",
            format!(
                r#"{{"name":"demo/app","tags":["ocicrypt","ocicrypt-1.0","my.ocicrypt.x","{r1}"]}}"#
            ),
            Some(
                r#"{"name":"demo/app","tags":["ocicrypt","ocicrypt-1.0","my.ocicrypt.x"]}"#.into(),
            ),
        ),
        (
            "other members kept as written, in order",
            format!(
                r#"{{ "tags" : [ "{r1}" , "v1" ], "name" : "demo/app", "x-extra": {{"a": [1, 2.50]}} }}"#
            ),
            Some(r#"{"tags":["v1"],"name":"demo/app","x-extra":{"a": [1, 2.50]}}"#.into()),
        ),
        (
            "null tags",
            r#"{"name":"demo/app","tags":null}"#.into(),
            None,
        ),
        ("no tags member", r#"{"name":"demo/app"}"#.into(), None),
    ];
    for (name, body, expected) in cases {
        let got = without_reserved(body.as_bytes()).unwrap();
        assert_eq!(
            got.map(|b| String::from_utf8(b).unwrap()),
            expected,
            "{name}"
        );
    }
}

#[test]
fn answers_that_are_not_a_tags_list_are_not_read() {
    for body in [
        &b""[..],
        b"not json",
        b"[\"v1\"]",
        b"\"v1\"",
        br#"{"name":"demo/app","tags":"v1"}"#,
        br#"{"name":"demo/app","tags":["v1",7]}"#,
        br#"{"name":"demo/app","tags":[["ocicrypt.x"]]}"#,
        br#"{"name":"demo/app","tags":["v1"]} trailing"#,
        br#"{"name":"demo/app","tags":["v1"]"#,
        b"{\"name\":\"demo/app\",\"tags\":[\"\xff\"]}",
    ] {
        assert!(
            without_reserved(body).is_err(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

/// Distribution's paging of `GET …/tags/list?n=&last=` (v3 and Harbor): the tags in order,
/// those after `last`, at most `n` of them, and a `Link` to the next page when `n` cut the
/// list (its `last` the page's last tag).
fn registry_page(all: &[String], n: usize, last: Option<&str>) -> (Vec<u8>, Option<String>) {
    let after: Vec<&String> = all
        .iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .collect();
    let page: Vec<&String> = after.iter().take(n).copied().collect();
    let link = (after.len() > n).then(|| page.last().unwrap().to_string());
    let body = serde_json::to_vec(&serde_json::json!({"name": "demo/app", "tags": page})).unwrap();
    (body, link)
}

#[test]
fn a_client_following_link_sees_every_user_tag_once() {
    // Reserved tags sort between and after the user's (`o` > `l`, `v` > `o`), in runs longer
    // than a page: some pages hold reserved tags only.
    let mut all: Vec<String> = (0..40u8).map(reserved).collect();
    let user: Vec<String> = ["a1", "latest", "p2", "v1", "v2", "v3", "zz"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    all.extend(user.iter().cloned());
    all.sort();
    for n in 1..=9 {
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages <= all.len() + 1, "n={n}: the client never stops");
            let (body, link) = registry_page(&all, n, last.as_deref());
            let shown = without_reserved(&body).unwrap().unwrap_or(body);
            let doc: serde_json::Value = serde_json::from_slice(&shown).unwrap();
            for t in doc["tags"].as_array().unwrap() {
                seen.push(t.as_str().unwrap().to_string());
            }
            // The gateway passes the registry's Link as it is.
            match link {
                Some(next) => last = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, user, "n={n}");
    }
}

fn tags_request() -> Req {
    req("GET", "/v2/demo/app/tags/list?n=100").header("accept-encoding", b"gzip")
}

fn answer(headers: &[(&str, &str)]) -> ResponseHead {
    let mut all = vec![(":status", "200")];
    all.extend_from_slice(headers);
    ResponseHead::new(&all)
}

/// A stream whose tags list request went on, and the commands that did it.
fn requested(world: &mut World) -> (Stream, Vec<Command>) {
    world.send(&tags_request())
}

fn body_of(
    world: &mut World,
    stream: &mut Stream,
    body: &[u8],
    end_of_stream: bool,
) -> Vec<Command> {
    let copy = body.to_vec();
    let read = move || -> Result<Vec<u8>, OciError> { Ok(copy.clone()) };
    stream.on_response_body(body.len(), end_of_stream, &read, &mut world.env())
}

#[test]
fn the_answer_is_held_and_sent_without_reserved_tags() {
    let mut world = World::new();
    let (mut stream, out) = requested(&mut world);
    // Asked for unencoded: the gateway reads the answer.
    assert_eq!(
        out,
        [
            Command::RemoveRequestHeader("accept-encoding".into()),
            Command::Continue
        ]
    );
    let body = format!(r#"{{"name":"demo/app","tags":["{}","v1"]}}"#, reserved(1));
    let len = body.len().to_string();
    let out = stream.on_response_headers(
        &answer(&[
            ("content-type", "application/json"),
            ("content-length", &len),
            ("link", "</v2/demo/app/tags/list?last=v1&n=2>; rel=\"next\""),
        ]),
        &mut world.env(),
    );
    // The headers go on without a length (the body changes); the Link is left as it is.
    assert_eq!(
        out,
        [
            Command::RemoveResponseHeader("content-length".into()),
            Command::Continue
        ]
    );
    assert_eq!(world.held.get(), body.len());
    let (first, rest) = body.as_bytes().split_at(10);
    assert_eq!(
        body_of(&mut world, &mut stream, first, false),
        [Command::Pause]
    );
    let whole = [first, rest].concat();
    assert_eq!(
        body_of(&mut world, &mut stream, &whole, true),
        [
            Command::ReplaceResponseBody(
                whole.len(),
                br#"{"name":"demo/app","tags":["v1"]}"#.to_vec()
            ),
            Command::Continue
        ]
    );
    stream.on_end(&world.store, &world.held);
    assert_eq!(world.held.get(), 0, "the budget is given back");
    assert!(world.keys.asked.is_empty(), "no key is needed to list tags");
}

#[test]
fn answers_the_gateway_does_not_read_pass_as_they_came() {
    for (name, head) in [
        ("a 401", {
            let mut h = ResponseHead::new(&[(":status", "401"), ("www-authenticate", "Bearer x")]);
            h.end_of_stream = false;
            h
        }),
        ("a 404", ResponseHead::new(&[(":status", "404")])),
        (
            "an encoded body",
            answer(&[("content-encoding", "gzip"), ("content-length", "40")]),
        ),
        ("no body", {
            let mut h = answer(&[("content-length", "0")]);
            h.end_of_stream = true;
            h
        }),
    ] {
        let mut world = World::new();
        let (mut stream, _) = requested(&mut world);
        let out = stream.on_response_headers(&head, &mut world.env());
        assert_eq!(out, [Command::Continue], "{name}");
        assert_eq!(world.held.get(), 0, "{name}");
        assert_eq!(
            body_of(&mut world, &mut stream, b"{}", true),
            [Command::Continue],
            "{name}"
        );
    }
    // A 200 whose body is not a tags list: passed (the gateway only ever removes tags), logged.
    let mut world = World::new();
    let (mut stream, _) = requested(&mut world);
    stream.on_response_headers(&answer(&[]), &mut world.env());
    let out = body_of(&mut world, &mut stream, b"<html>oops</html>", true);
    assert!(
        matches!(out.as_slice(), [Command::Log(..), Command::Continue]),
        "{out:?}"
    );
}

#[test]
fn only_reads_of_encrypted_repositories_are_filtered() {
    for (method, path) in [
        ("GET", "/v2/plain/app/tags/list"),
        ("HEAD", "/v2/demo/app/tags/list"),
        ("GET", "/v2/demo/app/tags/list/extra"),
        ("GET", "/v2/demo/app/tags"),
        ("GET", "/v2/Demo/app/tags/list"),
    ] {
        let mut world = World::new();
        let (mut stream, out) = world.send(&req(method, path));
        assert_eq!(out, [Command::Continue], "{method} {path}");
        let out =
            stream.on_response_headers(&answer(&[("content-length", "10")]), &mut world.env());
        assert_eq!(out, [Command::Continue], "{method} {path}");
    }
}

#[test]
fn answers_over_the_limit_pass_as_they_came() {
    // Declared over the limit (4096 in the test configuration): not held at all.
    let mut world = World::new();
    let (mut stream, _) = requested(&mut world);
    let out = stream.on_response_headers(&answer(&[("content-length", "4097")]), &mut world.env());
    assert!(
        matches!(out.as_slice(), [Command::Log(_, line), Command::Continue] if line.contains("limits.max_manifest_bytes")),
        "{out:?}"
    );
    assert_eq!(world.held.get(), 0);
    assert_eq!(
        body_of(&mut world, &mut stream, b"{}", false),
        [Command::Continue]
    );

    // Undeclared: the limit is reserved, and the body let go once it passes it.
    let mut world = World::new();
    let (mut stream, _) = requested(&mut world);
    let out = stream.on_response_headers(&answer(&[]), &mut world.env());
    assert_eq!(out.last(), Some(&Command::Continue));
    assert_eq!(world.held.get(), 4096);
    assert_eq!(
        body_of(&mut world, &mut stream, b"{\"tags\":[", false),
        [Command::Pause]
    );
    let big = vec![b' '; 4097];
    let out = body_of(&mut world, &mut stream, &big, false);
    assert!(
        matches!(out.as_slice(), [Command::Log(..), Command::Continue]),
        "{out:?}"
    );
    assert_eq!(
        body_of(&mut world, &mut stream, &big, true),
        [Command::Continue]
    );
    stream.on_end(&world.store, &world.held);
    assert_eq!(world.held.get(), 0);
}

#[test]
fn a_full_budget_refuses_the_read_until_there_is_room() {
    let mut world = World::new();
    world
        .held
        .set(ocicrypt_core::gateway::MANIFEST_BUDGET_PER_WORKER);
    let (mut stream, _) = requested(&mut world);
    let out = stream.on_response_headers(&answer(&[("content-length", "100")]), &mut world.env());
    assert_refused(&out, Code::Unavailable, "retry");
}
