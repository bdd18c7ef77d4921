//! Recipient key parsing: the PEM and JWK forms ocicrypt accepts for `jwe:` recipients, and
//! refusals that tell the operator what to supply instead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "crypto_fixtures.rs"]
mod fixtures;

use fixtures::*;
use ocicrypt_core::format::recipients::{Recipient, RecipientError};
use serde_json::json;

fn jwk(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn pkix_pem_of_every_supported_type() {
    for (pem, describe, alg) in [
        (RSA2048_PUBLIC_PKIX, "RSA-2048", "RSA-OAEP"),
        (RSA3072_PUBLIC_PKIX, "RSA-3072", "RSA-OAEP"),
        (P256_PUBLIC_PKIX, "EC P-256", "ECDH-ES+A256KW"),
        (P384_PUBLIC_PKIX, "EC P-384", "ECDH-ES+A256KW"),
        (P521_PUBLIC_PKIX, "EC P-521", "ECDH-ES+A256KW"),
    ] {
        let r = Recipient::from_pem(pem).unwrap_or_else(|e| panic!("{describe}: {e}"));
        assert_eq!(r.describe(), describe);
        assert_eq!(r.jwe_alg(), alg);
    }
}

#[test]
fn pem_framing_is_lenient_like_go() {
    let reference = Recipient::from_pem(P256_PUBLIC_PKIX).unwrap();
    let crlf = P256_PUBLIC_PKIX.replace('\n', "\r\n");
    let with_text = format!("# recipient for tribe-a\n\n{P256_PUBLIC_PKIX}\ntrailing words\n");
    let body: String = P256_PUBLIC_PKIX
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    let one_line = format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----");
    let indented = format!("   {}", P256_PUBLIC_PKIX.trim());
    for variant in [crlf, with_text, one_line, indented] {
        assert_eq!(
            Recipient::from_pem(&variant).unwrap(),
            reference,
            "{variant}"
        );
    }
}

#[test]
fn pem_refusals_say_what_to_do() {
    let e = Recipient::from_pem(RSA2048_PUBLIC_PKCS1).unwrap_err();
    assert_eq!(e, RecipientError::Pkcs1);
    assert!(e.to_string().contains("PKIX public key"), "{e}");

    let e = Recipient::from_pem(P256_CERTIFICATE).unwrap_err();
    assert_eq!(e, RecipientError::Certificate);
    assert!(e.to_string().contains("PKIX public key"), "{e}");

    let e = Recipient::from_pem(P256_PRIVATE_PKCS8).unwrap_err();
    assert!(
        matches!(e, RecipientError::PrivateKey(ref l) if l == "PRIVATE KEY"),
        "{e}"
    );
    assert!(e.to_string().contains("only public keys"), "{e}");

    assert_eq!(
        Recipient::from_pem(RSA1024_PUBLIC_PKIX).unwrap_err(),
        RecipientError::RsaSize(1024)
    );
    assert_eq!(
        Recipient::from_pem(RSA8192_PUBLIC_PKIX).unwrap_err(),
        RecipientError::RsaSize(8192)
    );
    assert!(matches!(
        Recipient::from_pem(SECP256K1_PUBLIC_PKIX).unwrap_err(),
        RecipientError::Curve(c) if c.contains("secp256k1")
    ));
    assert!(matches!(
        Recipient::from_pem(ED25519_PUBLIC_PKIX).unwrap_err(),
        RecipientError::Algorithm(a) if a.contains("Ed25519")
    ));
    assert_eq!(
        Recipient::from_pem("not a key").unwrap_err(),
        RecipientError::NotPem
    );
    assert_eq!(
        Recipient::from_pem(&format!("{P256_PUBLIC_PKIX}{P384_PUBLIC_PKIX}")).unwrap_err(),
        RecipientError::MultiplePem(2)
    );
    let encrypted =
        "-----BEGIN PUBLIC KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END PUBLIC KEY-----\n";
    assert!(matches!(
        Recipient::from_pem(encrypted),
        Err(RecipientError::PemMalformed(_))
    ));
    let unterminated = P256_PUBLIC_PKIX.replace("-----END PUBLIC KEY-----", "");
    assert!(matches!(
        Recipient::from_pem(&unterminated),
        Err(RecipientError::PemMalformed(_))
    ));
    let not_b64 = "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n";
    assert!(matches!(
        Recipient::from_pem(not_b64),
        Err(RecipientError::PemMalformed(_))
    ));
    let not_spki = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    assert!(matches!(
        Recipient::from_pem(not_spki),
        Err(RecipientError::Spki(_))
    ));
    let other = "-----BEGIN SOMETHING-----\nAAAA\n-----END SOMETHING-----\n";
    assert!(matches!(
        Recipient::from_pem(other),
        Err(RecipientError::PemLabel(_))
    ));
}

#[test]
fn jwk_equals_the_same_key_as_pem() {
    for (j, pem) in [
        (RSA2048_PUBLIC_JWK, RSA2048_PUBLIC_PKIX),
        (RSA3072_PUBLIC_JWK, RSA3072_PUBLIC_PKIX),
        (P256_PUBLIC_JWK, P256_PUBLIC_PKIX),
        (P384_PUBLIC_JWK, P384_PUBLIC_PKIX),
        (P521_PUBLIC_JWK, P521_PUBLIC_PKIX),
    ] {
        assert_eq!(
            Recipient::from_jwk(&jwk(j)).unwrap(),
            Recipient::from_pem(pem).unwrap()
        );
    }
}

#[test]
fn jwk_alg_must_match_what_the_gateway_uses() {
    let mut rsa = jwk(RSA2048_PUBLIC_JWK);
    rsa["alg"] = json!("RSA-OAEP");
    rsa["use"] = json!("enc");
    rsa["kid"] = json!("tribe-a-2024");
    assert!(Recipient::from_jwk(&rsa).is_ok());
    rsa["alg"] = json!("RSA-OAEP-256");
    assert_eq!(
        Recipient::from_jwk(&rsa).unwrap_err(),
        RecipientError::JwkAlg {
            kty: "RSA",
            found: "RSA-OAEP-256".into(),
            expected: "RSA-OAEP"
        }
    );

    let mut ec = jwk(P384_PUBLIC_JWK);
    ec["alg"] = json!("ECDH-ES+A256KW");
    assert_eq!(Recipient::from_jwk(&ec).unwrap().describe(), "EC P-384");
    ec["alg"] = json!("ECDH-ES");
    assert!(matches!(
        Recipient::from_jwk(&ec),
        Err(RecipientError::JwkAlg { kty: "EC", .. })
    ));
    ec["alg"] = json!(7);
    assert!(matches!(
        Recipient::from_jwk(&ec),
        Err(RecipientError::JwkAlg { .. })
    ));
}

#[test]
fn jwk_refusals() {
    let e = Recipient::from_jwk(&jwk(P256_PRIVATE_JWK)).unwrap_err();
    assert_eq!(e, RecipientError::JwkPrivate("d"));
    assert!(e.to_string().contains("only public keys"), "{e}");
    let mut rsa_private = jwk(RSA2048_PUBLIC_JWK);
    rsa_private["p"] = json!("AQAB");
    assert_eq!(
        Recipient::from_jwk(&rsa_private).unwrap_err(),
        RecipientError::JwkPrivate("p")
    );

    assert_eq!(
        Recipient::from_jwk(&json!({"kty": "oct", "k": "AAAA"})).unwrap_err(),
        RecipientError::JwkPrivate("k")
    );
    assert_eq!(
        Recipient::from_jwk(&json!({"kty": "OKP", "crv": "X25519", "x": "AAAA"})).unwrap_err(),
        RecipientError::JwkKty("OKP".into())
    );
    assert_eq!(
        Recipient::from_jwk(&json!("RSA")).unwrap_err(),
        RecipientError::JwkNotObject
    );
    assert_eq!(
        Recipient::from_jwk(&json!({})).unwrap_err(),
        RecipientError::JwkMember("kty")
    );

    let mut no_y = jwk(P256_PUBLIC_JWK);
    no_y.as_object_mut().unwrap().remove("y");
    assert_eq!(
        Recipient::from_jwk(&no_y).unwrap_err(),
        RecipientError::JwkMember("y")
    );
    let mut bad_b64 = jwk(P256_PUBLIC_JWK);
    bad_b64["x"] = json!("not*base64");
    assert_eq!(
        Recipient::from_jwk(&bad_b64).unwrap_err(),
        RecipientError::JwkBase64("x")
    );
    let mut off_curve = jwk(P256_PUBLIC_JWK);
    off_curve["y"] = off_curve["x"].clone();
    assert!(matches!(
        Recipient::from_jwk(&off_curve),
        Err(RecipientError::Invalid { kind: "EC", .. })
    ));
    let mut p192 = jwk(P256_PUBLIC_JWK);
    p192["crv"] = json!("P-192");
    assert_eq!(
        Recipient::from_jwk(&p192).unwrap_err(),
        RecipientError::Curve("P-192".into())
    );

    // A 1024-bit modulus (128 bytes of 0xff), e = 65537.
    use base64::Engine as _;
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 128]);
    let small = json!({"kty": "RSA", "n": n, "e": "AQAB"});
    assert_eq!(
        Recipient::from_jwk(&small).unwrap_err(),
        RecipientError::RsaSize(1024)
    );
}

#[test]
fn describe_and_debug_forms() {
    let r = Recipient::from_jwk(&jwk(RSA2048_PUBLIC_JWK)).unwrap();
    let d = r.describe();
    assert_eq!(d, "RSA-2048");
    let cloned = r.clone();
    assert_eq!(cloned, r);
    assert!(!format!("{r:?}").is_empty());
}
