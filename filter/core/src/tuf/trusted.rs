//! The set of trusted metadata of one update cycle: bytes in, verified metadata or a typed
//! error out, no I/O and no clock (the caller fixes the update start time, spec §5.1).
//!
//! Load order is enforced: root (initial, then each N+1) → timestamp → snapshot → targets →
//! delegated targets. As in python-tuf's `TrustedMetadataSet`, a timestamp or snapshot that
//! verifies but is not valid as *final* (expired, or a snapshot whose version differs from
//! the timestamp's meta) stays loaded as *intermediate* metadata: it can only be used to
//! check a newer copy of itself for rollback, and it blocks loading the next role.

use std::collections::{BTreeMap, BTreeSet};

use super::error::{ExpectedVersion, RepositoryError, TufError};
use super::keys::Key;
use super::metadata::{
    Envelope, RoleKeys, Root, Snapshot, Targets, Timestamp, ROOT, SNAPSHOT, TARGETS, TIMESTAMP,
};

/// Verified metadata together with the exact bytes it was read from (what a client persists).
#[derive(Clone, Debug)]
pub struct Verified<T> {
    /// The verified payload.
    pub signed: T,
    /// The received bytes.
    pub raw: Vec<u8>,
}

#[derive(Clone, Debug)]
struct LoadedTargets {
    verified: Verified<Targets>,
    envelope: Envelope,
    /// Delegators whose keys and threshold this metadata has been verified against.
    verified_by: BTreeSet<String>,
}

/// Trusted metadata of one update cycle (spec §5.2 onwards).
#[derive(Clone, Debug)]
pub struct TrustedMetadataSet {
    reference_time: i64,
    start_keys: [Vec<(String, Option<Vec<u8>>)>; 2],
    root: Verified<Root>,
    timestamp: Option<Verified<Timestamp>>,
    snapshot: Option<Verified<Snapshot>>,
    targets: BTreeMap<String, LoadedTargets>,
}

/// Verify that a threshold of distinct keys of `keys` signed `envelope` (5.3.4, 5.4.2, 5.5.3,
/// 5.6.3). A key counts once however many keyids name it; a bad or unknown signature is
/// skipped, not fatal.
pub fn verify_threshold(
    role: &str,
    delegator: &str,
    keys: &BTreeMap<String, Key>,
    role_keys: &RoleKeys,
    envelope: &Envelope,
) -> Result<(), RepositoryError> {
    let mut counted: BTreeSet<Vec<u8>> = BTreeSet::new();
    for keyid in &role_keys.keyids {
        if counted.len() as u64 >= role_keys.threshold {
            break;
        }
        let (Some(key), Some(sig)) = (keys.get(keyid), envelope.signature(keyid)) else {
            continue;
        };
        let (Some(identity), Some(sig_bytes)) = (key.identity(), sig.sig.as_deref()) else {
            continue;
        };
        if !counted.contains(&identity) && key.verify(&envelope.canonical, sig_bytes) {
            counted.insert(identity);
        }
    }
    let valid = counted.len() as u64;
    if valid >= role_keys.threshold {
        Ok(())
    } else {
        Err(RepositoryError::BadSignature {
            role: role.to_owned(),
            delegator: delegator.to_owned(),
            valid,
            threshold: role_keys.threshold,
        })
    }
}

fn missing_role(role: &str) -> RepositoryError {
    RepositoryError::Malformed {
        role: ROOT.to_owned(),
        reason: format!("roles has no {role}"),
    }
}

impl TrustedMetadataSet {
    /// Load the trusted root (spec §5.2): it must be signed by a threshold of its own root
    /// keys. Its expiry does not matter yet (checked on the final root, 5.3.10). `now` is the
    /// fixed update start time (§5.1), unix seconds.
    pub fn new(root_bytes: &[u8], now: i64) -> Result<TrustedMetadataSet, TufError> {
        let envelope = Envelope::parse(ROOT, root_bytes)?;
        let root = Root::from_signed(&envelope.signed)?;
        let own = root.role_keys(ROOT).ok_or_else(|| missing_role(ROOT))?;
        verify_threshold(ROOT, ROOT, &root.keys, own, &envelope)?;
        let start_keys = [
            root.role_key_fingerprint(TIMESTAMP),
            root.role_key_fingerprint(SNAPSHOT),
        ];
        Ok(TrustedMetadataSet {
            reference_time: now,
            start_keys,
            root: Verified {
                signed: root,
                raw: root_bytes.to_vec(),
            },
            timestamp: None,
            snapshot: None,
            targets: BTreeMap::new(),
        })
    }

    /// The fixed update start time (unix seconds) expiry is checked against.
    pub fn reference_time(&self) -> i64 {
        self.reference_time
    }

    /// The trusted root.
    pub fn root(&self) -> &Verified<Root> {
        &self.root
    }

    /// The trusted (possibly intermediate) timestamp.
    pub fn timestamp(&self) -> Option<&Verified<Timestamp>> {
        self.timestamp.as_ref()
    }

    /// The trusted (possibly intermediate) snapshot.
    pub fn snapshot(&self) -> Option<&Verified<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// Loaded targets metadata of `role` (top-level `targets` or delegated), regardless of
    /// which delegator it was verified against.
    pub fn targets(&self, role: &str) -> Option<&Verified<Targets>> {
        self.targets.get(role).map(|l| &l.verified)
    }

    /// Whether the timestamp or snapshot keys of the current root differ from those of the
    /// root this set started with (5.3.11): if so, previously trusted timestamp and snapshot
    /// metadata must be deleted to recover from a fast-forward attack.
    pub fn timestamp_or_snapshot_keys_rotated(&self) -> bool {
        self.start_keys[0] != self.root.signed.role_key_fingerprint(TIMESTAMP)
            || self.start_keys[1] != self.root.signed.role_key_fingerprint(SNAPSHOT)
    }

    /// Verify and load root version N+1 (5.3.4 to 5.3.7). An expired intermediate root is
    /// accepted: expiry is checked on the final root only (5.3.6, 5.3.10).
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<&Verified<Root>, TufError> {
        if self.timestamp.is_some() {
            return Err(TufError::OutOfOrder {
                operation: "update_root",
                reason: "timestamp is already loaded",
            });
        }
        let envelope = Envelope::parse(ROOT, bytes)?;
        let new_root = Root::from_signed(&envelope.signed)?;
        let trusted = &self.root.signed;
        // 5.3.4: signed by a threshold of the trusted root's keys ...
        let old_keys = trusted.role_keys(ROOT).ok_or_else(|| missing_role(ROOT))?;
        verify_threshold(
            ROOT,
            &format!("root v{}", trusted.common.version),
            &trusted.keys,
            old_keys,
            &envelope,
        )?;
        // 5.3.5: exactly N+1.
        let expected = trusted.common.version.saturating_add(1);
        if new_root.common.version != expected {
            return Err(RepositoryError::BadVersion {
                role: ROOT.to_owned(),
                expected: ExpectedVersion::Exactly(expected),
                found: new_root.common.version,
            }
            .into());
        }
        // 5.3.4: ... and by a threshold of its own keys.
        let new_keys = new_root.role_keys(ROOT).ok_or_else(|| missing_role(ROOT))?;
        verify_threshold(
            ROOT,
            &format!("root v{expected}"),
            &new_root.keys,
            new_keys,
            &envelope,
        )?;
        // 5.3.7
        self.root = Verified {
            signed: new_root,
            raw: bytes.to_vec(),
        };
        Ok(&self.root)
    }

    /// 5.3.10: the final root must not be expired.
    pub fn check_final_root(&self) -> Result<(), RepositoryError> {
        let common = &self.root.signed.common;
        if common.is_expired(self.reference_time) {
            return Err(RepositoryError::Expired {
                role: ROOT.to_owned(),
                expires: common.expires,
                now: self.reference_time,
            });
        }
        Ok(())
    }

    /// Verify and load timestamp metadata (5.4.2 to 5.4.4).
    ///
    /// [`RepositoryError::EqualVersion`] means the trusted timestamp has the same version: it
    /// is kept and the update cycle goes on with it (5.4.3.1). On [`RepositoryError::Expired`]
    /// the new timestamp stays loaded as intermediate metadata.
    pub fn update_timestamp(&mut self, bytes: &[u8]) -> Result<&Verified<Timestamp>, TufError> {
        if self.snapshot.is_some() {
            return Err(TufError::OutOfOrder {
                operation: "update_timestamp",
                reason: "snapshot is already loaded",
            });
        }
        self.check_final_root()?;
        let envelope = Envelope::parse(TIMESTAMP, bytes)?;
        let new = Timestamp::from_signed(&envelope.signed)?;
        let root = &self.root.signed;
        // 5.4.2
        let keys = root
            .role_keys(TIMESTAMP)
            .ok_or_else(|| missing_role(TIMESTAMP))?;
        verify_threshold(TIMESTAMP, ROOT, &root.keys, keys, &envelope)?;
        if let Some(old) = &self.timestamp {
            // 5.4.3.1
            let old_version = old.signed.common.version;
            if new.common.version < old_version {
                return Err(RepositoryError::BadVersion {
                    role: TIMESTAMP.to_owned(),
                    expected: ExpectedVersion::AtLeast(old_version),
                    found: new.common.version,
                }
                .into());
            }
            if new.common.version == old_version {
                return Err(RepositoryError::EqualVersion {
                    role: TIMESTAMP.to_owned(),
                    version: old_version,
                }
                .into());
            }
            // 5.4.3.2
            let old_snapshot = old.signed.snapshot_meta.version;
            if new.snapshot_meta.version < old_snapshot {
                return Err(RepositoryError::BadVersion {
                    role: "snapshot.json".to_owned(),
                    expected: ExpectedVersion::AtLeast(old_snapshot),
                    found: new.snapshot_meta.version,
                }
                .into());
            }
        }
        self.timestamp = Some(Verified {
            signed: new,
            raw: bytes.to_vec(),
        });
        // 5.4.4
        self.check_final_timestamp()?;
        self.timestamp.as_ref().ok_or(TufError::OutOfOrder {
            operation: "update_timestamp",
            reason: "unreachable",
        })
    }

    fn final_timestamp(&self) -> Result<&Timestamp, TufError> {
        let ts = self.timestamp.as_ref().ok_or(TufError::OutOfOrder {
            operation: "snapshot update",
            reason: "timestamp is not loaded",
        })?;
        if ts.signed.common.is_expired(self.reference_time) {
            return Err(RepositoryError::Expired {
                role: TIMESTAMP.to_owned(),
                expires: ts.signed.common.expires,
                now: self.reference_time,
            }
            .into());
        }
        Ok(&ts.signed)
    }

    /// 5.4.4: the loaded timestamp must not be expired.
    pub fn check_final_timestamp(&self) -> Result<(), TufError> {
        self.final_timestamp().map(|_| ())
    }

    /// Verify and load snapshot metadata (5.5.2 to 5.5.6). `from_cache` marks bytes this
    /// client verified before (its persisted copy): their hashes are not checked against the
    /// timestamp, so that an old copy can still serve as intermediate metadata for rollback
    /// checks.
    pub fn update_snapshot(
        &mut self,
        bytes: &[u8],
        from_cache: bool,
    ) -> Result<&Verified<Snapshot>, TufError> {
        if self.targets.contains_key(TARGETS) {
            return Err(TufError::OutOfOrder {
                operation: "update_snapshot",
                reason: "targets is already loaded",
            });
        }
        let timestamp = self.final_timestamp()?;
        // 5.5.2
        if !from_cache {
            timestamp.snapshot_meta.verify("snapshot.json", bytes)?;
        }
        let envelope = Envelope::parse(SNAPSHOT, bytes)?;
        let new = Snapshot::from_signed(&envelope.signed)?;
        let root = &self.root.signed;
        // 5.5.3
        let keys = root
            .role_keys(SNAPSHOT)
            .ok_or_else(|| missing_role(SNAPSHOT))?;
        verify_threshold(SNAPSHOT, ROOT, &root.keys, keys, &envelope)?;
        // 5.5.5
        if let Some(old) = &self.snapshot {
            for (name, old_meta) in &old.signed.meta {
                let Some(new_meta) = new.meta.get(name) else {
                    return Err(RepositoryError::MetaRemoved { meta: name.clone() }.into());
                };
                if new_meta.version < old_meta.version {
                    return Err(RepositoryError::BadVersion {
                        role: name.clone(),
                        expected: ExpectedVersion::AtLeast(old_meta.version),
                        found: new_meta.version,
                    }
                    .into());
                }
            }
        }
        self.snapshot = Some(Verified {
            signed: new,
            raw: bytes.to_vec(),
        });
        self.check_final_snapshot()?;
        self.snapshot.as_ref().ok_or(TufError::OutOfOrder {
            operation: "update_snapshot",
            reason: "unreachable",
        })
    }

    fn final_snapshot(&self) -> Result<&Snapshot, TufError> {
        let timestamp = self.final_timestamp()?;
        let snapshot = self.snapshot.as_ref().ok_or(TufError::OutOfOrder {
            operation: "targets update",
            reason: "snapshot is not loaded",
        })?;
        let common = &snapshot.signed.common;
        // 5.5.6
        if common.is_expired(self.reference_time) {
            return Err(RepositoryError::Expired {
                role: SNAPSHOT.to_owned(),
                expires: common.expires,
                now: self.reference_time,
            }
            .into());
        }
        // 5.5.4
        if common.version != timestamp.snapshot_meta.version {
            return Err(RepositoryError::BadVersion {
                role: SNAPSHOT.to_owned(),
                expected: ExpectedVersion::Exactly(timestamp.snapshot_meta.version),
                found: common.version,
            }
            .into());
        }
        Ok(&snapshot.signed)
    }

    /// 5.5.4 and 5.5.6: the loaded snapshot must match the timestamp's version and not be
    /// expired.
    pub fn check_final_snapshot(&self) -> Result<(), TufError> {
        self.final_snapshot().map(|_| ())
    }

    /// Keys and threshold `delegator` requires for `role`.
    fn delegation_keys(
        &self,
        role: &str,
        delegator: &str,
    ) -> Result<(&BTreeMap<String, Key>, &RoleKeys), TufError> {
        let not_delegated = || RepositoryError::NotDelegated {
            role: role.to_owned(),
            delegator: delegator.to_owned(),
        };
        if delegator == ROOT {
            if role != TARGETS {
                return Err(not_delegated().into());
            }
            let root = &self.root.signed;
            let keys = root
                .role_keys(TARGETS)
                .ok_or_else(|| missing_role(TARGETS))?;
            return Ok((&root.keys, keys));
        }
        if [ROOT, TIMESTAMP, SNAPSHOT, TARGETS].contains(&role) {
            return Err(not_delegated().into());
        }
        let parent = self.targets.get(delegator).ok_or(TufError::OutOfOrder {
            operation: "delegated targets update",
            reason: "delegator is not loaded",
        })?;
        let delegations = parent
            .verified
            .signed
            .delegations
            .as_ref()
            .ok_or_else(not_delegated)?;
        let keys = delegations.role_keys(role).ok_or_else(not_delegated)?;
        Ok((&delegations.keys, keys))
    }

    /// Verify and load the top-level targets metadata (5.6.2 to 5.6.5).
    pub fn update_targets(&mut self, bytes: &[u8]) -> Result<&Verified<Targets>, TufError> {
        self.update_delegated_targets(bytes, TARGETS, ROOT)
    }

    /// Verify and load metadata of `role`, delegated by the already loaded `delegator` (`root`
    /// for the top-level targets): hashes and length from snapshot (5.6.2), a threshold of the
    /// keys the delegator lists (5.6.3), version from snapshot (5.6.4), expiry (5.6.5).
    pub fn update_delegated_targets(
        &mut self,
        bytes: &[u8],
        role: &str,
        delegator: &str,
    ) -> Result<&Verified<Targets>, TufError> {
        let snapshot = self.final_snapshot()?;
        let (keys, role_keys) = self.delegation_keys(role, delegator)?;
        let meta_name = format!("{role}.json");
        let meta = snapshot
            .meta
            .get(&meta_name)
            .ok_or_else(|| RepositoryError::NotInSnapshot {
                role: role.to_owned(),
            })?;
        // 5.6.2
        meta.verify(&meta_name, bytes)?;
        let envelope = Envelope::parse(role, bytes)?;
        let new = Targets::from_signed(&envelope.signed, role)?;
        // 5.6.3
        verify_threshold(role, delegator, keys, role_keys, &envelope)?;
        // 5.6.4
        if new.common.version != meta.version {
            return Err(RepositoryError::BadVersion {
                role: role.to_owned(),
                expected: ExpectedVersion::Exactly(meta.version),
                found: new.common.version,
            }
            .into());
        }
        // 5.6.5
        if new.common.is_expired(self.reference_time) {
            return Err(RepositoryError::Expired {
                role: role.to_owned(),
                expires: new.common.expires,
                now: self.reference_time,
            }
            .into());
        }
        let loaded = LoadedTargets {
            verified: Verified {
                signed: new,
                raw: bytes.to_vec(),
            },
            envelope,
            verified_by: BTreeSet::from([delegator.to_owned()]),
        };
        self.targets.insert(role.to_owned(), loaded);
        self.targets
            .get(role)
            .map(|l| &l.verified)
            .ok_or(TufError::OutOfOrder {
                operation: "update_delegated_targets",
                reason: "unreachable",
            })
    }

    /// Loaded metadata of `role` as reached through `delegator`: `None` if not loaded yet.
    /// Metadata first reached through another delegator is checked again against this
    /// delegator's keys and threshold, so that a role shared by two delegators never inherits
    /// the trust of the other path.
    pub fn delegated_targets(
        &mut self,
        role: &str,
        delegator: &str,
    ) -> Result<Option<&Verified<Targets>>, TufError> {
        let Some(loaded) = self.targets.get(role) else {
            return Ok(None);
        };
        if !loaded.verified_by.contains(delegator) {
            let (keys, role_keys) = self.delegation_keys(role, delegator)?;
            verify_threshold(role, delegator, keys, role_keys, &loaded.envelope)?;
            if let Some(loaded) = self.targets.get_mut(role) {
                loaded.verified_by.insert(delegator.to_owned());
            }
        }
        Ok(self.targets.get(role).map(|l| &l.verified))
    }
}
