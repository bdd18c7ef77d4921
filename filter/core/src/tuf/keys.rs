//! Public keys of TUF metadata (spec §4.2 "Key objects") and signature verification.
//!
//! Supported `keytype`/`scheme` pairs, as securesystemslib names them:
//! `ed25519`/`ed25519` (hex public key), `ecdsa`/`ecdsa-sha2-nistp256` and
//! `ecdsa`/`ecdsa-sha2-nistp384` (PEM SubjectPublicKeyInfo; the legacy keytypes
//! `ecdsa-sha2-nistp256`/`-nistp384` are accepted too; DER signatures), and `rsa` with
//! `rsassa-pss-sha256|384|512` or `rsa-pkcs1v15-sha256|384|512` (PEM, at least 2048 bits).
//! A key of another type parses but never verifies a signature: it cannot count toward a
//! threshold, and it does not make the metadata that lists it unreadable.

use p256::ecdsa::signature::Verifier as _;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, Pss, RsaPublicKey};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};

/// Smallest RSA modulus accepted (spec §4.2: "All RSA keys MUST be at least 2048 bits").
pub const MIN_RSA_BITS: usize = 2048;

/// A public key listed by root or by a delegating targets role.
#[derive(Clone, Debug)]
pub struct Key {
    keytype: String,
    scheme: String,
    verifier: Verifier,
}

#[derive(Clone, Debug)]
enum Verifier {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa {
        key: RsaPublicKey,
        padding: RsaPadding,
        hash: HashAlg,
    },
    Unusable(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RsaPadding {
    Pss,
    Pkcs1v15,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl Key {
    /// Read a key object. Fails only when the object lacks `keytype`, `scheme` or `keyval`;
    /// an unsupported type or an unreadable public key gives a key that verifies nothing.
    pub fn from_value(value: &Value) -> Result<Key, String> {
        let obj = value.as_object().ok_or("key is not an object")?;
        let keytype = obj
            .get("keytype")
            .and_then(Value::as_str)
            .ok_or("key has no string keytype")?;
        let scheme = obj
            .get("scheme")
            .and_then(Value::as_str)
            .ok_or("key has no string scheme")?;
        let keyval = obj
            .get("keyval")
            .and_then(Value::as_object)
            .ok_or("key has no keyval object")?;
        let public = keyval.get("public").and_then(Value::as_str);
        let verifier = match public {
            None => Verifier::Unusable("keyval has no string public".to_owned()),
            Some(public) => {
                parse_verifier(keytype, scheme, public).unwrap_or_else(Verifier::Unusable)
            }
        };
        Ok(Key {
            keytype: keytype.to_owned(),
            scheme: scheme.to_owned(),
            verifier,
        })
    }

    /// The key's `keytype`.
    pub fn keytype(&self) -> &str {
        &self.keytype
    }

    /// The key's `scheme`.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// Why the key cannot verify signatures, if it cannot.
    pub fn unusable_reason(&self) -> Option<&str> {
        match &self.verifier {
            Verifier::Unusable(reason) => Some(reason),
            _ => None,
        }
    }

    /// The key material in a normal form, so that one key listed under two keyids still counts
    /// once toward a threshold. `None` for unusable keys.
    pub fn identity(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match &self.verifier {
            Verifier::Ed25519(k) => {
                out.extend_from_slice(b"ed25519:");
                out.extend_from_slice(k.as_bytes());
            }
            Verifier::P256(k) => {
                out.extend_from_slice(b"p256:");
                out.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
            Verifier::P384(k) => {
                out.extend_from_slice(b"p384:");
                out.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
            Verifier::Rsa { key, .. } => {
                out.extend_from_slice(b"rsa:");
                out.extend_from_slice(&key.n().to_bytes_be());
                out.push(b':');
                out.extend_from_slice(&key.e().to_bytes_be());
            }
            Verifier::Unusable(_) => return None,
        }
        Some(out)
    }

    /// Whether `sig` is a valid signature of `message` by this key under its scheme.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match &self.verifier {
            Verifier::Ed25519(k) => ed25519_dalek::Signature::from_slice(sig)
                .map(|s| k.verify_strict(message, &s).is_ok())
                .unwrap_or(false),
            Verifier::P256(k) => p256::ecdsa::Signature::from_der(sig)
                .or_else(|_| p256::ecdsa::Signature::from_slice(sig))
                .map(|s| k.verify(message, &s).is_ok())
                .unwrap_or(false),
            Verifier::P384(k) => p384::ecdsa::Signature::from_der(sig)
                .or_else(|_| p384::ecdsa::Signature::from_slice(sig))
                .map(|s| k.verify(message, &s).is_ok())
                .unwrap_or(false),
            Verifier::Rsa { key, padding, hash } => verify_rsa(key, *padding, *hash, message, sig),
            Verifier::Unusable(_) => false,
        }
    }
}

fn parse_verifier(keytype: &str, scheme: &str, public: &str) -> Result<Verifier, String> {
    match (keytype, scheme) {
        ("ed25519", "ed25519") => {
            let raw = hex::decode(public.trim())
                .map_err(|e| format!("ed25519 public key is not hex: {e}"))?;
            let raw: [u8; 32] = raw
                .try_into()
                .map_err(|_| "ed25519 public key is not 32 bytes".to_owned())?;
            ed25519_dalek::VerifyingKey::from_bytes(&raw)
                .map(Verifier::Ed25519)
                .map_err(|e| format!("bad ed25519 public key: {e}"))
        }
        ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => {
            let public = public.trim();
            if public.starts_with("-----BEGIN") {
                p256::ecdsa::VerifyingKey::from_public_key_pem(public)
            } else {
                let raw = hex::decode(public)
                    .map_err(|e| format!("P-256 key is neither PEM nor hex: {e}"))?;
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&raw)
                    .map_err(|_| p256::pkcs8::spki::Error::KeyMalformed)
            }
            .map(Verifier::P256)
            .map_err(|e| format!("bad P-256 public key: {e}"))
        }
        ("ecdsa" | "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384") => {
            let public = public.trim();
            if public.starts_with("-----BEGIN") {
                p384::ecdsa::VerifyingKey::from_public_key_pem(public)
            } else {
                let raw = hex::decode(public)
                    .map_err(|e| format!("P-384 key is neither PEM nor hex: {e}"))?;
                p384::ecdsa::VerifyingKey::from_sec1_bytes(&raw)
                    .map_err(|_| p384::pkcs8::spki::Error::KeyMalformed)
            }
            .map(Verifier::P384)
            .map_err(|e| format!("bad P-384 public key: {e}"))
        }
        ("rsa", scheme) => {
            let (padding, hash) = match scheme {
                "rsassa-pss-sha256" => (RsaPadding::Pss, HashAlg::Sha256),
                "rsassa-pss-sha384" => (RsaPadding::Pss, HashAlg::Sha384),
                "rsassa-pss-sha512" => (RsaPadding::Pss, HashAlg::Sha512),
                "rsa-pkcs1v15-sha256" => (RsaPadding::Pkcs1v15, HashAlg::Sha256),
                "rsa-pkcs1v15-sha384" => (RsaPadding::Pkcs1v15, HashAlg::Sha384),
                "rsa-pkcs1v15-sha512" => (RsaPadding::Pkcs1v15, HashAlg::Sha512),
                other => return Err(format!("unsupported rsa scheme {other:?}")),
            };
            let public = public.trim();
            let key = RsaPublicKey::from_public_key_pem(public)
                .or_else(|_| RsaPublicKey::from_pkcs1_pem(public))
                .map_err(|e| format!("bad RSA public key: {e}"))?;
            if key.size() * 8 < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {} bits, fewer than {MIN_RSA_BITS}",
                    key.size() * 8
                ));
            }
            Ok(Verifier::Rsa { key, padding, hash })
        }
        (keytype, scheme) => Err(format!("unsupported keytype/scheme {keytype}/{scheme}")),
    }
}

fn verify_rsa(
    key: &RsaPublicKey,
    padding: RsaPadding,
    hash: HashAlg,
    message: &[u8],
    sig: &[u8],
) -> bool {
    let (hashed, h_len) = match hash {
        HashAlg::Sha256 => (Sha256::digest(message).to_vec(), 32),
        HashAlg::Sha384 => (Sha384::digest(message).to_vec(), 48),
        HashAlg::Sha512 => (Sha512::digest(message).to_vec(), 64),
    };
    match padding {
        RsaPadding::Pkcs1v15 => {
            let scheme = match hash {
                HashAlg::Sha256 => Pkcs1v15Sign::new::<Sha256>(),
                HashAlg::Sha384 => Pkcs1v15Sign::new::<Sha384>(),
                HashAlg::Sha512 => Pkcs1v15Sign::new::<Sha512>(),
            };
            key.verify(scheme, &hashed, sig).is_ok()
        }
        RsaPadding::Pss => {
            // securesystemslib verifies with PSS.AUTO: signers use the digest length (python-tuf,
            // cryptography's DIGEST_LENGTH) or the maximum (Go's PSSSaltLengthAuto). Try both.
            let em_len = (key.n().bits() + 6) / 8;
            let max_salt = em_len.saturating_sub(h_len + 2);
            [h_len, max_salt].iter().any(|&salt| {
                let scheme = match hash {
                    HashAlg::Sha256 => Pss::new_with_salt::<Sha256>(salt),
                    HashAlg::Sha384 => Pss::new_with_salt::<Sha384>(salt),
                    HashAlg::Sha512 => Pss::new_with_salt::<Sha512>(salt),
                };
                key.verify(scheme, &hashed, sig).is_ok()
            })
        }
    }
}
