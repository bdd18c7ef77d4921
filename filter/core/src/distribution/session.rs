//! One request at a time per upload session, within one gateway process.
//!
//! Two requests continuing one session at once would both encrypt from the same offset, so
//! with the same keystream; the registry's own offset check is made when each request starts,
//! so it lets both through. The adapter claims the session in a store shared by every worker
//! (Envoy shared data, compare-and-set) before it encrypts a byte, and releases it when the
//! stream ends. Claims live in a fixed number of slots (a session id hashes to one), each a
//! short list of `id time` lines, so abandoned sessions cannot grow the store: a claim older than
//! [`STALE_AFTER_SECS`] (a stream that died without releasing it) no longer counts.

use sha2::{Digest as _, Sha256};

use crate::error::{Code, OciError};
use crate::store::Store;

/// Slots the claims are spread over.
pub const SLOTS: u32 = 256;
/// Age after which a claim is taken for one whose stream died without releasing it.
pub const STALE_AFTER_SECS: u64 = 3600;
/// Claims kept per slot at most; more concurrent sessions hashing to one slot are refused
/// (the client retries) rather than letting the value grow.
pub const MAX_CLAIMS_PER_SLOT: usize = 64;

/// Shared-data key of the slot that holds `upload_id`'s claim.
pub fn slot_key(upload_id: &str) -> String {
    let h = Sha256::digest(upload_id.as_bytes());
    let head: [u8; 4] = h
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .unwrap_or_default();
    let n = u32::from_be_bytes(head) % SLOTS;
    format!("ocicrypt/sessions/{n}")
}

fn entries(value: &[u8]) -> impl Iterator<Item = (&str, u64)> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            let (id, t) = l.split_once(' ')?;
            Some((id, t.parse().ok()?))
        })
}

/// The slot's new value with `upload_id` claimed at `now`, or `None` when a live claim of it is
/// there already (or the slot is full). Stale claims are dropped on the way.
pub fn claim(value: &[u8], upload_id: &str, now: u64) -> Option<Vec<u8>> {
    let mut out = String::new();
    let mut kept = 0;
    for (id, t) in entries(value) {
        let live = now.saturating_sub(t) < STALE_AFTER_SECS;
        if !live {
            continue;
        }
        if id == upload_id {
            return None;
        }
        kept += 1;
        out.push_str(&format!("{id} {t}\n"));
    }
    if kept >= MAX_CLAIMS_PER_SLOT || upload_id.contains(['\n', ' ']) {
        return None;
    }
    out.push_str(&format!("{upload_id} {now}\n"));
    Some(out.into_bytes())
}

/// The slot's new value without `upload_id`'s claim.
pub fn release(value: &[u8], upload_id: &str) -> Vec<u8> {
    let mut out = String::new();
    for (id, t) in entries(value).filter(|(id, _)| *id != upload_id) {
        out.push_str(&format!("{id} {t}\n"));
    }
    out.into_bytes()
}

/// Tries of a compare-and-set update of a slot before giving up (other workers kept writing it).
const CAS_TRIES: usize = 8;

/// Claims `upload_id` in `store` at `now` (unix seconds): refused when another request of the
/// session holds it, or when the slot stays contended.
pub fn claim_in(store: &dyn Store, upload_id: &str, now: u64) -> Result<(), OciError> {
    let key = slot_key(upload_id);
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get_cas(&key) else {
            break;
        };
        let Some(next) = claim(value.as_deref().unwrap_or_default(), upload_id, now) else {
            return Err(OciError::new(
                Code::BlobUploadInvalid,
                "another request of this upload session is in progress at the gateway; send one request at a time per upload",
            ));
        };
        // An absent slot is created only if still absent: a CAS token no live value has.
        let cas = if value.is_none() { u32::MAX } else { cas };
        if store.set_cas(&key, &next, cas) {
            return Ok(());
        }
    }
    Err(OciError::new(
        Code::Unavailable,
        "the gateway could not record this upload request (busy); retry",
    ))
}

/// Releases the claim of `upload_id` in `store` (best effort: a claim left behind goes stale).
pub fn release_in(store: &dyn Store, upload_id: &str) {
    let key = slot_key(upload_id);
    for _ in 0..CAS_TRIES {
        let Some((Some(value), cas)) = store.get_cas(&key) else {
            return;
        };
        if store.set_cas(&key, &release(&value, upload_id), cas) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_session() {
        let v = claim(b"", "u1", 100).unwrap();
        assert_eq!(claim(&v, "u1", 101), None);
        let v = claim(&v, "u2", 101).unwrap();
        assert_eq!(claim(&v, "u2", 102), None);
        let v = release(&v, "u1");
        let v = claim(&v, "u1", 103).unwrap();
        assert_eq!(claim(&v, "u1", 104), None);
        assert_eq!(claim(&v, "u2", 104), None);
    }

    #[test]
    fn stale_claims_and_garbage_do_not_count() {
        let v = claim(b"", "u1", 100).unwrap();
        let v = claim(&v, "u1", 100 + STALE_AFTER_SECS).unwrap();
        assert_eq!(entries(&v).count(), 1);
        assert!(claim(b"\xff\xfe junk\nno-time\n", "u1", 5).is_some());
        assert_eq!(claim(b"", "bad id", 5), None);
    }

    #[test]
    fn a_slot_stays_bounded() {
        let mut v = Vec::new();
        for i in 0..MAX_CLAIMS_PER_SLOT {
            v = claim(&v, &format!("u{i}"), 10).unwrap();
        }
        assert_eq!(claim(&v, "one-more", 10), None);
        assert!(slot_key("u1").starts_with("ocicrypt/sessions/"));
    }
}
