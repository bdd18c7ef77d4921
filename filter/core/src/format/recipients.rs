//! Recipient public keys, in the forms ocicrypt accepts for `jwe:` recipients: PKIX PEM
//! (`-----BEGIN PUBLIC KEY-----`) and public JWK. RSA keys get `RSA-OAEP`, EC keys on P-256,
//! P-384 and P-521 get `ECDH-ES+A256KW` (see [`crate::format::keywrap`]).

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use rsa::pkcs1::der::Decode as _;
use rsa::pkcs8::spki::SubjectPublicKeyInfoRef;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use zeroize::Zeroizing;

/// RSA moduli outside this range are refused: below is too weak, above is more than the `rsa`
/// crate (and most runtimes' key handling) is built for.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 4096;

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_P521: &str = "1.3.132.0.35";

/// Members that only a private JWK carries (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
const JWK_PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Base64url as RFC 7518 prescribes (no padding), tolerating padding on input because some
/// JWK producers add it.
pub(crate) const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A key that layer keys are wrapped to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipient {
    /// RSA public key, 2048 to 4096 bits; wrapped with RSA-OAEP (SHA-1), as ocicrypt does.
    Rsa(rsa::RsaPublicKey),
    /// NIST P-256 public key; wrapped with ECDH-ES+A256KW.
    P256(p256::PublicKey),
    /// NIST P-384 public key; wrapped with ECDH-ES+A256KW.
    P384(p384::PublicKey),
    /// NIST P-521 public key; wrapped with ECDH-ES+A256KW.
    P521(p521::PublicKey),
}

/// Why a recipient key was refused. Messages say what to supply instead.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecipientError {
    /// No `-----BEGIN …-----` line.
    #[error("no PEM block found: expected a PKIX public key (-----BEGIN PUBLIC KEY-----)")]
    NotPem,
    /// PEM framing or base64 body is broken.
    #[error("malformed PEM: {0}")]
    PemMalformed(String),
    /// More than one PEM block; ocicrypt would silently use the first.
    #[error("{0} PEM blocks found: give exactly one public key per recipient entry")]
    MultiplePem(usize),
    /// PKCS#1 `RSA PUBLIC KEY`, which ocicrypt refuses.
    #[error(
        "PKCS#1 \"RSA PUBLIC KEY\" is not accepted (ocicrypt refuses it too): use a PKIX public key, \
         e.g. `openssl rsa -RSAPublicKey_in -in key.pem -pubout`"
    )]
    Pkcs1,
    /// An X.509 certificate (that is ocicrypt's `pkcs7:` recipient type, not `jwe:`).
    #[error(
        "X.509 certificates are not accepted as JWE recipients: use a PKIX public key, \
         e.g. `openssl x509 -in cert.pem -pubkey -noout`"
    )]
    Certificate,
    /// A private key was supplied where a public key belongs.
    #[error(
        "this is a private key ({0}): the gateway must hold only public keys; \
         use a PKIX public key, e.g. `openssl pkey -in key.pem -pubout`"
    )]
    PrivateKey(String),
    /// Some other PEM type.
    #[error(
        "PEM type {0:?} is not a public key: use a PKIX public key (-----BEGIN PUBLIC KEY-----)"
    )]
    PemLabel(String),
    /// The DER inside is not a SubjectPublicKeyInfo.
    #[error("not a PKIX SubjectPublicKeyInfo: {0}")]
    Spki(String),
    /// A key type ocicrypt's JWE wrapper does not support.
    #[error(
        "unsupported public key algorithm {0}: use RSA (2048-4096 bits) or EC P-256/P-384/P-521"
    )]
    Algorithm(String),
    /// An EC curve other than P-256/384/521.
    #[error("unsupported elliptic curve {0}: use P-256, P-384 or P-521")]
    Curve(String),
    /// RSA modulus size outside 2048..=4096.
    #[error("RSA key of {0} bits: use 2048 to 4096 bits")]
    RsaSize(usize),
    /// The key material itself is invalid (point not on curve, bad exponent, …).
    #[error("invalid {kind} key: {reason}")]
    Invalid {
        /// Key type being parsed.
        kind: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The JWK is not a JSON object.
    #[error("a JWK must be a JSON object")]
    JwkNotObject,
    /// A required JWK member is missing or not a string.
    #[error("JWK member {0:?} is missing or not a string")]
    JwkMember(&'static str),
    /// A JWK member is not base64url.
    #[error("JWK member {0:?} is not base64url")]
    JwkBase64(&'static str),
    /// The JWK carries private key material.
    #[error(
        "JWK contains the private member {0:?}: the gateway must hold only public keys; \
         remove the private members"
    )]
    JwkPrivate(&'static str),
    /// A JWK `kty` that is not RSA or EC.
    #[error("JWK kty {0:?} is not supported: use \"RSA\" or \"EC\"")]
    JwkKty(String),
    /// A JWK `alg` other than the one the gateway emits for this key type.
    #[error("JWK alg {found:?} is not supported for kty {kty}: omit alg or use {expected:?}")]
    JwkAlg {
        /// Key type.
        kty: &'static str,
        /// `alg` found.
        found: String,
        /// The only `alg` the gateway uses for this key type.
        expected: &'static str,
    },
}

impl Recipient {
    /// Parses a PKIX public key PEM (`-----BEGIN PUBLIC KEY-----`), as ocicrypt's `jwe:`
    /// recipients. PKCS#1, certificates and private keys are refused with a hint.
    pub fn from_pem(pem: &str) -> Result<Recipient, RecipientError> {
        let block = pem_decode(pem).map_err(|e| match e {
            PemError::NotPem => RecipientError::NotPem,
            PemError::Multiple(n) => RecipientError::MultiplePem(n),
            PemError::Malformed(m) => RecipientError::PemMalformed(m),
        })?;
        match block.label.as_str() {
            "PUBLIC KEY" => Self::from_spki_der(&block.der),
            "RSA PUBLIC KEY" => Err(RecipientError::Pkcs1),
            "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE" => {
                Err(RecipientError::Certificate)
            }
            l if l.ends_with("PRIVATE KEY") => Err(RecipientError::PrivateKey(l.to_string())),
            l => Err(RecipientError::PemLabel(l.to_string())),
        }
    }

    fn from_spki_der(der: &[u8]) -> Result<Recipient, RecipientError> {
        let spki = SubjectPublicKeyInfoRef::try_from(der)
            .map_err(|e| RecipientError::Spki(e.to_string()))?;
        let oid = spki.algorithm.oid.to_string();
        match oid.as_str() {
            OID_RSA => {
                let raw = spki.subject_public_key.as_bytes().ok_or_else(|| {
                    RecipientError::Spki("RSA key bit string has unused bits".into())
                })?;
                let pkcs1 = rsa::pkcs1::RsaPublicKey::from_der(raw).map_err(|e| {
                    RecipientError::Invalid {
                        kind: "RSA",
                        reason: e.to_string(),
                    }
                })?;
                rsa_from_parts(pkcs1.modulus.as_bytes(), pkcs1.public_exponent.as_bytes())
            }
            OID_EC => {
                let curve = spki
                    .algorithm
                    .parameters_oid()
                    .map_err(|e| RecipientError::Spki(format!("EC key without named curve: {e}")))?
                    .to_string();
                let invalid = |e: rsa::pkcs8::spki::Error| RecipientError::Invalid {
                    kind: "EC",
                    reason: e.to_string(),
                };
                match curve.as_str() {
                    OID_P256 => Ok(Recipient::P256(
                        p256::PublicKey::from_public_key_der(der).map_err(invalid)?,
                    )),
                    OID_P384 => Ok(Recipient::P384(
                        p384::PublicKey::from_public_key_der(der).map_err(invalid)?,
                    )),
                    OID_P521 => Ok(Recipient::P521(
                        p521::PublicKey::from_public_key_der(der).map_err(invalid)?,
                    )),
                    "1.3.132.0.10" => Err(RecipientError::Curve(format!("secp256k1 ({curve})"))),
                    other => Err(RecipientError::Curve(other.to_string())),
                }
            }
            "1.3.101.112" => Err(RecipientError::Algorithm(format!("Ed25519 ({oid})"))),
            "1.3.101.110" => Err(RecipientError::Algorithm(format!("X25519 ({oid})"))),
            "1.3.101.113" => Err(RecipientError::Algorithm(format!("Ed448 ({oid})"))),
            "1.3.101.111" => Err(RecipientError::Algorithm(format!("X448 ({oid})"))),
            _ => Err(RecipientError::Algorithm(oid)),
        }
    }

    /// Parses a public JWK (RFC 7517): `kty` `RSA` with `n`/`e`, or `kty` `EC` with `crv`
    /// `P-256`/`P-384`/`P-521` and `x`/`y`. An `alg`, if present, must be the one the gateway
    /// will use (`RSA-OAEP` or `ECDH-ES+A256KW`), so a key meant for something else is not
    /// silently used differently.
    pub fn from_jwk(jwk: &serde_json::Value) -> Result<Recipient, RecipientError> {
        let obj = jwk.as_object().ok_or(RecipientError::JwkNotObject)?;
        if let Some(member) = JWK_PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
            return Err(RecipientError::JwkPrivate(member));
        }
        let kty = obj
            .get("kty")
            .and_then(|v| v.as_str())
            .ok_or(RecipientError::JwkMember("kty"))?;
        let (kty, expected_alg) = match kty {
            "RSA" => ("RSA", "RSA-OAEP"),
            "EC" => ("EC", "ECDH-ES+A256KW"),
            other => return Err(RecipientError::JwkKty(other.to_string())),
        };
        if let Some(alg) = obj.get("alg") {
            if alg.as_str() != Some(expected_alg) {
                let found = alg.as_str().map_or_else(|| alg.to_string(), str::to_string);
                return Err(RecipientError::JwkAlg {
                    kty,
                    found,
                    expected: expected_alg,
                });
            }
        }
        let member = |name: &'static str| -> Result<Vec<u8>, RecipientError> {
            let s = obj
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or(RecipientError::JwkMember(name))?;
            B64URL
                .decode(s)
                .map_err(|_| RecipientError::JwkBase64(name))
        };
        if kty == "RSA" {
            return rsa_from_parts(&member("n")?, &member("e")?);
        }
        let crv = obj
            .get("crv")
            .and_then(|v| v.as_str())
            .ok_or(RecipientError::JwkMember("crv"))?;
        let size = match crv {
            "P-256" => 32,
            "P-384" => 48,
            "P-521" => 66,
            other => return Err(RecipientError::Curve(other.to_string())),
        };
        let point = uncompressed_point(&member("x")?, &member("y")?, size)?;
        let invalid = |_| RecipientError::Invalid {
            kind: "EC",
            reason: format!("x/y are not a point on {crv}"),
        };
        Ok(match crv {
            "P-256" => Recipient::P256(p256::PublicKey::from_sec1_bytes(&point).map_err(invalid)?),
            "P-384" => Recipient::P384(p384::PublicKey::from_sec1_bytes(&point).map_err(invalid)?),
            _ => Recipient::P521(p521::PublicKey::from_sec1_bytes(&point).map_err(invalid)?),
        })
    }

    /// Key type and size for logs ("RSA-3072", "EC P-256"); never key material.
    pub fn describe(&self) -> String {
        match self {
            Recipient::Rsa(k) => format!("RSA-{}", k.n().bits()),
            Recipient::P256(_) => "EC P-256".to_string(),
            Recipient::P384(_) => "EC P-384".to_string(),
            Recipient::P521(_) => "EC P-521".to_string(),
        }
    }

    /// The JWE `alg` used to wrap layer keys to this recipient.
    pub fn jwe_alg(&self) -> &'static str {
        match self {
            Recipient::Rsa(_) => "RSA-OAEP",
            _ => "ECDH-ES+A256KW",
        }
    }
}

/// A stable fingerprint of a set of recipients (order and duplicates do not matter): the
/// SHA-256 of the sorted SHA-256s of each public key's canonical bytes (RSA: modulus and
/// exponent; EC: the uncompressed SEC1 point), in hex.
pub fn fingerprint(recipients: &[Recipient]) -> String {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use sha2::{Digest as _, Sha256};
    let mut each: Vec<[u8; 32]> = recipients
        .iter()
        .map(|r| {
            let mut h = Sha256::new();
            match r {
                Recipient::Rsa(k) => {
                    h.update(b"rsa\0");
                    h.update(k.n().to_bytes_be());
                    h.update(b"\0");
                    h.update(k.e().to_bytes_be());
                }
                Recipient::P256(k) => h.update(k.to_encoded_point(false).as_bytes()),
                Recipient::P384(k) => h.update(k.to_encoded_point(false).as_bytes()),
                Recipient::P521(k) => h.update(k.to_encoded_point(false).as_bytes()),
            }
            h.finalize().into()
        })
        .collect();
    each.sort_unstable();
    each.dedup();
    let mut all = Sha256::new();
    for d in &each {
        all.update(d);
    }
    hex::encode(all.finalize())
}

/// JWK coordinates may have lost leading zero bytes in sloppy producers; RFC 7518 wants them
/// full length, and SEC1 needs them so.
fn uncompressed_point(x: &[u8], y: &[u8], size: usize) -> Result<Vec<u8>, RecipientError> {
    let mut point = Vec::with_capacity(1 + 2 * size);
    point.push(0x04);
    for (name, coord) in [("x", x), ("y", y)] {
        let pad = size
            .checked_sub(coord.len())
            .ok_or_else(|| RecipientError::Invalid {
                kind: "EC",
                reason: format!(
                    "{name} is {} bytes, more than the curve's {size}",
                    coord.len()
                ),
            })?;
        point.resize(point.len() + pad, 0);
        point.extend_from_slice(coord);
    }
    Ok(point)
}

fn rsa_from_parts(n: &[u8], e: &[u8]) -> Result<Recipient, RecipientError> {
    let n = rsa::BigUint::from_bytes_be(n);
    let bits = n.bits();
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(RecipientError::RsaSize(bits));
    }
    let key = rsa::RsaPublicKey::new(n, rsa::BigUint::from_bytes_be(e)).map_err(|e| {
        RecipientError::Invalid {
            kind: "RSA",
            reason: e.to_string(),
        }
    })?;
    Ok(Recipient::Rsa(key))
}

/// One decoded PEM block.
pub(crate) struct PemBlock {
    /// Text between `BEGIN ` and the closing dashes.
    pub(crate) label: String,
    /// Decoded body; may be a private key, hence wiped on drop.
    pub(crate) der: Zeroizing<Vec<u8>>,
}

/// Why PEM text could not be decoded.
#[derive(Debug)]
pub(crate) enum PemError {
    /// No BEGIN line.
    NotPem,
    /// More than one block.
    Multiple(usize),
    /// Broken framing or body.
    Malformed(String),
}

/// Decodes the single PEM block in `text`, tolerating text around it and any line width, as Go's
/// `encoding/pem` does (keys come from many tools). Encrypted (header-carrying) PEM is refused.
pub(crate) fn pem_decode(text: &str) -> Result<PemBlock, PemError> {
    const BEGIN: &str = "-----BEGIN ";
    let count = text.matches(BEGIN).count();
    if count == 0 {
        return Err(PemError::NotPem);
    }
    if count > 1 {
        return Err(PemError::Multiple(count));
    }
    let (_, after_begin) = text.split_once(BEGIN).ok_or(PemError::NotPem)?;
    let (label, body) = after_begin
        .split_once("-----")
        .ok_or_else(|| PemError::Malformed("unterminated BEGIN line".into()))?;
    let end_line = format!("-----END {label}-----");
    let (body, _) = body
        .split_once(&end_line)
        .ok_or_else(|| PemError::Malformed(format!("no matching {end_line:?} line")))?;
    if body.contains(':') {
        return Err(PemError::Malformed(
            "PEM headers (e.g. an encrypted PEM) are not supported".into(),
        ));
    }
    let compact: Zeroizing<String> =
        Zeroizing::new(body.chars().filter(|c| !c.is_ascii_whitespace()).collect());
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| PemError::Malformed(format!("body is not base64: {e}")))?;
    Ok(PemBlock {
        label: label.to_string(),
        der: Zeroizing::new(der),
    })
}
