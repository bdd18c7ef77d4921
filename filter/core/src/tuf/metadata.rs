//! TUF metadata documents (spec §4): the signed envelope and the four role payloads, read
//! from the raw received bytes.
//!
//! Parsing keeps the whole `signed` object as a [`serde_json::Value`] so that fields this
//! client does not know are part of what is verified (spec §4: "Implementers who encounter
//! undefined attribute-value pairs in the format must include the data when calculating
//! hashes or verifying signatures"); signatures are checked over its canonical JSON.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::canonical::to_canonical;
use super::error::RepositoryError;
use super::keys::Key;
use super::pattern::{hash_prefix_matches, path_matches};

/// Name of the root role.
pub const ROOT: &str = "root";
/// Name of the timestamp role.
pub const TIMESTAMP: &str = "timestamp";
/// Name of the snapshot role.
pub const SNAPSHOT: &str = "snapshot";
/// Name of the top-level targets role.
pub const TARGETS: &str = "targets";
/// The four top-level roles root must define keys for.
pub const TOP_LEVEL_ROLES: [&str; 4] = [ROOT, TIMESTAMP, SNAPSHOT, TARGETS];

/// Major version of the specification this client implements.
pub const SPEC_MAJOR: &str = "1";

/// One entry of the `signatures` array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The keyid the signature claims.
    pub keyid: String,
    /// The decoded signature, `None` when `sig` is not hex (such a signature never verifies).
    pub sig: Option<Vec<u8>>,
}

/// A metadata file split into its parts: `signed` as a JSON value, its canonical bytes (what
/// was signed), and the signatures.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The `signed` object, unknown fields included.
    pub signed: Value,
    /// Canonical JSON of `signed`.
    pub canonical: Vec<u8>,
    /// The signatures, keyids unique.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// Read `bytes` as a signed metadata file of `role`.
    pub fn parse(role: &str, bytes: &[u8]) -> Result<Envelope, RepositoryError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(role, format!("not JSON: {e}")))?;
        let Value::Object(mut top) = value else {
            return Err(malformed(role, "metadata is not a JSON object"));
        };
        let signed = top
            .remove("signed")
            .ok_or_else(|| malformed(role, "no signed"))?;
        if !signed.is_object() {
            return Err(malformed(role, "signed is not an object"));
        }
        let sigs = top
            .get("signatures")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(role, "no signatures array"))?;
        let mut signatures: Vec<Signature> = Vec::with_capacity(sigs.len());
        for s in sigs {
            let keyid = s
                .get("keyid")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(role, "signature without keyid"))?;
            let sig = s
                .get("sig")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(role, "signature without sig"))?;
            // §4.2: "The keyid MUST be unique in the signatures array".
            if signatures.iter().any(|seen| seen.keyid == keyid) {
                return Err(RepositoryError::DuplicateSignature {
                    role: role.to_owned(),
                    keyid: keyid.to_owned(),
                });
            }
            signatures.push(Signature {
                keyid: keyid.to_owned(),
                sig: hex::decode(sig).ok(),
            });
        }
        let canonical = to_canonical(&signed).map_err(|e| malformed(role, e.to_string()))?;
        Ok(Envelope {
            signed,
            canonical,
            signatures,
        })
    }

    /// The signature made with `keyid`, if any.
    pub fn signature(&self, keyid: &str) -> Option<&Signature> {
        self.signatures.iter().find(|s| s.keyid == keyid)
    }

    /// The `_type` of the payload, if it is a string.
    pub fn signed_type(&self) -> Option<&str> {
        self.signed.get("_type").and_then(Value::as_str)
    }
}

/// Keys and threshold a delegator requires for a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleKeys {
    /// Authorised keyids, unique.
    pub keyids: Vec<String>,
    /// Number of distinct keys that must sign (at least 1).
    pub threshold: u64,
}

/// Fields every role has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Common {
    /// `version`, at least 1.
    pub version: u64,
    /// `spec_version`.
    pub spec_version: String,
    /// `expires`, unix seconds.
    pub expires: i64,
}

impl Common {
    /// Whether the metadata is expired at `now` (unix seconds): expiry must be higher than the
    /// fixed update start time (5.3.10, 5.4.4, 5.5.6, 5.6.5).
    pub fn is_expired(&self, now: i64) -> bool {
        now >= self.expires
    }
}

/// Root metadata (§4.3).
#[derive(Clone, Debug)]
pub struct Root {
    /// Common fields.
    pub common: Common,
    /// `consistent_snapshot` (absent means false).
    pub consistent_snapshot: bool,
    /// `keys`, by keyid.
    pub keys: BTreeMap<String, Key>,
    /// `roles`: keys and threshold of each top-level role.
    pub roles: BTreeMap<String, RoleKeys>,
}

/// Version, length and hashes of a metadata file, as snapshot and timestamp list them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaFile {
    /// `version`, at least 1.
    pub version: u64,
    /// `length`, if listed.
    pub length: Option<u64>,
    /// `hashes`, if listed, in document order.
    pub hashes: Option<Vec<(String, String)>>,
}

/// Timestamp metadata (§4.6).
#[derive(Clone, Debug)]
pub struct Timestamp {
    /// Common fields.
    pub common: Common,
    /// `meta["snapshot.json"]`.
    pub snapshot_meta: MetaFile,
}

/// Snapshot metadata (§4.4).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Common fields.
    pub common: Common,
    /// `meta`, by file name (`targets.json`, `<role>.json`).
    pub meta: BTreeMap<String, MetaFile>,
}

/// A target file as a targets role lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetFile {
    /// The target path (the key in `targets`).
    pub path: String,
    /// `length` in bytes.
    pub length: u64,
    /// `hashes`, in document order, at least one.
    pub hashes: Vec<(String, String)>,
    /// `custom`, if present.
    pub custom: Option<Value>,
}

/// Which target paths a delegation covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSpec {
    /// `paths`: glob patterns.
    Patterns(Vec<String>),
    /// `path_hash_prefixes`: prefixes of the SHA-256 hex of the path.
    HashPrefixes(Vec<String>),
    /// Neither was given: the delegation covers no path.
    Nothing,
}

/// One entry of `delegations.roles`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelegatedRole {
    /// `name`.
    pub name: String,
    /// `keyids` and `threshold`.
    pub keys: RoleKeys,
    /// `terminating`.
    pub terminating: bool,
    /// `paths` or `path_hash_prefixes`.
    pub paths: PathSpec,
}

impl DelegatedRole {
    /// Whether the delegation covers `target_path`.
    pub fn covers(&self, target_path: &str) -> bool {
        match &self.paths {
            PathSpec::Patterns(patterns) => patterns.iter().any(|p| path_matches(p, target_path)),
            PathSpec::HashPrefixes(prefixes) => hash_prefix_matches(prefixes, target_path),
            PathSpec::Nothing => false,
        }
    }
}

/// `delegations.succinct_roles` (TAP 15): `2^bit_length` hash bins named
/// `<name_prefix>-<hex>`, sharing keys and threshold, each terminating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccinctRoles {
    /// `keyids` and `threshold` for every bin.
    pub keys: RoleKeys,
    /// `bit_length`, 1 to 32.
    pub bit_length: u32,
    /// `name_prefix`.
    pub name_prefix: String,
}

impl SuccinctRoles {
    fn suffix_len(&self) -> usize {
        let last = (1u64 << self.bit_length) - 1;
        format!("{last:x}").len()
    }

    /// The bin responsible for `target_path`: the leftmost `bit_length` bits of the SHA-256
    /// of the path.
    pub fn role_for_target(&self, target_path: &str) -> String {
        let digest = Sha256::digest(target_path.as_bytes());
        let mut first = [0u8; 4];
        first.copy_from_slice(digest.get(..4).unwrap_or(&[0; 4]));
        let bin = u64::from(u32::from_be_bytes(first)) >> (32 - self.bit_length);
        format!(
            "{}-{:0width$x}",
            self.name_prefix,
            bin,
            width = self.suffix_len()
        )
    }

    /// Whether `name` is one of the bins.
    pub fn is_delegated_role(&self, name: &str) -> bool {
        let Some(suffix) = name
            .strip_prefix(self.name_prefix.as_str())
            .and_then(|s| s.strip_prefix('-'))
        else {
            return false;
        };
        suffix.len() == self.suffix_len()
            && suffix.chars().all(|c| c.is_ascii_hexdigit())
            && u64::from_str_radix(suffix, 16).is_ok_and(|n| n < (1u64 << self.bit_length))
    }
}

/// The delegated roles of a targets role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DelegatedRoles {
    /// `roles`, in priority order.
    Roles(Vec<DelegatedRole>),
    /// `succinct_roles`.
    Succinct(SuccinctRoles),
}

/// `delegations` of a targets role (§4.5).
#[derive(Clone, Debug)]
pub struct Delegations {
    /// `keys`, by keyid.
    pub keys: BTreeMap<String, Key>,
    /// The delegated roles.
    pub roles: DelegatedRoles,
}

impl Delegations {
    /// Keys and threshold this delegator requires for `role`, if it delegates to it.
    pub fn role_keys(&self, role: &str) -> Option<&RoleKeys> {
        match &self.roles {
            DelegatedRoles::Roles(roles) => roles.iter().find(|r| r.name == role).map(|r| &r.keys),
            DelegatedRoles::Succinct(s) => s.is_delegated_role(role).then_some(&s.keys),
        }
    }

    /// The delegated roles trusted for `target_path`, in order of appearance, each with its
    /// `terminating` flag (spec 5.6.7.2).
    pub fn roles_for_target(&self, target_path: &str) -> Vec<(String, bool)> {
        match &self.roles {
            DelegatedRoles::Roles(roles) => roles
                .iter()
                .filter(|r| r.covers(target_path))
                .map(|r| (r.name.clone(), r.terminating))
                .collect(),
            DelegatedRoles::Succinct(s) => vec![(s.role_for_target(target_path), true)],
        }
    }
}

/// Targets metadata, top-level or delegated (§4.5).
#[derive(Clone, Debug)]
pub struct Targets {
    /// Common fields.
    pub common: Common,
    /// `targets`, by target path.
    pub targets: BTreeMap<String, TargetFile>,
    /// `delegations`, if any.
    pub delegations: Option<Delegations>,
}

fn malformed(role: &str, reason: impl Into<String>) -> RepositoryError {
    RepositoryError::Malformed {
        role: role.to_owned(),
        reason: reason.into(),
    }
}

fn field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    role: &str,
) -> Result<&'a Value, RepositoryError> {
    obj.get(name)
        .ok_or_else(|| malformed(role, format!("missing {name}")))
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    role: &str,
) -> Result<&'a str, RepositoryError> {
    field(obj, name, role)?
        .as_str()
        .ok_or_else(|| malformed(role, format!("{name} is not a string")))
}

fn u64_value(v: &Value, name: &str, role: &str) -> Result<u64, RepositoryError> {
    v.as_u64()
        .ok_or_else(|| malformed(role, format!("{name} is not a non-negative integer")))
}

fn obj_value<'a>(
    v: &'a Value,
    name: &str,
    role: &str,
) -> Result<&'a Map<String, Value>, RepositoryError> {
    v.as_object()
        .ok_or_else(|| malformed(role, format!("{name} is not an object")))
}

fn positive(v: u64, name: &str, role: &str) -> Result<u64, RepositoryError> {
    if v == 0 {
        return Err(malformed(role, format!("{name} must be at least 1")));
    }
    Ok(v)
}

fn string_list(v: &Value, name: &str, role: &str) -> Result<Vec<String>, RepositoryError> {
    let arr = v
        .as_array()
        .ok_or_else(|| malformed(role, format!("{name} is not an array")))?;
    arr.iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .ok_or_else(|| malformed(role, format!("{name} holds a non-string")))
        })
        .collect()
}

fn role_keys(
    obj: &Map<String, Value>,
    what: &str,
    role: &str,
) -> Result<RoleKeys, RepositoryError> {
    let keyids = string_list(field(obj, "keyids", role)?, &format!("{what}.keyids"), role)?;
    for (i, k) in keyids.iter().enumerate() {
        if keyids.iter().skip(i + 1).any(|o| o == k) {
            return Err(malformed(role, format!("{what}.keyids lists {k} twice")));
        }
    }
    let threshold = positive(
        u64_value(field(obj, "threshold", role)?, "threshold", role)?,
        &format!("{what}.threshold"),
        role,
    )?;
    Ok(RoleKeys { keyids, threshold })
}

fn keys_map(v: &Value, role: &str) -> Result<BTreeMap<String, Key>, RepositoryError> {
    obj_value(v, "keys", role)?
        .iter()
        .map(|(id, k)| {
            Key::from_value(k)
                .map(|k| (id.clone(), k))
                .map_err(|e| malformed(role, format!("key {id}: {e}")))
        })
        .collect()
}

fn hashes(v: &Value, what: &str, role: &str) -> Result<Vec<(String, String)>, RepositoryError> {
    let obj = obj_value(v, &format!("{what}.hashes"), role)?;
    if obj.is_empty() {
        return Err(malformed(role, format!("{what}.hashes is empty")));
    }
    obj.iter()
        .map(|(alg, h)| {
            h.as_str()
                .map(|h| (alg.clone(), h.to_owned()))
                .ok_or_else(|| malformed(role, format!("{what}.hashes.{alg} is not a string")))
        })
        .collect()
}

/// Parse the `expires` format of §4.2, `YYYY-MM-DDTHH:MM:SSZ`, into unix seconds.
pub fn parse_expires(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || b.get(10) != Some(&b'T')
        || b.get(13) != Some(&b':')
        || b.get(16) != Some(&b':')
        || b.get(19) != Some(&b'Z')
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day < 1 || day > days_in_month || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn common(signed: &Value, expected_type: &str, role: &str) -> Result<Common, RepositoryError> {
    let obj = obj_value(signed, "signed", role)?;
    let found = str_field(obj, "_type", role)?;
    if found != expected_type {
        return Err(RepositoryError::WrongType {
            role: role.to_owned(),
            expected: expected_type.to_owned(),
            found: found.to_owned(),
        });
    }
    let version = positive(
        u64_value(field(obj, "version", role)?, "version", role)?,
        "version",
        role,
    )?;
    let spec_version = str_field(obj, "spec_version", role)?;
    let parts: Vec<&str> = spec_version.split('.').collect();
    if !(2..=3).contains(&parts.len())
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(malformed(
            role,
            format!("spec_version {spec_version:?} is not X.Y or X.Y.Z"),
        ));
    }
    if parts.first() != Some(&SPEC_MAJOR) {
        return Err(RepositoryError::UnsupportedSpecVersion {
            role: role.to_owned(),
            spec_version: spec_version.to_owned(),
        });
    }
    let expires_str = str_field(obj, "expires", role)?;
    let expires = parse_expires(expires_str).ok_or_else(|| {
        malformed(
            role,
            format!("expires {expires_str:?} is not YYYY-MM-DDTHH:MM:SSZ"),
        )
    })?;
    Ok(Common {
        version,
        spec_version: spec_version.to_owned(),
        expires,
    })
}

fn meta_file(v: &Value, what: &str, role: &str) -> Result<MetaFile, RepositoryError> {
    let obj = obj_value(v, what, role)?;
    let version = positive(
        u64_value(field(obj, "version", role)?, "version", role)?,
        &format!("{what}.version"),
        role,
    )?;
    let length = obj
        .get("length")
        .map(|l| u64_value(l, &format!("{what}.length"), role))
        .transpose()?;
    let hashes = obj
        .get("hashes")
        .map(|h| hashes(h, what, role))
        .transpose()?;
    Ok(MetaFile {
        version,
        length,
        hashes,
    })
}

impl Root {
    /// Read the payload of a root metadata file.
    pub fn from_signed(signed: &Value) -> Result<Root, RepositoryError> {
        let role = ROOT;
        let common = common(signed, ROOT, role)?;
        let obj = obj_value(signed, "signed", role)?;
        let consistent_snapshot = match obj.get("consistent_snapshot") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(malformed(role, "consistent_snapshot is not a boolean")),
        };
        let keys = keys_map(field(obj, "keys", role)?, role)?;
        let roles_obj = obj_value(field(obj, "roles", role)?, "roles", role)?;
        let mut roles = BTreeMap::new();
        for (name, r) in roles_obj {
            roles.insert(
                name.clone(),
                role_keys(obj_value(r, name, role)?, name, role)?,
            );
        }
        for name in TOP_LEVEL_ROLES {
            if !roles.contains_key(name) {
                return Err(malformed(role, format!("roles has no {name}")));
            }
        }
        Ok(Root {
            common,
            consistent_snapshot,
            keys,
            roles,
        })
    }

    /// Keys and threshold of a top-level role.
    pub fn role_keys(&self, role: &str) -> Option<&RoleKeys> {
        self.roles.get(role)
    }

    /// The keys of `role` as (keyid, key identity) pairs, sorted: two roots give the same list
    /// exactly when the role's keys did not rotate (5.3.11).
    pub fn role_key_fingerprint(&self, role: &str) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out: Vec<(String, Option<Vec<u8>>)> = self
            .roles
            .get(role)
            .map(|r| {
                r.keyids
                    .iter()
                    .map(|id| (id.clone(), self.keys.get(id).and_then(Key::identity)))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Timestamp {
    /// Read the payload of a timestamp metadata file.
    pub fn from_signed(signed: &Value) -> Result<Timestamp, RepositoryError> {
        let role = TIMESTAMP;
        let common = common(signed, TIMESTAMP, role)?;
        let obj = obj_value(signed, "signed", role)?;
        let meta = obj_value(field(obj, "meta", role)?, "meta", role)?;
        let snapshot = meta
            .get("snapshot.json")
            .ok_or_else(|| malformed(role, "meta has no snapshot.json"))?;
        Ok(Timestamp {
            common,
            snapshot_meta: meta_file(snapshot, "meta.snapshot.json", role)?,
        })
    }
}

impl Snapshot {
    /// Read the payload of a snapshot metadata file.
    pub fn from_signed(signed: &Value) -> Result<Snapshot, RepositoryError> {
        let role = SNAPSHOT;
        let common = common(signed, SNAPSHOT, role)?;
        let obj = obj_value(signed, "signed", role)?;
        let meta = obj_value(field(obj, "meta", role)?, "meta", role)?
            .iter()
            .map(|(name, m)| meta_file(m, &format!("meta.{name}"), role).map(|m| (name.clone(), m)))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot { common, meta })
    }
}

fn delegated_role(v: &Value, role: &str) -> Result<DelegatedRole, RepositoryError> {
    let obj = obj_value(v, "delegations.roles[]", role)?;
    let name = str_field(obj, "name", role)?.to_owned();
    let keys = role_keys(obj, &name, role)?;
    let terminating = match obj.get("terminating") {
        Some(Value::Bool(b)) => *b,
        None => false,
        Some(_) => {
            return Err(malformed(
                role,
                format!("{name}.terminating is not a boolean"),
            ))
        }
    };
    let paths = match (obj.get("paths"), obj.get("path_hash_prefixes")) {
        (Some(_), Some(_)) => {
            return Err(malformed(
                role,
                format!("{name} sets both paths and path_hash_prefixes"),
            ))
        }
        (Some(p), None) => PathSpec::Patterns(string_list(p, "paths", role)?),
        (None, Some(p)) => PathSpec::HashPrefixes(string_list(p, "path_hash_prefixes", role)?),
        (None, None) => PathSpec::Nothing,
    };
    Ok(DelegatedRole {
        name,
        keys,
        terminating,
        paths,
    })
}

impl Targets {
    /// Read the payload of a targets metadata file; `role` names it in errors.
    pub fn from_signed(signed: &Value, role: &str) -> Result<Targets, RepositoryError> {
        let common = common(signed, TARGETS, role)?;
        let obj = obj_value(signed, "signed", role)?;
        let mut targets = BTreeMap::new();
        for (path, t) in obj_value(field(obj, "targets", role)?, "targets", role)? {
            let tobj = obj_value(t, path, role)?;
            let length = u64_value(
                field(tobj, "length", role)?,
                &format!("{path}.length"),
                role,
            )?;
            let hashes = hashes(field(tobj, "hashes", role)?, path, role)?;
            let custom = tobj.get("custom").cloned();
            targets.insert(
                path.clone(),
                TargetFile {
                    path: path.clone(),
                    length,
                    hashes,
                    custom,
                },
            );
        }
        let delegations = match obj.get("delegations") {
            None | Some(Value::Null) => None,
            Some(d) => {
                let dobj = obj_value(d, "delegations", role)?;
                let keys = keys_map(field(dobj, "keys", role)?, role)?;
                let roles = match (dobj.get("roles"), dobj.get("succinct_roles")) {
                    (Some(r), None) => {
                        let list = r
                            .as_array()
                            .ok_or_else(|| malformed(role, "delegations.roles is not an array"))?;
                        let roles = list
                            .iter()
                            .map(|r| delegated_role(r, role))
                            .collect::<Result<Vec<_>, _>>()?;
                        for (i, r) in roles.iter().enumerate() {
                            // §4.5: "The rolename MUST be unique in the delegations object".
                            if roles.iter().skip(i + 1).any(|o| o.name == r.name) {
                                return Err(malformed(
                                    role,
                                    format!("delegations.roles names {} twice", r.name),
                                ));
                            }
                        }
                        DelegatedRoles::Roles(roles)
                    }
                    (None, Some(s)) => {
                        let sobj = obj_value(s, "succinct_roles", role)?;
                        let keys = role_keys(sobj, "succinct_roles", role)?;
                        let bit_length =
                            u64_value(field(sobj, "bit_length", role)?, "bit_length", role)?;
                        if !(1..=32).contains(&bit_length) {
                            return Err(malformed(
                                role,
                                "succinct_roles.bit_length must be 1 to 32",
                            ));
                        }
                        let name_prefix = str_field(sobj, "name_prefix", role)?.to_owned();
                        DelegatedRoles::Succinct(SuccinctRoles {
                            keys,
                            bit_length: u32::try_from(bit_length).unwrap_or(32),
                            name_prefix,
                        })
                    }
                    _ => {
                        return Err(malformed(
                            role,
                            "delegations needs exactly one of roles and succinct_roles",
                        ))
                    }
                };
                Some(Delegations { keys, roles })
            }
        };
        Ok(Targets {
            common,
            targets,
            delegations,
        })
    }
}

/// Check `data` against a length and hashes listed for it (5.5.2, 5.6.2, 5.7.3). Every
/// listed hash must match; an algorithm this client cannot compute is a mismatch.
pub fn verify_length_and_hashes(
    what: &str,
    data: &[u8],
    length: Option<u64>,
    hashes: Option<&[(String, String)]>,
) -> Result<(), RepositoryError> {
    let mismatch = |reason: String| RepositoryError::LengthOrHashMismatch {
        what: what.to_owned(),
        reason,
    };
    if let Some(expected) = length {
        let got = data.len() as u64;
        if got != expected {
            return Err(mismatch(format!("length {got}, expected {expected}")));
        }
    }
    for (alg, expected) in hashes.unwrap_or(&[]) {
        let got = match alg.as_str() {
            "sha256" => hex::encode(Sha256::digest(data)),
            "sha384" => hex::encode(Sha384::digest(data)),
            "sha512" => hex::encode(Sha512::digest(data)),
            other => return Err(mismatch(format!("unsupported hash algorithm {other:?}"))),
        };
        if !got.eq_ignore_ascii_case(expected) {
            return Err(mismatch(format!("{alg} {got}, expected {expected}")));
        }
    }
    Ok(())
}

impl MetaFile {
    /// Check metadata bytes against this entry's length and hashes, when listed.
    pub fn verify(&self, what: &str, data: &[u8]) -> Result<(), RepositoryError> {
        verify_length_and_hashes(what, data, self.length, self.hashes.as_deref())
    }
}

impl TargetFile {
    /// Check a downloaded target against its length and every listed hash (5.7.3).
    pub fn verify(&self, data: &[u8]) -> Result<(), RepositoryError> {
        verify_length_and_hashes(&self.path, data, Some(self.length), Some(&self.hashes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_parses_to_unix_seconds() {
        assert_eq!(parse_expires("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_expires("2030-01-01T00:00:00Z"), Some(1_893_456_000));
        assert_eq!(parse_expires("2024-02-29T12:34:56Z"), Some(1_709_210_096));
        assert_eq!(parse_expires("2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_expires("2030-01-01T00:00:00+00:00"), None);
        assert_eq!(parse_expires("2021-12-18T13:28:12.99008-06:00"), None);
        assert_eq!(parse_expires("2030-01-01 00:00:00Z"), None);
    }

    #[test]
    fn succinct_bins() {
        let s = SuccinctRoles {
            keys: RoleKeys {
                keyids: vec![],
                threshold: 1,
            },
            bit_length: 8,
            name_prefix: "bin".into(),
        };
        let name = s.role_for_target("projects/demo.json");
        let expected = &super::super::pattern::target_path_hash("projects/demo.json")[..2];
        assert_eq!(name, format!("bin-{expected}"));
        assert!(s.is_delegated_role("bin-00") && s.is_delegated_role("bin-ff"));
        assert!(
            !s.is_delegated_role("bin-100")
                && !s.is_delegated_role("bin-0")
                && !s.is_delegated_role("bin-zz")
        );
        let s = SuccinctRoles {
            keys: RoleKeys {
                keyids: vec![],
                threshold: 1,
            },
            bit_length: 5,
            name_prefix: "b".into(),
        };
        assert!(s.is_delegated_role("b-1f") && !s.is_delegated_role("b-20"));
    }
}
