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

/// True for a write (`POST`, `PUT`, `PATCH`) under `/v2/` whose path is not in canonical form:
/// percent-escapes, empty or dot segments, backslashes. Another parser (the registry's) could
/// read a repository name out of it that [`route`] did not, so the gateway refuses it.
pub fn is_ambiguous_write(method: &str, path: &str) -> bool {
    if !matches!(method, "POST" | "PUT" | "PATCH") {
        return false;
    }
    let path_only = path.split_once('?').map_or(path, |(p, _)| p);
    if !path_only.starts_with("/v2/") {
        return false;
    }
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

/// Percent-decodes a query component (`+` is a space only in forms; registries never use it).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Value of the first `name=` parameter, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
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
}
