//! One HTTP stream through the gateway: the host side of [`ocicrypt_core::gateway::Stream`].
//!
//! The core's machine decides every flow (the request line, the bodies, the responses, the
//! finishing, ledger and key-service callouts); this file turns host callbacks into its events
//! and carries out its commands.
use std::rc::Rc;
use std::time::Duration;

use ocicrypt_core::gateway::plugin::{busy, stream_line, Plugin};
use ocicrypt_core::gateway::{
    CalloutAnswer, CalloutId, Command, Env, RequestHead, ResponseHead, Stream,
};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use rand_core::OsRng;

use crate::host::{self, HostQueues, SharedData};
use crate::metrics::Metrics;
use crate::{lent, log_level, SharedPlugin};

/// The per-stream context.
pub struct Gateway {
    id: u32,
    /// The core's machine for this stream.
    stream: Stream,
    /// Callouts the machine dispatched: host token → the machine's id.
    callouts: Vec<(u32, CalloutId)>,
    /// The worker's state, lent to the machine for each event.
    plugin: SharedPlugin,
    metrics: Rc<Metrics>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let plugin = self.plugin.clone();
        let Ok(mut plugin) = plugin.try_borrow_mut() else {
            return;
        };
        let commands = plugin.on_stream_end(&mut self.stream, &SharedData);
        drop(plugin);
        self.apply(commands, Callback::Other);
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
    /// A stream context of the worker whose state is `plugin`.
    pub fn new(id: u32, plugin: SharedPlugin, metrics: Rc<Metrics>) -> Self {
        Gateway {
            id,
            stream: Stream::new(),
            callouts: Vec::new(),
            plugin,
            metrics,
        }
    }

    /// Feeds the machine one event with the worker's state lent to it.
    fn with_env(
        &mut self,
        event: impl FnOnce(&mut Stream, &mut Env) -> Vec<Command>,
    ) -> Vec<Command> {
        let Ok(mut plugin) = self.plugin.try_borrow_mut() else {
            return self.stream.refuse(busy());
        };
        let plugin: &mut Plugin = &mut plugin;
        let (mut queues, mut rng) = (HostQueues, OsRng);
        plugin.on_stream_event(&mut self.stream, lent(&mut queues, &mut rng), event)
    }

    /// Carries out the machine's commands in order; the action a headers callback returns.
    fn apply(&mut self, commands: Vec<Command>, callback: Callback) -> Action {
        let mut action = Action::Continue;
        for command in commands {
            if let Some(reply) = command.local_reply() {
                host::send_local_reply(&reply);
                continue;
            }
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
                    let timeout = Duration::from_millis(callout.timeout_ms);
                    let body = callout.body.as_deref();
                    match host::dispatch(&callout.cluster, headers, body, timeout) {
                        Ok(token) => {
                            self.callouts.push((token, callout.id));
                            Ok(())
                        }
                        Err(()) => {
                            let id = callout.id;
                            let failed =
                                self.with_env(|stream, env| stream.on_dispatch_failed(id, env));
                            if failed.is_empty() {
                                Ok(())
                            } else {
                                return self.apply(failed, callback);
                            }
                        }
                    }
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
                    self.metrics.count(&metric);
                    Ok(())
                }
                Command::Log(level, line) => {
                    host::log(log_level(level), &stream_line(u64::from(self.id), &line));
                    Ok(())
                }
                Command::Reply(_) | Command::Relay { .. } | Command::Respond { .. } => Ok(()),
            };
            if let Err(what) = done {
                let refused = self.stream.on_host_failed(&what);
                return self.apply(refused, Callback::Other);
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
        let Some(i) = self.callouts.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, id) = self.callouts.swap_remove(i);
        if !self.stream.awaits(id) {
            return;
        }
        // Host contract: an answer body the host fails to hand over refuses the request
        // (a manifest read before a delete must not pass for an empty one).
        let body = match host::body(BufferType::HttpCallResponseBody, body_size) {
            Ok(body) => body,
            Err(what) => {
                let refused = self.stream.on_host_failed(&what);
                self.apply(refused, Callback::Other);
                return;
            }
        };
        // Answers are read as bytes: a header that is not UTF-8 reads as absent.
        let answer = CalloutAnswer {
            headers: host::pairs(MapType::HttpCallResponseHeaders),
            body,
        };
        let commands = self.with_env(|stream, env| stream.on_callout(id, &answer, env));
        self.apply(commands, Callback::Other);
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
        let read = || host::request_body(body_size);
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
