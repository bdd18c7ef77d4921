//! Rewriting a manifest PUT in an encrypted repository.
//!
//! Clients push manifests that name their layers by plaintext digest; the registry holds the
//! ciphertext blobs the gateway produced at upload time. [`rewrite`] swaps every layer the
//! ledger knows for its encrypted descriptor (ocicrypt format: `+encrypted` media type,
//! ciphertext digest, same size, `org.opencontainers.image.enc.*` annotations), converts
//! Docker v2 schema 2 manifests to OCI image manifests (encrypted layers only exist as OCI
//! media types), and refuses anything that would leave plaintext behind or store a layer no
//! runtime can decrypt.
//!
//! Layers are judged by an allowlist of media types, spelled exactly ([`spec::layer_rule`]):
//! image layers the gateway encrypted, layers encrypted before the push (only where the
//! repository's policy opts in, [`RewriteOptions::accept_encrypted`], and only with
//! well-formed ocicrypt annotations), and JSON data. Anything else — a case or whitespace
//! variant of a layer type, `application/octet-stream`, a non-distributable or foreign layer,
//! an unknown `+encrypted` type — is refused, because a runtime might unpack what the gateway
//! let through unencrypted.
//!
//! Rewriting changes a manifest's digest, so manifests are ledgered too (see
//! [`crate::distribution::ledger`]): an index (or Docker manifest list, stored as an OCI index) has
//! its children pointed at the manifests the registry stores, and a `subject` naming a rewritten
//! manifest is pointed at the stored one (see [`crate::distribution::manifest::index`]).
//!
//! The JSON is edited in place (`serde_json` with `preserve_order`), so unknown fields,
//! annotations, `subject` and `artifactType` survive and field order is kept. A manifest that
//! needs no change is returned byte for byte, so its digest (and any signature over it) stays.
pub mod index;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::digest::Digest;
use crate::distribution::ledger::{self, LedgerEntry};
use crate::error::{Code, OciError};
use crate::spec;

/// Docker image manifest v2 schema 1 (unsigned).
const MEDIA_TYPE_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker image manifest v2 schema 1 (signed).
const MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Top-level manifest fields whose spelling is checked (the registry's Go JSON decoder matches
/// field names case-insensitively, so `Layers` next to `layers` would be read differently).
const MANIFEST_FIELDS: &[&str] = &[
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "subject",
    "annotations",
];
/// Descriptor fields whose spelling is checked, for the same reason.
pub(crate) const DESCRIPTOR_FIELDS: &[&str] = &[
    "mediaType",
    "artifactType",
    "digest",
    "size",
    "urls",
    "annotations",
    "data",
    "platform",
];

/// A rewritten manifest, ready to forward to the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewritten {
    /// The manifest to store: compact JSON when anything changed, else the pushed bytes.
    pub body: Vec<u8>,
    /// Content-Type to forward; always [`stored_content_type`] of the request's Content-Type.
    pub media_type: String,
    /// How many layer descriptors were replaced by their encrypted form.
    pub encrypted_layers: usize,
    /// How many references to other manifests (index children, `subject`) were pointed at the
    /// manifest the registry stores.
    pub rewritten_references: usize,
}

impl Rewritten {
    /// Digest of the manifest the registry will store (of [`Rewritten::body`]).
    pub fn digest(&self) -> Digest {
        Digest::of(&self.body)
    }

    /// The media type a descriptor of the stored manifest carries: [`Rewritten::media_type`]
    /// without Content-Type parameters, spelled as the spec spells it.
    pub fn descriptor_media_type(&self) -> &str {
        match kind_of(&self.media_type) {
            Some(kind) => kind.stored_media_type(),
            None => essence(&self.media_type),
        }
    }
}

/// Why a manifest cannot be stored in an encrypted repository. Every variant becomes a
/// `MANIFEST_INVALID` answer through [`ManifestError::to_oci`], except
/// [`ManifestError::DigestMismatch`] (`DIGEST_INVALID`) and [`ManifestError::Serialize`]
/// (`UNKNOWN`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A manifest pushed by digest whose body has another digest.
    #[error(
        "the manifest body has digest {actual} but was pushed as {pushed}: push the manifest \
         under its own digest"
    )]
    DigestMismatch {
        /// The digest in the request path.
        pushed: Digest,
        /// Digest of the body.
        actual: Digest,
    },
    /// An index child that is not a manifest the gateway stored in this repository.
    #[error(
        "manifests[{child}] {digest} (platform {platform}) was not pushed through the encrypting \
         gateway into this repository, so the index cannot name what the registry stores: push \
         every child manifest through the gateway into this repository first, then the index"
    )]
    UnknownChild {
        /// Index of the child in `manifests`.
        child: usize,
        /// The child's digest as written.
        digest: String,
        /// The child's platform (`os/architecture[/variant]`, or `none`).
        platform: String,
    },
    /// Docker schema 1 manifests cannot describe encrypted layers.
    #[error(
        "Docker schema 1 manifests cannot carry encrypted layers (Content-Type {content_type:?}): \
         push with a client that writes Docker v2 schema 2 or OCI image manifests"
    )]
    Schema1 {
        /// The request's Content-Type.
        content_type: String,
    },
    /// Any other (or a missing) Content-Type.
    #[error(
        "manifest Content-Type {content_type:?} is not an image manifest the gateway can encrypt: \
         send an OCI image manifest (application/vnd.oci.image.manifest.v1+json) or index, or a \
         Docker v2 schema 2 manifest or manifest list, with its media type as Content-Type, or \
         push this artifact to an unencrypted repository"
    )]
    UnsupportedMediaType {
        /// The request's Content-Type.
        content_type: String,
    },
    /// The body does not parse as JSON.
    #[error("manifest is not valid JSON ({reason}): push a valid image manifest")]
    InvalidJson {
        /// The parser's complaint, with line and column.
        reason: String,
    },
    /// `schemaVersion` is missing or not 2.
    #[error("manifest schemaVersion is {found}, expected 2: push a Docker v2 schema 2 or OCI image manifest")]
    SchemaVersion {
        /// The value found (JSON text), or `missing`.
        found: String,
    },
    /// The body's `mediaType` disagrees with the request's Content-Type.
    #[error(
        "manifest mediaType {media_type:?} does not match the request Content-Type \
         {content_type:?}: send the manifest with its mediaType as Content-Type"
    )]
    MediaTypeMismatch {
        /// The request's Content-Type.
        content_type: String,
        /// The body's `mediaType`.
        media_type: String,
    },
    /// A required field is missing or has the wrong shape.
    #[error("manifest field {field} {reason}: push a valid image manifest")]
    Malformed {
        /// Path of the field, e.g. `layers[2].size`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config blob was encrypted at upload time; configs must stay readable.
    #[error(
        "the config blob {digest} ({media_type}) was encrypted on upload because it is not JSON, \
         but a manifest's config must stay plaintext: push this artifact to an unencrypted \
         repository"
    )]
    ConfigEncrypted {
        /// Plaintext digest of the config.
        digest: Digest,
        /// The config's media type.
        media_type: String,
    },
    /// The ledger knows the blob, but nothing decrypts a layer of that media type.
    #[error(
        "layers[{layer}] {digest}: the blob was encrypted but media type {media_type:?} has no \
         decryptor; push this artifact to an unencrypted repository"
    )]
    EncryptedWithoutDecryptor {
        /// Index of the layer in `layers`.
        layer: usize,
        /// Plaintext digest the manifest names.
        digest: Digest,
        /// The layer's media type.
        media_type: String,
    },
    /// An image layer whose blob the gateway did not encrypt (so the registry may hold it in
    /// plaintext).
    #[error(
        "layers[{layer}] {digest} ({media_type}) was not uploaded through the encrypting gateway \
         (it was mounted from another repository or pushed before encryption was enabled, or the \
         gateway has since restarted or evicted it from its ledger cache), so it cannot be stored \
         encrypted: push the image again through the gateway"
    )]
    NotUploadedThroughGateway {
        /// Index of the layer in `layers`.
        layer: usize,
        /// Plaintext digest the manifest names.
        digest: Digest,
        /// The layer's media type.
        media_type: String,
    },
    /// An image layer named by a digest the gateway never encrypts under (not `sha256:`).
    #[error(
        "layers[{layer}] ({media_type}) has digest {digest:?}, which the gateway cannot have \
         encrypted: only sha256 layers are encrypted; push the image with sha256 digests"
    )]
    UnsupportedDigest {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type.
        media_type: String,
    },
    /// A `+encrypted` media type that no runtime decrypts.
    #[error(
        "layers[{layer}] {digest} has encrypted media type {media_type:?}, which no runtime \
         decrypts: encrypted layers must use the OCI types (application/vnd.oci.image.layer.v1.tar \
         with +encrypted, +gzip+encrypted or +zstd+encrypted); push this artifact to an \
         unencrypted repository"
    )]
    UnknownEncryptedType {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type.
        media_type: String,
    },
    /// A layer the client had already encrypted, whose blob the gateway encrypted once more.
    #[error(
        "layers[{layer}] {digest} is already encrypted ({media_type}) but the gateway encrypted \
         its blob again on upload, so no runtime could decrypt it: push the plaintext image and \
         let the gateway encrypt it, or push pre-encrypted images to an unencrypted repository"
    )]
    ReEncrypted {
        /// Index of the layer in `layers`.
        layer: usize,
        /// Digest the manifest names (the client's ciphertext).
        digest: Digest,
        /// The layer's media type.
        media_type: String,
    },
    /// The manifest's layer size is not the size of the blob that was uploaded.
    #[error(
        "layers[{layer}] {digest} declares size {declared}, but the blob uploaded through the \
         gateway has {uploaded} bytes: fix the layer size in the manifest and push again"
    )]
    SizeMismatch {
        /// Index of the layer in `layers`.
        layer: usize,
        /// Plaintext digest the manifest names.
        digest: Digest,
        /// Size in the manifest.
        declared: u64,
        /// Size of the uploaded blob.
        uploaded: u64,
    },
    /// A layer media type outside the encrypted repositories' allowlist
    /// ([`spec::layer_rule`]): a case or whitespace variant of a layer type,
    /// `application/octet-stream`, an artifact type, anything a runtime might unpack unseen.
    #[error(
        "layers[{layer}] {digest} has media type {media_type:?}, which an encrypted repository \
         does not accept: a layer must be an image layer of an exact OCI or Docker type \
         (application/vnd.oci.image.layer.v1.tar, +gzip or +zstd, or \
         application/vnd.docker.image.rootfs.diff.tar.gzip), or JSON data (application/json or \
         a type ending in +json); fix the media type, or push this artifact to an unencrypted \
         repository"
    )]
    LayerTypeNotAllowed {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type as pushed.
        media_type: String,
    },
    /// A non-distributable (OCI) or foreign (Docker) layer.
    #[error(
        "layers[{layer}] {digest} is a non-distributable layer ({media_type:?}): its bytes are \
         fetched from elsewhere, never pushed through the gateway, so they cannot be encrypted \
         and an encrypted repository does not accept them; push the image with this layer as an \
         ordinary distributable layer (e.g. application/vnd.oci.image.layer.v1.tar+gzip, with \
         its bytes uploaded)"
    )]
    NonDistributable {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type as pushed.
        media_type: String,
    },
    /// A layer encrypted before the push, in a repository that does not opt in to that.
    #[error(
        "layers[{layer}] {digest} is already encrypted ({media_type:?}), but this repository \
         only stores layers the gateway encrypted itself: push the plaintext image and let the \
         gateway encrypt it, or have the repository's policy rule set accept_encrypted"
    )]
    EncryptedNotAccepted {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type as pushed.
        media_type: String,
    },
    /// A layer encrypted before the push whose ocicrypt annotations are not well formed.
    #[error(
        "layers[{layer}] {digest} is already encrypted ({media_type:?}) but its encryption \
         annotations are not well formed: {reason}; encrypt the image with an ocicrypt tool \
         (skopeo copy --encryption-key, ctr-enc, nerdctl image encrypt) and push it again"
    )]
    EncryptionAnnotations {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The digest as written.
        digest: String,
        /// The layer's media type as pushed.
        media_type: String,
        /// What is wrong with the annotations.
        reason: String,
    },
    /// An encrypted descriptor naming a ciphertext the gateway stored, but not as it wrote it.
    #[error(
        "layers[{layer}] {digest} names a blob the gateway encrypted, but {reason}, so it is not \
         the descriptor the gateway stored: push the image again from its plaintext, or copy the \
         stored manifest unchanged"
    )]
    NotAsStored {
        /// Index of the layer in `layers`.
        layer: usize,
        /// The ciphertext digest the manifest names.
        digest: Digest,
        /// What differs.
        reason: String,
    },
    /// A client manifest that looks like one of the gateway's ledger records.
    #[error(
        "manifest {field} is {media_type:?}, the media type of the gateway's own ledger records, \
         which clients cannot push: use another artifact type"
    )]
    LedgerLookalike {
        /// `artifactType` or `config.mediaType`.
        field: String,
        /// The value found.
        media_type: String,
    },
    /// A manifest naming more unknown digests than the gateway looks up in the registry.
    #[error(
        "the manifest names {count} digests the gateway has no ledger entry for, more than the \
         {max} it looks up per manifest (limits.max_ledger_lookups): real images have at most \
         127 layers; push the layers and child manifests through the gateway first, or split \
         the manifest"
    )]
    TooManyLedgerLookups {
        /// How many distinct unknown digests the manifest names.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A manifest with more JSON values than any image manifest or index has: parsing it would
    /// grow the worker VM's memory for good (wasm memory does not shrink).
    #[error(
        "the manifest holds more than {max} JSON values; image manifests and indexes hold a few \
         thousand at most: nothing was stored"
    )]
    TooManyValues {
        /// The limit.
        max: usize,
    },
    /// Serializing the rewritten manifest failed (a bug: JSON values always serialize).
    #[error("the rewritten manifest could not be serialized ({reason}); nothing was stored")]
    Serialize {
        /// The serializer's complaint.
        reason: String,
    },
}

impl ManifestError {
    /// The OCI error answer: `MANIFEST_INVALID` (400) for everything the client can fix,
    /// `DIGEST_INVALID` (400) for a body that does not match its digest, `UNKNOWN` (500) for a
    /// serialization failure.
    pub fn to_oci(&self) -> OciError {
        let code = match self {
            ManifestError::Serialize { .. } => Code::Unknown,
            ManifestError::DigestMismatch { .. } => Code::DigestInvalid,
            _ => Code::ManifestInvalid,
        };
        OciError::new(code, self.to_string())
    }
}

/// Most JSON values a manifest may hold before it is parsed: a 127-layer image manifest holds
/// about 2 000, an index of hundreds of platforms a few thousand, and each value of a parsed
/// document costs tens of bytes of memory the worker VM never gives back.
pub const MAX_JSON_VALUES: usize = 65_536;

/// Refuses a body holding more than `max` JSON values, counted without parsing it (containers,
/// and the separators `,` and `:` outside strings: an upper bound on the values a parse builds).
pub fn check_value_count(body: &[u8], max: usize) -> Result<(), ManifestError> {
    let mut count = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' | b',' | b':' => {
                count += 1;
                if count > max {
                    return Err(ManifestError::TooManyValues { max });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The media type part of a Content-Type (parameters dropped, whitespace trimmed).
fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// The Content-Type the gateway forwards for a manifest PUT in an encrypted repository,
/// decided from the request's Content-Type alone: Docker v2 schema 2 manifests become OCI image
/// manifests, Docker manifest lists become OCI indexes, anything else is unchanged.
pub fn stored_content_type(request_content_type: &str) -> &str {
    let media_type = essence(request_content_type);
    if media_type.eq_ignore_ascii_case(spec::MEDIA_TYPE_DOCKER_MANIFEST) {
        spec::MEDIA_TYPE_OCI_MANIFEST
    } else if media_type.eq_ignore_ascii_case(spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST) {
        spec::MEDIA_TYPE_OCI_INDEX
    } else {
        request_content_type
    }
}

/// Checks that a manifest pushed by digest (`PUT /v2/<name>/manifests/<digest>`) has that
/// digest. The registry cannot check it when the gateway stores the rewritten manifest under a
/// reserved tag ([`crate::distribution::ledger::ledger_tag`]) instead, so the gateway must before
/// it ledgers the manifest under `pushed`.
pub fn verify_pushed_digest(body: &[u8], pushed: &Digest) -> Result<(), ManifestError> {
    let actual = Digest::of(body);
    if actual == *pushed {
        Ok(())
    } else {
        Err(ManifestError::DigestMismatch {
            pushed: *pushed,
            actual,
        })
    }
}

/// The manifest kinds that can be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Oci,
    Docker,
    OciIndex,
    DockerList,
}

impl Kind {
    /// The `mediaType` a body of this kind may declare.
    fn media_type(self) -> &'static str {
        match self {
            Kind::Oci => spec::MEDIA_TYPE_OCI_MANIFEST,
            Kind::Docker => spec::MEDIA_TYPE_DOCKER_MANIFEST,
            Kind::OciIndex => spec::MEDIA_TYPE_OCI_INDEX,
            Kind::DockerList => spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST,
        }
    }

    /// The media type the manifest is stored as.
    fn stored_media_type(self) -> &'static str {
        match self {
            Kind::Oci | Kind::Docker => spec::MEDIA_TYPE_OCI_MANIFEST,
            Kind::OciIndex | Kind::DockerList => spec::MEDIA_TYPE_OCI_INDEX,
        }
    }

    fn is_docker(self) -> bool {
        matches!(self, Kind::Docker | Kind::DockerList)
    }

    fn is_index(self) -> bool {
        matches!(self, Kind::OciIndex | Kind::DockerList)
    }
}

/// The kind of a Content-Type the gateway rewrites, if it is one.
fn kind_of(content_type: &str) -> Option<Kind> {
    let media_type = essence(content_type);
    [Kind::Oci, Kind::Docker, Kind::OciIndex, Kind::DockerList]
        .into_iter()
        .find(|kind| media_type.eq_ignore_ascii_case(kind.media_type()))
}

/// Decides from the request's Content-Type whether the manifest can be rewritten.
fn classify(content_type: &str) -> Result<Kind, ManifestError> {
    let media_type = essence(content_type);
    let is = |t: &str| media_type.eq_ignore_ascii_case(t);
    if let Some(kind) = kind_of(content_type) {
        Ok(kind)
    } else if is(MEDIA_TYPE_DOCKER_SCHEMA1) || is(MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED) {
        Err(ManifestError::Schema1 {
            content_type: content_type.to_string(),
        })
    } else {
        Err(ManifestError::UnsupportedMediaType {
            content_type: content_type.to_string(),
        })
    }
}

/// The OCI layer type of a Docker layer type. (Foreign layers have none here: they are
/// refused as non-distributable.)
fn docker_layer_to_oci(media_type: &str) -> Option<&'static str> {
    Some(match media_type {
        "application/vnd.docker.image.rootfs.diff.tar" => "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }
        _ => return None,
    })
}

/// True when `key` is not `known` but Go's `encoding/json` would still match it to `known`
/// (ASCII case folding plus the two non-ASCII folds onto ASCII letters: U+017F `ſ` → `s`,
/// U+212A Kelvin sign → `k`).
fn go_folds_to(key: &str, known: &str) -> bool {
    if key == known {
        return false;
    }
    let mut key_chars = key.chars();
    for k in known.chars() {
        let folded = match key_chars.next() {
            Some('\u{17F}') => 's',
            Some('\u{212A}') => 'k',
            Some(c) => c.to_ascii_lowercase(),
            None => return false,
        };
        if folded != k.to_ascii_lowercase() {
            return false;
        }
    }
    key_chars.next().is_none()
}

/// Refuses field names that the registry's decoder would read as one of `known` although they
/// are spelled differently.
pub(crate) fn check_spelling(
    object: &Map<String, Value>,
    known: &[&str],
    path: &str,
) -> Result<(), ManifestError> {
    for key in object.keys() {
        if let Some(k) = known.iter().find(|k| go_folds_to(key, k)) {
            return Err(ManifestError::Malformed {
                field: format!("{path}{key:?}"),
                reason: format!("differs from {k:?} only in letter case, which registries read as the same field"),
            });
        }
    }
    Ok(())
}

/// Path prefix for fields of a descriptor (`config.`, `layers[2].`).
fn prefix(path: &str) -> String {
    format!("{path}.")
}

/// A [`ManifestError::Malformed`] for `field`.
pub(crate) fn malformed(field: String, reason: &str) -> ManifestError {
    ManifestError::Malformed {
        field,
        reason: reason.to_string(),
    }
}

/// The fields of a descriptor the rewrite decides on.
pub(crate) struct Descriptor {
    /// `mediaType`.
    pub(crate) media_type: String,
    /// `digest`, as written.
    pub(crate) digest: String,
    /// `size`.
    pub(crate) size: u64,
}

/// Reads and checks the `mediaType`, `digest` and `size` of a descriptor object.
pub(crate) fn read_descriptor(value: &Value, path: &str) -> Result<Descriptor, ManifestError> {
    let object = value
        .as_object()
        .ok_or_else(|| malformed(path.to_string(), "is not a JSON object"))?;
    check_spelling(object, DESCRIPTOR_FIELDS, &prefix(path))?;
    let string = |name: &str| match object.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(malformed(format!("{path}.{name}"), "is not a string")),
        None => Err(malformed(format!("{path}.{name}"), "is missing")),
    };
    let media_type = string("mediaType")?;
    let digest = string("digest")?;
    let size = match object.get("size") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| malformed(format!("{path}.size"), "is not a non-negative integer"))?,
        None => return Err(malformed(format!("{path}.size"), "is missing")),
    };
    Ok(Descriptor {
        media_type,
        digest,
        size,
    })
}

/// Sets `mediaType` of an object, keeping its position, or inserting it after
/// `schemaVersion` (else at the end) when absent.
fn set_media_type(object: &mut Map<String, Value>, media_type: &str) {
    if let Some(v) = object.get_mut("mediaType") {
        *v = Value::String(media_type.to_string());
        return;
    }
    let old = std::mem::take(object);
    let mut inserted = false;
    for (key, value) in old {
        let after = key == "schemaVersion";
        object.insert(key, value);
        if after {
            object.insert(
                "mediaType".to_string(),
                Value::String(media_type.to_string()),
            );
            inserted = true;
        }
    }
    if !inserted {
        object.insert(
            "mediaType".to_string(),
            Value::String(media_type.to_string()),
        );
    }
}

/// Turns a plaintext layer descriptor into its encrypted form (ocicrypt: `+encrypted` type,
/// ciphertext digest, same size, non-`enc.` annotations kept plus the entry's). `urls` (which
/// name the plaintext elsewhere) and embedded `data` (the plaintext itself) are dropped.
fn encrypt_descriptor(
    object: &mut Map<String, Value>,
    encrypted_type: &str,
    entry: &LedgerEntry,
    path: &str,
) -> Result<(), ManifestError> {
    let mut annotations = match object.get("annotations") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(existing)) => existing.clone(),
        Some(_) => {
            return Err(malformed(
                format!("{path}.annotations"),
                "is not a JSON object",
            ))
        }
    };
    annotations.retain(|key, _| !key.starts_with(spec::ANNOTATION_ENC_PREFIX));
    for (key, value) in &entry.annotations {
        annotations.insert(key.clone(), Value::String(value.clone()));
    }
    object.insert(
        "mediaType".to_string(),
        Value::String(encrypted_type.to_string()),
    );
    object.insert(
        "digest".to_string(),
        Value::String(entry.encrypted_digest.to_string()),
    );
    object.insert("size".to_string(), Value::from(entry.size));
    object.insert("annotations".to_string(), Value::Object(annotations));
    object.retain(|key, _| key != "urls" && key != "data");
    Ok(())
}

/// What the caller knows about the repository a manifest is pushed to, beyond its ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriteOptions {
    /// The repository's policy opts in to images encrypted before the push (by the pipeline):
    /// layers of an encrypted type the ledger does not know are then accepted, as they are,
    /// when their ocicrypt annotations are well formed. Off by default: every layer must be
    /// one the gateway encrypted.
    pub accept_encrypted: bool,
}

/// Rewrites a manifest PUT body for an encrypted repository with the default
/// [`RewriteOptions`] (no layer encrypted before the push is accepted); see [`rewrite_with`].
pub fn rewrite(
    body: &[u8],
    request_content_type: &str,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
) -> Result<Rewritten, ManifestError> {
    rewrite_with(
        body,
        request_content_type,
        lookup,
        &RewriteOptions::default(),
    )
}

/// Rewrites a manifest PUT body for an encrypted repository.
///
/// `lookup` answers the ledger of the target repository: for a plaintext blob digest, the
/// encrypted blob the gateway produced; for the digest a manifest was pushed under, the
/// manifest the registry stores ([`LedgerEntry::media_type`] set). Blob entries only count for
/// layers and config, manifest entries only for index children and `subject`. A lookup may
/// also answer for a ciphertext digest with its own blob entry (an entry whose
/// `encrypted_digest` is the digest asked about): that lets a re-push of a manifest the gateway
/// stored pass unchanged.
///
/// Image manifests (OCI, Docker v2s2 → OCI): each layer descriptor follows the rule of its
/// media type ([`spec::layer_rule`]; Docker layer types are first mapped to OCI types, and
/// messages name the type as pushed):
/// - allowlisted plaintext layer type: the blob must be one the gateway encrypted (same size);
///   the descriptor becomes its encrypted form. Else refused (not uploaded through the
///   gateway, or not a sha256 digest);
/// - allowlisted `+encrypted` type: if the ledger knows the digest as a plaintext the gateway
///   encrypted, refused (encrypted twice); if it knows it as the gateway's own ciphertext, kept
///   when size and `enc.*` annotations are exactly what the gateway wrote; otherwise (encrypted
///   by the pipeline) kept only with [`RewriteOptions::accept_encrypted`] and well-formed
///   ocicrypt annotations ([`spec::check_encryption_annotations`]);
/// - JSON data (`application/json`, `…+json`): kept, unless the gateway encrypted the blob
///   (no decryptor for that type: refused);
/// - non-distributable or foreign layer: refused (the gateway never sees its bytes);
/// - anything else: refused, or, when the ledger knows the blob, refused as an encrypted blob
///   no decryptor reads (Helm charts and other artifacts belong in unencrypted repositories).
///
/// A config the ledger knows is refused; so is a manifest whose `artifactType` or config media
/// type is the ledger's ([`crate::distribution::ledger::LEDGER_ARTIFACT_TYPE`]).
///
/// Indexes (OCI, Docker manifest list → OCI index): every child of `manifests` must be a
/// manifest the ledger knows, and is pointed at the stored one (digest, size, media type;
/// `platform`, annotations and other fields kept); a child the ledger does not know is
/// refused. Nested indexes are children like any other. (Children's layers were checked when
/// each child was pushed.)
///
/// In both, a `subject` the ledger knows is pointed at the stored manifest; one it does not
/// know is left as it is. Schema 1 and other types are refused.
pub fn rewrite_with(
    body: &[u8],
    request_content_type: &str,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
    options: &RewriteOptions,
) -> Result<Rewritten, ManifestError> {
    check_value_count(body, MAX_JSON_VALUES)?;
    let kind = classify(request_content_type)?;
    let mut document: Value =
        serde_json::from_slice(body).map_err(|e| ManifestError::InvalidJson {
            reason: e.to_string(),
        })?;
    let manifest = document
        .as_object_mut()
        .ok_or_else(|| malformed("(document)".to_string(), "is not a JSON object"))?;
    let fields = if kind.is_index() {
        index::INDEX_FIELDS
    } else {
        MANIFEST_FIELDS
    };
    check_spelling(manifest, fields, "")?;

    match manifest.get("schemaVersion") {
        Some(v) if v.as_u64() == Some(2) => {}
        Some(v) => {
            return Err(ManifestError::SchemaVersion {
                found: v.to_string(),
            })
        }
        None => {
            return Err(ManifestError::SchemaVersion {
                found: "missing".to_string(),
            })
        }
    }
    match manifest.get("mediaType") {
        None => {}
        Some(Value::String(declared)) if declared == kind.media_type() => {}
        Some(Value::String(declared)) => {
            return Err(ManifestError::MediaTypeMismatch {
                content_type: request_content_type.to_string(),
                media_type: declared.clone(),
            })
        }
        Some(_) => return Err(malformed("mediaType".to_string(), "is not a string")),
    }
    refuse_ledger_lookalike(manifest)?;
    let mut changed = false;
    if kind.is_docker() {
        set_media_type(manifest, kind.stored_media_type());
        changed = true;
    }

    let mut encrypted_layers = 0usize;
    let mut rewritten_references = 0usize;
    if kind.is_index() {
        rewritten_references += index::rewrite_children(manifest, lookup)?;
    } else {
        encrypted_layers = rewrite_image(manifest, kind, lookup, options)?;
    }
    if index::rewrite_subject(manifest, lookup)? {
        rewritten_references += 1;
    }
    changed |= encrypted_layers > 0 || rewritten_references > 0;

    let media_type = stored_content_type(request_content_type).to_string();
    if !changed {
        return Ok(Rewritten {
            body: body.to_vec(),
            media_type,
            encrypted_layers,
            rewritten_references,
        });
    }
    let body = serde_json::to_vec(&document).map_err(|e| ManifestError::Serialize {
        reason: e.to_string(),
    })?;
    Ok(Rewritten {
        body,
        media_type,
        encrypted_layers,
        rewritten_references,
    })
}

/// Refuses a manifest or index that carries the ledger records' type as its `artifactType` or
/// config media type (compared without regard to ASCII case): only the gateway writes those,
/// and straight to the registry, never through a client's manifest PUT.
fn refuse_ledger_lookalike(manifest: &Map<String, Value>) -> Result<(), ManifestError> {
    let is_ledger = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|t| t.trim().eq_ignore_ascii_case(ledger::LEDGER_ARTIFACT_TYPE))
            .map(str::to_string)
    };
    if let Some(media_type) = is_ledger(manifest.get("artifactType")) {
        return Err(ManifestError::LedgerLookalike {
            field: "artifactType".to_string(),
            media_type,
        });
    }
    let config_type = manifest.get("config").and_then(|c| c.get("mediaType"));
    if let Some(media_type) = is_ledger(config_type) {
        return Err(ManifestError::LedgerLookalike {
            field: "config.mediaType".to_string(),
            media_type,
        });
    }
    Ok(())
}

/// The config and layers half of [`rewrite_with`] for image manifests; returns how many layers
/// were encrypted.
fn rewrite_image(
    manifest: &mut Map<String, Value>,
    kind: Kind,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
    options: &RewriteOptions,
) -> Result<usize, ManifestError> {
    let blob = |d: &Digest| lookup(d).filter(|entry| !entry.is_manifest());

    // The config stays plaintext; Docker configs are valid OCI configs, only the type changes.
    let config = manifest.get_mut("config").ok_or_else(|| {
        malformed(
            "config".to_string(),
            "is missing: an image manifest needs a config descriptor",
        )
    })?;
    let config_descriptor = read_descriptor(config, "config")?;
    if let Some(entry_digest) = Digest::parse(&config_descriptor.digest)
        .ok()
        .filter(|d| blob(d).is_some())
    {
        return Err(ManifestError::ConfigEncrypted {
            digest: entry_digest,
            media_type: config_descriptor.media_type,
        });
    }
    if kind == Kind::Docker && config_descriptor.media_type == spec::MEDIA_TYPE_DOCKER_CONFIG {
        if let Some(object) = config.as_object_mut() {
            object.insert(
                "mediaType".to_string(),
                Value::String(spec::MEDIA_TYPE_OCI_CONFIG.to_string()),
            );
        }
    }

    let layers = match manifest.get_mut("layers") {
        Some(Value::Array(layers)) => layers,
        Some(_) => return Err(malformed("layers".to_string(), "is not an array")),
        None => {
            return Err(malformed(
                "layers".to_string(),
                "is missing: an image manifest lists its layers",
            ))
        }
    };
    let mut encrypted_layers = 0usize;
    for (index, layer) in layers.iter_mut().enumerate() {
        let path = format!("layers[{index}]");
        let descriptor = read_descriptor(layer, &path)?;
        let Some(object) = layer.as_object_mut() else {
            return Err(malformed(path, "is not a JSON object"));
        };
        // Decisions use the OCI type; messages name the type as pushed.
        let pushed_type = descriptor.media_type;
        let mut media_type = pushed_type.as_str();
        if kind == Kind::Docker {
            if let Some(oci) = docker_layer_to_oci(media_type) {
                media_type = oci;
            }
        }
        let digest = Digest::parse(&descriptor.digest).ok();
        let entry = digest.as_ref().and_then(blob);

        match spec::layer_rule(media_type) {
            spec::LayerRule::Plain { encrypted } => {
                let (Some(entry), Some(digest)) = (entry, digest) else {
                    return Err(match digest {
                        Some(digest) => ManifestError::NotUploadedThroughGateway {
                            layer: index,
                            digest,
                            media_type: pushed_type,
                        },
                        None => ManifestError::UnsupportedDigest {
                            layer: index,
                            digest: descriptor.digest,
                            media_type: pushed_type,
                        },
                    });
                };
                if descriptor.size != entry.size {
                    return Err(ManifestError::SizeMismatch {
                        layer: index,
                        digest,
                        declared: descriptor.size,
                        uploaded: entry.size,
                    });
                }
                encrypt_descriptor(object, encrypted, &entry, &path)?;
                encrypted_layers += 1;
            }
            spec::LayerRule::Encrypted => match (digest, entry) {
                (Some(digest), Some(entry)) if entry.encrypted_digest == digest => {
                    check_as_stored(object, index, digest, descriptor.size, &entry, &path)?;
                }
                (Some(digest), Some(_)) => {
                    return Err(ManifestError::ReEncrypted {
                        layer: index,
                        digest,
                        media_type: pushed_type,
                    });
                }
                _ if !options.accept_encrypted => {
                    return Err(ManifestError::EncryptedNotAccepted {
                        layer: index,
                        digest: descriptor.digest,
                        media_type: pushed_type,
                    });
                }
                _ => {
                    let annotations = match object.get("annotations") {
                        None | Some(Value::Null) => None,
                        Some(Value::Object(annotations)) => Some(annotations),
                        Some(_) => {
                            return Err(malformed(
                                format!("{path}.annotations"),
                                "is not a JSON object",
                            ))
                        }
                    };
                    spec::check_encryption_annotations(annotations).map_err(|e| {
                        ManifestError::EncryptionAnnotations {
                            layer: index,
                            digest: descriptor.digest.clone(),
                            media_type: pushed_type.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                }
            },
            spec::LayerRule::Data => {
                if let (Some(digest), Some(_)) = (digest, entry) {
                    return Err(ManifestError::EncryptedWithoutDecryptor {
                        layer: index,
                        digest,
                        media_type: pushed_type,
                    });
                }
            }
            spec::LayerRule::NonDistributable => {
                return Err(ManifestError::NonDistributable {
                    layer: index,
                    digest: descriptor.digest,
                    media_type: pushed_type,
                });
            }
            spec::LayerRule::Refused => {
                return Err(match (digest, entry) {
                    (Some(digest), Some(_)) => ManifestError::EncryptedWithoutDecryptor {
                        layer: index,
                        digest,
                        media_type: pushed_type,
                    },
                    _ if media_type.ends_with(spec::ENCRYPTED_SUFFIX) => {
                        ManifestError::UnknownEncryptedType {
                            layer: index,
                            digest: descriptor.digest,
                            media_type: pushed_type,
                        }
                    }
                    _ => ManifestError::LayerTypeNotAllowed {
                        layer: index,
                        digest: descriptor.digest,
                        media_type: pushed_type,
                    },
                });
            }
        }
    }
    Ok(encrypted_layers)
}

/// Checks that an encrypted descriptor naming the gateway's own ciphertext `digest` is the one
/// the gateway wrote for it: the entry's size, exactly the entry's `enc.*` annotations (other
/// annotations are the client's and stay), and neither `urls` nor `data`, which the gateway
/// drops.
fn check_as_stored(
    object: &Map<String, Value>,
    layer: usize,
    digest: Digest,
    size: u64,
    entry: &LedgerEntry,
    path: &str,
) -> Result<(), ManifestError> {
    let differs = |reason: String| ManifestError::NotAsStored {
        layer,
        digest,
        reason,
    };
    if size != entry.size {
        return Err(differs(format!(
            "it declares size {size} where the gateway stored {}",
            entry.size
        )));
    }
    let mut enc = std::collections::BTreeMap::new();
    match object.get("annotations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(annotations)) => {
            for (key, value) in annotations {
                if key.starts_with(spec::ANNOTATION_ENC_PREFIX) {
                    enc.insert(key.clone(), value.as_str().map(str::to_string));
                }
            }
        }
        Some(_) => {
            return Err(malformed(
                format!("{path}.annotations"),
                "is not a JSON object",
            ))
        }
    }
    let stored: std::collections::BTreeMap<String, Option<String>> = entry
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    if enc != stored {
        return Err(differs(
            "its org.opencontainers.image.enc.* annotations differ from the ones the gateway wrote"
                .to_string(),
        ));
    }
    if let Some(field) = ["urls", "data"]
        .into_iter()
        .find(|f| object.contains_key(*f))
    {
        return Err(differs(format!("it carries {field}")));
    }
    Ok(())
}

// The ledger keeps entries and knows nothing of manifests; a manifest's entry is made here,
// from the rewrite that produced it.
impl LedgerEntry {
    /// The entry for a manifest once the registry stored it: digest and length of the
    /// rewritten body, the media type it was stored as, no annotations. Record it under the
    /// digest the client pushed the manifest under.
    pub fn for_manifest(rewritten: &Rewritten) -> LedgerEntry {
        LedgerEntry {
            encrypted_digest: rewritten.digest(),
            size: u64::try_from(rewritten.body.len()).unwrap_or(u64::MAX),
            annotations: BTreeMap::new(),
            media_type: Some(rewritten.descriptor_media_type().to_string()),
            recipients: None,
        }
    }
}

/// The digests a manifest or index names that `known` does not know, in order of first
/// mention: the ledger lookups the rewrite needs. More than `max` of them is refused
/// ([`ManifestError::TooManyLedgerLookups`]) before any lookup is made, so one request makes a
/// bounded number of registry requests ([`ledger::DEFAULT_MAX_LEDGER_LOOKUPS`] unless configured).
pub fn referenced_digests_bounded(
    body: &[u8],
    known: &dyn Fn(&Digest) -> bool,
    max: usize,
) -> Result<Vec<Digest>, ManifestError> {
    let unknown: Vec<Digest> = referenced_digests(body)
        .into_iter()
        .filter(|d| !known(d))
        .collect();
    if unknown.len() > max {
        return Err(ManifestError::TooManyLedgerLookups {
            count: unknown.len(),
            max,
        });
    }
    Ok(unknown)
}

/// Digests a manifest or index names (config, layers, children, subject): what a manifest
/// rewrite may need ledger entries for. Unbounded: see [`referenced_digests_bounded`].
pub fn referenced_digests(body: &[u8]) -> Vec<Digest> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut take = |v: Option<&serde_json::Value>| {
        if let Some(d) = v
            .and_then(|d| d.get("digest"))
            .and_then(|d| d.as_str())
            .and_then(|d| Digest::parse(d).ok())
        {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    };
    take(doc.get("config"));
    take(doc.get("subject"));
    for list in ["layers", "manifests"] {
        for item in doc
            .get(list)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
        {
            take(Some(item));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Fuzzing finding (manifest_rewrite): a rewritten manifest must keep the client's other
    /// fields, numbers included. serde_json's default float parsing is not exact, so a long
    /// number read back from the rewritten manifest was another number than the client's.
    #[test]
    fn rewrite_keeps_the_value_of_long_numbers() {
        let long = format!("{}9", "2".repeat(111));
        let layer = Digest::of(b"layer");
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":2}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":5,
               "x-long":{long},"x-float":0.30000000000000004,"x-exp":1e-300}}]}}"#,
            spec::MEDIA_TYPE_OCI_MANIFEST,
            spec::MEDIA_TYPE_OCI_CONFIG,
            Digest::of(b"{}"),
            layer
        );
        let entry = LedgerEntry {
            encrypted_digest: Digest::of(b"ciphertext"),
            size: 5,
            annotations: BTreeMap::new(),
            media_type: None,
            recipients: None,
        };
        let lookup = |d: &Digest| (*d == layer).then(|| entry.clone());
        let rewritten = rewrite(body.as_bytes(), spec::MEDIA_TYPE_OCI_MANIFEST, &lookup).unwrap();
        assert_eq!(rewritten.encrypted_layers, 1);
        let before: Value = serde_json::from_slice(body.as_bytes()).unwrap();
        let after: Value = serde_json::from_slice(&rewritten.body).unwrap();
        for field in ["x-long", "x-float", "x-exp"] {
            assert_eq!(
                before["layers"][0][field], after["layers"][0][field],
                "{field} changed"
            );
        }
    }
}
