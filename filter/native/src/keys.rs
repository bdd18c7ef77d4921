//! A stream's recipients: the process's key records decide (the core's [`KeyWorker`]); when they
//! say to look a project up, the stream fetches from the key service by its own callouts, and
//! the paused request goes on once the lookup is over.
use std::sync::Arc;

use ocicrypt_core::error::OciError;
use ocicrypt_core::gateway::{KeyAnswer, Keys};
use ocicrypt_core::keys::keyservice::Request;
use ocicrypt_core::keys::records::{KeyStep, StreamLookup};

use crate::ffi::{Answer, StreamHost};
use crate::module::{now, Shared};
use crate::store::STORE;

/// The key lookup of one stream.
pub struct StreamKeys {
    /// Log prefix of the stream's key lines.
    prefix: String,
    shared: Arc<Shared>,
    lookup: StreamLookup,
    /// The callout of the lookup's fetch the paused request waits for.
    callout: Option<u64>,
}

/// The stream's keys with the host lent for one event (a lookup sends callouts).
pub struct EventKeys<'a, 'h> {
    /// The stream's keys.
    pub keys: &'a mut StreamKeys,
    /// The stream's host during the event.
    pub host: &'a StreamHost<'h>,
}

impl Keys for EventKeys<'_, '_> {
    fn recipients(&mut self, project: &str) -> Result<KeyAnswer, OciError> {
        let shared = self.keys.shared.clone();
        let lookup = &mut self.keys.lookup;
        let step = shared.with_keys(&self.keys.prefix, |w| {
            w.recipients(&shared.config, &*STORE, project, now(), lookup)
        })?;
        match step {
            KeyStep::Ready(r) => Ok(KeyAnswer::Ready(r)),
            KeyStep::Fetch(req) => {
                if self.keys.send(self.host, Some(req)) {
                    return Ok(KeyAnswer::Waiting);
                }
                // Over before any fetch could be sent: its result decides (never a second
                // lookup, so this asks once more at most).
                self.recipients(project)
            }
        }
    }
}

impl StreamKeys {
    /// The keys of stream `id`.
    pub fn new(prefix: String, shared: Arc<Shared>) -> Self {
        StreamKeys {
            prefix,
            shared,
            lookup: StreamLookup::default(),
            callout: None,
        }
    }

    /// A callout's answer: `None` when it is not the lookup's fetch, else whether the lookup
    /// goes on (`Some(false)`: it is over, ask for the recipients again).
    pub fn on_answer(&mut self, host: &StreamHost, answer: &Answer) -> Option<bool> {
        if self.callout != Some(answer.id) {
            return None;
        }
        self.callout = None;
        let status = if answer.answered {
            crate::stream::status_of(&answer.headers).unwrap_or(0)
        } else {
            0
        };
        let body: &[u8] = if status == 0 { &[] } else { &answer.body };
        let fetch = self.answer(status, body);
        Some(self.send(host, fetch))
    }

    /// Sends the lookup's fetch; one Envoy refuses goes back as unanswered. Whether a fetch
    /// is in flight.
    fn send(&mut self, host: &StreamHost, mut fetch: Option<Request>) -> bool {
        while let Some(req) = fetch {
            if let Some(f) = self.shared.fetch(&req) {
                if let Some(id) = host.callout(&f.cluster, &f.headers(), &[], f.timeout_ms) {
                    self.callout = Some(id);
                    return true;
                }
            }
            fetch = self.answer(0, &[]);
        }
        false
    }

    fn answer(&mut self, status: u16, body: &[u8]) -> Option<Request> {
        let shared = self.shared.clone();
        let lookup = &mut self.lookup;
        shared.with_keys(&self.prefix, |w| {
            w.on_stream_answer(&shared.config, &*STORE, lookup, status, body, now())
        })
    }
}
