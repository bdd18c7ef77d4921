//! What the fuzz targets share: a deterministic RNG, fixed keys, small reference models of the
//! Go behaviour the core mirrors, and the committed TUF fixtures.
//!
//! A fuzz target panics (and so reports a crash) on any broken property: the `check!` macro
//! says which property and with what values.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// Asserts a property of a fuzz target; the message names it.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            panic!("property broken: {}", format!($($msg)+));
        }
    };
}

/// The replicas' state key the targets seal and authenticate with (never a real one).
pub const STATE_KEY: [u8; 32] = [0x5a; 32];

/// A deterministic "CSPRNG" for the targets: the same seed always gives the same bytes, so a
/// crash reproduces. Not random at all; only the core's types require `CryptoRng`.
#[derive(Clone)]
pub struct TestRng(u64);

impl TestRng {
    /// A generator whose output depends only on `seed`.
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
}

impl rand_core::RngCore for TestRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for TestRng {}

/// Go's `url.QueryUnescape` (`%XX` of either case, `+` as a space), written from Go's
/// documentation: `None` where Go returns an error.
pub fn go_query_unescape(s: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hi = hex(*s.get(i + 1)?)?;
                let lo = hex(*s.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Go's `url.ParseQuery` (Go 1.17+): pairs split at `&`, a pair holding `;` dropped (and an
/// error noted), empty pairs skipped, key and value unescaped (a pair that fails either is
/// dropped), values of a key kept in order. Returns the values and whether Go reported an
/// error.
pub fn go_parse_query(raw: &[u8]) -> (BTreeMap<Vec<u8>, Vec<Vec<u8>>>, bool) {
    let mut values: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    let mut error = false;
    for piece in raw.split(|&b| b == b'&') {
        if piece.contains(&b';') {
            error = true;
            continue;
        }
        if piece.is_empty() {
            continue;
        }
        let (key, value) = match piece.iter().position(|&b| b == b'=') {
            Some(i) => (&piece[..i], &piece[i + 1..]),
            None => (piece, &b""[..]),
        };
        let (Some(key), Some(value)) = (go_query_unescape(key), go_query_unescape(value)) else {
            error = true;
            continue;
        };
        values.entry(key).or_default().push(value);
    }
    (values, error)
}

/// Go's `strconv.ParseInt(s, 10, 64)`: an optional sign, then one or more ASCII digits, within
/// `i64`.
pub fn go_parse_int(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: i128 = 0;
    for b in digits.bytes() {
        v = v * 10 + i128::from(b - b'0');
        if v > i128::from(i64::MAX) + 1 {
            return None;
        }
    }
    let v = if negative { -v } else { v };
    i64::try_from(v).ok()
}

/// Distribution's reading of a `Content-Range` request header (`parseContentRange`): exactly
/// two parts around `-`, each a Go `ParseInt`.
pub fn go_parse_content_range(value: &str) -> Option<(i64, i64)> {
    let parts: Vec<&str> = value.split('-').collect();
    let [start, end] = parts.as_slice() else {
        return None;
    };
    Some((go_parse_int(start)?, go_parse_int(end)?))
}

/// Every file of the committed python-tuf fixtures (`filter/core/tests/fixtures/tuf`), by path
/// relative to that folder (`good/metadata/1.root.json`, `variants/freeze/metadata/…`).
pub fn tuf_fixtures() -> &'static BTreeMap<String, Vec<u8>> {
    static FILES: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../filter/core/tests/fixtures/tuf");
        let mut out = BTreeMap::new();
        let mut stack = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let (Ok(rel), Ok(bytes)) =
                    (path.strip_prefix(&base), std::fs::read(&path))
                {
                    out.insert(rel.to_string_lossy().replace('\\', "/"), bytes);
                }
            }
        }
        assert!(
            out.contains_key("good/metadata/1.root.json"),
            "the TUF fixtures are missing under {}",
            base.display()
        );
        out
    })
}

/// The time the TUF fixtures are made for (2030-01-01T00:00:00Z, their manifest's `test_now`).
pub const TUF_NOW: i64 = 1_893_456_000;

/// The canonical JSON of the `signed` part of every fixture metadata file: what the fixture
/// keys really signed. Metadata a TUF client accepts must be one of these, whatever bytes it
/// was fed (the fuzzer cannot forge a signature).
pub fn tuf_signed_payloads() -> &'static std::collections::BTreeSet<Vec<u8>> {
    static SIGNED: OnceLock<std::collections::BTreeSet<Vec<u8>>> = OnceLock::new();
    SIGNED.get_or_init(|| {
        tuf_fixtures()
            .iter()
            .filter(|(path, _)| path.contains("/metadata/"))
            .filter_map(|(_, bytes)| {
                let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                ocicrypt_core::tuf::canonical::to_canonical(value.get("signed")?).ok()
            })
            .collect()
    })
}

/// Canonical JSON of the `signed` object of a metadata file, if it has one.
pub fn signed_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    ocicrypt_core::tuf::canonical::to_canonical(value.get("signed")?).ok()
}

/// Lossy text of fuzz bytes (the core's parsers take `&str` where the host already decoded).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Signed payloads that only the fixtures' attack variants carry, signed by a key that is not
/// trusted for them (the `BadSignature` variants): a client must never accept one.
pub fn tuf_forbidden_payloads() -> &'static std::collections::BTreeSet<Vec<u8>> {
    static FORBIDDEN: OnceLock<std::collections::BTreeSet<Vec<u8>>> = OnceLock::new();
    FORBIDDEN.get_or_init(|| {
        const BAD: [&str; 5] = [
            "variants/substituted-key/metadata/3.targets.json",
            "variants/substituted-key-tribe/metadata/2.tribe-a.json",
            "variants/root-unsigned-by-old-keys/metadata/3.root.json",
            "variants/wrong-signature/metadata/timestamp.json",
            "variants/too-few-signatures/metadata/3.snapshot.json",
        ];
        let files = tuf_fixtures();
        let elsewhere: std::collections::BTreeSet<Vec<u8>> = files
            .iter()
            .filter(|(path, _)| path.contains("/metadata/") && !BAD.contains(&path.as_str()))
            .filter_map(|(_, bytes)| signed_payload(bytes))
            .collect();
        BAD.iter()
            .filter_map(|path| files.get(*path).and_then(|b| signed_payload(b)))
            .filter(|p| !elsewhere.contains(p))
            .collect()
    })
}

/// Whether metadata a TUF client accepted is legitimate: its signed payload is one the
/// fixtures' keys signed, and not one only an attack variant carries.
pub fn tuf_acceptable(bytes: &[u8]) -> bool {
    signed_payload(bytes).is_some_and(|p| {
        tuf_signed_payloads().contains(&p) && !tuf_forbidden_payloads().contains(&p)
    })
}

/// The fixtures' metadata and target files, in a fixed order (the fuzz input picks by index).
pub fn tuf_file_list() -> &'static Vec<(&'static str, &'static [u8])> {
    static LIST: OnceLock<Vec<(&'static str, &'static [u8])>> = OnceLock::new();
    LIST.get_or_init(|| {
        tuf_fixtures()
            .iter()
            .filter(|(path, _)| path.as_str() != "manifest.json")
            .map(|(path, bytes)| (path.as_str(), bytes.as_slice()))
            .collect()
    })
}
