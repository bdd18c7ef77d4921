//! The request-line readers: `distribution::route`, `is_ambiguous_write`, `form::Query::strict`
//! against a model of Go's `url.ParseQuery`, `form::unescape`, `location_stays`,
//! `registry_upload_state`, `content_range_start` against distribution's `parseContentRange`,
//! `range_matches`, and `rewrite_query`.
//!
//! Input: a mode byte, then the text(s) the mode reads, split at NUL bytes.
#![no_main]

use fuzz_support::{check, go_parse_content_range, go_parse_query, go_query_unescape, text};
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::distribution::form::{unescape, Query};
use ocicrypt_core::distribution::route::{
    content_range_start, is_ambiguous_write, is_repository_name, location_path, location_stays,
    range_matches, registry_upload_state, rewrite_query, route, upload_id_of_location, Route,
};

const METHODS: [&str; 8] = [
    "POST", "PUT", "PATCH", "DELETE", "GET", "HEAD", "OPTIONS", "put",
];
/// The keys the gateway and the registry act on.
const INTERPRETED: [&str; 5] = ["mount", "from", "digest", "_state", "_ocicrypt"];

fn parts(data: &[u8]) -> Vec<String> {
    data.split(|&b| b == 0).map(text).collect()
}

fn check_route(method: &str, path: &str) {
    let (path_only, _) = path.split_once('?').unwrap_or((path, ""));
    let ambiguous = is_ambiguous_write(method, path);
    let repository_of = |r: &Route| -> Option<String> {
        match r {
            Route::UploadStart { repository, .. }
            | Route::Upload { repository, .. }
            | Route::ManifestPut { repository, .. }
            | Route::BlobHead { repository, .. } => Some(repository.clone()),
            Route::Other => None,
        }
    };
    let routed = route(method, path);
    if let Some(repository) = repository_of(&routed) {
        check!(
            is_repository_name(&repository),
            "route({method}, {path:?}) named repository {repository:?}, not a repository name"
        );
        check!(
            path_only.starts_with(&format!("/v2/{repository}/")),
            "route({method}, {path:?}): repository {repository:?} is not the path's first part"
        );
    }
    match &routed {
        Route::Upload { id, repository, .. } => {
            check!(
                !id.is_empty() && !id.contains('/'),
                "route({method}, {path:?}) gave upload id {id:?}"
            );
            // The session a Location names is the one route() reads out of it.
            if !ambiguous && matches!(method, "PATCH" | "PUT" | "DELETE") {
                check!(
                    upload_id_of_location(path).as_deref() == Some(id.as_str()),
                    "upload_id_of_location({path:?}) disagrees with route()'s id {id:?}"
                );
                check!(
                    location_stays(path, "gateway.example", repository) || id == "." || id == "..",
                    "a canonical upload path {path:?} of {repository:?} does not stay in it"
                );
            }
        }
        Route::ManifestPut { reference, .. } => {
            check!(
                !reference.is_empty() && !reference.contains('/'),
                "route({method}, {path:?}) gave manifest reference {reference:?}"
            );
        }
        Route::BlobHead { digest, .. } => {
            check!(
                method == "HEAD" && digest.starts_with("sha256:") && !digest.contains('/'),
                "route({method}, {path:?}) gave blob digest {digest:?}"
            );
        }
        Route::UploadStart { .. } => {
            check!(
                method == "POST",
                "route({method}, {path:?}) started an upload"
            );
        }
        Route::Other => {}
    }
    let write = matches!(method, "POST" | "PUT" | "PATCH" | "DELETE");
    if ambiguous {
        check!(
            write,
            "is_ambiguous_write({method}, {path:?}) for a request that is not a write"
        );
    } else if write && path_only.starts_with('/') {
        // What passes is canonical, under /v2/ or not (the registry decodes `/v2%2F…`):
        // nothing a registry could decode or clean into another route.
        check!(
            !path_only.contains(['%', '\\', ';']) && !path_only.contains("//"),
            "is_ambiguous_write passed {path:?}"
        );
        let segments: Vec<&str> = path_only.split('/').collect();
        check!(
            !segments.iter().any(|s| *s == "." || *s == ".."),
            "is_ambiguous_write passed dot segments in {path:?}"
        );
    }
}

fn check_query(raw: &str) {
    let strict = Query::strict(raw, &INTERPRETED);
    let (go, go_error) = go_parse_query(raw.as_bytes());
    match strict {
        Ok(query) => {
            check!(
                !go_error,
                "Query::strict accepted {raw:?}, which Go reads with an error (dropped pairs)"
            );
            for (key, values) in &go {
                let key_text = String::from_utf8_lossy(key);
                if INTERPRETED.contains(&key_text.as_ref()) {
                    check!(
                        values.len() == 1,
                        "Query::strict accepted {raw:?} where Go sees {key_text:?} {} times",
                        values.len()
                    );
                }
                let first = values.first().map(|v| v.as_slice());
                check!(
                    query.get(&key_text).map(str::as_bytes) == first,
                    "Query::strict({raw:?}).get({key_text:?}) = {:?}, Go's first value {:?}",
                    query.get(&key_text),
                    first.map(String::from_utf8_lossy)
                );
            }
            for key in INTERPRETED {
                if !go.contains_key(key.as_bytes()) {
                    check!(
                        query.get(key).is_none(),
                        "Query::strict({raw:?}) found {key:?}, Go does not"
                    );
                }
                // The helper the adapter reads single parameters with agrees once strict
                // accepted the query.
                check!(
                    ocicrypt_core::distribution::route::query_param(raw, key).as_deref()
                        == query.get(key),
                    "query_param({raw:?}, {key:?}) disagrees with Query::strict"
                );
            }
        }
        Err(e) => {
            use ocicrypt_core::distribution::form::QueryError;
            match &e {
                QueryError::Semicolon => check!(raw.contains(';'), "Semicolon error for {raw:?}"),
                QueryError::EncodedKey(k) => {
                    check!(k.contains(['%', '+']), "EncodedKey error for key {k:?}")
                }
                QueryError::Repeated(k) => check!(
                    go.get(k.as_bytes()).is_some_and(|v| v.len() > 1),
                    "Repeated error for {k:?} in {raw:?} where Go sees it once"
                ),
                QueryError::BadEscape(_) => check!(go_error, "BadEscape for {raw:?} Go reads"),
                QueryError::NotUtf8(_) => {}
            }
        }
    }
}

fn check_unescape(s: &str) {
    let ours = unescape(s);
    check!(
        ours == go_query_unescape(s.as_bytes()),
        "form::unescape({s:?}) = {ours:?} differs from Go's QueryUnescape"
    );
    // Escaping every byte and unescaping gives the bytes back.
    let escaped: String = s.bytes().map(|b| format!("%{b:02X}")).collect();
    check!(
        unescape(&escaped).as_deref() == Some(s.as_bytes()),
        "unescape of the escaped {s:?} did not give it back"
    );
}

fn check_location(location: &str, authority: &str, repository: &str) {
    if !location_stays(location, authority, repository) {
        return;
    }
    let path = location_path(location);
    let Some(path) = path else {
        panic!("property broken: location_stays({location:?}) but it has no path");
    };
    check!(
        path.starts_with(&format!("/v2/{repository}/")),
        "location_stays({location:?}, {authority:?}, {repository:?}) but its path is {path:?}"
    );
    if !location.starts_with('/') {
        let host = location
            .split_once("://")
            .map(|(_, r)| r.split('/').next().unwrap_or(""))
            .unwrap_or("");
        check!(
            host.eq_ignore_ascii_case(authority),
            "location_stays({location:?}) on host {host:?}, not {authority:?}"
        );
    } else {
        check!(
            !location.starts_with("//"),
            "location_stays of a scheme-relative {location:?}"
        );
    }
    // A session URL that stays reads back as a session of that repository.
    if is_repository_name(repository) {
        let path_only = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
        let tail = path_only
            .strip_prefix(&format!("/v2/{repository}/"))
            .unwrap_or("");
        if tail.starts_with("blobs/uploads/") {
            if let Route::Upload { repository: r, .. } = route("PATCH", &path) {
                check!(
                    r == repository,
                    "Location {location:?} stays in {repository:?} but routes to {r:?}"
                );
            } else {
                panic!("property broken: session Location {location:?} does not route");
            }
        }
    }
}

fn check_ranges(value: &str, held: u64) {
    let ours = content_range_start(value);
    if let Some((start, end)) = go_parse_content_range(value) {
        if start >= 0 && start <= end {
            check!(
                ours == u64::try_from(start).ok(),
                "content_range_start({value:?}) = {ours:?}, distribution reads start {start}"
            );
        }
    }
    if range_matches(value, held) {
        let (start, end) = value.trim().split_once('-').unwrap_or(("", ""));
        let end: u64 = end.parse().unwrap_or(u64::MAX);
        check!(
            start == "0" && (end.checked_add(1) == Some(held) || (end == 0 && held <= 1)),
            "range_matches({value:?}, {held})"
        );
    }
    if held > 0 {
        check!(
            range_matches(&format!("0-{}", held - 1), held),
            "range_matches of distribution's own 0-{} for {held}",
            held - 1
        );
    }
}

fn check_rewrite_query(path: &str, drop_mask: u8, adds: &[String]) {
    const DROPPABLE: [&str; 5] = ["_ocicrypt", "mount", "from", "digest", "x"];
    let drop: Vec<&str> = DROPPABLE
        .iter()
        .enumerate()
        .filter(|(i, _)| drop_mask & (1 << i) != 0)
        .map(|(_, k)| *k)
        .collect();
    let add: Vec<(&str, &str)> = adds
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] if !k.contains(['&', '?', '=']) && !v.contains(['&', '?']) => {
                Some((k.as_str(), v.as_str()))
            }
            _ => None,
        })
        .collect();
    let out = rewrite_query(path, &drop, &add);
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let (out_path, out_query) = out.split_once('?').unwrap_or((out.as_str(), ""));
    check!(
        out_path == path_only,
        "rewrite_query changed the path {path_only:?} to {out_path:?}"
    );
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_string();
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !drop.contains(&key(kv).as_str()))
        .collect();
    let mut expected: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
    expected.extend(add.iter().map(|(k, v)| format!("{k}={v}")));
    let got: Vec<String> = out_query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(str::to_string)
        .collect();
    // Every dropped key is gone, the rest is kept in order, additions at the end.
    let expected_nonempty: Vec<String> = expected.into_iter().filter(|s| !s.is_empty()).collect();
    check!(
        got == expected_nonempty,
        "rewrite_query({path:?}, drop {drop:?}, add {add:?}) = {out:?}"
    );
    for pair in &got[..kept.len().min(got.len())] {
        check!(
            !drop.contains(&key(pair).as_str()),
            "rewrite_query kept dropped pair {pair:?}"
        );
    }
    check!(
        got.is_empty() != out.contains('?') || path_only.contains('?'),
        "rewrite_query made an empty query {out:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let p = parts(rest);
    let get = |i: usize| p.get(i).map(String::as_str).unwrap_or("");
    match mode % 7 {
        0 => {
            let method = METHODS[usize::from(mode / 7) % METHODS.len()];
            check_route(method, get(0));
        }
        1 => check_query(get(0)),
        2 => check_unescape(get(0)),
        3 => check_location(get(0), get(1), get(2)),
        4 => {
            let state = registry_upload_state(get(0));
            if let Some(s) = state {
                check!(
                    i64::try_from(s.offset).is_ok(),
                    "registry_upload_state offset {} beyond Go's int64",
                    s.offset
                );
            }
        }
        5 => {
            let held = get(1)
                .bytes()
                .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
            let held = if mode & 0x80 != 0 { held % 4 } else { held };
            check_ranges(get(0), held);
        }
        _ => {
            let adds: Vec<String> = p.iter().skip(1).cloned().collect();
            check_rewrite_query(get(0), mode / 7, &adds);
        }
    }
});
