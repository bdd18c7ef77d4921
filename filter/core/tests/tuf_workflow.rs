//! Step-by-step checks of the TUF client workflow against metadata built and signed here
//! (ed25519), for the cases python-tuf's generator cannot produce: duplicate keyids, keys
//! listed twice, invalid signatures next to valid ones, unknown fields, odd serialisations,
//! out-of-order calls, download failures.
// Test code: a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod tuf;
}

use std::collections::BTreeMap;

use common::tuf::{repo_err, NOW};
use ed25519_dalek::{Signer as _, SigningKey};
use ocicrypt_core::tuf::canonical::to_canonical;
use ocicrypt_core::tuf::{
    ExpectedVersion, Fetch, FetchBase, MetadataCache, Outcome, Progress, RepositoryError,
    TrustedMetadataSet, TufError, Updater, UpdaterConfig,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const FUTURE: &str = "2099-01-01T00:00:00Z";
const PAST: &str = "2029-06-01T00:00:00Z";

struct Key {
    sk: SigningKey,
    keyid: String,
    public: Value,
}

fn key(seed: u8) -> Key {
    let sk = SigningKey::from_bytes(&[seed; 32]);
    let public = json!({
        "keytype": "ed25519",
        "scheme": "ed25519",
        "keyval": {"public": hex::encode(sk.verifying_key().as_bytes())}
    });
    let keyid = hex::encode(Sha256::digest(to_canonical(&public).unwrap()));
    Key { sk, keyid, public }
}

/// `{"signed": …, "signatures": […]}` signed by `keys` (under their own keyids).
fn sign(signed: &Value, keys: &[&Key]) -> Vec<u8> {
    let sigs: Vec<(String, &Key)> = keys.iter().map(|k| (k.keyid.clone(), *k)).collect();
    sign_as(signed, &sigs)
}

/// Sign with each key, claiming the given keyid.
fn sign_as(signed: &Value, sigs: &[(String, &Key)]) -> Vec<u8> {
    let canonical = to_canonical(signed).unwrap();
    let signatures: Vec<Value> = sigs
        .iter()
        .map(|(keyid, k)| json!({"keyid": keyid, "sig": hex::encode(k.sk.sign(&canonical).to_bytes())}))
        .collect();
    serde_json::to_vec_pretty(&json!({"signatures": signatures, "signed": signed})).unwrap()
}

fn keys_obj(keys: &[&Key]) -> Value {
    Value::Object(
        keys.iter()
            .map(|k| (k.keyid.clone(), k.public.clone()))
            .collect(),
    )
}

fn ids(keys: &[&Key]) -> Vec<String> {
    keys.iter().map(|k| k.keyid.clone()).collect()
}

/// Root with one key per top-level role (seeds: root r, timestamp t, snapshot s, targets g).
fn root(version: u64, root_keys: &[&Key], t: &Key, s: &Key, g: &Key, expires: &str) -> Value {
    let mut all: Vec<&Key> = root_keys.to_vec();
    all.extend([t, s, g]);
    json!({
        "_type": "root",
        "spec_version": "1.0.31",
        "version": version,
        "expires": expires,
        "consistent_snapshot": false,
        "keys": keys_obj(&all),
        "roles": {
            "root": {"keyids": ids(root_keys), "threshold": 1},
            "timestamp": {"keyids": [t.keyid], "threshold": 1},
            "snapshot": {"keyids": [s.keyid], "threshold": 1},
            "targets": {"keyids": [g.keyid], "threshold": 1}
        }
    })
}

fn meta(version: u64, data: Option<&[u8]>) -> Value {
    match data {
        Some(d) => {
            json!({"version": version, "length": d.len(), "hashes": {"sha256": hex::encode(Sha256::digest(d))}})
        }
        None => json!({"version": version}),
    }
}

fn timestamp(version: u64, snapshot_version: u64, expires: &str) -> Value {
    json!({
        "_type": "timestamp", "spec_version": "1.0", "version": version, "expires": expires,
        "meta": {"snapshot.json": meta(snapshot_version, None)}
    })
}

fn snapshot(version: u64, roles: &[(&str, u64)]) -> Value {
    let m: serde_json::Map<String, Value> = roles
        .iter()
        .map(|(r, v)| (format!("{r}.json"), meta(*v, None)))
        .collect();
    json!({"_type": "snapshot", "spec_version": "1.0", "version": version, "expires": FUTURE, "meta": m})
}

fn targets(version: u64, files: &[(&str, &[u8])], delegations: Option<Value>) -> Value {
    let t: serde_json::Map<String, Value> = files
        .iter()
        .map(|(p, d)| {
            (
                p.to_string(),
                json!({"length": d.len(), "hashes": {"sha256": hex::encode(Sha256::digest(d))}}),
            )
        })
        .collect();
    let mut v = json!({"_type": "targets", "spec_version": "1.0", "version": version, "expires": FUTURE, "targets": t});
    if let Some(d) = delegations {
        v["delegations"] = d;
    }
    v
}

struct Keys {
    r: Key,
    t: Key,
    s: Key,
    g: Key,
}

fn keys() -> Keys {
    Keys {
        r: key(1),
        t: key(2),
        s: key(3),
        g: key(4),
    }
}

/// An in-memory repository for the updater: path -> bytes.
#[derive(Default)]
struct Repo {
    metadata: BTreeMap<String, Vec<u8>>,
    targets: BTreeMap<String, Vec<u8>>,
    log: Vec<String>,
}

impl Repo {
    fn get(&mut self, f: &Fetch) -> (u16, Vec<u8>) {
        let files = match f.base {
            FetchBase::Metadata => &self.metadata,
            FetchBase::Targets => &self.targets,
        };
        self.log.push(f.path.clone());
        files
            .get(&f.path)
            .map_or((404, Vec::new()), |b| (200, b.clone()))
    }
}

fn drive(
    up: &mut Updater,
    repo: &mut Repo,
    start: Result<Progress, TufError>,
) -> Result<Outcome, TufError> {
    common::tuf::drive(up, start, |_, f| repo.get(f))
}

/// A small non-consistent-snapshot repository with one target.
fn simple_repo(k: &Keys, files: &[(&str, &[u8])]) -> (Vec<u8>, Repo) {
    let root1 = sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]);
    let mut r = Repo::default();
    r.metadata.insert(
        "targets.json".into(),
        sign(&targets(1, files, None), &[&k.g]),
    );
    r.metadata.insert(
        "snapshot.json".into(),
        sign(&snapshot(1, &[("targets", 1)]), &[&k.s]),
    );
    r.metadata.insert(
        "timestamp.json".into(),
        sign(&timestamp(1, 1, FUTURE), &[&k.t]),
    );
    for (p, d) in files {
        r.targets.insert(p.to_string(), d.to_vec());
    }
    (root1, r)
}

/// Named `tuf::…` so that `cargo test tuf` selects them.
mod tuf {
    use super::*;

    #[test]
    fn a_key_counts_once_even_under_two_keyids() {
        let k = keys();
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        // The snapshot key listed a second time under another keyid, threshold 2.
        r["keys"]["alias"] = k.s.public.clone();
        r["roles"]["snapshot"] = json!({"keyids": [k.s.keyid, "alias"], "threshold": 2});
        let mut set = TrustedMetadataSet::new(&sign(&r, &[&k.r]), NOW).unwrap();
        set.update_timestamp(&sign(&timestamp(1, 1, FUTURE), &[&k.t]))
            .unwrap();
        let snap = sign_as(
            &snapshot(1, &[("targets", 1)]),
            &[(k.s.keyid.clone(), &k.s), ("alias".into(), &k.s)],
        );
        assert_eq!(
            repo_err(set.update_snapshot(&snap, false)),
            RepositoryError::BadSignature {
                role: "snapshot".into(),
                delegator: "root".into(),
                valid: 1,
                threshold: 2
            }
        );
    }

    #[test]
    fn duplicate_signature_keyids_are_refused() {
        let k = keys();
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        let ts = sign_as(
            &timestamp(1, 1, FUTURE),
            &[(k.t.keyid.clone(), &k.t), (k.t.keyid.clone(), &k.t)],
        );
        assert_eq!(
            repo_err(set.update_timestamp(&ts)),
            RepositoryError::DuplicateSignature {
                role: "timestamp".into(),
                keyid: k.t.keyid.clone()
            }
        );
    }

    #[test]
    fn duplicate_role_keyids_are_refused() {
        let k = keys();
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        r["roles"]["snapshot"] = json!({"keyids": [k.s.keyid, k.s.keyid], "threshold": 2});
        assert!(matches!(
            repo_err(TrustedMetadataSet::new(&sign(&r, &[&k.r]), NOW)),
            RepositoryError::Malformed { .. }
        ));
    }

    #[test]
    fn one_bad_signature_does_not_sink_a_valid_set() {
        let k = keys();
        let other = key(9);
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        r["keys"][other.keyid.as_str()] = other.public.clone();
        r["roles"]["timestamp"] = json!({"keyids": [other.keyid, k.t.keyid], "threshold": 1});
        let mut set = TrustedMetadataSet::new(&sign(&r, &[&k.r]), NOW).unwrap();
        for bad in ["", "zz-not-hex", &"ab".repeat(64)] {
            let mut doc: Value =
                serde_json::from_slice(&sign(&timestamp(1, 1, FUTURE), &[&k.t])).unwrap();
            doc["signatures"]
                .as_array_mut()
                .unwrap()
                .insert(0, json!({"keyid": other.keyid, "sig": bad}));
            // A signature by a key root does not list at all is ignored too.
            doc["signatures"]
                .as_array_mut()
                .unwrap()
                .push(json!({"keyid": "unknown", "sig": "00"}));
            let mut fresh = set.clone();
            fresh
                .update_timestamp(&serde_json::to_vec(&doc).unwrap())
                .unwrap();
        }
        assert!(set
            .update_timestamp(&sign(&timestamp(1, 1, FUTURE), &[&other]))
            .is_ok());
    }

    #[test]
    fn unknown_fields_are_covered_by_the_signature() {
        let k = keys();
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        r["x-custom"] = json!({"b": [1, 2, {"z": null}], "a": "é\"\\"});
        r["roles"]["root"]["x-period"] = json!(7);
        let bytes = sign(&r, &[&k.r]);
        assert!(TrustedMetadataSet::new(&bytes, NOW).is_ok());
        let tampered = String::from_utf8(bytes)
            .unwrap()
            .replace("\"x-period\": 7", "\"x-period\": 8");
        assert!(matches!(
            repo_err(TrustedMetadataSet::new(tampered.as_bytes(), NOW)),
            RepositoryError::BadSignature { .. }
        ));
    }

    #[test]
    fn any_serialisation_of_the_signed_object_verifies() {
        let k = keys();
        let r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        let doc: Value = serde_json::from_slice(&sign(&r, &[&k.r])).unwrap();
        // Compact, and with keys in another order and extra whitespace.
        let compact = serde_json::to_vec(&doc).unwrap();
        assert!(TrustedMetadataSet::new(&compact, NOW).is_ok());
        let reversed: serde_json::Map<String, Value> = doc["signed"]
            .as_object()
            .unwrap()
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let reordered = format!(
            "{{ \"signed\" :\n {} ,\n\t\"signatures\": {} }}\n",
            serde_json::to_string_pretty(&reversed).unwrap(),
            doc["signatures"]
        );
        assert!(reordered.find("\"_type\"") > reordered.find("\"version\""));
        assert!(
            TrustedMetadataSet::new(reordered.as_bytes(), NOW).is_ok(),
            "{reordered}"
        );
    }

    #[test]
    fn wrong_type_is_refused() {
        let k = keys();
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        let snap_as_ts = sign(&snapshot(1, &[("targets", 1)]), &[&k.t]);
        assert_eq!(
            repo_err(set.update_timestamp(&snap_as_ts)),
            RepositoryError::WrongType {
                role: "timestamp".into(),
                expected: "timestamp".into(),
                found: "snapshot".into()
            }
        );
    }

    #[test]
    fn malformed_metadata_is_refused() {
        let k = keys();
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        r.as_object_mut().unwrap().remove("version");
        assert!(matches!(
            repo_err(TrustedMetadataSet::new(&sign(&r, &[&k.r]), NOW)),
            RepositoryError::Malformed { .. }
        ));
        let mut r = root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE);
        r["spec_version"] = json!("2.0.0");
        assert!(matches!(
            repo_err(TrustedMetadataSet::new(&sign(&r, &[&k.r]), NOW)),
            RepositoryError::UnsupportedSpecVersion { .. }
        ));
        assert!(matches!(
            repo_err(TrustedMetadataSet::new(b"not json", NOW)),
            RepositoryError::Malformed { .. }
        ));
    }

    #[test]
    fn root_chain_rules() {
        let k = keys();
        let new_root_key = key(5);
        let r1 = sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]);
        let mut set = TrustedMetadataSet::new(&r1, NOW).unwrap();
        // Skipping a version (5.3.5).
        let r3 = sign(&root(3, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]);
        assert_eq!(
            repo_err(set.update_root(&r3)),
            RepositoryError::BadVersion {
                role: "root".into(),
                expected: ExpectedVersion::Exactly(2),
                found: 3
            }
        );
        // Rotation signed by the new key only, then by the old key only (5.3.4).
        let v2 = root(2, &[&new_root_key], &k.t, &k.s, &k.g, PAST);
        assert_eq!(
            repo_err(set.update_root(&sign(&v2, &[&new_root_key]))),
            RepositoryError::BadSignature {
                role: "root".into(),
                delegator: "root v1".into(),
                valid: 0,
                threshold: 1
            }
        );
        assert_eq!(
            repo_err(set.update_root(&sign(&v2, &[&k.r]))),
            RepositoryError::BadSignature {
                role: "root".into(),
                delegator: "root v2".into(),
                valid: 0,
                threshold: 1
            }
        );
        // Signed by both: accepted although expired (5.3.6) …
        set.update_root(&sign(&v2, &[&k.r, &new_root_key])).unwrap();
        assert_eq!(set.root().signed.common.version, 2);
        // … but an expired final root stops the cycle (5.3.10).
        let ts = sign(&timestamp(1, 1, FUTURE), &[&k.t]);
        assert!(
            matches!(repo_err(set.update_timestamp(&ts)), RepositoryError::Expired { role, .. } if role == "root")
        );
        // A newer, valid root fixes it.
        let v3 = root(3, &[&new_root_key], &k.t, &k.s, &k.g, FUTURE);
        set.update_root(&sign(&v3, &[&new_root_key])).unwrap();
        set.update_timestamp(&ts).unwrap();
        // No more roots once timestamp is loaded.
        assert!(matches!(
            set.update_root(&r1),
            Err(TufError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn timestamp_rollback_and_equal_version() {
        let k = keys();
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        set.update_timestamp(&sign(&timestamp(2, 5, FUTURE), &[&k.t]))
            .unwrap();
        assert_eq!(
            repo_err(set.update_timestamp(&sign(&timestamp(2, 6, FUTURE), &[&k.t]))),
            RepositoryError::EqualVersion {
                role: "timestamp".into(),
                version: 2
            }
        );
        assert_eq!(
            set.timestamp().unwrap().signed.snapshot_meta.version,
            5,
            "the trusted one is kept"
        );
        assert_eq!(
            repo_err(set.update_timestamp(&sign(&timestamp(1, 5, FUTURE), &[&k.t]))),
            RepositoryError::BadVersion {
                role: "timestamp".into(),
                expected: ExpectedVersion::AtLeast(2),
                found: 1
            }
        );
        assert_eq!(
            repo_err(set.update_timestamp(&sign(&timestamp(3, 4, FUTURE), &[&k.t]))),
            RepositoryError::BadVersion {
                role: "snapshot.json".into(),
                expected: ExpectedVersion::AtLeast(5),
                found: 4
            }
        );
        // An expired timestamp is kept as intermediate (rollback reference) but blocks snapshot.
        assert!(matches!(
            repo_err(set.update_timestamp(&sign(&timestamp(4, 5, PAST), &[&k.t]))),
            RepositoryError::Expired { .. }
        ));
        assert_eq!(set.timestamp().unwrap().signed.common.version, 4);
        let snap = sign(&snapshot(5, &[("targets", 1)]), &[&k.s]);
        assert!(
            matches!(repo_err(set.update_snapshot(&snap, false)), RepositoryError::Expired { role, .. } if role == "timestamp")
        );
    }

    #[test]
    fn snapshot_rules() {
        let k = keys();
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        let snap = sign(&snapshot(1, &[("targets", 3), ("a", 1)]), &[&k.s]);
        // Hashes and length from timestamp (5.5.2).
        let mut ts = timestamp(1, 1, FUTURE);
        ts["meta"]["snapshot.json"] = meta(1, Some(b"other bytes"));
        set.update_timestamp(&sign(&ts, &[&k.t])).unwrap();
        assert!(matches!(
            repo_err(set.update_snapshot(&snap, false)),
            RepositoryError::LengthOrHashMismatch { .. }
        ));
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        ts["meta"]["snapshot.json"] = meta(2, Some(&snap));
        set.update_timestamp(&sign(&ts, &[&k.t])).unwrap();
        // Hash matches, but version 1 is not the 2 timestamp lists (5.5.4): kept as intermediate.
        assert_eq!(
            repo_err(set.update_snapshot(&snap, false)),
            RepositoryError::BadVersion {
                role: "snapshot".into(),
                expected: ExpectedVersion::Exactly(2),
                found: 1
            }
        );
        // Against that intermediate snapshot: a role may not vanish or go back (5.5.5).
        let gone = sign(&snapshot(2, &[("targets", 3)]), &[&k.s]);
        assert_eq!(
            repo_err(set.update_snapshot(&gone, true)),
            RepositoryError::MetaRemoved {
                meta: "a.json".into()
            }
        );
        let back = sign(&snapshot(2, &[("targets", 2), ("a", 1)]), &[&k.s]);
        assert_eq!(
            repo_err(set.update_snapshot(&back, true)),
            RepositoryError::BadVersion {
                role: "targets.json".into(),
                expected: ExpectedVersion::AtLeast(3),
                found: 2
            }
        );
        let good = sign(&snapshot(2, &[("targets", 3), ("a", 1), ("b", 1)]), &[&k.s]);
        set.update_snapshot(&good, true).unwrap();
        // Targets must be the version snapshot lists (5.6.4) and then snapshot is frozen.
        let t2 = sign(&targets(2, &[], None), &[&k.g]);
        assert_eq!(
            repo_err(set.update_targets(&t2)),
            RepositoryError::BadVersion {
                role: "targets".into(),
                expected: ExpectedVersion::Exactly(3),
                found: 2
            }
        );
        set.update_targets(&sign(&targets(3, &[], None), &[&k.g]))
            .unwrap();
        assert!(matches!(
            set.update_snapshot(&good, true),
            Err(TufError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn out_of_order_loading_is_refused() {
        let k = keys();
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        let snap = sign(&snapshot(1, &[("targets", 1)]), &[&k.s]);
        assert!(matches!(
            set.update_snapshot(&snap, false),
            Err(TufError::OutOfOrder { .. })
        ));
        assert!(matches!(
            set.update_targets(&sign(&targets(1, &[], None), &[&k.g])),
            Err(TufError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn timestamp_and_snapshot_key_rotation_is_detected() {
        let k = keys();
        let r1 = sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]);
        let mut set = TrustedMetadataSet::new(&r1, NOW).unwrap();
        set.update_root(&sign(&root(2, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]))
            .unwrap();
        assert!(!set.timestamp_or_snapshot_keys_rotated());
        // Rotating only the targets key is not a 5.3.11 rotation.
        set.update_root(&sign(
            &root(3, &[&k.r], &k.t, &k.s, &key(7), FUTURE),
            &[&k.r],
        ))
        .unwrap();
        assert!(!set.timestamp_or_snapshot_keys_rotated());
        set.update_root(&sign(
            &root(4, &[&k.r], &k.t, &key(8), &key(7), FUTURE),
            &[&k.r],
        ))
        .unwrap();
        assert!(set.timestamp_or_snapshot_keys_rotated());
    }

    #[test]
    fn a_role_shared_by_two_delegators_is_verified_against_each() {
        let k = keys();
        let (pa, pb, rel_a, rel_b) = (key(10), key(11), key(12), key(13));
        let deleg = |name: &str, kk: &Key, paths: &[&str]| json!({"keys": keys_obj(&[kk]), "roles": [{"name": name, "keyids": [kk.keyid], "threshold": 1, "terminating": false, "paths": paths}]});
        let mut top = targets(1, &[], None);
        top["delegations"] = json!({
            "keys": keys_obj(&[&pa, &pb]),
            "roles": [
                {"name": "parent-a", "keyids": [pa.keyid], "threshold": 1, "terminating": false, "paths": ["team-a/*"]},
                {"name": "parent-b", "keyids": [pb.keyid], "threshold": 1, "terminating": false, "paths": ["team-b/*"]}
            ]
        });
        let mut set = TrustedMetadataSet::new(
            &sign(&root(1, &[&k.r], &k.t, &k.s, &k.g, FUTURE), &[&k.r]),
            NOW,
        )
        .unwrap();
        set.update_timestamp(&sign(&timestamp(1, 1, FUTURE), &[&k.t]))
            .unwrap();
        let snap = snapshot(
            1,
            &[
                ("targets", 1),
                ("parent-a", 1),
                ("parent-b", 1),
                ("release", 1),
            ],
        );
        set.update_snapshot(&sign(&snap, &[&k.s]), false).unwrap();
        set.update_targets(&sign(&top, &[&k.g])).unwrap();
        set.update_delegated_targets(
            &sign(
                &targets(1, &[], Some(deleg("release", &rel_a, &["team-a/*"]))),
                &[&pa],
            ),
            "parent-a",
            "targets",
        )
        .unwrap();
        set.update_delegated_targets(
            &sign(
                &targets(1, &[], Some(deleg("release", &rel_b, &["team-b/*"]))),
                &[&pb],
            ),
            "parent-b",
            "targets",
        )
        .unwrap();
        // "release" is signed by parent-a's release key only.
        let release = sign(
            &targets(1, &[("team-a/x", b"a"), ("team-b/x", b"b")], None),
            &[&rel_a],
        );
        set.update_delegated_targets(&release, "release", "parent-a")
            .unwrap();
        assert!(set
            .delegated_targets("release", "parent-a")
            .unwrap()
            .is_some());
        assert_eq!(
            repo_err(set.delegated_targets("release", "parent-b")),
            RepositoryError::BadSignature {
                role: "release".into(),
                delegator: "parent-b".into(),
                valid: 0,
                threshold: 1
            }
        );
        // A role the delegator does not delegate to.
        assert_eq!(
            repo_err(set.update_delegated_targets(&release, "release", "targets")),
            RepositoryError::NotDelegated {
                role: "release".into(),
                delegator: "targets".into()
            }
        );
    }

    #[test]
    fn updater_on_a_non_consistent_repository() {
        let k = keys();
        let (root1, mut r) = simple_repo(&k, &[("dir/file one.txt", b"hello")]);
        let mut up = Updater::new(MetadataCache::new(root1), UpdaterConfig::default());
        let start = up.start_refresh(NOW);
        assert_eq!(drive(&mut up, &mut r, start), Ok(Outcome::Refreshed));
        assert_eq!(
            r.log,
            [
                "2.root.json",
                "timestamp.json",
                "snapshot.json",
                "targets.json"
            ]
        );
        r.targets
            .insert("dir/file%20one.txt".into(), b"hello".to_vec());
        let start = up.start_fetch_target("dir/file one.txt");
        let Ok(Outcome::Downloaded { bytes, .. }) = drive(&mut up, &mut r, start) else {
            panic!()
        };
        assert_eq!(bytes, b"hello");
        assert_eq!(r.log.last().unwrap(), "dir/file%20one.txt");
    }

    #[test]
    fn snapshot_key_rotation_forgets_cached_timestamp_and_snapshot() {
        let k = keys();
        let (root1, mut r) = simple_repo(&k, &[]);
        let mut up = Updater::new(MetadataCache::new(root1), UpdaterConfig::default());
        let start = up.start_refresh(NOW);
        drive(&mut up, &mut r, start).unwrap();
        assert!(up.cache().timestamp.is_some() && up.cache().snapshot.is_some());
        // Root v2 rotates the snapshot key; root v3 is bad, so the cycle fails after v2.
        let s2 = key(30);
        r.metadata.insert(
            "2.root.json".into(),
            sign(&root(2, &[&k.r], &k.t, &s2, &k.g, FUTURE), &[&k.r]),
        );
        r.metadata.insert(
            "3.root.json".into(),
            sign(&root(3, &[&k.r], &k.t, &s2, &k.g, FUTURE), &[&s2]),
        );
        let start = up.start_refresh(NOW);
        assert!(matches!(
            repo_err(drive(&mut up, &mut r, start)),
            RepositoryError::BadSignature { .. }
        ));
        // 5.3.11: v2 is persisted, and with it timestamp and snapshot are forgotten.
        assert_eq!(up.cache().root, r.metadata["2.root.json"]);
        assert_eq!(
            (up.cache().timestamp.as_ref(), up.cache().snapshot.as_ref()),
            (None, None)
        );
        assert!(up.cache().targets.contains_key("targets"));
    }

    #[test]
    fn download_errors() {
        let k = keys();
        let (root1, mut r) = simple_repo(&k, &[("f", b"x")]);
        let mut up = Updater::new(MetadataCache::new(root1.clone()), UpdaterConfig::default());
        // Timestamp missing: a download error, not the end of the root chain.
        let ts = r.metadata.remove("timestamp.json").unwrap();
        let start = up.start_refresh(NOW);
        assert_eq!(
            drive(&mut up, &mut r, start),
            Err(TufError::Download(
                ocicrypt_core::tuf::DownloadError::Http {
                    path: "timestamp.json".into(),
                    status: 404
                }
            ))
        );
        assert!(!up.is_busy() && !up.is_refreshed());
        // Over the configured limit.
        r.metadata.insert("timestamp.json".into(), ts);
        let mut small = Updater::new(
            MetadataCache::new(root1),
            UpdaterConfig {
                timestamp_max_len: 10,
                ..UpdaterConfig::default()
            },
        );
        let start = small.start_refresh(NOW);
        assert!(matches!(
            drive(&mut small, &mut r, start),
            Err(TufError::Download(
                ocicrypt_core::tuf::DownloadError::TooLarge { max_len: 10, .. }
            ))
        ));
        // A server error on root N+1 is not "no newer root".
        let start = up.start_refresh(NOW).unwrap();
        assert!(matches!(start, Progress::Fetch(ref f) if f.path == "2.root.json"));
        assert!(matches!(
            up.on_response(500, b""),
            Err(TufError::Download(_))
        ));
        assert!(matches!(
            up.on_response(200, b""),
            Err(TufError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn unknown_hash_algorithm_fails_the_target() {
        let k = keys();
        let (root1, mut r) = simple_repo(&k, &[]);
        let mut t = targets(1, &[], None);
        t["targets"]["f"] = json!({"length": 1, "hashes": {"md5-ish": "00"}});
        r.metadata.insert("targets.json".into(), sign(&t, &[&k.g]));
        r.targets.insert("f".into(), b"x".to_vec());
        let mut up = Updater::new(MetadataCache::new(root1), UpdaterConfig::default());
        let start = up.start_refresh(NOW);
        drive(&mut up, &mut r, start).unwrap();
        let start = up.start_fetch_target("f");
        assert!(matches!(
            repo_err(drive(&mut up, &mut r, start)),
            RepositoryError::LengthOrHashMismatch { .. }
        ));
    }

    #[test]
    fn delegation_search_is_capped() {
        let k = keys();
        let (root1, mut r) = simple_repo(&k, &[]);
        let dk = key(20);
        // A chain targets -> d0 -> d1 -> … -> d39, each delegating "*" to the next.
        let mut snap_roles: Vec<(String, u64)> = vec![("targets".into(), 1)];
        let link = |next: &str| json!({"keys": keys_obj(&[&dk]), "roles": [{"name": next, "keyids": [dk.keyid], "threshold": 1, "terminating": false, "paths": ["*"]}]});
        r.metadata.insert(
            "targets.json".into(),
            sign(&targets(1, &[], Some(link("d0"))), &[&k.g]),
        );
        for i in 0..40 {
            let name = format!("d{i}");
            r.metadata.insert(
                format!("{name}.json"),
                sign(&targets(1, &[], Some(link(&format!("d{}", i + 1)))), &[&dk]),
            );
            snap_roles.push((name, 1));
        }
        let roles: Vec<(&str, u64)> = snap_roles.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        r.metadata
            .insert("snapshot.json".into(), sign(&snapshot(1, &roles), &[&k.s]));
        let mut up = Updater::new(MetadataCache::new(root1), UpdaterConfig::default());
        let start = up.start_refresh(NOW);
        drive(&mut up, &mut r, start).unwrap();
        r.log.clear();
        let start = up.start_resolve("missing");
        assert_eq!(
            drive(&mut up, &mut r, start),
            Err(TufError::TargetNotFound {
                path: "missing".into()
            })
        );
        assert_eq!(
            r.log.len(),
            32,
            "targets + 32 delegated roles visited at most, {:?}",
            r.log
        );
    }
}
