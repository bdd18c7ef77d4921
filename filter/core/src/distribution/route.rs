//! The parts of the OCI distribution API the gateway acts on: which request is this, and how
//! to rewrite its request line.

/// What a request is, as far as the gateway cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `POST /v2/<name>/blobs/uploads/` (session start, single-POST upload or mount).
    UploadStart {
        /// Repository name.
        repository: String,
        /// `digest=` of a single-POST monolithic upload.
        digest: Option<String>,
        /// `mount=` of a cross-repository mount.
        mount: Option<String>,
    },
    /// `PATCH`, `PUT` or `DELETE` of `/v2/<name>/blobs/uploads/<id>`.
    Upload {
        /// Request method.
        method: UploadMethod,
        /// Repository name.
        repository: String,
        /// Upload session id (distribution's UUID).
        id: String,
        /// `digest=` of a finishing `PUT`.
        digest: Option<String>,
    },
    /// `PUT /v2/<name>/manifests/<reference>`.
    ManifestPut {
        /// Repository name.
        repository: String,
        /// Tag or digest.
        reference: String,
    },
    /// `HEAD /v2/<name>/blobs/<digest>`: does the registry have this blob?
    BlobHead {
        /// Repository name.
        repository: String,
        /// The digest asked about.
        digest: String,
    },
    /// Anything else (reads, catalog, `/v2/` ping, deletes): forwarded untouched.
    Other,
}

/// Methods on an upload session URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadMethod {
    /// Append a chunk.
    Patch,
    /// Finish (optionally with a last chunk).
    Put,
    /// Cancel.
    Delete,
    /// Status.
    Get,
}

/// Classifies a request from its method and `:path`.
pub fn route(method: &str, path: &str) -> Route {
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path, ""),
    };
    let Some(rest) = path_only.strip_prefix("/v2/") else {
        return Route::Other;
    };
    if let Some((repository, tail)) = rsplit_marker(rest, "/blobs/uploads") {
        let id = tail.trim_start_matches('/');
        if id.is_empty() {
            if method == "POST" {
                return Route::UploadStart {
                    repository,
                    digest: query_param(query, "digest"),
                    mount: query_param(query, "mount"),
                };
            }
            return Route::Other;
        }
        if id.contains('/') {
            return Route::Other;
        }
        let method = match method {
            "PATCH" => UploadMethod::Patch,
            "PUT" => UploadMethod::Put,
            "DELETE" => UploadMethod::Delete,
            "GET" | "HEAD" => UploadMethod::Get,
            _ => return Route::Other,
        };
        return Route::Upload {
            method,
            repository,
            id: id.to_string(),
            digest: query_param(query, "digest"),
        };
    }
    if method == "HEAD" {
        if let Some((repository, tail)) = rsplit_marker(rest, "/blobs/") {
            if tail.starts_with("sha256:") && !tail.contains('/') {
                return Route::BlobHead {
                    repository,
                    digest: tail.to_string(),
                };
            }
        }
    }
    if method == "PUT" {
        if let Some((repository, tail)) = rsplit_marker(rest, "/manifests/") {
            if !tail.is_empty() && !tail.contains('/') {
                return Route::ManifestPut {
                    repository,
                    reference: tail.to_string(),
                };
            }
        }
    }
    Route::Other
}

/// True for a write (`POST`, `PUT`, `PATCH`, `DELETE`) under `/v2/` whose path is not in canonical form:
/// percent-escapes, empty or dot segments, backslashes. Another parser (the registry's) could
/// read a repository name out of it that [`route`] did not, so the gateway refuses it.
pub fn is_ambiguous_write(method: &str, path: &str) -> bool {
    if !matches!(method, "POST" | "PUT" | "PATCH" | "DELETE") {
        return false;
    }
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
    // Any write path, not only those starting with "/v2/": the registry decodes `/v2%2Fdemo/…`
    // into a `/v2/demo/…` route the gateway would not have seen.
    path_only.contains('%')
        || path_only.contains('\\')
        || path_only.contains(';')
        || path_only.get(1..).is_some_and(|p| {
            p.split('/').enumerate().any(|(i, seg)| {
                (seg.is_empty() && i + 1 < p.split('/').count()) || seg == "." || seg == ".."
            })
        })
}

/// Splits `<name><marker><tail>` at the last marker, checking `<name>` is a repository name.
fn rsplit_marker(rest: &str, marker: &str) -> Option<(String, String)> {
    let idx = rest.rfind(marker)?;
    let repository = rest.get(..idx)?;
    let tail = rest.get(idx + marker.len()..)?;
    let boundary = marker.ends_with('/') || tail.is_empty() || tail.starts_with('/');
    if boundary && is_repository_name(repository) {
        return Some((repository.to_string(), tail.to_string()));
    }
    None
}

/// The repository of `GET /v2/<name>/tags/list` (with or without a query).
pub fn tags_list_repository(path: &str) -> Option<String> {
    let name = path
        .split('?')
        .next()?
        .strip_prefix("/v2/")?
        .strip_suffix("/tags/list")?;
    is_repository_name(name).then(|| name.to_string())
}

/// Distribution's repository name grammar, loosely: lowercase path components.
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

/// Value of the first `name=` parameter, with key and value decoded as Go's `url.ParseQuery`
/// decodes them (pairs Go would drop — a bad escape, a `;` — are skipped, as Go skips them).
/// The gateway acts on a query only after [`crate::distribution::form::Query::strict`] accepted it.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        if kv.contains(';') {
            return None;
        }
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = crate::distribution::form::unescape(k)?;
        if k != name.as_bytes() {
            return None;
        }
        String::from_utf8(crate::distribution::form::unescape(v)?).ok()
    })
}

/// What distribution's `_state` parameter says of an upload (base64url of an HMAC-SHA256 and
/// the JSON of its `blobUploadState`). The HMAC is the registry's to check: a registry that
/// accepts the request has checked it, so the offset read here is the one it will write at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryUploadState {
    /// Repository the session was opened in (`Name`).
    pub name: String,
    /// Session id (`UUID`).
    pub uuid: String,
    /// Bytes the registry holds for the session (`Offset`): where the next byte goes.
    pub offset: u64,
}

/// Reads distribution's `_state` token; `None` when it is not one.
pub fn registry_upload_state(token: &str) -> Option<RegistryUploadState> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct State {
        name: String,
        #[serde(rename = "UUID")]
        uuid: String,
        offset: i64,
    }
    // Go's base64.URLEncoding pads; accept both forms, the bytes are what matter.
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token))
        .ok()?;
    let json = bytes.get(32..)?;
    let state: State = serde_json::from_slice(json).ok()?;
    Some(RegistryUploadState {
        name: state.name,
        uuid: state.uuid,
        offset: u64::try_from(state.offset).ok()?,
    })
}

/// The registry's `Range` answer to an upload request (`0-<last byte>`, `0-0` when empty) as
/// the number of bytes it holds, given that `0-0` is ambiguous between 0 and 1 byte: `None`
/// when the value is not of that form.
pub fn range_end(value: &str) -> Option<u64> {
    let (start, end) = value.trim().split_once('-')?;
    if start != "0" {
        return None;
    }
    end.parse().ok()
}

/// Whether `held` bytes agree with a registry `Range` of `0-<end>` (distribution writes `0-0`
/// for an empty session).
pub fn range_matches(range: &str, held: u64) -> bool {
    match range_end(range) {
        Some(0) => held <= 1,
        Some(end) => end.checked_add(1) == Some(held),
        None => false,
    }
}

/// Where a `Location` the registry answered points, for a request in `repository` received
/// with `authority`: it must stay on the gateway (a relative URL, or this authority) and in the
/// same repository (an upload session, a blob or a manifest of it). The registry is not trusted
/// with plaintext: a session it opened elsewhere would take the next chunk there.
pub fn location_stays(location: &str, authority: &str, repository: &str) -> bool {
    let path = if location.starts_with('/') {
        if location.starts_with("//") {
            return false;
        }
        location
    } else {
        let Some((scheme, rest)) = location.split_once("://") else {
            return false;
        };
        if !matches!(scheme, "http" | "https") {
            return false;
        }
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !host.eq_ignore_ascii_case(authority) || path.is_empty() {
            return false;
        }
        path
    };
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
    if path_only.contains('%') || path_only.contains('\\') || path_only.contains(';') {
        return false;
    }
    let Some(tail) = path_only
        .strip_prefix("/v2/")
        .and_then(|p| p.strip_prefix(repository))
        .and_then(|p| p.strip_prefix('/'))
    else {
        return false;
    };
    let one_segment = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    if let Some(id) = tail.strip_prefix("blobs/uploads/") {
        return one_segment(id);
    }
    if let Some(d) = tail.strip_prefix("blobs/") {
        return one_segment(d) && d != "uploads";
    }
    tail.strip_prefix("manifests/").is_some_and(one_segment)
}

/// Rewrites the query of `path`: drops the parameters named in `drop` and appends `add`.
/// Other parameters (distribution's `_state`) are kept byte for byte.
pub fn rewrite_query(path: &str, drop: &[&str], add: &[(&str, &str)]) -> String {
    let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
    let mut params: Vec<String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .filter(|kv| {
            let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
            !drop.contains(&k)
        })
        .map(str::to_string)
        .collect();
    for (k, v) in add {
        params.push(format!("{k}={v}"));
    }
    if params.is_empty() {
        path_only.to_string()
    } else {
        format!("{path_only}?{}", params.join("&"))
    }
}

/// Path (with query) of a `Location` header: distribution answers absolute URLs, and the
/// gateway must send its callouts through its own cluster, so scheme and host are dropped.
pub fn location_path(location: &str) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_string());
    }
    let after_scheme = location.split_once("://").map(|(_, r)| r)?;
    let slash = after_scheme.find('/')?;
    after_scheme.get(slash..).map(str::to_string)
}

/// Upload session id in a `Location` path (`/v2/<name>/blobs/uploads/<id>?…`).
pub fn upload_id_of_location(location: &str) -> Option<String> {
    let path = location_path(location)?;
    match route("PATCH", &path) {
        Route::Upload { id, .. } => Some(id),
        _ => None,
    }
}

/// Start offset of a `Content-Range: <start>-<end>` header (distribution's form, no unit).
pub fn content_range_start(value: &str) -> Option<u64> {
    let v = value.trim();
    let v = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("bytes="))
        .unwrap_or(v);
    v.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(
                "POST",
                "/v2/demo/app/blobs/uploads/?mount=sha256%3Aab&from=plain/x"
            ),
            Route::UploadStart {
                repository: "demo/app".into(),
                digest: None,
                mount: Some("sha256:ab".into())
            }
        );
        assert_eq!(
            route(
                "PUT",
                "/v2/demo/a/b/blobs/uploads/1234-ab?_state=xyz&digest=sha256%3Aab"
            ),
            Route::Upload {
                method: UploadMethod::Put,
                repository: "demo/a/b".into(),
                id: "1234-ab".into(),
                digest: Some("sha256:ab".into())
            }
        );
        assert_eq!(
            route("PUT", "/v2/demo/app/manifests/latest"),
            Route::ManifestPut {
                repository: "demo/app".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(route("GET", "/v2/demo/app/manifests/latest"), Route::Other);
        assert_eq!(
            route("HEAD", "/v2/demo/app/blobs/sha256:00"),
            Route::BlobHead {
                repository: "demo/app".into(),
                digest: "sha256:00".into()
            }
        );
        assert_eq!(route("GET", "/v2/demo/app/blobs/sha256:00"), Route::Other);
        assert_eq!(route("GET", "/v2/"), Route::Other);
        assert_eq!(route("POST", "/v2/DEMO/app/blobs/uploads/"), Route::Other);
        // a repository may itself be called "blobs"
        assert!(
            matches!(route("PATCH", "/v2/demo/blobs/blobs/uploads/u1"), Route::Upload { repository, .. } if repository == "demo/blobs")
        );
    }

    #[test]
    fn non_canonical_writes_are_flagged() {
        assert!(is_ambiguous_write("POST", "/v2/demo%2Fapp/blobs/uploads/"));
        assert!(is_ambiguous_write("PUT", "/v2/demo//app/manifests/v1"));
        assert!(is_ambiguous_write(
            "PATCH",
            "/v2/x/../demo/app/blobs/uploads/u"
        ));
        assert!(!is_ambiguous_write("GET", "/v2/demo%2Fapp/tags/list"));
        // Found by the gateway fuzzer: an encoded slash right after /v2.
        assert!(is_ambiguous_write("POST", "/v2%2Fdemo/app/blobs/uploads/"));
        assert!(is_ambiguous_write(
            "PATCH",
            "/v2%2fdemo/app/blobs/uploads/u"
        ));
        assert!(is_ambiguous_write("PUT", "//v2/demo/app/manifests/v1"));
        assert!(!is_ambiguous_write("POST", "/v2/demo/app/blobs/uploads/"));
        assert!(!is_ambiguous_write(
            "PUT",
            "/v2/demo/app/blobs/uploads/u?digest=sha256%3Aab"
        ));
    }

    #[test]
    fn query_rewrites_keep_state() {
        let p = "/v2/demo/app/blobs/uploads/u?_state=a%2Bb%3D&digest=sha256%3Aab";
        assert_eq!(
            rewrite_query(p, &["digest"], &[("digest", "sha256:cd")]),
            "/v2/demo/app/blobs/uploads/u?_state=a%2Bb%3D&digest=sha256:cd"
        );
        assert_eq!(
            rewrite_query(
                "/v2/x/blobs/uploads/?mount=a&from=b",
                &["mount", "from"],
                &[]
            ),
            "/v2/x/blobs/uploads/"
        );
    }

    #[test]
    fn locations() {
        assert_eq!(
            location_path("http://127.0.0.1:5000/v2/x/blobs/uploads/u?_state=s").as_deref(),
            Some("/v2/x/blobs/uploads/u?_state=s")
        );
        assert_eq!(
            location_path("/v2/x/blobs/uploads/u").as_deref(),
            Some("/v2/x/blobs/uploads/u")
        );
        assert_eq!(
            upload_id_of_location("https://h/v2/x/y/blobs/uploads/u-1?_state=s").as_deref(),
            Some("u-1")
        );
        assert_eq!(content_range_start("100-199"), Some(100));
        assert_eq!(content_range_start("bytes 0-15"), Some(0));
    }

    #[test]
    fn query_params_decode_like_go() {
        assert_eq!(
            query_param("mo%75nt=sha256%3Aab", "mount").as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(
            query_param("a=1&digest=x+y", "digest").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param("mount=a;from=b", "mount"), None);
        assert_eq!(
            query_param("mount=%zz&mount=b", "mount").as_deref(),
            Some("b")
        );
    }

    fn state_token(name: &str, uuid: &str, offset: i64) -> String {
        use base64::Engine as _;
        let mut bytes = vec![7u8; 32];
        bytes.extend_from_slice(
            format!(
                r#"{{"Name":"{name}","UUID":"{uuid}","Offset":{offset},"StartedAt":"2026-12-07T00:00:00Z"}}"#
            )
            .as_bytes(),
        );
        base64::engine::general_purpose::URL_SAFE.encode(bytes)
    }

    #[test]
    fn registry_state_is_read() {
        let t = state_token("demo/app", "u-1", 4096);
        assert_eq!(
            registry_upload_state(&t),
            Some(RegistryUploadState {
                name: "demo/app".into(),
                uuid: "u-1".into(),
                offset: 4096
            })
        );
        assert_eq!(registry_upload_state(&state_token("a", "b", -1)), None);
        assert_eq!(registry_upload_state("bm90IGEgc3RhdGU="), None);
        assert_eq!(registry_upload_state("!!"), None);
    }

    #[test]
    fn ranges() {
        assert!(range_matches("0-0", 0));
        assert!(range_matches("0-0", 1));
        assert!(range_matches("0-1023", 1024));
        assert!(!range_matches("0-1023", 2048));
        assert!(!range_matches("5-1023", 1019));
        assert!(!range_matches("junk", 0));
        assert!(!range_matches("0-18446744073709551615", 0));
    }

    #[test]
    fn locations_must_stay_in_the_repository() {
        let ok = [
            "/v2/demo/app/blobs/uploads/u-1?_state=s",
            "http://gw:5000/v2/demo/app/blobs/uploads/u-1?_state=s",
            "https://GW:5000/v2/demo/app/blobs/sha256:ab",
            "/v2/demo/app/manifests/sha256:ab",
        ];
        for l in ok {
            assert!(location_stays(l, "gw:5000", "demo/app"), "{l}");
        }
        let bad = [
            "/v2/plain/app/blobs/uploads/u-1?_state=s",
            "/v2/demo/app2/blobs/uploads/u-1",
            "/v2/demo/app/x/blobs/uploads/u-1",
            "/v2/demo/app/blobs/uploads/u-1/../../../plain/x",
            "/v2/demo/app/blobs/uploads/",
            "http://elsewhere:5000/v2/demo/app/blobs/uploads/u-1",
            "//elsewhere/v2/demo/app/blobs/uploads/u-1",
            "ftp://gw:5000/v2/demo/app/blobs/uploads/u-1",
            "http://gw:5000",
            "/v2/demo%2Fapp/blobs/uploads/u",
            "/v2/demo/app/tags/list",
            "v2/demo/app/blobs/uploads/u",
        ];
        for l in bad {
            assert!(!location_stays(l, "gw:5000", "demo/app"), "{l}");
        }
    }
}
