//! The registry's distribution API, spoken directly (never through the gateway: the gateway
//! would encrypt the re-encrypted blobs again and refuse `+encrypted` layers it did not write).
//!
//! Basic auth, and the bearer-token flow registries such as Harbor use (a `401` with
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…`: the token is asked of the realm with
//! the basic credentials and kept per scope).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ureq::http::{Response, StatusCode};
use ureq::{Agent, Body, SendBody};

/// Largest manifest, tag list or catalog page read (the gateway's own manifest limit is 4 MiB).
pub const MAX_DOCUMENT: u64 = 8 * 1024 * 1024;

/// Accept header for manifest reads: every manifest and index type the gateway stores or
/// passes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// An agent that follows no redirect by itself for writes, keeps statuses as answers (the
/// caller reads them), and trusts `ca` (PEM) when given, the system roots otherwise.
pub fn agent(ca: Option<&[u8]>, redirects: u32) -> Result<Agent, String> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(pem) = ca {
        let certs = ureq::tls::parse_pem(pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CA file: {e}"))?;
        if certs.is_empty() {
            return Err("CA file holds no certificate".to_owned());
        }
        tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
    }
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(300)))
        .tls_config(tls.build())
        .build();
    Ok(Agent::new_with_config(config))
}

/// Credentials for the registry.
#[derive(Clone, Default)]
pub struct Credentials {
    /// `user:password` for basic auth and for asking a token service.
    pub basic: Option<(String, String)>,
}

/// A bearer challenge: where to ask for a token, for which service and scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Token endpoint.
    pub realm: String,
    /// `service` parameter, when given.
    pub service: Option<String>,
    /// `scope` parameter, when given.
    pub scope: Option<String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"`; `None` for any other scheme.
pub fn parse_bearer_challenge(header: &str) -> Option<Challenge> {
    let rest = header.trim();
    let (scheme, params) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    // Values are quoted strings; a scope may hold commas ("pull,push"), so split on the
    // quotes, not on the commas.
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let name = name.trim().trim_start_matches(',').trim();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (quoted.get(..end)?, quoted.get(end + 1..)?)
        } else {
            match after.find(',') {
                Some(end) => (after.get(..end)?, after.get(end..)?),
                None => (after, ""),
            }
        };
        match name.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            "scope" => scope = Some(value.to_owned()),
            _ => {}
        }
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: realm?,
        service,
        scope,
    })
}

/// The registry at `base` (`http(s)://host[:port]`).
pub struct Registry {
    agent: Agent,
    base: String,
    creds: Credentials,
    /// Bearer tokens by the scope they were issued for ("" when the challenge named none).
    tokens: HashMap<String, String>,
    /// The token to send to each repository once one was needed.
    repo_tokens: HashMap<String, String>,
}

/// A manifest as read: its bytes, media type and digest (of the bytes).
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Exact bytes.
    pub body: Vec<u8>,
    /// `Content-Type` as answered, or the body's `mediaType`.
    pub media_type: String,
    /// `sha256:<hex>` of `body`.
    pub digest: String,
}

fn status_error(what: &str, resp: &mut Response<Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default();
    format!("{what}: HTTP {} {}", resp.status().as_u16(), body.trim())
}

/// Next page from a `Link: <…>; rel="next"` header.
fn next_link(resp: &Response<Body>) -> Option<String> {
    let link = resp.headers().get("link")?.to_str().ok()?;
    let (target, params) = link.split_once(';')?;
    if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
        return None;
    }
    Some(
        target
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned(),
    )
}

fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .and_then(|end| rest.get(..end))
}

impl Registry {
    /// A client for the registry at `base`.
    pub fn new(agent: Agent, base: &str, creds: Credentials) -> Registry {
        Registry {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            creds,
            tokens: HashMap::new(),
            repo_tokens: HashMap::new(),
        }
    }

    /// An absolute URL for a path or for a `Location` the registry answered (absolute, or
    /// relative to the registry).
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }

    /// The credentials for `url`: none for any origin but the registry's own, so that a
    /// `Location` pointing elsewhere (the registry is not trusted) never carries them.
    fn authorization(&self, url: &str) -> Option<String> {
        let path = path_of(url);
        if !url
            .strip_prefix(self.base.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
        {
            return None;
        }
        if let Some(token) = repository_of(path).and_then(|r| self.repo_tokens.get(r)) {
            return Some(format!("Bearer {token}"));
        }
        if let Some(token) = path
            .starts_with("/v2/_catalog")
            .then(|| self.repo_tokens.get("_catalog"))
            .flatten()
        {
            return Some(format!("Bearer {token}"));
        }
        self.creds
            .basic
            .as_ref()
            .map(|(u, p)| format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))))
    }

    /// Asks the token service of `challenge` for a token and keeps it for `path`'s repository.
    fn fetch_token(&mut self, challenge: &Challenge, path: &str) -> Result<(), String> {
        let key = challenge.scope.clone().unwrap_or_default();
        let token = if let Some(t) = self.tokens.get(&key) {
            t.clone()
        } else {
            let mut url = challenge.realm.clone();
            let mut sep = if url.contains('?') { '&' } else { '?' };
            for (name, value) in [("service", &challenge.service), ("scope", &challenge.scope)] {
                if let Some(v) = value {
                    url.push(sep);
                    url.push_str(name);
                    url.push('=');
                    url.push_str(&percent_encode(v));
                    sep = '&';
                }
            }
            let mut req = self.agent.get(&url);
            if let Some((u, p)) = &self.creds.basic {
                req = req.header(
                    "Authorization",
                    format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))),
                );
            }
            let mut resp = req
                .call()
                .map_err(|e| format!("token service {}: {e}", challenge.realm))?;
            if resp.status() != StatusCode::OK {
                return Err(status_error(
                    &format!("token service {}", challenge.realm),
                    &mut resp,
                ));
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(1024 * 1024)
                .read_to_vec()
                .map_err(|e| format!("token service answer: {e}"))?;
            let doc: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("token service answer is not JSON: {e}"))?;
            let token = doc
                .get("token")
                .or_else(|| doc.get("access_token"))
                .and_then(serde_json::Value::as_str)
                .ok_or("token service answer has no token")?
                .to_owned();
            self.tokens.insert(key, token.clone());
            token
        };
        let repo = if path.starts_with("/v2/_catalog") {
            "_catalog"
        } else {
            repository_of(path).unwrap_or("")
        };
        self.repo_tokens.insert(repo.to_owned(), token);
        Ok(())
    }

    /// One request with a body that can be sent again; a bearer challenge is answered once.
    fn send(
        &mut self,
        method: &str,
        path_or_url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response<Body>, String> {
        let url = self.url(path_or_url);
        let path = path_of(&url).to_owned();
        for attempt in 0..2 {
            let builder = ureq::http::Request::builder().method(method).uri(&url);
            let mut builder = headers
                .iter()
                .fold(builder, |b, (name, value)| b.header(*name, *value));
            if let Some(auth) = self.authorization(&url) {
                builder = builder.header("Authorization", auth);
            }
            let resp = match body {
                Some(bytes) => {
                    let req = builder
                        .body(bytes.to_vec())
                        .map_err(|e| format!("{method} {url}: {e}"))?;
                    self.agent.run(req)
                }
                None => {
                    let req = builder
                        .body(())
                        .map_err(|e| format!("{method} {url}: {e}"))?;
                    self.agent.run(req)
                }
            }
            .map_err(|e| format!("{method} {url}: {e}"))?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_bearer_challenge);
                if let Some(challenge) = challenge {
                    self.fetch_token(&challenge, &path)?;
                    continue;
                }
            }
            return Ok(resp);
        }
        Err(format!("{method} {url}: still unauthorized with a token"))
    }

    fn get_document(&mut self, path: &str, accept: &str) -> Result<Response<Body>, String> {
        self.send("GET", path, &[("Accept", accept)], None)
    }

    /// Every repository name in the catalog (all pages).
    pub fn catalog(&mut self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut next = Some("/v2/_catalog?n=1000".to_owned());
        while let Some(path) = next.take() {
            let mut resp = self.get_document(&path, "application/json")?;
            if resp.status() != StatusCode::OK {
                return Err(status_error("catalog", &mut resp));
            }
            next = next_link(&resp);
            let doc = read_json(&mut resp)?;
            for name in doc
                .get("repositories")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
            {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    /// Every tag of `repo` (all pages).
    pub fn tags(&mut self, repo: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut next = Some(format!("/v2/{repo}/tags/list?n=1000"));
        while let Some(path) = next.take() {
            let mut resp = self.get_document(&path, "application/json")?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(out);
            }
            if resp.status() != StatusCode::OK {
                return Err(status_error(&format!("tags of {repo}"), &mut resp));
            }
            next = next_link(&resp);
            let doc = read_json(&mut resp)?;
            for tag in doc
                .get("tags")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_str)
            {
                out.push(tag.to_owned());
            }
        }
        Ok(out)
    }

    /// The manifest `reference` (tag or digest) of `repo`; `None` when there is none.
    pub fn manifest(&mut self, repo: &str, reference: &str) -> Result<Option<Manifest>, String> {
        let mut resp = self.get_document(
            &format!("/v2/{repo}/manifests/{reference}"),
            MANIFEST_ACCEPT,
        )?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if resp.status() != StatusCode::OK {
            return Err(status_error(
                &format!("manifest {repo}:{reference}"),
                &mut resp,
            ));
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_DOCUMENT)
            .read_to_vec()
            .map_err(|e| format!("manifest {repo}:{reference}: {e}"))?;
        let digest = ocicrypt_core::digest::Digest::of(&body).to_string();
        if reference.starts_with("sha256:") && reference != digest {
            return Err(format!(
                "manifest {repo}@{reference}: the registry answered bytes hashing to {digest}"
            ));
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|d| d.get("mediaType")?.as_str().map(str::to_owned))
            .or(content_type)
            .unwrap_or_default();
        Ok(Some(Manifest {
            body,
            media_type,
            digest,
        }))
    }

    /// Stores `body` as manifest `reference` of `repo`.
    pub fn put_manifest(
        &mut self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<(), String> {
        let mut resp = self.send(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", media_type)],
            Some(body),
        )?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(
                &format!("PUT manifest {repo}:{reference}"),
                &mut resp,
            ));
        }
        Ok(())
    }

    /// Deletes manifest `digest` of `repo` (and every tag naming it); `false` when it was not
    /// there.
    pub fn delete_manifest(&mut self, repo: &str, digest: &str) -> Result<bool, String> {
        let mut resp = self.send(
            "DELETE",
            &format!("/v2/{repo}/manifests/{digest}"),
            &[],
            None,
        )?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(
                &format!("DELETE manifest {repo}@{digest}"),
                &mut resp,
            )),
        }
    }

    /// Whether blob `digest` is in `repo`.
    pub fn blob_exists(&mut self, repo: &str, digest: &str) -> Result<bool, String> {
        let mut resp = self.send("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], None)?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(
                &format!("HEAD blob {repo}@{digest}"),
                &mut resp,
            )),
        }
    }

    /// A reader of blob `digest` of `repo` (streamed; redirects to storage followed).
    pub fn blob(&mut self, repo: &str, digest: &str) -> Result<impl Read, String> {
        let mut resp = self.send("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], None)?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(
                &format!("GET blob {repo}@{digest}"),
                &mut resp,
            ));
        }
        Ok(resp.into_body().into_reader())
    }

    /// Uploads a blob streamed from `reader`: a session, one `PATCH` with the whole stream,
    /// then `finish` is asked for the digest (known only once the stream is read) and the
    /// session is committed under it. If `finish` refuses, the session is deleted and nothing
    /// is committed.
    pub fn upload<R: Read>(
        &mut self,
        repo: &str,
        reader: &mut R,
        finish: impl FnOnce(&mut R) -> Result<String, String>,
    ) -> Result<(), String> {
        let mut resp = self.send("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], None)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(&format!("start upload to {repo}"), &mut resp));
        }
        let session = location(&resp)?;
        let url = self.url(&session);
        let mut req = self
            .agent
            .patch(&url)
            .header("Content-Type", "application/octet-stream");
        if let Some(auth) = self.authorization(&url) {
            req = req.header("Authorization", auth);
        }
        let sent = req.send(SendBody::from_reader(reader));
        let patched: Result<String, String> = match sent {
            Ok(resp) if resp.status() == StatusCode::ACCEPTED => location(&resp),
            Ok(mut resp) => Err(status_error(&format!("PATCH upload to {repo}"), &mut resp)),
            Err(e) => Err(format!("PATCH upload to {repo}: {e}")),
        };
        let committed: Result<(String, String), String> =
            patched.and_then(|loc| finish(reader).map(|d| (loc, d)));
        let (loc, digest) = match committed {
            Ok(pair) => pair,
            Err(e) => {
                self.cancel(&url);
                return Err(e);
            }
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={}", percent_encode(&digest));
        let mut resp = self.send("PUT", &put, &[("Content-Length", "0")], Some(&[]))?;
        if resp.status() != StatusCode::CREATED {
            let err = status_error(&format!("commit upload {digest} to {repo}"), &mut resp);
            self.cancel(&url);
            return Err(err);
        }
        Ok(())
    }

    /// Deletes an upload session (best effort: the registry purges abandoned ones anyway).
    fn cancel(&mut self, url: &str) {
        let _ = self.send("DELETE", url, &[], None);
    }
}

fn location(resp: &Response<Body>) -> Result<String, String> {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "the registry answered an upload without a Location".to_owned())
}

fn path_of(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme
        .find('/')
        .and_then(|i| after_scheme.get(i..))
        .unwrap_or("/")
}

fn read_json(resp: &mut Response<Body>) -> Result<serde_json::Value, String> {
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_DOCUMENT)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_as_harbor_and_distribution_send_them() {
        let c = parse_bearer_challenge(
            r#"Bearer realm="https://harbor.example/service/token",service="harbor-registry",scope="repository:team/app:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://harbor.example/service/token");
        assert_eq!(c.service.as_deref(), Some("harbor-registry"));
        assert_eq!(c.scope.as_deref(), Some("repository:team/app:pull,push"));
        assert!(parse_bearer_challenge(r#"Basic realm="registry""#).is_none());
        let c = parse_bearer_challenge(r#"Bearer realm="https://a/token""#).unwrap();
        assert_eq!(c.scope, None);
    }

    #[test]
    fn repositories_of_paths() {
        assert_eq!(repository_of("/v2/team/app/manifests/v1"), Some("team/app"));
        assert_eq!(
            repository_of("/v2/team/a/b/blobs/uploads/x?_state=1"),
            Some("team/a/b")
        );
        assert_eq!(repository_of("/v2/_catalog"), None);
        assert_eq!(
            path_of("http://h:5/v2/x/blobs/uploads/u?a=b"),
            "/v2/x/blobs/uploads/u?a=b"
        );
    }

    #[test]
    fn credentials_go_only_to_the_registry() {
        let creds = Credentials {
            basic: Some(("u".into(), "p".into())),
        };
        let reg = Registry::new(Agent::new_with_defaults(), "http://reg:5000/", creds);
        assert!(reg
            .authorization("http://reg:5000/v2/a/b/blobs/uploads/x")
            .is_some());
        for elsewhere in [
            "http://evil:5000/v2/a/b/blobs/uploads/x",
            "http://reg:5000.evil/v2/a/b/blobs/uploads/x",
            "https://reg:5000/v2/a/b/blobs/uploads/x",
        ] {
            assert_eq!(reg.authorization(elsewhere), None, "{elsewhere}");
        }
    }
}
