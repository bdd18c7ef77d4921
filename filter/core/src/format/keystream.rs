//! Keystream prefetch: AES-CTR keystream for an upload computed ahead on another Envoy worker.
//!
//! Each upload request streams through one Envoy worker, and wasm has no AES instructions: the
//! bitsliced AES is about 40 % of the filter's work per byte, the three SHA-256 streams the
//! rest. CTR keystream depends only on (key, nonce, offset), never on the data, so another
//! worker can compute the bytes a stream will need next while the stream's own worker hashes
//! the current chunk.
//!
//! The stream's worker never waits for a segment. Bytes whose segment has not arrived are
//! encrypted locally, so what the gateway writes, and how it fails, is what the local path
//! writes; a helper that is slow, gone or wrong only costs speed. A segment is checked before
//! use ([`LayerEncryptor::encrypt_in_place_given`] compares its first and last blocks with
//! ones computed locally) and dropped on mismatch.
//!
//! Memory stays bounded: a job asks for at most [`WINDOW_BYTES`] ahead of its stream, a worker
//! for at most its budget over all its jobs (`limits.keystream_prefetch_bytes`, default
//! [`BUDGET_BYTES`]; 0 turns prefetch off), and segments behind a stream or of an ended
//! job are dropped on arrival.
use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::format::blockcipher::{self, LayerEncryptor};

/// Size of one keystream segment (one helper callback: ≈ 3 ms of AES under V8).
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// How far ahead of its stream a job asks.
pub const WINDOW_BYTES: u64 = 8 << 20;
/// Default of the keystream a worker may have asked for and not yet used, over all its jobs
/// (`limits.keystream_prefetch_bytes`).
pub const BUDGET_BYTES: u64 = 32 << 20;
/// A request of unknown length asks for help only after it carried this many bytes: most
/// layers are small, and keystream computed for bytes that never come is wasted work.
pub const MIN_STREAM_BYTES: u64 = 1 << 20;

const REQUEST_TAG: u8 = b'K';
const SEGMENT_TAG: u8 = b'S';
const REQUEST_LEN: usize = 1 + 8 + 4 + 32 + 16 + 8 + 4;
/// Tag, job, offset: the keystream follows.
const SEGMENT_HEADER: usize = 1 + 8 + 8;

/// Ask a helper for `len` keystream bytes from `offset` of a stream, answered to the shared
/// queue `reply_to`. Holds the layer key: it travels only inside the Envoy process (the same
/// shared memory that already keeps the upload's record).
pub struct SegmentRequest {
    /// The asking worker's job (one request body).
    pub job: u64,
    /// Queue the segment goes to.
    pub reply_to: u32,
    symkey: Zeroizing<[u8; 32]>,
    nonce: [u8; 16],
    /// First stream byte of the segment.
    pub offset: u64,
    /// Segment length (at most [`SEGMENT_BYTES`]).
    pub len: u32,
}

impl SegmentRequest {
    /// A request for the keystream of `layer`'s stream.
    pub fn for_layer(
        layer: &LayerEncryptor,
        job: u64,
        reply_to: u32,
        offset: u64,
        len: u32,
    ) -> Self {
        let (symkey, nonce) = layer.key_material();
        SegmentRequest {
            job,
            reply_to,
            symkey: Zeroizing::new(*symkey),
            nonce: *nonce,
            offset,
            len,
        }
    }

    /// Wire form for a shared queue.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(REQUEST_LEN));
        out.push(REQUEST_TAG);
        out.extend_from_slice(&self.job.to_be_bytes());
        out.extend_from_slice(&self.reply_to.to_be_bytes());
        out.extend_from_slice(self.symkey.as_ref());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Reads [`Self::encode`]'s form; `None` for anything else, or a segment over the limit.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != REQUEST_LEN {
            return None;
        }
        let rest = bytes.strip_prefix(&[REQUEST_TAG])?;
        let (job, rest) = rest.split_first_chunk::<8>()?;
        let (reply_to, rest) = rest.split_first_chunk::<4>()?;
        let (symkey, rest) = rest.split_first_chunk::<32>()?;
        let (nonce, rest) = rest.split_first_chunk::<16>()?;
        let (offset, rest) = rest.split_first_chunk::<8>()?;
        let len = u32::from_be_bytes(*rest.first_chunk::<4>()?);
        if u64::from(len) > SEGMENT_BYTES || len == 0 {
            return None;
        }
        Some(SegmentRequest {
            job: u64::from_be_bytes(*job),
            reply_to: u32::from_be_bytes(*reply_to),
            symkey: Zeroizing::new(*symkey),
            nonce: *nonce,
            offset: u64::from_be_bytes(*offset),
            len,
        })
    }

    /// What the helper computes: the asked keystream, as a segment in wire form (computed in
    /// place after the header: no copy of a megabyte per segment).
    pub fn answer(&self) -> Wiped {
        let mut out = segment_header(self.job, self.offset, self.len as usize);
        out.resize(SEGMENT_HEADER + self.len as usize, 0);
        let body = out.get_mut(SEGMENT_HEADER..).unwrap_or_default();
        if !blockcipher::write_keystream(&self.symkey, &self.nonce, self.offset, body) {
            // An empty segment is refused on arrival: those bytes go local.
            out.truncate(SEGMENT_HEADER);
        }
        Wiped(out)
    }
}

/// A segment's wire header (tag, job, offset), with room for `len` keystream bytes after it.
fn segment_header(job: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEGMENT_HEADER + len);
    out.push(SEGMENT_TAG);
    out.extend_from_slice(&job.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// Bytes wiped when dropped, with one vectorised fill rather than `zeroize`'s byte-by-byte
/// volatile stores: keystream comes in megabytes, and those stores cost as much as a third of
/// computing it. `black_box` keeps the fill from being optimised away before the free.
pub struct Wiped(pub Vec<u8>);

impl std::ops::Deref for Wiped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&mut self.0);
    }
}

/// A helper's answer: keystream bytes of one job from one offset, kept in the message as it
/// came off the queue.
pub struct Segment {
    /// Job it answers.
    pub job: u64,
    /// First stream byte it covers.
    pub offset: u64,
    message: Wiped,
}

impl Segment {
    /// Reads [`SegmentRequest::answer`]'s form; `None` for anything else.
    pub fn decode(message: Vec<u8>) -> Option<Self> {
        let message = Wiped(message);
        let rest = message.strip_prefix(&[SEGMENT_TAG])?;
        let (job, rest) = rest.split_first_chunk::<8>()?;
        let (offset, rest) = rest.split_first_chunk::<8>()?;
        if rest.is_empty() || rest.len() as u64 > SEGMENT_BYTES {
            return None;
        }
        let (job, offset) = (u64::from_be_bytes(*job), u64::from_be_bytes(*offset));
        Some(Segment {
            job,
            offset,
            message,
        })
    }

    /// A segment of `keystream`, as a helper would send it (tests).
    #[cfg(test)]
    fn from_parts(job: u64, offset: u64, keystream: &[u8]) -> Self {
        let mut message = segment_header(job, offset, keystream.len());
        message.extend_from_slice(keystream);
        Segment {
            job,
            offset,
            message: Wiped(message),
        }
    }

    /// The keystream bytes.
    pub fn keystream(&self) -> &[u8] {
        self.message.get(SEGMENT_HEADER..).unwrap_or_default()
    }

    /// The keystream bytes, writable (tests of the check).
    #[cfg(test)]
    fn keystream_mut(&mut self) -> &mut [u8] {
        self.message.0.get_mut(SEGMENT_HEADER..).unwrap_or_default()
    }
}

/// Where the keystream for the next bytes of a stream comes from.
pub enum Supply<'a> {
    /// A helper's keystream for the next bytes (as many as it covers, up to what was asked).
    Given(&'a [u8]),
    /// None arrived for the next `n` bytes: compute it locally.
    Local(usize),
}

/// Hands [`crate::distribution::upload::ChunkStream`] the keystream of its next bytes.
pub trait KeystreamSupply {
    /// Keystream for up to `max` bytes from stream byte `at`.
    fn next(&mut self, at: u64, max: usize) -> Supply<'_>;
    /// The segment just given did not match the stream: drop it (the bytes go local).
    fn refused(&mut self, at: u64);
    /// `n` bytes of given keystream were used.
    fn used(&mut self, n: usize);
}

/// No helper: every byte local.
pub struct LocalOnly;

impl KeystreamSupply for LocalOnly {
    fn next(&mut self, _at: u64, max: usize) -> Supply<'_> {
        Supply::Local(max)
    }
    fn refused(&mut self, _at: u64) {}
    fn used(&mut self, _n: usize) {}
}

/// One job: the body of one upload request on this worker.
struct Job {
    /// Stream position reached (bytes before it are encrypted).
    at: u64,
    /// First byte of the request.
    start: u64,
    /// One past the request's last byte, when the client declared its length.
    end: Option<u64>,
    /// One past the last byte asked for.
    asked: u64,
    /// Arrived segments by first byte.
    segments: BTreeMap<u64, Segment>,
    /// Stream position of the first ask, and whether any segment arrived since.
    first_ask: Option<u64>,
    answered: bool,
}

impl Job {
    fn outstanding(&self) -> u64 {
        self.asked.saturating_sub(self.at)
    }

    /// Drops segments wholly behind the stream.
    fn advance(&mut self, at: u64) {
        self.at = self.at.max(at);
        let at = self.at;
        self.segments
            .retain(|&start, seg| start.saturating_add(seg.keystream().len() as u64) > at);
    }
}

/// Counters of one worker's prefetching, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Keystream bytes asked of helpers.
    pub asked: u64,
    /// Bytes encrypted with a helper's keystream.
    pub used: u64,
    /// Segments refused by the check.
    pub refused: u64,
}

/// One worker's jobs, the segments that arrived for them, and what they asked for.
pub struct Prefetcher {
    next_job: u64,
    jobs: BTreeMap<u64, Job>,
    tally: Tally,
    budget: u64,
}

impl Default for Prefetcher {
    fn default() -> Self {
        Prefetcher::with_budget(BUDGET_BYTES)
    }
}

impl Prefetcher {
    /// A prefetcher whose jobs may have at most `budget` bytes asked for and not yet used
    /// (0: never asks).
    pub fn with_budget(budget: u64) -> Self {
        Prefetcher {
            next_job: 0,
            jobs: BTreeMap::new(),
            tally: Tally::default(),
            budget,
        }
    }

    /// Changes the budget (a new configuration); jobs in progress keep what they asked for.
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    /// Whether this worker asks for keystream at all (a budget above 0).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Starts a job for a request body whose first byte is stream byte `start`;
    /// `declared_len` is its `Content-Length`, when given.
    pub fn start(&mut self, start: u64, declared_len: Option<u64>) -> u64 {
        self.next_job = self.next_job.wrapping_add(1);
        let job = self.next_job;
        self.jobs.insert(
            job,
            Job {
                at: start,
                start,
                end: declared_len.map(|n| start.saturating_add(n)),
                asked: start,
                segments: BTreeMap::new(),
                first_ask: None,
                answered: false,
            },
        );
        job
    }

    /// Ends a job: what was asked for it and has not arrived is dropped on arrival.
    pub fn end(&mut self, job: u64) {
        self.jobs.remove(&job);
    }

    /// Jobs in progress.
    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Counters since the worker started.
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// Keystream asked for and not yet behind its stream, over all jobs.
    pub fn outstanding(&self) -> u64 {
        self.jobs.values().map(Job::outstanding).sum()
    }

    /// The segments `job` should ask for now that the stream will be at `at` once the chunk in
    /// hand is encrypted: whole [`SEGMENT_BYTES`] pieces on the grid of stream offsets, up to
    /// [`WINDOW_BYTES`] ahead of `at`, within the request's declared end and the worker's
    /// budget. Returns `(offset, len)` pairs, recorded as asked. `at` may be ahead of the
    /// stream (segments for the chunk in hand are kept: they may still come in time): it moves
    /// the horizon, never the stream position.
    pub fn plan(&mut self, job: u64, at: u64) -> Vec<(u64, u32)> {
        let mine = self.jobs.get(&job).map_or(0, Job::outstanding);
        let others = self.outstanding().saturating_sub(mine);
        let Some(j) = self.jobs.get_mut(&job) else {
            return Vec::new();
        };
        // Helpers that answered nothing over a whole window are busy (they decline while
        // encrypting streams of their own) or gone: stop asking for this request.
        if !j.answered
            && j.first_ask
                .is_some_and(|f| at > f.saturating_add(WINDOW_BYTES))
        {
            return Vec::new();
        }
        let limit = match j.end {
            Some(end) => end,
            None if at.saturating_sub(j.start) < MIN_STREAM_BYTES => return Vec::new(),
            None => u64::MAX,
        };
        let horizon = at.saturating_add(WINDOW_BYTES).min(limit);
        let mut from = j.asked.max(at);
        let mut out = Vec::new();
        while from < horizon {
            let grid_end = (from / SEGMENT_BYTES)
                .saturating_add(1)
                .saturating_mul(SEGMENT_BYTES);
            let to = grid_end.min(horizon);
            let outstanding = to.saturating_sub(j.at);
            if others.saturating_add(outstanding) > self.budget {
                break;
            }
            // Partial grid pieces are asked only at the declared end: elsewhere they would be
            // asked again in pieces as the horizon moves, each a helper callback.
            if to < grid_end && Some(to) != j.end {
                break;
            }
            let len = u32::try_from(to - from).unwrap_or(u32::MAX);
            out.push((from, len));
            self.tally.asked = self.tally.asked.saturating_add(u64::from(len));
            from = to;
        }
        j.asked = from.max(j.asked);
        if !out.is_empty() && j.first_ask.is_none() {
            j.first_ask = Some(at);
        }
        out
    }

    /// Files an arrived segment with its job; dropped when the job ended, or the segment is
    /// behind the stream or outside what was asked.
    pub fn deliver(&mut self, segment: Segment) -> bool {
        let Some(j) = self.jobs.get_mut(&segment.job) else {
            return false;
        };
        let end = segment
            .offset
            .saturating_add(segment.keystream().len() as u64);
        if end <= j.at || end > j.asked || segment.offset < j.start {
            return false;
        }
        j.segments.insert(segment.offset, segment);
        j.answered = true;
        true
    }

    /// The [`KeystreamSupply`] of `job`.
    pub fn supply(&mut self, job: u64) -> JobSupply<'_> {
        JobSupply {
            prefetcher: self,
            job,
        }
    }
}

/// [`KeystreamSupply`] over one job of a [`Prefetcher`].
pub struct JobSupply<'a> {
    prefetcher: &'a mut Prefetcher,
    job: u64,
}

impl KeystreamSupply for JobSupply<'_> {
    fn next(&mut self, at: u64, max: usize) -> Supply<'_> {
        let Some(j) = self.prefetcher.jobs.get_mut(&self.job) else {
            return Supply::Local(max);
        };
        j.advance(at);
        // The segment holding `at`, if any: the last one starting at or before it, with bytes
        // left from `at` on.
        let held = j
            .segments
            .range(..=at)
            .next_back()
            .and_then(|(start, seg)| {
                let skip = usize::try_from(at - start).ok()?;
                seg.keystream().get(skip..).filter(|ks| !ks.is_empty())
            });
        if let Some(ks) = held {
            return Supply::Given(ks.get(..ks.len().min(max)).unwrap_or_default());
        }
        let next_start = j.segments.range(at..).next().map(|(s, _)| *s);
        let n = next_start.map_or(max as u64, |s| (s - at).min(max as u64));
        Supply::Local(usize::try_from(n).unwrap_or(max).max(1).min(max))
    }

    fn refused(&mut self, at: u64) {
        if let Some(j) = self.prefetcher.jobs.get_mut(&self.job) {
            if let Some(start) = j.segments.range(..=at).next_back().map(|(s, _)| *s) {
                j.segments.remove(&start);
            }
        }
        self.prefetcher.tally.refused = self.prefetcher.tally.refused.saturating_add(1);
    }

    fn used(&mut self, n: usize) {
        self.prefetcher.tally.used = self.prefetcher.tally.used.saturating_add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::upload::{ChunkStream, Treatment, UploadRecord};
    use rand::{Rng, SeedableRng};

    const M: u64 = SEGMENT_BYTES;

    fn layer() -> LayerEncryptor {
        LayerEncryptor::new([7u8; 32], [0xfe; 16])
    }

    #[test]
    fn requests_and_segments_round_trip() {
        let req = SegmentRequest::for_layer(&layer(), 9, 3, 5 * M, 4096);
        let back = SegmentRequest::decode(&req.encode()).unwrap();
        assert_eq!(
            (back.job, back.reply_to, back.offset, back.len),
            (9, 3, 5 * M, 4096)
        );
        let seg = Segment::decode(back.answer().to_vec()).unwrap();
        assert_eq!((seg.job, seg.offset), (9, 5 * M));
        assert_eq!(
            seg.keystream(),
            &blockcipher::keystream(&[7u8; 32], &[0xfe; 16], 5 * M, 4096)[..]
        );
        // Truncated, over-long, zero-length and foreign messages are refused.
        let wire = req.encode();
        assert!(SegmentRequest::decode(&wire[..wire.len() - 1]).is_none());
        assert!(Segment::decode(wire.to_vec()).is_none());
        let mut big = SegmentRequest::for_layer(&layer(), 1, 1, 0, 1).encode();
        big.truncate(REQUEST_LEN - 4);
        big.extend_from_slice(&((M as u32) + 1).to_be_bytes());
        assert!(SegmentRequest::decode(&big).is_none());
        big.truncate(REQUEST_LEN - 4);
        big.extend_from_slice(&0u32.to_be_bytes());
        assert!(SegmentRequest::decode(&big).is_none());
        assert!(Segment::decode(vec![SEGMENT_TAG; 17]).is_none());
    }

    #[test]
    fn decoders_take_any_bytes_without_panicking() {
        // What comes off a shared queue is untrusted: anything decodes to None or to a value
        // whose bounds hold.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let good = SegmentRequest::for_layer(&layer(), 3, 4, 5, 6).encode();
        for round in 0..20_000 {
            let len = rng.gen_range(0..(REQUEST_LEN + 40));
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if round % 3 == 0 {
                bytes = good.to_vec();
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
                bytes.truncate(rng.gen_range(0..=bytes.len()));
            }
            if round % 5 == 0 {
                if let Some(b) = bytes.first_mut() {
                    *b = if round % 2 == 0 {
                        REQUEST_TAG
                    } else {
                        SEGMENT_TAG
                    };
                }
            }
            if let Some(r) = SegmentRequest::decode(&bytes) {
                assert!(r.len >= 1 && u64::from(r.len) <= SEGMENT_BYTES);
            }
            if let Some(seg) = Segment::decode(bytes) {
                assert!(!seg.keystream().is_empty());
                assert!(seg.keystream().len() as u64 <= SEGMENT_BYTES);
            }
        }
    }

    #[test]
    fn small_requests_of_unknown_length_ask_nothing() {
        let mut p = Prefetcher::default();
        let job = p.start(0, None);
        assert!(p.plan(job, M - 1).is_empty());
        let asked = p.plan(job, M);
        assert_eq!(asked.first(), Some(&(M, M as u32)));
        assert_eq!(asked.len() as u64, WINDOW_BYTES / M);
        // Nothing twice.
        assert!(p.plan(job, M + 10).is_empty());
        assert_eq!(p.plan(job, 2 * M), vec![(M + WINDOW_BYTES, M as u32)]);
    }

    #[test]
    fn declared_length_bounds_what_is_asked() {
        let mut p = Prefetcher::default();
        let job = p.start(100, Some(3 * M));
        let asked = p.plan(job, 200);
        assert_eq!(
            asked,
            vec![
                (200, (M - 200) as u32),
                (M, M as u32),
                (2 * M, M as u32),
                (3 * M, 100)
            ]
        );
        // Every asked byte lies in [200, 100 + 3M), in grid pieces, ending at the declared end.
        let total: u64 = asked.iter().map(|(_, l)| u64::from(*l)).sum();
        assert_eq!(total, 100 + 3 * M - 200);
        assert!(asked
            .iter()
            .all(|(o, l)| o / M == (o + u64::from(*l) - 1) / M));
        assert!(p.plan(job, 2 * M).is_empty());
    }

    #[test]
    fn asking_ahead_keeps_the_segments_of_the_chunk_in_hand() {
        // The adapter asks before encrypting a chunk, for what follows it: the segments of the
        // chunk itself, already filed, must stay.
        let mut p = Prefetcher::default();
        let job = p.start(0, Some(16 * M));
        p.plan(job, 0);
        assert!(p.deliver(Segment::from_parts(
            job,
            0,
            &blockcipher::keystream(&[7u8; 32], &[0xfe; 16], 0, M as usize),
        )));
        p.plan(job, 4 * M);
        assert!(matches!(p.supply(job).next(0, 10), Supply::Given(k) if k.len() == 10));
        assert!(matches!(p.supply(job).next(M, 10), Supply::Local(10)));
    }

    #[test]
    fn unanswered_jobs_stop_asking_after_a_window() {
        let mut p = Prefetcher::default();
        let job = p.start(0, Some(64 * M));
        assert!(!p.plan(job, 0).is_empty());
        // Nothing arrives; within the first window asking goes on, past it, it stops.
        assert!(!p.plan(job, WINDOW_BYTES).is_empty());
        assert!(p.plan(job, WINDOW_BYTES + 1).is_empty());
        assert!(p.plan(job, 40 * M).is_empty());
        // One answer is enough to go on.
        let mut p = Prefetcher::default();
        let job = p.start(0, Some(64 * M));
        p.plan(job, 0);
        let ks = blockcipher::keystream(&[7u8; 32], &[0xfe; 16], 0, M as usize);
        assert!(p.deliver(Segment::from_parts(job, 0, &ks)));
        assert!(!p.plan(job, 20 * M).is_empty());
    }

    #[test]
    fn the_budget_holds_over_jobs() {
        let mut p = Prefetcher::default();
        let jobs: Vec<u64> = (0..8).map(|_| p.start(0, Some(1 << 40))).collect();
        for &job in &jobs {
            p.plan(job, 0);
        }
        assert!(p.outstanding() <= BUDGET_BYTES);
        assert_eq!(p.outstanding(), BUDGET_BYTES);
        // A job ending frees its share for the others.
        p.end(jobs[0]);
        assert!(!p.plan(jobs[7], 0).is_empty());
        assert!(p.outstanding() <= BUDGET_BYTES);
        // A smaller configured budget holds too, and 0 asks nothing.
        let mut small = Prefetcher::with_budget(3 * M);
        let job = small.start(0, None);
        // The stream is still at 0: asking from 2M counts from there, so 1M fits in 3M.
        let asked: u64 = small
            .plan(job, 2 * M)
            .iter()
            .map(|(_, l)| u64::from(*l))
            .sum();
        assert_eq!(asked, M);
        let mut off = Prefetcher::with_budget(0);
        assert!(!off.enabled());
        let job = off.start(0, Some(64 * M));
        assert!(off.plan(job, 0).is_empty());
    }

    #[test]
    fn segments_are_used_checked_and_dropped() {
        let mut p = Prefetcher::default();
        let job = p.start(0, Some(4 * M));
        assert_eq!(p.plan(job, 1000).first(), Some(&(1000, (M - 1000) as u32)));
        // A segment of an ended or unknown job, or outside what was asked, is dropped.
        let seg = |job, offset, len| {
            Segment::from_parts(
                job,
                offset,
                &blockcipher::keystream(&[7u8; 32], &[0xfe; 16], offset, len),
            )
        };
        assert!(!p.deliver(seg(job + 1, M, 16)));
        assert!(!p.deliver(seg(job, 4 * M, 16)));
        assert!(p.deliver(seg(job, M, M as usize)));
        // A wrong keystream is refused by the check, and the bytes go local.
        let mut bogus = seg(job, 2 * M, M as usize);
        bogus.keystream_mut()[0] ^= 1;
        assert!(p.deliver(bogus));

        // Through the upload stream, in chunks that do not follow the segment grid.
        let mut reference = layer();
        let mut data: Vec<u8> = (0..4 * M).map(|i| (i % 251) as u8).collect();
        let mut expected = data.clone();
        reference.encrypt_in_place(&mut expected);
        let record = UploadRecord {
            repository: "r".into(),
            offset: 0,
            treatment: Treatment::Encrypt(Box::new(layer())),
        };
        let mut stream = ChunkStream::new(record, None).unwrap();
        let mut out = Vec::new();
        for piece in data.chunks(700_001) {
            let mut chunk = piece.to_vec();
            stream
                .on_body_with(&mut chunk, false, &mut rand_core::OsRng, &mut p.supply(job))
                .unwrap();
            out.extend_from_slice(&chunk);
        }
        data = out;
        assert_eq!(data, expected);
        let Treatment::Encrypt(enc) = stream.into_record().unwrap().treatment else {
            panic!("treatment changed");
        };
        assert_eq!(
            enc.finish().encrypted_digest,
            reference.finish().encrypted_digest
        );
        assert_eq!(p.tally().used, M);
        assert_eq!(p.tally().refused, 1);
        p.end(job);
        assert_eq!(p.jobs(), 0);
        assert!(!p.deliver(seg(job, 3 * M, 16)));
    }
}
