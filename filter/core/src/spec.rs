//! Constants of the OCI image and image-encryption formats, as containers/ocicrypt uses them.

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Suffix ocicrypt appends to a layer media type.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";

/// Annotation holding the JWE-wrapped private options.
pub const ANNOTATION_KEYS_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation holding the public options (cipher, HMAC).
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// Prefix of every encryption annotation; stripped on decryption.
pub const ANNOTATION_ENC_PREFIX: &str = "org.opencontainers.image.enc.";

/// The only block cipher ocicrypt implements.
pub const CIPHER_AES_256_CTR_HMAC_SHA256: &str = "AES_256_CTR_HMAC_SHA256";

/// Maps a plaintext layer media type to the encrypted type every decryptor understands, or
/// `None` when the type is not an image layer that ocicrypt encrypts. Docker layer types map
/// to the OCI encrypted types, as containerd/imgcrypt and containers/image do.
pub fn encrypted_media_type(plain: &str) -> Option<&'static str> {
    Some(match plain {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => {
            "application/vnd.oci.image.layer.v1.tar+encrypted"
        }
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        }
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd+encrypted"
        }
        _ => return None,
    })
}

/// True for media types that are image layers a runtime unpacks (and so must be encrypted in an
/// encrypted repository), non-distributable ones included. What an encrypted repository
/// accepts is narrower: see [`layer_rule`].
pub fn is_image_layer(media_type: &str) -> bool {
    encrypted_media_type(media_type).is_some()
}

/// True for encrypted layer types some decryptor understands (the OCI `+encrypted` types,
/// non-distributable ones included). What an encrypted repository accepts is narrower: see
/// [`layer_rule`].
pub fn is_known_encrypted(media_type: &str) -> bool {
    media_type
        .strip_suffix(ENCRYPTED_SUFFIX)
        .and_then(encrypted_media_type)
        .is_some_and(|enc| enc == media_type)
}

/// Media type of plain JSON data (configs, signatures, SBOMs kept as they are).
pub const MEDIA_TYPE_JSON: &str = "application/json";
/// Suffix of every JSON-structured media type (RFC 6839).
pub const JSON_SUFFIX: &str = "+json";

/// The plaintext image-layer media types an encrypted repository accepts, spelled exactly as
/// the specs spell them: the gateway encrypts a blob pushed under one of these and rewrites the
/// descriptor to [`encrypted_media_type`]. The OCI types, Docker's gzip layer, and the two
/// other Docker layer spellings containerd unpacks (`diff.tar`, `diff.tar.zstd`); never a case
/// or whitespace variant, never a non-distributable or foreign layer.
pub const PLAIN_LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

/// The encrypted image-layer media types an encrypted repository accepts (exact spelling): the
/// three OCI `+encrypted` layer types every decryptor (containerd imgcrypt, containers/image)
/// understands. Docker layer types have no encrypted form of their own.
pub const ENCRYPTED_LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+encrypted",
    "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
    "application/vnd.oci.image.layer.v1.tar+zstd+encrypted",
];

/// Prefix of the OCI non-distributable layer types (deprecated by image-spec 1.1).
pub const NONDISTRIBUTABLE_PREFIX: &str = "application/vnd.oci.image.layer.nondistributable.";
/// Prefix of Docker's foreign layer types (the Docker form of non-distributable layers).
pub const DOCKER_FOREIGN_PREFIX: &str = "application/vnd.docker.image.rootfs.foreign.";

/// What an encrypted repository does with a layer descriptor of a given media type
/// ([`layer_rule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerRule {
    /// An allowlisted plaintext layer type ([`PLAIN_LAYER_TYPES`]): the blob must be one the
    /// gateway encrypted; the descriptor becomes the given encrypted type.
    Plain {
        /// The `+encrypted` type the descriptor gets.
        encrypted: &'static str,
    },
    /// An allowlisted encrypted type ([`ENCRYPTED_LAYER_TYPES`]): a layer encrypted before the
    /// push (only where the repository opts in), or a re-push of what the gateway stored.
    Encrypted,
    /// Data that stays plaintext: `application/json` or a type ending in `+json` (signatures,
    /// SBOMs, attestations, the OCI empty descriptor). No runtime unpacks it.
    Data,
    /// A non-distributable (OCI) or foreign (Docker) layer: its bytes are meant to come from
    /// elsewhere, so the gateway never receives them and cannot encrypt them.
    NonDistributable,
    /// Anything else: case or whitespace variants, `application/octet-stream`, unknown
    /// `+encrypted` types, artifact types. Refused.
    Refused,
}

/// The rule for a layer of `media_type` in an encrypted repository; exact, case-sensitive
/// comparison throughout (a registry or runtime may read a variant spelling differently).
pub fn layer_rule(media_type: &str) -> LayerRule {
    if PLAIN_LAYER_TYPES.contains(&media_type) {
        return match encrypted_media_type(media_type) {
            Some(encrypted) => LayerRule::Plain { encrypted },
            None => LayerRule::Refused,
        };
    }
    if ENCRYPTED_LAYER_TYPES.contains(&media_type) {
        return LayerRule::Encrypted;
    }
    if media_type.starts_with(NONDISTRIBUTABLE_PREFIX)
        || media_type.starts_with(DOCKER_FOREIGN_PREFIX)
    {
        return LayerRule::NonDistributable;
    }
    if media_type == MEDIA_TYPE_JSON || media_type.ends_with(JSON_SUFFIX) {
        return LayerRule::Data;
    }
    LayerRule::Refused
}

/// Why the ocicrypt annotations of a layer encrypted before the push are not well formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// The layer has no `annotations` object.
    #[error("it has no annotations")]
    NoAnnotations,
    /// A required annotation is absent.
    #[error("annotation {0} is missing")]
    Missing(&'static str),
    /// An annotation value is not a JSON string.
    #[error("annotation {0} is not a string")]
    NotString(&'static str),
    /// An annotation value is not standard, padded base64.
    #[error("annotation {0} is not standard base64")]
    Base64(&'static str),
    /// An annotation does not decode to a JSON object.
    #[error("annotation {0} does not decode to a JSON object")]
    NotJson(&'static str),
    /// The JWE lacks a member, or a member is not base64url.
    #[error("the JWE in {ANNOTATION_KEYS_JWE} {0}")]
    Jwe(&'static str),
    /// The public options name another cipher than ocicrypt's.
    #[error("{ANNOTATION_PUBOPTS} names cipher {0:?}, expected \"AES_256_CTR_HMAC_SHA256\"")]
    Cipher(String),
    /// The public options lack a 32-byte HMAC.
    #[error("{ANNOTATION_PUBOPTS} has no 32-byte hmac (standard base64)")]
    Hmac,
}

/// Checks the ocicrypt annotations of a layer encrypted before the push: `keys.jwe` is base64
/// of a JWE in JSON serialization (general or flattened) with `protected`, `iv`, `ciphertext`
/// and `tag` and at least one `encrypted_key`, and `pubopts` is base64 of JSON naming cipher
/// `AES_256_CTR_HMAC_SHA256` with a 32-byte `hmac`. Only the shape is checked: the gateway
/// holds no private key.
pub fn check_encryption_annotations(
    annotations: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), AnnotationError> {
    let annotations = annotations.ok_or(AnnotationError::NoAnnotations)?;
    let jwe = decode_json_annotation(annotations, ANNOTATION_KEYS_JWE)?;
    check_jwe(&jwe)?;
    let pubopts = decode_json_annotation(annotations, ANNOTATION_PUBOPTS)?;
    match pubopts.get("cipher") {
        Some(serde_json::Value::String(c)) if c == CIPHER_AES_256_CTR_HMAC_SHA256 => {}
        Some(serde_json::Value::String(c)) => return Err(AnnotationError::Cipher(c.clone())),
        Some(other) => return Err(AnnotationError::Cipher(other.to_string())),
        None => return Err(AnnotationError::Cipher(String::new())),
    }
    let hmac_ok = pubopts
        .get("hmac")
        .and_then(serde_json::Value::as_str)
        .and_then(|h| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(h).ok()
        })
        .is_some_and(|h| h.len() == 32);
    if !hmac_ok {
        return Err(AnnotationError::Hmac);
    }
    Ok(())
}

/// The JSON object an annotation holds in standard base64.
fn decode_json_annotation(
    annotations: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
) -> Result<serde_json::Map<String, serde_json::Value>, AnnotationError> {
    use base64::Engine as _;
    let text = match annotations.get(name) {
        Some(serde_json::Value::String(text)) => text,
        Some(_) => return Err(AnnotationError::NotString(name)),
        None => return Err(AnnotationError::Missing(name)),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| AnnotationError::Base64(name))?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(object)) => Ok(object),
        _ => Err(AnnotationError::NotJson(name)),
    }
}

/// True when `value` is a non-empty base64url (unpadded) string.
fn is_base64url(value: Option<&serde_json::Value>) -> bool {
    use base64::Engine as _;
    value
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .is_some_and(|s| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .is_ok()
        })
}

/// Checks the members of a JWE JSON serialization (RFC 7516 §7.2) that a decryptor needs.
fn check_jwe(jwe: &serde_json::Map<String, serde_json::Value>) -> Result<(), AnnotationError> {
    use base64::Engine as _;
    for (member, problem) in [
        ("protected", "has no base64url protected header"),
        ("iv", "has no base64url iv"),
        ("ciphertext", "has no base64url ciphertext"),
        ("tag", "has no base64url tag"),
    ] {
        if !is_base64url(jwe.get(member)) {
            return Err(AnnotationError::Jwe(problem));
        }
    }
    let header_is_json = jwe
        .get("protected")
        .and_then(serde_json::Value::as_str)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .is_some_and(|p| p.is_object());
    if !header_is_json {
        return Err(AnnotationError::Jwe(
            "has a protected header that is not a JSON object",
        ));
    }
    match jwe.get("recipients") {
        // General serialization: every recipient carries its wrapped key.
        Some(serde_json::Value::Array(recipients)) => {
            if recipients.is_empty() {
                return Err(AnnotationError::Jwe("has an empty recipients list"));
            }
            if !recipients
                .iter()
                .all(|r| is_base64url(r.get("encrypted_key")))
            {
                return Err(AnnotationError::Jwe(
                    "has a recipient without a base64url encrypted_key",
                ));
            }
        }
        Some(_) => return Err(AnnotationError::Jwe("has recipients that are not an array")),
        // Flattened serialization: one recipient, its wrapped key at the top.
        None => {
            if !is_base64url(jwe.get("encrypted_key")) {
                return Err(AnnotationError::Jwe(
                    "has neither recipients nor a base64url encrypted_key",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_types_map_to_oci_encrypted_types() {
        assert_eq!(
            encrypted_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
        );
        assert!(
            encrypted_media_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
                .is_none()
        );
        assert!(encrypted_media_type("application/vnd.in-toto+json").is_none());
    }

    #[test]
    fn known_encrypted_types() {
        assert!(is_known_encrypted(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
        assert!(!is_known_encrypted(
            "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted"
        ));
        assert!(!is_known_encrypted("application/json+encrypted"));
    }
}
