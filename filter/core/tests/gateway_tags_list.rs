//! `GET /v2/<name>/tags/list` through the gateway shows a user of an encrypted repository only
//! the tags clients pushed (issue 19): the gateway's reserved `ocicrypt.…` tags are left out,
//! every other member of the answer kept, pagination (`n`, `last`, `Link`) left to the
//! registry (a page of reserved tags only is skipped for the next), the list read by callout
//! with the client's credentials within `limits.max_manifest_bytes`.
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
use ocicrypt_core::distribution::ledger::ledger_tag;
use ocicrypt_core::distribution::tags_list::without_reserved;
use ocicrypt_core::error::Code;
use ocicrypt_core::gateway::{Callout, CalloutAnswer, Command, Stream, MAX_SKIPPED_PAGES};

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

/// The query parameter `name` of a path, as the fake registry reads it.
fn param(path: &str, name: &str) -> Option<String> {
    path.split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map(str::to_string)
}

#[test]
fn a_client_following_link_sees_every_user_tag_once_and_no_empty_page() {
    // Reserved tags sort between and after the user's (`o` > `l`, `v` > `o`), in runs longer
    // than a page: some of the registry's pages hold reserved tags only.
    let mut all: Vec<String> = (0..40u8).map(reserved).collect();
    let user: Vec<String> = ["a1", "latest", "p2", "v1", "v2", "v3", "zz"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    all.extend(user.iter().cloned());
    all.sort();
    for n in 1..=9 {
        let mut seen = Vec::new();
        let mut path = format!("/v2/demo/app/tags/list?n={n}");
        let mut answers = 0;
        loop {
            answers += 1;
            assert!(answers <= all.len() + 1, "n={n}: the client never stops");
            // The client's request, through the gateway, whose reads the registry pages.
            let mut world = World::new();
            let (mut stream, mut out) = world.send(&req("GET", &path));
            let (body, link) = loop {
                match out.as_slice() {
                    [Command::Dispatch(read), Command::Pause] => {
                        let p = path_of(read).to_string();
                        let (body, next) = registry_page(&all, n, param(&p, "last").as_deref());
                        let link = next.map(|l| {
                            format!("</v2/demo/app/tags/list?last={l}&n={n}>; rel=\"next\"")
                        });
                        let headers: Vec<(&str, &str)> =
                            link.iter().map(|l| ("link", l.as_str())).collect();
                        let answer = CalloutAnswer::new(200, &headers, &body);
                        out = stream.on_callout(read.id, &answer, &mut world.env());
                    }
                    [Command::Respond { body, headers, .. }, Command::Pause] => {
                        let link = headers
                            .iter()
                            .find(|(k, _)| k == "link")
                            .map(|(_, v)| v.clone());
                        break (body.clone(), link);
                    }
                    other => panic!("n={n}: {other:?}"),
                }
            };
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let tags = doc["tags"].as_array().unwrap();
            // 40 reserved tags in a run: within the skipping bound when n is 3 or more; below,
            // an empty page may be shown (each skip is a registry read), never a tag lost.
            if 40 / n < MAX_SKIPPED_PAGES as usize {
                assert!(
                    !tags.is_empty() || link.is_none(),
                    "n={n}: an empty page while more tags follow"
                );
            }
            assert!(tags.len() <= n, "n={n}: more than n tags");
            seen.extend(tags.iter().map(|t| t.as_str().unwrap().to_string()));
            match link {
                Some(l) => {
                    path = l
                        .trim_start_matches('<')
                        .split('>')
                        .next()
                        .unwrap()
                        .to_string()
                }
                None => break,
            }
        }
        assert_eq!(seen, user, "n={n}");
    }
}

fn tags_request() -> Req {
    req("GET", "/v2/demo/app/tags/list?n=100").header("authorization", b"Bearer t0ken")
}

/// A stream whose tags list request waits for the gateway's read, and that read.
fn requested(world: &mut World) -> (Stream, Callout) {
    let (stream, out) = world.send(&tags_request());
    let [Command::Dispatch(callout), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    (stream, callout.clone())
}

fn path_of(callout: &Callout) -> &str {
    &callout
        .headers
        .iter()
        .find(|(k, _)| k == ":path")
        .unwrap()
        .1
}

fn page(status: u16, headers: &[(&str, &str)], body: &str) -> CalloutAnswer {
    CalloutAnswer::new(status, headers, body.as_bytes())
}

#[test]
fn the_gateway_reads_the_list_and_answers_without_reserved_tags() {
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    // The client's query and credentials, nothing of the gateway's own.
    assert_eq!(path_of(&read), "/v2/demo/app/tags/list?n=100");
    assert!(read
        .headers
        .contains(&("authorization".to_string(), "Bearer t0ken".to_string())));
    assert!(!read.headers.iter().any(|(k, _)| k == "accept-encoding"));
    let body = format!(r#"{{"name":"demo/app","tags":["{}","v1"]}}"#, reserved(1));
    let link = "</v2/demo/app/tags/list?last=v1&n=2>; rel=\"next\"";
    let out = stream.on_callout(
        read.id,
        &page(
            200,
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("link", link),
            ],
            &body,
        ),
        &mut world.env(),
    );
    assert_eq!(
        out,
        [
            Command::Respond {
                status: 200,
                headers: vec![
                    (
                        "content-type".into(),
                        "application/json; charset=utf-8".into()
                    ),
                    ("link".into(), link.into())
                ],
                body: br#"{"name":"demo/app","tags":["v1"]}"#.to_vec(),
            },
            Command::Pause
        ]
    );
    assert!(world.keys.asked.is_empty(), "no key is needed to list tags");
}

#[test]
fn a_page_of_reserved_tags_only_is_skipped_for_the_next() {
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    let only_reserved = format!(r#"{{"name":"demo/app","tags":["{}"]}}"#, reserved(1));
    let next = "/v2/demo/app/tags/list?last=ocicrypt.x&n=1";
    let out = stream.on_callout(
        read.id,
        &page(
            200,
            &[("link", &format!("<{next}>; rel=\"next\""))],
            &only_reserved,
        ),
        &mut world.env(),
    );
    let [Command::Dispatch(second), Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(path_of(second), next);
    let out = stream.on_callout(
        second.id,
        &page(200, &[], r#"{"name":"demo/app","tags":["v2"]}"#),
        &mut world.env(),
    );
    let [Command::Respond { body, headers, .. }, Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(body, br#"{"name":"demo/app","tags":["v2"]}"#);
    assert!(
        !headers.iter().any(|(k, _)| k == "link"),
        "the last page has no Link"
    );

    // A Link elsewhere is not followed: the empty page is shown, with the registry's Link.
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    let elsewhere = "</v2/demo/other/tags/list?last=x>; rel=\"next\"";
    let out = stream.on_callout(
        read.id,
        &page(200, &[("link", elsewhere)], &only_reserved),
        &mut world.env(),
    );
    let [Command::Respond { body, .. }, Command::Pause] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(body, br#"{"name":"demo/app","tags":[]}"#);

    // Skipping is bounded: after MAX_SKIPPED_PAGES reads the empty page is shown.
    let mut world = World::new();
    let (mut stream, mut read) = requested(&mut world);
    let link = format!("<{next}>; rel=\"next\"");
    for _ in 0..MAX_SKIPPED_PAGES {
        let out = stream.on_callout(
            read.id,
            &page(200, &[("link", &link)], &only_reserved),
            &mut world.env(),
        );
        let [Command::Dispatch(again), Command::Pause] = out.as_slice() else {
            panic!("{out:?}")
        };
        read = again.clone();
    }
    let out = stream.on_callout(
        read.id,
        &page(200, &[("link", &link)], &only_reserved),
        &mut world.env(),
    );
    assert!(
        matches!(out.as_slice(), [Command::Respond { .. }, Command::Pause]),
        "{out:?}"
    );
}

#[test]
fn answers_the_gateway_does_not_show_go_to_the_client_from_the_registry() {
    for (name, answer) in [
        (
            "a 401",
            page(401, &[("www-authenticate", "Bearer realm=x")], "{}"),
        ),
        ("a 404", page(404, &[], "{}")),
        (
            "an encoded body",
            page(200, &[("content-encoding", "gzip")], "\u{1f}"),
        ),
        ("not a tags list", page(200, &[], "<html>oops</html>")),
    ] {
        let mut world = World::new();
        let (mut stream, read) = requested(&mut world);
        let out = stream.on_callout(read.id, &answer, &mut world.env());
        // The client's own request goes on: the registry answers it.
        assert_eq!(out.last(), Some(&Command::Continue), "{name}: {out:?}");
        assert!(
            !out.iter()
                .any(|c| matches!(c, Command::Respond { .. } | Command::Reply(_))),
            "{name}"
        );
    }
    // A read that failed (no answer) is refused, as every registry callout.
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    let out = stream.on_callout(read.id, &CalloutAnswer::default(), &mut world.env());
    assert_refused(&out, Code::Unavailable, "could not reach the registry");
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    assert_refused(
        &stream.on_dispatch_failed(read.id, &mut world.env()),
        Code::Unavailable,
        "could not reach the registry",
    );
}

#[test]
fn only_reads_of_encrypted_repositories_are_read_by_the_gateway() {
    for (method, path) in [
        ("GET", "/v2/plain/app/tags/list"),
        ("HEAD", "/v2/demo/app/tags/list"),
        ("GET", "/v2/demo/app/tags/list/extra"),
        ("GET", "/v2/demo/app/tags"),
        ("GET", "/v2/Demo/app/tags/list"),
    ] {
        let mut world = World::new();
        let (_, out) = world.send(&req(method, path));
        assert_eq!(out, [Command::Continue], "{method} {path}");
    }
    // Credentials the gateway cannot carry (not UTF-8): the registry answers the read itself.
    let mut world = World::new();
    let (_, out) =
        world.send(&req("GET", "/v2/demo/app/tags/list").header("authorization", b"\xff"));
    assert_eq!(out, [Command::Continue]);
}

#[test]
fn an_answer_over_the_limit_is_refused_never_shown_with_reserved_tags() {
    // 4096 bytes in the test configuration.
    let mut world = World::new();
    let (mut stream, read) = requested(&mut world);
    let big = format!(r#"{{"name":"demo/app","tags":["{}"]}}"#, "x".repeat(4096));
    let out = stream.on_callout(read.id, &page(200, &[], &big), &mut world.env());
    assert_refused(&out, Code::BadGateway, "limits.max_manifest_bytes");
}
