//! Hashing beside the stream: a few threads for the whole process take the two ciphertext
//! hashes of the uploads in flight (the core's `format::ciphertext_hashes`), so that a stream's
//! worker only encrypts and hashes the plaintext. Per megabyte that moves ≈ 1.2 ms of SHA-256
//! off the worker, which is what bounds one stream's speed.
//!
//! The cipher never moves: a chunk goes upstream after the worker encrypted it, and the helper
//! gets a copy of its ciphertext. Each lane stays on one thread (its hashes are sequential),
//! queued in order behind a bounded channel: a worker that outruns its helper waits for room,
//! so at most [`QUEUE`] × [`PIECE`] bytes wait per thread. A helper that is gone makes its
//! lanes fail at their end, and the core then refuses the upload (never a guessed digest).
//!
//! `OCICRYPT_HASH_THREADS` in Envoy's environment sets the number of threads (0: hash in line
//! on the worker, as the wasm build does); by default one per CPU, at most [`MAX_THREADS`].
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SendError, SyncSender};
use std::sync::LazyLock;

use ocicrypt_core::format::ciphertext_hashes::{CiphertextHashes, CiphertextLane, HashHelpers};

/// Bytes per message: a host chunk can be megabytes, and the queue's bound is in messages.
const PIECE: usize = 256 * 1024;
/// Messages a thread's queue holds before a worker waits.
const QUEUE: usize = 16;
/// More threads than this buys nothing: each stream's hashing is sequential.
const MAX_THREADS: usize = 8;

enum Job {
    Start(u64, CiphertextHashes),
    Absorb(u64, Vec<u8>),
    Join(u64, SyncSender<Option<CiphertextHashes>>),
    Forget(u64),
}

struct Pool {
    threads: Vec<SyncSender<Job>>,
    next: AtomicUsize,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool::spawn(thread_count()));
static NEXT_LANE: AtomicU64 = AtomicU64::new(1);

fn thread_count() -> usize {
    let per_cpu = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_THREADS);
    std::env::var("OCICRYPT_HASH_THREADS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .map_or(per_cpu, |n| n.min(MAX_THREADS))
}

impl Pool {
    fn spawn(count: usize) -> Pool {
        let threads = (0..count)
            .filter_map(|i| {
                let (tx, rx) = sync_channel(QUEUE);
                std::thread::Builder::new()
                    .name(format!("ocicrypt-hash-{i}"))
                    .spawn(move || serve(rx))
                    .ok()
                    .map(|_| tx)
            })
            .collect();
        Pool {
            threads,
            next: AtomicUsize::new(0),
        }
    }
}

/// A helper thread: the states of its lanes, fed in the order their jobs were queued.
fn serve(jobs: Receiver<Job>) {
    let mut lanes: HashMap<u64, CiphertextHashes> = HashMap::new();
    for job in jobs {
        match job {
            Job::Start(id, hashes) => {
                lanes.insert(id, hashes);
            }
            Job::Absorb(id, bytes) => {
                if let Some(hashes) = lanes.get_mut(&id) {
                    hashes.absorb(&bytes);
                }
            }
            Job::Join(id, reply) => {
                // The worker may have given up waiting; nothing to do then.
                let _ = reply.send(lanes.remove(&id));
            }
            Job::Forget(id) => {
                lanes.remove(&id);
            }
        }
    }
}

/// What a stream's environment lends the core: lanes on the process's helper threads.
pub struct Helpers;

impl HashHelpers for Helpers {
    fn lane(
        &mut self,
        hashes: CiphertextHashes,
    ) -> Result<Box<dyn CiphertextLane>, Box<CiphertextHashes>> {
        let pool = &*POOL;
        if pool.threads.is_empty() {
            return Err(Box::new(hashes));
        }
        let at = pool.next.fetch_add(1, Ordering::Relaxed) % pool.threads.len();
        let Some(tx) = pool.threads.get(at) else {
            return Err(Box::new(hashes));
        };
        let id = NEXT_LANE.fetch_add(1, Ordering::Relaxed);
        let lane = |broken| ThreadLane {
            id,
            tx: tx.clone(),
            broken,
            joined: false,
        };
        match tx.send(Job::Start(id, hashes)) {
            Ok(()) => Ok(Box::new(lane(false))),
            // The thread is gone: the states come back with the refused job.
            Err(SendError(Job::Start(_, hashes))) => Err(Box::new(hashes)),
            // `send` hands back the job it was given, so this is never taken; a broken lane
            // refuses the upload at its end.
            Err(SendError(_)) => Ok(Box::new(lane(true))),
        }
    }
}

struct ThreadLane {
    id: u64,
    tx: SyncSender<Job>,
    /// A job could not be queued: the states miss bytes, and `join` says so.
    broken: bool,
    joined: bool,
}

impl CiphertextLane for ThreadLane {
    fn absorb(&mut self, ciphertext: &[u8]) {
        if self.broken {
            return;
        }
        for piece in ciphertext.chunks(PIECE) {
            if self.tx.send(Job::Absorb(self.id, piece.to_vec())).is_err() {
                self.broken = true;
                return;
            }
        }
    }

    fn join(mut self: Box<Self>) -> Option<CiphertextHashes> {
        self.joined = true;
        if self.broken {
            return None;
        }
        let (reply, answer) = sync_channel(1);
        self.tx.send(Job::Join(self.id, reply)).ok()?;
        answer.recv().ok().flatten()
    }
}

impl Drop for ThreadLane {
    fn drop(&mut self) {
        // A request that ended without its record (reset, refused) leaves its states behind.
        if !self.joined && !self.broken {
            let _ = self.tx.send(Job::Forget(self.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocicrypt_core::format::blockcipher::LayerEncryptor;

    /// Deterministic bytes, different per stream.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// One layer encrypted in the chunks `cuts`, its ciphertext hashed on the pool's threads
    /// over two requests (the states go back between them); the layer that comes out.
    fn through_pool(seed: u64, blob: &[u8], cuts: &[usize]) -> (Vec<u8>, [u8; 32], [u8; 32]) {
        let mut enc = LayerEncryptor::new([seed as u8; 32], [3; 16]);
        let mut out = Vec::new();
        let mut rest = blob;
        for (i, &n) in cuts.iter().chain([&usize::MAX]).enumerate() {
            let mut lane = Helpers
                .lane(enc.lend_ciphertext_hashes())
                .unwrap_or_else(|_| panic!("no helper thread"));
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            let mut piece = piece.to_vec();
            // A request's body comes in host chunks of various sizes, some over a PIECE.
            for chunk in piece.chunks_mut(1 + (i * 97_003) % 700_000) {
                enc.encrypt_in_place_beside(chunk, lane.as_mut());
            }
            out.extend_from_slice(&piece);
            rest = tail;
            enc.take_back_ciphertext_hashes(lane.join().unwrap())
                .unwrap();
        }
        let layer = enc.finish();
        (out, layer.encrypted_digest.0, layer.hmac)
    }

    #[test]
    fn lanes_on_threads_hash_as_in_line_with_streams_in_parallel() {
        let workers: Vec<_> = (0..6u64)
            .map(|seed| {
                std::thread::spawn(move || {
                    let blob = bytes(seed, 1_500_000 + seed as usize * 4099);
                    let got = through_pool(seed, &blob, &[300_001, 900_000]);
                    let mut enc = LayerEncryptor::new([seed as u8; 32], [3; 16]);
                    let mut want = blob.clone();
                    enc.encrypt_in_place(&mut want);
                    let layer = enc.finish();
                    assert!(got.0 == want, "stream {seed}: ciphertext");
                    assert_eq!(got.1, layer.encrypted_digest.0, "stream {seed}: digest");
                    assert_eq!(got.2, layer.hmac, "stream {seed}: HMAC");
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn a_lane_dropped_without_its_end_leaves_the_helpers_working() {
        for _ in 0..50 {
            let mut enc = LayerEncryptor::new([9; 32], [9; 16]);
            let mut lane = Helpers.lane(enc.lend_ciphertext_hashes()).ok().unwrap();
            enc.encrypt_in_place_beside(&mut bytes(1, 10_000), lane.as_mut());
            drop(lane);
        }
        let blob = bytes(2, 700_000);
        let (_, digest, _) = through_pool(2, &blob, &[]);
        let mut enc = LayerEncryptor::new([2; 32], [3; 16]);
        enc.encrypt_in_place(&mut blob.clone());
        assert_eq!(digest, enc.finish().encrypted_digest.0);
    }
}
