//! The ledger: what the gateway encrypted, keyed by repository and plaintext digest, so that the
//! manifest (which names layers by their plaintext digests) can be rewritten to the ciphertext.
//!
//! Manifests whose digest changes when they are rewritten are ledgered too (plaintext manifest
//! digest → stored manifest), so that an index naming its children, or a referrer naming its
//! `subject`, by the digest the client computed can be pointed at what the registry holds. A
//! manifest entry carries its stored [`LedgerEntry::media_type`]; a blob entry has none.
//!
//! A child manifest pushed by digest cannot be stored under that digest once rewritten: the
//! gateway stores it under its new digest by callout (a referrer under a reserved tag,
//! [`ledger_tag`], instead; see `gateway::by_digest`). Reserved tags start with
//! [`RESERVED_TAG_PREFIX`] and belong to the gateway: clients must not write or delete them
//! ([`is_reserved_tag`]).
//!
//! # The ledger in the registry, and who can write it
//!
//! With replicas (`replicas.state_key`), the ledger is also kept in the registry, under the same
//! reserved tag `ocicrypt.sha256-<hex of D>` for digest `D`, and read back by any replica that
//! does not know `D`. Two kinds of manifest sit under such a tag:
//!
//! - **Blob records**, written by the gateway itself straight to the registry after it
//!   committed an encrypted blob ([`ledger_manifest_authenticated`]): `artifactType`
//!   [`LEDGER_ARTIFACT_TYPE`], the OCI empty descriptor as config and as its one layer, that
//!   layer annotated with the ciphertext's digest and size, the `enc.*` annotations and the
//!   recipients fingerprint (the ciphertext is never a descriptor of the record, so garbage
//!   collection keeps it only for the manifests that name it), and an annotation [`ANNOTATION_MAC`]: HMAC-SHA256 under the
//!   *ledger key* over a canonical encoding of the repository, the plaintext digest and every
//!   field of the entry. The ledger key is HMAC-SHA256(state key, `"ocicrypt-filter ledger
//!   v1"`): only holders of the replicas' state key can make one, and the key that seals upload
//!   state is never used as is for anything else. A record is read back
//!   ([`read_stored`]) only if it is byte for byte what the gateway would write for that
//!   repository and digest with that key (compared in constant time): a record without the
//!   MAC, with any field changed, copied from another repository or to another digest's tag,
//!   or made without the key is refused ([`StoredEntryError::Unauthenticated`]), and the caller
//!   should stop looking up.
//! - **Manifest records**: the same records for a manifest pushed by digest and stored under
//!   its new digest (a platform manifest), whose layer annotations also carry the stored media
//!   type; they read back as a manifest entry, and name the stored manifest in annotations
//!   only (garbage collection keeps it for the index that names it, not for the record).
//! - **Manifests clients pushed by digest** stored under the tag of the digest they were pushed
//!   as (referrers; platform manifests, by builds before manifest records), after checking the
//!   body hashes to it and rewriting it. Read back, such a manifest gives a *manifest* entry for itself (its digest,
//!   size and media type): what it vouches for is only that the manifest exists in the
//!   repository, and everything in it was checked when it was pushed. A manifest entry never
//!   counts for a layer or a config (see [`crate::distribution::manifest::rewrite_with`]), so a
//!   client's manifest can never be read back as a blob record: anything that looks like a blob
//!   record (its `artifactType` or config media type is [`LEDGER_ARTIFACT_TYPE`], in any letter
//!   case) is either an authentic record or nothing, and the manifest rewrite refuses client
//!   manifests that look like one.
//!
//! [`ledger_manifest`] and [`entry_from_stored`] are the unauthenticated forms this replaced;
//! they stay for callers not yet switched over.
//!
//! Reading the ledger back costs one registry request per unknown digest, so a manifest may
//! make at most [`DEFAULT_MAX_LEDGER_LOOKUPS`] (configurable) such lookups
//! ([`crate::distribution::manifest::referenced_digests_bounded`]).
use std::collections::BTreeMap;

use hmac::Mac as _;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::digest::Digest;

/// Prefix of every tag the gateway reserves for itself.
pub const RESERVED_TAG_PREFIX: &str = "ocicrypt.";

/// Prefix of the tag under which a rewritten manifest pushed by digest is stored, followed by
/// the 64 hex digits of the digest the client pushed it under.
const LEDGER_TAG_PREFIX: &str = "ocicrypt.sha256-";

/// One encrypted blob or rewritten manifest, as the manifest rewrite needs it. Holds no secret:
/// the symkey only appears wrapped inside the `keys.jwe` annotation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    /// Digest of the ciphertext blob, or of the rewritten manifest, the registry stores.
    pub encrypted_digest: Digest,
    /// Blob size (CTR keeps the plaintext size), or size of the rewritten manifest.
    pub size: u64,
    /// `org.opencontainers.image.enc.*` annotations to add to the layer descriptor (empty for
    /// a manifest).
    pub annotations: BTreeMap<String, String>,
    /// Media type of the stored manifest (a Docker v2s2 manifest is stored as an OCI image
    /// manifest, a Docker manifest list as an OCI index); `None` for a blob. Left out of the
    /// serialized form when `None`, so blob entries read and write as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Fingerprint of the recipients a blob's key was wrapped to
    /// ([`crate::format::recipients::fingerprint`]): a re-push may reuse the ciphertext only while
    /// the project's recipients are the same (after a rotation the layer is encrypted anew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<String>,
}

/// Shared-data key of a ledger entry. Repository names are `[a-z0-9._/-]`, so `@` separates.
pub fn key(repository: &str, plaintext: &Digest) -> String {
    format!("ocicrypt/ledger/{repository}@{plaintext}")
}

impl LedgerEntry {
    /// True when the entry describes a manifest rather than a blob.
    pub fn is_manifest(&self) -> bool {
        self.media_type.is_some()
    }

    /// Serialized form kept in shared data.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an entry written by [`LedgerEntry::to_bytes`] (including entries written before
    /// `media_type` existed); `None` for anything else (an empty value marks a removed entry).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The reserved tag under which a manifest pushed by digest `d` is stored once rewritten:
/// `ocicrypt.sha256-<64 hex>` (80 characters, a valid OCI tag).
pub fn ledger_tag(d: &Digest) -> String {
    format!("{LEDGER_TAG_PREFIX}{}", hex::encode(d.0))
}

/// The digest a tag made by [`ledger_tag`] stands for; `None` for any other reference.
pub fn digest_of_ledger_tag(tag: &str) -> Option<Digest> {
    let hex_part = tag.strip_prefix(LEDGER_TAG_PREFIX)?;
    Digest::parse(&format!("sha256:{hex_part}")).ok()
}

/// True when a manifest reference (the last segment of `/v2/<name>/manifests/<reference>`) is
/// a tag reserved to the gateway, which clients must not write or delete: it starts with
/// [`RESERVED_TAG_PREFIX`]. Compared without regard to ASCII case and after percent-decoding,
/// so that no spelling a registry might normalize slips through.
pub fn is_reserved_tag(reference: &str) -> bool {
    let decoded = percent_decode(reference);
    decoded
        .get(..RESERVED_TAG_PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(RESERVED_TAG_PREFIX.as_bytes()))
}

/// Decodes `%XX` escapes (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.as_bytes().iter();
    while let Some(&b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let rest = bytes.as_slice();
        match rest
            .get(..2)
            .filter(|pair| pair.iter().all(u8::is_ascii_hexdigit))
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        {
            Some(decoded) => {
                out.push(decoded);
                bytes.nth(1);
            }
            None => out.push(b),
        }
    }
    out
}

/// `artifactType` of the small manifests that keep the ledger in the registry itself, under the
/// reserved tag [`ledger_tag`] of the plaintext digest: every gateway replica, and a restarted
/// one, can read what another encrypted.
pub const LEDGER_ARTIFACT_TYPE: &str = "application/vnd.ocicrypt-filter.ledger.v1";
/// Media type of the ciphertext layer the records of earlier builds pointed at, which kept the
/// ciphertext from garbage collection for as long as the record's tag existed. Such a record
/// reads as superseded ([`StoredEntryError::Superseded`]): the layer is uploaded again and
/// recorded anew.
pub const LEDGER_LAYER_TYPE: &str = "application/vnd.ocicrypt-filter.ciphertext";
/// The OCI empty descriptor's content: the ledger manifests' config, and their one layer.
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// Media type of the OCI empty descriptor.
const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Annotation of a ledger record's layer naming the ciphertext's digest.
const ANNOTATION_CIPHERTEXT: &str = "org.ocicrypt-filter.ciphertext";
/// Annotation of a ledger record's layer giving the ciphertext's size in decimal.
const ANNOTATION_SIZE: &str = "org.ocicrypt-filter.size";
const ANNOTATION_PLAINTEXT: &str = "org.ocicrypt-filter.plaintext";
const ANNOTATION_RECIPIENTS: &str = "org.ocicrypt-filter.recipients";
/// Annotation of a manifest record's layer: the media type the manifest was stored as (a
/// record without it is a blob's).
const ANNOTATION_MEDIA_TYPE: &str = "org.ocicrypt-filter.media-type";

/// The ledger manifest recording that `plaintext` was stored as `entry` (a blob entry),
/// without a MAC: anyone can forge one. Use [`ledger_manifest_authenticated`].
pub fn ledger_manifest(plaintext: &Digest, entry: &LedgerEntry) -> Vec<u8> {
    serde_json::to_vec(&ledger_document(plaintext, entry, None)).unwrap_or_default()
}

/// The JSON document of a ledger manifest, with the MAC annotation when one is given.
///
/// The record names the ciphertext in annotations of its one layer, the OCI empty descriptor,
/// never as a descriptor of its own: the registry's garbage collection then keeps a ciphertext
/// only while a manifest a client pushed names it, and the empty config is the record's only
/// blob. A record can so outlive its ciphertext; the gateway checks the ciphertext is there
/// before it reuses one (a `HEAD` asks the registry about it, a mount of a gone blob is an
/// upload, a manifest naming a gone blob is refused by the registry).
fn ledger_document(
    plaintext: &Digest,
    entry: &LedgerEntry,
    mac: Option<&[u8; 32]>,
) -> serde_json::Value {
    let mut layer_annotations = serde_json::Map::new();
    layer_annotations.insert(
        ANNOTATION_CIPHERTEXT.to_string(),
        serde_json::Value::String(entry.encrypted_digest.to_string()),
    );
    layer_annotations.insert(
        ANNOTATION_SIZE.to_string(),
        serde_json::Value::String(entry.size.to_string()),
    );
    for (k, v) in &entry.annotations {
        layer_annotations.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    if let Some(r) = &entry.recipients {
        layer_annotations.insert(
            ANNOTATION_RECIPIENTS.to_string(),
            serde_json::Value::String(r.clone()),
        );
    }
    if let Some(t) = &entry.media_type {
        layer_annotations.insert(
            ANNOTATION_MEDIA_TYPE.to_string(),
            serde_json::Value::String(t.clone()),
        );
    }
    let empty = || {
        serde_json::json!({
            "mediaType": MEDIA_TYPE_EMPTY,
            "digest": Digest::of(EMPTY_CONFIG).to_string(),
            "size": EMPTY_CONFIG.len(),
        })
    };
    let mut layer = empty();
    if let Some(fields) = layer.as_object_mut() {
        fields.insert(
            "annotations".to_string(),
            serde_json::Value::Object(layer_annotations),
        );
    }
    let mut doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::spec::MEDIA_TYPE_OCI_MANIFEST,
        "artifactType": LEDGER_ARTIFACT_TYPE,
        "config": empty(),
        "layers": [layer],
        "annotations": { ANNOTATION_PLAINTEXT: plaintext.to_string() },
    });
    if let (Some(mac), Some(annotations)) = (
        mac,
        doc.get_mut("annotations")
            .and_then(serde_json::Value::as_object_mut),
    ) {
        annotations.insert(
            ANNOTATION_MAC.to_string(),
            serde_json::Value::String(hex::encode(mac)),
        );
    }
    doc
}

/// Annotation of a ledger manifest holding its MAC: 64 lowercase hex digits of HMAC-SHA256
/// under the ledger key (see the module documentation).
pub const ANNOTATION_MAC: &str = "org.ocicrypt-filter.mac";
/// What the ledger key is derived with from the replicas' state key (domain separation: the
/// state key itself seals upload state and is used for nothing else).
const LEDGER_KEY_LABEL: &[u8] = b"ocicrypt-filter ledger v1";
/// First bytes of every MAC input, naming the encoding's version.
const ENTRY_MAC_DOMAIN: &[u8] = b"ocicrypt-filter ledger entry v1";

/// How many unknown digests one manifest may make the gateway look up in the registry's
/// ledger: real images have at most 127 layers, plus a config and a subject.
pub const DEFAULT_MAX_LEDGER_LOOKUPS: usize = 128;

/// HMAC-SHA256 of the parts, each prefixed with its length (so no two sequences of parts
/// encode alike). `None` only if the HMAC cannot be keyed, which it always can.
fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> Option<[u8; 32]> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key).ok()?;
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    Some(mac.finalize().into_bytes().into())
}

/// The ledger key: HMAC-SHA256(state key, [`LEDGER_KEY_LABEL`]).
fn ledger_key(state_key: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(state_key).ok()?;
    mac.update(LEDGER_KEY_LABEL);
    Some(Zeroizing::new(mac.finalize().into_bytes().into()))
}

/// The MAC of a blob record: HMAC-SHA256 under the ledger key over the canonical encoding of
/// (domain, repository, plaintext digest, ciphertext digest, size, the annotations in key
/// order, media type, recipients fingerprint); every variable-length part is length-prefixed
/// and each optional field is marked present or absent.
fn entry_mac(
    state_key: &[u8; 32],
    repository: &str,
    plaintext: &Digest,
    entry: &LedgerEntry,
) -> Option<[u8; 32]> {
    let key = ledger_key(state_key)?;
    let count = (entry.annotations.len() as u64).to_be_bytes();
    let size = entry.size.to_be_bytes();
    let optional = |v: &Option<String>| -> (&'static [u8], Vec<u8>) {
        match v {
            Some(s) => (b"\x01", s.as_bytes().to_vec()),
            None => (b"\x00", Vec::new()),
        }
    };
    let (media_type_flag, media_type) = optional(&entry.media_type);
    let (recipients_flag, recipients) = optional(&entry.recipients);
    let mut parts: Vec<&[u8]> = vec![
        ENTRY_MAC_DOMAIN,
        repository.as_bytes(),
        &plaintext.0,
        &entry.encrypted_digest.0,
        &size,
        &count,
    ];
    for (k, v) in &entry.annotations {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    parts.extend([
        media_type_flag,
        media_type.as_slice(),
        recipients_flag,
        recipients.as_slice(),
    ]);
    hmac_parts(key.as_slice(), &parts)
}

/// The ledger manifest recording that `plaintext` was stored as `entry` in `repository`,
/// authenticated with a MAC under the ledger key derived from the replicas' `state_key` (see
/// the module documentation). A manifest entry (a manifest pushed by digest, stored under its
/// new digest) carries its stored media type, and reads back as a manifest entry.
pub fn ledger_manifest_authenticated(
    state_key: &[u8; 32],
    repository: &str,
    plaintext: &Digest,
    entry: &LedgerEntry,
) -> Vec<u8> {
    let Some(mac) = entry_mac(state_key, repository, plaintext, entry) else {
        return Vec::new();
    };
    serde_json::to_vec(&ledger_document(plaintext, entry, Some(&mac))).unwrap_or_default()
}

/// Why a manifest read from under a ledger tag gives no ledger entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoredEntryError {
    /// The body is not a JSON object.
    #[error("the stored manifest is not a JSON object")]
    NotJson,
    /// It looks like a ledger record but is not one the gateway wrote for this repository and
    /// digest with this key: forged, altered, moved, or written without a MAC. Stop reading the
    /// ledger for this request.
    #[error("the stored ledger record is not authentic")]
    Unauthenticated,
    /// A record in the format of earlier builds, whose layer was the ciphertext itself (kept
    /// from garbage collection for good). Not read: the blob counts as unknown, is uploaded
    /// again, and its new record replaces this one.
    #[error("the stored ledger record is in a superseded format")]
    Superseded,
}

/// True when a manifest looks like one of the gateway's ledger records: its `artifactType` or
/// config media type is [`LEDGER_ARTIFACT_TYPE`], without regard to ASCII case or surrounding
/// blanks. Such manifests are only ever authentic ledger records or nothing
/// ([`read_stored`]); clients cannot push them ([`crate::distribution::manifest::rewrite_with`])
/// nor delete them.
pub fn is_ledger_record(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|doc| looks_like_ledger(&doc))
}

fn looks_like_ledger(doc: &serde_json::Value) -> bool {
    let is_ledger = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(LEDGER_ARTIFACT_TYPE))
    };
    is_ledger(doc.get("artifactType"))
        || is_ledger(doc.get("config").and_then(|c| c.get("mediaType")))
}

/// The ledger entry the manifest stored under [`ledger_tag`]`(plaintext)` in `repository`
/// stands for:
/// - a ledger record (see [`is_ledger_record`]) gives its blob entry only if it is byte for
///   byte what [`ledger_manifest_authenticated`] writes for this key, repository and digest
///   (compared in constant time); otherwise [`StoredEntryError::Unauthenticated`];
/// - any other manifest (an index child or referrer the gateway rewrote and stored under the
///   tag) gives a manifest entry for itself, never a blob entry.
pub fn read_stored(
    state_key: &[u8; 32],
    repository: &str,
    plaintext: &Digest,
    body: &[u8],
) -> Result<LedgerEntry, StoredEntryError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| StoredEntryError::NotJson)?;
    if !doc.is_object() {
        return Err(StoredEntryError::NotJson);
    }
    if !looks_like_ledger(&doc) {
        return Ok(manifest_entry_of(&doc, body));
    }
    if is_superseded(&doc) {
        return Err(StoredEntryError::Superseded);
    }
    let entry = blob_entry_of(&doc).ok_or(StoredEntryError::Unauthenticated)?;
    let expected = ledger_manifest_authenticated(state_key, repository, plaintext, &entry);
    if expected.is_empty() || !bool::from(expected.as_slice().ct_eq(body)) {
        return Err(StoredEntryError::Unauthenticated);
    }
    Ok(entry)
}

/// [`read_stored`] without the reason: the entry, or `None` for anything the gateway did not
/// write for exactly this repository and digest (and for unreadable bodies).
pub fn entry_from_stored_authenticated(
    state_key: &[u8; 32],
    repository: &str,
    plaintext: &Digest,
    body: &[u8],
) -> Option<LedgerEntry> {
    read_stored(state_key, repository, plaintext, body).ok()
}

/// Whether a ledger-looking document is a record of the superseded format (its one layer is
/// the ciphertext, of type [`LEDGER_LAYER_TYPE`]).
fn is_superseded(doc: &serde_json::Value) -> bool {
    doc.get("layers")
        .and_then(serde_json::Value::as_array)
        .and_then(|layers| layers.first())
        .and_then(|layer| layer.get("mediaType"))
        .and_then(serde_json::Value::as_str)
        == Some(LEDGER_LAYER_TYPE)
}

/// The blob entry a ledger record's fields describe (not yet authenticated).
fn blob_entry_of(doc: &serde_json::Value) -> Option<LedgerEntry> {
    let layers = doc.get("layers")?.as_array()?;
    let [layer] = layers.as_slice() else {
        return None;
    };
    let mut annotations = BTreeMap::new();
    let mut recipients = None;
    let mut media_type = None;
    let mut ciphertext = None;
    let mut size = None;
    for (k, v) in layer
        .get("annotations")
        .and_then(|a| a.as_object())
        .into_iter()
        .flatten()
    {
        let v = v.as_str()?.to_string();
        match k.as_str() {
            ANNOTATION_RECIPIENTS => recipients = Some(v),
            ANNOTATION_MEDIA_TYPE => media_type = Some(v),
            ANNOTATION_CIPHERTEXT => ciphertext = Some(Digest::parse(&v).ok()?),
            ANNOTATION_SIZE => size = Some(v.parse::<u64>().ok()?),
            _ => {
                annotations.insert(k.clone(), v);
            }
        }
    }
    Some(LedgerEntry {
        encrypted_digest: ciphertext?,
        size: size?,
        annotations,
        media_type,
        recipients,
    })
}

/// The manifest entry for a stored manifest that is not a ledger record: itself.
fn manifest_entry_of(doc: &serde_json::Value, body: &[u8]) -> LedgerEntry {
    let media_type = doc
        .get("mediaType")
        .and_then(|v| v.as_str())
        .unwrap_or(crate::spec::MEDIA_TYPE_OCI_MANIFEST)
        .to_string();
    LedgerEntry {
        encrypted_digest: Digest::of(body),
        size: u64::try_from(body.len()).unwrap_or(u64::MAX),
        annotations: BTreeMap::new(),
        media_type: Some(media_type),
        recipients: None,
    }
}

/// The ledger entry a manifest stored under a ledger tag stands for: a ledger manifest gives
/// its blob entry; any other manifest (an index child or referrer the gateway rewrote and
/// stored under the tag) gives a manifest entry for itself. `None` when unreadable.
///
/// Unauthenticated: a client that gets a ledger-looking manifest stored under a ledger tag
/// makes it a blob entry. Use [`entry_from_stored_authenticated`] (or [`read_stored`]).
pub fn entry_from_stored(body: &[u8]) -> Option<LedgerEntry> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    if doc.get("artifactType").and_then(|v| v.as_str()) == Some(LEDGER_ARTIFACT_TYPE) {
        return blob_entry_of(&doc);
    }
    let media_type = doc
        .get("mediaType")
        .and_then(|v| v.as_str())
        .unwrap_or(crate::spec::MEDIA_TYPE_OCI_MANIFEST)
        .to_string();
    Some(LedgerEntry {
        encrypted_digest: Digest::of(body),
        size: body.len() as u64,
        annotations: BTreeMap::new(),
        media_type: Some(media_type),
        recipients: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distribution::manifest::{referenced_digests, Rewritten};

    fn blob_entry() -> LedgerEntry {
        LedgerEntry {
            encrypted_digest: Digest::of(b"ciphertext"),
            size: 42,
            annotations: BTreeMap::from([(
                "org.opencontainers.image.enc.pubopts".to_string(),
                "e30=".to_string(),
            )]),
            media_type: None,
            recipients: None,
        }
    }

    #[test]
    fn serde_round_trips_old_and_new_format() {
        let cipher = Digest::of(b"ciphertext");
        // Written before `media_type` existed: still a blob entry.
        let old = format!(
            r#"{{"encrypted_digest":"{cipher}","size":42,"annotations":{{"org.opencontainers.image.enc.pubopts":"e30="}}}}"#
        );
        assert_eq!(LedgerEntry::from_bytes(old.as_bytes()), Some(blob_entry()));
        // A blob entry is written exactly as before, so older readers still read it.
        assert_eq!(blob_entry().to_bytes(), old.into_bytes());

        let manifest = LedgerEntry {
            encrypted_digest: cipher,
            size: 1234,
            annotations: BTreeMap::new(),
            media_type: Some("application/vnd.oci.image.index.v1+json".to_string()),
            recipients: None,
        };
        let bytes = manifest.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains(r#""media_type":"application/vnd.oci.image.index.v1+json""#),
            "{text}"
        );
        assert_eq!(LedgerEntry::from_bytes(&bytes), Some(manifest.clone()));
        assert!(manifest.is_manifest());
        assert!(!blob_entry().is_manifest());

        // Explicit null reads as a blob entry.
        let null = format!(
            r#"{{"encrypted_digest":"{cipher}","size":1,"annotations":{{}},"media_type":null}}"#
        );
        assert_eq!(
            LedgerEntry::from_bytes(null.as_bytes()).map(|e| e.media_type),
            Some(None)
        );
    }

    #[test]
    fn from_bytes_refuses_other_shapes() {
        let cipher = Digest::of(b"ciphertext");
        for bad in [
            String::new(),
            "{}".to_string(),
            format!(r#"{{"encrypted_digest":"{cipher}","size":1,"annotations":{{}},"extra":1}}"#),
            format!(
                r#"{{"encrypted_digest":"{cipher}","size":1,"annotations":{{}},"media_type":7}}"#
            ),
            r#"{"encrypted_digest":"sha512:00","size":1,"annotations":{}}"#.to_string(),
        ] {
            assert_eq!(LedgerEntry::from_bytes(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn entry_for_a_rewritten_manifest() {
        let body = br#"{"schemaVersion":2}"#.to_vec();
        for (content_type, stored) in [
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
            ),
            (
                "application/vnd.oci.image.index.v1+json; charset=utf-8",
                "application/vnd.oci.image.index.v1+json",
            ),
            (
                "Application/VND.OCI.image.manifest.v1+json",
                "application/vnd.oci.image.manifest.v1+json",
            ),
        ] {
            let rewritten = Rewritten {
                body: body.clone(),
                media_type: content_type.to_string(),
                encrypted_layers: 0,
                rewritten_references: 0,
            };
            let entry = LedgerEntry::for_manifest(&rewritten);
            assert_eq!(entry.encrypted_digest, Digest::of(&body));
            assert_eq!(entry.size, body.len() as u64);
            assert!(entry.annotations.is_empty());
            assert_eq!(entry.media_type.as_deref(), Some(stored), "{content_type}");
        }
    }

    /// The OCI distribution spec's tag grammar, `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    fn is_valid_tag(tag: &str) -> bool {
        let mut chars = tag.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag.len() <= 128
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }

    #[test]
    fn ledger_tags() {
        let d = Digest::of(b"manifest");
        let tag = ledger_tag(&d);
        assert_eq!(tag, format!("ocicrypt.sha256-{}", hex::encode(d.0)));
        assert_eq!(tag.len(), 80);
        assert!(is_valid_tag(&tag), "{tag}");
        assert!(is_reserved_tag(&tag));
        assert_eq!(digest_of_ledger_tag(&tag), Some(d));

        for other in [
            "latest",
            "ocicrypt.sha256-",
            "ocicrypt.sha256-abc",
            &format!("ocicrypt.sha256-{}", hex::encode(d.0).to_uppercase()),
            &format!("ocicrypt.sha256-{}0", hex::encode(d.0)),
            &format!("ocicrypt.sha512-{}", hex::encode(d.0)),
            &format!("sha256-{}", hex::encode(d.0)),
            &d.to_string(),
        ] {
            assert_eq!(digest_of_ledger_tag(other), None, "{other}");
        }
    }

    #[test]
    fn reserved_tags() {
        for reserved in [
            "ocicrypt.",
            "ocicrypt.sha256-00",
            "ocicrypt.ledger",
            "OCICRYPT.anything",
            "Ocicrypt.x",
            "ocicrypt%2Esha256-00",
            "ocicrypt%2esha256-00",
            "%6Fcicrypt.x",
        ] {
            assert!(is_reserved_tag(reserved), "{reserved}");
        }
        for free in [
            "latest",
            "v1.0",
            "ocicrypt",
            "ocicrypt-1.0",
            "ocicrypt_x",
            "my.ocicrypt.x",
            "sha256-0123.sig",
            "ocicrypt%2",
            "ocicrypt%+E",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "",
        ] {
            assert!(!is_reserved_tag(free), "{free}");
        }
    }

    #[test]
    fn ledger_manifests_round_trip() {
        let plain = Digest::of(b"layer");
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "org.opencontainers.image.enc.pubopts".to_string(),
            "cHVi".to_string(),
        );
        let entry = LedgerEntry {
            encrypted_digest: Digest::of(b"cipher"),
            size: 5,
            annotations,
            media_type: None,
            recipients: Some("ab".into()),
        };
        let body = ledger_manifest(&plain, &entry);
        assert_eq!(entry_from_stored(&body), Some(entry));
        // The record's only blob is the empty descriptor: garbage collection never keeps the
        // ciphertext for its sake.
        assert_eq!(referenced_digests(&body), [Digest::of(EMPTY_CONFIG)]);
        let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let e = entry_from_stored(other).unwrap();
        assert_eq!(e.encrypted_digest, Digest::of(other));
        assert_eq!(
            e.media_type.as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
    }
}
