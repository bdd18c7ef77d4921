//! The two layer annotations: public options (cipher, HMAC) and the layer key wrapped in one
//! JWE (RFC 7516) for all recipients, shaped as go-jose's `FullSerialize` emits it for
//! containers/ocicrypt:
//!
//! - content encryption `A256GCM`, AAD = ASCII of the base64url protected header;
//! - `RSA-OAEP` (SHA-1, MGF1-SHA-1) for RSA recipients, `ECDH-ES+A256KW` (Concat KDF with
//!   SHA-256, RFC 7518 §4.6) for EC recipients;
//! - one recipient: flattened JSON with `alg` (and `epk`) in the protected header; several:
//!   general JSON with protected `{"enc":"A256GCM"}` and per-recipient unprotected headers.
//!
//! [`unwrap_private_options`] is the reverse, for tests and tooling: the gateway never holds
//! private keys.

use crate::format::blockcipher::EncryptedLayer;
use crate::format::recipients::{pem_decode, PemError, Recipient, B64URL};
use crate::format::sha256::Sha256State;
use crate::spec::{ANNOTATION_KEYS_JWE, ANNOTATION_PUBOPTS, CIPHER_AES_256_CTR_HMAC_SHA256};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ModulusSize, ToEncodedPoint};
use p256::elliptic_curve::{AffinePoint, CurveArithmetic, FieldBytesSize};
use rand_core::CryptoRngCore;
use serde::Serialize;
use std::collections::BTreeMap;
use zeroize::{Zeroize, Zeroizing};

const ENC_A256GCM: &str = "A256GCM";
const ALG_RSA_OAEP: &str = "RSA-OAEP";
const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
const ALG_ECDH_ES_A128KW: &str = "ECDH-ES+A128KW";
const ALG_ECDH_ES_A192KW: &str = "ECDH-ES+A192KW";
const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;

/// Why wrapping or unwrapping a layer key failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyWrapError {
    /// Encrypting to nobody would make the layer undecryptable.
    #[error("no recipients: refusing to encrypt a layer nobody could decrypt")]
    NoRecipients,
    /// RSA-OAEP encryption or decryption failed.
    #[error("RSA-OAEP with {key} failed: {reason}")]
    Rsa {
        /// Key description.
        key: String,
        /// Library error.
        reason: String,
    },
    /// AES key wrap (RFC 3394) failed, e.g. integrity check on unwrap.
    #[error("AES key wrap ({alg}) failed: {reason}")]
    KeyWrap {
        /// JWE `alg`.
        alg: &'static str,
        /// Library error.
        reason: String,
    },
    /// AES-GCM content encryption or authentication failed.
    #[error("A256GCM content {0} failed")]
    Aead(&'static str),
    /// The ephemeral EC key had no affine coordinates (cannot happen for a random scalar).
    #[error("ephemeral {0} public key has no affine coordinates")]
    EphemeralPoint(&'static str),
    /// JSON (de)serialization failed.
    #[error("JSON: {0}")]
    Json(String),
    /// The JWE is not well-formed RFC 7516 JSON serialization.
    #[error("malformed JWE: {0}")]
    Malformed(String),
    /// A JWE feature this implementation does not decrypt.
    #[error("unsupported JWE {member} {value:?}")]
    Unsupported {
        /// Header member.
        member: &'static str,
        /// Value found.
        value: String,
    },
    /// No recipient entry could be decrypted with the given key.
    #[error("none of the {recipients} JWE recipient entries decrypts with the {key} key")]
    NoMatchingRecipient {
        /// Recipient entries in the JWE.
        recipients: usize,
        /// Description of the private key tried.
        key: String,
    },
    /// The private key PEM is unusable.
    #[error("private key: {0}")]
    PrivateKey(String),
    /// The decrypted private options are not ocicrypt's JSON.
    #[error("private options: {0}")]
    Options(String),
}

/// A private key for [`unwrap_private_options`] (tests and tooling only).
#[derive(Clone)]
pub enum PrivateKey {
    /// RSA private key (boxed: it is several times larger than the EC keys).
    Rsa(Box<rsa::RsaPrivateKey>),
    /// P-256 private key.
    P256(p256::SecretKey),
    /// P-384 private key.
    P384(p384::SecretKey),
    /// P-521 private key.
    P521(p521::SecretKey),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({})", self.public().describe())
    }
}

impl PrivateKey {
    /// Parses an unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) holding an RSA or
    /// P-256/P-384/P-521 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<PrivateKey, KeyWrapError> {
        use rsa::pkcs8::DecodePrivateKey as _;
        let block = pem_decode(pem).map_err(|e| {
            KeyWrapError::PrivateKey(match e {
                PemError::NotPem => "no PEM block found".to_string(),
                PemError::Multiple(n) => format!("{n} PEM blocks found, expected one"),
                PemError::Malformed(m) => m,
            })
        })?;
        if block.label != "PRIVATE KEY" {
            return Err(KeyWrapError::PrivateKey(format!(
                "PEM type {:?}: expected unencrypted PKCS#8 (-----BEGIN PRIVATE KEY-----), \
                 e.g. `openssl pkcs8 -topk8 -nocrypt -in key.pem`",
                block.label
            )));
        }
        let der: &[u8] = &block.der;
        let info = rsa::pkcs8::PrivateKeyInfo::try_from(der)
            .map_err(|e| KeyWrapError::PrivateKey(format!("not PKCS#8: {e}")))?;
        let bad = |e: rsa::pkcs8::Error| KeyWrapError::PrivateKey(e.to_string());
        match info.algorithm.oid.to_string().as_str() {
            "1.2.840.113549.1.1.1" => Ok(PrivateKey::Rsa(Box::new(
                rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(bad)?,
            ))),
            "1.2.840.10045.2.1" => {
                let curve = info
                    .algorithm
                    .parameters_oid()
                    .map_err(|e| KeyWrapError::PrivateKey(format!("EC key without curve: {e}")))?
                    .to_string();
                match curve.as_str() {
                    "1.2.840.10045.3.1.7" => Ok(PrivateKey::P256(
                        p256::SecretKey::from_pkcs8_der(der).map_err(bad)?,
                    )),
                    "1.3.132.0.34" => Ok(PrivateKey::P384(
                        p384::SecretKey::from_pkcs8_der(der).map_err(bad)?,
                    )),
                    "1.3.132.0.35" => Ok(PrivateKey::P521(
                        p521::SecretKey::from_pkcs8_der(der).map_err(bad)?,
                    )),
                    other => Err(KeyWrapError::PrivateKey(format!(
                        "unsupported curve {other}"
                    ))),
                }
            }
            other => Err(KeyWrapError::PrivateKey(format!(
                "unsupported algorithm {other}"
            ))),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> Recipient {
        match self {
            PrivateKey::Rsa(k) => Recipient::Rsa(k.to_public_key()),
            PrivateKey::P256(k) => Recipient::P256(k.public_key()),
            PrivateKey::P384(k) => Recipient::P384(k.public_key()),
            PrivateKey::P521(k) => Recipient::P521(k.public_key()),
        }
    }
}

/// The decrypted JWE plaintext: what a runtime needs to decrypt the layer.
#[derive(Clone)]
pub struct PrivateOptions {
    /// AES-256 and HMAC key.
    pub symkey: Zeroizing<[u8; 32]>,
    /// Initial counter block.
    pub nonce: [u8; 16],
    /// Plaintext blob digest as written (`sha256:<hex>`).
    pub digest: String,
}

impl std::fmt::Debug for PrivateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateOptions")
            .field("digest", &self.digest)
            .field("symkey", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The `org.opencontainers.image.enc.pubopts` and `…enc.keys.jwe` annotations for `layer`,
/// its key wrapped to every recipient in one JWE.
pub fn layer_annotations<R: CryptoRngCore>(
    layer: &EncryptedLayer,
    recipients: &[Recipient],
    rng: &mut R,
) -> Result<BTreeMap<String, String>, KeyWrapError> {
    if recipients.is_empty() {
        return Err(KeyWrapError::NoRecipients);
    }
    let private = private_options_json(layer)?;
    let jwe = encrypt_jwe(&private, recipients, rng)?;
    let mut out = BTreeMap::new();
    out.insert(
        ANNOTATION_PUBOPTS.to_string(),
        STANDARD.encode(public_options_json(&layer.hmac)),
    );
    out.insert(ANNOTATION_KEYS_JWE.to_string(), STANDARD.encode(jwe));
    Ok(out)
}

/// Go's `json.Marshal` of ocicrypt's `PublicLayerBlockCipherOptions`: struct field order,
/// `[]byte` as padded standard base64, an empty non-nil map.
fn public_options_json(hmac: &[u8; 32]) -> String {
    format!(
        "{{\"cipher\":\"{CIPHER_AES_256_CTR_HMAC_SHA256}\",\"hmac\":\"{}\",\"cipheroptions\":{{}}}}",
        STANDARD.encode(hmac)
    )
}

/// Go's `json.Marshal` of `PrivateLayerBlockCipherOptions`, built in one pre-sized buffer so no
/// reallocation leaves a copy of the key behind.
fn private_options_json(layer: &EncryptedLayer) -> Result<Zeroizing<Vec<u8>>, KeyWrapError> {
    let digest = layer.plaintext_digest.to_string();
    // 32 bytes are always 44 padded base64 characters.
    let mut key_b64 = Zeroizing::new([0u8; 44]);
    let key_len = STANDARD
        .encode_slice(layer.symkey.as_slice(), &mut *key_b64)
        .map_err(|e| KeyWrapError::Json(format!("symkey base64: {e}")))?;
    let nonce_b64 = STANDARD.encode(layer.nonce);
    let mut out = Zeroizing::new(Vec::with_capacity(256));
    out.extend_from_slice(b"{\"symkey\":\"");
    out.extend_from_slice(key_b64.get(..key_len).unwrap_or_default());
    out.extend_from_slice(b"\",\"digest\":\"");
    out.extend_from_slice(digest.as_bytes());
    out.extend_from_slice(b"\",\"cipheroptions\":{\"nonce\":\"");
    out.extend_from_slice(nonce_b64.as_bytes());
    out.extend_from_slice(b"\"}}");
    Ok(out)
}

/// EC public key as go-jose writes `epk`: members in this order, coordinates full length.
#[derive(Serialize)]
struct EpkJwk {
    kty: &'static str,
    crv: &'static str,
    x: String,
    y: String,
}

/// A JOSE header; go-jose marshals headers as a map, hence alphabetical member order.
#[derive(Serialize)]
struct Header<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    alg: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enc: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epk: Option<&'a EpkJwk>,
}

#[derive(Serialize)]
struct RecipientEntry<'a> {
    header: Header<'a>,
    encrypted_key: String,
}

/// Top level in go-jose's member order.
#[derive(Serialize)]
struct JweJson<'a> {
    protected: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<Vec<RecipientEntry<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted_key: Option<String>,
    iv: String,
    ciphertext: String,
    tag: String,
}

struct WrappedKey {
    alg: &'static str,
    epk: Option<EpkJwk>,
    encrypted_key: Vec<u8>,
}

fn encrypt_jwe<R: CryptoRngCore>(
    plaintext: &[u8],
    recipients: &[Recipient],
    rng: &mut R,
) -> Result<Vec<u8>, KeyWrapError> {
    let mut cek = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut *cek);
    let mut iv = [0u8; GCM_IV_LEN];
    rng.fill_bytes(&mut iv);
    let wrapped = recipients
        .iter()
        .map(|r| wrap_cek(r, &cek, rng))
        .collect::<Result<Vec<_>, _>>()?;

    let (protected, recipient_entries, encrypted_key) = match wrapped.as_slice() {
        [only] => {
            let header = Header {
                alg: Some(only.alg),
                enc: Some(ENC_A256GCM),
                epk: only.epk.as_ref(),
            };
            (
                to_json(&header)?,
                None,
                Some(B64URL.encode(&only.encrypted_key)),
            )
        }
        several => {
            let header = Header {
                alg: None,
                enc: Some(ENC_A256GCM),
                epk: None,
            };
            let entries = several
                .iter()
                .map(|w| RecipientEntry {
                    header: Header {
                        alg: Some(w.alg),
                        enc: None,
                        epk: w.epk.as_ref(),
                    },
                    encrypted_key: B64URL.encode(&w.encrypted_key),
                })
                .collect();
            (to_json(&header)?, Some(entries), None)
        }
    };
    let protected = B64URL.encode(protected);

    let mut buffer = Zeroizing::new(plaintext.to_vec());
    let tag = Aes256Gcm::new((&*cek).into())
        .encrypt_in_place_detached((&iv).into(), protected.as_bytes(), &mut buffer)
        .map_err(|_| KeyWrapError::Aead("encryption"))?;
    let jwe = JweJson {
        protected,
        recipients: recipient_entries,
        encrypted_key,
        iv: B64URL.encode(iv),
        ciphertext: B64URL.encode(&*buffer),
        tag: B64URL.encode(tag),
    };
    serde_json::to_vec(&jwe).map_err(|e| KeyWrapError::Json(e.to_string()))
}

type JsonObject = serde_json::Map<String, serde_json::Value>;

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, KeyWrapError> {
    serde_json::to_vec(value).map_err(|e| KeyWrapError::Json(e.to_string()))
}

fn wrap_cek<R: CryptoRngCore>(
    recipient: &Recipient,
    cek: &[u8; 32],
    rng: &mut R,
) -> Result<WrappedKey, KeyWrapError> {
    match recipient {
        Recipient::Rsa(key) => {
            let encrypted_key = key
                .encrypt(rng, rsa::Oaep::new::<sha1::Sha1>(), cek)
                .map_err(|e| KeyWrapError::Rsa {
                    key: recipient.describe(),
                    reason: e.to_string(),
                })?;
            Ok(WrappedKey {
                alg: ALG_RSA_OAEP,
                epk: None,
                encrypted_key,
            })
        }
        Recipient::P256(key) => ecdh_es_a256kw(key, "P-256", cek, rng),
        Recipient::P384(key) => ecdh_es_a256kw(key, "P-384", cek, rng),
        Recipient::P521(key) => ecdh_es_a256kw(key, "P-521", cek, rng),
    }
}

fn ecdh_es_a256kw<C, R>(
    recipient: &p256::elliptic_curve::PublicKey<C>,
    crv: &'static str,
    cek: &[u8; 32],
    rng: &mut R,
) -> Result<WrappedKey, KeyWrapError>
where
    C: CurveArithmetic,
    FieldBytesSize<C>: ModulusSize,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
    R: CryptoRngCore,
{
    let ephemeral = p256::elliptic_curve::ecdh::EphemeralSecret::<C>::random(rng);
    let shared = ephemeral.diffie_hellman(recipient);
    let kek = concat_kdf(shared.raw_secret_bytes(), ALG_ECDH_ES_A256KW, &[], &[], 32);
    let mut wrapped = vec![0u8; cek.len() + 8];
    aes_kw_wrap(&kek, cek, &mut wrapped)?;
    let point = ephemeral.public_key().to_encoded_point(false);
    let (x, y) = point
        .x()
        .zip(point.y())
        .ok_or(KeyWrapError::EphemeralPoint(crv))?;
    let epk = EpkJwk {
        kty: "EC",
        crv,
        x: B64URL.encode(x),
        y: B64URL.encode(y),
    };
    Ok(WrappedKey {
        alg: ALG_ECDH_ES_A256KW,
        epk: Some(epk),
        encrypted_key: wrapped,
    })
}

fn aes_kw_wrap(kek: &[u8], cek: &[u8], out: &mut [u8]) -> Result<(), KeyWrapError> {
    let fail = |e: aes_kw::Error| KeyWrapError::KeyWrap {
        alg: ALG_ECDH_ES_A256KW,
        reason: e.to_string(),
    };
    aes_kw::KekAes256::try_from(kek)
        .map_err(fail)?
        .wrap(cek, out)
        .map_err(fail)
}

/// Concat KDF (NIST SP 800-56A §5.8.1) with SHA-256 as RFC 7518 §4.6.2 instantiates it:
/// OtherInfo = AlgorithmID ‖ PartyUInfo ‖ PartyVInfo (each length-prefixed) ‖ keydatalen in
/// bits. `key_len` ≤ 32, so a single round suffices.
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], key_len: usize) -> Zeroizing<Vec<u8>> {
    let mut h = Sha256State::new();
    h.update(&1u32.to_be_bytes());
    h.update(z);
    for field in [alg.as_bytes(), apu, apv] {
        h.update(&(field.len() as u32).to_be_bytes());
        h.update(field);
    }
    h.update(&((key_len * 8) as u32).to_be_bytes());
    let mut digest = h.finalize();
    let out = Zeroizing::new(digest.get(..key_len).unwrap_or_default().to_vec());
    digest.zeroize();
    out
}

/// Decrypts a JWE produced by [`layer_annotations`] (or by ocicrypt/go-jose: flattened or
/// general JSON, `A256GCM`, `RSA-OAEP`/`RSA-OAEP-256`/`ECDH-ES+A{128,192,256}KW`) with
/// `key` and parses the private options. `jwe_json` is the JWE JSON text (the annotation value
/// after base64 decoding).
///
/// Tests and tooling only: the `rsa` crate's decryption is not hardened against timing side
/// channels.
pub fn unwrap_private_options(
    jwe_json: &[u8],
    key: &PrivateKey,
) -> Result<PrivateOptions, KeyWrapError> {
    use serde_json::{Map, Value};
    let malformed = |m: &str| KeyWrapError::Malformed(m.to_string());
    let top: Value =
        serde_json::from_slice(jwe_json).map_err(|e| KeyWrapError::Malformed(e.to_string()))?;
    let top = top
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    let b64_member = |obj: &Map<String, Value>, name: &str| -> Result<Vec<u8>, KeyWrapError> {
        let s = obj
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| KeyWrapError::Malformed(format!("{name} missing or not a string")))?;
        B64URL
            .decode(s)
            .map_err(|_| KeyWrapError::Malformed(format!("{name} is not base64url")))
    };

    let protected_b64 = top.get("protected").and_then(Value::as_str).unwrap_or("");
    let protected: Map<String, Value> = if protected_b64.is_empty() {
        Map::new()
    } else {
        let raw = B64URL
            .decode(protected_b64)
            .map_err(|_| malformed("protected is not base64url"))?;
        serde_json::from_slice(&raw)
            .map_err(|e| KeyWrapError::Malformed(format!("protected header: {e}")))?
    };
    let empty = Map::new();
    let unprotected = top
        .get("unprotected")
        .and_then(Value::as_object)
        .unwrap_or(&empty);

    // (header of the entry, the entry holding its encrypted_key)
    let entries: Vec<(&JsonObject, &JsonObject)> = match top.get("recipients") {
        Some(list) => list
            .as_array()
            .ok_or_else(|| malformed("recipients is not an array"))?
            .iter()
            .map(|r| {
                let r = r
                    .as_object()
                    .ok_or_else(|| malformed("recipient is not an object"))?;
                Ok((
                    r.get("header").and_then(Value::as_object).unwrap_or(&empty),
                    r,
                ))
            })
            .collect::<Result<_, KeyWrapError>>()?,
        None => vec![(
            top.get("header")
                .and_then(Value::as_object)
                .unwrap_or(&empty),
            top,
        )],
    };

    let shared_member = |name: &str| protected.get(name).or_else(|| unprotected.get(name));
    let enc = shared_member("enc").and_then(Value::as_str).unwrap_or("");
    if enc != ENC_A256GCM {
        return Err(KeyWrapError::Unsupported {
            member: "enc",
            value: enc.to_string(),
        });
    }
    if let Some(zip) = shared_member("zip") {
        return Err(KeyWrapError::Unsupported {
            member: "zip",
            value: zip.to_string(),
        });
    }
    let iv = b64_member(top, "iv")?;
    let tag = b64_member(top, "tag")?;
    let ciphertext = b64_member(top, "ciphertext")?;
    if iv.len() != GCM_IV_LEN || tag.len() != GCM_TAG_LEN {
        return Err(KeyWrapError::Malformed(format!(
            "iv is {} bytes and tag {} bytes, A256GCM needs {GCM_IV_LEN} and {GCM_TAG_LEN}",
            iv.len(),
            tag.len()
        )));
    }
    let aad = match top.get("aad").and_then(Value::as_str) {
        Some(extra) => format!("{protected_b64}.{extra}"),
        None => protected_b64.to_string(),
    };

    for (header, entry) in &entries {
        let member = |name: &str| header.get(name).or_else(|| shared_member(name));
        let Ok(encrypted_key) = b64_member(entry, "encrypted_key") else {
            continue;
        };
        let Ok(cek) = unwrap_cek(key, &member, &encrypted_key) else {
            continue;
        };
        if cek.len() != 32 {
            continue;
        }
        let mut buffer = Zeroizing::new(ciphertext.clone());
        let opened = Aes256Gcm::new(cek.as_slice().into()).decrypt_in_place_detached(
            iv.as_slice().into(),
            aad.as_bytes(),
            &mut buffer,
            tag.as_slice().into(),
        );
        if opened.is_ok() {
            return parse_private_options(&buffer);
        }
    }
    Err(KeyWrapError::NoMatchingRecipient {
        recipients: entries.len(),
        key: key.public().describe(),
    })
}

fn unwrap_cek<'a>(
    key: &PrivateKey,
    member: &dyn Fn(&str) -> Option<&'a serde_json::Value>,
    encrypted_key: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyWrapError> {
    let alg = member("alg").and_then(|v| v.as_str()).unwrap_or("");
    let unsupported = || KeyWrapError::Unsupported {
        member: "alg",
        value: alg.to_string(),
    };
    match (alg, key) {
        (ALG_RSA_OAEP | ALG_RSA_OAEP_256, PrivateKey::Rsa(k)) => {
            let padding = if alg == ALG_RSA_OAEP {
                rsa::Oaep::new::<sha1::Sha1>()
            } else {
                rsa::Oaep::new::<sha2::Sha256>()
            };
            k.decrypt(padding, encrypted_key)
                .map(Zeroizing::new)
                .map_err(|e| KeyWrapError::Rsa {
                    key: key.public().describe(),
                    reason: e.to_string(),
                })
        }
        (ALG_ECDH_ES_A128KW | ALG_ECDH_ES_A192KW | ALG_ECDH_ES_A256KW, _) => {
            let kek_len = match alg {
                ALG_ECDH_ES_A128KW => 16,
                ALG_ECDH_ES_A192KW => 24,
                _ => 32,
            };
            let epk = member("epk").ok_or_else(|| KeyWrapError::Malformed("epk missing".into()))?;
            let epk = Recipient::from_jwk(epk)
                .map_err(|e| KeyWrapError::Malformed(format!("epk: {e}")))?;
            let optional_b64 = |name: &str| -> Result<Vec<u8>, KeyWrapError> {
                member(name)
                    .and_then(|v| v.as_str())
                    .map_or(Ok(Vec::new()), |s| {
                        B64URL
                            .decode(s)
                            .map_err(|_| KeyWrapError::Malformed(format!("{name} not base64url")))
                    })
            };
            let (apu, apv) = (optional_b64("apu")?, optional_b64("apv")?);
            let z: Zeroizing<Vec<u8>> = match (key, &epk) {
                (PrivateKey::P256(sk), Recipient::P256(pk)) => Zeroizing::new(
                    p256::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                        .raw_secret_bytes()
                        .to_vec(),
                ),
                (PrivateKey::P384(sk), Recipient::P384(pk)) => Zeroizing::new(
                    p384::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                        .raw_secret_bytes()
                        .to_vec(),
                ),
                (PrivateKey::P521(sk), Recipient::P521(pk)) => Zeroizing::new(
                    p521::ecdh::diffie_hellman(sk.to_nonzero_scalar(), pk.as_affine())
                        .raw_secret_bytes()
                        .to_vec(),
                ),
                _ => return Err(unsupported()),
            };
            let alg_static = match alg {
                ALG_ECDH_ES_A128KW => ALG_ECDH_ES_A128KW,
                ALG_ECDH_ES_A192KW => ALG_ECDH_ES_A192KW,
                _ => ALG_ECDH_ES_A256KW,
            };
            let kek = concat_kdf(&z, alg_static, &apu, &apv, kek_len);
            let mut cek = Zeroizing::new(vec![0u8; encrypted_key.len().saturating_sub(8)]);
            let fail = |e: aes_kw::Error| KeyWrapError::KeyWrap {
                alg: alg_static,
                reason: e.to_string(),
            };
            match kek_len {
                16 => aes_kw::KekAes128::try_from(kek.as_slice())
                    .map_err(fail)?
                    .unwrap(encrypted_key, &mut cek),
                24 => aes_kw::KekAes192::try_from(kek.as_slice())
                    .map_err(fail)?
                    .unwrap(encrypted_key, &mut cek),
                _ => aes_kw::KekAes256::try_from(kek.as_slice())
                    .map_err(fail)?
                    .unwrap(encrypted_key, &mut cek),
            }
            .map_err(fail)?;
            Ok(cek)
        }
        _ => Err(unsupported()),
    }
}

/// ocicrypt's private options JSON; `cipheroptions` is Go's `map[string][]byte`.
#[derive(serde::Deserialize)]
struct PrivateOptionsJson {
    symkey: String,
    digest: String,
    cipheroptions: BTreeMap<String, String>,
}

fn parse_private_options(plaintext: &[u8]) -> Result<PrivateOptions, KeyWrapError> {
    let mut parsed: PrivateOptionsJson =
        serde_json::from_slice(plaintext).map_err(|e| KeyWrapError::Options(e.to_string()))?;
    let symkey = STANDARD
        .decode(parsed.symkey.as_bytes())
        .map(Zeroizing::new);
    parsed.symkey.zeroize();
    let symkey = symkey.map_err(|_| KeyWrapError::Options("symkey is not base64".into()))?;
    if symkey.len() != 32 {
        return Err(KeyWrapError::Options(format!(
            "symkey is {} bytes, expected 32",
            symkey.len()
        )));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&symkey);
    let nonce_b64 = parsed
        .cipheroptions
        .get("nonce")
        .ok_or_else(|| KeyWrapError::Options("cipheroptions.nonce missing".into()))?;
    let nonce = STANDARD
        .decode(nonce_b64)
        .map_err(|_| KeyWrapError::Options("nonce is not base64".into()))?;
    let nonce: [u8; 16] = nonce.as_slice().try_into().map_err(|_| {
        KeyWrapError::Options(format!("nonce is {} bytes, expected 16", nonce.len()))
    })?;
    Ok(PrivateOptions {
        symkey: key,
        nonce,
        digest: parsed.digest,
    })
}
