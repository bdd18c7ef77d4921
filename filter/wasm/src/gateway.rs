//! One HTTP stream through the gateway: the host side of [`ocicrypt_core::gateway::Stream`].
//!
//! The core's machine decides every flow (the request line, the bodies, the responses, the
//! finishing and ledger callouts); this file turns host callbacks into its events and carries
//! out its commands.
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use ocicrypt_core::config::Config;
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::prefetch::Keystream;
use ocicrypt_core::gateway::{
    CalloutAnswer, CalloutId, Command, Env, Level, Metric, RequestHead, ResponseHead, Stream,
};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use rand_core::OsRng;

use crate::host::{self, SharedData};
use crate::keys::{self, StreamKeys};
use crate::metrics::Metrics;
use crate::prefetch::{HostQueues, SharedWorker};

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
            keys: StreamKeys::new(id, config.clone(), metrics.clone()),
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
                Command::RemoveResponseHeader(name) => {
                    host::set_header(MapType::HttpResponseHeaders, &name, None)
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
                Command::Relay {
                    status,
                    body,
                    challenge,
                } => {
                    host::reply_raw(u32::from(status), &body, challenge.as_deref());
                    Ok(())
                }
                Command::ResumeResponse => host::resume_response(),
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
                        Metric::LayerEncrypted(size) => self.metrics.layer_encrypted(size),
                        Metric::BlobPassed => self.metrics.blob_passed(),
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
}

impl Context for Gateway {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(pending) = self.keys.on_answer(token, body_size) {
            if !pending {
                let commands = self.with_env(|stream, env| stream.on_keys_ready(env));
                self.apply(commands, Callback::Other);
            }
            return;
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
        let head = ResponseHead {
            headers: host::pairs(MapType::HttpResponseHeaders),
        };
        let commands = self.with_env(|stream, env| stream.on_response_headers(&head, env));
        self.apply(commands, Callback::Stream)
    }
}
