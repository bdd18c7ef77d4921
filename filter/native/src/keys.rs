//! A stream's recipients: the core's [`WorkerKeys`] over the process's key records, locked for
//! each call only (streams of every worker thread share them). The lookup and its fetches are
//! the stream machine's own (its callouts); the records' metrics and log lines are carried out
//! as each call returns.
use ocicrypt_core::error::OciError;
use ocicrypt_core::gateway::{KeyAnswer, Keys, WorkerKeys};
use ocicrypt_core::keys::keyservice::Request;
use ocicrypt_core::keys::records::StreamLookup;

use crate::module::{now, Shared};
use crate::store::STORE;

/// The keys a stream event asks, with the log prefix of its lines.
pub struct EventKeys<'a> {
    /// What the configuration's streams share.
    pub shared: &'a Shared,
    /// Log prefix of the stream's key lines.
    pub prefix: &'a str,
}

impl EventKeys<'_> {
    /// The core's keys over the process's records, locked for this one call.
    fn with_worker_keys<T>(&self, event: impl FnOnce(&mut WorkerKeys) -> T) -> T {
        let shared = self.shared;
        shared.with_keys(self.prefix, |worker| {
            event(&mut WorkerKeys {
                worker,
                config: &shared.config,
                store: &*STORE,
                now: now(),
            })
        })
    }
}

impl Keys for EventKeys<'_> {
    fn recipients(
        &mut self,
        project: &str,
        lookup: &mut StreamLookup,
    ) -> Result<KeyAnswer, OciError> {
        self.with_worker_keys(|keys| keys.recipients(project, lookup))
    }

    fn on_fetch_answer(
        &mut self,
        lookup: &mut StreamLookup,
        status: u16,
        body: &[u8],
    ) -> Option<Request> {
        self.with_worker_keys(|keys| keys.on_fetch_answer(lookup, status, body))
    }
}
