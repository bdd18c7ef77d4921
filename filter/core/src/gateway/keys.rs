//! A stream's recipient keys: the [`Keys`] seam the machine asks, its implementation over the
//! worker's [`KeyWorker`], and the key-service fetches of a lookup as callouts like the
//! registry's (dispatched by the host, answered by token, failed as no answer).
use crate::config::{Config, KeyServiceConfig};
use crate::error::{Code, OciError};
use crate::format::recipients::Recipient;
use crate::keys::keyservice::Request;
use crate::keys::records::{KeyStep, KeyWorker, StreamLookup};
use crate::store::Store;

use super::{Callout, CalloutAnswer, CalloutId, Command, Env, Flow, Stream};

/// A project's recipients, as far as the keys can tell now.
#[derive(Debug)]
pub enum KeyAnswer {
    /// Encrypt to these.
    Ready(Vec<Recipient>),
    /// The stream's lookup needs this fetched from the key service: the machine dispatches
    /// it, and its answer goes to [`Keys::on_fetch_answer`].
    Fetch(Request),
    /// A lookup runs elsewhere; [`Stream::on_keys_ready`] follows.
    Waiting,
}

/// Where the recipient keys of a project come from (inline configuration, verified key-service
/// records, a lookup). Asked only once a request is otherwise valid.
pub trait Keys {
    /// The recipients of `project` for the stream whose lookup is `lookup`; an error is the
    /// refusal (`503`, naming the reason).
    fn recipients(
        &mut self,
        project: &str,
        lookup: &mut StreamLookup,
    ) -> Result<KeyAnswer, OciError>;

    /// The answer to the fetch of `lookup` (`status` 0: none came, or the fetch could not be
    /// dispatched): the next fetch, or `None` when the lookup is over (ask again).
    fn on_fetch_answer(
        &mut self,
        lookup: &mut StreamLookup,
        status: u16,
        body: &[u8],
    ) -> Option<Request>;
}

/// The keys of the worker's [`KeyWorker`] (its metrics and log lines stay in it until the host
/// takes them).
pub struct WorkerKeys<'a> {
    /// The worker's key memory.
    pub worker: &'a mut KeyWorker,
    /// The configuration (inline recipients, the key service).
    pub config: &'a Config,
    /// The shared store of the records.
    pub store: &'a dyn Store,
    /// Unix seconds.
    pub now: i64,
}

impl Keys for WorkerKeys<'_> {
    fn recipients(
        &mut self,
        project: &str,
        lookup: &mut StreamLookup,
    ) -> Result<KeyAnswer, OciError> {
        let step = self
            .worker
            .recipients(self.config, self.store, project, self.now, lookup)?;
        Ok(match step {
            KeyStep::Ready(r) => KeyAnswer::Ready(r),
            KeyStep::Fetch(req) => KeyAnswer::Fetch(req),
        })
    }

    fn on_fetch_answer(
        &mut self,
        lookup: &mut StreamLookup,
        status: u16,
        body: &[u8],
    ) -> Option<Request> {
        let (config, store, now) = (self.config, self.store, self.now);
        self.worker
            .on_stream_answer(config, store, lookup, status, body, now)
    }
}

/// The callout that fetches `req` from the key service.
pub fn key_fetch(ks: &KeyServiceConfig, id: CalloutId, req: &Request) -> Callout {
    Callout {
        id,
        cluster: ks.cluster.clone(),
        headers: vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), req.path.clone()),
            (":authority".to_string(), ks.authority.clone()),
        ],
        body: None,
        timeout_ms: ks.timeout_ms,
    }
}

/// The status of a key-service answer: 0 when there is none (a reset, a timeout, an answer
/// over the host's limit) or it is not a three-digit status, which the lookup counts as
/// unanswered (it fails closed).
pub fn fetch_status(answer: &CalloutAnswer) -> u16 {
    let Some((_, value)) = answer.headers.iter().find(|(n, _)| n == ":status") else {
        return 0;
    };
    if value.len() != 3 || !value.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    let status = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if (100..=599).contains(&status) {
        status
    } else {
        0
    }
}

impl Stream {
    /// The project's recipients; `None` while a lookup runs (its fetch goes out with
    /// [`Stream::waiting`]).
    pub(super) fn ask_keys(
        &mut self,
        env: &mut Env,
        project: &str,
    ) -> Result<Option<Vec<Recipient>>, OciError> {
        match env.keys.recipients(project, &mut self.lookup)? {
            KeyAnswer::Ready(r) => Ok(Some(r)),
            KeyAnswer::Waiting => Ok(None),
            KeyAnswer::Fetch(req) => {
                self.key_fetch = Some(self.fetch_callout(env.config, &req)?);
                Ok(None)
            }
        }
    }

    /// The callout of the lookup's fetch, the one the stream now waits for.
    fn fetch_callout(&mut self, config: &Config, req: &Request) -> Result<Callout, OciError> {
        let ks = config
            .key_service
            .as_ref()
            .ok_or_else(|| OciError::new(Code::Unknown, "key lookup without a key service"))?;
        let id = self.next_id();
        self.key_waits = Some(id);
        Ok(key_fetch(ks, id, req))
    }

    /// What a request that waits for the key service answers: the lookup's fetch, if it has
    /// one to send, and the pause.
    pub(super) fn waiting(&mut self) -> Vec<Command> {
        let mut out: Vec<Command> = self
            .key_fetch
            .take()
            .map(Command::Dispatch)
            .into_iter()
            .collect();
        out.push(Command::Pause);
        out
    }

    /// Whether `id` is the fetch of the stream's key lookup.
    pub(super) fn is_key_fetch(&self, id: CalloutId) -> bool {
        self.key_waits == Some(id)
    }

    /// The answer to the key lookup's fetch (`status` 0: none, or it could not be dispatched):
    /// the next fetch (the request stays paused), or the request decided again once the lookup
    /// is over. A request refused meanwhile still runs its lookup to the end: the result is
    /// published for every request, and a full refresh gives its lease back.
    pub(super) fn on_key_answer(
        &mut self,
        status: u16,
        body: &[u8],
        env: &mut Env,
    ) -> Vec<Command> {
        self.key_waits = None;
        let Some(req) = env.keys.on_fetch_answer(&mut self.lookup, status, body) else {
            if matches!(self.flow, Flow::Refused) {
                return Vec::new();
            }
            return self.on_keys_ready(env);
        };
        match self.fetch_callout(env.config, &req) {
            Ok(callout) => vec![Command::Dispatch(callout)],
            Err(e) => self.refuse(e),
        }
    }
}
