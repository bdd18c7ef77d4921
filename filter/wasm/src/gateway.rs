//! One HTTP stream through the gateway: the host side of [`ocicrypt_core::gateway::Stream`].
//!
//! The request line (which flow a request is, every refusal before the body, the key lookup
//! after everything else) and the request bodies are decided by the core's machine; this file
//! turns host callbacks into its events and carries out its commands. The response and
//! finishing/ledger callout steps of uploads are still here, on the core's [`Flow`] (issue 16,
//! next increments).
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use ocicrypt_core::config::{Config, KeyServiceConfig};
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::{
    registry_refusal, CalloutAnswer, CalloutId, Command, Env, Flow, KeyAnswer, Keys, Level, Metric,
    RecordingStage, RequestHead, ResponseHead, Stream,
};
use ocicrypt_core::keyservice::{Lookup, Next};
use ocicrypt_core::ledger;
use ocicrypt_core::prefetch::Keystream;
use ocicrypt_core::upload::{Completion, Store};
use ocicrypt_core::upload_table;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use rand_core::OsRng;

use crate::host::{self, SharedData};
use crate::keys::{self, Resolution};
use crate::ledgered;
use crate::metrics::Metrics;
use crate::prefetch::{HostQueues, SharedWorker};
use crate::uploads;

/// The per-stream context.
pub struct Gateway {
    id: u32,
    /// The core's machine for this stream.
    stream: Stream,
    /// The project's recipients, and the key-service lookup the paused request waits for.
    keys: StreamKeys,
    /// Callouts the machine dispatched: host token → the machine's id.
    callouts: Vec<(u32, CalloutId)>,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// Keystream prefetch of this worker.
    worker: SharedWorker,
}

thread_local! {
    /// Manifest bytes the streams of this worker VM hold in Envoy's buffers right now. Each VM
    /// is one thread, and a reloaded VM starts from zero: nothing a trap leaves behind counts.
    static HELD_MANIFEST_BYTES: Cell<usize> = const { Cell::new(0) };
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(mut worker) = self.worker.try_borrow_mut() {
            self.metrics
                .keystream(self.stream.end_keystream(&mut worker));
        }
        let stream = &mut self.stream;
        HELD_MANIFEST_BYTES.with(|held| stream.on_end(&SharedData, held));
    }
}

/// Where a stream's recipients come from: the worker's verified records, or a key-service
/// lookup run for the stream (one per request: after it, the record decides).
struct StreamKeys {
    id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// The lookup the paused request waits for, with its callout token.
    lookup: Option<(Lookup, u32)>,
    /// Whether this request already ran a lookup.
    looked_up: bool,
}

impl Keys for StreamKeys {
    fn recipients(&mut self, project: &str) -> Result<KeyAnswer, OciError> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
        loop {
            match keys::resolve(&config, project, keys::now(), self.looked_up)? {
                Resolution::Ready(r) => return Ok(KeyAnswer::Ready(r)),
                Resolution::LookUp => {
                    let Some(ks) = &config.key_service else {
                        return Err(OciError::new(
                            Code::Unknown,
                            "key lookup without a key service",
                        ));
                    };
                    self.looked_up = true;
                    let (lookup, next) = keys::start(ks, vec![project.to_string()], keys::now());
                    if self.drive(ks, lookup, next) {
                        return Ok(KeyAnswer::Waiting);
                    }
                }
            }
        }
    }
}

impl StreamKeys {
    /// Runs a lookup until it waits on a callout (`true`) or is finished and published.
    fn drive(&mut self, ks: &KeyServiceConfig, lookup: Lookup, next: Next) -> bool {
        match keys::drive(ks, lookup, next) {
            keys::Driven::Waiting(lookup, token) => {
                self.lookup = Some((*lookup, token));
                true
            }
            keys::Driven::Done(records, metadata) => {
                for (project, record) in &records {
                    if let Some(error) = &record.error {
                        host::log(
                            LogLevel::Warn,
                            &format!(
                                "[ocicrypt #{}] key service: project {project}: {error}",
                                self.id
                            ),
                        );
                    }
                }
                self.metrics.key_lookup(&records, metadata.as_ref());
                keys::publish(&records, metadata);
                false
            }
        }
    }
}

/// Where the machine's commands are carried out: `Continue` means "return Continue" in a
/// stream callback (headers, body, trailers) and "resume the request" in a callout's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Callback {
    Stream,
    Other,
}

impl Gateway {
    /// A stream context of worker VM configuration `config`.
    pub fn new(
        id: u32,
        config: Option<Rc<Config>>,
        metrics: Rc<Metrics>,
        worker: SharedWorker,
    ) -> Self {
        Gateway {
            id,
            stream: Stream::new(),
            keys: StreamKeys {
                id,
                config: config.clone(),
                metrics: metrics.clone(),
                lookup: None,
                looked_up: false,
            },
            callouts: Vec::new(),
            config,
            metrics,
            worker,
        }
    }

    fn log(&self, level: LogLevel, msg: &str) {
        host::log(level, &format!("[ocicrypt #{}] {msg}", self.id));
    }

    fn refuse(&mut self, err: &OciError) -> Action {
        let commands = self.stream.refuse(err.clone());
        self.apply(commands, Callback::Other)
    }

    /// Feeds the machine one event with the worker's environment lent to it.
    fn with_env(
        &mut self,
        event: impl FnOnce(&mut Stream, &mut Env) -> Vec<Command>,
    ) -> Vec<Command> {
        let Some(config) = self.config.clone() else {
            return self.stream.refuse(OciError::new(
                Code::Unavailable,
                "the gateway has no valid configuration",
            ));
        };
        let now = keys::now().max(0).unsigned_abs();
        let mut rng = OsRng;
        let stream = &mut self.stream;
        let keys = &mut self.keys;
        // A stream's events never nest (no host call runs another callback of this VM), so the
        // worker is free; were it not, the body is encrypted locally: the same bytes.
        let mut worker = self.worker.try_borrow_mut().ok();
        let mut queues = HostQueues;
        HELD_MANIFEST_BYTES.with(|held| {
            let keystream = worker.as_deref_mut().map(|worker| Keystream {
                worker,
                queues: &mut queues,
            });
            let mut env = Env {
                config: &config,
                store: &SharedData,
                keys,
                held_manifest_bytes: held,
                now,
                rng: &mut rng,
                keystream,
            };
            event(stream, &mut env)
        })
    }

    /// Carries out the machine's commands in order; the action a headers callback returns.
    fn apply(&mut self, commands: Vec<Command>, callback: Callback) -> Action {
        let mut action = Action::Continue;
        for command in commands {
            let done = match command {
                Command::SetRequestHeader(name, value) => {
                    host::set_header(MapType::HttpRequestHeaders, &name, Some(&value))
                }
                Command::RemoveRequestHeader(name) => {
                    host::set_header(MapType::HttpRequestHeaders, &name, None)
                }
                Command::ReplaceRequestBody(len, body) => {
                    host::set_body(BufferType::HttpRequestBody, len, &body)
                }
                Command::SetResponseHeader(name, value) => {
                    host::set_header(MapType::HttpResponseHeaders, &name, Some(&value))
                }
                Command::Respond {
                    status,
                    headers,
                    body,
                } => {
                    host::respond(status, &headers, &body);
                    Ok(())
                }
                Command::DropRequestBody => {
                    // Host contract: over HTTP/2 the body may be gone by the trailers
                    // (BadArgument); the refusal that follows stands either way.
                    let _ = host::set_body(BufferType::HttpRequestBody, usize::MAX, &[]);
                    Ok(())
                }
                Command::Dispatch(callout) => {
                    let headers = callout
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    match host::dispatch(
                        &callout.cluster,
                        headers,
                        callout.body.as_deref(),
                        Duration::from_millis(callout.timeout_ms),
                    ) {
                        Ok(token) => {
                            self.callouts.push((token, callout.id));
                            Ok(())
                        }
                        Err(()) => {
                            let failed = self.stream.on_dispatch_failed(callout.id);
                            if failed.is_empty() {
                                Ok(())
                            } else {
                                return self.apply(failed, callback);
                            }
                        }
                    }
                }
                Command::Reply(err) => {
                    host::reply_error(&err);
                    Ok(())
                }
                Command::Continue => {
                    action = Action::Continue;
                    if callback == Callback::Other {
                        host::resume_request()
                    } else {
                        Ok(())
                    }
                }
                Command::Pause => {
                    action = Action::Pause;
                    Ok(())
                }
                Command::Metric(metric) => {
                    match metric {
                        Metric::Refused(code) => self.metrics.refused(code),
                        Metric::MountRewritten => self.metrics.mount_rewritten(),
                        Metric::ManifestRewritten => self.metrics.manifest_rewritten(),
                        Metric::UploadState(delta) => self.metrics.upload_state(delta),
                        Metric::LedgerCache(change) => self.metrics.ledger_cache(change),
                        Metric::SessionMoved => self.metrics.session_moved(),
                        Metric::Keystream(report) => self.metrics.keystream(report),
                    }
                    Ok(())
                }
                Command::Log(level, line) => {
                    let level = match level {
                        Level::Info => LogLevel::Info,
                        Level::Warn => LogLevel::Warn,
                    };
                    self.log(level, &line);
                    Ok(())
                }
            };
            if let Err(e) = done {
                return self.refuse(&e);
            }
        }
        action
    }

    /// Whether the ledger is kept in the registry too (replicas share `replicas.state_key`).
    fn durable(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.state_key.is_some())
    }

    /// A callout to the registry with the client's credentials, whose answer comes to
    /// [`Gateway::on_callout`] by its token.
    fn registry_call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Result<u32, OciError> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
        let callout = self
            .stream
            .registry_callout(&config, method, path, body, content_type);
        let headers = callout
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        host::dispatch(
            &callout.cluster,
            headers,
            callout.body.as_deref(),
            Duration::from_millis(callout.timeout_ms),
        )
        .map_err(|()| ocicrypt_core::gateway::unreachable_registry())
    }

    /// Starts recording an encrypted blob in the registry's ledger (replicas): the empty config
    /// the ledger manifests share, then the ledger manifest. The client's answer waits.
    fn start_recording(
        &mut self,
        repository: String,
        completion: Completion,
        upload: Option<(String, bool)>,
    ) -> Result<(), OciError> {
        let stage = if SharedData
            .get(&empty_config_key(&repository))
            .is_some_and(|v| !v.is_empty())
        {
            // The empty config is in this repository already: straight to the ledger manifest.
            self.put_ledger_manifest(&repository, &completion)?;
            RecordingStage::Manifest
        } else {
            self.registry_call(
                "POST",
                &format!("/v2/{repository}/blobs/uploads/"),
                None,
                None,
            )?;
            RecordingStage::ConfigSession
        };
        self.stream.flow = Flow::Recording {
            repository,
            completion,
            upload,
            stage,
        };
        Ok(())
    }

    fn put_ledger_manifest(
        &mut self,
        repository: &str,
        completion: &Completion,
    ) -> Result<u32, OciError> {
        let entry = completion.ledger.as_ref().ok_or_else(|| {
            OciError::new(Code::Unknown, "recording a blob without a ledger entry")
        })?;
        let key = self
            .config
            .as_ref()
            .and_then(|c| c.state_key.as_ref())
            .ok_or_else(|| OciError::new(Code::Unknown, "ledger write without a state key"))?;
        let body = ledger::ledger_manifest_authenticated(
            &key.0,
            repository,
            &completion.client_digest,
            entry,
        );
        let path = format!(
            "/v2/{repository}/manifests/{}",
            ledger::ledger_tag(&completion.client_digest)
        );
        self.registry_call(
            "PUT",
            &path,
            Some(&body),
            Some(ocicrypt_core::spec::MEDIA_TYPE_OCI_MANIFEST),
        )
    }

    fn drop_state(&self, upload_id: &str, had_state: bool) -> Result<(), OciError> {
        if had_state {
            uploads::remove(upload_id, self.idle_seconds(), &self.metrics)?;
        }
        Ok(())
    }

    /// `limits.upload_idle_seconds`: how long an upload's record waits for its next request.
    fn idle_seconds(&self) -> u64 {
        self.config
            .as_ref()
            .map_or(upload_table::DEFAULT_IDLE_SECONDS, |c| {
                c.upload_idle_seconds
            })
    }

    /// Records an encrypted blob and makes the answer speak of the client's digest.
    fn commit(
        &self,
        repository: &str,
        completion: &Completion,
        upload: Option<&(String, bool)>,
    ) -> Result<(), OciError> {
        if let Some((id, had_state)) = upload {
            self.drop_state(id, *had_state)?;
        }
        if let Some(entry) = &completion.ledger {
            let config = self.config.as_deref();
            ledgered::record(
                config,
                repository,
                &completion.client_digest,
                entry,
                &self.metrics,
            )?;
            // Also under the ciphertext's digest: a re-push (or re-tag) of the image as stored
            // names the ciphertext, which the rewrite then recognises as the gateway's own.
            ledgered::record(
                config,
                repository,
                &entry.encrypted_digest,
                entry,
                &self.metrics,
            )?;
            self.log(
                LogLevel::Info,
                &format!(
                    "{repository}: blob {} stored encrypted as {} ({} bytes)",
                    completion.client_digest, entry.encrypted_digest, entry.size
                ),
            );
            self.metrics.layer_encrypted(entry.size);
        } else {
            self.metrics.blob_passed();
        }
        answer_as_pushed("blobs", repository, &completion.client_digest, true)?;
        Ok(())
    }

    /// The core's check of a registry answer in an encrypted repository (see
    /// [`Stream::check_answer`]); its best-effort cleanup callout is dispatched here.
    fn check_answer(&mut self, status: &str, location: Option<&str>) -> Result<(), OciError> {
        let Some(config) = self.config.clone() else {
            return Ok(());
        };
        let mut cleanup = Vec::new();
        let checked = self
            .stream
            .check_answer(&config, status, location, &mut cleanup);
        self.apply(cleanup, Callback::Other);
        checked
    }

    fn on_response(&mut self) -> Result<Action, OciError> {
        let status = host::header(MapType::HttpResponseHeaders, ":status").unwrap_or_default();
        if !matches!(self.stream.flow, Flow::Refused) {
            let location = host::header(MapType::HttpResponseHeaders, "location");
            self.check_answer(&status, location.as_deref())?;
            let named = self
                .config
                .as_ref()
                .and_then(|c| self.stream.session_named(c, &status, location.as_deref()));
            if let Some(Command::SetResponseHeader(name, value)) = named {
                host::set_header(MapType::HttpResponseHeaders, &name, Some(&value))?;
            }
        }
        match std::mem::replace(&mut self.stream.flow, Flow::Pass) {
            Flow::Chunk(flow) => {
                let Some(finish) = flow.finish else {
                    return Ok(Action::Continue);
                };
                if status != "202" {
                    return Ok(Action::Continue);
                }
                let Some(completion) = finish.completion else {
                    // The registry took the declared length before the body ended here: over
                    // HTTP/2, request trailers follow it. What it holds is an unfinished
                    // encryption; the session goes, and nothing is finished.
                    let config = self
                        .config
                        .clone()
                        .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
                    let location = host::header(MapType::HttpResponseHeaders, "location");
                    let abandon = self.stream.abandon_session(&config, location.as_deref());
                    self.apply(vec![abandon], Callback::Other);
                    return Err(OciError::new(
                        Code::BlobUploadInvalid,
                        "the upload's body did not end where the registry's did (request trailers are refused on writes to an encrypted repository); the upload is abandoned, push again without trailers",
                    ));
                };
                let location = host::header(MapType::HttpResponseHeaders, "location")
                    .and_then(|l| distribution::location_path(&l))
                    .ok_or_else(|| {
                        OciError::new(
                            Code::Unknown,
                            "the registry answered the upload without a Location",
                        )
                    })?;
                let stored = completion.stored_digest.to_string();
                let path =
                    distribution::rewrite_query(&location, &["digest"], &[("digest", &stored)]);
                self.registry_call("PUT", &path, None, None)?;
                self.stream.flow = Flow::Finishing {
                    repository: flow.repository,
                    completion,
                    upload: flow.upload_id.map(|id| (id, flow.had_state)),
                };
                // Held until the finishing PUT answers; then turned into the client's 201.
                Ok(Action::Pause)
            }
            Flow::Finishing {
                repository,
                completion,
                upload,
            } => {
                if status == "201" {
                    if self.durable() && completion.ledger.is_some() {
                        self.start_recording(repository, completion, upload)?;
                        return Ok(Action::Pause);
                    }
                    self.commit(&repository, &completion, upload.as_ref())?;
                }
                Ok(Action::Continue)
            }
            Flow::Known {
                repository,
                client_digest,
                entry,
                mounted,
            } => {
                let ok = if mounted {
                    status == "201"
                } else {
                    status == "200"
                };
                if ok {
                    if mounted && self.durable() {
                        // Ledgered in the registry like an upload, so any replica finishes the
                        // push; the client's 201 waits for it.
                        let completion = Completion {
                            client_digest,
                            stored_digest: entry.encrypted_digest,
                            ledger: Some(entry),
                        };
                        self.start_recording(repository, completion, None)?;
                        return Ok(Action::Pause);
                    }
                    if mounted {
                        ledgered::record(
                            self.config.as_deref(),
                            &repository,
                            &client_digest,
                            &entry,
                            &self.metrics,
                        )?;
                    }
                    answer_as_pushed("blobs", &repository, &client_digest, mounted)?;
                }
                Ok(Action::Continue)
            }
            _ => Ok(Action::Continue),
        }
    }

    /// An answer to a callout the adapter made (finishing and ledger-recording steps), matched
    /// by the flow that waits for it.
    fn on_callout(&mut self, body_size: usize) -> Result<(), OciError> {
        // Registry answers are read as bytes: a header that is not UTF-8 reads as absent.
        let headers = host::pairs(MapType::HttpCallResponseHeaders);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
        };
        let status = get(":status").unwrap_or_else(|| "503".to_string());
        match std::mem::replace(&mut self.stream.flow, Flow::Pass) {
            Flow::Finishing {
                repository,
                completion,
                upload,
            } => {
                if status != "201" {
                    if let Some((code, body)) = registry_error(&status, body_size) {
                        // The registry's own refusal (e.g. DIGEST_INVALID for a JSON blob whose
                        // digest the client got wrong) is the client's answer, as without us.
                        self.log(
                            LogLevel::Warn,
                            &format!(
                                "refused {}: the registry answered {code}",
                                self.stream.request
                            ),
                        );
                        // A 401 keeps the registry's challenge: the client needs it to fetch a
                        // fresh token (one that expired while the body streamed).
                        let challenge = (code == 401)
                            .then(|| {
                                headers
                                    .iter()
                                    .find(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                            })
                            .flatten()
                            .map(|(_, v)| v.as_slice());
                        host::reply_raw(code, &body, challenge);
                        self.stream.flow = Flow::Refused;
                        return Ok(());
                    }
                    return Err(registry_refusal("commit the encrypted blob", &status));
                }
                host::set_header(MapType::HttpResponseHeaders, ":status", Some("201"))?;
                host::set_header(MapType::HttpResponseHeaders, "range", None)?;
                host::set_header(MapType::HttpResponseHeaders, "docker-upload-uuid", None)?;
                host::set_header(MapType::HttpResponseHeaders, "content-length", Some("0"))?;
                if self.durable() && completion.ledger.is_some() {
                    return self.start_recording(repository, completion, upload);
                }
                self.commit(&repository, &completion, upload.as_ref())?;
                host::resume_response()?;
                Ok(())
            }
            Flow::Recording {
                repository,
                completion,
                upload,
                stage,
            } => {
                let next = match stage {
                    RecordingStage::ConfigSession => {
                        self.check_answer(&status, get("location").as_deref())?;
                        let location = get("location")
                            .filter(|_| status == "202")
                            .and_then(|l| distribution::location_path(&l))
                            .ok_or_else(|| {
                                ledger_refusal(
                                    "open a session for the ledger's empty config",
                                    &status,
                                )
                            })?;
                        let empty = Digest::of(ledger::EMPTY_CONFIG).to_string();
                        let path = distribution::rewrite_query(
                            &location,
                            &["digest"],
                            &[("digest", &empty)],
                        );
                        self.registry_call(
                            "PUT",
                            &path,
                            Some(ledger::EMPTY_CONFIG),
                            Some("application/octet-stream"),
                        )?;
                        RecordingStage::Config
                    }
                    RecordingStage::Config => {
                        if status != "201" {
                            return Err(ledger_refusal("store the ledger's empty config", &status));
                        }
                        SharedData.set(&empty_config_key(&repository), b"1")?;
                        self.put_ledger_manifest(&repository, &completion)?;
                        RecordingStage::Manifest
                    }
                    RecordingStage::Manifest => {
                        if status != "201" {
                            return Err(ledger_refusal(
                                "record the encrypted blob in the registry's ledger",
                                &status,
                            ));
                        }
                        self.commit(&repository, &completion, upload.as_ref())?;
                        return host::resume_response();
                    }
                };
                self.stream.flow = Flow::Recording {
                    repository,
                    completion,
                    upload,
                    stage: next,
                };
                Ok(())
            }
            other => {
                self.stream.flow = other;
                Ok(())
            }
        }
    }
}

/// A 4xx answer of the registry carrying an OCI error body, to hand to the client as it is.
fn registry_error(status: &str, body_size: usize) -> Option<(u32, Vec<u8>)> {
    let code: u32 = status.parse().ok().filter(|c| (400..500).contains(c))?;
    let body = host::call_body(body_size)?;
    let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
    doc.get("errors")?.as_array()?;
    Some((code, body))
}

/// Makes the held answer speak of what the client pushed: `Docker-Content-Digest` is the
/// client's digest (containerd refuses any other) and, when `location`, so is the `Location`.
fn answer_as_pushed(
    kind: &str,
    repository: &str,
    digest: &Digest,
    location: bool,
) -> Result<(), OciError> {
    let digest = digest.to_string();
    host::set_header(
        MapType::HttpResponseHeaders,
        "docker-content-digest",
        Some(&digest),
    )?;
    if location {
        let path = format!("/v2/{repository}/{kind}/{digest}");
        host::set_header(MapType::HttpResponseHeaders, "location", Some(&path))?;
    }
    Ok(())
}

/// A failure while recording a committed blob in the registry's ledger: the ciphertext is
/// stored (orphaned until garbage collection), so "nothing was stored" would mislead.
fn ledger_refusal(what: &str, status: &str) -> OciError {
    OciError::new(
        registry_refusal(what, status).code,
        format!(
            "the registry answered {status} when the gateway tried to {what}; the encrypted blob was stored but not recorded, push again"
        ),
    )
}

/// Shared-data key marking that a repository holds the ledger manifests' empty config.
fn empty_config_key(repository: &str) -> String {
    format!("ocicrypt/ledger-config/{repository}")
}

impl Context for Gateway {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some((mut lookup, expected)) = self.keys.lookup.take() {
            if token == expected {
                let (status, body) = keys::response(body_size);
                let next = lookup.on_response(status, &body);
                let pending = match self.config.clone().and_then(|c| c.key_service.clone()) {
                    Some(ks) => self.keys.drive(&ks, lookup, next),
                    None => false,
                };
                if !pending {
                    let commands = self.with_env(|stream, env| stream.on_keys_ready(env));
                    self.apply(commands, Callback::Other);
                }
                return;
            }
            self.keys.lookup = Some((lookup, expected));
        }
        if let Some(i) = self.callouts.iter().position(|(t, _)| *t == token) {
            let (_, id) = self.callouts.swap_remove(i);
            if !self.stream.awaits(id) {
                return;
            }
            // Host contract: an answer body the host fails to hand over refuses the request
            // (a manifest read before a delete must not pass for an empty one).
            let body = match host::body(BufferType::HttpCallResponseBody, body_size) {
                Ok(body) => body,
                Err(e) => {
                    self.refuse(&e);
                    return;
                }
            };
            // Registry answers are read as bytes: a header that is not UTF-8 reads as absent.
            let answer = CalloutAnswer {
                headers: host::pairs(MapType::HttpCallResponseHeaders),
                body,
            };
            let commands = self.with_env(|stream, env| stream.on_callout(id, &answer, env));
            self.apply(commands, Callback::Other);
            return;
        }
        if let Err(e) = self.on_callout(body_size) {
            self.refuse(&e);
        }
    }
}

impl HttpContext for Gateway {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(all(feature = "test-trap", target_arch = "wasm32"))]
        if host::header_bytes(MapType::HttpRequestHeaders, "x-ocicrypt-test-trap").is_some() {
            core::arch::wasm32::unreachable();
        }
        let head = RequestHead {
            headers: host::pairs(MapType::HttpRequestHeaders),
            end_of_stream,
        };
        let commands = self.with_env(|stream, env| stream.on_request_headers(head, env));
        self.apply(commands, Callback::Stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let read = || host::body(BufferType::HttpRequestBody, body_size);
        let commands = self
            .with_env(|stream, env| stream.on_request_body(body_size, end_of_stream, &read, env));
        self.apply(commands, Callback::Stream)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let commands = self.stream.on_request_trailers();
        self.apply(commands, Callback::Stream)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let adapter_flow = match &self.stream.flow {
            Flow::Chunk(flow) => flow.finish.is_some(),
            Flow::Finishing { .. } | Flow::Known { .. } => true,
            _ => false,
        };
        if !adapter_flow {
            let head = ResponseHead {
                headers: host::pairs(MapType::HttpResponseHeaders),
            };
            let commands = self.with_env(|stream, env| stream.on_response_headers(&head, env));
            return self.apply(commands, Callback::Stream);
        }
        match self.on_response() {
            Ok(action) => action,
            Err(e) => self.refuse(&e),
        }
    }
}
