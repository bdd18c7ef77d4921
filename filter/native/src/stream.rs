//! One HTTP stream through the gateway: Envoy's hooks become events of the core's
//! [`ocicrypt_core::gateway::Stream`], and its commands become Envoy callbacks. The machine
//! decides every flow; this file only translates, as the wasm adapter's `gateway.rs` does.
//!
//! Host contract (Envoy 1.40 dynamic modules):
//! - A local reply runs the encoder filters, ours included, before `send_response` returns, and
//!   `continue_decoding` may end in a local reply of the router: the hooks re-enter. So the
//!   stream's state is borrowed per hook, and the callbacks that can re-enter (local replies,
//!   resuming) run once the borrow is over, in the machine's order. A callout answer that
//!   arrives while the state is borrowed (a callout failing inline) waits in a mailbox.
//! - After a local reply nothing calls back into the stream (Envoy #46439, #46548): later hooks
//!   pass, later answers are dropped.
//! - Response and completion hooks may come for a stream whose request never reached the
//!   filter (#45854): the machine starts from its initial state.
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::gateway::plugin::stream_line;
use ocicrypt_core::gateway::{
    host_failure, CalloutAnswer, CalloutId, Command, Env, Level, LocalReply, RequestHead,
    ResponseHead, Stream,
};
use rand_core::OsRng;

use crate::ffi::{self, Answer, HeaderMap, LogLevel, StreamHost};
use crate::keys::EventKeys;
use crate::module::Shared;
use crate::store::STORE;

thread_local! {
    /// Manifest bytes the streams of this worker thread hold in Envoy's buffers right now.
    static HELD_MANIFEST_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Numbers streams for log lines.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Header statuses: Continue, and StopAllIterationAndWatermark for a pause. Host contract: the
/// machine is written for proxy-wasm, whose host turns a headers pause into "stop everything":
/// no body hook runs until the request is resumed. A plain StopIteration would let body hooks
/// run, and Envoy resumes the headers as soon as one of them returns Continue.
const CONTINUE: u32 = 0;
const STOP: u32 = 4;
/// Body: StopIterationAndBuffer (Envoy keeps what the filter has not let go).
const BUFFER: u32 = 1;
/// Trailers: StopIteration.
const TRAILERS_STOP: u32 = 1;

/// Header names as the machine wants them (lowercase text; a name that is not UTF-8 is skipped),
/// values as bytes.
pub fn pairs(headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    headers
        .into_iter()
        .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?.to_ascii_lowercase(), v)))
        .collect()
}

/// Envoy callbacks that may re-enter the stream's hooks, run after its state is released.
enum Deferred {
    Reply {
        status: u32,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        body: Vec<u8>,
    },
    ResumeRequest,
    ResumeResponse,
}

/// Where the machine's commands are carried out: `Continue` means "return Continue" in a
/// stream hook and "resume the request" in a callout's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Stream,
    Callout,
}

/// The per-stream state Envoy's module pointer names.
pub struct Filter {
    state: RefCell<State>,
    mailbox: RefCell<VecDeque<Answer>>,
    replied: Cell<bool>,
    poisoned: Cell<bool>,
}

struct State {
    id: u64,
    stream: Stream,
    /// Callouts the machine dispatched: Envoy's id → the machine's.
    callouts: Vec<(u64, CalloutId)>,
    shared: Arc<Shared>,
}

impl Drop for Filter {
    fn drop(&mut self) {
        let state = self.state.get_mut();
        HELD_MANIFEST_BYTES.with(|held| state.stream.on_end(&*STORE, held));
    }
}

impl Filter {
    /// A stream of the configuration `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Filter {
            state: RefCell::new(State {
                id,
                stream: Stream::new(),
                callouts: Vec::new(),
                shared,
            }),
            mailbox: RefCell::new(VecDeque::new()),
            replied: Cell::new(false),
            poisoned: Cell::new(false),
        }
    }

    /// Runs a hook; a panic in it poisons the stream and refuses its request (closed): the
    /// stream's state may be half-changed, so nothing of it is used again.
    pub fn guarded<T>(&self, host: &StreamHost, fallback: T, hook: impl FnOnce(&Filter) -> T) -> T
    where
        T: Copy,
    {
        if self.poisoned.get() {
            return fallback;
        }
        let out = ffi::guard(None, || Some(hook(self)));
        match out {
            Some(v) => v,
            None => {
                self.poisoned.set(true);
                ffi::log(
                    LogLevel::Critical,
                    "ocicrypt-filter: a stream hook panicked; its request is refused",
                );
                if !self.replied.replace(true) {
                    let err = OciError::new(
                        Code::Unknown,
                        "the gateway failed on this request; nothing was stored, retry",
                    );
                    ffi::guard((), || reply_error(host, &err));
                }
                fallback
            }
        }
    }

    /// Request headers.
    pub fn on_request_headers(&self, host: &StreamHost, end_of_stream: bool) -> u32 {
        if self.replied.get() {
            return STOP;
        }
        let head = RequestHead {
            headers: pairs(host.headers(HeaderMap::Request)),
            end_of_stream,
        };
        self.event(host, Hook::Stream, STOP, CONTINUE, STOP, |s, env| {
            s.on_request_headers(head, env)
        })
    }

    /// A request body chunk.
    pub fn on_request_body(&self, host: &StreamHost, end_of_stream: bool) -> u32 {
        if self.replied.get() {
            return BUFFER;
        }
        let size = host.request_body_size();
        let read = || Ok(host.request_body());
        self.event(host, Hook::Stream, BUFFER, CONTINUE, BUFFER, |s, env| {
            s.on_request_body(size, end_of_stream, &read, env)
        })
    }

    /// Request trailers.
    pub fn on_request_trailers(&self, host: &StreamHost) -> u32 {
        if self.replied.get() {
            return TRAILERS_STOP;
        }
        self.event(
            host,
            Hook::Stream,
            TRAILERS_STOP,
            CONTINUE,
            TRAILERS_STOP,
            |s, _| s.on_request_trailers(),
        )
    }

    /// Response headers (also those of a local reply, ours or Envoy's).
    pub fn on_response_headers(&self, host: &StreamHost) -> u32 {
        if self.replied.get() {
            return CONTINUE;
        }
        let head = ResponseHead {
            headers: pairs(host.headers(HeaderMap::Response)),
        };
        // Re-entered from inside one of our own hooks (the router's local reply while the
        // request resumes): an answer Envoy made, not the registry's; it passes.
        self.event(host, Hook::Stream, CONTINUE, CONTINUE, STOP, |s, env| {
            s.on_response_headers(&head, env)
        })
    }

    /// The stream is complete.
    pub fn on_complete(&self) {
        if let Ok(mut state) = self.state.try_borrow_mut() {
            let state = &mut *state;
            HELD_MANIFEST_BYTES.with(|held| state.stream.on_end(&*STORE, held));
        }
    }

    /// A callout's answer.
    pub fn on_callout_done(&self, host: &StreamHost, answer: Answer) {
        if self.replied.get() {
            return;
        }
        let Ok(mut state) = self.state.try_borrow_mut() else {
            // Delivered inside the hook that dispatched it: that hook reads it when done.
            self.mailbox.borrow_mut().push_back(answer);
            return;
        };
        let outcome = state.on_answer(host, answer);
        drop(state);
        if let Some(deferred) = outcome {
            self.finish(host, deferred);
        }
    }

    /// Feeds the machine one event, carries out its commands; the hook's status.
    fn event(
        &self,
        host: &StreamHost,
        hook: Hook,
        busy: u32,
        go_on: u32,
        wait: u32,
        event: impl FnOnce(&mut Stream, &mut Env) -> Vec<Command>,
    ) -> u32 {
        let Ok(mut state) = self.state.try_borrow_mut() else {
            return busy;
        };
        let commands = state.with_env(event);
        let (pause, deferred) = state.apply(host, commands, hook);
        drop(state);
        self.finish(host, deferred);
        if pause || self.replied.get() {
            wait
        } else {
            go_on
        }
    }

    /// Runs the deferred callbacks, then the answers that came meanwhile.
    fn finish(&self, host: &StreamHost, deferred: Vec<Deferred>) {
        for d in deferred {
            if self.replied.get() {
                return;
            }
            match d {
                Deferred::Reply {
                    status,
                    headers,
                    body,
                } => {
                    self.replied.set(true);
                    let h: Vec<(&[u8], &[u8])> =
                        headers.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                    host.send_response(status, &h, &body);
                }
                Deferred::ResumeRequest => host.continue_request(),
                Deferred::ResumeResponse => host.continue_response(),
            }
        }
        loop {
            let next = self.mailbox.borrow_mut().pop_front();
            let Some(answer) = next else {
                return;
            };
            self.on_callout_done(host, answer);
        }
    }
}

fn deferred_reply(reply: LocalReply) -> Deferred {
    Deferred::Reply {
        status: u32::from(reply.status),
        headers: reply
            .headers
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v))
            .collect(),
        body: reply.body,
    }
}

fn reply_error(host: &StreamHost, err: &OciError) {
    if let Some(reply) = Command::Reply(err.clone()).local_reply() {
        let headers: Vec<(&[u8], &[u8])> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), &v[..]))
            .collect();
        host.send_response(u32::from(reply.status), &headers, &reply.body);
    }
}

fn host_error(what: &str) -> OciError {
    host_failure(what)
}

impl State {
    fn log(&self, level: LogLevel, line: &str) {
        ffi::log(level, &stream_line(self.id, line));
    }

    /// Feeds the machine one event with the environment lent to it.
    fn with_env(
        &mut self,
        event: impl FnOnce(&mut Stream, &mut Env) -> Vec<Command>,
    ) -> Vec<Command> {
        let shared = self.shared.clone();
        let now = crate::module::now().max(0).unsigned_abs();
        let mut rng = OsRng;
        let mut helpers = crate::hashing::Helpers;
        let stream = &mut self.stream;
        let prefix = stream_line(self.id, "");
        let mut keys = EventKeys {
            shared: &shared,
            prefix: &prefix,
        };
        HELD_MANIFEST_BYTES.with(|held| {
            let mut env = Env {
                config: &shared.config,
                store: &*STORE,
                keys: &mut keys,
                held_manifest_bytes: held,
                now,
                rng: &mut rng,
                // No keystream prefetch across workers here: each stream encrypts its own body.
                keystream: None,
                hashing: Some(&mut helpers),
            };
            event(stream, &mut env)
        })
    }

    fn on_answer(&mut self, host: &StreamHost, answer: Answer) -> Option<Vec<Deferred>> {
        let i = self.callouts.iter().position(|(t, _)| *t == answer.id)?;
        let (_, id) = self.callouts.swap_remove(i);
        if !self.stream.awaits(id) {
            return None;
        }
        let answer = CalloutAnswer {
            headers: pairs(answer.headers),
            body: answer.body,
        };
        let commands = self.with_env(|s, env| s.on_callout(id, &answer, env));
        Some(self.apply(host, commands, Hook::Callout).1)
    }

    /// Carries out the machine's commands in order; whether the hook pauses, and the
    /// callbacks to run once the state is released.
    fn apply(
        &mut self,
        host: &StreamHost,
        commands: Vec<Command>,
        hook: Hook,
    ) -> (bool, Vec<Deferred>) {
        let mut pause = false;
        let mut deferred = Vec::new();
        for command in commands {
            let done = match command {
                Command::SetRequestHeader(name, value) => host
                    .set_header(HeaderMap::Request, &name, Some(value.as_bytes()))
                    .then_some(())
                    .ok_or_else(|| host_error(&format!("set header {name}"))),
                Command::RemoveRequestHeader(name) => host
                    .set_header(HeaderMap::Request, &name, None)
                    .then_some(())
                    .ok_or_else(|| host_error(&format!("set header {name}"))),
                Command::SetResponseHeader(name, value) => host
                    .set_header(HeaderMap::Response, &name, Some(value.as_bytes()))
                    .then_some(())
                    .ok_or_else(|| host_error(&format!("set header {name}"))),
                Command::RemoveResponseHeader(name) => host
                    .set_header(HeaderMap::Response, &name, None)
                    .then_some(())
                    .ok_or_else(|| host_error(&format!("set header {name}"))),
                Command::ReplaceRequestBody(len, body) => {
                    let mut new = body;
                    if len < host.request_body_size() {
                        new.extend_from_slice(host.request_body().get(len..).unwrap_or_default());
                    }
                    host.replace_request_body(&new)
                        .then_some(())
                        .ok_or_else(|| host_error("write body"))
                }
                Command::DropRequestBody => {
                    // Host contract: the body may be gone by the trailers; the refusal that
                    // follows stands either way.
                    let _ = host.drop_request_body();
                    Ok(())
                }
                Command::Dispatch(callout) => {
                    let headers: Vec<(&[u8], &[u8])> = callout
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                        .collect();
                    let body = callout.body.as_deref().unwrap_or_default();
                    match host.callout(&callout.cluster, &headers, body, callout.timeout_ms) {
                        Some(token) => {
                            self.callouts.push((token, callout.id));
                            Ok(())
                        }
                        None => {
                            let id = callout.id;
                            let failed = self.with_env(|s, env| s.on_dispatch_failed(id, env));
                            if !failed.is_empty() {
                                let (p, d) = self.apply(host, failed, hook);
                                deferred.extend(d);
                                return (pause || p, deferred);
                            }
                            Ok(())
                        }
                    }
                }
                Command::Respond { .. } | Command::Reply(_) | Command::Relay { .. } => {
                    if let Some(reply) = command.local_reply() {
                        deferred.push(deferred_reply(reply));
                    }
                    Ok(())
                }
                Command::ResumeResponse => {
                    deferred.push(Deferred::ResumeResponse);
                    Ok(())
                }
                Command::Continue => {
                    pause = false;
                    if hook == Hook::Callout {
                        deferred.push(Deferred::ResumeRequest);
                    }
                    Ok(())
                }
                Command::Pause => {
                    pause = true;
                    Ok(())
                }
                Command::Metric(metric) => {
                    self.shared.metrics.count(&metric);
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
                let refusal = self.stream.refuse(e);
                let (_, d) = self.apply(host, refusal, Hook::Callout);
                deferred.extend(d);
                return (true, deferred);
            }
        }
        (pause, deferred)
    }
}
