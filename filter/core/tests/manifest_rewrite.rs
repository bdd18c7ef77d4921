//! Manifest rewrite tables: what an encrypted repository stores for each pushed manifest.
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
    stored_content_type, ManifestError, RewriteOptions, Rewritten,
};
use serde_json::{json, Value};

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_TAR_ENC: &str = "application/vnd.oci.image.layer.v1.tar+encrypted";
const DOCKER_FOREIGN_TGZ: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
const NONDIST_TGZ: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
const NONDIST_TGZ_ENC: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted";

/// Plaintext digest number `n`.
fn plain(n: u8) -> Digest {
    Digest::of(&[n])
}

/// Ciphertext digest of plaintext number `n`.
fn cipher(n: u8) -> Digest {
    Digest::of(&[n, 0xee])
}

/// What the ledger holds for plaintext number `n` of `size` bytes.
fn entry(n: u8, size: u64) -> LedgerEntry {
    LedgerEntry {
        encrypted_digest: cipher(n),
        size,
        annotations: BTreeMap::from([
            (JWE.to_string(), format!("jwe-{n}")),
            (PUBOPTS.to_string(), format!("pubopts-{n}")),
        ]),
        media_type: None,
        recipients: None,
    }
}

fn desc(media_type: &str, n: u8, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": plain(n).to_string(), "size": size})
}

fn enc_desc(media_type: &str, n: u8, size: u64) -> Value {
    json!({
        "mediaType": media_type,
        "digest": cipher(n).to_string(),
        "size": size,
        "annotations": {JWE: format!("jwe-{n}"), PUBOPTS: format!("pubopts-{n}")}
    })
}

type Ledger = Vec<(u8, u64)>;

fn run(manifest: &Value, content_type: &str, ledger: &Ledger) -> Result<Rewritten, ManifestError> {
    let body = serde_json::to_vec_pretty(manifest).unwrap();
    run_bytes(&body, content_type, ledger)
}

fn run_bytes(body: &[u8], content_type: &str, ledger: &Ledger) -> Result<Rewritten, ManifestError> {
    let map = ledger
        .iter()
        .map(|&(n, size)| (plain(n), entry(n, size)))
        .collect();
    rewrite_with(body, content_type, map)
}

struct Good {
    name: &'static str,
    content_type: &'static str,
    ledger: Ledger,
    input: Value,
    want: Value,
    want_media_type: &'static str,
    want_encrypted: usize,
}

fn good_cases() -> Vec<Good> {
    vec![
        Good {
            name: "OCI manifest with gzip and tar layers",
            content_type: OCI_MANIFEST,
            ledger: vec![(1, 100), (2, 200)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [desc(OCI_TGZ, 1, 100), desc(OCI_TAR, 2, 200)]
            }),
            want: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [enc_desc(OCI_TGZ_ENC, 1, 100), enc_desc(OCI_TAR_ENC, 2, 200)]
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 2,
        },
        Good {
            name: "Docker v2s2 with config and two layers becomes OCI",
            content_type: DOCKER_MANIFEST,
            ledger: vec![(1, 100), (2, 200)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": desc(DOCKER_CONFIG, 9, 50),
                "layers": [desc(DOCKER_TGZ, 1, 100), desc(DOCKER_TGZ, 2, 200)]
            }),
            want: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [enc_desc(OCI_TGZ_ENC, 1, 100), enc_desc(OCI_TGZ_ENC, 2, 200)]
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 2,
        },
        Good {
            name: "Docker v2s2 without mediaType gets it after schemaVersion",
            content_type: DOCKER_MANIFEST,
            ledger: vec![(1, 100)],
            input: json!({
                "schemaVersion": 2,
                "config": desc(DOCKER_CONFIG, 9, 50),
                "layers": [desc(DOCKER_TGZ, 1, 100)]
            }),
            want: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [enc_desc(OCI_TGZ_ENC, 1, 100)]
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 1,
        },
        Good {
            name: "JSON and in-toto layers not in the ledger are left alone",
            content_type: OCI_MANIFEST,
            ledger: vec![(1, 100)],
            input: json!({
                "schemaVersion": 2,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [
                    desc(OCI_TGZ, 1, 100),
                    desc("application/vnd.cyclonedx+json", 3, 30),
                    desc("application/vnd.in-toto+json", 4, 40)
                ]
            }),
            want: json!({
                "schemaVersion": 2,
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [
                    enc_desc(OCI_TGZ_ENC, 1, 100),
                    desc("application/vnd.cyclonedx+json", 3, 30),
                    desc("application/vnd.in-toto+json", 4, 40)
                ]
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 1,
        },
        Good {
            name: "other annotations kept, stale enc.* dropped, other fields and order kept",
            content_type: OCI_MANIFEST,
            ledger: vec![(1, 100)],
            input: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.thing",
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [{
                    "mediaType": OCI_TGZ,
                    "digest": plain(1).to_string(),
                    "size": 100,
                    "annotations": {
                        "org.opencontainers.image.title": "rootfs.tar.gz",
                        "org.opencontainers.image.enc.keys.pgp": "stale",
                        PUBOPTS: "stale",
                        "z.custom": "kept"
                    },
                    "platform": {"os": "linux", "architecture": "amd64"},
                    "x-layer-extra": 1
                }],
                "subject": desc(OCI_MANIFEST, 8, 800),
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
                "x-unknown": {"nested": [1, 2, 3]}
            }),
            want: json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.example.thing",
                "config": desc(OCI_CONFIG, 9, 50),
                "layers": [{
                    "mediaType": OCI_TGZ_ENC,
                    "digest": cipher(1).to_string(),
                    "size": 100,
                    "annotations": {
                        "org.opencontainers.image.title": "rootfs.tar.gz",
                        "z.custom": "kept",
                        JWE: "jwe-1",
                        PUBOPTS: "pubopts-1"
                    },
                    "platform": {"os": "linux", "architecture": "amd64"},
                    "x-layer-extra": 1
                }],
                "subject": desc(OCI_MANIFEST, 8, 800),
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
                "x-unknown": {"nested": [1, 2, 3]}
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 1,
        },
        Good {
            name: "OCI artifact with no image layers and nothing in the ledger",
            content_type: OCI_MANIFEST,
            ledger: vec![],
            input: json!({
                "schemaVersion": 2,
                "artifactType": "application/spdx+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
                "layers": [desc("application/spdx+json", 3, 30)]
            }),
            want: json!({
                "schemaVersion": 2,
                "artifactType": "application/spdx+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                           "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2},
                "layers": [desc("application/spdx+json", 3, 30)]
            }),
            want_media_type: OCI_MANIFEST,
            want_encrypted: 0,
        },
    ]
}

#[test]
fn rewrites_table() {
    for case in good_cases() {
        let out = run(&case.input, case.content_type, &case.ledger)
            .unwrap_or_else(|e| panic!("{}: refused: {e}", case.name));
        assert_eq!(out.media_type, case.want_media_type, "{}", case.name);
        assert_eq!(
            out.media_type,
            stored_content_type(case.content_type),
            "{}",
            case.name
        );
        assert_eq!(out.encrypted_layers, case.want_encrypted, "{}", case.name);
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(got, case.want, "{}", case.name);
        if case.want_encrypted > 0 || case.content_type == DOCKER_MANIFEST {
            // Compact output with the input's field order (json! keeps insertion order).
            assert_eq!(
                out.body,
                serde_json::to_vec(&case.want).unwrap(),
                "{}: field order / compactness",
                case.name
            );
        } else {
            // Nothing to change: the pushed bytes are stored as they are (same digest).
            assert_eq!(
                out.body,
                serde_json::to_vec_pretty(&case.input).unwrap(),
                "{}",
                case.name
            );
        }
    }
}

/// A manifest skopeo 1.9 wrote with `skopeo copy --encryption-key` to an RSA and an EC
/// recipient (containers/ocicrypt's own output: general JWE serialization with two recipients).
const SKOPEO_ENCRYPTED: &[u8] = include_bytes!("fixtures/skopeo-encrypted-manifest.json");

#[test]
fn unchanged_manifest_keeps_its_bytes_and_digest() {
    // Where the repository accepts images encrypted by the pipeline, skopeo's manifest is
    // stored byte for byte: nothing to do.
    let body = SKOPEO_ENCRYPTED;
    let accept = RewriteOptions {
        accept_encrypted: true,
    };
    let out = rewrite_opts(body, OCI_MANIFEST, BTreeMap::new(), &accept).unwrap();
    assert_eq!(out.body, body.to_vec());
    assert_eq!(Digest::of(&out.body), Digest::of(body));
    assert_eq!(out.encrypted_layers, 0);
    assert_eq!(out.media_type, OCI_MANIFEST);
    // Elsewhere (the default) it is refused: the gateway did not encrypt these layers.
    let err = run_bytes(body, OCI_MANIFEST, &vec![]).unwrap_err();
    assert!(
        matches!(err, ManifestError::EncryptedNotAccepted { layer: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn output_digest_is_digest_of_compact_body() {
    let input = json!({"schemaVersion": 2, "config": desc(OCI_CONFIG, 9, 50), "layers": [desc(OCI_TGZ, 1, 100)]});
    let out = run(&input, OCI_MANIFEST, &vec![(1, 100)]).unwrap();
    assert!(!out.body.contains(&b'\n'));
    let reparsed: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(
        serde_json::to_vec(&reparsed).unwrap(),
        out.body,
        "output is canonical compact JSON"
    );
}

#[test]
fn content_type_parameters_are_tolerated() {
    let input = json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                       "config": desc(DOCKER_CONFIG, 9, 50), "layers": [desc(DOCKER_TGZ, 1, 100)]});
    let ct = "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8";
    let out = run(&input, ct, &vec![(1, 100)]).unwrap();
    assert_eq!(out.media_type, OCI_MANIFEST);
    assert_eq!(out.media_type, stored_content_type(ct));
}

#[test]
fn stored_content_type_table() {
    for (request, stored) in [
        (DOCKER_MANIFEST, OCI_MANIFEST),
        (DOCKER_LIST, OCI_INDEX),
        (OCI_MANIFEST, OCI_MANIFEST),
        (OCI_INDEX, OCI_INDEX),
        (
            "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8",
            OCI_MANIFEST,
        ),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ),
        ("application/json", "application/json"),
        ("", ""),
    ] {
        assert_eq!(stored_content_type(request), stored, "{request:?}");
    }
}

struct Bad {
    name: &'static str,
    content_type: &'static str,
    ledger: Ledger,
    body: Vec<u8>,
    check: Check,
    /// Fragments the message must hold (what went wrong and what to do).
    says: &'static [&'static str],
}

fn bad(
    name: &'static str,
    content_type: &'static str,
    ledger: Ledger,
    input: Value,
    check: Check,
    says: &'static [&'static str],
) -> Bad {
    Bad {
        name,
        content_type,
        ledger,
        body: serde_json::to_vec(&input).unwrap(),
        check,
        says,
    }
}

fn image(layers: Value) -> Value {
    json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(OCI_CONFIG, 9, 50), "layers": layers})
}

fn bad_cases() -> Vec<Bad> {
    let one = || image(json!([desc(OCI_TGZ, 1, 100)]));
    vec![
        bad(
            "encrypted blob under a media type nothing decrypts",
            OCI_MANIFEST,
            vec![(1, 100), (3, 30)],
            image(json!([
                desc(OCI_TGZ, 1, 100),
                desc("application/vnd.cncf.helm.chart.content.v1.tar+gzip", 3, 30)
            ])),
            |e| {
                matches!(e, ManifestError::EncryptedWithoutDecryptor { layer: 1, digest, media_type }
                if *digest == plain(3) && media_type == "application/vnd.cncf.helm.chart.content.v1.tar+gzip")
            },
            &[
                "was encrypted",
                "has no decryptor",
                "push this artifact to an unencrypted repository",
            ],
        ),
        bad(
            "+encrypted of an unknown type",
            OCI_MANIFEST,
            vec![],
            image(json!([desc(
                "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted",
                1,
                100
            )])),
            |e| matches!(e, ManifestError::UnknownEncryptedType { layer: 0, .. }),
            &["no runtime decrypts", "unencrypted repository"],
        ),
        bad(
            "image layer missing from the ledger",
            OCI_MANIFEST,
            vec![(1, 100)],
            image(json!([desc(OCI_TGZ, 1, 100), desc(OCI_TGZ, 2, 200)])),
            |e| matches!(e, ManifestError::NotUploadedThroughGateway { layer: 1, digest, .. } if *digest == plain(2)),
            &[
                "not uploaded through the encrypting gateway",
                "push the image again through the gateway",
            ],
        ),
        bad(
            "Docker layer missing from the ledger",
            DOCKER_MANIFEST,
            vec![],
            json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": desc(DOCKER_CONFIG, 9, 50),
                   "layers": [desc(DOCKER_TGZ, 1, 100)]}),
            |e| matches!(e, ManifestError::NotUploadedThroughGateway { layer: 0, media_type, .. } if media_type == DOCKER_TGZ),
            &["not uploaded through"],
        ),
        bad(
            "non-distributable layer without urls missing from the ledger",
            OCI_MANIFEST,
            vec![],
            image(json!([desc(NONDIST_TGZ, 1, 100)])),
            |e| matches!(e, ManifestError::NonDistributable { layer: 0, .. }),
            &[
                "non-distributable",
                "push the image with this layer as an ordinary distributable layer",
            ],
        ),
        // Non-distributable layers used to be encrypted when their bytes came through the
        // gateway, and kept as they were (urls and all) when not: the gateway never receives
        // such a layer's bytes in the normal flow, so an encrypted repository refuses them.
        bad(
            "non-distributable layer uploaded through the gateway",
            OCI_MANIFEST,
            vec![(1, 100)],
            image(json!([
                {"mediaType": NONDIST_TGZ, "digest": plain(1).to_string(), "size": 100,
                 "urls": ["https://example.com/l.tgz"], "data": "cGxhaW4="}
            ])),
            |e| matches!(e, ManifestError::NonDistributable { layer: 0, media_type, .. } if media_type == NONDIST_TGZ),
            &["non-distributable", "cannot be encrypted"],
        ),
        bad(
            "encrypted non-distributable layer",
            OCI_MANIFEST,
            vec![],
            image(json!([enc_desc(NONDIST_TGZ_ENC, 5, 500)])),
            |e| matches!(e, ManifestError::NonDistributable { layer: 0, .. }),
            &["non-distributable"],
        ),
        bad(
            "Docker foreign layer with urls",
            DOCKER_MANIFEST,
            vec![(1, 100)],
            json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": desc(DOCKER_CONFIG, 9, 50),
                "layers": [
                    desc(DOCKER_TGZ, 1, 100),
                    {"mediaType": DOCKER_FOREIGN_TGZ, "size": 5000, "digest": plain(7).to_string(),
                     "urls": ["https://mcr.example/base.tar.gz"]}
                ]
            }),
            |e| matches!(e, ManifestError::NonDistributable { layer: 1, media_type, .. } if media_type == DOCKER_FOREIGN_TGZ),
            &["non-distributable", DOCKER_FOREIGN_TGZ],
        ),
        bad(
            "already encrypted layer, repository without accept_encrypted",
            OCI_MANIFEST,
            vec![(1, 100)],
            image(json!([
                enc_desc(OCI_TGZ_ENC, 5, 500),
                desc(OCI_TGZ, 1, 100)
            ])),
            |e| matches!(e, ManifestError::EncryptedNotAccepted { layer: 0, media_type, .. } if media_type == OCI_TGZ_ENC),
            &[
                "already encrypted",
                "push the plaintext image",
                "accept_encrypted",
            ],
        ),
        bad(
            "image layer with a sha512 digest",
            OCI_MANIFEST,
            vec![],
            image(
                json!([{"mediaType": OCI_TGZ, "digest": format!("sha512:{}", "ab".repeat(64)), "size": 1}]),
            ),
            |e| matches!(e, ManifestError::UnsupportedDigest { layer: 0, .. }),
            &["only sha256 layers are encrypted"],
        ),
        bad(
            "config blob in the ledger",
            OCI_MANIFEST,
            vec![(1, 100), (9, 50)],
            one(),
            |e| matches!(e, ManifestError::ConfigEncrypted { digest, .. } if *digest == plain(9)),
            &["config must stay plaintext", "unencrypted repository"],
        ),
        bad(
            "already encrypted layer whose blob the gateway encrypted again",
            OCI_MANIFEST,
            vec![(5, 500)],
            image(json!([desc(OCI_TGZ_ENC, 5, 500)])),
            |e| matches!(e, ManifestError::ReEncrypted { layer: 0, digest, .. } if *digest == plain(5)),
            &["already encrypted", "push the plaintext image"],
        ),
        bad(
            "declared size differs from the uploaded blob",
            OCI_MANIFEST,
            vec![(1, 101)],
            one(),
            |e| {
                matches!(
                    e,
                    ManifestError::SizeMismatch {
                        layer: 0,
                        declared: 100,
                        uploaded: 101,
                        ..
                    }
                )
            },
            &["declares size 100", "101 bytes"],
        ),
        Bad {
            name: "invalid JSON",
            content_type: OCI_MANIFEST,
            ledger: vec![],
            body: b"{\"schemaVersion\": 2,".to_vec(),
            check: |e| matches!(e, ManifestError::InvalidJson { .. }),
            says: &["not valid JSON"],
        },
        Bad {
            name: "empty body",
            content_type: OCI_MANIFEST,
            ledger: vec![],
            body: vec![],
            check: |e| matches!(e, ManifestError::InvalidJson { .. }),
            says: &["not valid JSON"],
        },
        bad(
            "JSON that is not an object",
            OCI_MANIFEST,
            vec![],
            json!([1, 2]),
            |e| matches!(e, ManifestError::Malformed { .. }),
            &["not a JSON object"],
        ),
        bad(
            "Docker schema 1",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            vec![],
            json!({"schemaVersion": 1, "name": "demo/app", "fsLayers": []}),
            |e| matches!(e, ManifestError::Schema1 { .. }),
            &["schema 1"],
        ),
        bad(
            "unknown Content-Type",
            "application/vnd.oci.artifact.manifest.v1+json",
            vec![],
            json!({"mediaType": "application/vnd.oci.artifact.manifest.v1+json"}),
            |e| matches!(e, ManifestError::UnsupportedMediaType { content_type } if content_type.contains("artifact")),
            &["not an image manifest the gateway can encrypt"],
        ),
        bad(
            "missing Content-Type",
            "",
            vec![],
            one(),
            |e| matches!(e, ManifestError::UnsupportedMediaType { .. }),
            &["Content-Type"],
        ),
        bad(
            "schemaVersion 1 under an OCI Content-Type",
            OCI_MANIFEST,
            vec![],
            json!({"schemaVersion": 1, "config": desc(OCI_CONFIG, 9, 50), "layers": []}),
            |e| matches!(e, ManifestError::SchemaVersion { found } if found == "1"),
            &["schemaVersion is 1, expected 2"],
        ),
        bad(
            "schemaVersion missing",
            OCI_MANIFEST,
            vec![],
            json!({"config": desc(OCI_CONFIG, 9, 50), "layers": []}),
            |e| matches!(e, ManifestError::SchemaVersion { found } if found == "missing"),
            &["expected 2"],
        ),
        bad(
            "body mediaType says index, Content-Type says manifest",
            OCI_MANIFEST,
            vec![],
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "config": desc(OCI_CONFIG, 9, 50), "layers": []}),
            |e| matches!(e, ManifestError::MediaTypeMismatch { media_type, .. } if media_type == OCI_INDEX),
            &["does not match", "Content-Type"],
        ),
        bad(
            "body mediaType says Docker, Content-Type says OCI",
            OCI_MANIFEST,
            vec![(1, 100)],
            json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": desc(DOCKER_CONFIG, 9, 50),
                   "layers": [desc(DOCKER_TGZ, 1, 100)]}),
            |e| matches!(e, ManifestError::MediaTypeMismatch { .. }),
            &["does not match"],
        ),
        bad(
            "body mediaType says OCI, Content-Type says Docker",
            DOCKER_MANIFEST,
            vec![(1, 100)],
            one(),
            |e| matches!(e, ManifestError::MediaTypeMismatch { .. }),
            &["does not match"],
        ),
        bad(
            "config missing",
            OCI_MANIFEST,
            vec![],
            json!({"schemaVersion": 2, "layers": []}),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "config"),
            &["config"],
        ),
        bad(
            "layers missing",
            OCI_MANIFEST,
            vec![],
            json!({"schemaVersion": 2, "config": desc(OCI_CONFIG, 9, 50)}),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "layers"),
            &["layers"],
        ),
        bad(
            "layer size is negative",
            OCI_MANIFEST,
            vec![],
            image(json!([{"mediaType": OCI_TGZ, "digest": plain(1).to_string(), "size": -1}])),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "layers[0].size"),
            &["non-negative integer"],
        ),
        bad(
            "layer digest missing",
            OCI_MANIFEST,
            vec![],
            image(json!([{"mediaType": OCI_TGZ, "size": 1}])),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "layers[0].digest"),
            &["is missing"],
        ),
        bad(
            "layer annotations not an object",
            OCI_MANIFEST,
            vec![(1, 100)],
            image(
                json!([{"mediaType": OCI_TGZ, "digest": plain(1).to_string(), "size": 100, "annotations": []}]),
            ),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "layers[0].annotations"),
            &["not a JSON object"],
        ),
        bad(
            "a second layers field spelled in another case (Go decoders would read it)",
            OCI_MANIFEST,
            vec![(1, 100)],
            json!({"schemaVersion": 2, "config": desc(OCI_CONFIG, 9, 50),
                   "layers": [desc(OCI_TGZ, 1, 100)], "Layers": [desc(OCI_TGZ, 2, 200)]}),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field == "\"Layers\""),
            &["only in letter case"],
        ),
        bad(
            "a descriptor field spelled with U+017F, which Go folds to 's'",
            OCI_MANIFEST,
            vec![(1, 100)],
            image(
                json!([{"mediaType": OCI_TGZ, "digest": plain(1).to_string(), "size": 100, "\u{17F}ize": 5}]),
            ),
            |e| matches!(e, ManifestError::Malformed { field, .. } if field.starts_with("layers[0].")),
            &["only in letter case"],
        ),
    ]
}

#[test]
fn refusals_table() {
    for case in bad_cases() {
        let result = run_bytes(&case.body, case.content_type, &case.ledger);
        let oci = assert_refused(case.name, result, case.check, case.says);
        let body: Value = serde_json::from_slice(&oci.body()).unwrap();
        assert_eq!(body["errors"][0]["code"], "MANIFEST_INVALID");
    }
}

#[test]
fn refusal_messages_name_the_digest() {
    let input = image(json!([desc(OCI_TGZ, 2, 200)]));
    let err = run(&input, OCI_MANIFEST, &vec![]).unwrap_err();
    assert!(err.to_string().contains(&plain(2).to_string()), "{err}");
    let input = image(json!([desc("application/vnd.example.blob", 3, 30)]));
    let err = run(&input, OCI_MANIFEST, &vec![(3, 30)]).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&plain(3).to_string()) && message.contains("application/vnd.example.blob"),
        "{message}"
    );
}

#[test]
fn manifests_with_too_many_json_values_are_refused_before_parsing() {
    use ocicrypt_core::distribution::manifest::{
        check_value_count, ManifestError, MAX_JSON_VALUES,
    };
    // 4 MiB of `{}` objects: what grew a worker VM by ≈ 150 MiB for good when parsed.
    let objects = "{},".repeat(MAX_JSON_VALUES);
    let body = format!("{{\"schemaVersion\":2,\"x\":[{objects}{{}}]}}");
    assert!(matches!(
        check_value_count(body.as_bytes(), MAX_JSON_VALUES),
        Err(ManifestError::TooManyValues { .. })
    ));
    let err = ocicrypt_core::distribution::manifest::rewrite(
        body.as_bytes(),
        ocicrypt_core::spec::MEDIA_TYPE_OCI_MANIFEST,
        &|_| None,
    )
    .unwrap_err();
    assert!(matches!(err, ManifestError::TooManyValues { .. }), "{err}");
    // Separators inside strings do not count; a real manifest is far below the limit.
    let strings = format!("{{\"a\":\"{}\"}}", ",:{[".repeat(MAX_JSON_VALUES));
    assert!(check_value_count(strings.as_bytes(), 4).is_ok());
    let escaped = r#"{"a":"\",:{[\\","b":1}"#;
    assert!(check_value_count(escaped.as_bytes(), 4).is_ok());
    assert!(check_value_count(escaped.as_bytes(), 3).is_err());
}
