//! One repository brought in line with the target recipients.
//!
//! # Whose keys is a layer wrapped to?
//!
//! A JWE does not say: RSA-OAEP entries carry no key identifier, and an `ECDH-ES+A256KW` entry
//! only an ephemeral key. So the tool takes the answer from a record that can be trusted, in
//! this order, and otherwise assumes the worst:
//!
//! 1. the annotations this tool writes on every layer it re-wraps or re-encrypts,
//!    [`ANN_RECIPIENT_KEYS`] (the per-key ids, [`key_id`]) authenticated by [`ANN_RECIPIENT_MAC`]:
//!    HMAC-SHA256 under a key derived from the layer key, over the JWE and the ids. Only a
//!    holder of the layer key can make one, i.e. a recipient, who could read the layer anyway;
//!    the registry cannot, so it cannot make the tool skip a layer;
//! 2. the gateway's ledger record for the layer's plaintext digest in the repository, if it
//!    authenticates under the replicas' state key and describes exactly this ciphertext and
//!    JWE: it holds the fingerprint of the recipient set ([`fingerprint`]), so the old set is
//!    the subset of the target whose fingerprint it is, or is not within the target at all;
//! 3. otherwise the recipients are unknown, and the layer is re-encrypted: only that
//!    guarantees that no removed recipient can open it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::Mac as _;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::{
    digest_of_ledger_tag, is_ledger_record, ledger_manifest_authenticated, ledger_tag, read_stored,
    LedgerEntry,
};
use ocicrypt_core::format::blockcipher::{EncryptedLayer, LayerDecryptor, LayerEncryptor};
use ocicrypt_core::format::keywrap::{layer_annotations, unwrap_private_options, PrivateKey};
use ocicrypt_core::format::recipients::{fingerprint, Recipient};
use ocicrypt_core::spec::{
    ANNOTATION_ENC_PREFIX, ANNOTATION_KEYS_JWE, ANNOTATION_PUBOPTS, ENCRYPTED_SUFFIX,
    MEDIA_TYPE_OCI_MANIFEST,
};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::registry::{Manifest, Registry};

/// Per-key ids of the recipients a layer's key is wrapped to (sorted, comma-separated).
pub const ANN_RECIPIENT_KEYS: &str = "org.ocicrypt-filter.recipient-keys";
/// MAC of [`ANN_RECIPIENT_KEYS`] (hex), see the module documentation.
pub const ANN_RECIPIENT_MAC: &str = "org.ocicrypt-filter.recipient-keys.mac";
/// Derivation label of the MAC key (domain separation from every other use of the layer key).
const RECIPIENT_MAC_LABEL: &[u8] = b"ocicrypt-filter recipient-keys v1";
/// Larger target sets are not searched for the subset a ledger fingerprint names (2^n sets).
const MAX_SUBSET_SEARCH: usize = 16;
/// Bytes read from the registry per step of a re-encryption.
const CHUNK: usize = 1024 * 1024;

/// The id of one recipient key: the fingerprint of the set holding only it.
pub fn key_id(r: &Recipient) -> String {
    fingerprint(std::slice::from_ref(r))
}

/// The recipients to bring every layer to.
pub struct Target {
    /// The verified keys.
    pub recipients: Vec<Recipient>,
    /// Their ids.
    pub ids: BTreeSet<String>,
    /// Fingerprint of the whole set, as the gateway's ledger writes it.
    pub fingerprint: String,
}

impl Target {
    /// The target set of `recipients`.
    pub fn new(recipients: Vec<Recipient>) -> Target {
        let ids = recipients.iter().map(key_id).collect();
        let fingerprint = fingerprint(&recipients);
        Target {
            recipients,
            ids,
            fingerprint,
        }
    }

    /// The subset of the target whose set fingerprint is `fp`, if there is one.
    fn subset_with_fingerprint(&self, fp: &str) -> Option<BTreeSet<String>> {
        let n = self.recipients.len();
        if n > MAX_SUBSET_SEARCH {
            return (fp == self.fingerprint).then(|| self.ids.clone());
        }
        (1u32..(1u32 << n)).find_map(|mask| {
            let subset: Vec<Recipient> = self
                .recipients
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, r)| r.clone())
                .collect();
            (fingerprint(&subset) == fp).then(|| subset.iter().map(key_id).collect())
        })
    }
}

/// What was done, for the summary.
#[derive(Default, Debug, Clone)]
pub struct Stats {
    /// Repositories of the project visited.
    pub repositories: u64,
    /// Image manifests and indexes examined (distinct digests).
    pub manifests: u64,
    /// Encrypted layers examined (distinct digest and JWE per repository).
    pub layers: u64,
    /// Layers already wrapped to exactly the target.
    pub unchanged: u64,
    /// Layers whose key was wrapped again (no layer byte moved).
    pub rewrapped: u64,
    /// Layers decrypted and encrypted with a new key.
    pub reencrypted: u64,
    /// Of those, layers an earlier interrupted run had already re-encrypted (found through
    /// the ledger; nothing moved).
    pub resumed: u64,
    /// Layers none of the given keys opens, or that failed: left untouched.
    pub failed: u64,
    /// Ciphertext bytes downloaded.
    pub bytes_downloaded: u64,
    /// Ciphertext bytes uploaded.
    pub bytes_uploaded: u64,
    /// Manifests and indexes written (by digest).
    pub manifests_written: u64,
    /// Tags pointed at a rewritten manifest (reserved child tags included).
    pub tags_repointed: u64,
    /// Gateway ledger records rewritten for the new ciphertext or JWE.
    pub ledger_updated: u64,
    /// Ledger records left naming the old ciphertext or JWE (no state key, or a record that
    /// does not authenticate under it).
    pub ledger_stale: u64,
    /// Referrers (manifests with a `subject`) pointed at a rewritten manifest: any signature
    /// over the old digest must be made again.
    pub referrers_repointed: u64,
    /// Manifests and indexes this run replaced, deleted by digest (`--delete-replaced`).
    pub manifests_deleted: u64,
}

/// What a run may do.
pub struct Settings<'a> {
    /// The keys tried on each layer's JWE.
    pub keys: &'a [PrivateKey],
    /// The target recipients.
    pub target: &'a Target,
    /// The replicas' state key, to read and write the gateway's ledger records.
    pub state_key: Option<&'a [u8; 32]>,
    /// Only say what would change.
    pub dry_run: bool,
    /// Delete, once every tag is repointed, the manifests this run replaced (the old index and
    /// platform manifests, the old images and referrers): a collection without
    /// `--delete-untagged` then frees their ciphertext, and multi-platform images, whose
    /// platform manifests are untagged, are kept whole (distribution 2.8's `--delete-untagged`
    /// collects those).
    pub delete_replaced: bool,
}

/// What to do with one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    Keep,
    Rewrap,
    Reencrypt(String),
}

/// One layer as planned: its descriptor, opened key material and what to do.
struct Planned {
    descriptor: Value,
    private: ocicrypt_core::format::keywrap::PrivateOptions,
    hmac: [u8; 32],
    plan: Plan,
}

/// A manifest rewritten: its new bytes, digest and media type.
#[derive(Clone, Debug)]
struct Rewritten {
    body: Vec<u8>,
    digest: String,
    media_type: String,
}

/// One repository's run.
pub struct RepoRun<'a, 'r> {
    reg: &'r mut Registry,
    repo: String,
    settings: &'r Settings<'a>,
    /// Stored ledger records by plaintext digest (their bytes).
    ledger: HashMap<Digest, Vec<u8>>,
    /// Layers done, by (ciphertext digest, JWE annotation): the new descriptor, if any.
    layers: HashMap<(String, String), Option<Value>>,
    /// Layers re-encrypted, by old ciphertext digest: the new descriptor.
    reencrypted: HashMap<String, Value>,
    /// Manifests done, by old digest: the rewrite, if any; `Err` when left untouched.
    manifests: HashMap<String, Result<Option<Rewritten>, String>>,
    /// Ledger records already rewritten in this run.
    ledger_written: BTreeSet<Digest>,
    /// Out.
    pub stats: Stats,
    /// What to report (stale ledger records, repointed referrers).
    pub notes: Vec<String>,
    /// What was left untouched and why: the run has not brought everything in line.
    pub problems: Vec<String>,
}

fn is_index(media_type: &str, doc: &Value) -> bool {
    media_type.contains("index")
        || media_type.contains("manifest.list")
        || doc.get("manifests").is_some()
}

fn annotation<'v>(descriptor: &'v Value, name: &str) -> Option<&'v str> {
    descriptor.get("annotations")?.get(name)?.as_str()
}

/// HMAC key for [`ANN_RECIPIENT_MAC`], derived from the layer key.
fn recipient_mac(symkey: &[u8; 32], jwe: &str, ids: &str) -> Option<[u8; 32]> {
    let mut k = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(symkey).ok()?;
    k.update(RECIPIENT_MAC_LABEL);
    let key = Zeroizing::new(<[u8; 32]>::from(k.finalize().into_bytes()));
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key.as_slice()).ok()?;
    for part in [jwe.as_bytes(), ids.as_bytes()] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    Some(mac.finalize().into_bytes().into())
}

/// The hmac in the `pubopts` annotation.
fn pubopts_hmac(descriptor: &Value) -> Result<[u8; 32], String> {
    let b64 = annotation(descriptor, ANNOTATION_PUBOPTS).ok_or("no pubopts annotation")?;
    let json = STANDARD
        .decode(b64)
        .map_err(|_| "pubopts is not base64".to_owned())?;
    let doc: Value = serde_json::from_slice(&json).map_err(|e| format!("pubopts: {e}"))?;
    let cipher = doc.get("cipher").and_then(Value::as_str).unwrap_or("");
    if cipher != ocicrypt_core::spec::CIPHER_AES_256_CTR_HMAC_SHA256 {
        return Err(format!("unsupported cipher {cipher:?}"));
    }
    let hmac = doc
        .get("hmac")
        .and_then(Value::as_str)
        .and_then(|h| STANDARD.decode(h).ok())
        .ok_or("pubopts has no hmac")?;
    hmac.try_into()
        .map_err(|_| "pubopts hmac is not 32 bytes".to_owned())
}

impl<'a, 'r> RepoRun<'a, 'r> {
    /// A run over `repo`.
    pub fn new(reg: &'r mut Registry, repo: &str, settings: &'r Settings<'a>) -> Self {
        RepoRun {
            reg,
            repo: repo.to_owned(),
            settings,
            ledger: HashMap::new(),
            layers: HashMap::new(),
            reencrypted: HashMap::new(),
            manifests: HashMap::new(),
            ledger_written: BTreeSet::new(),
            stats: Stats::default(),
            notes: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Every tag of the repository: ledger records read first, then every other tag's
    /// manifest brought in line and the tag pointed at the result.
    pub fn run(&mut self) -> Result<(), String> {
        let tags = self.reg.tags(&self.repo)?;
        let mut images: Vec<(String, Manifest)> = Vec::new();
        for tag in tags {
            let Some(m) = self.reg.manifest(&self.repo, &tag)? else {
                continue;
            };
            if is_ledger_record(&m.body) {
                if let Some(d) = digest_of_ledger_tag(&tag) {
                    self.ledger.insert(d, m.body);
                }
                continue;
            }
            images.push((tag, m));
        }
        for (tag, m) in images {
            match self.manifest(&m) {
                Ok(Some(rw)) => {
                    if !self.settings.dry_run {
                        // A push to the tag while this ran must not be overwritten with the
                        // rotated form of what was there before: read it again just before
                        // (the registry has no compare-and-swap, so a window remains).
                        let now = self.reg.manifest(&self.repo, &tag)?.map(|n| n.digest);
                        if now.as_deref() != Some(m.digest.as_str()) {
                            self.problems.push(format!(
                                "{}:{tag} changed while this ran (now {}): left as it is, run again",
                                self.repo,
                                now.as_deref().map_or("deleted".to_owned(), short)
                            ));
                            continue;
                        }
                        self.reg
                            .put_manifest(&self.repo, &tag, &rw.media_type, &rw.body)?;
                    }
                    self.stats.tags_repointed += 1;
                    eprintln!(
                        "rotate: {}:{tag} {} -> {}",
                        self.repo,
                        short(&m.digest),
                        short(&rw.digest)
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    self.problems
                        .push(format!("{}:{tag} left untouched ({e})", self.repo));
                }
            }
        }
        if self.settings.delete_replaced && !self.settings.dry_run {
            self.delete_replaced()?;
        }
        Ok(())
    }

    /// Deletes by digest every manifest this run replaced with a rewritten one. Only when the
    /// run left nothing untouched in the repository: a tag not repointed, or an index whose
    /// children could not all be done, may still name an old manifest.
    fn delete_replaced(&mut self) -> Result<(), String> {
        if !self.problems.is_empty() {
            self.notes.push(format!(
                "{}: replaced manifests not deleted (something was left untouched)",
                self.repo
            ));
            return Ok(());
        }
        let mut replaced: Vec<String> = self
            .manifests
            .iter()
            .filter_map(|(old, done)| match done {
                Ok(Some(rw)) if rw.digest != *old => Some(old.clone()),
                _ => None,
            })
            .collect();
        replaced.sort();
        for old in replaced {
            if self.reg.delete_manifest(&self.repo, &old)? {
                self.stats.manifests_deleted += 1;
                eprintln!("rotate: {}@{} deleted (replaced)", self.repo, short(&old));
            }
        }
        Ok(())
    }

    /// Brings one manifest or index in line; `Ok(None)` when it already is. Memoized by
    /// digest. `Err` when it is left untouched (a layer or child that could not be done).
    fn manifest(&mut self, m: &Manifest) -> Result<Option<Rewritten>, String> {
        if let Some(done) = self.manifests.get(&m.digest) {
            return done
                .clone()
                .map_err(|_| format!("it names {}, left untouched", short(&m.digest)));
        }
        let result = self.manifest_uncached(m);
        if let Err(e) = &result {
            // The reason is reported once; every tag or parent that names it says so.
            self.problems.push(format!(
                "{}@{} left untouched: {e}",
                self.repo,
                short(&m.digest)
            ));
        }
        self.manifests.insert(m.digest.clone(), result.clone());
        result.map_err(|_| format!("it names {}, left untouched", short(&m.digest)))
    }

    fn manifest_uncached(&mut self, m: &Manifest) -> Result<Option<Rewritten>, String> {
        self.stats.manifests += 1;
        let mut doc: Value =
            serde_json::from_slice(&m.body).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let mut changed = false;

        // A referrer follows its subject (rewritten first, whatever the order of the tags).
        if let Some(subject) = doc.get("subject").cloned() {
            if let Some(d) = subject.get("digest").and_then(Value::as_str) {
                if let Some(child) = self.reg.manifest(&self.repo, d)? {
                    if let Some(rw) = self.manifest(&child)? {
                        if let Some(slot) = doc.get_mut("subject") {
                            set_descriptor(slot, &rw);
                        }
                        changed = true;
                        self.stats.referrers_repointed += 1;
                        self.notes.push(format!(
                            "{}: referrer {} now names {} instead of {}: sign again if it is a signature",
                            self.repo,
                            short(&m.digest),
                            short(&rw.digest),
                            short(d)
                        ));
                    }
                }
            }
        }

        if is_index(&m.media_type, &doc) {
            let children = doc
                .get("manifests")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut failed = Vec::new();
            for (i, child) in children.iter().enumerate() {
                let Some(d) = child.get("digest").and_then(Value::as_str) else {
                    continue;
                };
                let Some(cm) = self.reg.manifest(&self.repo, d)? else {
                    self.notes.push(format!(
                        "{}@{}: child {} is not in the repository",
                        self.repo,
                        short(&m.digest),
                        short(d)
                    ));
                    continue;
                };
                match self.manifest(&cm) {
                    Ok(Some(rw)) => {
                        if let Some(slot) = doc
                            .get_mut("manifests")
                            .and_then(Value::as_array_mut)
                            .and_then(|a| a.get_mut(i))
                        {
                            set_descriptor(slot, &rw);
                            changed = true;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => failed.push(e),
                }
            }
            if !failed.is_empty() {
                return Err(format!("children left untouched: {}", failed.join("; ")));
            }
        } else {
            let layers = doc
                .get("layers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            // Plan every layer before doing anything: an image is left whole if any of its
            // layers cannot be opened (a half-rotated image would open for nobody).
            let mut plans: Vec<(usize, Planned)> = Vec::new();
            let mut failed = Vec::new();
            for (i, layer) in layers.iter().enumerate() {
                let mt = layer.get("mediaType").and_then(Value::as_str).unwrap_or("");
                if !mt.ends_with(ENCRYPTED_SUFFIX)
                    || annotation(layer, ANNOTATION_KEYS_JWE).is_none()
                {
                    continue;
                }
                let key = layer_key(layer);
                if let Some(done) = self.layers.get(&key) {
                    if let Some(new) = done.clone() {
                        if let Some(slot) = layer_slot(&mut doc, i) {
                            *slot = new;
                            changed = true;
                        }
                    }
                    continue;
                }
                match self.plan(layer) {
                    Ok(p) => plans.push((i, p)),
                    Err(e) => {
                        self.stats.failed += 1;
                        let d = layer.get("digest").and_then(Value::as_str).unwrap_or("?");
                        failed.push(format!("layer {}: {e}", short(d)));
                    }
                }
            }
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
            for (i, planned) in plans {
                let key = layer_key(&planned.descriptor);
                let new = self.apply(planned)?;
                if let Some(new) = &new {
                    if let Some(slot) = layer_slot(&mut doc, i) {
                        *slot = new.clone();
                        changed = true;
                    }
                }
                self.layers.insert(key, new);
            }
        }

        if !changed {
            return Ok(None);
        }
        let body = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
        let media_type = doc
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| m.media_type.clone());
        let digest = if self.settings.dry_run {
            // Nothing is uploaded, so a re-encrypted layer has no digest yet.
            "(a new manifest)".to_owned()
        } else {
            let digest = Digest::of(&body).to_string();
            self.reg
                .put_manifest(&self.repo, &digest, &media_type, &body)?;
            digest
        };
        self.stats.manifests_written += 1;
        Ok(Some(Rewritten {
            body,
            digest,
            media_type,
        }))
    }

    /// Opens a layer's JWE and decides what to do with it.
    fn plan(&mut self, layer: &Value) -> Result<Planned, String> {
        self.stats.layers += 1;
        let jwe_b64 = annotation(layer, ANNOTATION_KEYS_JWE).unwrap_or("");
        let jwe = STANDARD
            .decode(jwe_b64)
            .map_err(|_| "keys.jwe is not base64".to_owned())?;
        let hmac = pubopts_hmac(layer)?;
        let mut last = String::from("no key given");
        let mut private = None;
        for key in self.settings.keys {
            match unwrap_private_options(&jwe, key) {
                Ok(p) => {
                    private = Some(p);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let private = private.ok_or_else(|| format!("none of the given keys opens it ({last})"))?;
        let plaintext = Digest::parse(&private.digest)
            .map_err(|_| format!("private options name digest {:?}", private.digest))?;
        let digest = layer.get("digest").and_then(Value::as_str).unwrap_or("");
        let target = self.settings.target;

        let old = self.recipients_of(layer, jwe_b64, &private.symkey, &plaintext, digest);
        let plan = match old {
            Ok(old) if old == target.ids => Plan::Keep,
            Ok(old) if old.is_subset(&target.ids) => Plan::Rewrap,
            Ok(old) => Plan::Reencrypt(format!(
                "{} recipient(s) not in the target",
                old.difference(&target.ids).count()
            )),
            Err(why) => Plan::Reencrypt(why),
        };
        Ok(Planned {
            descriptor: layer.clone(),
            private,
            hmac,
            plan,
        })
    }

    /// The ids of the keys a layer is wrapped to, from a record that can be trusted (module
    /// documentation); `Err` with the reason when none says.
    fn recipients_of(
        &self,
        layer: &Value,
        jwe_b64: &str,
        symkey: &[u8; 32],
        plaintext: &Digest,
        digest: &str,
    ) -> Result<BTreeSet<String>, String> {
        if let (Some(ids), Some(mac)) = (
            annotation(layer, ANN_RECIPIENT_KEYS),
            annotation(layer, ANN_RECIPIENT_MAC),
        ) {
            let expected = recipient_mac(symkey, jwe_b64, ids).map(hex::encode);
            if expected.is_some_and(|e| {
                bool::from(subtle::ConstantTimeEq::ct_eq(e.as_bytes(), mac.as_bytes()))
            }) {
                return Ok(ids
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect());
            }
            // An annotation that does not authenticate is ignored, never trusted.
        }
        let Some(record) = self.ledger.get(plaintext) else {
            return Err("recipients unknown (no ledger record, no recipient annotation)".into());
        };
        let Some(state_key) = self.settings.state_key else {
            return Err(
                "recipients unknown (ledger record not authenticated: no state key)".into(),
            );
        };
        let entry = read_stored(state_key, &self.repo, plaintext, record)
            .map_err(|e| format!("recipients unknown (ledger record: {e})"))?;
        if entry.encrypted_digest.to_string() != digest
            || entry
                .annotations
                .get(ANNOTATION_KEYS_JWE)
                .map(String::as_str)
                != Some(jwe_b64)
        {
            return Err(
                "recipients unknown (the ledger record describes another ciphertext or JWE)".into(),
            );
        }
        let fp = entry
            .recipients
            .ok_or("recipients unknown (ledger record without fingerprint)")?;
        // The old set within the target, or some key outside it.
        Ok(self
            .settings
            .target
            .subset_with_fingerprint(&fp)
            .unwrap_or_else(|| BTreeSet::from(["(a key outside the target)".to_owned()])))
    }

    /// Does what was planned; the new descriptor, or `None` when the layer stays as it is.
    fn apply(&mut self, planned: Planned) -> Result<Option<Value>, String> {
        let digest = planned
            .descriptor
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let size = planned
            .descriptor
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("layer {digest} has no size"))?;
        let plaintext = Digest::parse(&planned.private.digest).map_err(|e| e.to_string())?;
        let nonce = planned.private.nonce;
        match &planned.plan {
            Plan::Keep => {
                self.stats.unchanged += 1;
                Ok(None)
            }
            Plan::Rewrap => {
                eprintln!("rotate: {}: re-wrap {}", self.repo, short(&digest));
                self.stats.rewrapped += 1;
                let encrypted_digest = Digest::parse(&digest).map_err(|e| e.to_string())?;
                let layer = EncryptedLayer {
                    plaintext_digest: plaintext,
                    encrypted_digest,
                    size,
                    hmac: planned.hmac,
                    symkey: planned.private.symkey.clone(),
                    nonce,
                };
                if self.settings.dry_run {
                    return Ok(Some(planned.descriptor));
                }
                self.descriptor_for(&planned.descriptor, &layer).map(Some)
            }
            Plan::Reencrypt(why) => {
                eprintln!(
                    "rotate: {}: re-encrypt {} ({size} bytes: {why})",
                    self.repo,
                    short(&digest)
                );
                self.stats.reencrypted += 1;
                if self.settings.dry_run {
                    return Ok(Some(planned.descriptor));
                }
                if let Some(done) = self.reencrypted.get(&digest) {
                    return Ok(Some(done.clone()));
                }
                if let Some(new) = self.resume(&planned.descriptor, &plaintext, size)? {
                    eprintln!(
                        "rotate: {}: {} was re-encrypted by an earlier run: {} reused",
                        self.repo,
                        short(&digest),
                        new.get("digest").and_then(Value::as_str).map_or("", |d| d)
                    );
                    self.stats.resumed += 1;
                    self.reencrypted.insert(digest, new.clone());
                    return Ok(Some(new));
                }
                let layer = self.reencrypt(&digest, size, &planned, &plaintext, nonce)?;
                let new = self.descriptor_for(&planned.descriptor, &layer)?;
                self.reencrypted.insert(digest, new.clone());
                Ok(Some(new))
            }
        }
    }

    /// A re-encryption an earlier, interrupted run finished: the gateway's ledger record of the
    /// plaintext digest (rewritten right after each re-encrypted blob is committed, so the
    /// registry itself is the journal) names another ciphertext, for exactly the target
    /// recipients, and that blob is in the repository. Its descriptor then replaces the old
    /// one without moving a byte. Needs the state key (the record must authenticate).
    fn resume(
        &mut self,
        old: &Value,
        plaintext: &Digest,
        size: u64,
    ) -> Result<Option<Value>, String> {
        let (Some(record), Some(state_key)) = (self.ledger.get(plaintext), self.settings.state_key)
        else {
            return Ok(None);
        };
        let Ok(entry) = read_stored(state_key, &self.repo, plaintext, record) else {
            return Ok(None);
        };
        let old_digest = old.get("digest").and_then(Value::as_str).unwrap_or("");
        if entry.recipients.as_deref() != Some(self.settings.target.fingerprint.as_str())
            || entry.size != size
            || entry.encrypted_digest.to_string() == old_digest
        {
            return Ok(None);
        }
        let jwe_b64 = entry
            .annotations
            .get(ANNOTATION_KEYS_JWE)
            .cloned()
            .unwrap_or_default();
        let new_digest = entry.encrypted_digest.to_string();
        if jwe_b64.is_empty() || !self.reg.blob_exists(&self.repo, &new_digest)? {
            return Ok(None);
        }
        let mut annotations: serde_json::Map<String, Value> = old
            .get("annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        annotations.retain(|k, _| {
            !k.starts_with(ANNOTATION_ENC_PREFIX)
                && k != ANN_RECIPIENT_KEYS
                && k != ANN_RECIPIENT_MAC
        });
        for (k, v) in &entry.annotations {
            annotations.insert(k.clone(), Value::String(v.clone()));
        }
        // The recipient annotations need the new layer key: only when a given key opens the
        // new JWE (else later runs read the recipients from the ledger record).
        let jwe = STANDARD.decode(&jwe_b64).unwrap_or_default();
        let opened = self
            .settings
            .keys
            .iter()
            .find_map(|k| unwrap_private_options(&jwe, k).ok());
        if let Some(private) = opened {
            if private.digest != plaintext.to_string() {
                return Ok(None);
            }
            let ids = self
                .settings
                .target
                .ids
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(",");
            let mac = recipient_mac(&private.symkey, &jwe_b64, &ids).ok_or("recipient MAC")?;
            annotations.insert(ANN_RECIPIENT_KEYS.to_owned(), Value::String(ids));
            annotations.insert(
                ANN_RECIPIENT_MAC.to_owned(),
                Value::String(hex::encode(mac)),
            );
        }
        let mut new = old.as_object().cloned().unwrap_or_default();
        new.insert("digest".into(), Value::String(new_digest));
        new.insert("annotations".into(), Value::Object(annotations));
        Ok(Some(Value::Object(new)))
    }

    /// Streams one layer through decryption and encryption with a fresh key into a new blob.
    /// Plaintext exists only chunk by chunk in memory; the new blob is committed only once the
    /// old ciphertext's HMAC, digest and size and the plaintext's digest have been checked.
    fn reencrypt(
        &mut self,
        digest: &str,
        size: u64,
        planned: &Planned,
        plaintext: &Digest,
        nonce: [u8; 16],
    ) -> Result<EncryptedLayer, String> {
        let source = self.reg.blob(&self.repo, digest)?;
        let mut stream = Reencrypt {
            source,
            decryptor: Some(LayerDecryptor::new(&planned.private.symkey, nonce)),
            encryptor: Some(LayerEncryptor::generate(&mut rand_core::OsRng)),
            read: 0,
            limit: size,
        };
        let hmac = planned.hmac;
        let mut result = None;
        let expected_digest = digest.to_owned();
        let expected_plain = *plaintext;
        self.reg.upload(&self.repo, &mut stream, |s| {
            let dec = s.decryptor.take().ok_or("stream already finished")?;
            let enc = s.encryptor.take().ok_or("stream already finished")?;
            let done = dec
                .finish(&hmac)
                .map_err(|e| format!("{expected_digest}: {e}: not committed"))?;
            if done.encrypted_digest.to_string() != expected_digest {
                return Err(format!(
                    "{expected_digest}: the registry served bytes hashing to {}: not committed",
                    done.encrypted_digest
                ));
            }
            if done.plaintext_digest != expected_plain || done.size != size {
                return Err(format!(
                    "{expected_digest}: decrypts to {} ({} bytes), the JWE says {expected_plain} ({size}): not committed",
                    done.plaintext_digest, done.size
                ));
            }
            let layer = enc.finish();
            let d = layer.encrypted_digest.to_string();
            result = Some(layer);
            Ok(d)
        })?;
        self.stats.bytes_downloaded += size;
        self.stats.bytes_uploaded += size;
        result.ok_or_else(|| "re-encryption produced no layer".to_owned())
    }

    /// The descriptor of `layer` wrapped for the target: the old descriptor with the new
    /// digest, the new `enc.*` annotations and the recipient annotations; the ledger record
    /// rewritten to match.
    fn descriptor_for(&mut self, old: &Value, layer: &EncryptedLayer) -> Result<Value, String> {
        let target = self.settings.target;
        let enc = layer_annotations(layer, &target.recipients, &mut rand_core::OsRng)
            .map_err(|e| format!("wrapping the layer key: {e}"))?;
        let ids = target.ids.iter().cloned().collect::<Vec<_>>().join(",");
        let jwe = enc.get(ANNOTATION_KEYS_JWE).cloned().unwrap_or_default();
        let mac = recipient_mac(&layer.symkey, &jwe, &ids).ok_or("recipient MAC")?;
        let mut new = old.as_object().cloned().unwrap_or_default();
        new.insert(
            "digest".into(),
            Value::String(layer.encrypted_digest.to_string()),
        );
        new.insert("size".into(), Value::from(layer.size));
        let mut annotations: serde_json::Map<String, Value> = old
            .get("annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        annotations.retain(|k, _| {
            !k.starts_with(ANNOTATION_ENC_PREFIX)
                && k != ANN_RECIPIENT_KEYS
                && k != ANN_RECIPIENT_MAC
        });
        for (k, v) in &enc {
            annotations.insert(k.clone(), Value::String(v.clone()));
        }
        annotations.insert(ANN_RECIPIENT_KEYS.to_owned(), Value::String(ids));
        annotations.insert(
            ANN_RECIPIENT_MAC.to_owned(),
            Value::String(hex::encode(mac)),
        );
        new.insert("annotations".into(), Value::Object(annotations));
        self.update_ledger(layer, enc)?;
        Ok(Value::Object(new))
    }

    /// Rewrites the gateway's ledger record of the layer's plaintext digest, so that a re-push
    /// through the gateway finds the new ciphertext and JWE for the current recipients.
    fn update_ledger(
        &mut self,
        layer: &EncryptedLayer,
        enc: BTreeMap<String, String>,
    ) -> Result<(), String> {
        let plaintext = layer.plaintext_digest;
        let Some(record) = self.ledger.get(&plaintext) else {
            return Ok(());
        };
        let Some(state_key) = self.settings.state_key else {
            self.stats.ledger_stale += 1;
            return Ok(());
        };
        if self.ledger_written.contains(&plaintext) {
            return Ok(());
        }
        if read_stored(state_key, &self.repo, &plaintext, record).is_err() {
            // Not the gateway's record under this key: writing ours would make the gateway
            // stop trusting the ledger if the key is not the gateway's.
            self.stats.ledger_stale += 1;
            self.notes.push(format!(
                "{}: ledger record of {plaintext} does not authenticate under the state key: left stale",
                self.repo
            ));
            return Ok(());
        }
        let entry = LedgerEntry {
            encrypted_digest: layer.encrypted_digest,
            size: layer.size,
            annotations: enc,
            media_type: None,
            recipients: Some(self.settings.target.fingerprint.clone()),
        };
        let body = ledger_manifest_authenticated(state_key, &self.repo, &plaintext, &entry);
        self.reg.put_manifest(
            &self.repo,
            &ledger_tag(&plaintext),
            MEDIA_TYPE_OCI_MANIFEST,
            &body,
        )?;
        self.ledger.insert(plaintext, body);
        self.ledger_written.insert(plaintext);
        self.stats.ledger_updated += 1;
        Ok(())
    }
}

fn layer_key(layer: &Value) -> (String, String) {
    (
        layer
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        annotation(layer, ANNOTATION_KEYS_JWE)
            .unwrap_or("")
            .to_owned(),
    )
}

fn layer_slot(doc: &mut Value, i: usize) -> Option<&mut Value> {
    doc.get_mut("layers")?.as_array_mut()?.get_mut(i)
}

fn set_descriptor(slot: &mut Value, rw: &Rewritten) {
    if let Some(obj) = slot.as_object_mut() {
        obj.insert("digest".into(), Value::String(rw.digest.clone()));
        obj.insert("size".into(), Value::from(rw.body.len() as u64));
        obj.insert("mediaType".into(), Value::String(rw.media_type.clone()));
    }
}

/// `sha256:0123456789ab` for logs.
pub fn short(d: &str) -> String {
    d.get(..19).unwrap_or(d).to_owned()
}

/// The request body of a re-encryption: ciphertext read from the registry, decrypted and
/// encrypted again in the same buffer (the plaintext never leaves it).
struct Reencrypt<R: Read> {
    source: R,
    decryptor: Option<LayerDecryptor>,
    encryptor: Option<LayerEncryptor>,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Reencrypt<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(CHUNK);
        let Some(chunk) = buf.get_mut(..want) else {
            return Ok(0);
        };
        let n = self.source.read(chunk)?;
        let Some(chunk) = chunk.get_mut(..n) else {
            return Ok(0);
        };
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.limit {
            zeroize::Zeroize::zeroize(chunk);
            return Err(std::io::Error::other(
                "the registry served more bytes than the descriptor's size",
            ));
        }
        let (Some(dec), Some(enc)) = (self.decryptor.as_mut(), self.encryptor.as_mut()) else {
            return Err(std::io::Error::other("stream already finished"));
        };
        if let Err(e) = dec.decrypt_in_place(chunk) {
            return Err(std::io::Error::other(e.to_string()));
        }
        enc.encrypt_in_place(chunk);
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn ec_key(seed: u8) -> Recipient {
        let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
        Recipient::P256(secret.public_key())
    }

    #[test]
    fn a_ledger_fingerprint_names_the_subset_of_the_target_or_nothing() {
        let (a, b, c, d) = (ec_key(1), ec_key(2), ec_key(3), ec_key(4));
        let target = Target::new(vec![a.clone(), b.clone(), c.clone()]);
        let old = fingerprint(&[b.clone(), a.clone()]);
        let found = target.subset_with_fingerprint(&old).unwrap();
        assert_eq!(found, BTreeSet::from([key_id(&a), key_id(&b)]));
        assert!(found.is_subset(&target.ids) && found != target.ids);
        assert_eq!(
            target.subset_with_fingerprint(&target.fingerprint),
            Some(target.ids.clone())
        );
        // A set with a key outside the target is no subset of it: re-encrypt.
        assert_eq!(target.subset_with_fingerprint(&fingerprint(&[a, d])), None);
    }

    #[test]
    fn the_recipient_mac_binds_the_layer_key_the_jwe_and_the_ids() {
        let mac = recipient_mac(&[1; 32], "jwe", "id1,id2").unwrap();
        assert_eq!(recipient_mac(&[1; 32], "jwe", "id1,id2").unwrap(), mac);
        assert_ne!(recipient_mac(&[2; 32], "jwe", "id1,id2").unwrap(), mac);
        assert_ne!(recipient_mac(&[1; 32], "jwe2", "id1,id2").unwrap(), mac);
        assert_ne!(recipient_mac(&[1; 32], "jwe", "id1").unwrap(), mac);
        // Length prefixes: moving bytes between the parts changes the MAC.
        assert_ne!(recipient_mac(&[1; 32], "jweid1", ",id2").unwrap(), mac);
    }
}
