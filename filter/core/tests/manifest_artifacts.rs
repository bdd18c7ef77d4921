//! Artifacts in an encrypted repository: cosign signatures, referrers with a `subject`, Helm
//! charts, next to images the gateway encrypted.
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
use ocicrypt_core::distribution::manifest::{ManifestError, Rewritten};
use ocicrypt_core::error::Code;
use serde_json::{json, Value};

const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
const COSIGN_SIG: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const COSIGN_SIG_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
const HELM_CHART: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";

fn blob(n: u8) -> Digest {
    Digest::of(&[n, 0x01])
}

fn blob_cipher(n: u8) -> Digest {
    Digest::of(&[n, 0x02])
}

/// The ledger of a repository holding one encrypted image: layer blobs 1 and 2, and image
/// manifest 7 (pushed by tag as Docker v2s2, stored as OCI).
fn ledger() -> BTreeMap<Digest, LedgerEntry> {
    let mut map: BTreeMap<Digest, LedgerEntry> = [1u8, 2]
        .into_iter()
        .map(|n| {
            (
                blob(n),
                LedgerEntry {
                    encrypted_digest: blob_cipher(n),
                    size: 100 * u64::from(n),
                    annotations: BTreeMap::from([
                        (JWE.to_string(), format!("jwe-{n}")),
                        (PUBOPTS.to_string(), format!("pubopts-{n}")),
                    ]),
                    media_type: None,
                    recipients: None,
                },
            )
        })
        .collect();
    map.insert(
        pushed(7),
        LedgerEntry {
            encrypted_digest: stored(7),
            size: 777,
            annotations: BTreeMap::new(),
            media_type: Some(OCI_MANIFEST.to_string()),
            recipients: None,
        },
    );
    map
}

fn run(input: &Value, content_type: &str) -> Result<Rewritten, ManifestError> {
    rewrite_with(
        &serde_json::to_vec_pretty(input).unwrap(),
        content_type,
        ledger(),
    )
}

fn desc(media_type: &str, digest: Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
}

fn empty_config() -> Value {
    json!({"mediaType": EMPTY, "digest": EMPTY_DIGEST, "size": 2})
}

/// Cases stored exactly as pushed (same bytes, same digest).
fn unchanged_cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "cosign signature manifest (tag sha256-<digest>.sig)",
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, Digest::of(b"cosign config"), 233),
                "layers": [
                    {
                        "mediaType": COSIGN_SIG,
                        "digest": Digest::of(b"simplesigning payload 1").to_string(),
                        "size": 248,
                        "annotations": {
                            COSIGN_SIG_ANNOTATION: "MEUCIQDexample1==",
                            "dev.sigstore.cosign/bundle": "{\"SignedEntryTimestamp\":\"x\"}"
                        }
                    },
                    {
                        "mediaType": COSIGN_SIG,
                        "digest": Digest::of(b"simplesigning payload 2").to_string(),
                        "size": 248,
                        "annotations": {COSIGN_SIG_ANNOTATION: "MEUCIQDexample2=="}
                    }
                ]
            }),
        ),
        (
            "cosign attestation manifest (tag sha256-<digest>.att)",
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": desc(OCI_CONFIG, Digest::of(b"att config"), 342),
                "layers": [{
                    "mediaType": "application/vnd.dsse.envelope.v1+json",
                    "digest": Digest::of(b"dsse").to_string(),
                    "size": 1024,
                    "annotations": {"predicateType": "https://slsa.dev/provenance/v0.2"}
                }]
            }),
        ),
        (
            "referrer whose subject the gateway did not rewrite (already-encrypted image)",
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                "config": empty_config(),
                "layers": [desc("application/vnd.dev.sigstore.bundle.v0.3+json", Digest::of(b"bundle"), 3000)],
                "subject": desc(OCI_MANIFEST, pushed(9), 999),
                "annotations": {"dev.sigstore.bundle.predicateType": "https://sigstore.dev/cosign/sign/v1"}
            }),
        ),
    ]
}

#[test]
fn artifacts_stored_unchanged() {
    for (name, input) in unchanged_cases() {
        let out = run(&input, OCI_MANIFEST).unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(
            out.body,
            serde_json::to_vec_pretty(&input).unwrap(),
            "{name}"
        );
        assert_eq!(out.encrypted_layers, 0, "{name}");
        assert_eq!(out.rewritten_references, 0, "{name}");
        assert_eq!(out.media_type, OCI_MANIFEST, "{name}");
    }
}

/// (name, content type, pushed, stored, encrypted layers, rewritten references)
type Case = (&'static str, &'static str, Value, Value, usize, usize);

fn rewritten_cases() -> Vec<Case> {
    vec![
        (
            "SBOM referrer naming a rewritten image: subject points at the stored manifest",
            OCI_MANIFEST,
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/spdx+json",
                "config": empty_config(),
                "layers": [desc("application/spdx+json", Digest::of(b"spdx"), 4000)],
                "subject": desc(DOCKER_MANIFEST, pushed(7), 555),
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
            }),
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": "application/spdx+json",
                "config": empty_config(),
                "layers": [desc("application/spdx+json", Digest::of(b"spdx"), 4000)],
                "subject": desc(OCI_MANIFEST, stored(7), 777),
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}
            }),
            0,
            1,
        ),
        (
            "image with a subject: layers encrypted and subject rewritten",
            OCI_MANIFEST,
            json!({
                "schemaVersion": 2,
                "config": desc(OCI_CONFIG, Digest::of(b"config"), 50),
                "layers": [desc(OCI_TGZ, blob(1), 100)],
                "subject": {"mediaType": OCI_MANIFEST, "digest": pushed(7).to_string(), "size": 555,
                            "artifactType": "application/vnd.example", "annotations": {"a": "b"}}
            }),
            json!({
                "schemaVersion": 2,
                "config": desc(OCI_CONFIG, Digest::of(b"config"), 50),
                "layers": [{"mediaType": OCI_TGZ_ENC, "digest": blob_cipher(1).to_string(), "size": 100,
                            "annotations": {JWE: "jwe-1", PUBOPTS: "pubopts-1"}}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": stored(7).to_string(), "size": 777,
                            "artifactType": "application/vnd.example", "annotations": {"a": "b"}}
            }),
            1,
            1,
        ),
        (
            "cosign signature referrer (OCI 1.1 mode) naming a rewritten image",
            OCI_MANIFEST,
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": COSIGN_SIG,
                "config": empty_config(),
                "layers": [{"mediaType": COSIGN_SIG, "digest": Digest::of(b"payload").to_string(), "size": 248,
                            "annotations": {COSIGN_SIG_ANNOTATION: "MEUCIQD=="}}],
                "subject": desc(OCI_MANIFEST, pushed(7), 555)
            }),
            json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": COSIGN_SIG,
                "config": empty_config(),
                "layers": [{"mediaType": COSIGN_SIG, "digest": Digest::of(b"payload").to_string(), "size": 248,
                            "annotations": {COSIGN_SIG_ANNOTATION: "MEUCIQD=="}}],
                "subject": desc(OCI_MANIFEST, stored(7), 777)
            }),
            0,
            1,
        ),
    ]
}

#[test]
fn referrers_rewritten() {
    for (name, content_type, input, want, layers, references) in rewritten_cases() {
        let out = run(&input, content_type).unwrap_or_else(|e| panic!("{name}: refused: {e}"));
        assert_eq!(
            out.body,
            serde_json::to_vec(&want).unwrap(),
            "{name}: {}",
            String::from_utf8_lossy(&out.body)
        );
        assert_eq!(out.encrypted_layers, layers, "{name}");
        assert_eq!(out.rewritten_references, references, "{name}");
        assert_eq!(out.descriptor_media_type(), OCI_MANIFEST, "{name}");
    }
}

#[test]
fn helm_chart_is_refused() {
    // What `helm push` sends: a JSON config (not encrypted, so not in the ledger) and the
    // chart archive, which the gateway encrypted on upload (blob 2).
    let chart = json!({
        "schemaVersion": 2,
        "config": desc(HELM_CONFIG, Digest::of(b"{\"name\":\"mychart\"}"), 117),
        "layers": [desc(HELM_CHART, blob(2), 200)],
        "annotations": {
            "org.opencontainers.image.title": "mychart",
            "org.opencontainers.image.version": "0.1.0"
        }
    });
    let err = run(&chart, OCI_MANIFEST).unwrap_err();
    assert!(
        matches!(&err, ManifestError::EncryptedWithoutDecryptor { layer: 0, digest, media_type }
            if *digest == blob(2) && media_type == HELM_CHART),
        "{err:?}"
    );
    let oci = err.to_oci();
    assert_eq!(oci.code, Code::ManifestInvalid);
    for fragment in [
        &blob(2).to_string(),
        HELM_CHART,
        "has no decryptor",
        "push this artifact to an unencrypted repository",
    ] {
        assert!(
            oci.message.contains(fragment),
            "{} lacks {fragment}",
            oci.message
        );
    }
}

#[test]
fn index_child_and_subject_naming_the_same_manifest() {
    // An index subject naming a manifest the ledger knows is rewritten like a child.
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_MANIFEST, pushed(7), 555)],
        "subject": desc(OCI_MANIFEST, pushed(7), 555)
    });
    let out = run(&index, OCI_INDEX).unwrap();
    let got: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(got["manifests"][0], desc(OCI_MANIFEST, stored(7), 777));
    assert_eq!(got["subject"], desc(OCI_MANIFEST, stored(7), 777));
    assert_eq!(out.rewritten_references, 2);
}
