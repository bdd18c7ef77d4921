//! Upload state: `UploadRecord::from_bytes` / `to_bytes`, and `upload::seal` / `unseal` under a
//! fixed key.
//!
//! Modes (first byte):
//! - 0: the rest as a serialized record: one that parses re-serializes to the same bytes;
//! - 1: the rest as a `_ocicrypt` token: it opens (almost never) only to a record that
//!   re-serializes to what was sealed;
//! - 2: a record built from the input (repository, offset, treatment, a layer cipher advanced
//!   over some bytes): serialized, parsed, sealed, opened, each step gives the same record;
//!   the token opened for another upload id, or with one character changed, is refused.
#![no_main]

use fuzz_support::{check, TestRng, STATE_KEY};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::distribution::upload::{seal, unseal, Replica, Treatment, UploadRecord};
use ocicrypt_core::format::blockcipher::LayerEncryptor;

fn built(u: &mut Unstructured) -> Result<UploadRecord> {
    let repo_len = u.int_in_range(0..=64)?;
    let repository = String::from_utf8_lossy(u.bytes(repo_len)?).into_owned();
    let offset: u64 = u.arbitrary()?;
    let treatment = match u.int_in_range(0..=3u8)? {
        0 => Treatment::Undecided,
        1 => Treatment::Passthrough,
        2 => Treatment::Json,
        _ => {
            let symkey: [u8; 32] = u.arbitrary()?;
            let nonce: [u8; 16] = u.arbitrary()?;
            let mut enc = LayerEncryptor::new(symkey, nonce);
            let n = u.int_in_range(0..=300usize)?;
            let mut chunk = u.bytes(n.min(u.len()))?.to_vec();
            enc.encrypt_in_place(&mut chunk);
            Treatment::Encrypt(Box::new(enc))
        }
    };
    Ok(UploadRecord {
        repository,
        offset,
        treatment,
    })
}

fn upload_id(u: &mut Unstructured) -> String {
    let n = u.int_in_range(0..=40usize).unwrap_or(0);
    let bytes = u.bytes(n.min(u.len())).unwrap_or(&[]);
    String::from_utf8_lossy(bytes).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Some(record) = UploadRecord::from_bytes(rest) {
                let again = record.to_bytes();
                check!(
                    again.as_slice() == rest,
                    "a parsed record re-serializes to other bytes ({} vs {})",
                    again.len(),
                    rest.len()
                );
                let back = UploadRecord::from_bytes(&again);
                check!(
                    back.is_some_and(|b| b.to_bytes() == again),
                    "a re-serialized record does not parse to the same record"
                );
            }
        }
        1 => {
            let mut u = Unstructured::new(rest);
            let id = upload_id(&mut u);
            let token = String::from_utf8_lossy(u.take_rest()).into_owned();
            if let Some((record, _)) = unseal(&STATE_KEY, &id, &token) {
                // Only reachable with a token sealed under the key: it must round-trip.
                let bytes = record.to_bytes();
                check!(
                    UploadRecord::from_bytes(&bytes).is_some_and(|r| r.to_bytes() == bytes),
                    "an opened state does not round-trip"
                );
            }
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok(record) = built(&mut u) else {
                return;
            };
            let id = upload_id(&mut u);
            let bytes = record.to_bytes();
            let parsed = UploadRecord::from_bytes(&bytes);
            let Some(parsed) = parsed else {
                panic!("property broken: a record's own bytes do not parse");
            };
            check!(
                parsed.to_bytes() == bytes,
                "a record parsed back serializes differently"
            );
            let seed: u64 = u.arbitrary().unwrap_or(0);
            let replica = Replica(u.arbitrary().unwrap_or(0));
            let token = seal(&STATE_KEY, &id, &record, replica, &mut TestRng::new(seed));
            let opened = unseal(&STATE_KEY, &id, &token);
            check!(
                opened.is_some_and(|(r, by)| r.to_bytes() == bytes && by == replica),
                "a sealed record does not open to itself, sealed by its replica"
            );
            let other_id = format!("{id}x");
            check!(
                unseal(&STATE_KEY, &other_id, &token).is_none(),
                "a state sealed for {id:?} opened for {other_id:?}"
            );
            check!(
                unseal(&[0xa5; 32], &id, &token).is_none(),
                "a state opened under another key"
            );
            // One character of the token changed: refused.
            if !token.is_empty() {
                let at = usize::from(u.arbitrary::<u16>().unwrap_or(0)) % token.len();
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let mut changed = token.clone().into_bytes();
                let old = changed[at];
                let pick = usize::from(u.arbitrary::<u8>().unwrap_or(1)) % alphabet.len();
                let mut new = alphabet[pick];
                if new == old {
                    new = alphabet[(pick + 1) % alphabet.len()];
                }
                changed[at] = new;
                let changed = String::from_utf8_lossy(&changed).into_owned();
                check!(
                    unseal(&STATE_KEY, &id, &changed).is_none(),
                    "a token with byte {at} changed still opened"
                );
            }
            // Truncated: refused.
            let cut = &token[..token.len() / 2];
            check!(
                unseal(&STATE_KEY, &id, cut).is_none(),
                "half a token opened"
            );
        }
    }
});
