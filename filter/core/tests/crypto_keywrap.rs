//! The layer annotations: exact public-options bytes, JWE shape as go-jose/ocicrypt emit it,
//! unwrap with every key type, and decryption by an independent implementation
//! (`tests/jwe_decrypt.py`, Python `cryptography`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "crypto_fixtures.rs"]
mod fixtures;
#[cfg(not(target_family = "wasm"))]
mod common {
    pub mod tempdir;
    pub mod tools;
}

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
#[cfg(not(target_family = "wasm"))]
use common::tempdir::TempDir;
use fixtures::*;
use ocicrypt_core::format::blockcipher::{decrypt_layer, EncryptedLayer, LayerEncryptor};
use ocicrypt_core::format::keywrap::{
    layer_annotations, unwrap_private_options, KeyWrapError, PrivateKey,
};
use ocicrypt_core::format::recipients::Recipient;
use ocicrypt_core::spec::{ANNOTATION_KEYS_JWE, ANNOTATION_PUBOPTS};
use rand::RngCore;
use serde_json::Value;
use std::collections::BTreeMap;
#[cfg(not(target_family = "wasm"))]
use std::path::PathBuf;
#[cfg(not(target_family = "wasm"))]
use std::process::Command;

const PRIVATE_KEYS: [(&str, &str); 5] = [
    ("rsa2048", RSA2048_PRIVATE_PKCS8),
    ("rsa3072", RSA3072_PRIVATE_PKCS8),
    ("p256", P256_PRIVATE_PKCS8),
    ("p384", P384_PRIVATE_PKCS8),
    ("p521", P521_PRIVATE_PKCS8),
];

fn private(pem: &str) -> PrivateKey {
    PrivateKey::from_pkcs8_pem(pem).unwrap()
}

/// A random plaintext layer, encrypted in two chunks.
fn layer(len: usize) -> (Vec<u8>, Vec<u8>, EncryptedLayer) {
    let mut plain = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut plain);
    let mut enc = LayerEncryptor::generate(&mut rand_core::OsRng);
    let mut cipher = plain.clone();
    let (a, b) = cipher.split_at_mut(len / 3);
    enc.encrypt_in_place(a);
    enc.encrypt_in_place(b);
    (plain, cipher, enc.finish())
}

fn jwe_json(annotations: &BTreeMap<String, String>) -> Vec<u8> {
    STANDARD.decode(&annotations[ANNOTATION_KEYS_JWE]).unwrap()
}

fn decode_protected(jwe: &Value) -> String {
    String::from_utf8(
        URL_SAFE_NO_PAD
            .decode(jwe["protected"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

/// Positions of the given members in the raw JSON text, to check go-jose's member order.
/// Member names of a JSON object, sorted (whatever serde_json's map ordering is).
fn members(v: &Value) -> Vec<&str> {
    let mut m: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    m.sort_unstable();
    m
}

fn in_order(text: &str, members: &[&str]) -> bool {
    let pos: Vec<usize> = members
        .iter()
        .map(|m| {
            text.find(&format!("\"{m}\":"))
                .unwrap_or_else(|| panic!("{m} missing in {text}"))
        })
        .collect();
    pos.windows(2).all(|w| w[0] < w[1])
}

#[test]
fn exactly_two_annotations_and_exact_pubopts_bytes() {
    let (_, _, l) = layer(1000);
    let recipients = [private(P256_PRIVATE_PKCS8).public()];
    let a = layer_annotations(&l, &recipients, &mut rand_core::OsRng).unwrap();
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        [ANNOTATION_KEYS_JWE, ANNOTATION_PUBOPTS],
        "exactly the two ocicrypt annotations"
    );
    let pubopts = STANDARD.decode(&a[ANNOTATION_PUBOPTS]).unwrap();
    let expected = format!(
        "{{\"cipher\":\"AES_256_CTR_HMAC_SHA256\",\"hmac\":\"{}\",\"cipheroptions\":{{}}}}",
        STANDARD.encode(l.hmac)
    );
    assert_eq!(String::from_utf8(pubopts).unwrap(), expected);
    // Standard alphabet with padding, as Go's encoding/base64.StdEncoding.
    assert_eq!(a[ANNOTATION_PUBOPTS], STANDARD.encode(expected.as_bytes()));
    assert!(a[ANNOTATION_KEYS_JWE].ends_with('=') || a[ANNOTATION_KEYS_JWE].len() % 4 == 0);
}

#[test]
fn pubopts_matches_a_skopeo_sample_byte_for_byte() {
    // skopeo 1.x wrote hmac "HFxmI8MQoHTtqWzghTg0Gu6x+RxUalLjEYLqgt8Z7yg=" on a real layer;
    // the JSON around it must be what we emit for the same HMAC.
    let hmac: [u8; 32] = STANDARD
        .decode("HFxmI8MQoHTtqWzghTg0Gu6x+RxUalLjEYLqgt8Z7yg=")
        .unwrap()
        .try_into()
        .unwrap();
    let (_, _, mut l) = layer(10);
    l.hmac = hmac;
    let a = layer_annotations(
        &l,
        &[private(P256_PRIVATE_PKCS8).public()],
        &mut rand_core::OsRng,
    )
    .unwrap();
    assert_eq!(
        STANDARD.decode(&a[ANNOTATION_PUBOPTS]).unwrap(),
        br#"{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"HFxmI8MQoHTtqWzghTg0Gu6x+RxUalLjEYLqgt8Z7yg=","cipheroptions":{}}"#
    );
}

#[test]
fn single_recipient_is_flattened_and_unwraps() {
    for (name, pem) in PRIVATE_KEYS {
        let key = private(pem);
        let (plain, cipher, l) = layer(5000);
        let a = layer_annotations(&l, &[key.public()], &mut rand_core::OsRng).unwrap();
        let raw = jwe_json(&a);
        let text = std::str::from_utf8(&raw).unwrap();
        let jwe: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            members(&jwe),
            ["ciphertext", "encrypted_key", "iv", "protected", "tag"],
            "{name}"
        );
        assert!(
            in_order(
                text,
                &["protected", "encrypted_key", "iv", "ciphertext", "tag"]
            ),
            "{text}"
        );
        let protected = decode_protected(&jwe);
        if let Some(bits) = name.strip_prefix("rsa") {
            assert_eq!(protected, r#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
            let bits: usize = bits.parse().unwrap();
            let ek = URL_SAFE_NO_PAD
                .decode(jwe["encrypted_key"].as_str().unwrap())
                .unwrap();
            assert_eq!(ek.len(), bits / 8);
        } else {
            let crv = format!("P-{}", &name[1..]);
            let prefix = format!(
                r#"{{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{{"kty":"EC","crv":"{crv}","x":""#
            );
            assert!(protected.starts_with(&prefix), "{protected}");
            let header: Value = serde_json::from_str(&protected).unwrap();
            let coord = key_bits(&crv).div_ceil(8);
            for c in ["x", "y"] {
                let v = URL_SAFE_NO_PAD
                    .decode(header["epk"][c].as_str().unwrap())
                    .unwrap();
                assert_eq!(v.len(), coord, "{crv} {c} is full length");
            }
            assert_eq!(
                jwe["encrypted_key"].as_str().unwrap().len(),
                54,
                "AES-KW of 32 bytes"
            );
        }
        assert_eq!(jwe["iv"].as_str().unwrap().len(), 16);
        assert_eq!(jwe["tag"].as_str().unwrap().len(), 22);

        let opts = unwrap_private_options(&raw, &key).unwrap();
        assert_eq!(*opts.symkey, *l.symkey, "{name}");
        assert_eq!(opts.nonce, l.nonce);
        assert_eq!(opts.digest, l.plaintext_digest.to_string());
        let hmac: [u8; 32] = {
            let p: Value =
                serde_json::from_slice(&STANDARD.decode(&a[ANNOTATION_PUBOPTS]).unwrap()).unwrap();
            STANDARD
                .decode(p["hmac"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        };
        assert_eq!(
            decrypt_layer(&opts.symkey, &opts.nonce, &hmac, &cipher).unwrap(),
            plain
        );
    }
}

fn key_bits(crv: &str) -> usize {
    crv[2..].parse().unwrap()
}

#[test]
fn several_recipients_use_general_json_like_skopeo() {
    let keys: Vec<PrivateKey> = PRIVATE_KEYS.iter().map(|(_, pem)| private(pem)).collect();
    let recipients: Vec<Recipient> = keys.iter().map(PrivateKey::public).collect();
    let (_, _, l) = layer(100);
    let a = layer_annotations(&l, &recipients, &mut rand_core::OsRng).unwrap();
    let raw = jwe_json(&a);
    let text = std::str::from_utf8(&raw).unwrap();
    let jwe: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        members(&jwe),
        ["ciphertext", "iv", "protected", "recipients", "tag"]
    );
    assert!(
        in_order(
            text,
            &["protected", "recipients", "iv", "ciphertext", "tag"]
        ),
        "{text}"
    );
    // Byte-identical to the protected header in skopeo's multi-recipient sample.
    assert_eq!(jwe["protected"], "eyJlbmMiOiJBMjU2R0NNIn0");
    let entries = jwe["recipients"].as_array().unwrap();
    assert_eq!(entries.len(), 5);
    for (entry, r) in entries.iter().zip(&recipients) {
        let header = entry["header"].as_object().unwrap();
        assert_eq!(header["alg"], r.jwe_alg());
        match r {
            Recipient::Rsa(_) => assert_eq!(header.len(), 1),
            _ => {
                assert_eq!(members(&header["epk"]), ["crv", "kty", "x", "y"]);
                assert_eq!(entry["encrypted_key"].as_str().unwrap().len(), 54);
            }
        }
    }
    // skopeo's own sample: RSA-2048 entry is 342 base64url characters.
    assert_eq!(entries[0]["encrypted_key"].as_str().unwrap().len(), 342);
    assert!(
        text.contains(r#"{"header":{"alg":"ECDH-ES+A256KW","epk":{"kty":"EC","crv":"P-256","x":""#)
    );

    for key in &keys {
        let opts = unwrap_private_options(&raw, key).unwrap();
        assert_eq!(*opts.symkey, *l.symkey, "{key:?}");
        assert_eq!(opts.nonce, l.nonce);
    }
}

#[test]
fn refusals() {
    let (_, _, l) = layer(10);
    assert_eq!(
        layer_annotations(&l, &[], &mut rand_core::OsRng).unwrap_err(),
        KeyWrapError::NoRecipients
    );

    let a = layer_annotations(
        &l,
        &[private(P256_PRIVATE_PKCS8).public()],
        &mut rand_core::OsRng,
    )
    .unwrap();
    let raw = jwe_json(&a);
    for wrong in [P384_PRIVATE_PKCS8, RSA2048_PRIVATE_PKCS8] {
        assert!(matches!(
            unwrap_private_options(&raw, &private(wrong)),
            Err(KeyWrapError::NoMatchingRecipient { recipients: 1, .. })
        ));
    }
    // A different P-256 key derives a different KEK: AES-KW integrity check fails.
    let other = PrivateKey::P256(p256::SecretKey::random(&mut rand_core::OsRng));
    assert!(unwrap_private_options(&raw, &other).is_err());

    // Flipping a ciphertext bit breaks the GCM tag.
    let mut jwe: Value = serde_json::from_slice(&raw).unwrap();
    let mut ct = URL_SAFE_NO_PAD
        .decode(jwe["ciphertext"].as_str().unwrap())
        .unwrap();
    ct[0] ^= 1;
    jwe["ciphertext"] = Value::String(URL_SAFE_NO_PAD.encode(ct));
    let tampered = serde_json::to_vec(&jwe).unwrap();
    assert!(unwrap_private_options(&tampered, &private(P256_PRIVATE_PKCS8)).is_err());

    assert!(matches!(
        unwrap_private_options(b"[]", &private(P256_PRIVATE_PKCS8)),
        Err(KeyWrapError::Malformed(_))
    ));
    assert!(matches!(
        PrivateKey::from_pkcs8_pem(P256_PUBLIC_PKIX),
        Err(KeyWrapError::PrivateKey(m)) if m.contains("PKCS#8")
    ));
}

#[test]
fn debug_of_private_values_is_redacted() {
    let key = private(P256_PRIVATE_PKCS8);
    assert_eq!(format!("{key:?}"), "PrivateKey(EC P-256)");
    let (_, _, l) = layer(10);
    let a = layer_annotations(&l, &[key.public()], &mut rand_core::OsRng).unwrap();
    let opts = unwrap_private_options(&jwe_json(&a), &key).unwrap();
    let shown = format!("{opts:?}");
    assert!(
        shown.contains("redacted") && !shown.contains(&STANDARD.encode(*l.symkey)),
        "{shown}"
    );
}

// ---- independent implementation --------------------------------------------------------------
//
// Cases (a layer, its annotations, the keys that must open them) are written to a directory by
// either build; the native build hands each to `tests/jwe_decrypt.py`. WASI cannot start a
// process, so under `scripts/test-wasm` the wasm build writes its cases to
// `$OCICRYPT_WASM_CROSS_CHECK_DIR` and the script then runs `wasm_cases_decrypt_with_python`
// natively over them: the wasm build's own output is what Python decrypts.

/// Environment variable naming the directory the wasm build writes its cases to.
const CROSS_CHECK_DIR: &str = "OCICRYPT_WASM_CROSS_CHECK_DIR";
/// Cases `write_cases` writes: one per key alone, one for all keys, one negative.
const CASES: usize = PRIVATE_KEYS.len() + 2;

/// A cross-check case: its name, its recipients, the keys that open it and those that must not.
type Case<'a> = (String, Vec<Recipient>, Vec<&'a str>, Vec<&'a str>);

/// Writes the cross-check cases under `dir`: per case a directory holding `jwe`, `pubopts`,
/// `blob`, the expected `private` options bytes and `plain` layer, `opens` (the key names that
/// must open it, one a line) and `refuses` (those that must not).
fn write_cases(dir: &std::path::Path) {
    let keys: Vec<(&str, PrivateKey)> = PRIVATE_KEYS
        .iter()
        .map(|(n, pem)| (*n, private(pem)))
        .collect();
    // One JWE per single key, one for all of them, and one for p256 alone that p384 must not
    // open (so that a pass means something).
    let mut cases: Vec<Case> = keys
        .iter()
        .map(|(n, k)| (format!("single-{n}"), vec![k.public()], vec![*n], vec![]))
        .collect();
    cases.push((
        "all".to_string(),
        keys.iter().map(|(_, k)| k.public()).collect(),
        keys.iter().map(|(n, _)| *n).collect(),
        vec![],
    ));
    cases.push((
        "negative".to_string(),
        vec![keys[2].1.public()],
        vec![],
        vec!["p384"],
    ));
    assert_eq!(cases.len(), CASES);
    for (case, recipients, opens, refuses) in cases {
        let (plain, cipher, l) = layer(70_000);
        let a = layer_annotations(&l, &recipients, &mut rand_core::OsRng).unwrap();
        let d = dir.join(&case);
        std::fs::create_dir_all(&d).unwrap();
        let expected_private = format!(
            "{{\"symkey\":\"{}\",\"digest\":\"{}\",\"cipheroptions\":{{\"nonce\":\"{}\"}}}}",
            STANDARD.encode(*l.symkey),
            l.plaintext_digest,
            STANDARD.encode(l.nonce)
        );
        std::fs::write(d.join("jwe"), &a[ANNOTATION_KEYS_JWE]).unwrap();
        std::fs::write(d.join("pubopts"), &a[ANNOTATION_PUBOPTS]).unwrap();
        std::fs::write(d.join("blob"), &cipher).unwrap();
        std::fs::write(d.join("private"), expected_private).unwrap();
        std::fs::write(d.join("plain"), &plain).unwrap();
        std::fs::write(d.join("opens"), opens.join("\n")).unwrap();
        std::fs::write(d.join("refuses"), refuses.join("\n")).unwrap();
    }
}

#[cfg(not(target_family = "wasm"))]
fn python_ready() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
    {
        Err(e) => Err(format!("python3 not runnable: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "python3 has no `cryptography` package: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

/// Hands every case under `dir` to the Python decryptor; returns how many cases there were.
#[cfg(not(target_family = "wasm"))]
fn check_cases_with_python(dir: &std::path::Path) -> usize {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/jwe_decrypt.py");
    let keys = TempDir::new("jwe-keys");
    for (name, pem) in PRIVATE_KEYS {
        std::fs::write(keys.0.join(format!("{name}.pem")), pem).unwrap();
    }
    let lines = |p: PathBuf| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for d in entries {
        let case = d.file_name().unwrap().to_string_lossy().to_string();
        let run = |name: &str, out_path: &std::path::Path| {
            Command::new("python3")
                .arg(&script)
                .arg("--jwe")
                .arg(d.join("jwe"))
                .arg("--key")
                .arg(keys.0.join(format!("{name}.pem")))
                .arg("--pubopts")
                .arg(d.join("pubopts"))
                .arg("--blob")
                .arg(d.join("blob"))
                .arg("--plain-out")
                .arg(out_path)
                .output()
                .unwrap()
        };
        for name in lines(d.join("opens")) {
            let out_path = keys.0.join(format!("{case}-{name}.plain"));
            let out = run(&name, &out_path);
            assert!(
                out.status.success(),
                "{case} with {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                out.stdout,
                std::fs::read(d.join("private")).unwrap(),
                "{case} with {name}: private options bytes"
            );
            assert_eq!(
                std::fs::read(&out_path).unwrap(),
                std::fs::read(d.join("plain")).unwrap(),
                "{case} with {name}: layer"
            );
        }
        for name in lines(d.join("refuses")) {
            let out = run(&name, &keys.0.join("refused.plain"));
            assert!(!out.status.success(), "{case}: {name} opened it");
        }
        checked += 1;
    }
    checked
}

// Native only: WASI cannot start a process (the wasm build's cases are checked by
// `wasm_cases_decrypt_with_python`).
#[cfg(not(target_family = "wasm"))]
#[test]
fn python_cryptography_decrypts_our_annotations_and_layer() {
    if !common::tools::require(
        "python_cryptography_decrypts_our_annotations_and_layer",
        python_ready(),
    ) {
        return;
    }
    let dir = TempDir::new("jwe");
    write_cases(&dir.0);
    assert_eq!(check_cases_with_python(&dir.0), CASES);
}

/// The wasm build's half of the cross-check: its cases, for the native half to decrypt.
#[cfg(target_family = "wasm")]
#[test]
fn wasm_writes_cases_for_python() {
    let dir = std::env::var(CROSS_CHECK_DIR).unwrap_or_else(|_| {
        panic!("{CROSS_CHECK_DIR} is not set: run the wasm tests with scripts/test-wasm, which checks what this writes with Python")
    });
    write_cases(std::path::Path::new(&dir));
}

/// The native half of the wasm build's cross-check (`scripts/test-wasm` sets the directory
/// and runs this after the wasm tests): every case the wasm build wrote decrypts with Python.
/// Without the variable (a plain `cargo test`) there is nothing to check.
#[cfg(not(target_family = "wasm"))]
#[test]
fn wasm_cases_decrypt_with_python() {
    let Some(dir) = std::env::var_os(CROSS_CHECK_DIR) else {
        return;
    };
    assert!(
        common::tools::require("wasm_cases_decrypt_with_python", python_ready()),
        "scripts/test-wasm's cross-check needs python3 with cryptography"
    );
    let checked = check_cases_with_python(std::path::Path::new(&dir));
    assert_eq!(
        checked, CASES,
        "the wasm build wrote {checked} cases to {dir:?}, {CASES} expected"
    );
    println!("{checked} cases written by the wasm build decrypted by Python");
}
