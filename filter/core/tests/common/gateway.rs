//! The world a gateway stream runs in for the native flow tests (`gateway_*`): configuration,
//! a shared store with compare-and-set, a key service that records who asked, the worker's
//! manifest budget and seeded randomness; requests as clients send them; reading the answers.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use base64::Engine as _;
use ocicrypt_core::config::Config;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::upload::{self, ChunkStream, UploadRecord};
use ocicrypt_core::error::{Code, OciError};
use ocicrypt_core::format::ciphertext_hashes::{
    CiphertextHashes, CiphertextLane, HashHelpers, InlineLane,
};
use ocicrypt_core::format::recipients::Recipient;
use ocicrypt_core::gateway::{Command, Env, KeyAnswer, Keys, Level, Metric, RequestHead, Stream};
use ocicrypt_core::keys::records::StreamLookup;
use ocicrypt_core::store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The world a stream runs in: configuration, shared store, keys, budget, randomness.

/// Envoy's shared data: values with versions for compare-and-set.
#[derive(Default)]
pub struct MapStore(pub RefCell<HashMap<String, (Vec<u8>, u32)>>);

impl Store for MapStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.borrow().get(key).map(|(v, _)| v.clone())
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), OciError> {
        let mut map = self.0.borrow_mut();
        let version = map.get(key).map_or(0, |(_, n)| *n) + 1;
        map.insert(key.to_string(), (value.to_vec(), version));
        Ok(())
    }
    fn get_cas(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        Some(match self.0.borrow().get(key) {
            Some((v, n)) => (Some(v.clone()), *n),
            None => (None, 0),
        })
    }
    fn set_cas(&self, key: &str, value: &[u8], cas: u32) -> bool {
        let current = self.0.borrow().get(key).map(|(_, n)| *n);
        let ok = match current {
            None => cas == u32::MAX || cas == 0,
            Some(n) => n == cas,
        };
        ok && self.set(key, value).is_ok()
    }
}

/// What the key service says, and who asked.
pub struct FakeKeys {
    pub answer: Result<Option<Vec<Recipient>>, OciError>,
    pub asked: Vec<String>,
}

impl Keys for FakeKeys {
    fn recipients(
        &mut self,
        project: &str,
        _lookup: &mut StreamLookup,
    ) -> Result<KeyAnswer, OciError> {
        self.asked.push(project.to_string());
        match &self.answer {
            Ok(Some(r)) => Ok(KeyAnswer::Ready(r.clone())),
            Ok(None) => Ok(KeyAnswer::Waiting),
            Err(e) => Err(e.clone()),
        }
    }
    fn on_fetch_answer(
        &mut self,
        _lookup: &mut StreamLookup,
        _status: u16,
        _body: &[u8],
    ) -> Option<ocicrypt_core::keys::keyservice::Request> {
        None
    }
}

pub fn demo_recipients() -> Vec<Recipient> {
    vec![Recipient::from_jwk(&json!({"kty": "EC", "crv": "P-256",
        "x": "cNn3PUprqNVkWXO67K-VEds97YctUVW68272q8uwrb8",
        "y": "ErRF2_UsI7rMT9LISmairQSafCZGwwzsAQ-CtTK2M0k"}))
    .unwrap()]
}

/// The time every test runs at (unix seconds).
pub const NOW: u64 = 1_800_000_000;

pub const STATE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

pub struct World {
    pub config: Config,
    pub store: MapStore,
    pub keys: FakeKeys,
    pub held: Cell<usize>,
    pub rng: StdRng,
    /// The host's hashing helpers (the native build's threads), when the test lends some.
    pub hashing: Option<Box<dyn HashHelpers>>,
}

impl World {
    pub fn with(replicas: bool) -> Self {
        Self::with_limits(replicas, json!({}))
    }
    /// With `limits` set on top of the test configuration's.
    pub fn with_limits(replicas: bool, limits: serde_json::Value) -> Self {
        let mut cfg = json!({
            "registry": {"cluster": "registry", "timeout_ms": 30000},
            "policy": {"default": "passthrough", "rules": [
                {"repositories": "demo/**", "action": "encrypt"},
                {"repositories": "plain/**", "action": "passthrough"}]},
            "limits": {"max_manifest_bytes": 4096}
        });
        for (k, v) in limits.as_object().into_iter().flatten() {
            cfg["limits"][k] = v.clone();
        }
        if replicas {
            cfg["replicas"] = json!({"state_key": STATE_KEY});
        }
        World {
            config: Config::parse(&serde_json::to_vec(&cfg).unwrap()).unwrap(),
            store: MapStore::default(),
            keys: FakeKeys {
                answer: Ok(Some(demo_recipients())),
                asked: Vec::new(),
            },
            held: Cell::new(0),
            rng: StdRng::seed_from_u64(16),
            hashing: None,
        }
    }
    pub fn new() -> Self {
        Self::with(false)
    }
    pub fn env(&mut self) -> Env<'_> {
        Env {
            config: &self.config,
            store: &self.store,
            keys: &mut self.keys,
            held_manifest_bytes: &self.held,
            now: NOW,
            rng: &mut self.rng,
            keystream: None,
            hashing: match &mut self.hashing {
                Some(helpers) => Some(helpers.as_mut()),
                None => None,
            },
        }
    }
    pub fn headers(&mut self, stream: &mut Stream, req: &Req) -> Vec<Command> {
        stream.on_request_headers(req.head(), &mut self.env())
    }
    /// One request on a fresh stream.
    pub fn send(&mut self, req: &Req) -> (Stream, Vec<Command>) {
        let mut stream = Stream::new();
        let out = self.headers(&mut stream, req);
        (stream, out)
    }
}

/// A request as a client sends it.
pub struct Req {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Option<u64>,
}

pub fn req(method: &str, path: &str) -> Req {
    Req {
        headers: vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
            (":authority".into(), b"gateway:5000".to_vec()),
        ],
        body: None,
    }
}

impl Req {
    pub fn header(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.push((name.to_string(), value.to_vec()));
        self
    }
    /// A body of `len` bytes follows the headers (declared in Content-Length).
    pub fn body(mut self, len: u64) -> Self {
        self.body = Some(len);
        self.header("content-length", len.to_string().as_bytes())
    }
    /// A body of unknown length follows (HTTP/1.1 chunked, or HTTP/2 without Content-Length).
    pub fn chunked(mut self) -> Self {
        self.body = Some(u64::MAX);
        self
    }
    pub fn raw_path(mut self, path: &[u8]) -> Self {
        self.headers[1].1 = path.to_vec();
        self
    }
    pub fn head(&self) -> RequestHead {
        RequestHead {
            headers: self.headers.clone(),
            end_of_stream: self.body.is_none(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upload state as the registry and the gateway leave it.

pub const UUID: &str = "0b7e5a8c-1c2d-4e3f-9a8b-7c6d5e4f3a2b";

/// Distribution's `_state` for an upload of `repository` at `offset` (its HMAC is the
/// registry's to check; the gateway reads the JSON).
pub fn registry_state(repository: &str, offset: u64) -> String {
    let mut raw = vec![0u8; 32];
    raw.extend(
        serde_json::to_vec(&json!({"Name": repository, "UUID": UUID, "Offset": offset,
                                   "StartedAt": "2026-12-07T00:00:00Z"}))
        .unwrap(),
    );
    base64::engine::general_purpose::URL_SAFE.encode(raw)
}

pub fn upload_path(repository: &str, offset: u64, extra: &str) -> String {
    format!(
        "/v2/{repository}/blobs/uploads/{UUID}?_state={}{extra}",
        registry_state(repository, offset)
    )
}

/// Saves `record` as the session's, as the adapter does on the registry's `202`.
pub fn save_record(world: &World, record: &UploadRecord) {
    let idle = world.config.upload_idle_seconds;
    ocicrypt_core::distribution::upload_table::save_in(&world.store, UUID, record, NOW, idle)
        .unwrap();
}

/// The gateway's record after it encrypted `layer` in one PATCH, as the adapter saves it.
pub fn encrypted_record(world: &mut World, layer: &[u8]) -> UploadRecord {
    let mut stream = ChunkStream::new(UploadRecord::new("demo/app"), Some(0)).unwrap();
    let mut buf = layer.to_vec();
    stream.on_body(&mut buf, true, &mut world.rng).unwrap();
    stream.into_record().unwrap()
}

pub const LAYER: &[u8] = b"\x1f\x8b\x08\x00 a gzip-looking layer, encrypted by the gateway";

pub fn gz_digest() -> Digest {
    Digest::of(LAYER)
}

// ---------------------------------------------------------------------------------------------
// Reading the answers.

pub fn refusal(out: &[Command]) -> Option<&OciError> {
    out.iter().find_map(|c| match c {
        Command::Reply(e) => Some(e),
        _ => None,
    })
}

/// A refusal is a log line, the metric, the reply, and the stream stays paused.
pub fn assert_refused(out: &[Command], code: Code, needle: &str) {
    let err = refusal(out).unwrap_or_else(|| panic!("not refused: {out:?}"));
    assert_eq!(err.code, code, "{err}");
    assert!(
        err.message.contains(needle),
        "{:?} lacks {needle:?}",
        err.message
    );
    let n = out.len();
    assert!(matches!(&out[n - 4], Command::Log(Level::Warn, l) if l.starts_with("refused ")));
    assert_eq!(out[n - 3], Command::Metric(Metric::Refused(code)));
    assert_eq!(out[n - 1], Command::Pause);
}

pub fn set(name: &str, value: &str) -> Command {
    Command::SetRequestHeader(name.into(), value.into())
}

pub fn ledger_layer(world: &mut World, repository: &str, recipients: &[Recipient]) -> LedgerEntry {
    let record = encrypted_record(world, LAYER);
    let completion = upload::complete(record, gz_digest(), recipients, &mut world.rng).unwrap();
    let entry = completion.ledger.unwrap();
    let shape = world.config.ledger_cache();
    ocicrypt_core::distribution::ledger_cache::put_in(
        &world.store,
        shape,
        repository,
        &gz_digest(),
        &entry,
        NOW,
    )
    .unwrap();
    entry
}

/// What the gateway's ledger cache holds for `digest` in `repository`.
pub fn ledgered(world: &World, repository: &str, digest: &Digest) -> Option<LedgerEntry> {
    let shape = world.config.ledger_cache();
    ocicrypt_core::distribution::ledger_cache::get_in(&world.store, shape, repository, digest)
}

// ---------------------------------------------------------------------------------------------
// Hashing helpers as a host with threads lends them.

/// What the test's helpers do with the lanes they are asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Helping {
    /// Take every lane and hash as given.
    Whole,
    /// Take no lane (the stream hashes in line).
    Decline,
    /// Take the lane, then fail at its end (a helper thread that died).
    Die,
    /// Take the lane and lose the first byte given to it.
    LoseAByte,
}

/// Helpers that count the lanes they took.
pub struct TestHelpers {
    pub helping: Helping,
    pub lanes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TestHelpers {
    /// Helpers to lend a world, and the count of lanes they take.
    pub fn lent(
        helping: Helping,
    ) -> (
        Box<dyn HashHelpers>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let lanes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            Box::new(TestHelpers {
                helping,
                lanes: lanes.clone(),
            }),
            lanes,
        )
    }
}

struct TestLane {
    inner: InlineLane,
    helping: Helping,
    lost: bool,
}

impl CiphertextLane for TestLane {
    fn absorb(&mut self, ciphertext: &[u8]) {
        if self.helping == Helping::LoseAByte && !self.lost && !ciphertext.is_empty() {
            self.lost = true;
            self.inner.absorb(&ciphertext[1..]);
            return;
        }
        self.inner.absorb(ciphertext);
    }
    fn join(self: Box<Self>) -> Option<CiphertextHashes> {
        if self.helping == Helping::Die {
            return None;
        }
        Box::new(self.inner).join()
    }
}

impl HashHelpers for TestHelpers {
    fn lane(
        &mut self,
        hashes: CiphertextHashes,
    ) -> Result<Box<dyn CiphertextLane>, Box<CiphertextHashes>> {
        if self.helping == Helping::Decline {
            return Err(Box::new(hashes));
        }
        self.lanes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Box::new(TestLane {
            inner: InlineLane(hashes),
            helping: self.helping,
            lost: false,
        }))
    }
}
