//! Keystream prefetch planning across workers, driven natively: workers of one process share a
//! store (the helper list) and the host's queues (an in-memory stand-in, process-wide like
//! Envoy's), and are fed the events the adapter passes on: ticks with the time, streams, queue
//! events, and their streams' chunks. What must hold: the ciphertext is the local path's, byte
//! for byte, whoever helps; who helps follows the list's rules; the tallies add up.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod gateway;
    pub mod queues;
}

use common::gateway::{MapStore, NOW};
use common::queues::Queues;
use ocicrypt_core::distribution::upload::{ChunkStream, UploadRecord};
use ocicrypt_core::format::keystream::{SEGMENT_BYTES, WINDOW_BYTES};
use ocicrypt_core::gateway::prefetch::{
    parse_helpers, pick, Helper, Keystream, Report, RequestPrefetch, Worker, FRESH_SECS,
    HELPERS_KEY, MAX_LISTED, NO_QUEUES,
};
use ocicrypt_core::store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;

const MIB: usize = 1 << 20;

fn rng() -> StdRng {
    StdRng::seed_from_u64(5)
}

fn listed(store: &MapStore) -> Vec<Helper> {
    parse_helpers(&store.get(HELPERS_KEY).unwrap_or_default())
}

fn h(queue: u32, seen: u64, streams: bool) -> Helper {
    Helper {
        queue,
        seen,
        streams,
    }
}

/// A worker that enlisted on a tick (`stream`: and served a stream since).
fn worker(store: &MapStore, queues: &mut Queues, stream: bool) -> Worker {
    let mut w = Worker::default();
    assert_eq!(w.on_tick(NOW, store, queues, &mut rng()), None);
    if stream {
        assert_eq!(w.on_stream(NOW, store, queues, &mut rng()), None);
    }
    w
}

/// Serves every request waiting in `helper`'s queue, one per queue event as Envoy posts them.
fn serve_all(helper: &mut Worker, queues: &mut Queues) {
    let q = helper.queues().unwrap().requests;
    while queues.waiting(q) > 0 {
        helper.on_queue_ready(q, queues);
    }
}

/// Streams `blob` in `chunk`-sized host chunks through `asker`'s request prefetch (helpers
/// served between chunks); the bytes forwarded.
fn push(
    asker: &mut Worker,
    helpers: &mut [&mut Worker],
    store: &MapStore,
    queues: &mut Queues,
    blob: &[u8],
    chunk: usize,
    declared: Option<u64>,
) -> (Vec<u8>, RequestPrefetch) {
    let mut stream = ChunkStream::new(UploadRecord::new("demo/app"), Some(0)).unwrap();
    let mut request = RequestPrefetch::default();
    let mut rng = rng();
    let mut sent = Vec::new();
    let pieces: Vec<&[u8]> = blob.chunks(chunk).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut buf = piece.to_vec();
        let mut q = queues.clone();
        let mut ks = Keystream {
            worker: asker,
            queues: &mut q,
        };
        request
            .encrypt(
                Some(&mut ks),
                store,
                &mut stream,
                &mut buf,
                i + 1 == pieces.len(),
                declared,
                NOW,
                &mut rng,
            )
            .unwrap();
        sent.extend(buf);
        for helper in helpers.iter_mut() {
            serve_all(helper, queues);
        }
    }
    (sent, request)
}

/// One process: its workers' shared store (the helper list) and the host's queues.
#[derive(Default)]
struct World {
    store: MapStore,
    queues: Queues,
}

impl World {
    /// A worker that enlisted on a tick (`stream`: and served a stream since).
    fn worker(&mut self, stream: bool) -> Worker {
        worker(&self.store, &mut self.queues, stream)
    }

    /// [`push`] in 256 KiB host chunks, no length declared.
    fn push(
        &mut self,
        asker: &mut Worker,
        helpers: &mut [&mut Worker],
        blob: &[u8],
    ) -> (Vec<u8>, RequestPrefetch) {
        self.push_in(asker, helpers, blob, 256 * 1024, None)
    }

    /// [`push`] in `chunk`-sized host chunks, `declared` the request's length if any.
    fn push_in(
        &mut self,
        asker: &mut Worker,
        helpers: &mut [&mut Worker],
        blob: &[u8],
        chunk: usize,
        declared: Option<u64>,
    ) -> (Vec<u8>, RequestPrefetch) {
        push(
            asker,
            helpers,
            &self.store,
            &mut self.queues,
            blob,
            chunk,
            declared,
        )
    }
}

/// The same blob encrypted with no worker at all: the local path.
fn local(blob: &[u8]) -> Vec<u8> {
    let mut stream = ChunkStream::new(UploadRecord::new("demo/app"), Some(0)).unwrap();
    let mut buf = blob.to_vec();
    let mut rng = rng();
    RequestPrefetch::default()
        .encrypt(
            None,
            &MapStore::default(),
            &mut stream,
            &mut buf,
            true,
            None,
            NOW,
            &mut rng,
        )
        .unwrap();
    buf
}

fn layer(n: usize) -> Vec<u8> {
    let mut blob = b"\x1f\x8b\x08\x00".to_vec();
    blob.extend((0..n - 4).map(|i| (i % 251) as u8 ^ (i / 4093) as u8));
    blob
}

// ---------------------------------------------------------------------------------------------
// The helper list.

#[test]
fn helper_lines_round_trip_and_skip_garbage() {
    let text: String = [h(7, 100, true), h(9, 200, false)]
        .iter()
        .map(Helper::line)
        .collect();
    assert_eq!(text, "7 100 s\n9 200 -\n");
    let mut with_garbage = text.into_bytes();
    with_garbage.extend_from_slice(b"x 5 s\n10\n11 5 y\n12 -5 s\n\n");
    assert_eq!(
        parse_helpers(&with_garbage),
        vec![h(7, 100, true), h(9, 200, false)]
    );
    assert!(parse_helpers(&[0xff, 0xfe]).is_empty());
}

/// Why, the list, the asking VM's request queue, the time, and the helpers picked turn by turn.
type PickCase<'a> = (&'a str, &'a [Helper], u32, u64, Vec<Option<u32>>);

/// Who helps.
#[test]
fn helpers_that_served_streams_come_first_and_the_main_thread_never_alone() {
    let list = [
        h(1, 100, true),
        h(2, 100, false),
        h(3, 100, true),
        h(4, 50, true),
    ];
    let idle = [h(2, 100, false), h(6, 100, false), h(5, 100, true)];
    let single = [h(2, 100, false), h(5, 100, true)];
    let alone = [h(5, 100, true)];
    let ahead = [h(1, 200, true)];
    let cases: Vec<PickCase> = vec![
        (
            "never itself, never stale (4), workers only while there are any",
            &list,
            3,
            100,
            vec![Some(1); 4],
        ),
        ("workers take turns", &list, 9, 100, vec![Some(1), Some(3)]),
        (
            "a line exactly FRESH_SECS old is fresh",
            &list,
            1,
            100 + FRESH_SECS,
            vec![Some(3)],
        ),
        (
            "a line older than that is not",
            &list,
            9,
            101 + FRESH_SECS,
            vec![None],
        ),
        (
            "no other worker: any fresh VM, two or more of them",
            &idle,
            5,
            100,
            vec![Some(2), Some(6)],
        ),
        (
            "--concurrency 1: the worker and the main thread's VM",
            &single,
            5,
            100,
            vec![None],
        ),
        ("alone", &alone, 5, 100, vec![None]),
        ("an empty list", &[], 5, 100, vec![None]),
        (
            "a clock behind a line still counts it fresh",
            &ahead,
            5,
            100,
            vec![Some(1)],
        ),
    ];
    for (why, helpers, mine, now, expected) in cases {
        let picked: Vec<Option<u32>> = (0..expected.len())
            .map(|turn| pick(helpers, mine, now, turn))
            .collect();
        assert_eq!(picked, expected, "{why}");
    }
}

#[test]
fn a_worker_lists_itself_and_renews_its_line() {
    let store = MapStore::default();
    let mut queues = Queues::default();
    let mut w = Worker::default();
    store
        .set(
            HELPERS_KEY,
            format!("90 {} s\n91 {} -\n", NOW - FRESH_SECS - 1, NOW - 3).as_bytes(),
        )
        .unwrap();
    // First tick: queues registered, listed as not (yet) a worker; the stale line goes.
    assert_eq!(w.on_tick(NOW, &store, &mut queues, &mut rng()), None);
    let mine = w.queues().unwrap().requests;
    assert_eq!(
        listed(&store),
        vec![h(91, NOW - 3, false), h(mine, NOW, false)]
    );
    // A stream marks it a worker at once, whatever the heartbeat period.
    w.on_stream(NOW + 1, &store, &mut queues, &mut rng());
    assert_eq!(
        listed(&store),
        vec![h(91, NOW - 3, false), h(mine, NOW + 1, true)]
    );
    // Within the period nothing is written; after it, the line is renewed.
    w.on_tick(NOW + 2, &store, &mut queues, &mut rng());
    assert_eq!(listed(&store)[1].seen, NOW + 1);
    w.on_tick(NOW + 3, &store, &mut queues, &mut rng());
    assert_eq!(listed(&store)[1], h(mine, NOW + 3, true));
    assert_eq!(queues.0.borrow().queues.len(), 2, "registered once");
}

#[test]
fn the_list_keeps_the_newest_lines() {
    let store = MapStore::default();
    let many: String = (1000..1100).map(|q| h(q, NOW, true).line()).collect();
    store.set(HELPERS_KEY, many.as_bytes()).unwrap();
    let mut queues = Queues::default();
    let w = worker(&store, &mut queues, false);
    let lines = listed(&store);
    assert_eq!(lines.len(), MAX_LISTED);
    assert_eq!(lines.last().unwrap().queue, w.queues().unwrap().requests);
    assert_eq!(lines[0].queue, 1100 - (MAX_LISTED as u32 - 1));
}

#[test]
fn a_worker_without_queues_stays_local_and_says_so_once() {
    let mut world = World::default();
    world.queues.0.borrow_mut().refuse = true;
    let mut w = Worker::default();
    assert_eq!(
        w.on_tick(NOW, &world.store, &mut world.queues, &mut rng()),
        Some(NO_QUEUES)
    );
    assert_eq!(
        w.on_stream(NOW, &world.store, &mut world.queues, &mut rng()),
        None
    );
    assert_eq!(
        w.on_tick(NOW + 5, &world.store, &mut world.queues, &mut rng()),
        None
    );
    assert!(w.queues().is_none());
    assert_eq!(world.store.get(HELPERS_KEY), None, "never listed");
    // Its streams encrypt locally, however many helpers the others list.
    world.queues.0.borrow_mut().refuse = false;
    let _b = world.worker(true);
    let blob = layer(3 * MIB);
    let (sent, _) = world.push(&mut w, &mut [], &blob);
    assert!(sent == local(&blob));
    assert_eq!(w.report(), Report::default());
}

// ---------------------------------------------------------------------------------------------
// A stream helped by another worker.

#[test]
fn a_helped_stream_writes_the_local_ciphertext_and_the_tallies_add_up() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(true);
    let blob = layer(10 * MIB);
    let (sent, mut request) = world.push(&mut a, &mut [&mut b], &blob);
    assert!(
        sent == local(&blob),
        "helped bytes differ from the local path"
    );
    assert_eq!(a.jobs(), 1);
    let report = request.end(&mut a);
    assert_eq!(a.jobs(), 0);
    let served = b.report();
    // A request of unknown length asks once it carried 1 MiB, a segment at a time, ahead.
    assert!(report.asked >= 8 * SEGMENT_BYTES, "{report:?}");
    assert!(report.used > 6 * MIB as u64, "{report:?}");
    assert!(report.used <= report.asked);
    assert_eq!(report.asked % SEGMENT_BYTES, 0, "whole grid segments");
    assert_eq!(served.served, report.asked, "b answered everything asked");
    assert_eq!((report.refused, served.declined), (0, 0));
    // Reports are deltas: nothing new since.
    assert_eq!(a.report(), Report::default());
}

#[test]
fn a_declared_length_bounds_what_is_asked() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(true);
    let blob = layer(5 * MIB + 1234);
    // The body is longer than it declared (3 MiB + 10): nothing is asked past that end.
    let declared = 3 * MIB as u64 + 10;
    let (sent, mut request) =
        world.push_in(&mut a, &mut [&mut b], &blob, 64 * 1024, Some(declared));
    assert!(sent == local(&blob));
    let report = request.end(&mut a);
    // From the end of the first chunk (which decided the treatment, encrypted before the job
    // started) to the declared end, the last piece partial.
    assert_eq!(report.asked, declared - 64 * 1024);
}

#[test]
fn a_busy_helper_declines_and_the_asker_stops_asking() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(true);
    // b encrypts a stream of its own: a job of its own in progress.
    let mut c = world.worker(true);
    let (_, _b_request) = world.push_in(&mut b, &mut [&mut c], &layer(2 * MIB), MIB, None);
    assert_eq!(b.jobs(), 1);
    // a is helped by b only (c is gone: its line is stale).
    let list: String = listed(&world.store)
        .into_iter()
        .filter(|l| l.queue != c.queues().unwrap().requests)
        .map(|l| l.line())
        .collect();
    world.store.set(HELPERS_KEY, list.as_bytes()).unwrap();
    let blob = layer(20 * MIB);
    let (_, mut request) = world.push_in(&mut a, &mut [&mut b], &blob, 512 * 1024, None);
    let report = request.end(&mut a);
    let b_report = b.report();
    assert_eq!(report.used, 0);
    assert_eq!(b_report.served, 0);
    assert!(b_report.declined > 0);
    // Nothing answered over a whole window: the asker stopped a window after its first ask,
    // well before the blob's end.
    assert!(report.asked <= 2 * WINDOW_BYTES, "{report:?}");
}

#[test]
fn a_single_worker_gets_no_help_from_the_main_threads_vm() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut main_thread = world.worker(false);
    let blob = layer(3 * MIB);
    let (sent, mut request) = world.push(&mut a, &mut [&mut main_thread], &blob);
    assert!(sent == local(&blob));
    assert_eq!(request.end(&mut a), Report::default());
    assert_eq!(main_thread.report(), Report::default());
    assert_eq!(a.jobs(), 0, "no job was started");
}

#[test]
fn two_idle_vms_help_a_stream_when_no_other_worker_served_one() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(false);
    let mut main_thread = world.worker(false);
    let blob = layer(3 * MIB);
    let (sent, mut request) = world.push(&mut a, &mut [&mut b, &mut main_thread], &blob);
    assert!(sent == local(&blob));
    let report = request.end(&mut a);
    let (b, m) = (b.report(), main_thread.report());
    assert!(b.served > 0 && m.served > 0, "they take turns: {b:?} {m:?}");
    assert_eq!(b.served + m.served, report.asked);
}

#[test]
fn wrong_keystream_is_refused_and_the_bytes_are_still_right() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(true);
    // Every segment's first keystream byte (after the tag, job and offset) is flipped on its
    // way back.
    world.queues.0.borrow_mut().tamper = Some(|m| {
        if m.first() == Some(&b'S') {
            m[17] ^= 1;
        }
    });
    let blob = layer(3 * MIB);
    let (sent, mut request) = world.push(&mut a, &mut [&mut b], &blob);
    assert!(sent == local(&blob));
    let report = request.end(&mut a);
    assert_eq!(report.used, 0);
    assert!(report.refused > 0, "{report:?}");
}

#[test]
fn segments_of_an_ended_job_are_dropped() {
    let mut world = World::default();
    let mut a = world.worker(true);
    let mut b = world.worker(true);
    let blob = layer(3 * MIB);
    // b answers only after the request ended (no serving between chunks).
    let (_, mut request) = world.push(&mut a, &mut [], &blob);
    let asked = request.end(&mut a).asked;
    assert!(asked > 0);
    serve_all(&mut b, &mut world.queues);
    assert_eq!(b.report().served, asked);
    let replies = a.queues().unwrap().replies;
    assert!(world.queues.waiting(replies) > 0);
    a.on_queue_ready(replies, &mut world.queues);
    assert_eq!(world.queues.waiting(replies), 0, "collected");
    assert_eq!(a.report(), Report::default(), "and dropped: nothing used");
}

#[test]
fn prefetch_off_asks_nothing() {
    let mut world = World::default();
    let mut a = world.worker(true);
    a.set_budget(0);
    let mut b = world.worker(true);
    let blob = layer(3 * MIB);
    let (sent, mut request) = world.push(&mut a, &mut [&mut b], &blob);
    assert!(sent == local(&blob));
    assert_eq!(request.end(&mut a), Report::default());
}

/// A store where other workers win every compare-and-set for a while.
struct Contended<'a> {
    store: &'a MapStore,
    losses: std::cell::Cell<u32>,
}

impl Store for Contended<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), ocicrypt_core::error::OciError> {
        self.store.set(key, value)
    }
    fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        self.store.get_cas(key)
    }
    fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        if self.losses.get() > 0 {
            self.losses.set(self.losses.get() - 1);
            return false;
        }
        self.store.set_cas(key, value, cas)
    }
}

#[test]
fn a_heartbeat_lost_to_other_writers_is_tried_again_at_the_next_tick() {
    let inner = MapStore::default();
    let mut queues = Queues::default();
    // The enlisting tick renews twice (on enlisting, then as a tick), four tries each: eight
    // lost rounds and it gives up, without counting as a beat.
    let store = Contended {
        store: &inner,
        losses: std::cell::Cell::new(8),
    };
    let mut w = Worker::default();
    w.on_tick(NOW, &store, &mut queues, &mut rng());
    assert!(w.queues().is_some());
    assert_eq!(store.get(HELPERS_KEY), None);
    // Three lost rounds: the fourth try of the next tick, within the period, writes.
    store.losses.set(3);
    w.on_tick(NOW + 1, &store, &mut queues, &mut rng());
    let mine = w.queues().unwrap().requests;
    assert_eq!(listed(&inner), vec![h(mine, NOW + 1, false)]);
}
