//! Keystream prefetch across Envoy workers (the why and the bounds are in
//! `ocicrypt_core::keystream`): each plugin VM registers two proxy-wasm shared queues, one for
//! keystream requests it serves and one for the segments it asked for, and lists itself as a
//! helper in shared data. Queue ids are process-wide, so a worker enqueues straight to another
//! VM's queue, and Envoy runs that VM's `on_queue_ready` on the VM's own thread.
//!
//! Which VMs help: a VM enlists on its first timer tick or its first stream. Envoy runs the
//! plugin in one VM per worker, plus two on its main thread: a base VM, which gets no ticks
//! and no streams (so never enlists), and a thread-local one that ticks like a worker's. A
//! module cannot tell that one from an idle worker, so the list marks VMs that have served a
//! stream (workers for sure) and helpers are taken from those first; instances with no stream
//! yet (idle workers, and the main thread's) help only when no other VM has served one and
//! there are two or more of them, e.g. a single push through an otherwise idle Envoy with two
//! workers; never the main thread's alone (`--concurrency 1`: no prefetch). A helper computes one 1 MiB segment
//! (≈ 3 ms) per event, so the thread it runs on is never held for long.
use std::cell::RefCell;
use std::rc::Rc;

use ocicrypt_core::blockcipher::LayerEncryptor;
use ocicrypt_core::error::OciError;
use ocicrypt_core::keystream::{Prefetcher, Segment, SegmentRequest, Tally};
use ocicrypt_core::upload::{BodyVerdict, ChunkStream, Store};
use proxy_wasm::types::LogLevel;
use rand_core::{OsRng, RngCore};

use crate::host::{self, SharedData};
use crate::keys;
use crate::metrics::Metrics;

/// Shared-data key of the helper list: one line `<request queue id> <unix seconds> <s|->` per
/// VM, `s` once the VM has served a stream.
const HELPERS_KEY: &str = "ocicrypt/keystream/helpers";
/// A helper not heard of for this long is skipped (its VM was replaced or stopped).
const FRESH_SECS: i64 = 20;
/// How often a helper renews its line; also the plugin's timer period at most, so an idle
/// worker lists itself within this long of starting.
pub const HEARTBEAT_SECS: i64 = 2;
/// Lines kept in the list (older ones drop out).
const MAX_LISTED: usize = 64;

/// One worker VM's side of the prefetching.
#[derive(Default)]
pub struct Worker {
    queues: Option<Queues>,
    /// Set once registration failed: the worker then stays local-only.
    unavailable: bool,
    /// The jobs of this worker's streams and their segments.
    pub prefetcher: Prefetcher,
    last_beat: i64,
    /// This VM has served a stream (it runs on a worker thread).
    streams: bool,
    turn: usize,
    reported: Tally,
    served: u64,
    declined: u64,
}

#[derive(Clone, Copy)]
struct Queues {
    requests: u32,
    replies: u32,
}

/// The worker's state, shared by its root context and its stream contexts.
pub type SharedWorker = Rc<RefCell<Worker>>;

impl Worker {
    /// This VM serves a stream: it is a worker; enlists it if not yet.
    pub fn on_stream(&mut self, now: i64) {
        if !self.streams {
            self.streams = true;
            self.last_beat = i64::MIN;
        }
        self.enlist(now);
        self.heartbeat(now);
    }

    /// Registers this VM's queues and lists it as a helper, once.
    pub fn enlist(&mut self, now: i64) {
        if self.queues.is_some() || self.unavailable {
            return;
        }
        let tag = format!("{:016x}", OsRng.next_u64());
        let requests = host::register_queue(&format!("ocicrypt/keystream/{tag}/requests"));
        let replies = host::register_queue(&format!("ocicrypt/keystream/{tag}/replies"));
        match (requests, replies) {
            (Some(requests), Some(replies)) => {
                self.queues = Some(Queues { requests, replies });
                self.heartbeat(now);
            }
            _ => {
                self.unavailable = true;
                host::log(
                    LogLevel::Warn,
                    "ocicrypt-filter: cannot register shared queues; this worker encrypts without keystream prefetch",
                );
            }
        }
    }

    /// Renews this worker's line in the helper list (compare-and-swap, a few tries).
    pub fn heartbeat(&mut self, now: i64) {
        let Some(q) = self.queues else {
            return;
        };
        if now.saturating_sub(self.last_beat) < HEARTBEAT_SECS {
            return;
        }
        for _ in 0..4 {
            let Some((value, cas)) = SharedData.get_cas(HELPERS_KEY) else {
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
            if SharedData.set_cas(HELPERS_KEY, text.as_bytes(), cas) {
                self.last_beat = now;
                return;
            }
        }
    }

    /// The helper list as it stands in shared data.
    fn helpers() -> Vec<Helper> {
        match SharedData.get(HELPERS_KEY) {
            Some(value) => parse_helpers(&value),
            None => Vec::new(),
        }
    }

    /// Another VM's request queue from `helpers`, taking turns; `None` when this VM is alone.
    fn helper(&mut self, helpers: &[Helper], now: i64) -> Option<u32> {
        let mine = self.queues?.requests;
        self.turn = self.turn.wrapping_add(1);
        pick(helpers, mine, now, self.turn)
    }

    /// Starts a job for a request body from stream byte `start`, when another worker can help.
    pub fn start_job(&mut self, start: u64, declared_len: Option<u64>, now: i64) -> Option<u64> {
        self.queues?;
        if !self.prefetcher.enabled() {
            return None;
        }
        self.helper(&Self::helpers(), now)?;
        Some(self.prefetcher.start(start, declared_len))
    }

    /// Asks helpers for the keystream `job` will need once its stream is at `at`.
    pub fn ask(&mut self, job: u64, layer: &LayerEncryptor, at: u64, now: i64) {
        let Some(q) = self.queues else {
            return;
        };
        let wanted = self.prefetcher.plan(job, at);
        if wanted.is_empty() {
            return;
        }
        // One read of the list per ask, however many segments it sends.
        let helpers = Self::helpers();
        for (offset, len) in wanted {
            let Some(helper) = self.helper(&helpers, now) else {
                return;
            };
            let request = SegmentRequest::for_layer(layer, job, q.replies, offset, len);
            // A request that cannot be queued is simply never answered: those bytes go local.
            let _ = host::enqueue(helper, &request.encode());
        }
    }

    /// Files every segment that arrived for this worker's jobs.
    pub fn collect(&mut self) {
        let Some(q) = self.queues else {
            return;
        };
        while let Some(bytes) = host::dequeue(q.replies) {
            if let Some(segment) = Segment::decode(bytes) {
                self.prefetcher.deliver(segment);
            }
        }
    }

    /// A queue of this worker has items: serve one keystream request, or collect segments.
    pub fn on_queue_ready(&mut self, queue_id: u32) {
        let Some(q) = self.queues else {
            return;
        };
        if queue_id == q.replies {
            self.collect();
        } else if queue_id == q.requests {
            // One request per event (Envoy posts one per enqueue): this worker's own streams
            // wait at most one segment's AES.
            if let Some(bytes) = host::dequeue(q.requests) {
                // A request carries the layer key.
                let bytes = zeroize::Zeroizing::new(bytes);
                // A VM encrypting streams of its own declines: when every worker is busy,
                // helping each other only adds copies (measured: 2 uploads on 2 workers 6 %
                // slower). The asker encrypts those bytes itself.
                if self.prefetcher.jobs() > 0 {
                    self.declined = self.declined.saturating_add(1);
                    return;
                }
                if let Some(request) = SegmentRequest::decode(&bytes) {
                    let answer = request.answer();
                    if host::enqueue(request.reply_to, &answer) {
                        self.served = self.served.saturating_add(u64::from(request.len));
                    }
                }
            }
        }
    }

    /// Adds what changed since the last report to the metrics.
    pub fn report(&mut self, metrics: &Metrics) {
        let now = self.prefetcher.tally();
        metrics.keystream(
            now.asked.saturating_sub(self.reported.asked),
            now.used.saturating_sub(self.reported.used),
            now.refused.saturating_sub(self.reported.refused),
            self.served,
            self.declined,
        );
        self.reported = now;
        self.served = 0;
        self.declined = 0;
    }
}

/// One line of the helper list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Helper {
    queue: u32,
    seen: i64,
    streams: bool,
}

impl Helper {
    fn fresh(&self, now: i64) -> bool {
        now.saturating_sub(self.seen) <= FRESH_SECS
    }

    fn line(&self) -> String {
        let flag = if self.streams { 's' } else { '-' };
        format!("{} {} {flag}\n", self.queue, self.seen)
    }
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
    /// `Content-Length` (read with the headers: body callbacks cannot read them).
    pub fn encrypt(
        &mut self,
        worker: &SharedWorker,
        stream: &mut ChunkStream,
        buf: &mut Vec<u8>,
        end_of_stream: bool,
        declared_len: Option<u64>,
    ) -> Result<BodyVerdict, OciError> {
        let Ok(mut worker) = worker.try_borrow_mut() else {
            return stream.on_body(buf, end_of_stream, &mut OsRng);
        };
        let now = keys::now();
        worker.collect();
        let start = stream.offset().saturating_sub(stream.request_bytes());
        self.consider(&mut worker, stream, start, declared_len, now);
        // Before the chunk: the helper computes what follows while this worker encrypts it.
        if let (Some(job), Some(layer)) = (self.job, stream.encryptor()) {
            let after = stream.offset().saturating_add(buf.len() as u64);
            worker.ask(job, layer, after, now);
        }
        let verdict = match self.job {
            Some(job) => stream.on_body_with(
                buf,
                end_of_stream,
                &mut OsRng,
                &mut worker.prefetcher.supply(job),
            )?,
            None => stream.on_body(buf, end_of_stream, &mut OsRng)?,
        };
        // The first chunk of a blob decides its treatment: a job can start after it.
        self.consider(&mut worker, stream, start, declared_len, now);
        if let (Some(job), Some(layer)) = (self.job, stream.encryptor()) {
            worker.ask(job, layer, stream.offset(), now);
        }
        Ok(verdict)
    }

    fn consider(
        &mut self,
        worker: &mut Worker,
        stream: &ChunkStream,
        start: u64,
        declared_len: Option<u64>,
        now: i64,
    ) {
        if self.considered || stream.encryptor().is_none() {
            return;
        }
        self.considered = true;
        self.job = worker.start_job(start, declared_len, now);
    }

    /// Ends the job (what arrives for it later is dropped) and reports the metrics.
    pub fn end(&mut self, worker: &SharedWorker, metrics: &Metrics) {
        if let Ok(mut worker) = worker.try_borrow_mut() {
            if let Some(job) = self.job.take() {
                worker.prefetcher.end(job);
            }
            worker.report(metrics);
        }
    }
}

fn parse_helpers(bytes: &[u8]) -> Vec<Helper> {
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
fn pick(helpers: &[Helper], mine: u32, now: i64, turn: usize) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn h(queue: u32, seen: i64, streams: bool) -> Helper {
        Helper {
            queue,
            seen,
            streams,
        }
    }

    #[test]
    fn helper_lines_round_trip_and_skip_garbage() {
        let text: String = [h(7, 100, true), h(9, 200, false)]
            .iter()
            .map(Helper::line)
            .collect();
        assert_eq!(text, "7 100 s\n9 200 -\n");
        let mut with_garbage = text.into_bytes();
        with_garbage.extend_from_slice(b"x 5 s\n10\n11 5 y\n\n");
        assert_eq!(
            parse_helpers(&with_garbage),
            vec![h(7, 100, true), h(9, 200, false)]
        );
        assert!(parse_helpers(&[0xff, 0xfe]).is_empty());
    }

    #[test]
    fn helpers_that_served_streams_come_first() {
        let list = [
            h(1, 100, true),
            h(2, 100, false),
            h(3, 100, true),
            h(4, 50, true),
        ];
        // Never itself, never a stale line (4), only workers while there are any (1, 3).
        let picked: Vec<Option<u32>> = (0..4).map(|t| pick(&list, 3, 100, t)).collect();
        assert_eq!(picked, vec![Some(1); 4]);
        let picked: Vec<Option<u32>> = (0..2).map(|t| pick(&list, 9, 100, t)).collect();
        assert_eq!(picked, vec![Some(1), Some(3)]);
        assert_eq!(pick(&list, 1, 100 + FRESH_SECS, 0), Some(3));
        // No other worker: any fresh VM, if there are two or more (one may be the main thread).
        let idle = [h(2, 100, false), h(6, 100, false), h(5, 100, true)];
        let picked: Vec<Option<u32>> = (0..2).map(|t| pick(&idle, 5, 100, t)).collect();
        assert_eq!(picked, vec![Some(2), Some(6)]);
        // --concurrency 1: the worker and the main thread's VM; no prefetch.
        assert_eq!(pick(&[h(2, 100, false), h(5, 100, true)], 5, 100, 0), None);
        // Alone.
        assert_eq!(pick(&[h(5, 100, true)], 5, 100, 0), None);
        assert_eq!(pick(&[], 5, 100, 0), None);
    }
}
