//! Manifests that name other manifests: the children of an OCI image index (or Docker manifest
//! list), and the `subject` of an OCI 1.1 referrer (signature, SBOM, attestation).
//!
//! In an encrypted repository a child manifest is rewritten when it is pushed, so the registry
//! holds it under another digest than the one its index names. The ledger maps the digest the
//! client pushed a manifest under to the manifest the registry stores
//! ([`LedgerEntry::media_type`] set); these functions point the references at the stored one.
//! [`crate::distribution::manifest::rewrite`] is the entry point; this module holds its index half.
use serde_json::{Map, Value};

use crate::digest::Digest;
use crate::distribution::ledger::LedgerEntry;
use crate::distribution::manifest::{
    check_spelling, malformed, read_descriptor, ManifestError, DESCRIPTOR_FIELDS,
};
use crate::spec;

/// Top-level index fields whose spelling is checked (Go decoders match names case-insensitively).
pub(crate) const INDEX_FIELDS: &[&str] = &[
    "schemaVersion",
    "mediaType",
    "artifactType",
    "manifests",
    "subject",
    "annotations",
];

/// Annotation with which BuildKit ties an attestation manifest to the image manifest it
/// describes (next to `vnd.docker.reference.type: attestation-manifest`).
pub const ANNOTATION_DOCKER_REFERENCE_DIGEST: &str = "vnd.docker.reference.digest";

/// The ledger entry of a manifest the gateway stored for a digest a client pushed it under;
/// blob entries do not count.
pub(crate) fn manifest_entry(
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
    digest: &Digest,
) -> Option<LedgerEntry> {
    lookup(digest).filter(LedgerEntry::is_manifest)
}

/// The media type a manifest of `media_type` has once stored in an encrypted repository:
/// Docker v2s2 manifests are stored as OCI image manifests, Docker manifest lists as OCI
/// indexes; other types are unchanged.
pub fn oci_manifest_type(media_type: &str) -> &str {
    if media_type == spec::MEDIA_TYPE_DOCKER_MANIFEST {
        spec::MEDIA_TYPE_OCI_MANIFEST
    } else if media_type == spec::MEDIA_TYPE_DOCKER_MANIFEST_LIST {
        spec::MEDIA_TYPE_OCI_INDEX
    } else {
        media_type
    }
}

/// Points a descriptor object at the stored manifest `entry` describes (digest, size, media
/// type), keeping every other field and the field order. When the digest changes, `data` (the
/// old manifest embedded) and `urls` (where the old one may be fetched) are dropped. Returns
/// whether anything changed.
fn point_at(object: &mut Map<String, Value>, entry: &LedgerEntry) -> bool {
    let digest = entry.encrypted_digest.to_string();
    let media_type = entry.media_type.as_deref().map(oci_manifest_type);
    let digest_changed = object.get("digest").and_then(Value::as_str) != Some(digest.as_str());
    let size_changed = object.get("size").and_then(Value::as_u64) != Some(entry.size);
    let type_changed =
        media_type.is_some_and(|t| object.get("mediaType").and_then(Value::as_str) != Some(t));
    if !(digest_changed || size_changed || type_changed) {
        return false;
    }
    if let Some(t) = media_type {
        object.insert("mediaType".to_string(), Value::String(t.to_string()));
    }
    object.insert("digest".to_string(), Value::String(digest));
    object.insert("size".to_string(), Value::from(entry.size));
    if digest_changed {
        object.retain(|key, _| key != "data" && key != "urls");
    }
    true
}

/// `os/architecture[/variant]` of a child's `platform`, for messages.
fn describe_platform(object: &Map<String, Value>) -> String {
    let Some(platform) = object.get("platform").and_then(Value::as_object) else {
        return "none".to_string();
    };
    let field = |name: &str| platform.get(name).and_then(Value::as_str);
    let mut out = format!(
        "{}/{}",
        field("os").unwrap_or("?"),
        field("architecture").unwrap_or("?")
    );
    if let Some(variant) = field("variant") {
        out.push('/');
        out.push_str(variant);
    }
    out
}

/// Rewrites `manifests[]` of an index: every child must be a manifest the gateway stored in
/// this repository, and is pointed at the stored manifest; BuildKit's
/// [`ANNOTATION_DOCKER_REFERENCE_DIGEST`] follows its target. Returns how many descriptors
/// changed.
pub(crate) fn rewrite_children(
    index: &mut Map<String, Value>,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
) -> Result<usize, ManifestError> {
    let children = match index.get_mut("manifests") {
        Some(Value::Array(children)) => children,
        Some(_) => return Err(malformed("manifests".to_string(), "is not an array")),
        None => {
            return Err(malformed(
                "manifests".to_string(),
                "is missing: an index lists its manifests",
            ))
        }
    };
    let mut rewritten = 0usize;
    for (position, child) in children.iter_mut().enumerate() {
        let path = format!("manifests[{position}]");
        let descriptor = read_descriptor(child, &path)?;
        let Some(object) = child.as_object_mut() else {
            return Err(malformed(path, "is not a JSON object"));
        };
        let entry = Digest::parse(&descriptor.digest)
            .ok()
            .and_then(|d| manifest_entry(lookup, &d));
        let Some(entry) = entry else {
            return Err(ManifestError::UnknownChild {
                child: position,
                digest: descriptor.digest,
                platform: describe_platform(object),
            });
        };
        let mut changed = point_at(object, &entry);
        changed |= rewrite_reference_annotation(object, lookup, &path)?;
        if changed {
            rewritten += 1;
        }
    }
    Ok(rewritten)
}

/// Points BuildKit's `vnd.docker.reference.digest` annotation of an attestation manifest at
/// the stored image manifest when the ledger knows the one it names.
fn rewrite_reference_annotation(
    object: &mut Map<String, Value>,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
    path: &str,
) -> Result<bool, ManifestError> {
    let annotations = match object.get_mut("annotations") {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(annotations)) => annotations,
        Some(_) => {
            return Err(malformed(
                format!("{path}.annotations"),
                "is not a JSON object",
            ))
        }
    };
    let Some(value) = annotations.get_mut(ANNOTATION_DOCKER_REFERENCE_DIGEST) else {
        return Ok(false);
    };
    let Some(entry) = value
        .as_str()
        .and_then(|s| Digest::parse(s).ok())
        .and_then(|d| manifest_entry(lookup, &d))
    else {
        return Ok(false);
    };
    let stored = entry.encrypted_digest.to_string();
    if value.as_str() == Some(stored.as_str()) {
        return Ok(false);
    }
    *value = Value::String(stored);
    Ok(true)
}

/// Points the `subject` of a manifest or index at the stored manifest when the ledger knows the
/// one it names; a subject the ledger does not know (an image the gateway did not rewrite, such
/// as one encrypted before it was pushed) is left as it is. Returns whether it changed.
pub(crate) fn rewrite_subject(
    document: &mut Map<String, Value>,
    lookup: &dyn Fn(&Digest) -> Option<LedgerEntry>,
) -> Result<bool, ManifestError> {
    let subject = match document.get_mut("subject") {
        None | Some(Value::Null) => return Ok(false),
        Some(Value::Object(subject)) => subject,
        Some(_) => return Err(malformed("subject".to_string(), "is not a JSON object")),
    };
    check_spelling(subject, DESCRIPTOR_FIELDS, "subject.")?;
    let entry = match subject.get("digest") {
        Some(Value::String(digest)) => Digest::parse(digest)
            .ok()
            .and_then(|d| manifest_entry(lookup, &d)),
        Some(_) => return Err(malformed("subject.digest".to_string(), "is not a string")),
        None => return Err(malformed("subject.digest".to_string(), "is missing")),
    };
    Ok(entry.is_some_and(|entry| point_at(subject, &entry)))
}
