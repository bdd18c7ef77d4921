//! Keystream prefetch across Envoy workers: who helps whom, and what a request asks for.
//!
//! The why and the bounds of prefetching are in [`crate::format::keystream`]; this module plans it.
//! Each plugin VM (one per Envoy worker) registers two of the host's shared queues, one for
//! the keystream requests it serves and one for the segments it asked for, and lists itself as
//! a helper in the shared store. Queue ids are process-wide, so a worker enqueues straight to
//! another VM's queue, and the host runs that VM's queue event on the VM's own thread. The
//! host only moves bytes: it implements [`SharedQueues`] and the [`Store`], and feeds a
//! [`Worker`] its events (a tick with the time, a stream, a queue with items) and a
//! [`RequestPrefetch`] its stream's chunks.
//!
//! Which VMs help: a VM enlists on its first timer tick or its first stream. Envoy runs the
//! plugin in one VM per worker, plus two on its main thread: a base VM, which gets no ticks
//! and no streams (so never enlists), and a thread-local one that ticks like a worker's. A
//! module cannot tell that one from an idle worker, so the list marks VMs that have served a
//! stream (workers for sure) and helpers are taken from those first; instances with no stream
//! yet (idle workers, and the main thread's) help only when no other VM has served one and
//! there are two or more of them, e.g. a single push through an otherwise idle Envoy with two
//! workers; never the main thread's alone (`--concurrency 1`: no prefetch). A helper computes
//! one 1 MiB segment (≈ 3 ms) per event, so the thread it runs on is never held for long.
use rand_core::CryptoRngCore;
use zeroize::Zeroizing;

use crate::distribution::upload::{BodyVerdict, ChunkStream};
use crate::error::OciError;
use crate::format::blockcipher::LayerEncryptor;
use crate::format::keystream::{Prefetcher, Segment, SegmentRequest, Tally};
use crate::store::Store;

/// Store key of the helper list: one line `<request queue id> <unix seconds> <s|->` per VM,
/// `s` once the VM has served a stream.
pub const HELPERS_KEY: &str = "ocicrypt/keystream/helpers";
/// A helper not heard of for this long is skipped (its VM was replaced or stopped).
pub const FRESH_SECS: u64 = 20;
/// How often a helper renews its line; also the plugin's timer period at most, so an idle
/// worker lists itself within this long of starting.
pub const HEARTBEAT_SECS: u64 = 2;
/// Lines kept in the list (older ones drop out).
pub const MAX_LISTED: usize = 64;
/// Compare-and-swap attempts of one heartbeat (other workers renew theirs concurrently).
const HEARTBEAT_TRIES: usize = 4;

/// The host's shared queues: process-wide, each read by the VM that registered it.
pub trait SharedQueues {
    /// Registers this VM's queue `name`; `None` when the host refused.
    fn register(&mut self, name: &str) -> Option<u32>;
    /// Puts `message` on `queue`; `false` when the host refused (an unknown queue).
    fn enqueue(&mut self, queue: u32, message: &[u8]) -> bool;
    /// The next message of `queue`; `None` when it is empty or the host refused.
    fn dequeue(&mut self, queue: u32) -> Option<Vec<u8>>;
}

/// What the worker's prefetching did since its last report, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Keystream bytes asked of helpers.
    pub asked: u64,
    /// Bytes encrypted with a helper's keystream.
    pub used: u64,
    /// Segments refused by the check.
    pub refused: u64,
    /// Keystream bytes this worker computed for others.
    pub served: u64,
    /// Requests this worker declined (it was encrypting streams of its own).
    pub declined: u64,
}

/// This VM's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queues {
    /// Keystream requests it serves.
    pub requests: u32,
    /// Segments it asked for.
    pub replies: u32,
}

/// One worker VM's side of the prefetching.
#[derive(Default)]
pub struct Worker {
    queues: Option<Queues>,
    /// Set once registration failed: the worker then stays local-only.
    unavailable: bool,
    /// The jobs of this worker's streams and their segments.
    prefetcher: Prefetcher,
    /// When this worker's line was last renewed (`None`: renew at the next chance).
    last_beat: Option<u64>,
    /// This VM has served a stream (it runs on a worker thread).
    streams: bool,
    turn: usize,
    reported: Tally,
    served: u64,
    declined: u64,
}

/// The warning when a worker cannot take part.
pub const NO_QUEUES: &str =
    "ocicrypt-filter: cannot register shared queues; this worker encrypts without keystream prefetch";

impl Worker {
    /// Changes how much keystream the worker's jobs may have asked for and not used (a new
    /// configuration's `limits.keystream_prefetch_bytes`).
    pub fn set_budget(&mut self, budget: u64) {
        self.prefetcher.set_budget(budget);
    }

    /// This VM's queues, once enlisted.
    pub fn queues(&self) -> Option<Queues> {
        self.queues
    }

    /// Jobs (request bodies this worker encrypts with help) in progress.
    pub fn jobs(&self) -> usize {
        self.prefetcher.jobs()
    }

    /// This VM serves a stream: it is a worker. Enlists it if not yet and renews its line
    /// now, marked as a worker's. Answers the warning to log when it cannot enlist.
    pub fn on_stream(
        &mut self,
        now: u64,
        store: &dyn Store,
        queues: &mut dyn SharedQueues,
        rng: &mut dyn CryptoRngCore,
    ) -> Option<&'static str> {
        if !self.streams {
            self.streams = true;
            self.last_beat = None;
        }
        self.on_tick(now, store, queues, rng)
    }

    /// A timer tick: enlists this VM if not yet, and renews its line when due. Answers the
    /// warning to log when it cannot enlist.
    pub fn on_tick(
        &mut self,
        now: u64,
        store: &dyn Store,
        queues: &mut dyn SharedQueues,
        rng: &mut dyn CryptoRngCore,
    ) -> Option<&'static str> {
        let warning = self.enlist(now, store, queues, rng);
        self.heartbeat(now, store);
        warning
    }

    /// Registers this VM's queues (under a random tag: names are process-wide) and lists it
    /// as a helper, once; a refusal makes the worker local-only for good.
    fn enlist(
        &mut self,
        now: u64,
        store: &dyn Store,
        queues: &mut dyn SharedQueues,
        rng: &mut dyn CryptoRngCore,
    ) -> Option<&'static str> {
        if self.queues.is_some() || self.unavailable {
            return None;
        }
        let tag = format!("{:016x}", rng.next_u64());
        let requests = queues.register(&format!("ocicrypt/keystream/{tag}/requests"));
        let replies = queues.register(&format!("ocicrypt/keystream/{tag}/replies"));
        match (requests, replies) {
            (Some(requests), Some(replies)) => {
                self.queues = Some(Queues { requests, replies });
                self.heartbeat(now, store);
                None
            }
            _ => {
                self.unavailable = true;
                Some(NO_QUEUES)
            }
        }
    }

    /// Renews this worker's line in the helper list (compare-and-swap, a few tries), dropping
    /// stale lines and the oldest past [`MAX_LISTED`].
    fn heartbeat(&mut self, now: u64, store: &dyn Store) {
        let Some(q) = self.queues else {
            return;
        };
        if self
            .last_beat
            .is_some_and(|last| now.saturating_sub(last) < HEARTBEAT_SECS)
        {
            return;
        }
        for _ in 0..HEARTBEAT_TRIES {
            let Some((value, cas)) = store.get_cas(HELPERS_KEY) else {
                return;
            };
            let mut lines: Vec<Helper> = parse_helpers(value.as_deref().unwrap_or_default())
                .into_iter()
                .filter(|h| h.queue != q.requests && h.fresh(now))
                .collect();
            lines.push(Helper {
                queue: q.requests,
                seen: now,
                streams: self.streams,
            });
            let skip = lines.len().saturating_sub(MAX_LISTED);
            let text: String = lines.iter().skip(skip).map(Helper::line).collect();
            if store.set_cas(HELPERS_KEY, text.as_bytes(), cas) {
                self.last_beat = Some(now);
                return;
            }
        }
    }

    /// Another VM's request queue from `helpers`, taking turns; `None` when this VM is alone.
    fn helper(&mut self, helpers: &[Helper], now: u64) -> Option<u32> {
        let mine = self.queues?.requests;
        self.turn = self.turn.wrapping_add(1);
        pick(helpers, mine, now, self.turn)
    }

    /// Starts a job for a request body from stream byte `start`, when another worker can help.
    fn start_job(
        &mut self,
        start: u64,
        declared_len: Option<u64>,
        now: u64,
        store: &dyn Store,
    ) -> Option<u64> {
        self.queues?;
        if !self.prefetcher.enabled() {
            return None;
        }
        self.helper(&helpers_in(store), now)?;
        Some(self.prefetcher.start(start, declared_len))
    }

    /// Asks helpers for the keystream `job` will need once its stream is at `at`.
    fn ask(
        &mut self,
        job: u64,
        layer: &LayerEncryptor,
        at: u64,
        now: u64,
        store: &dyn Store,
        queues: &mut dyn SharedQueues,
    ) {
        let Some(q) = self.queues else {
            return;
        };
        let wanted = self.prefetcher.plan(job, at);
        if wanted.is_empty() {
            return;
        }
        // One read of the list per ask, however many segments it sends.
        let helpers = helpers_in(store);
        for (offset, len) in wanted {
            let Some(helper) = self.helper(&helpers, now) else {
                return;
            };
            let request = SegmentRequest::for_layer(layer, job, q.replies, offset, len);
            // A request that cannot be queued is simply never answered: those bytes go local.
            let _ = queues.enqueue(helper, &request.encode());
        }
    }

    /// Files every segment that arrived for this worker's jobs.
    fn collect(&mut self, queues: &mut dyn SharedQueues) {
        let Some(q) = self.queues else {
            return;
        };
        while let Some(bytes) = queues.dequeue(q.replies) {
            if let Some(segment) = Segment::decode(bytes) {
                self.prefetcher.deliver(segment);
            }
        }
    }

    /// A queue of the host has items: serve one keystream request, or collect segments.
    pub fn on_queue_ready(&mut self, queue_id: u32, queues: &mut dyn SharedQueues) {
        let Some(q) = self.queues else {
            return;
        };
        if queue_id == q.replies {
            self.collect(queues);
        } else if queue_id == q.requests {
            // One request per event (Envoy posts one per enqueue): this worker's own streams
            // wait at most one segment's AES.
            let Some(bytes) = queues.dequeue(q.requests) else {
                return;
            };
            // A request carries the layer key.
            let bytes = Zeroizing::new(bytes);
            // A VM encrypting streams of its own declines: when every worker is busy, helping
            // each other only adds copies (measured: 2 uploads on 2 workers 6 % slower). The
            // asker encrypts those bytes itself.
            if self.prefetcher.jobs() > 0 {
                self.declined = self.declined.saturating_add(1);
                return;
            }
            if let Some(request) = SegmentRequest::decode(&bytes) {
                let answer = request.answer();
                if queues.enqueue(request.reply_to, &answer) {
                    self.served = self.served.saturating_add(u64::from(request.len));
                }
            }
        }
    }

    /// What changed since the last report.
    pub fn report(&mut self) -> Report {
        let now = self.prefetcher.tally();
        let report = Report {
            asked: now.asked.saturating_sub(self.reported.asked),
            used: now.used.saturating_sub(self.reported.used),
            refused: now.refused.saturating_sub(self.reported.refused),
            served: self.served,
            declined: self.declined,
        };
        self.reported = now;
        self.served = 0;
        self.declined = 0;
        report
    }
}

/// A worker lent to one event of a stream, with the host's queues.
pub struct Keystream<'a> {
    /// The stream's worker.
    pub worker: &'a mut Worker,
    /// The host's shared queues.
    pub queues: &'a mut dyn SharedQueues,
}

/// One line of the helper list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Helper {
    /// The VM's request queue.
    pub queue: u32,
    /// When it last renewed its line (unix seconds).
    pub seen: u64,
    /// It has served a stream (a worker for sure).
    pub streams: bool,
}

impl Helper {
    fn fresh(&self, now: u64) -> bool {
        now.saturating_sub(self.seen) <= FRESH_SECS
    }

    /// The line in the list's form.
    pub fn line(&self) -> String {
        let flag = if self.streams { 's' } else { '-' };
        format!("{} {} {flag}\n", self.queue, self.seen)
    }
}

/// The helper list as it stands in the store.
fn helpers_in(store: &dyn Store) -> Vec<Helper> {
    store
        .get(HELPERS_KEY)
        .map(|value| parse_helpers(&value))
        .unwrap_or_default()
}

/// The helper list's lines; a line not in [`Helper::line`]'s form is skipped.
pub fn parse_helpers(bytes: &[u8]) -> Vec<Helper> {
    std::str::from_utf8(bytes)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let queue = parts.next()?.parse().ok()?;
            let seen = parts.next()?.parse().ok()?;
            let streams = match parts.next()? {
                "s" => true,
                "-" => false,
                _ => return None,
            };
            Some(Helper {
                queue,
                seen,
                streams,
            })
        })
        .collect()
}

/// The `turn`-th fresh helper other than `mine`, among those that served streams if any did.
/// VMs that served none are taken only when there are two or more of them: one of them may be
/// Envoy's main thread, which must never be the only helper (with `--concurrency 1` it would
/// be, and would then run the AES of every push).
pub fn pick(helpers: &[Helper], mine: u32, now: u64, turn: usize) -> Option<u32> {
    let others: Vec<&Helper> = helpers
        .iter()
        .filter(|h| h.queue != mine && h.fresh(now))
        .collect();
    let workers: Vec<u32> = others
        .iter()
        .filter(|h| h.streams)
        .map(|h| h.queue)
        .collect();
    let pool = if !workers.is_empty() {
        workers
    } else if others.len() >= 2 {
        others.iter().map(|h| h.queue).collect()
    } else {
        Vec::new()
    };
    pool.get(turn % pool.len().max(1)).copied()
}

/// One request body's part in the prefetching: its job, once its blob is known to be
/// encrypted and another VM can help.
#[derive(Default)]
pub struct RequestPrefetch {
    job: Option<u64>,
    /// A job was considered already (one attempt per request).
    considered: bool,
}

impl RequestPrefetch {
    /// Encrypts (or passes) the chunk in `buf` through `stream`, asking helpers for the
    /// keystream of what follows and using what they sent; `declared_len` is the request's
    /// `Content-Length`. Without a worker (`keystream` is `None`) the chunk is encrypted
    /// locally; the bytes written are the same either way.
    #[allow(clippy::too_many_arguments)] // one event's inputs, each from a different owner
    pub fn encrypt(
        &mut self,
        keystream: Option<&mut Keystream<'_>>,
        store: &dyn Store,
        stream: &mut ChunkStream,
        buf: &mut Vec<u8>,
        end_of_stream: bool,
        declared_len: Option<u64>,
        now: u64,
        rng: &mut dyn CryptoRngCore,
    ) -> Result<BodyVerdict, OciError> {
        let mut rng = rng;
        let Some(Keystream { worker, queues }) = keystream else {
            return stream.on_body(buf, end_of_stream, &mut rng);
        };
        let (worker, queues) = (&mut **worker, &mut **queues);
        worker.collect(queues);
        let start = stream.offset().saturating_sub(stream.request_bytes());
        self.consider(worker, stream, start, declared_len, now, store);
        // Before the chunk: the helper computes what follows while this worker encrypts it.
        if let (Some(job), Some(layer)) = (self.job, stream.encryptor()) {
            let after = stream.offset().saturating_add(buf.len() as u64);
            worker.ask(job, layer, after, now, store, queues);
        }
        let verdict = match self.job {
            Some(job) => stream.on_body_with(
                buf,
                end_of_stream,
                &mut rng,
                &mut worker.prefetcher.supply(job),
            )?,
            None => stream.on_body(buf, end_of_stream, &mut rng)?,
        };
        // The first chunk of a blob decides its treatment: a job can start after it.
        self.consider(worker, stream, start, declared_len, now, store);
        if let (Some(job), Some(layer)) = (self.job, stream.encryptor()) {
            worker.ask(job, layer, stream.offset(), now, store, queues);
        }
        Ok(verdict)
    }

    fn consider(
        &mut self,
        worker: &mut Worker,
        stream: &ChunkStream,
        start: u64,
        declared_len: Option<u64>,
        now: u64,
        store: &dyn Store,
    ) {
        if self.considered || stream.encryptor().is_none() {
            return;
        }
        self.considered = true;
        self.job = worker.start_job(start, declared_len, now, store);
    }

    /// Ends the job (what arrives for it later is dropped); the worker's report since the
    /// last one.
    pub fn end(&mut self, worker: &mut Worker) -> Report {
        if let Some(job) = self.job.take() {
            worker.prefetcher.end(job);
        }
        worker.report()
    }
}
