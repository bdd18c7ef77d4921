//! Index rewrite tables: OCI image indexes and Docker manifest lists in an encrypted
//! repository, whose children (pushed by digest before the index) were rewritten and ledgered.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod manifest;
}

use std::collections::BTreeMap;

use common::manifest::*;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::manifest::{
    rewrite, stored_content_type, verify_pushed_digest, ManifestError, Rewritten,
};
use ocicrypt_core::error::Code;
use serde_json::{json, Value};

const IN_TOTO: &str = "application/vnd.in-toto+json";
const REF_TYPE: &str = "vnd.docker.reference.type";
const REF_DIGEST: &str = "vnd.docker.reference.digest";

/// What the ledger holds for manifest number `n`, stored as `media_type` of `size` bytes.
fn stored_entry(n: u8, size: u64, media_type: &str) -> (Digest, LedgerEntry) {
    (
        pushed(n),
        LedgerEntry {
            encrypted_digest: stored(n),
            size,
            annotations: BTreeMap::new(),
            media_type: Some(media_type.to_string()),
            recipients: None,
        },
    )
}

/// A manifest the gateway did not need to change (stored under the digest it was pushed as).
fn unchanged_entry(n: u8, size: u64, media_type: &str) -> (Digest, LedgerEntry) {
    (
        pushed(n),
        LedgerEntry {
            encrypted_digest: pushed(n),
            size,
            annotations: BTreeMap::new(),
            media_type: Some(media_type.to_string()),
            recipients: None,
        },
    )
}

fn child(media_type: &str, digest: Digest, size: u64, platform: Value) -> Value {
    let mut v = json!({"mediaType": media_type, "digest": digest.to_string(), "size": size});
    if !platform.is_null() {
        v["platform"] = platform;
    }
    v
}

fn linux(arch: &str) -> Value {
    json!({"architecture": arch, "os": "linux"})
}

fn arm64() -> Value {
    json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
}

type Ledger = Vec<(Digest, LedgerEntry)>;

fn run(input: &Value, content_type: &str, ledger: &Ledger) -> Result<Rewritten, ManifestError> {
    rewrite_with(
        &serde_json::to_vec_pretty(input).unwrap(),
        content_type,
        ledger.iter().cloned().collect(),
    )
}

struct Good {
    name: &'static str,
    content_type: &'static str,
    ledger: Ledger,
    input: Value,
    /// `None`: the pushed bytes are stored unchanged.
    want: Option<Value>,
    want_references: usize,
}

fn good_cases() -> Vec<Good> {
    vec![
        Good {
            name: "OCI index with two children",
            content_type: OCI_INDEX,
            ledger: vec![
                stored_entry(1, 1001, OCI_MANIFEST),
                stored_entry(2, 1002, OCI_MANIFEST),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, pushed(1), 501, linux("amd64")),
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": pushed(2).to_string(),
                        "size": 502,
                        "platform": arm64(),
                        "annotations": {"org.opencontainers.image.ref.name": "arm"},
                        "urls": ["https://example.com/plain-manifest"],
                        "data": "e30=",
                        "x-extra": true
                    }
                ],
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, stored(1), 1001, linux("amd64")),
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": stored(2).to_string(),
                        "size": 1002,
                        "platform": arm64(),
                        "annotations": {"org.opencontainers.image.ref.name": "arm"},
                        "x-extra": true
                    }
                ],
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
            })),
            want_references: 2,
        },
        Good {
            name: "Docker manifest list with two children becomes an OCI index",
            content_type: DOCKER_LIST,
            ledger: vec![
                stored_entry(1, 1001, OCI_MANIFEST),
                stored_entry(2, 1002, OCI_MANIFEST),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_LIST,
                "manifests": [
                    child(DOCKER_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(DOCKER_MANIFEST, pushed(2), 502,
                          json!({"architecture": "arm", "os": "linux", "variant": "v7", "features": ["sse4"]}))
                ]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, stored(1), 1001, linux("amd64")),
                    child(OCI_MANIFEST, stored(2), 1002,
                          json!({"architecture": "arm", "os": "linux", "variant": "v7", "features": ["sse4"]}))
                ]
            })),
            want_references: 2,
        },
        Good {
            name: "Docker manifest list without mediaType gets the OCI index type",
            content_type: DOCKER_LIST,
            ledger: vec![stored_entry(1, 1001, OCI_MANIFEST)],
            input: json!({
                "schemaVersion": 2,
                "manifests": [child(DOCKER_MANIFEST, pushed(1), 501, linux("amd64"))]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [child(OCI_MANIFEST, stored(1), 1001, linux("amd64"))]
            })),
            want_references: 1,
        },
        Good {
            name: "a ledger entry that names a Docker type is stored as its OCI equivalent",
            content_type: OCI_INDEX,
            ledger: vec![
                stored_entry(1, 1001, DOCKER_MANIFEST),
                stored_entry(2, 1002, DOCKER_LIST),
            ],
            input: json!({
                "schemaVersion": 2,
                "manifests": [
                    child(DOCKER_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(DOCKER_LIST, pushed(2), 502, Value::Null)
                ]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "manifests": [
                    child(OCI_MANIFEST, stored(1), 1001, linux("amd64")),
                    child(OCI_INDEX, stored(2), 1002, Value::Null)
                ]
            })),
            want_references: 2,
        },
        Good {
            name: "nested index: an index child is pointed at the stored index",
            content_type: OCI_INDEX,
            ledger: vec![
                stored_entry(1, 1001, OCI_MANIFEST),
                stored_entry(5, 1005, OCI_INDEX),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(OCI_INDEX, pushed(5), 505, Value::Null)
                ]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, stored(1), 1001, linux("amd64")),
                    child(OCI_INDEX, stored(5), 1005, Value::Null)
                ]
            })),
            want_references: 2,
        },
        Good {
            name: "nested Docker list child (stored as an OCI index) inside a Docker list",
            content_type: DOCKER_LIST,
            ledger: vec![stored_entry(5, 1005, OCI_INDEX)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_LIST,
                "manifests": [child(DOCKER_LIST, pushed(5), 505, Value::Null)]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [child(OCI_INDEX, stored(5), 1005, Value::Null)]
            })),
            want_references: 1,
        },
        Good {
            name: "BuildKit index with attestation manifests",
            content_type: OCI_INDEX,
            ledger: vec![
                stored_entry(1, 1001, OCI_MANIFEST),
                stored_entry(2, 1002, OCI_MANIFEST),
                // Attestation manifests hold in-toto JSON only: stored as pushed.
                unchanged_entry(3, 803, OCI_MANIFEST),
                unchanged_entry(4, 804, OCI_MANIFEST),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(OCI_MANIFEST, pushed(2), 502, arm64()),
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": pushed(3).to_string(),
                        "size": 803,
                        "annotations": {REF_DIGEST: pushed(1).to_string(), REF_TYPE: "attestation-manifest"},
                        "platform": {"architecture": "unknown", "os": "unknown"}
                    },
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": pushed(4).to_string(),
                        "size": 804,
                        "annotations": {REF_DIGEST: pushed(2).to_string(), REF_TYPE: "attestation-manifest"},
                        "platform": {"architecture": "unknown", "os": "unknown"}
                    }
                ]
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, stored(1), 1001, linux("amd64")),
                    child(OCI_MANIFEST, stored(2), 1002, arm64()),
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": pushed(3).to_string(),
                        "size": 803,
                        "annotations": {REF_DIGEST: stored(1).to_string(), REF_TYPE: "attestation-manifest"},
                        "platform": {"architecture": "unknown", "os": "unknown"}
                    },
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": pushed(4).to_string(),
                        "size": 804,
                        "annotations": {REF_DIGEST: stored(2).to_string(), REF_TYPE: "attestation-manifest"},
                        "platform": {"architecture": "unknown", "os": "unknown"}
                    }
                ]
            })),
            want_references: 4,
        },
        Good {
            name: "subject the ledger knows is pointed at the stored manifest",
            content_type: OCI_INDEX,
            ledger: vec![
                unchanged_entry(3, 803, OCI_MANIFEST),
                stored_entry(8, 1008, OCI_INDEX),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "artifactType": "application/vnd.example.sbom-bundle",
                "manifests": [child(OCI_MANIFEST, pushed(3), 803, Value::Null)],
                "subject": {"mediaType": DOCKER_LIST, "digest": pushed(8).to_string(), "size": 508,
                            "annotations": {"k": "v"}}
            }),
            want: Some(json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "artifactType": "application/vnd.example.sbom-bundle",
                "manifests": [child(OCI_MANIFEST, pushed(3), 803, Value::Null)],
                "subject": {"mediaType": OCI_INDEX, "digest": stored(8).to_string(), "size": 1008,
                            "annotations": {"k": "v"}}
            })),
            want_references: 1,
        },
        Good {
            name: "subject the ledger does not know is kept (bytes unchanged)",
            content_type: OCI_INDEX,
            ledger: vec![unchanged_entry(3, 803, OCI_MANIFEST)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [child(OCI_MANIFEST, pushed(3), 803, Value::Null)],
                "subject": child(OCI_MANIFEST, pushed(9), 509, Value::Null)
            }),
            want: None,
            want_references: 0,
        },
        Good {
            name: "subject known only as a blob is kept",
            content_type: OCI_INDEX,
            ledger: vec![
                unchanged_entry(3, 803, OCI_MANIFEST),
                (
                    pushed(9),
                    LedgerEntry {
                        encrypted_digest: stored(9),
                        size: 509,
                        annotations: BTreeMap::new(),
                        media_type: None,
                        recipients: None,
                    },
                ),
            ],
            input: json!({
                "schemaVersion": 2,
                "manifests": [child(OCI_MANIFEST, pushed(3), 803, Value::Null)],
                "subject": child(OCI_MANIFEST, pushed(9), 509, Value::Null)
            }),
            want: None,
            want_references: 0,
        },
        Good {
            name:
                "already encrypted multi-platform image: children stored as pushed, bytes unchanged",
            content_type: OCI_INDEX,
            ledger: vec![
                unchanged_entry(1, 501, OCI_MANIFEST),
                unchanged_entry(2, 502, OCI_MANIFEST),
            ],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(OCI_MANIFEST, pushed(2), 502, arm64())
                ]
            }),
            want: None,
            want_references: 0,
        },
        Good {
            name: "empty OCI index",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
            want: None,
            want_references: 0,
        },
    ]
}

#[test]
fn rewrites_table() {
    for case in good_cases() {
        let out = run(&case.input, case.content_type, &case.ledger)
            .unwrap_or_else(|e| panic!("{}: refused: {e}", case.name));
        assert_eq!(out.media_type, OCI_INDEX, "{}", case.name);
        assert_eq!(
            out.media_type,
            stored_content_type(case.content_type),
            "{}",
            case.name
        );
        assert_eq!(out.descriptor_media_type(), OCI_INDEX, "{}", case.name);
        assert_eq!(out.encrypted_layers, 0, "{}", case.name);
        assert_eq!(
            out.rewritten_references, case.want_references,
            "{}",
            case.name
        );
        match &case.want {
            Some(want) => {
                let got: Value = serde_json::from_slice(&out.body).unwrap();
                assert_eq!(&got, want, "{}", case.name);
                // Compact, in the pushed field order.
                assert_eq!(
                    out.body,
                    serde_json::to_vec(want).unwrap(),
                    "{}: order",
                    case.name
                );
            }
            None => assert_eq!(
                out.body,
                serde_json::to_vec_pretty(&case.input).unwrap(),
                "{}: bytes kept",
                case.name
            ),
        }
        assert_eq!(out.digest(), Digest::of(&out.body), "{}", case.name);
    }
}

struct Bad {
    name: &'static str,
    content_type: &'static str,
    ledger: Ledger,
    input: Value,
    check: Check,
    says: Vec<String>,
}

fn says(fragments: &[&str]) -> Vec<String> {
    fragments.iter().map(|s| s.to_string()).collect()
}

fn bad_cases() -> Vec<Bad> {
    vec![
        Bad {
            name: "child missing from the ledger",
            content_type: OCI_INDEX,
            ledger: vec![stored_entry(1, 1001, OCI_MANIFEST)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    child(OCI_MANIFEST, pushed(1), 501, linux("amd64")),
                    child(OCI_MANIFEST, pushed(2), 502, arm64())
                ]
            }),
            check: |e| {
                matches!(e, ManifestError::UnknownChild { child: 1, digest, platform }
                    if *digest == pushed(2).to_string() && platform == "linux/arm64/v8")
            },
            says: says(&[
                &format!("manifests[1] {}", pushed(2)),
                "platform linux/arm64/v8",
                "was not pushed through the encrypting gateway into this repository",
                "push every child manifest through the gateway into this repository first",
            ]),
        },
        Bad {
            name: "Docker list child missing, no platform",
            content_type: DOCKER_LIST,
            ledger: vec![],
            input: json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_LIST,
                "manifests": [child(DOCKER_MANIFEST, pushed(1), 501, Value::Null)]
            }),
            check: |e| matches!(e, ManifestError::UnknownChild { child: 0, platform, .. } if platform == "none"),
            says: says(&[&pushed(1).to_string(), "platform none"]),
        },
        Bad {
            name: "child known only as an encrypted blob",
            content_type: OCI_INDEX,
            ledger: vec![(
                pushed(1),
                LedgerEntry {
                    encrypted_digest: stored(1),
                    size: 501,
                    annotations: BTreeMap::new(),
                    media_type: None,
                    recipients: None,
                },
            )],
            input: json!({
                "schemaVersion": 2,
                "manifests": [child(OCI_MANIFEST, pushed(1), 501, linux("amd64"))]
            }),
            check: |e| matches!(e, ManifestError::UnknownChild { child: 0, .. }),
            says: says(&["linux/amd64"]),
        },
        Bad {
            name: "child with a sha512 digest",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": format!("sha512:{}", "ab".repeat(64)), "size": 1}]
            }),
            check: |e| matches!(e, ManifestError::UnknownChild { digest, .. } if digest.starts_with("sha512:")),
            says: says(&["sha512:abab"]),
        },
        Bad {
            name: "manifests missing",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "mediaType": OCI_INDEX}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "manifests"),
            says: says(&["is missing"]),
        },
        Bad {
            name: "manifests not an array",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "manifests": {}}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "manifests"),
            says: says(&["not an array"]),
        },
        Bad {
            name: "child size missing",
            content_type: OCI_INDEX,
            ledger: vec![stored_entry(1, 1001, OCI_MANIFEST)],
            input: json!({"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": pushed(1).to_string()}]}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "manifests[0].size"),
            says: says(&["is missing"]),
        },
        Bad {
            name: "a second manifests field spelled in another case",
            content_type: OCI_INDEX,
            ledger: vec![stored_entry(1, 1001, OCI_MANIFEST)],
            input: json!({"schemaVersion": 2,
                          "manifests": [child(OCI_MANIFEST, pushed(1), 501, Value::Null)],
                          "Manifests": [child(OCI_MANIFEST, pushed(2), 502, Value::Null)]}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "\"Manifests\""),
            says: says(&["only in letter case"]),
        },
        Bad {
            name: "a child digest field spelled in another case",
            content_type: OCI_INDEX,
            ledger: vec![stored_entry(1, 1001, OCI_MANIFEST)],
            input: json!({"schemaVersion": 2, "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": pushed(1).to_string(), "size": 501, "Digest": pushed(2).to_string()}
            ]}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field.starts_with("manifests[0].")),
            says: says(&["only in letter case"]),
        },
        Bad {
            name: "body says Docker list, Content-Type says OCI index",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}),
            check: |e| matches!(e, ManifestError::MediaTypeMismatch { media_type, .. } if media_type == DOCKER_LIST),
            says: says(&["does not match"]),
        },
        Bad {
            name: "body says index, Content-Type says Docker list",
            content_type: DOCKER_LIST,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
            check: |e| matches!(e, ManifestError::MediaTypeMismatch { .. }),
            says: says(&["does not match"]),
        },
        Bad {
            name: "index schemaVersion 1",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 1, "manifests": []}),
            check: |e| matches!(e, ManifestError::SchemaVersion { .. }),
            says: says(&["expected 2"]),
        },
        Bad {
            name: "subject not an object",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "manifests": [], "subject": "sha256:00"}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "subject"),
            says: says(&["not a JSON object"]),
        },
        Bad {
            name: "subject digest spelled twice",
            content_type: OCI_INDEX,
            ledger: vec![stored_entry(8, 1008, OCI_MANIFEST)],
            input: json!({"schemaVersion": 2, "manifests": [],
                          "subject": {"mediaType": OCI_MANIFEST, "digest": pushed(8).to_string(), "size": 508,
                                      "DIGEST": pushed(9).to_string()}}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field.starts_with("subject.")),
            says: says(&["only in letter case"]),
        },
        Bad {
            name: "subject without digest",
            content_type: OCI_INDEX,
            ledger: vec![],
            input: json!({"schemaVersion": 2, "manifests": [], "subject": {"mediaType": OCI_MANIFEST, "size": 1}}),
            check: |e| matches!(e, ManifestError::Malformed { field, .. } if field == "subject.digest"),
            says: says(&["is missing"]),
        },
    ]
}

#[test]
fn refusals_table() {
    for case in bad_cases() {
        let result = run(&case.input, case.content_type, &case.ledger);
        assert_refused(case.name, result, case.check, &case.says);
    }
}

/// The whole sans-I/O flow the adapter runs: children pushed by digest are rewritten, checked
/// against the digest they were pushed under and ledgered with [`LedgerEntry::for_manifest`];
/// then the Docker manifest list naming them is rewritten to an OCI index naming what the
/// registry stores, and an outer index naming that list in turn.
#[test]
fn children_then_index_flow() {
    let layer = |n: u8| Digest::of(&[n, 0x33]);
    let layer_cipher = |n: u8| Digest::of(&[n, 0x44]);
    let mut ledger: BTreeMap<Digest, LedgerEntry> = [1u8, 2]
        .into_iter()
        .map(|n| {
            (
                layer(n),
                LedgerEntry {
                    encrypted_digest: layer_cipher(n),
                    size: 100 + u64::from(n),
                    annotations: BTreeMap::from([(
                        "org.opencontainers.image.enc.pubopts".to_string(),
                        format!("p{n}"),
                    )]),
                    media_type: None,
                    recipients: None,
                },
            )
        })
        .collect();

    let push = |ledger: &mut BTreeMap<Digest, LedgerEntry>, body: &[u8], content_type: &str| {
        let pushed = Digest::of(body);
        let lookup = |d: &Digest| ledger.get(d).cloned();
        let out = rewrite(body, content_type, &lookup).unwrap();
        verify_pushed_digest(body, &pushed).unwrap();
        ledger.insert(pushed, LedgerEntry::for_manifest(&out));
        (pushed, out)
    };

    let mut children = Vec::new();
    for (n, arch) in [(1u8, "amd64"), (2, "arm64")] {
        let body = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": Digest::of(&[n, 0x55]).to_string(), "size": 7},
            "layers": [{"mediaType": DOCKER_TGZ, "digest": layer(n).to_string(), "size": 100 + u64::from(n)}]
        }))
        .unwrap();
        let (pushed, out) = push(&mut ledger, &body, DOCKER_MANIFEST);
        assert_eq!(out.encrypted_layers, 1);
        assert_ne!(out.digest(), pushed);
        children.push((pushed, body.len(), arch, out));
    }

    let list = json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": children.iter().map(|(pushed, len, arch, _)| json!({
            "mediaType": DOCKER_MANIFEST, "digest": pushed.to_string(), "size": len,
            "platform": {"architecture": arch, "os": "linux"}
        })).collect::<Vec<_>>()
    });
    let list_body = serde_json::to_vec_pretty(&list).unwrap();
    let (list_pushed, list_out) = push(&mut ledger, &list_body, DOCKER_LIST);
    assert_eq!(list_out.media_type, OCI_INDEX);
    assert_eq!(list_out.rewritten_references, 2);
    let index: Value = serde_json::from_slice(&list_out.body).unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    for (i, (_, _, arch, out)) in children.iter().enumerate() {
        let got = &index["manifests"][i];
        assert_eq!(got["digest"], out.digest().to_string());
        assert_eq!(got["size"], out.body.len() as u64);
        assert_eq!(got["mediaType"], OCI_MANIFEST);
        assert_eq!(got["platform"]["architecture"], *arch);
        // The stored child really is an OCI manifest with encrypted layers.
        let stored: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(stored["mediaType"], OCI_MANIFEST);
        assert_eq!(
            stored["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        );
    }

    // An outer index naming the list (nested), and a referrer naming the list as subject.
    let outer = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": DOCKER_LIST, "digest": list_pushed.to_string(), "size": list_body.len()}]
    });
    let lookup = |d: &Digest| ledger.get(d).cloned();
    let outer_out = run_with(&outer, OCI_INDEX, &lookup);
    let got: Value = serde_json::from_slice(&outer_out.body).unwrap();
    assert_eq!(got["manifests"][0]["digest"], list_out.digest().to_string());
    assert_eq!(got["manifests"][0]["mediaType"], OCI_INDEX);
    assert_eq!(got["manifests"][0]["size"], list_out.body.len() as u64);

    let sbom = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                   "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": Digest::of(b"sbom").to_string(), "size": 4}],
        "subject": {"mediaType": DOCKER_LIST, "digest": list_pushed.to_string(), "size": list_body.len()}
    });
    let sbom_out = run_with(&sbom, OCI_MANIFEST, &lookup);
    assert_eq!(sbom_out.rewritten_references, 1);
    let got: Value = serde_json::from_slice(&sbom_out.body).unwrap();
    assert_eq!(
        got["subject"],
        json!({"mediaType": OCI_INDEX, "digest": list_out.digest().to_string(), "size": list_out.body.len()})
    );
    assert_eq!(got["layers"], sbom["layers"]);
}

fn run_with(
    input: &Value,
    content_type: &str,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
) -> Rewritten {
    rewrite(&serde_json::to_vec(input).unwrap(), content_type, lookup).unwrap()
}

#[test]
fn pushed_digest_must_match_the_body() {
    let body = br#"{"schemaVersion":2,"manifests":[]}"#;
    assert_eq!(verify_pushed_digest(body, &Digest::of(body)), Ok(()));
    let other = Digest::of(b"other");
    let err = verify_pushed_digest(body, &other).unwrap_err();
    assert_eq!(
        err,
        ManifestError::DigestMismatch {
            pushed: other,
            actual: Digest::of(body)
        }
    );
    let oci = err.to_oci();
    assert_eq!(oci.code, Code::DigestInvalid);
    assert_eq!(oci.status(), 400);
    assert!(oci.message.contains(&other.to_string()), "{}", oci.message);
    assert!(
        oci.message.contains(&Digest::of(body).to_string()),
        "{}",
        oci.message
    );
}

#[test]
fn a_layer_named_by_a_manifest_digest_is_not_an_encrypted_blob() {
    // A JSON layer whose digest the ledger knows as a manifest (not a blob the gateway
    // encrypted) stays as it is, and so does a config with such a digest.
    let ledger = vec![
        stored_entry(1, 1001, OCI_MANIFEST),
        stored_entry(2, 1002, OCI_MANIFEST),
    ];
    let input = json!({
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": pushed(2).to_string(), "size": 502},
        "layers": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": pushed(1).to_string(), "size": 501},
                   {"mediaType": OCI_TGZ, "digest": pushed(1).to_string(), "size": 501, "urls": []}]
    });
    // The image layer named by a manifest digest is not uploaded through the gateway.
    let err = run(&input, OCI_MANIFEST, &ledger).unwrap_err();
    assert!(
        matches!(
            err,
            ManifestError::NotUploadedThroughGateway { layer: 1, .. }
        ),
        "{err:?}"
    );
    let input = json!({
        "schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": pushed(2).to_string(), "size": 502},
        "layers": [{"mediaType": IN_TOTO, "digest": pushed(1).to_string(), "size": 501}]
    });
    let out = run(&input, OCI_MANIFEST, &ledger).unwrap();
    assert_eq!(out.body, serde_json::to_vec_pretty(&input).unwrap());
}
