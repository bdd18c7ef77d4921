//! The registry's tags list answer as the gateway shows it: `tags_list::shown`. The registry is
//! not trusted with the gateway's promises (DESIGN's threat model), and a page it answers is
//! parsed by hand, without a document tree.
//!
//! Modes (first byte):
//! - 0: the rest as the registry's answer, any bytes: an answer taken is a JSON object; one
//!   shown changed holds no reserved tag and as many tags as counted kept; one shown unchanged
//!   had none to remove.
//! - 1: an answer built from the rest (tags cut at NUL bytes, every third one made reserved
//!   in one of the spellings the registry may hold: any case, percent-encoded; a `name`
//!   member, a member after the tags): it is always taken, and shows exactly the user's tags, in
//!   their order, with every other member as it was.
#![no_main]

use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::distribution::ledger::is_reserved_tag;
use ocicrypt_core::distribution::tags_list::shown;
use serde_json::value::RawValue;
use serde_json::{json, Value};

const SPELLINGS: [&str; 3] = ["ocicrypt.sha256-", "OciCrypt.Sha256-", "%6Fcicrypt.sha256-"];

fn tags_of(doc: &Value) -> Option<Vec<&str>> {
    match doc.get("tags")? {
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

/// JSON by the parser's own syntax check (no document tree), and an object.
fn is_json_object(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Box<RawValue>>(bytes)
        .is_ok_and(|raw| raw.get().trim_start().starts_with('{'))
}

fn any_answer(body: &[u8]) {
    let Ok(page) = shown(body) else {
        return;
    };
    check!(
        is_json_object(body),
        "an answer that is no JSON object was taken: {:?}",
        String::from_utf8_lossy(body)
    );
    match &page.body {
        None => check!(page.removed == 0, "reserved tags removed but the answer left as it was"),
        Some(out) => {
            check!(page.removed > 0, "the answer changed with no reserved tag removed");
            check!(is_json_object(out), "the answer shown is no JSON object");
            // Members other than the tags are copied as written (a lone surrogate escape in
            // them included, which a document tree refuses); with one `tags` member what is
            // shown is what was counted.
            let shown_doc: Option<Value> = serde_json::from_slice(out).ok();
            if let Some(tags) = shown_doc.as_ref().and_then(tags_of) {
                check!(
                    tags.iter().all(|t| !is_reserved_tag(t)),
                    "a reserved tag shown: {tags:?}"
                );
                if body.windows(6).filter(|w| w == b"\"tags\"").count() == 1 {
                    check!(tags.len() == page.kept, "{} tags shown, {} counted", tags.len(), page.kept);
                }
            }
        }
    }
}

fn built_answer(rest: &[u8]) {
    let mut all = Vec::new();
    let mut user = Vec::new();
    for (i, piece) in rest.split(|b| *b == 0).enumerate() {
        let text = String::from_utf8_lossy(piece).into_owned();
        if i % 3 == 2 {
            let spelling = SPELLINGS[(i / 3) % SPELLINGS.len()];
            all.push(format!("{spelling}{text}"));
        } else if is_reserved_tag(&text) {
            all.push(text);
        } else {
            user.push(text.clone());
            all.push(text);
        }
    }
    let body = serde_json::to_vec(&json!({"name": "demo/app", "tags": all, "after": [1, {"x": null}]}))
        .unwrap_or_default();
    let page = match shown(&body) {
        Ok(p) => p,
        Err(e) => panic!("property broken: a well-formed answer refused: {e}"),
    };
    check!(page.kept == user.len(), "kept {} of {} user tags", page.kept, user.len());
    check!(page.kept + page.removed == all.len(), "tags lost from the count");
    let out = page.body.unwrap_or_else(|| body.clone());
    let doc: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!("property broken: the answer shown is not JSON: {e}"),
    };
    let expected = json!({"name": "demo/app", "tags": user, "after": [1, {"x": null}]});
    check!(doc == expected, "shown {doc} for {expected}");
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => any_answer(rest),
        Some((1, rest)) => built_answer(rest),
        _ => {}
    }
});
