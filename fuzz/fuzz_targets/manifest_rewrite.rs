//! `manifest::rewrite_with` on a fuzzed manifest body and Content-Type, with a ledger derived
//! from the input: each digest the body names is unknown, a blob the gateway encrypted (of the
//! declared size or not), a manifest it stored, or its own ciphertext, as the input says.
//!
//! Input: [flags][content-type][n][n entry kinds][body...]; flags bit 0 sets
//! `accept_encrypted`.
//!
//! Properties of a rewrite that succeeds:
//! - the output is a JSON object, with the Content-Type `stored_content_type` gives;
//! - every top-level field of the input is kept, in order, and equal, but for `mediaType`
//!   (Docker → OCI), `layers`/`manifests` (below), `config.mediaType` (Docker config → OCI)
//!   and `subject` (pointed at the stored manifest when the ledger knows it);
//! - every layer of an allowlisted plaintext type becomes the ledger entry's ciphertext
//!   (encrypted type, digest, size, the entry's `enc.*` annotations, the client's other
//!   annotations and fields, no `urls`/`data`); every other layer is kept as it was;
//! - no layer of the output is of a type a runtime would unpack as plaintext: each is an
//!   allowlisted `+encrypted` type or JSON data;
//! - every index child is pointed at the stored manifest (digest, size), other fields kept;
//! - rewriting the output again (with the ledger also answering for the ciphertexts, as the
//!   registry's ledger does) changes nothing: a re-push of a stored manifest passes as is.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::manifest::{
    referenced_digests, rewrite_with, stored_content_type, RewriteOptions,
};
use ocicrypt_core::spec::{self, LayerRule};
use serde_json::{Map, Value};

const CONTENT_TYPES: [&str; 10] = [
    spec::MEDIA_TYPE_OCI_MANIFEST,
    spec::MEDIA_TYPE_DOCKER_MANIFEST,
    spec::MEDIA_TYPE_OCI_INDEX,
    spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
    "Application/VND.Docker.Distribution.Manifest.V2+JSON",
    " application/vnd.oci.image.index.v1+json ",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
    "",
];

const JWE: &str = "eyJwcm90ZWN0ZWQiOiJlMzAiLCJjaXBoZXJ0ZXh0IjoiIn0";
const PUBOPTS: &str = "eyJjaXBoZXIiOiJBRVNfMjU2X0NUUl9ITUFDX1NIQTI1NiJ9";

/// Docker layer types and the OCI type the rewrite judges them as.
fn docker_to_oci(media_type: &str) -> Option<&'static str> {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar" => {
            Some("application/vnd.oci.image.layer.v1.tar")
        }
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            Some("application/vnd.oci.image.layer.v1.tar+gzip")
        }
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            Some("application/vnd.oci.image.layer.v1.tar+zstd")
        }
        _ => None,
    }
}

/// Declared size of each digest, from the first descriptor naming it.
fn declared_sizes(doc: &Value) -> HashMap<Digest, u64> {
    let mut out = HashMap::new();
    let mut take = |v: &Value| {
        if let (Some(d), Some(s)) = (
            v.get("digest")
                .and_then(Value::as_str)
                .and_then(|d| Digest::parse(d).ok()),
            v.get("size").and_then(Value::as_u64),
        ) {
            out.entry(d).or_insert(s);
        }
    };
    for key in ["config", "subject"] {
        if let Some(v) = doc.get(key) {
            take(v);
        }
    }
    for list in ["layers", "manifests"] {
        for v in doc
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            take(v);
        }
    }
    out
}

fn blob_entry(encrypted: Digest, size: u64, recipients: bool) -> LedgerEntry {
    LedgerEntry {
        encrypted_digest: encrypted,
        size,
        annotations: BTreeMap::from([
            (spec::ANNOTATION_KEYS_JWE.to_string(), JWE.to_string()),
            (spec::ANNOTATION_PUBOPTS.to_string(), PUBOPTS.to_string()),
        ]),
        media_type: None,
        recipients: recipients.then(|| "ab".repeat(32)),
    }
}

/// The ledger the input describes.
fn ledger(body: &[u8], kinds: &[u8]) -> HashMap<Digest, LedgerEntry> {
    let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let sizes = declared_sizes(&doc);
    let mut out = HashMap::new();
    if kinds.is_empty() {
        return out;
    }
    for (i, d) in referenced_digests(body).into_iter().enumerate() {
        let kind = kinds[i % kinds.len()];
        let size = sizes.get(&d).copied().unwrap_or(0);
        let mut salted = d.0.to_vec();
        salted.push(kind);
        let stored = Digest::of(&salted);
        let entry = match kind % 8 {
            0 | 7 => continue,
            1 => blob_entry(stored, size, false),
            2 => blob_entry(stored, size.wrapping_add(1), false),
            3 => LedgerEntry {
                encrypted_digest: stored,
                size: size ^ 0x55,
                annotations: BTreeMap::new(),
                media_type: Some(spec::MEDIA_TYPE_OCI_MANIFEST.to_string()),
                recipients: None,
            },
            4 => blob_entry(d, size, true),
            5 => blob_entry(stored, size, true),
            _ => LedgerEntry {
                encrypted_digest: stored,
                size: size.wrapping_add(100),
                annotations: BTreeMap::new(),
                media_type: Some(if kind & 8 == 0 {
                    spec::MEDIA_TYPE_DOCKER_MANIFEST.to_string()
                } else {
                    spec::MEDIA_TYPE_OCI_INDEX.to_string()
                }),
                recipients: None,
            },
        };
        out.insert(d, entry);
    }
    out
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn object(v: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    v.as_object().unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

/// The fields of `a` and `b` other than `except`, in order.
fn others<'a>(m: &'a Map<String, Value>, except: &[&str]) -> Vec<(&'a String, &'a Value)> {
    m.iter()
        .filter(|(k, _)| !except.contains(&k.as_str()))
        .collect()
}

fn check_layers(
    input: &Value,
    output: &Value,
    docker: bool,
    ledger: &HashMap<Digest, LedgerEntry>,
) {
    let (Some(a), Some(b)) = (
        input.get("layers").and_then(Value::as_array),
        output.get("layers").and_then(Value::as_array),
    ) else {
        panic!("property broken: an image manifest without layers was rewritten");
    };
    check!(a.len() == b.len(), "{} layers became {}", a.len(), b.len());
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let (ao, bo) = (object(a), object(b));
        let pushed = ao.get("mediaType").and_then(Value::as_str).unwrap_or("");
        let judged = if docker {
            docker_to_oci(pushed).unwrap_or(pushed)
        } else {
            pushed
        };
        let out_type = bo.get("mediaType").and_then(Value::as_str).unwrap_or("");
        check!(
            matches!(
                spec::layer_rule(out_type),
                LayerRule::Encrypted | LayerRule::Data
            ),
            "layers[{i}] stored as {out_type:?}, neither encrypted nor JSON data"
        );
        match spec::layer_rule(judged) {
            LayerRule::Plain { encrypted } => {
                let digest = ao
                    .get("digest")
                    .and_then(Value::as_str)
                    .and_then(|d| Digest::parse(d).ok());
                let entry = digest
                    .and_then(|d| ledger.get(&d))
                    .filter(|e| !e.is_manifest());
                let Some(entry) = entry else {
                    panic!("property broken: layers[{i}] encrypted without a ledger entry");
                };
                check!(
                    out_type == encrypted,
                    "layers[{i}] became {out_type:?}, not {encrypted:?}"
                );
                check!(
                    bo.get("digest").and_then(Value::as_str)
                        == Some(entry.encrypted_digest.to_string().as_str())
                        && bo.get("size").and_then(Value::as_u64) == Some(entry.size),
                    "layers[{i}] does not name the ciphertext"
                );
                check!(
                    !bo.contains_key("urls") && !bo.contains_key("data"),
                    "layers[{i}] kept urls or data"
                );
                check!(
                    others(
                        ao,
                        &["mediaType", "digest", "size", "annotations", "urls", "data"]
                    ) == others(bo, &["mediaType", "digest", "size", "annotations"]),
                    "layers[{i}] lost or changed other fields"
                );
                let mut expected: Map<String, Value> =
                    object(ao.get("annotations").unwrap_or(&Value::Null))
                        .iter()
                        .filter(|(k, _)| !k.starts_with(spec::ANNOTATION_ENC_PREFIX))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                for (k, v) in &entry.annotations {
                    expected.insert(k.clone(), Value::String(v.clone()));
                }
                check!(
                    bo.get("annotations") == Some(&Value::Object(expected)),
                    "layers[{i}] annotations are not the client's plus the entry's"
                );
            }
            _ => check!(a == b, "layers[{i}] of type {pushed:?} was changed"),
        }
    }
}

fn check_children(input: &Value, output: &Value, ledger: &HashMap<Digest, LedgerEntry>) {
    let (Some(a), Some(b)) = (
        input.get("manifests").and_then(Value::as_array),
        output.get("manifests").and_then(Value::as_array),
    ) else {
        panic!("property broken: an index without manifests was rewritten");
    };
    check!(
        a.len() == b.len(),
        "{} children became {}",
        a.len(),
        b.len()
    );
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let (ao, bo) = (object(a), object(b));
        let entry = ao
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| Digest::parse(d).ok())
            .and_then(|d| ledger.get(&d))
            .filter(|e| e.is_manifest());
        let Some(entry) = entry else {
            panic!("property broken: manifests[{i}] kept without a manifest entry");
        };
        check!(
            bo.get("digest").and_then(Value::as_str)
                == Some(entry.encrypted_digest.to_string().as_str())
                && bo.get("size").and_then(Value::as_u64) == Some(entry.size),
            "manifests[{i}] does not name the stored manifest"
        );
        let except = ["mediaType", "digest", "size", "annotations", "urls", "data"];
        check!(
            others(ao, &except) == others(bo, &except),
            "manifests[{i}] lost or changed other fields"
        );
    }
}

fn check_subject(input: &Value, output: &Value, ledger: &HashMap<Digest, LedgerEntry>) {
    let (a, b) = (input.get("subject"), output.get("subject"));
    let entry = a
        .and_then(|s| s.get("digest"))
        .and_then(Value::as_str)
        .and_then(|d| Digest::parse(d).ok())
        .and_then(|d| ledger.get(&d))
        .filter(|e| e.is_manifest());
    match entry {
        None => check!(a == b, "an unknown subject was changed"),
        Some(entry) => {
            let (ao, bo) = (
                object(a.unwrap_or(&Value::Null)),
                object(b.unwrap_or(&Value::Null)),
            );
            check!(
                bo.get("digest").and_then(Value::as_str)
                    == Some(entry.encrypted_digest.to_string().as_str()),
                "a known subject is not pointed at the stored manifest"
            );
            let except = ["mediaType", "digest", "size", "urls", "data"];
            check!(
                others(ao, &except) == others(bo, &except),
                "subject lost fields"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, ct, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 9).min(rest.len());
    let (kinds, body) = rest.split_at(n);
    let content_type = CONTENT_TYPES[usize::from(*ct) % CONTENT_TYPES.len()];
    let options = RewriteOptions {
        accept_encrypted: flags & 1 != 0,
    };
    let ledger = ledger(body, kinds);
    let lookup = |d: &Digest| ledger.get(d).cloned();
    let Ok(rewritten) = rewrite_with(body, content_type, &lookup, &options) else {
        return;
    };

    let input: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => panic!("property broken: a body that is not JSON was rewritten ({e})"),
    };
    let output: Value = match serde_json::from_slice(&rewritten.body) {
        Ok(v) => v,
        Err(e) => panic!("property broken: the rewritten manifest is not JSON ({e})"),
    };
    check!(
        output.is_object(),
        "the rewritten manifest is not an object"
    );
    check!(
        rewritten.media_type == stored_content_type(content_type),
        "forwarded Content-Type {:?} for {content_type:?}",
        rewritten.media_type
    );
    let essence = essence(content_type);
    let docker = essence == spec::MEDIA_TYPE_DOCKER_MANIFEST.to_ascii_lowercase()
        || essence == spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST.to_ascii_lowercase();
    let index = essence == spec::MEDIA_TYPE_OCI_INDEX
        || essence == spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST.to_ascii_lowercase();
    if rewritten.body == body {
        check!(!docker, "a Docker manifest stored unconverted");
    }

    // Top-level fields: kept, in order, equal, but for the ones the rewrite owns.
    let (a, b) = (object(&input), object(&output));
    let owned = ["mediaType", "layers", "manifests", "subject", "config"];
    check!(
        others(a, &owned) == others(b, &owned),
        "top-level fields other than the rewritten ones changed"
    );
    let order = |m: &Map<String, Value>| {
        m.keys()
            .filter(|k| *k != "mediaType")
            .cloned()
            .collect::<Vec<_>>()
    };
    check!(
        order(a) == order(b),
        "top-level fields reordered, lost or added"
    );
    let stored_type = if index {
        spec::MEDIA_TYPE_OCI_INDEX
    } else {
        spec::MEDIA_TYPE_OCI_MANIFEST
    };
    if docker {
        check!(
            b.get("mediaType").and_then(Value::as_str) == Some(stored_type),
            "a Docker manifest stored as {:?}",
            b.get("mediaType")
        );
    } else {
        check!(
            a.get("mediaType") == b.get("mediaType"),
            "mediaType changed"
        );
    }
    check_subject(&input, &output, &ledger);

    if index {
        check_children(&input, &output, &ledger);
        check!(
            a.get("config") == b.get("config") && a.get("layers") == b.get("layers"),
            "an index's config or layers changed"
        );
    } else {
        check_layers(&input, &output, docker, &ledger);
        check!(
            a.get("manifests") == b.get("manifests"),
            "an image manifest's manifests changed"
        );
        let (ac, bc) = (
            object(a.get("config").unwrap_or(&Value::Null)),
            object(b.get("config").unwrap_or(&Value::Null)),
        );
        check!(
            others(ac, &["mediaType"]) == others(bc, &["mediaType"]),
            "config fields other than mediaType changed"
        );
        let config_type = ac.get("mediaType").and_then(Value::as_str);
        if !(docker && config_type == Some(spec::MEDIA_TYPE_DOCKER_CONFIG)) {
            check!(
                ac.get("mediaType") == bc.get("mediaType"),
                "config mediaType changed"
            );
        } else {
            check!(
                bc.get("mediaType").and_then(Value::as_str) == Some(spec::MEDIA_TYPE_OCI_CONFIG),
                "a Docker config type not converted"
            );
        }
    }

    // A re-push of what was stored passes unchanged, with the ledger also answering for the
    // ciphertexts and stored manifests it names.
    let by_stored: HashMap<Digest, LedgerEntry> = ledger
        .values()
        .map(|e| (e.encrypted_digest, e.clone()))
        .collect();
    let lookup_again = |d: &Digest| by_stored.get(d).or_else(|| ledger.get(d)).cloned();
    let again = rewrite_with(&rewritten.body, stored_type, &lookup_again, &options);
    match again {
        Ok(again) => check!(
            again.body == rewritten.body
                && again.encrypted_layers == 0
                && again.rewritten_references == 0,
            "a re-push of the stored manifest was rewritten again ({} layers, {} references)",
            again.encrypted_layers,
            again.rewritten_references
        ),
        Err(e) => panic!("property broken: a re-push of the stored manifest was refused: {e}"),
    }
});
