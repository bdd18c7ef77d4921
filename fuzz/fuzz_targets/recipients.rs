//! Recipient keys: `Recipient::from_pem` and `Recipient::from_jwk`.
//!
//! Modes (first byte): 0, the rest as PEM text; 1, the rest as a JWK (JSON); 2, the rest as
//! the DER inside a `PUBLIC KEY` PEM block (so the fuzzer works on the DER, past the base64).
//!
//! Properties of a key that parses: written back out as a PKIX PEM and as a public JWK (by
//! the elliptic-curve and RSA crates' own encoders and a JWK made here), each parses to the
//! same key, with the same fingerprint; its description names its size or curve; RSA keys
//! are 2048 to 4096 bits.
#![no_main]

use base64::Engine as _;
use fuzz_support::check;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::format::recipients::{fingerprint, Recipient};
use p256::pkcs8::EncodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::json;

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn as_pem(key: &Recipient) -> String {
    let line = p256::pkcs8::LineEnding::LF;
    let pem = match key {
        Recipient::Rsa(k) => k.to_public_key_pem(line),
        Recipient::P256(k) => k.to_public_key_pem(line),
        Recipient::P384(k) => k.to_public_key_pem(line),
        Recipient::P521(k) => k.to_public_key_pem(line),
    };
    match pem {
        Ok(p) => p,
        Err(e) => panic!("property broken: a parsed key has no PEM form ({e})"),
    }
}

fn as_jwk(key: &Recipient) -> serde_json::Value {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    let ec = |crv: &str, point: &[u8], size: usize| {
        let (x, y) = point[1..].split_at(size);
        json!({"kty": "EC", "crv": crv, "x": b64url(x), "y": b64url(y)})
    };
    match key {
        Recipient::Rsa(k) => json!({
            "kty": "RSA",
            "n": b64url(&k.n().to_bytes_be()),
            "e": b64url(&k.e().to_bytes_be()),
        }),
        Recipient::P256(k) => ec("P-256", k.to_encoded_point(false).as_bytes(), 32),
        Recipient::P384(k) => ec("P-384", k.to_encoded_point(false).as_bytes(), 48),
        Recipient::P521(k) => ec("P-521", k.to_encoded_point(false).as_bytes(), 66),
    }
}

fn check_key(key: &Recipient) {
    let description = key.describe();
    match key {
        Recipient::Rsa(k) => {
            let bits = k.n().bits();
            check!(
                (2048..=4096).contains(&bits),
                "an RSA key of {bits} bits was accepted"
            );
            check!(
                description == format!("RSA-{bits}"),
                "description {description:?}"
            );
            check!(
                key.jwe_alg() == "RSA-OAEP",
                "RSA key wrapped with {}",
                key.jwe_alg()
            );
        }
        _ => {
            check!(
                description.starts_with("EC P-"),
                "description {description:?}"
            );
            check!(
                key.jwe_alg() == "ECDH-ES+A256KW",
                "EC key wrapped with {}",
                key.jwe_alg()
            );
        }
    }
    let pem = as_pem(key);
    let from_pem = Recipient::from_pem(&pem);
    check!(
        from_pem.as_ref() == Ok(key),
        "the key written as PEM reads back as {from_pem:?}"
    );
    let jwk = as_jwk(key);
    let from_jwk = Recipient::from_jwk(&jwk);
    check!(
        from_jwk.as_ref() == Ok(key),
        "the key written as a JWK reads back as {from_jwk:?}"
    );
    let fp = fingerprint(std::slice::from_ref(key));
    check!(
        fp == fingerprint(&[key.clone(), key.clone()]),
        "a repeated recipient changes the fingerprint"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = match mode % 3 {
        0 => Recipient::from_pem(&String::from_utf8_lossy(rest)),
        1 => match serde_json::from_slice::<serde_json::Value>(rest) {
            Ok(jwk) => Recipient::from_jwk(&jwk),
            Err(_) => return,
        },
        _ => {
            let body = base64::engine::general_purpose::STANDARD.encode(rest);
            let pem = format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n");
            Recipient::from_pem(&pem)
        }
    };
    match parsed {
        Ok(key) => check_key(&key),
        Err(e) => check!(!e.to_string().is_empty(), "an error without a message"),
    }
});
