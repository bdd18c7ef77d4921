//! The layer media-type allowlist of encrypted repositories (issue 11, finding 4): which layer
//! descriptors a manifest may carry, the opt-in for images encrypted by the pipeline and the
//! shape their ocicrypt annotations must have, re-pushes of what the gateway stored, and client
//! manifests that pose as the gateway's ledger records.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "crypto_fixtures.rs"]
mod fixtures;
mod common {
    pub mod manifest;
}

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::manifest::*;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::{self, LedgerEntry, LEDGER_ARTIFACT_TYPE};
use ocicrypt_core::distribution::manifest::{ManifestError, RewriteOptions, Rewritten};
use ocicrypt_core::format::blockcipher::LayerEncryptor;
use ocicrypt_core::format::keywrap::layer_annotations;
use ocicrypt_core::format::recipients::Recipient;
use ocicrypt_core::spec::{self, LayerRule};
use serde_json::{json, Value};

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_TZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const OCI_TAR_ENC: &str = "application/vnd.oci.image.layer.v1.tar+encrypted";
const OCI_TZST_ENC: &str = "application/vnd.oci.image.layer.v1.tar+zstd+encrypted";
const DOCKER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_TZST: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

const ACCEPT: RewriteOptions = RewriteOptions {
    accept_encrypted: true,
};
const STRICT: RewriteOptions = RewriteOptions {
    accept_encrypted: false,
};

/// Plaintext digest number `n`.
fn plain(n: u8) -> Digest {
    Digest::of(&[n, 0x0a])
}

/// Ciphertext digest of plaintext number `n`.
fn cipher(n: u8) -> Digest {
    Digest::of(&[n, 0x0c])
}

fn entry(n: u8, size: u64, annotations: BTreeMap<String, String>) -> LedgerEntry {
    LedgerEntry {
        encrypted_digest: cipher(n),
        size,
        annotations,
        media_type: None,
        recipients: Some("fp".to_string()),
    }
}

fn fake_annotations(n: u8) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JWE.to_string(), format!("jwe-{n}")),
        (PUBOPTS.to_string(), format!("pubopts-{n}")),
    ])
}

/// A ledger knowing plaintexts `ns` (size 100 each, placeholder annotations).
fn ledger_of(ns: &[u8]) -> BTreeMap<Digest, LedgerEntry> {
    ns.iter()
        .map(|&n| (plain(n), entry(n, 100, fake_annotations(n))))
        .collect()
}

fn image(content_type: &str, layers: Value) -> Value {
    let config = if content_type == DOCKER_MANIFEST {
        DOCKER_CONFIG
    } else {
        OCI_CONFIG
    };
    json!({
        "schemaVersion": 2,
        "mediaType": content_type,
        "config": {"mediaType": config, "digest": Digest::of(b"config").to_string(), "size": 50},
        "layers": layers
    })
}

fn layer(media_type: &str, digest: Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
}

fn run(
    manifest: &Value,
    content_type: &str,
    ledger: BTreeMap<Digest, LedgerEntry>,
    options: &RewriteOptions,
) -> Result<Rewritten, ManifestError> {
    rewrite_opts(
        &serde_json::to_vec(manifest).unwrap(),
        content_type,
        ledger,
        options,
    )
}

/// Real ocicrypt annotations made by the gateway's own key wrapping, for `recipients`.
fn real_annotations(recipients: &[Recipient]) -> BTreeMap<String, String> {
    let mut enc = LayerEncryptor::generate(&mut rand_core::OsRng);
    let mut data = vec![7u8; 300];
    enc.encrypt_in_place(&mut data);
    layer_annotations(&enc.finish(), recipients, &mut rand_core::OsRng).unwrap()
}

fn p256() -> Recipient {
    Recipient::from_pem(fixtures::P256_PUBLIC_PKIX).unwrap()
}

fn rsa2048() -> Recipient {
    Recipient::from_pem(fixtures::RSA2048_PUBLIC_PKIX).unwrap()
}

fn encrypted_layer(media_type: &str, n: u8, annotations: &BTreeMap<String, String>) -> Value {
    json!({
        "mediaType": media_type,
        "digest": Digest::of(&[n, 0xcc]).to_string(),
        "size": 300,
        "annotations": annotations
    })
}

#[test]
fn layer_rule_table() {
    let table: &[(&str, LayerRule)] = &[
        (
            OCI_TAR,
            LayerRule::Plain {
                encrypted: OCI_TAR_ENC,
            },
        ),
        (
            OCI_TGZ,
            LayerRule::Plain {
                encrypted: OCI_TGZ_ENC,
            },
        ),
        (
            OCI_TZST,
            LayerRule::Plain {
                encrypted: OCI_TZST_ENC,
            },
        ),
        (
            DOCKER_TGZ,
            LayerRule::Plain {
                encrypted: OCI_TGZ_ENC,
            },
        ),
        (
            DOCKER_TAR,
            LayerRule::Plain {
                encrypted: OCI_TAR_ENC,
            },
        ),
        (
            DOCKER_TZST,
            LayerRule::Plain {
                encrypted: OCI_TZST_ENC,
            },
        ),
        (OCI_TAR_ENC, LayerRule::Encrypted),
        (OCI_TGZ_ENC, LayerRule::Encrypted),
        (OCI_TZST_ENC, LayerRule::Encrypted),
        ("application/json", LayerRule::Data),
        ("application/vnd.oci.empty.v1+json", LayerRule::Data),
        ("application/vnd.in-toto+json", LayerRule::Data),
        (
            "application/vnd.dev.cosign.simplesigning.v1+json",
            LayerRule::Data,
        ),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            LayerRule::NonDistributable,
        ),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            LayerRule::NonDistributable,
        ),
        ("application/octet-stream", LayerRule::Refused),
        (
            "Application/vnd.oci.image.layer.v1.tar+gzip",
            LayerRule::Refused,
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip ",
            LayerRule::Refused,
        ),
        ("application/JSON", LayerRule::Refused),
        ("application/json ", LayerRule::Refused),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted",
            LayerRule::Refused,
        ),
        ("", LayerRule::Refused),
    ];
    for &(media_type, want) in table {
        assert_eq!(spec::layer_rule(media_type), want, "{media_type:?}");
    }
    for t in spec::PLAIN_LAYER_TYPES {
        assert!(
            matches!(spec::layer_rule(t), LayerRule::Plain { .. }),
            "{t}"
        );
    }
    for t in spec::ENCRYPTED_LAYER_TYPES {
        assert_eq!(spec::layer_rule(t), LayerRule::Encrypted, "{t}");
    }
}

/// Variants that passed unchanged before the allowlist (finding 4: containerd unpacked such
/// layers in plaintext), refused as not allowed.
const NOT_ALLOWED: &[&str] = &[
    "Application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.TAR+GZIP",
    "application/vnd.oci.image.layer.v1.tar+GZIP",
    "application/vnd.oci.image.layer.v1.tar+gzip ",
    " application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip\t",
    "application/vnd.oci.image.layer.v1.tar\n",
    "application/vnd.oci.image.layer.v1.tar+gzip; charset=binary",
    "application/vnd.oci.image.layer.v1.tar+bzip2",
    "application/vnd.docker.image.rootfs.diff.tar.gzip ",
    "application/vnd.docker.image.rootfs.diff.TAR.GZIP",
    "application/octet-stream",
    "application/x-tar",
    "application/gzip",
    "application/tar+gzip",
    "text/plain",
    "",
    "application/JSON",
    "application/json ",
    "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
    ledger::LEDGER_LAYER_TYPE,
    // Variants of the encrypted types are no `+encrypted` type at all.
    "application/vnd.oci.image.layer.v1.tar+gzip+encrypted ",
    "application/vnd.oci.image.layer.v1.tar+gzip+ENCRYPTED",
];

/// `+encrypted` types no runtime decrypts.
const UNKNOWN_ENCRYPTED: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted",
    "application/vnd.oci.image.layer.v1.tar+bzip2+encrypted",
    "application/octet-stream+encrypted",
];

/// Non-distributable and foreign layers.
const NON_DISTRIBUTABLE: &[&str] = &[
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Every refused variant with the error it gets when the gateway did not encrypt its blob, and
/// the error when it did.
fn refused_variants() -> Vec<(&'static str, Check, Check)> {
    let not_allowed: Check = |e| matches!(e, ManifestError::LayerTypeNotAllowed { .. });
    let no_decryptor: Check = |e| matches!(e, ManifestError::EncryptedWithoutDecryptor { .. });
    let unknown_enc: Check = |e| matches!(e, ManifestError::UnknownEncryptedType { .. });
    let nondist: Check = |e| matches!(e, ManifestError::NonDistributable { .. });
    let table = |types: &[&'static str], unknown: Check, known: Check| {
        types
            .iter()
            .map(move |&t| (t, unknown, known))
            .collect::<Vec<_>>()
    };
    [
        table(NOT_ALLOWED, not_allowed, no_decryptor),
        table(UNKNOWN_ENCRYPTED, unknown_enc, no_decryptor),
        table(NON_DISTRIBUTABLE, nondist, nondist),
    ]
    .concat()
}

#[test]
fn variants_of_layer_types_are_refused() {
    for (media_type, unknown_check, known_check) in refused_variants() {
        for content_type in [OCI_MANIFEST, DOCKER_MANIFEST] {
            for options in [STRICT, ACCEPT] {
                let name = format!("{media_type:?} in {content_type} ({options:?})");
                // The blob did not come through the gateway (or passed it as data) …
                let input = image(
                    content_type,
                    json!([
                        layer(OCI_TGZ, plain(1), 100),
                        layer(media_type, plain(2), 100)
                    ]),
                );
                let result = run(&input, content_type, ledger_of(&[1]), &options);
                let quoted = format!("{media_type:?}");
                let says = [
                    plain(2).to_string(),
                    quoted.clone(),
                    "layers[1]".to_string(),
                ];
                let oci = assert_refused(&name, result, unknown_check, &says);
                assert!(
                    oci.message.contains("push") || oci.message.contains("fix"),
                    "{name}: the message says what to do: {}",
                    oci.message
                );
                // … or the gateway encrypted it at upload: refused either way.
                let result = run(&input, content_type, ledger_of(&[1, 2]), &options);
                assert_refused(&name, result, known_check, &[plain(2).to_string()]);
            }
        }
    }
}

#[test]
fn allowlisted_plain_types_are_encrypted() {
    for (content_type, media_type, want) in [
        (OCI_MANIFEST, OCI_TAR, OCI_TAR_ENC),
        (OCI_MANIFEST, OCI_TGZ, OCI_TGZ_ENC),
        (OCI_MANIFEST, OCI_TZST, OCI_TZST_ENC),
        (OCI_MANIFEST, DOCKER_TGZ, OCI_TGZ_ENC),
        (DOCKER_MANIFEST, DOCKER_TGZ, OCI_TGZ_ENC),
        (DOCKER_MANIFEST, DOCKER_TAR, OCI_TAR_ENC),
        (DOCKER_MANIFEST, DOCKER_TZST, OCI_TZST_ENC),
        (DOCKER_MANIFEST, OCI_TGZ, OCI_TGZ_ENC),
    ] {
        let name = format!("{media_type} in {content_type}");
        let input = image(content_type, json!([layer(media_type, plain(1), 100)]));
        let out = run(&input, content_type, ledger_of(&[1]), &STRICT)
            .unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(out.encrypted_layers, 1, "{name}");
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(got["mediaType"], OCI_MANIFEST, "{name}");
        assert_eq!(got["layers"][0]["mediaType"], want, "{name}");
        assert_eq!(got["layers"][0]["digest"], cipher(1).to_string(), "{name}");
        // Not uploaded through the gateway: refused as before.
        let err = run(&input, content_type, BTreeMap::new(), &ACCEPT).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::NotUploadedThroughGateway { layer: 0, .. }
            ),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn json_data_stays_plaintext_unless_the_gateway_encrypted_it() {
    for media_type in [
        "application/json",
        "application/vnd.oci.empty.v1+json",
        "application/vnd.in-toto+json",
        "application/spdx+json",
        "application/vnd.dev.cosign.simplesigning.v1+json",
        "application/vnd.dsse.envelope.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
    ] {
        let input = image(
            OCI_MANIFEST,
            json!([
                layer(OCI_TGZ, plain(1), 100),
                layer(media_type, plain(3), 30)
            ]),
        );
        let out = run(&input, OCI_MANIFEST, ledger_of(&[1]), &STRICT)
            .unwrap_or_else(|e| panic!("{media_type}: refused: {e}"));
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(got["layers"][1], input["layers"][1], "{media_type}");
        // The gateway encrypted that blob at upload (it was not JSON): no decryptor for the type.
        let err = run(&input, OCI_MANIFEST, ledger_of(&[1, 3]), &ACCEPT).unwrap_err();
        assert!(
            matches!(&err, ManifestError::EncryptedWithoutDecryptor { layer: 1, digest, .. } if *digest == plain(3)),
            "{media_type}: {err:?}"
        );
        assert!(err.to_string().contains("has no decryptor"), "{err}");
    }
}

#[test]
fn pipeline_encrypted_layers_need_the_opt_in_and_well_formed_annotations() {
    let flattened = real_annotations(&[p256()]);
    let general = real_annotations(&[rsa2048(), p256()]);
    // Our own key wrapping writes one of each serialization.
    let jwe = |a: &BTreeMap<String, String>| -> Value {
        serde_json::from_slice(&STANDARD.decode(&a[JWE]).unwrap()).unwrap()
    };
    assert!(jwe(&flattened).get("recipients").is_none());
    assert_eq!(jwe(&general)["recipients"].as_array().unwrap().len(), 2);

    for (name, annotations, media_type) in [
        ("flattened JWE, one recipient", &flattened, OCI_TGZ_ENC),
        ("general JWE, two recipients", &general, OCI_TAR_ENC),
        ("zstd", &general, OCI_TZST_ENC),
    ] {
        let input = image(
            OCI_MANIFEST,
            json!([
                encrypted_layer(media_type, 5, annotations),
                layer(OCI_TGZ, plain(1), 100)
            ]),
        );
        let out = run(&input, OCI_MANIFEST, ledger_of(&[1]), &ACCEPT)
            .unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(out.encrypted_layers, 1, "{name}");
        let got: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(
            got["layers"][0], input["layers"][0],
            "{name}: kept as pushed"
        );
        assert_eq!(got["layers"][1]["mediaType"], OCI_TGZ_ENC, "{name}");

        let err = run(&input, OCI_MANIFEST, ledger_of(&[1]), &STRICT).unwrap_err();
        assert!(
            matches!(&err, ManifestError::EncryptedNotAccepted { layer: 0, media_type: t, .. } if t == media_type),
            "{name}: {err:?}"
        );
        let message = err.to_oci().message;
        for fragment in [
            "already encrypted",
            "accept_encrypted",
            "push the plaintext image",
        ] {
            assert!(message.contains(fragment), "{message}");
        }
    }
}

/// Base64 of a JSON value, as the annotations hold it.
fn b64(v: &Value) -> String {
    STANDARD.encode(serde_json::to_vec(v).unwrap())
}

/// Standard base64 of a JSON value's text (padded with blanks until base64 needs `=`), with
/// the `=` padding removed.
fn unpadded(v: &Value) -> String {
    let mut text = serde_json::to_vec(v).unwrap();
    while text.len().is_multiple_of(3) {
        text.push(b' ');
    }
    let encoded = STANDARD.encode(&text);
    assert!(encoded.ends_with('='));
    encoded.trim_end_matches('=').to_string()
}

fn b64url(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn good_jwe() -> Value {
    json!({
        "protected": b64url(r#"{"enc":"A256GCM"}"#),
        "recipients": [
            {"header": {"alg": "RSA-OAEP"}, "encrypted_key": b64url("wrapped-1")},
            {"header": {"alg": "ECDH-ES+A256KW"}, "encrypted_key": b64url("wrapped-2")}
        ],
        "iv": b64url("twelve bytes"),
        "ciphertext": b64url("private options"),
        "tag": b64url("sixteen byte tag")
    })
}

fn good_pubopts() -> Value {
    json!({"cipher": "AES_256_CTR_HMAC_SHA256", "hmac": STANDARD.encode([9u8; 32]), "cipheroptions": {}})
}

fn annotations_with(jwe: Option<String>, pubopts: Option<String>) -> Value {
    let mut a = serde_json::Map::new();
    if let Some(j) = jwe {
        a.insert(JWE.to_string(), Value::String(j));
    }
    if let Some(p) = pubopts {
        a.insert(PUBOPTS.to_string(), Value::String(p));
    }
    a.insert("org.opencontainers.image.title".to_string(), json!("layer"));
    Value::Object(a)
}

fn edit(mut v: Value, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    f(v.as_object_mut().unwrap());
    v
}

#[test]
fn malformed_annotations_are_refused_under_the_opt_in() {
    let jwe = |v: Value| Some(b64(&v));
    let pubopts = || Some(b64(&good_pubopts()));
    let good = annotations_with(jwe(good_jwe()), pubopts());
    let flattened = edit(good_jwe(), |j| {
        j.remove("recipients");
        j.insert("encrypted_key".into(), json!(b64url("wrapped")));
        j.insert("header".into(), json!({"alg": "RSA-OAEP"}));
    });
    for (name, annotations) in [
        ("general", good.clone()),
        ("flattened", annotations_with(jwe(flattened), pubopts())),
    ] {
        let input = image(
            OCI_MANIFEST,
            json!([{"mediaType": OCI_TGZ_ENC, "digest": cipher(5).to_string(), "size": 10,
                    "annotations": annotations}]),
        );
        run(&input, OCI_MANIFEST, BTreeMap::new(), &ACCEPT)
            .unwrap_or_else(|e| panic!("{name}: refused: {e}"));
    }

    let cases: Vec<(&str, Value, &str)> = vec![
        ("no annotations at all", Value::Null, "no annotations"),
        (
            "keys.jwe missing",
            annotations_with(None, pubopts()),
            "keys.jwe is missing",
        ),
        (
            "pubopts missing",
            annotations_with(jwe(good_jwe()), None),
            "pubopts is missing",
        ),
        (
            "keys.jwe not a string",
            edit(good.clone(), |a| {
                a.insert(JWE.into(), json!(7));
            }),
            "not a string",
        ),
        (
            "keys.jwe not base64",
            annotations_with(Some("not base64!".into()), pubopts()),
            "not standard base64",
        ),
        (
            "keys.jwe in base64 without its padding",
            annotations_with(Some(unpadded(&good_jwe())), pubopts()),
            "keys.jwe is not standard base64",
        ),
        (
            "keys.jwe not JSON",
            annotations_with(Some(STANDARD.encode("eyJhbGciOi.compact.form")), pubopts()),
            "does not decode to a JSON object",
        ),
        (
            "keys.jwe a JSON array",
            annotations_with(jwe(json!([1, 2])), pubopts()),
            "does not decode to a JSON object",
        ),
        (
            "no ciphertext",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.remove("ciphertext");
                })),
                pubopts(),
            ),
            "ciphertext",
        ),
        (
            "no iv",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.remove("iv");
                })),
                pubopts(),
            ),
            "iv",
        ),
        (
            "no tag",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.remove("tag");
                })),
                pubopts(),
            ),
            "tag",
        ),
        (
            "no protected header",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.remove("protected");
                })),
                pubopts(),
            ),
            "protected",
        ),
        (
            "protected header not JSON",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.insert("protected".into(), json!(b64url("not json")));
                })),
                pubopts(),
            ),
            "protected header that is not a JSON object",
        ),
        (
            "ciphertext not base64url",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.insert("ciphertext".into(), json!("a+b/c=="));
                })),
                pubopts(),
            ),
            "ciphertext",
        ),
        (
            "empty recipients",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.insert("recipients".into(), json!([]));
                })),
                pubopts(),
            ),
            "empty recipients",
        ),
        (
            "a recipient without encrypted_key",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.insert(
                        "recipients".into(),
                        json!([{"encrypted_key": b64url("k")}, {"header": {}}]),
                    );
                })),
                pubopts(),
            ),
            "recipient without",
        ),
        (
            "recipients not an array",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.insert("recipients".into(), json!({"encrypted_key": b64url("k")}));
                })),
                pubopts(),
            ),
            "not an array",
        ),
        (
            "flattened without encrypted_key",
            annotations_with(
                jwe(edit(good_jwe(), |j| {
                    j.remove("recipients");
                })),
                pubopts(),
            ),
            "neither recipients nor",
        ),
        (
            "another cipher",
            annotations_with(
                jwe(good_jwe()),
                Some(b64(&edit(good_pubopts(), |p| {
                    p.insert("cipher".into(), json!("AES_128_GCM"));
                }))),
            ),
            "AES_128_GCM",
        ),
        (
            "cipher missing",
            annotations_with(
                jwe(good_jwe()),
                Some(b64(&edit(good_pubopts(), |p| {
                    p.remove("cipher");
                }))),
            ),
            "expected \"AES_256_CTR_HMAC_SHA256\"",
        ),
        (
            "cipher in another letter case",
            annotations_with(
                jwe(good_jwe()),
                Some(b64(&edit(good_pubopts(), |p| {
                    p.insert("cipher".into(), json!("aes_256_ctr_hmac_sha256"));
                }))),
            ),
            "cipher",
        ),
        (
            "no hmac",
            annotations_with(
                jwe(good_jwe()),
                Some(b64(&edit(good_pubopts(), |p| {
                    p.remove("hmac");
                }))),
            ),
            "32-byte hmac",
        ),
        (
            "hmac of 16 bytes",
            annotations_with(
                jwe(good_jwe()),
                Some(b64(&edit(good_pubopts(), |p| {
                    p.insert("hmac".into(), json!(STANDARD.encode([1u8; 16])));
                }))),
            ),
            "32-byte hmac",
        ),
        (
            "pubopts not JSON",
            annotations_with(jwe(good_jwe()), Some(STANDARD.encode("cipher=AES"))),
            "pubopts does not decode",
        ),
    ];
    for (name, annotations, reason) in cases {
        let mut descriptor =
            json!({"mediaType": OCI_TGZ_ENC, "digest": cipher(5).to_string(), "size": 10});
        if !annotations.is_null() {
            descriptor["annotations"] = annotations;
        }
        let input = image(OCI_MANIFEST, json!([descriptor]));
        let result = run(&input, OCI_MANIFEST, BTreeMap::new(), &ACCEPT);
        assert_refused(
            name,
            result,
            |e| matches!(e, ManifestError::EncryptionAnnotations { layer: 0, .. }),
            &[reason, "not well formed", &cipher(5).to_string()],
        );
        // Without the opt-in the layer is refused before its annotations are even read.
        let result = run(&input, OCI_MANIFEST, BTreeMap::new(), &STRICT);
        assert_refused(
            name,
            result,
            |e| matches!(e, ManifestError::EncryptedNotAccepted { layer: 0, .. }),
            &["accept_encrypted"],
        );
    }
}

/// The ledger of a repository where the gateway encrypted plaintext 1 (real annotations), with
/// the reverse entry a re-push needs: the ciphertext digest answering with its own entry.
fn ledger_with_reverse(annotations: &BTreeMap<String, String>) -> BTreeMap<Digest, LedgerEntry> {
    let e = entry(1, 100, annotations.clone());
    BTreeMap::from([(plain(1), e.clone()), (cipher(1), e)])
}

#[test]
fn a_repush_of_what_the_gateway_stored_passes_unchanged() {
    let annotations = real_annotations(&[p256()]);
    let pushed = image(
        DOCKER_MANIFEST,
        json!([{"mediaType": DOCKER_TGZ, "digest": plain(1).to_string(), "size": 100,
                "annotations": {"org.opencontainers.image.title": "rootfs"}}]),
    );
    let ledger = ledger_with_reverse(&annotations);
    let stored = run(&pushed, DOCKER_MANIFEST, ledger.clone(), &STRICT).unwrap();
    assert_eq!(stored.encrypted_layers, 1);

    // `crane copy`/`skopeo copy` of the stored manifest back through the gateway, same bytes.
    let again = rewrite_opts(&stored.body, OCI_MANIFEST, ledger.clone(), &STRICT).unwrap();
    assert_eq!(again.body, stored.body);
    assert_eq!(again.encrypted_layers, 0);
    // Under the opt-in too.
    let again = rewrite_opts(&stored.body, OCI_MANIFEST, ledger.clone(), &ACCEPT).unwrap();
    assert_eq!(again.body, stored.body);

    // Without the reverse entry (the gateway does not know that ciphertext), it is a layer
    // encrypted before the push: refused by default.
    let only_forward: BTreeMap<Digest, LedgerEntry> = ledger
        .iter()
        .filter(|(d, _)| **d == plain(1))
        .map(|(d, e)| (*d, e.clone()))
        .collect();
    let err = rewrite_opts(&stored.body, OCI_MANIFEST, only_forward, &STRICT).unwrap_err();
    assert!(
        matches!(err, ManifestError::EncryptedNotAccepted { layer: 0, .. }),
        "{err:?}"
    );

    // Anything but what the gateway wrote is refused, opt-in or not.
    let stored_doc: Value = serde_json::from_slice(&stored.body).unwrap();
    let altered = |f: &dyn Fn(&mut Value)| {
        let mut doc = stored_doc.clone();
        f(&mut doc["layers"][0]);
        doc
    };
    let other = real_annotations(&[p256()]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "size changed",
            altered(&|l| l["size"] = json!(99)),
            "size 99",
        ),
        (
            "keys.jwe replaced",
            altered(&|l| l["annotations"][JWE] = json!(other[JWE])),
            "annotations differ",
        ),
        (
            "an extra enc annotation",
            altered(&|l| l["annotations"]["org.opencontainers.image.enc.keys.pgp"] = json!("x")),
            "annotations differ",
        ),
        (
            "pubopts dropped",
            altered(&|l| {
                l["annotations"].as_object_mut().unwrap().remove(PUBOPTS);
            }),
            "annotations differ",
        ),
        (
            "urls added",
            altered(&|l| l["urls"] = json!(["https://example.com/x"])),
            "carries urls",
        ),
        (
            "data added",
            altered(&|l| l["data"] = json!("cGxhaW4=")),
            "carries data",
        ),
    ];
    for (name, doc, reason) in cases {
        for options in [STRICT, ACCEPT] {
            let result = run(&doc, OCI_MANIFEST, ledger.clone(), &options);
            assert_refused(
                name,
                result,
                |e| matches!(e, ManifestError::NotAsStored { layer: 0, digest, .. } if *digest == cipher(1)),
                &[reason, "not the descriptor the gateway stored"],
            );
        }
    }
    // Its other annotations are the client's, and may change.
    let retitled = altered(&|l| l["annotations"]["org.opencontainers.image.title"] = json!("x"));
    run(&retitled, OCI_MANIFEST, ledger, &STRICT).unwrap();
}

#[test]
fn client_manifests_cannot_pose_as_ledger_records() {
    let record = ledger::ledger_manifest_authenticated(
        &[7u8; 32],
        "demo/app",
        &plain(1),
        &entry(1, 100, fake_annotations(1)),
    );
    let record: Value = serde_json::from_slice(&record).unwrap();
    let with_artifact = |t: &str| {
        let mut m = image(OCI_MANIFEST, json!([layer(OCI_TGZ, plain(1), 100)]));
        m["artifactType"] = json!(t);
        m
    };
    let with_config = |t: &str| {
        let mut m = image(OCI_MANIFEST, json!([layer(OCI_TGZ, plain(1), 100)]));
        m["config"]["mediaType"] = json!(t);
        m
    };
    let upper = LEDGER_ARTIFACT_TYPE.to_ascii_uppercase();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "a copy of a gateway ledger record",
            record,
            OCI_MANIFEST,
            "artifactType",
        ),
        (
            "artifactType",
            with_artifact(LEDGER_ARTIFACT_TYPE),
            OCI_MANIFEST,
            "artifactType",
        ),
        (
            "artifactType in capitals",
            with_artifact(&upper),
            OCI_MANIFEST,
            "artifactType",
        ),
        (
            "config mediaType",
            with_config(LEDGER_ARTIFACT_TYPE),
            OCI_MANIFEST,
            "config.mediaType",
        ),
        (
            "an index",
            json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": LEDGER_ARTIFACT_TYPE,
                   "manifests": []}),
            OCI_INDEX,
            "artifactType",
        ),
    ];
    for (name, input, content_type, field) in cases {
        for options in [STRICT, ACCEPT] {
            let result = run(&input, content_type, ledger_of(&[1]), &options);
            assert_refused(
                name,
                result,
                |e| matches!(e, ManifestError::LedgerLookalike { .. }),
                &[field, "ledger records", "clients cannot push"],
            );
        }
    }
}
