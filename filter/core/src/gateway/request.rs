//! The request-line decision: which flow a request is, every check that needs no key first,
//! the project's recipients last (see the module doc of [`super`] for the order).
use crate::config::policy::{project_of, Action as PolicyAction};
use crate::digest::Digest;
use crate::distribution::form::{self, Query};
use crate::distribution::ledger;
use crate::distribution::manifest;
use crate::distribution::route::{self, Route, UploadMethod};
use crate::distribution::session;
use crate::distribution::upload::{self, ChunkStream, UploadRecord};
use crate::distribution::upload_table;
use crate::error::{Code, OciError};
use crate::format::recipients::{fingerprint, Recipient};

use super::ledgered::{self, blob_entry, mountable};
use super::{
    ChunkFlow, Command, Env, Finish, Flow, Level, Metric, RequestHead, Stream,
    MANIFEST_BUDGET_PER_WORKER,
};

/// The query parameters the registry or the gateway act on in an upload request: each may
/// appear once, unencoded.
const INTERPRETED_PARAMS: &[&str] = &[
    "mount",
    "from",
    "digest",
    "_state",
    upload::STATE_PARAM,
    upload::SESSION_PARAM,
];

/// The gateway's own parameters: they go no further than the gateway.
const GATEWAY_PARAMS: &[&str] = &[upload::STATE_PARAM, upload::SESSION_PARAM];

/// What a final `PUT` drops before the registry sees it: the gateway's own parameters and the
/// client's digest (the plaintext's; the ciphertext's replaces it).
const FINISH_DROPS: &[&str] = &["digest", upload::STATE_PARAM, upload::SESSION_PARAM];

impl Stream {
    /// Decides the flow from the request headers kept in the stream. `Err` is the refusal.
    pub(super) fn decide(&mut self, env: &mut Env) -> Result<Vec<Command>, OciError> {
        let head = self.head.take().unwrap_or_default();
        let decided = self.decide_with(&head, env);
        self.head = Some(head);
        decided
    }

    fn decide_with(&mut self, head: &RequestHead, env: &mut Env) -> Result<Vec<Command>, OciError> {
        let config = env.config;
        let method = head.bytes(":method").unwrap_or_default();
        let path = head.bytes(":path").unwrap_or_default();
        let read = method == b"GET" || method == b"HEAD";
        let (Ok(method), Ok(path)) = (
            String::from_utf8(method.to_vec()),
            String::from_utf8(path.to_vec()),
        ) else {
            // Reads pass untouched; a write whose request line the gateway cannot read could
            // land in an encrypted repository unseen.
            if read {
                return Ok(vec![Command::Continue]);
            }
            return Err(OciError::new(
                Code::Denied,
                "write request whose request line is not UTF-8; use the plain /v2/<name>/... form",
            ));
        };
        if matches!(method.as_str(), "PUT" | "DELETE") {
            if let Some(reference) = path
                .split('?')
                .next()
                .and_then(|p| p.rsplit_once("/manifests/"))
                .map(|(_, r)| r)
            {
                if ledger::is_reserved_tag(reference) {
                    return Err(OciError::new(
                        Code::Denied,
                        format!("tag {reference:?} is reserved for the encrypting gateway's ledger; use another tag"),
                    ));
                }
            }
        }
        if route::is_ambiguous_write(&method, &path) {
            // The registry may decode `%2F`, collapse `//` or clean `..` into a repository name
            // other than the one routed here (`plain/x/../../demo/y` routes as a passthrough
            // name): such a write could land in an encrypted repository unencrypted.
            return Err(OciError::new(
                Code::Denied,
                "write request with an encoded or non-canonical path; use the plain /v2/<name>/... form",
            ));
        }
        let route = route::route(&method, &path);
        // Upload state stays out of log lines: distribution's `_state` and the gateway's sealed
        // state (a Location read from a log must not continue anyone's upload).
        self.request = format!(
            "{method} {}",
            route::rewrite_query(&path, &["_state", upload::STATE_PARAM], &[])
        );
        let repository = match &route {
            Route::UploadStart { repository, .. }
            | Route::Upload { repository, .. }
            | Route::BlobHead { repository, .. }
            | Route::ManifestPut { repository, .. } => repository.clone(),
            Route::Other => {
                if let Some(repository) = route::tags_list_repository(&path)
                    .filter(|r| method == "GET" && config.policy.action(r) == PolicyAction::Encrypt)
                {
                    // Credentials the gateway cannot carry: the registry answers the read itself.
                    if self.read_credentials(head).is_err() {
                        return Ok(vec![Command::Continue]);
                    }
                    return Ok(self.read_tags(config, repository, &path, 0));
                }
                if let Some(repository) = manifest_delete(&method, &path)
                    .filter(|r| config.policy.action(r) == PolicyAction::Encrypt)
                {
                    // A manifest deleted by digest may be one of the gateway's ledger manifests:
                    // read it (with the client's credentials) before letting the delete go.
                    self.encrypted = Some(repository.clone());
                    self.read_credentials(head)?;
                    let callout = self.registry_callout(config, "GET", &path, None, None);
                    self.flow = Flow::DeleteCheck {
                        callout: callout.id,
                        repository,
                    };
                    return Ok(vec![Command::Dispatch(callout), Command::Pause]);
                }
                return Ok(vec![Command::Continue]);
            }
        };
        if config.policy.action(&repository) != PolicyAction::Encrypt {
            return Ok(vec![Command::Continue]);
        }
        self.encrypted = Some(repository.clone());
        self.upstream_path = path.clone();
        self.read_credentials(head)?;
        // The parameters the registry acts on, read as it reads them (uploads only: manifests
        // and HEADs carry none it reads).
        let query = match &route {
            Route::UploadStart { .. } | Route::Upload { .. } => {
                if head.all("content-type").any(form::is_form_content_type) {
                    return Err(OciError::new(
                        Code::BlobUploadInvalid,
                        "upload requests with a form Content-Type are refused on encrypted repositories: the registry would read parameters from the body; send the blob as application/octet-stream",
                    ));
                }
                let raw = path.split_once('?').map_or("", |(_, q)| q);
                Query::strict(raw, INTERPRETED_PARAMS).map_err(|e| {
                    OciError::new(
                        Code::BlobUploadInvalid,
                        format!("ambiguous upload request ({e}); send each parameter once, with its name unencoded"),
                    )
                })?
            }
            _ => Query::default(),
        };
        let has_body =
            !head.end_of_stream && head.text("content-length").is_none_or(|v| v.trim() != "0");
        let at = Request {
            head,
            path: &path,
            repository,
            query: &query,
            has_body,
        };
        match route {
            Route::UploadStart { .. } => self.upload_start(at, env),
            Route::Upload {
                method: UploadMethod::Patch,
                id,
                ..
            } => self.upload_patch(at, &id, env),
            Route::Upload {
                method: UploadMethod::Put,
                id,
                ..
            } => self.upload_put(at, &id, env),
            Route::Upload {
                method: UploadMethod::Delete,
                id,
                ..
            } => {
                let mut out = Vec::new();
                let idle = env.config.upload_idle_seconds;
                if upload_table::has_in(env.store, &id, env.now, idle) {
                    let gone = upload_table::remove_in(env.store, &id, env.now, idle)?;
                    if gone != 0 {
                        out.push(Command::Metric(Metric::UploadState(-gone)));
                    }
                }
                out.push(Command::Continue);
                Ok(out)
            }
            Route::Upload {
                method: UploadMethod::Get,
                ..
            }
            | Route::Other => Ok(vec![Command::Continue]),
            Route::BlobHead { digest, .. } => self.blob_head(at, &digest, env),
            Route::ManifestPut { reference, .. } => self.manifest_put(at, &reference, env),
        }
    }

    /// `:authority` and `Authorization`, which the callouts made for this request carry.
    fn read_credentials(&mut self, head: &RequestHead) -> Result<(), OciError> {
        self.authority = head
            .strict(":authority", Code::BlobUploadInvalid)?
            .unwrap_or_default();
        self.authorization = head.strict("authorization", Code::BlobUploadInvalid)?;
        Ok(())
    }

    /// The project's recipients; `None` while a lookup runs (the request waits for its
    /// fetch, or for [`Stream::on_keys_ready`]). Called only once the request is otherwise
    /// valid.
    fn recipients(
        &mut self,
        env: &mut Env,
        repository: &str,
    ) -> Result<Option<Vec<Recipient>>, OciError> {
        self.ask_keys(env, project_of(repository))
    }

    fn upload_start(&mut self, at: Request, env: &mut Env) -> Result<Vec<Command>, OciError> {
        let Request {
            path,
            repository,
            query,
            has_body,
            ..
        } = at;
        let digest = query.get("digest");
        let mount = query.get("mount");
        let client_digest = match digest {
            Some(d) if has_body => Some(parse_client_digest(d)?),
            _ => None,
        };
        let from = query.get("from");
        let known = match (mount, from) {
            (Some(mount), Some(from)) => mountable(env, &repository, mount, from),
            _ => None,
        };
        // Fail before any byte is sent when the project cannot be encrypted to.
        let Some(recipients) = self.recipients(env, &repository)? else {
            return Ok(self.waiting());
        };
        let mut out = Vec::new();
        if let (Some((client_digest, entry)), Some(from)) = (known, from) {
            if entry.recipients.as_deref() == Some(fingerprint(&recipients).as_str()) {
                // Both repositories belong to one project (so one set of recipients) and the
                // gateway encrypted that blob in `from`: mount the ciphertext instead.
                let encrypted = entry.encrypted_digest.to_string();
                let new_path = route::rewrite_query(
                    path,
                    &["mount", "from", "digest"],
                    &[("mount", &encrypted), ("from", from)],
                );
                out.push(Command::SetRequestHeader(":path".into(), new_path));
                out.push(Command::Log(
                    Level::Info,
                    format!("{repository}: mount of {client_digest} from {from} as its ciphertext {encrypted}"),
                ));
                self.flow = Flow::Known {
                    repository,
                    client_digest,
                    entry,
                    mounted: true,
                };
                out.push(Command::Continue);
                return Ok(out);
            }
        }
        if mount.is_some() {
            // A mount would make the source repository's blob appear here as it is: a
            // plaintext blob in an encrypted repository. A normal upload instead.
            let new_path = route::rewrite_query(path, &["mount", "from"], &[]);
            out.push(Command::Log(
                Level::Info,
                format!("{repository}: cross-repository mount turned into an upload"),
            ));
            out.push(Command::Metric(Metric::MountRewritten));
            out.push(Command::SetRequestHeader(":path".into(), new_path));
        }
        match client_digest {
            Some(client_digest) => {
                let callout = self.registry_callout(
                    env.config,
                    "POST",
                    &format!("/v2/{repository}/blobs/uploads/"),
                    None,
                    None,
                );
                self.flow = Flow::OpeningSession {
                    callout: callout.id,
                    repository,
                    client_digest,
                    recipients,
                };
                out.push(Command::Dispatch(callout));
                out.push(Command::Pause);
            }
            None => {
                if digest.is_some() {
                    let new_path = route::rewrite_query(path, &["digest", "mount", "from"], &[]);
                    out.push(Command::SetRequestHeader(":path".into(), new_path));
                }
                out.push(Command::Continue);
            }
        }
        Ok(out)
    }

    fn upload_patch(
        &mut self,
        at: Request,
        id: &str,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let loaded = load_record(env, id, &at)?;
        let start = at
            .head
            .strict("content-range", Code::BlobUploadInvalid)?
            .and_then(|v| route::content_range_start(&v));
        let stream = ChunkStream::new(loaded.record, start)?
            .accepting_encrypted(env.config.policy.accepts_encrypted(&at.repository));
        self.claim_session(env, id)?;
        let mut out = moved_metric(loaded.moved);
        // The sealed state and the session parameter are the gateway's, not the registry's.
        let stripped = route::rewrite_query(at.path, GATEWAY_PARAMS, &[]);
        if stripped != at.path {
            out.push(Command::SetRequestHeader(":path".into(), stripped));
        }
        self.flow = Flow::Chunk(Box::new(ChunkFlow {
            repository: at.repository,
            had_state: loaded.had_state,
            upload_id: Some(id.to_string()),
            stream: Some(stream),
            finish: None,
        }));
        out.push(Command::Continue);
        Ok(out)
    }

    fn upload_put(
        &mut self,
        at: Request,
        id: &str,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let client_digest = parse_client_digest(at.query.get("digest").unwrap_or(""))?;
        let loaded = load_record(env, id, &at)?;
        let upload = Some((id.to_string(), loaded.had_state));
        if at.has_body {
            // The digest in the request line must become the ciphertext's, which is known only
            // after the body; the request line cannot change once the body is seen. Send the
            // body as a PATCH, and finish by callout on the 202.
            let start = at
                .head
                .strict("content-range", Code::BlobUploadInvalid)?
                .and_then(|v| route::content_range_start(&v));
            let stream = ChunkStream::new(loaded.record, start)?
                .accepting_encrypted(env.config.policy.accepts_encrypted(&at.repository));
            let Some(recipients) = self.recipients(env, &at.repository)? else {
                return Ok(self.waiting());
            };
            self.claim_session(env, id)?;
            let new_path = route::rewrite_query(at.path, FINISH_DROPS, &[]);
            let mut out = moved_metric(loaded.moved);
            out.extend(patch_request(new_path));
            self.flow = Flow::Chunk(Box::new(ChunkFlow {
                repository: at.repository,
                had_state: loaded.had_state,
                upload_id: Some(id.to_string()),
                stream: Some(stream),
                finish: Some(Finish {
                    client_digest,
                    recipients,
                    completion: None,
                }),
            }));
            out.push(Command::Continue);
            return Ok(out);
        }
        let mut rng = &mut *env.rng;
        let moved = moved_metric(loaded.moved);
        let finished = upload::finish(loaded.record, client_digest, &mut rng)?;
        let Some(recipients) = self.recipients(env, &at.repository)? else {
            return Ok(self.waiting());
        };
        self.claim_session(env, id)?;
        let mut rng = &mut *env.rng;
        let completion = finished.wrap(&recipients, &mut rng)?;
        let stored = completion.stored_digest.to_string();
        let new_path = route::rewrite_query(at.path, FINISH_DROPS, &[("digest", &stored)]);
        self.flow = Flow::Finishing {
            callout: None,
            repository: at.repository,
            completion,
            upload,
        };
        let mut out = moved;
        out.extend([
            Command::SetRequestHeader(":path".into(), new_path),
            Command::Continue,
        ]);
        Ok(out)
    }

    fn blob_head(
        &mut self,
        at: Request,
        digest: &str,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        // A re-push: the client asks for the plaintext digest; what the gateway stored for it
        // in this repository is the ciphertext. Ask the registry about that, so the client
        // skips the upload only if the encrypted blob is really there.
        let repository = at.repository;
        let Ok(client_digest) = Digest::parse(digest) else {
            return Ok(vec![Command::Continue]);
        };
        let Some(entry) = blob_entry(env, &self.read_back, &repository, &client_digest) else {
            if env.config.state_key.is_some() && !self.ledger_checked {
                // Another replica (or this one before a restart) may have encrypted it: read
                // the registry's ledger, then decide again.
                self.ledger_checked = true;
                let path = format!(
                    "/v2/{repository}/manifests/{}",
                    ledger::ledger_tag(&client_digest)
                );
                let callout = self.registry_callout(env.config, "GET", &path, None, None);
                self.flow = Flow::HeadLookup {
                    callout: callout.id,
                    repository,
                    digest: client_digest,
                };
                return Ok(vec![Command::Dispatch(callout), Command::Pause]);
            }
            return Ok(vec![Command::Continue]);
        };
        let Some(recipients) = self.recipients(env, &repository)? else {
            return Ok(self.waiting());
        };
        if entry.recipients.as_deref() != Some(fingerprint(&recipients).as_str()) {
            // Wrapped to recipients the project no longer has: let the client upload it again,
            // to be encrypted to the current ones.
            return Ok(vec![Command::Continue]);
        }
        // The client skips the upload and names the layer in a manifest soon: make its entry
        // the most recently written of its cache slot, the last to be evicted (best effort; an
        // entry just read back from the registry is fresh already).
        let mut out = Vec::new();
        if !self.ledger_checked {
            out = ledgered::record(env, &repository, &client_digest, &entry).unwrap_or_default();
        }
        let path = format!("/v2/{repository}/blobs/{}", entry.encrypted_digest);
        self.flow = Flow::Known {
            repository,
            client_digest,
            entry,
            mounted: false,
        };
        out.push(Command::SetRequestHeader(":path".into(), path));
        out.push(Command::Continue);
        Ok(out)
    }

    fn manifest_put(
        &mut self,
        at: Request,
        reference: &str,
        env: &mut Env,
    ) -> Result<Vec<Command>, OciError> {
        let repository = at.repository;
        // Encrypting changes the manifest's digest, and the request line cannot change once
        // the body is seen: a manifest pushed by digest is stored by the gateway's own callout
        // under its new digest, and its request never goes on (should its body ever reach the
        // registry at the digest the client named, the registry's own digest check refuses it).
        let by_digest = if reference.starts_with("sha256:") {
            Some(parse_client_digest(reference)?)
        } else {
            None
        };
        if !at.has_body {
            return Err(OciError::new(
                Code::ManifestInvalid,
                "manifest PUT without a body",
            ));
        }
        let limit = env.config.max_manifest_bytes;
        let declared = at
            .head
            .strict("content-length", Code::ManifestInvalid)?
            .and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(len) = declared {
            if len > limit {
                return Err(too_large(len, limit));
            }
        }
        // Held in memory until its end: counted against the worker's budget (a body of
        // unknown length counts as the largest allowed). Checked now, reserved once the keys
        // are there (a request waiting for the key service holds nothing).
        let bytes = declared.unwrap_or(limit);
        budget_room(env, bytes, limit)?;
        let content_type = at
            .head
            .strict("content-type", Code::ManifestInvalid)?
            .unwrap_or_default();
        let Some(recipients) = self.recipients(env, &repository)? else {
            return Ok(self.waiting());
        };
        budget_room(env, bytes, limit)?;
        env.held_manifest_bytes
            .set(env.held_manifest_bytes.get().saturating_add(bytes));
        self.manifest_reserved = self.manifest_reserved.saturating_add(bytes);
        let mut out = Vec::new();
        let stored_type = manifest::stored_content_type(&content_type).to_string();
        out.push(Command::SetRequestHeader(
            "content-type".into(),
            stored_type,
        ));
        // The rewritten body has another length; without Content-Length Envoy streams it
        // chunked to the registry.
        out.push(Command::RemoveRequestHeader("content-length".into()));
        self.flow = Flow::Manifest {
            repository,
            content_type,
            by_digest,
            client_digest: None,
            entry: None,
            recipients: fingerprint(&recipients),
        };
        out.push(Command::Continue);
        Ok(out)
    }

    /// Claims upload session `id` for this stream: one request at a time per session, or two
    /// would encrypt from one offset with one keystream (see [`crate::distribution::session`]).
    fn claim_session(&mut self, env: &Env, id: &str) -> Result<(), OciError> {
        if self.claimed.as_deref() == Some(id) {
            return Ok(());
        }
        session::claim_in(env.store, id, env.now)?;
        self.claimed = Some(id.to_string());
        Ok(())
    }
}

/// What the request-line checks of a route read.
struct Request<'a> {
    head: &'a RequestHead,
    path: &'a str,
    repository: String,
    query: &'a Query,
    has_body: bool,
}

/// The upload state a request continues from.
struct Loaded {
    record: UploadRecord,
    /// The store had state for the session (for the in-flight gauge).
    had_state: bool,
    /// Another replica sealed the state: the session moved (counted, see [`upload::Replica`]).
    moved: bool,
}

/// The count of a session continued from another replica's state, for the commands of a
/// request that goes on.
fn moved_metric(moved: bool) -> Vec<Command> {
    if moved {
        vec![Command::Metric(Metric::SessionMoved)]
    } else {
        Vec::new()
    }
}

/// The state of upload `id` for this request: sealed in the URL the client echoes (replicas
/// sharing `replicas.state_key`), else saved in the store, else fresh. Whatever its source, the
/// state must be at the offset the registry's `_state` says it will write at. With replicas,
/// the request must also name its session the way the gateway's `Location` did, which is what
/// keeps the session on one replica.
fn load_record(env: &mut Env, id: &str, at: &Request) -> Result<Loaded, OciError> {
    let (repository, query) = (at.repository.as_str(), at.query);
    let mut moved = false;
    if env.config.state_key.is_some() {
        let raw = at.path.split_once('?').map_or("", |(_, q)| q);
        upload::check_session_param(raw, id)?;
    }
    let registry = query
        .get("_state")
        .and_then(route::registry_upload_state)
        .filter(|s| s.name == repository && s.uuid == id)
        .ok_or_else(|| {
            OciError::new(
                Code::BlobUploadInvalid,
                "the upload URL carries no registry state (_state) for this session; use the Location the registry answered",
            )
        })?;
    let token = query.get(upload::STATE_PARAM);
    let (loaded, found) = match (env.config.state_key.as_ref(), token) {
        (Some(key), Some(token)) => {
            let (record, sealed_by) = upload::unseal(&key.0, id, token)
                .filter(|(r, _)| r.repository == repository)
                .ok_or_else(|| {
                    OciError::new(
                        Code::BlobUploadInvalid,
                        "the gateway's upload state in this URL does not open (another gateway's key, or altered); restart the upload",
                    )
                })?;
            let mut rng = &mut *env.rng;
            let here = upload::Replica::of_this_process(env.store, &mut rng);
            if here.is_some_and(|here| here != sealed_by) {
                moved = true;
            }
            let had_state =
                upload_table::has_in(env.store, id, env.now, env.config.upload_idle_seconds);
            (
                Loaded {
                    record,
                    had_state,
                    moved,
                },
                true,
            )
        }
        _ => {
            let (record, found) = upload_table::load_in(
                env.store,
                id,
                repository,
                env.now,
                env.config.upload_idle_seconds,
            )?;
            (
                Loaded {
                    record,
                    had_state: found,
                    moved: false,
                },
                found,
            )
        }
    };
    upload::bind_to_registry(&loaded.record, found, registry.offset)?;
    Ok(loaded)
}

/// Turns the request into a `PATCH` of the upload session at `path`. Distribution refuses a
/// PATCH whose Content-Type is not octet-stream (curl and some clients send form types).
pub(super) fn patch_request(path: String) -> Vec<Command> {
    vec![
        Command::SetRequestHeader(":method".into(), "PATCH".into()),
        Command::SetRequestHeader(":path".into(), path),
        Command::SetRequestHeader("content-type".into(), "application/octet-stream".into()),
    ]
}

/// Whether the worker's manifest budget has room for `bytes` more.
pub(super) fn budget_room(env: &Env, bytes: usize, limit: usize) -> Result<(), OciError> {
    let budget = MANIFEST_BUDGET_PER_WORKER.max(limit.saturating_mul(2));
    let now = env.held_manifest_bytes.get();
    if now.saturating_add(bytes) > budget {
        return Err(OciError::new(
            Code::Unavailable,
            format!("the gateway holds {now} bytes of manifests being pushed on this worker (budget {budget}); nothing was stored, retry"),
        ));
    }
    Ok(())
}

/// The repository of a `DELETE /v2/<name>/manifests/sha256:…`.
fn manifest_delete(method: &str, path: &str) -> Option<String> {
    if method != "DELETE" {
        return None;
    }
    let (repository, reference) = path
        .split('?')
        .next()?
        .strip_prefix("/v2/")?
        .rsplit_once("/manifests/")?;
    (reference.starts_with("sha256:") && route::is_repository_name(repository))
        .then(|| repository.to_string())
}

fn parse_client_digest(value: &str) -> Result<Digest, OciError> {
    Digest::parse(value).map_err(|e| OciError::new(Code::DigestInvalid, e.to_string()))
}

/// The refusal of a manifest over `limits.max_manifest_bytes`.
pub fn too_large(len: usize, limit: usize) -> OciError {
    OciError::new(
        Code::SizeInvalid,
        format!("manifest of {len} bytes exceeds the gateway's limit of {limit} bytes (limits.max_manifest_bytes)"),
    )
}
