//! One HTTP stream through the gateway: which flow it is, and the host contract of each step.
use std::rc::Rc;
use std::time::Duration;

use ocicrypt_core::config::{Config, KeyServiceConfig};
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::{self, Route, UploadMethod};
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::form::{self, Query};
use ocicrypt_core::keyservice::{Lookup, Next};
use ocicrypt_core::ledger::{self, LedgerEntry};
use ocicrypt_core::manifest;
use ocicrypt_core::policy::{project_of, Action as PolicyAction};
use ocicrypt_core::recipients::{fingerprint, Recipient};
use ocicrypt_core::session;
use ocicrypt_core::upload::{self, BodyVerdict, ChunkStream, Completion, Store, UploadRecord};
use ocicrypt_core::upload_table;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use rand_core::OsRng;

use crate::host::{self, SharedData};
use crate::keys::{self, Resolution};
use crate::metrics::Metrics;
use crate::prefetch::{RequestPrefetch, SharedWorker};
use crate::uploads;

/// What the stream is doing.
enum Flow {
    /// Not an encrypted-repository write: untouched.
    Pass,
    /// A refusal was sent; ignore the rest of the stream.
    Refused,
    /// A refused request whose body is read (and dropped) before the refusal is sent.
    Draining(OciError),
    /// Request body bytes of an upload session (`PATCH`, or a `PUT`/`POST` turned into one).
    Chunk(Box<ChunkFlow>),
    /// `POST ?digest=` with a body: headers paused while a callout opens a session.
    OpeningSession {
        repository: String,
        client_digest: Digest,
        recipients: Vec<Recipient>,
    },
    /// `PUT ?digest=` with no body: the request line now names the ciphertext.
    Finishing {
        repository: String,
        completion: Completion,
        /// The session whose saved state is dropped once the registry committed the blob (a
        /// refused finish, e.g. a 401 the client retries with credentials, must find it again).
        upload: Option<(String, bool)>,
    },
    /// The blob is committed; its ledger entry is being written to the registry (replicas)
    /// while the client's answer waits.
    Recording {
        repository: String,
        completion: Completion,
        upload: Option<(String, bool)>,
        stage: RecordingStage,
    },
    /// A `HEAD` paused while the registry's ledger is read.
    HeadLookup { repository: String },
    /// A manifest `DELETE` by digest paused while the manifest is read: ledger manifests are
    /// the gateway's, and clients cannot delete them.
    DeleteCheck { repository: String, token: u32 },
    /// A `HEAD` or mount answered from the ledger: the registry is asked about the ciphertext.
    Known {
        repository: String,
        client_digest: Digest,
        entry: LedgerEntry,
        /// A mount (answer 201, record the blob in this repository) rather than a `HEAD`.
        mounted: bool,
    },
    /// `PUT` of a manifest: buffered, then rewritten.
    Manifest {
        repository: String,
        content_type: String,
        /// The digest the client pushed it by (`PUT …/manifests/sha256:…`).
        by_digest: Option<Digest>,
        /// Digest of the body the client pushed, once seen: the answer names it (containerd
        /// refuses a `Docker-Content-Digest` other than its own).
        client_digest: Option<Digest>,
        /// What was stored, recorded in the ledger once the registry took it.
        entry: Option<LedgerEntry>,
        /// Fingerprint of the project's current recipients: a layer the ledger holds for other
        /// recipients (before a rotation) must be pushed again.
        recipients: String,
    },
}

struct ChunkFlow {
    repository: String,
    /// The session had saved state before this request (for the in-flight gauge).
    had_state: bool,
    upload_id: Option<String>,
    stream: Option<ChunkStream>,
    /// Set when the client meant to finish the blob with this request (monolithic upload).
    finish: Option<Finish>,
}

struct Finish {
    client_digest: Digest,
    /// Resolved before the body: a body callback cannot wait for the key service.
    recipients: Vec<Recipient>,
    completion: Option<Completion>,
}

/// Where the recording of a blob in the registry's ledger stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RecordingStage {
    /// A session for the ledger manifests' empty config is being opened.
    ConfigSession,
    /// The empty config is being uploaded.
    Config,
    /// The ledger manifest is being written.
    Manifest,
}

/// The per-stream context.
pub struct Gateway {
    id: u32,
    /// A key-service lookup the paused request waits for, with its callout token.
    lookup: Option<(Lookup, u32)>,
    /// Whether this request already ran a lookup (then the record decides).
    looked_up: bool,
    /// Whether this request already read the registry's ledger for its blob.
    ledger_checked: bool,
    /// Ledger reads in flight for the held manifest: (callout token, plaintext digest).
    ledger_reads: Vec<(u32, Digest)>,
    /// The manifest body held while its ledger entries are read from the registry.
    held_manifest: Option<Vec<u8>>,
    /// `end_of_stream` of the paused request headers.
    paused_eos: bool,
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// `METHOD path` of the request, for log lines.
    request: String,
    flow: Flow,
    authority: String,
    authorization: Option<String>,
    /// Keystream prefetch of this worker.
    worker: SharedWorker,
    /// This request's part in it.
    prefetch: RequestPrefetch,
    /// The request's `Content-Length` (headers cannot be read in body callbacks).
    content_length: Option<u64>,
    /// The repository of a request the gateway acts on (an encrypted repository): every answer
    /// the registry gives it is checked before the client sees it.
    encrypted: Option<String>,
    /// The path the request went upstream with (a session to delete when the registry's answer
    /// cannot be followed).
    upstream_path: String,
    /// The upload session this stream holds the claim of (released when the stream ends).
    claimed: Option<String>,
    /// Bytes of this worker's manifest budget the stream holds (released when it ends).
    manifest_reserved: usize,
}

thread_local! {
    /// Manifest bytes the streams of this worker VM hold in Envoy's buffers right now. Each VM
    /// is one thread, and a reloaded VM starts from zero: nothing a trap leaves behind counts.
    static HELD_MANIFEST_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Manifest bytes one worker may hold at once, whatever the number of streams: 200 connections
/// each holding a 4 MiB manifest took Envoy from 302 to 1 133 MiB. At least two manifests of
/// `limits.max_manifest_bytes`.
const MANIFEST_BUDGET_PER_WORKER: usize = 32 * 1024 * 1024;

impl Drop for Gateway {
    fn drop(&mut self) {
        self.prefetch.end(&self.worker, &self.metrics);
        if let Some(id) = self.claimed.take() {
            release_session(&id);
        }
        let reserved = std::mem::take(&mut self.manifest_reserved);
        HELD_MANIFEST_BYTES.with(|held| held.set(held.get().saturating_sub(reserved)));
    }
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
            lookup: None,
            looked_up: false,
            ledger_checked: false,
            ledger_reads: Vec::new(),
            held_manifest: None,
            paused_eos: false,
            config,
            metrics,
            request: String::new(),
            flow: Flow::Pass,
            authority: String::new(),
            authorization: None,
            worker,
            prefetch: RequestPrefetch::default(),
            content_length: None,
            encrypted: None,
            upstream_path: String::new(),
            claimed: None,
            manifest_reserved: 0,
        }
    }

    fn log(&self, level: LogLevel, msg: &str) {
        host::log(level, &format!("[ocicrypt #{}] {msg}", self.id));
    }

    fn refuse(&mut self, err: &OciError) -> Action {
        // One line per refusal: the request (repository and digest are in it) and the reason.
        self.log(LogLevel::Warn, &format!("refused {}: {err}", self.request));
        self.metrics.refused(err.code);
        host::reply_error(err);
        self.flow = Flow::Refused;
        Action::Pause
    }

    /// The project's recipients, or `None` when a key-service lookup was started (the
    /// request stays paused; [`Gateway::on_lookup_done`] re-runs the request line).
    fn recipients(
        &mut self,
        config: &Config,
        repository: &str,
        end_of_stream: bool,
    ) -> Result<Option<Vec<Recipient>>, OciError> {
        let project = project_of(repository).to_string();
        loop {
            match keys::resolve(config, &project, keys::now(), self.looked_up)? {
                Resolution::Ready(r) => return Ok(Some(r)),
                Resolution::LookUp => {
                    let Some(ks) = &config.key_service else {
                        return Err(OciError::new(
                            Code::Unknown,
                            "key lookup without a key service",
                        ));
                    };
                    // One lookup per request: after it, the record decides.
                    self.looked_up = true;
                    let (lookup, next) = keys::start(ks, vec![project.clone()], keys::now());
                    if self.drive_lookup(ks, lookup, next) {
                        self.paused_eos = end_of_stream;
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Runs a lookup until it waits on a callout (`true`) or is finished and published.
    fn drive_lookup(&mut self, ks: &KeyServiceConfig, lookup: Lookup, next: Next) -> bool {
        match keys::drive(ks, lookup, next) {
            keys::Driven::Waiting(lookup, token) => {
                self.lookup = Some((*lookup, token));
                true
            }
            keys::Driven::Done(records, metadata) => {
                for (project, record) in &records {
                    if let Some(error) = &record.error {
                        self.log(
                            LogLevel::Warn,
                            &format!("key service: project {project}: {error}"),
                        );
                    }
                }
                self.metrics.key_lookup(&records, metadata.as_ref());
                keys::publish(&records, metadata);
                false
            }
        }
    }

    /// A lookup the paused request waited for is finished: decide the request again.
    fn on_lookup_done(&mut self) -> Result<(), OciError> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
        match self.on_request_line(&config, self.paused_eos)? {
            Action::Continue => host::resume_request(),
            _ => Ok(()),
        }
    }

    /// Decides the flow from the request line. Errors become local replies.
    fn on_request_line(
        &mut self,
        config: &Config,
        end_of_stream: bool,
    ) -> Result<Action, OciError> {
        let method = host::header_bytes(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
        let path = host::header_bytes(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let read = method == b"GET" || method == b"HEAD";
        let (Ok(method), Ok(path)) = (String::from_utf8(method), String::from_utf8(path)) else {
            // Reads pass untouched; a write whose request line the gateway cannot read could
            // land in an encrypted repository unseen.
            if read {
                return Ok(Action::Continue);
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
        if distribution::is_ambiguous_write(&method, &path) {
            // The registry may decode `%2F`, collapse `//` or clean `..` into a repository name
            // other than the one routed here (`plain/x/../../demo/y` routes as a passthrough
            // name): such a write could land in an encrypted repository unencrypted.
            return Err(OciError::new(
                Code::Denied,
                "write request with an encoded or non-canonical path; use the plain /v2/<name>/... form",
            ));
        }
        let route = distribution::route(&method, &path);
        // Upload state stays out of log lines: distribution's `_state` and the gateway's sealed
        // state (a Location read from a log must not continue anyone's upload).
        self.request = format!(
            "{method} {}",
            distribution::rewrite_query(&path, &["_state", upload::STATE_PARAM], &[])
        );
        let repository = match &route {
            Route::UploadStart { repository, .. }
            | Route::Upload { repository, .. }
            | Route::BlobHead { repository, .. }
            | Route::ManifestPut { repository, .. } => repository.clone(),
            Route::Other => {
                if let Some(repository) = manifest_delete(&method, &path)
                    .filter(|r| config.policy.action(r) == PolicyAction::Encrypt)
                {
                    // A manifest deleted by digest may be one of the gateway's ledger manifests:
                    // read it (with the client's credentials) before letting the delete go.
                    self.encrypted = Some(repository.clone());
                    self.authority = interpreted_header(":authority", Code::BlobUploadInvalid)?
                        .unwrap_or_default();
                    self.authorization =
                        interpreted_header("authorization", Code::BlobUploadInvalid)?;
                    let token = self.registry_call("GET", &path, None, None)?;
                    self.paused_eos = end_of_stream;
                    self.flow = Flow::DeleteCheck { repository, token };
                    return Ok(Action::Pause);
                }
                return Ok(Action::Continue);
            }
        };
        if config.policy.action(&repository) != PolicyAction::Encrypt {
            return Ok(Action::Continue);
        }
        self.encrypted = Some(repository.clone());
        self.upstream_path = path.clone();
        self.authority =
            interpreted_header(":authority", Code::BlobUploadInvalid)?.unwrap_or_default();
        self.authorization = interpreted_header("authorization", Code::BlobUploadInvalid)?;
        // The parameters the registry acts on, read as it reads them (uploads only: manifests
        // and HEADs carry none it reads).
        let query = match &route {
            Route::UploadStart { .. } | Route::Upload { .. } => {
                if form_body_sent() {
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
        let has_body = !end_of_stream
            && host::header(MapType::HttpRequestHeaders, "content-length")
                .is_none_or(|v| v.trim() != "0");

        match route {
            Route::UploadStart { .. } => {
                let digest = query.get("digest").map(str::to_string);
                let mount = query.get("mount").map(str::to_string);
                // Fail before any byte is sent when the project cannot be encrypted to.
                let Some(recipients) = self.recipients(config, &repository, end_of_stream)? else {
                    return Ok(Action::Pause);
                };
                if let (Some(mount), Some(from)) = (&mount, query.get("from")) {
                    if let Some(action) =
                        self.mount_encrypted(&repository, mount, from, &path, &recipients)?
                    {
                        return Ok(action);
                    }
                }
                if mount.is_some() {
                    // A mount would make the source repository's blob appear here as it is: a
                    // plaintext blob in an encrypted repository. A normal upload instead.
                    let new_path = distribution::rewrite_query(&path, &["mount", "from"], &[]);
                    self.log(
                        LogLevel::Info,
                        &format!("{repository}: cross-repository mount turned into an upload"),
                    );
                    self.metrics.mount_rewritten();
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&new_path))?;
                }
                match digest {
                    Some(d) if has_body => {
                        let client_digest = parse_client_digest(&d)?;
                        self.open_session(&repository, client_digest, recipients)?;
                        return Ok(Action::Pause);
                    }
                    Some(_) => {
                        let new_path =
                            distribution::rewrite_query(&path, &["digest", "mount", "from"], &[]);
                        host::set_header(MapType::HttpRequestHeaders, ":path", Some(&new_path))?;
                    }
                    None => {}
                }
                Ok(Action::Continue)
            }
            Route::Upload {
                method: UploadMethod::Patch,
                id,
                ..
            } => {
                let (record, had_state) = load_record(config, &id, &repository, &path, &query)?;
                self.claim_session(&id)?;
                let start = interpreted_header("content-range", Code::BlobUploadInvalid)?
                    .and_then(|v| distribution::content_range_start(&v));
                let stream = ChunkStream::new(record, start)?
                    .accepting_encrypted(config.policy.accepts_encrypted(&repository));
                self.flow = Flow::Chunk(Box::new(ChunkFlow {
                    repository,
                    had_state,
                    upload_id: Some(id),
                    stream: Some(stream),
                    finish: None,
                }));
                Ok(Action::Continue)
            }
            Route::Upload {
                method: UploadMethod::Put,
                id,
                ..
            } => {
                let client_digest = parse_client_digest(query.get("digest").unwrap_or(""))?;
                let Some(recipients) = self.recipients(config, &repository, end_of_stream)? else {
                    return Ok(Action::Pause);
                };
                let (record, had_state) = load_record(config, &id, &repository, &path, &query)?;
                self.claim_session(&id)?;
                if has_body {
                    // The digest in the request line must become the ciphertext's, which is
                    // known only after the body; the request line cannot change once the body
                    // is seen. Send the body as a PATCH, and finish by callout on the 202.
                    let start = interpreted_header("content-range", Code::BlobUploadInvalid)?
                        .and_then(|v| distribution::content_range_start(&v));
                    let stream = ChunkStream::new(record, start)?
                        .accepting_encrypted(config.policy.accepts_encrypted(&repository));
                    let new_path =
                        distribution::rewrite_query(&path, &["digest", upload::STATE_PARAM], &[]);
                    patch_request(&new_path)?;
                    self.flow = Flow::Chunk(Box::new(ChunkFlow {
                        repository,
                        had_state,
                        upload_id: Some(id),
                        stream: Some(stream),
                        finish: Some(Finish {
                            client_digest,
                            recipients,
                            completion: None,
                        }),
                    }));
                } else {
                    let completion =
                        upload::complete(record, client_digest, &recipients, &mut OsRng)?;
                    let stored = completion.stored_digest.to_string();
                    let new_path = distribution::rewrite_query(
                        &path,
                        &["digest", upload::STATE_PARAM],
                        &[("digest", &stored)],
                    );
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&new_path))?;
                    self.flow = Flow::Finishing {
                        repository,
                        completion,
                        upload: Some((id, had_state)),
                    };
                }
                Ok(Action::Continue)
            }
            Route::Upload {
                method: UploadMethod::Delete,
                id,
                ..
            } => {
                let had = uploads::has(&id, self.idle_seconds());
                self.drop_state(&id, had)?;
                Ok(Action::Continue)
            }
            Route::Upload {
                method: UploadMethod::Get,
                ..
            } => Ok(Action::Continue),
            Route::BlobHead { digest, .. } => {
                // A re-push: the client asks for the plaintext digest; what the gateway stored
                // for it in this repository is the ciphertext. Ask the registry about that, so
                // the client skips the upload only if the encrypted blob is really there.
                let Ok(client_digest) = Digest::parse(&digest) else {
                    return Ok(Action::Continue);
                };
                let Some(entry) = blob_entry(&repository, &client_digest) else {
                    if self.durable() && !self.ledger_checked {
                        // Another replica (or this one before a restart) may have encrypted it:
                        // read the registry's ledger, then decide again.
                        self.ledger_checked = true;
                        self.paused_eos = end_of_stream;
                        let path = format!(
                            "/v2/{repository}/manifests/{}",
                            ledger::ledger_tag(&client_digest)
                        );
                        let token = self.registry_call("GET", &path, None, None)?;
                        self.ledger_reads = vec![(token, client_digest)];
                        self.flow = Flow::HeadLookup { repository };
                        return Ok(Action::Pause);
                    }
                    return Ok(Action::Continue);
                };
                let Some(recipients) = self.recipients(config, &repository, end_of_stream)? else {
                    return Ok(Action::Pause);
                };
                if entry.recipients.as_deref() != Some(fingerprint(&recipients).as_str()) {
                    // Wrapped to recipients the project no longer has: let the client upload it
                    // again, to be encrypted to the current ones.
                    return Ok(Action::Continue);
                }
                let path = format!("/v2/{repository}/blobs/{}", entry.encrypted_digest);
                host::set_header(MapType::HttpRequestHeaders, ":path", Some(&path))?;
                self.flow = Flow::Known {
                    repository,
                    client_digest,
                    entry,
                    mounted: false,
                };
                Ok(Action::Continue)
            }
            Route::ManifestPut { reference, .. } => {
                // Before any header changes: a lookup re-runs this from the request line.
                let Some(recipients) = self.recipients(config, &repository, end_of_stream)? else {
                    return Ok(Action::Pause);
                };
                let by_digest = if reference.starts_with("sha256:") {
                    // Encrypting changes the manifest's digest, and the request line cannot
                    // change once the body is seen: store it under the gateway's ledger tag
                    // for the pushed digest (which also records the mapping in the registry).
                    let pushed = parse_client_digest(&reference)?;
                    let path =
                        format!("/v2/{repository}/manifests/{}", ledger::ledger_tag(&pushed));
                    host::set_header(MapType::HttpRequestHeaders, ":path", Some(&path))?;
                    Some(pushed)
                } else {
                    None
                };
                if !has_body {
                    return Err(OciError::new(
                        Code::ManifestInvalid,
                        "manifest PUT without a body",
                    ));
                }
                let limit = config.max_manifest_bytes;
                let declared = interpreted_header("content-length", Code::ManifestInvalid)?
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if let Some(len) = declared {
                    if len > limit {
                        return Err(too_large(len, limit));
                    }
                }
                // Held in memory until its end: counted against the worker's budget (a body
                // of unknown length counts as the largest allowed).
                self.reserve_manifest(declared.unwrap_or(limit), limit)?;
                let content_type =
                    interpreted_header("content-type", Code::ManifestInvalid)?.unwrap_or_default();
                let stored_type = manifest::stored_content_type(&content_type).to_string();
                host::set_header(
                    MapType::HttpRequestHeaders,
                    "content-type",
                    Some(&stored_type),
                )?;
                // The rewritten body has another length; without Content-Length Envoy streams
                // it chunked to the registry.
                host::set_header(MapType::HttpRequestHeaders, "content-length", None)?;
                self.flow = Flow::Manifest {
                    repository,
                    content_type,
                    by_digest,
                    client_digest: None,
                    entry: None,
                    recipients: fingerprint(&recipients),
                };
                Ok(Action::Continue)
            }
            Route::Other => Ok(Action::Continue),
        }
    }

    fn open_session(
        &mut self,
        repository: &str,
        client_digest: Digest,
        recipients: Vec<Recipient>,
    ) -> Result<(), OciError> {
        self.registry_call(
            "POST",
            &format!("/v2/{repository}/blobs/uploads/"),
            None,
            None,
        )?;
        self.flow = Flow::OpeningSession {
            repository: repository.to_string(),
            client_digest,
            recipients,
        };
        Ok(())
    }

    fn on_chunk_body(&mut self, body_size: usize, end_of_stream: bool) -> Result<Action, OciError> {
        let Flow::Chunk(flow) = &mut self.flow else {
            return Ok(Action::Continue);
        };
        let Some(stream) = flow.stream.as_mut() else {
            return Ok(Action::Continue);
        };
        let mut buf = host::body(BufferType::HttpRequestBody, body_size)?;
        let verdict = self.prefetch.encrypt(
            &self.worker,
            stream,
            &mut buf,
            end_of_stream,
            self.content_length,
        )?;
        if end_of_stream {
            self.prefetch.end(&self.worker, &self.metrics);
        }
        match verdict {
            BodyVerdict::Replaced => host::set_body(BufferType::HttpRequestBody, body_size, &buf)?,
            BodyVerdict::Unchanged => {}
        }
        if end_of_stream {
            if let Some(finish) = flow.finish.as_mut() {
                if let Some(stream) = flow.stream.take() {
                    let completion = upload::complete(
                        stream.into_record(),
                        finish.client_digest,
                        &finish.recipients,
                        &mut OsRng,
                    )?;
                    finish.completion = Some(completion);
                }
            }
        }
        Ok(Action::Continue)
    }

    fn on_manifest_body(
        &mut self,
        body_size: usize,
        end_of_stream: bool,
    ) -> Result<Action, OciError> {
        let limit = self.config.as_ref().map_or(0, |c| c.max_manifest_bytes);
        if body_size > limit {
            let err = too_large(body_size, limit);
            if end_of_stream {
                return Err(err);
            }
            // Drop what was held and the rest as it comes; answer at the end (see Draining).
            host::set_body(BufferType::HttpRequestBody, body_size, &[])?;
            self.flow = Flow::Draining(err);
            return Ok(Action::Continue);
        }
        if !end_of_stream {
            return Ok(Action::Pause);
        }
        let Flow::Manifest {
            repository,
            by_digest,
            client_digest,
            ..
        } = &mut self.flow
        else {
            return Ok(Action::Continue);
        };
        let body = host::body(BufferType::HttpRequestBody, body_size)?;
        if let Some(pushed) = by_digest {
            // The registry no longer checks the body against the digest (the path names a
            // tag now): check it here, or a client could point a digest at any manifest.
            manifest::verify_pushed_digest(&body, pushed).map_err(|e| e.to_oci())?;
        }
        *client_digest = Some(Digest::of(&body));
        // Before anything parses it: a body of countless tiny values would grow the VM for good.
        manifest::check_value_count(&body, manifest::MAX_JSON_VALUES).map_err(|e| e.to_oci())?;
        let repo = repository.clone();
        if self.durable() {
            // Replicas: what another replica (or this one before a restart) encrypted is in the
            // registry's ledger; fetch what this process does not know, then rewrite.
            // Bounded: a manifest naming many unknown digests is refused before any lookup.
            let max = self.config.as_ref().map_or(0, |c| c.max_ledger_lookups);
            let known = |d: &Digest| ledger_entry(&repo, d).is_some();
            let missing =
                ledger::referenced_digests_bounded(&body, &known, max).map_err(|e| e.to_oci())?;
            if !missing.is_empty() {
                let mut waiting = Vec::new();
                for d in missing {
                    let path = format!("/v2/{repo}/manifests/{}", ledger::ledger_tag(&d));
                    let token = self.registry_call("GET", &path, None, None)?;
                    waiting.push((token, d));
                }
                self.ledger_reads = waiting;
                self.held_manifest = Some(body);
                return Ok(Action::Pause);
            }
        }
        let new_body = self.rewrite_manifest(&body)?;
        host::set_body(BufferType::HttpRequestBody, body_size, &new_body)?;
        Ok(Action::Continue)
    }

    /// Rewrites the manifest the stream holds with the ledger as it is now.
    fn rewrite_manifest(&mut self, body: &[u8]) -> Result<Vec<u8>, OciError> {
        let Flow::Manifest {
            repository,
            content_type,
            entry,
            recipients,
            ..
        } = &mut self.flow
        else {
            return Err(OciError::new(
                Code::Unknown,
                "manifest rewrite outside a manifest push",
            ));
        };
        let repo = repository.clone();
        // A layer wrapped for recipients the project no longer has is not reused: the image
        // would open only with the removed keys. The client uploads it again (its HEAD now
        // answers 404), to be encrypted for the current ones.
        let stale = std::cell::RefCell::new(Vec::new());
        let lookup = |d: &Digest| {
            let found = ledger_entry(&repo, d)?;
            if found.media_type.is_none()
                && found.recipients.as_deref() != Some(recipients.as_str())
            {
                stale.borrow_mut().push(*d);
                return None;
            }
            Some(found)
        };
        let options = self
            .config
            .as_ref()
            .map(|c| c.rewrite_options(&repo))
            .unwrap_or_default();
        let rewritten = manifest::rewrite_with(body, content_type, &lookup, &options).map_err(|e| {
            match stale.borrow().first() {
                Some(d) => OciError::new(
                    Code::ManifestInvalid,
                    format!("layer {d} was encrypted for recipients project {:?} no longer has (a key rotation); push the image again and the gateway encrypts it for the current ones", project_of(&repo)),
                ),
                None => e.to_oci(),
            }
        })?;
        *entry = Some(LedgerEntry::for_manifest(&rewritten));
        self.metrics.manifest_rewritten();
        self.log(
            LogLevel::Info,
            &format!(
                "{repo}: manifest rewritten ({} encrypted layers, {} bytes, stored as {})",
                rewritten.encrypted_layers,
                rewritten.body.len(),
                Digest::of(&rewritten.body)
            ),
        );
        Ok(rewritten.body)
    }

    /// Whether the ledger is kept in the registry too (replicas share `replicas.state_key`).
    fn durable(&self) -> bool {
        self.config.as_ref().is_some_and(|c| c.state_key.is_some())
    }

    /// A callout to the registry with the client's credentials.
    fn registry_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Result<u32, OciError> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| OciError::new(Code::Unknown, "no configuration"))?;
        let len = body.map_or(0, <[u8]>::len).to_string();
        let mut headers = vec![
            (":method", method),
            (":path", path),
            (":authority", self.authority.as_str()),
            ("accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"),
        ];
        // A bodiless POST/PUT still says so (distribution wants a length on uploads).
        if method != "GET" {
            headers.push(("content-length", len.as_str()));
        }
        if let Some(ct) = content_type {
            headers.push(("content-type", ct));
        }
        if let Some(auth) = &self.authorization {
            headers.push(("authorization", auth.as_str()));
        }
        host::dispatch(
            &config.registry.cluster,
            headers,
            body,
            Duration::from_millis(config.registry.timeout_ms),
        )
        .map_err(|()| {
            OciError::new(
                Code::Unavailable,
                "could not reach the registry; nothing was stored",
            )
        })
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
        self.flow = Flow::Recording {
            repository,
            completion,
            upload,
            stage,
        };
        Ok(())
    }

    fn put_ledger_manifest(
        &self,
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

    /// A mount of plaintext digest `mount` from `from` into `repository`: when both
    /// repositories belong to the same project (so the same recipients) and the gateway
    /// encrypted that blob in `from`, mount the ciphertext instead. `None`: not possible.
    fn mount_encrypted(
        &mut self,
        repository: &str,
        mount: &str,
        from: &str,
        path: &str,
        recipients: &[Recipient],
    ) -> Result<Option<Action>, OciError> {
        if project_of(from) != project_of(repository) || !distribution::is_repository_name(from) {
            return Ok(None);
        }
        let Ok(client_digest) = Digest::parse(mount) else {
            return Ok(None);
        };
        let Some(entry) = blob_entry(from, &client_digest) else {
            return Ok(None);
        };
        if entry.recipients.as_deref() != Some(fingerprint(recipients).as_str()) {
            return Ok(None);
        }
        let encrypted = entry.encrypted_digest.to_string();
        let new_path = distribution::rewrite_query(
            path,
            &["mount", "from", "digest"],
            &[("mount", &encrypted), ("from", from)],
        );
        host::set_header(MapType::HttpRequestHeaders, ":path", Some(&new_path))?;
        self.log(
            LogLevel::Info,
            &format!(
                "{repository}: mount of {client_digest} from {from} as its ciphertext {encrypted}"
            ),
        );
        self.flow = Flow::Known {
            repository: repository.to_string(),
            client_digest,
            entry,
            mounted: true,
        };
        Ok(Some(Action::Continue))
    }

    /// Reserves `bytes` of this worker's manifest budget for the stream.
    fn reserve_manifest(&mut self, bytes: usize, limit: usize) -> Result<(), OciError> {
        let budget = MANIFEST_BUDGET_PER_WORKER.max(limit.saturating_mul(2));
        HELD_MANIFEST_BYTES.with(|held| {
            let now = held.get();
            if now.saturating_add(bytes) > budget {
                return Err(OciError::new(
                    Code::Unavailable,
                    format!("the gateway holds {now} bytes of manifests being pushed on this worker (budget {budget}); nothing was stored, retry"),
                ));
            }
            held.set(now.saturating_add(bytes));
            self.manifest_reserved = self.manifest_reserved.saturating_add(bytes);
            Ok(())
        })
    }

    /// Claims upload session `id` for this stream: one request at a time per session, or two
    /// would encrypt from one offset with one keystream (see `ocicrypt_core::session`).
    fn claim_session(&mut self, id: &str) -> Result<(), OciError> {
        if self.claimed.as_deref() == Some(id) {
            return Ok(());
        }
        let key = session::slot_key(id);
        let now = keys::now().max(0).unsigned_abs();
        for _ in 0..8 {
            let Some((value, cas)) = SharedData.get_cas(&key) else {
                break;
            };
            let Some(next) = session::claim(value.as_deref().unwrap_or_default(), id, now) else {
                return Err(OciError::new(
                    Code::BlobUploadInvalid,
                    "another request of this upload session is in progress at the gateway; send one request at a time per upload",
                ));
            };
            // An absent slot is created only if still absent: a CAS token no live value has.
            let cas = if value.is_none() { u32::MAX } else { cas };
            if SharedData.set_cas(&key, &next, cas) {
                self.claimed = Some(id.to_string());
                return Ok(());
            }
        }
        Err(OciError::new(
            Code::Unavailable,
            "the gateway could not record this upload request (busy); retry",
        ))
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
            SharedData.set(
                &ledger::key(repository, &completion.client_digest),
                &entry.to_bytes(),
            )?;
            // Also under the ciphertext's digest: a re-push (or re-tag) of the image as stored
            // names the ciphertext, which the rewrite then recognises as the gateway's own.
            SharedData.set(
                &ledger::key(repository, &entry.encrypted_digest),
                &entry.to_bytes(),
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

    /// Checks an answer of the registry to a request in an encrypted repository before the
    /// client sees it: the registry is not trusted with plaintext, so it cannot send the client
    /// (and its next chunk) elsewhere — no redirect, no `Location` out of the repository or off
    /// the gateway. A session it opened elsewhere is deleted where the gateway can reach it.
    fn check_answer(&self, status: &str, location: Option<&str>) -> Result<(), OciError> {
        let Some(repository) = &self.encrypted else {
            return Ok(());
        };
        if status.starts_with('3') {
            return Err(OciError::new(
                Code::BadGateway,
                format!("the registry answered a redirect ({status}) to a write in encrypted repository {repository}; the gateway does not follow it, nothing more was sent"),
            ));
        }
        match location {
            Some(l) if !distribution::location_stays(l, &self.authority, repository) => {
                if let Some(path) = distribution::location_path(l).filter(|_| {
                    l.starts_with('/') || l.contains(&format!("://{}/", self.authority))
                }) {
                    // Best effort: nothing was sent to that session.
                    let _ = self.registry_call("DELETE", &path, None, None);
                }
                Err(OciError::new(
                    Code::BadGateway,
                    format!("the registry answered a Location outside encrypted repository {repository} (or off this gateway); the gateway does not follow it, nothing more was sent"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn on_response(&mut self) -> Result<Action, OciError> {
        let status = host::header(MapType::HttpResponseHeaders, ":status").unwrap_or_default();
        if !matches!(self.flow, Flow::Refused) {
            let location = host::header(MapType::HttpResponseHeaders, "location");
            self.check_answer(&status, location.as_deref())?;
        }
        match std::mem::replace(&mut self.flow, Flow::Pass) {
            Flow::Chunk(flow) if flow.finish.is_none() => {
                if status == "202" {
                    if let (Some(id), Some(stream)) = (flow.upload_id, flow.stream) {
                        // The registry must hold exactly the bytes the gateway encrypted: a
                        // state saved for another offset would reuse keystream.
                        let range = host::header(MapType::HttpResponseHeaders, "range");
                        if !range
                            .as_deref()
                            .is_some_and(|r| distribution::range_matches(r, stream.offset()))
                        {
                            let _ = self.registry_call("DELETE", &self.upstream_path, None, None);
                            return Err(OciError::new(
                                Code::BadGateway,
                                format!("the registry's Range ({}) does not match the {} bytes the gateway sent for this upload; the upload is abandoned, push again", range.as_deref().unwrap_or("none"), stream.offset()),
                            ));
                        }
                        let record = stream.into_record();
                        // The registry took the whole chunk: the client's next request of the
                        // session may come as soon as it sees this answer, on any worker.
                        if let Some(claimed) = self.claimed.take() {
                            release_session(&claimed);
                        }
                        if let Some(key) = self.config.as_ref().and_then(|c| c.state_key.as_ref()) {
                            // The state travels with the client, and only there: the next
                            // request of this upload may reach another replica, or this one
                            // after a restart, and no replica keeps anything per upload.
                            let token = upload::seal(&key.0, &id, &record, &mut OsRng);
                            let location = host::header(MapType::HttpResponseHeaders, "location")
                                .ok_or_else(|| {
                                OciError::new(
                                    Code::Unknown,
                                    "the registry answered a PATCH without a Location",
                                )
                            })?;
                            let sealed = distribution::rewrite_query(
                                &location,
                                &[upload::STATE_PARAM],
                                &[(upload::STATE_PARAM, &token)],
                            );
                            host::set_header(
                                MapType::HttpResponseHeaders,
                                "location",
                                Some(&sealed),
                            )?;
                        } else {
                            uploads::save(&id, &record, self.idle_seconds(), &self.metrics)?;
                        }
                    }
                }
                Ok(Action::Continue)
            }
            Flow::Chunk(flow) => {
                let Some(completion) = flow.finish.and_then(|f| f.completion) else {
                    return Ok(Action::Continue);
                };
                if status != "202" {
                    return Ok(Action::Continue);
                }
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
                self.flow = Flow::Finishing {
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
                        SharedData
                            .set(&ledger::key(&repository, &client_digest), &entry.to_bytes())?;
                    }
                    answer_as_pushed("blobs", &repository, &client_digest, mounted)?;
                }
                Ok(Action::Continue)
            }
            Flow::Manifest {
                repository,
                by_digest,
                client_digest: Some(client_digest),
                entry,
                ..
            } if status == "201" => {
                // Every stored manifest is ledgered, so an index naming it as a child, or a
                // referrer naming it as `subject`, can be rewritten to what was stored.
                if let Some(entry) = &entry {
                    SharedData.set(&ledger::key(&repository, &client_digest), &entry.to_bytes())?;
                }

                // What was stored has another digest; say it in a header of our own, and keep
                // the client's in Docker-Content-Digest.
                if let Some(stored) =
                    host::header(MapType::HttpResponseHeaders, "docker-content-digest")
                {
                    host::set_header(
                        MapType::HttpResponseHeaders,
                        "x-ocicrypt-stored-digest",
                        Some(&stored),
                    )?;
                }
                answer_as_pushed(
                    "manifests",
                    &repository,
                    &client_digest,
                    by_digest.is_some(),
                )?;
                Ok(Action::Continue)
            }
            _ => Ok(Action::Continue),
        }
    }

    fn on_callout(&mut self, token: u32, body_size: usize) -> Result<(), OciError> {
        // Registry answers are read as bytes: a header that is not UTF-8 reads as absent.
        let headers = host::pairs(MapType::HttpCallResponseHeaders);
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
        };
        let status = get(":status").unwrap_or_else(|| "503".to_string());
        if let Some(i) = self.ledger_reads.iter().position(|(t, _)| *t == token) {
            let (_, digest) = self.ledger_reads.swap_remove(i);
            if let Flow::Manifest { repository, .. } | Flow::HeadLookup { repository } = &self.flow
            {
                let key = self.config.as_ref().and_then(|c| c.state_key.as_ref());
                if let (true, Some(key)) = (status == "200", key) {
                    let body = host::body(BufferType::HttpCallResponseBody, body_size)?;
                    match ledger::read_stored(&key.0, repository, &digest, &body) {
                        Ok(entry) => {
                            SharedData.set(&ledger::key(repository, &digest), &entry.to_bytes())?
                        }
                        Err(ledger::StoredEntryError::Unauthenticated)
                            if matches!(self.flow, Flow::HeadLookup { .. }) =>
                        {
                            // Not the gateway's: the blob counts as unknown (it is uploaded,
                            // and encrypted, again).
                            self.log(
                                LogLevel::Warn,
                                &format!("{repository}: ledger record for {digest} is not the gateway's; ignored"),
                            );
                        }
                        Err(ledger::StoredEntryError::Unauthenticated) => {
                            // Not written by the gateway: stop here, trust none of it.
                            self.ledger_reads.clear();
                            self.held_manifest = None;
                            return Err(OciError::new(
                                Code::ManifestInvalid,
                                format!("the registry's ledger record for {digest} in {repository} was not written by this gateway (or was altered); nothing was stored"),
                            ));
                        }
                        Err(ledger::StoredEntryError::NotJson) => {}
                    }
                }
            }
            if let Flow::HeadLookup { .. } = self.flow {
                self.flow = Flow::Pass;
                return self.on_lookup_done();
            }
            if self.ledger_reads.is_empty() {
                let held = self.held_manifest.take().unwrap_or_default();
                let new_body = self.rewrite_manifest(&held)?;
                host::set_body(BufferType::HttpRequestBody, held.len(), &new_body)?;
                host::resume_request()?;
            }
            return Ok(());
        }
        match std::mem::replace(&mut self.flow, Flow::Pass) {
            Flow::DeleteCheck {
                repository,
                token: expected,
            } if expected == token => {
                if status == "200" {
                    let body = host::body(BufferType::HttpCallResponseBody, body_size)?;
                    if ledger::is_ledger_record(&body) {
                        return Err(OciError::new(
                            Code::Denied,
                            format!("this manifest of {repository} is the encrypting gateway's ledger; clients cannot delete it"),
                        ));
                    }
                }
                host::resume_request()
            }
            Flow::OpeningSession {
                repository,
                client_digest,
                recipients,
            } => {
                if status != "202" {
                    return Err(registry_refusal("open an upload session", &status));
                }
                self.check_answer(&status, get("location").as_deref())?;
                let location = get("location")
                    .and_then(|l| distribution::location_path(&l))
                    .ok_or_else(|| {
                        OciError::new(
                            Code::Unknown,
                            "the registry opened a session without a Location",
                        )
                    })?;
                let id = distribution::upload_id_of_location(&location);
                patch_request(&location)?;
                let stream = ChunkStream::new(UploadRecord::new(&repository), None)?;
                self.flow = Flow::Chunk(Box::new(ChunkFlow {
                    repository,
                    had_state: false,
                    upload_id: id,
                    stream: Some(stream),
                    finish: Some(Finish {
                        client_digest,
                        recipients,
                        completion: None,
                    }),
                }));
                host::resume_request()?;
                Ok(())
            }
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
                            &format!("refused {}: the registry answered {code}", self.request),
                        );
                        host::reply_raw(code, &body);
                        self.flow = Flow::Refused;
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
                self.flow = Flow::Recording {
                    repository,
                    completion,
                    upload,
                    stage: next,
                };
                Ok(())
            }
            other => {
                self.flow = other;
                Ok(())
            }
        }
    }
}

/// Turns the request into a `PATCH` of the upload session at `path`. Distribution refuses a
/// PATCH whose Content-Type is not octet-stream (curl and some clients send form types).
fn patch_request(path: &str) -> Result<(), OciError> {
    host::set_header(MapType::HttpRequestHeaders, ":method", Some("PATCH"))?;
    host::set_header(MapType::HttpRequestHeaders, ":path", Some(path))?;
    host::set_header(
        MapType::HttpRequestHeaders,
        "content-type",
        Some("application/octet-stream"),
    )
}

/// What this process's ledger records for `digest` in `repository` (an empty or unreadable
/// value counts as nothing).
fn ledger_entry(repository: &str, digest: &Digest) -> Option<LedgerEntry> {
    SharedData
        .get(&ledger::key(repository, digest))
        .and_then(|b| LedgerEntry::from_bytes(&b))
}

/// The ledger entry of a blob (not a manifest) the gateway encrypted in `repository`.
fn blob_entry(repository: &str, digest: &Digest) -> Option<LedgerEntry> {
    ledger_entry(repository, digest).filter(|e| e.media_type.is_none())
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

/// Shared-data key marking that a repository holds the ledger manifests' empty config.
fn empty_config_key(repository: &str) -> String {
    format!("ocicrypt/ledger-config/{repository}")
}

fn is_manifest_put() -> bool {
    host::header(MapType::HttpRequestHeaders, ":method").as_deref() == Some("PUT")
        && host::header(MapType::HttpRequestHeaders, ":path")
            .is_some_and(|p| p.contains("/manifests/"))
}

/// The state of upload `id` for this request, and whether this Envoy's shared data had any
/// (for the in-flight gauge): sealed in the URL the client echoes (replicas sharing
/// `replicas.state_key`), else saved in this Envoy's shared data, else fresh. The sealed
/// parameter is removed from the request before it is forwarded. Whatever its source, the state
/// must be at the offset the registry's `_state` says it will write at.
fn load_record(
    config: &Config,
    id: &str,
    repository: &str,
    path: &str,
    query: &Query,
) -> Result<(UploadRecord, bool), OciError> {
    let registry = query
        .get("_state")
        .and_then(distribution::registry_upload_state)
        .filter(|s| s.name == repository && s.uuid == id)
        .ok_or_else(|| {
            OciError::new(
                Code::BlobUploadInvalid,
                "the upload URL carries no registry state (_state) for this session; use the Location the registry answered",
            )
        })?;
    let token = query.get(upload::STATE_PARAM);
    let (record, found, had_state) = match (config.state_key.as_ref(), token) {
        (Some(key), Some(token)) => {
            let record = upload::unseal(&key.0, id, token)
                .filter(|r| r.repository == repository)
                .ok_or_else(|| {
                    OciError::new(
                        Code::BlobUploadInvalid,
                        "the gateway's upload state in this URL does not open (another gateway's key, or altered); restart the upload",
                    )
                })?;
            let stripped = distribution::rewrite_query(path, &[upload::STATE_PARAM], &[]);
            host::set_header(MapType::HttpRequestHeaders, ":path", Some(&stripped))?;
            (record, true, uploads::has(id, config.upload_idle_seconds))
        }
        _ => {
            let (record, found) = uploads::load(id, repository, config.upload_idle_seconds)?;
            (record, found, found)
        }
    };
    upload::bind_to_registry(&record, found, registry.offset)?;
    Ok((record, had_state))
}

/// The query parameters the registry or the gateway act on in an upload request: each may
/// appear once, unencoded.
const INTERPRETED_PARAMS: &[&str] = &["mount", "from", "digest", "_state", upload::STATE_PARAM];

/// A request header the gateway interprets, which must be UTF-8: a value that is not is refused
/// with `code` (400), naming the header; headers the gateway does not interpret are never read.
fn interpreted_header(name: &str, code: Code) -> Result<Option<String>, OciError> {
    host::header_strict(MapType::HttpRequestHeaders, name, code)
}

/// Whether any `Content-Type` of the request makes the registry read the body as a form.
fn form_body_sent() -> bool {
    host::pairs(MapType::HttpRequestHeaders)
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && form::is_form_content_type(v))
}

/// Releases this stream's claim of upload session `id`.
fn release_session(id: &str) {
    let key = session::slot_key(id);
    for _ in 0..8 {
        let Some((Some(value), cas)) = SharedData.get_cas(&key) else {
            return;
        };
        if SharedData.set_cas(&key, &session::release(&value, id), cas) {
            return;
        }
    }
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
    (reference.starts_with("sha256:") && distribution::is_repository_name(repository))
        .then(|| repository.to_string())
}

fn parse_client_digest(value: &str) -> Result<Digest, OciError> {
    Digest::parse(value).map_err(|e| OciError::new(Code::DigestInvalid, e.to_string()))
}

fn too_large(len: usize, limit: usize) -> OciError {
    OciError::new(
        Code::SizeInvalid,
        format!("manifest of {len} bytes exceeds the gateway's limit of {limit} bytes (limits.max_manifest_bytes)"),
    )
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

fn registry_refusal(what: &str, status: &str) -> OciError {
    let code = match status {
        "401" | "403" => Code::Denied,
        _ => Code::Unavailable,
    };
    OciError::new(
        code,
        format!(
            "the registry answered {status} when the gateway tried to {what}; nothing was stored"
        ),
    )
}

impl Context for Gateway {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some((mut lookup, expected)) = self.lookup.take() {
            if token == expected {
                let (status, body) = keys::response(body_size);
                let next = lookup.on_response(status, &body);
                let pending = match self.config.clone().and_then(|c| c.key_service.clone()) {
                    Some(ks) => self.drive_lookup(&ks, lookup, next),
                    None => false,
                };
                if !pending {
                    if let Err(e) = self.on_lookup_done() {
                        self.refuse(&e);
                    }
                }
                return;
            }
            self.lookup = Some((lookup, expected));
        }
        if let Err(e) = self.on_callout(token, body_size) {
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
        let Some(config) = self.config.clone() else {
            // Envoy only creates streams after a successful on_configure; refuse if not.
            return self.refuse(&OciError::new(
                Code::Unavailable,
                "the gateway has no valid configuration",
            ));
        };
        self.content_length = host::header(MapType::HttpRequestHeaders, "content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match self.on_request_line(&config, end_of_stream) {
            Ok(action) => action,
            Err(e) if !end_of_stream && is_manifest_put() => {
                // containerd may hang forever on an answer that comes before it has sent the
                // manifest body: take the body (forwarding none of it), answer at its end.
                self.flow = Flow::Draining(e);
                Action::Continue
            }
            Err(e) => self.refuse(&e),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let result = match self.flow {
            Flow::Chunk(_) => self.on_chunk_body(body_size, end_of_stream),
            Flow::Manifest { .. } => self.on_manifest_body(body_size, end_of_stream),
            Flow::Refused => return Action::Pause,
            Flow::Draining(ref e) => {
                if end_of_stream {
                    Err(e.clone())
                } else {
                    host::set_body(BufferType::HttpRequestBody, body_size, &[])
                        .map(|()| Action::Continue)
                }
            }
            _ => Ok(Action::Continue),
        };
        match result {
            Ok(action) => action,
            Err(e) => self.refuse(&e),
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // Trailers end a body without an end-of-stream body callback: a held manifest would go
        // on unrewritten, a monolithic upload unfinished, and a refusal waiting for the end of
        // the body (Draining) never sent. Writes to an encrypted repository are bodies without
        // trailers (no client sends them).
        match &self.flow {
            Flow::Refused => Action::Pause,
            Flow::Draining(e) => {
                let e = e.clone();
                self.refuse(&e)
            }
            _ if self.encrypted.is_some() => {
                let _ = host::set_body(BufferType::HttpRequestBody, usize::MAX, &[]);
                self.refuse(&OciError::new(
                    Code::BlobUploadInvalid,
                    "request trailers are refused on writes to an encrypted repository; send the body without trailers",
                ))
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.on_response() {
            Ok(action) => action,
            Err(e) => self.refuse(&e),
        }
    }
}
