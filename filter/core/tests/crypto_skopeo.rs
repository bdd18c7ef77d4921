//! Interoperability with the real consumer, containers/image (via skopeo), both ways:
//! skopeo decrypts an OCI layout whose layer we encrypted and annotated, and we unwrap and
//! decrypt a layer that skopeo (go-jose) encrypted. A missing skopeo fails these tests
//! (`OCICRYPT_ALLOW_MISSING_TOOLS=1` skips them in a local run).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "crypto_fixtures.rs"]
mod fixtures;
mod common {
    pub mod tempdir;
    pub mod tools;
}

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::tempdir::TempDir;
use fixtures::*;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::format::blockcipher::{decrypt_layer, LayerEncryptor};
use ocicrypt_core::format::keywrap::{layer_annotations, unwrap_private_options, PrivateKey};
use ocicrypt_core::format::recipients::Recipient;
use ocicrypt_core::spec::{ANNOTATION_KEYS_JWE, ANNOTATION_PUBOPTS};
use rand::RngCore;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn skopeo_ready() -> Result<(), String> {
    match Command::new("skopeo").arg("--version").output() {
        Err(e) => Err(format!("skopeo not runnable: {e}")),
        Ok(o) if !o.status.success() => Err("skopeo --version failed".into()),
        Ok(_) => Ok(()),
    }
}

fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex::encode(d.0)), bytes).unwrap();
    d
}

fn get_blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

/// A one-layer OCI image layout; `layer` is stored as given under `media_type`.
fn write_layout(
    layout: &Path,
    layer: &[u8],
    media_type: &str,
    annotations: Option<&BTreeMap<String, String>>,
    diff_id: Digest,
) {
    std::fs::create_dir_all(layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]}
    }))
    .unwrap();
    let config_digest = put_blob(layout, &config);
    let layer_digest = put_blob(layout, layer);
    let mut layer_desc =
        json!({"mediaType": media_type, "digest": layer_digest.to_string(), "size": layer.len()});
    if let Some(a) = annotations {
        layer_desc["annotations"] = json!(a);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [layer_desc]
    }))
    .unwrap();
    let manifest_digest = put_blob(layout, &manifest);
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest.to_string(), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn read_layer_desc(layout: &Path) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(&get_blob(
        layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    manifest["layers"][0].clone()
}

/// A small real tar.gz (a layer containers/image may unpack or re-digest).
fn tar_gz(dir: &Path) -> (Vec<u8>, Digest) {
    let src = dir.join("tree");
    std::fs::create_dir_all(&src).unwrap();
    let mut content = vec![0u8; 50_000];
    rand::thread_rng().fill_bytes(&mut content);
    std::fs::write(src.join("file.bin"), &content).unwrap();
    let tar = dir.join("layer.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("file.bin")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    let tar_bytes = std::fs::read(&tar).unwrap();
    let ok = Command::new("gzip")
        .arg("-kn")
        .arg(&tar)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gzip failed");
    (
        std::fs::read(dir.join("layer.tar.gz")).unwrap(),
        Digest::of(&tar_bytes),
    )
}

#[test]
fn skopeo_decrypts_what_we_encrypt() {
    if !common::tools::require("skopeo_decrypts_what_we_encrypt", skopeo_ready()) {
        return;
    }
    let dir = TempDir::new("skopeo-dec");
    let (plain, diff_id) = tar_gz(&dir.0);
    let keys: Vec<(&str, PrivateKey)> = [
        ("rsa2048", RSA2048_PRIVATE_PKCS8),
        ("p256", P256_PRIVATE_PKCS8),
        ("p384", P384_PRIVATE_PKCS8),
        ("p521", P521_PRIVATE_PKCS8),
    ]
    .into_iter()
    .map(|(n, pem)| {
        std::fs::write(dir.0.join(format!("{n}.pem")), pem).unwrap();
        (n, PrivateKey::from_pkcs8_pem(pem).unwrap())
    })
    .collect();

    // One layout per recipient set: each key alone (flattened JWE), and all together (general).
    let mut sets: Vec<Vec<usize>> = (0..keys.len()).map(|i| vec![i]).collect();
    sets.push((0..keys.len()).collect());
    for (s, set) in sets.iter().enumerate() {
        let recipients: Vec<Recipient> = set.iter().map(|&i| keys[i].1.public()).collect();
        let mut enc = LayerEncryptor::generate(&mut rand_core::OsRng);
        let mut cipher = plain.clone();
        enc.encrypt_in_place(&mut cipher);
        let layer = enc.finish();
        let annotations = layer_annotations(&layer, &recipients, &mut rand_core::OsRng).unwrap();
        let src = dir.0.join(format!("enc-{s}"));
        write_layout(
            &src,
            &cipher,
            &format!("{LAYER_GZIP}+encrypted"),
            Some(&annotations),
            diff_id,
        );

        for &i in set {
            let (name, _) = &keys[i];
            let dst = dir.0.join(format!("dec-{s}-{name}"));
            let key_path = dir.0.join(format!("{name}.pem"));
            skopeo(&[
                "copy",
                "--decryption-key",
                key_path.to_str().unwrap(),
                &format!("oci:{}:latest", src.display()),
                &format!("oci:{}:latest", dst.display()),
            ]);
            let desc = read_layer_desc(&dst);
            assert_eq!(desc["mediaType"], LAYER_GZIP, "set {s} key {name}");
            assert_eq!(
                get_blob(&dst, desc["digest"].as_str().unwrap()),
                plain,
                "set {s} key {name}"
            );
            assert!(desc
                .get("annotations")
                .is_none_or(|a| !a.to_string().contains(".enc.")));
        }
    }
}

#[test]
fn we_decrypt_what_skopeo_encrypts() {
    if !common::tools::require("we_decrypt_what_skopeo_encrypts", skopeo_ready()) {
        return;
    }
    let dir = TempDir::new("skopeo-enc");
    let (plain, diff_id) = tar_gz(&dir.0);
    let src = dir.0.join("plain");
    write_layout(&src, &plain, LAYER_GZIP, None, diff_id);
    let pems = [
        ("rsa2048", RSA2048_PUBLIC_PKIX, RSA2048_PRIVATE_PKCS8),
        ("p256", P256_PUBLIC_PKIX, P256_PRIVATE_PKCS8),
        ("p521", P521_PUBLIC_PKIX, P521_PRIVATE_PKCS8),
    ];
    for (name, public, _) in pems {
        std::fs::write(dir.0.join(format!("{name}.pub.pem")), public).unwrap();
    }
    // First a single recipient (go-jose flattened form), then all three (general form).
    let sets: Vec<Vec<usize>> = vec![vec![1], vec![0, 1, 2]];
    for (s, set) in sets.iter().enumerate() {
        let dst = dir.0.join(format!("enc-{s}"));
        let mut args: Vec<String> = vec!["copy".into()];
        for &i in set {
            args.push("--encryption-key".into());
            args.push(format!(
                "jwe:{}",
                dir.0.join(format!("{}.pub.pem", pems[i].0)).display()
            ));
        }
        args.push(format!("oci:{}:latest", src.display()));
        args.push(format!("oci:{}:latest", dst.display()));
        skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>());

        let desc = read_layer_desc(&dst);
        assert_eq!(desc["mediaType"], format!("{LAYER_GZIP}+encrypted"));
        let cipher = get_blob(&dst, desc["digest"].as_str().unwrap());
        let pubopts: Value = serde_json::from_slice(
            &STANDARD
                .decode(desc["annotations"][ANNOTATION_PUBOPTS].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let hmac: [u8; 32] = STANDARD
            .decode(pubopts["hmac"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let jwe = STANDARD
            .decode(desc["annotations"][ANNOTATION_KEYS_JWE].as_str().unwrap())
            .unwrap();
        for &i in set {
            let key = PrivateKey::from_pkcs8_pem(pems[i].2).unwrap();
            let opts = unwrap_private_options(&jwe, &key).unwrap();
            assert_eq!(opts.digest, Digest::of(&plain).to_string());
            assert_eq!(
                decrypt_layer(&opts.symkey, &opts.nonce, &hmac, &cipher).unwrap(),
                plain
            );
        }
    }
}
