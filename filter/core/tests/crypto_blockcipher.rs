//! AES_256_CTR_HMAC_SHA256 layer cipher: NIST known answer, Go-compatible counter wrap,
//! chunked encryption with save/resume between chunks, HMAC and digests against reference
//! crates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod crypto;
}

use aes::cipher::{BlockEncrypt, KeyInit};
use common::crypto::{hmac_ref, seeded_rng, sp800_38a_f55};
use ocicrypt_core::digest::Digest;
use ocicrypt_core::format::blockcipher::{
    decrypt_layer, CipherError, EncryptedLayer, LayerEncryptor,
};
use ocicrypt_core::format::ciphertext_hashes::{CiphertextHashes, CiphertextLane, InlineLane};
use rand::{Rng, RngCore};

fn one_shot(key: [u8; 32], nonce: [u8; 16], plain: &[u8]) -> (Vec<u8>, EncryptedLayer) {
    let mut enc = LayerEncryptor::new(key, nonce);
    let mut buf = plain.to_vec();
    enc.encrypt_in_place(&mut buf);
    (buf, enc.finish())
}

fn assert_layer_eq(a: &EncryptedLayer, b: &EncryptedLayer) {
    assert_eq!(a.plaintext_digest, b.plaintext_digest);
    assert_eq!(a.encrypted_digest, b.encrypted_digest);
    assert_eq!(a.size, b.size);
    assert_eq!(a.hmac, b.hmac);
    assert_eq!(*a.symkey, *b.symkey);
    assert_eq!(a.nonce, b.nonce);
}

/// NIST SP 800-38A F.5.5 CTR-AES256.Encrypt: the "init counter" is the whole initial counter
/// block, exactly ocicrypt's nonce.
#[test]
fn nist_sp800_38a_f55_ctr_aes256() {
    let (key, counter, plain, cipher) = sp800_38a_f55();
    let (out, layer) = one_shot(key, counter, &plain);
    assert_eq!(out, cipher);
    assert_eq!(layer.size, 64);
    assert_eq!(layer.plaintext_digest, Digest::of(&plain));
    assert_eq!(layer.encrypted_digest, Digest::of(&cipher));
    assert_eq!(layer.hmac, hmac_ref(&key, &cipher));

    // Every split point, resumed from saved state, gives the same bytes.
    for cut in 0..=64 {
        let mut a = LayerEncryptor::new(key, counter);
        let mut buf = plain;
        a.encrypt_in_place(&mut buf[..cut]);
        let mut b = LayerEncryptor::from_bytes(&a.to_bytes()).unwrap();
        b.encrypt_in_place(&mut buf[cut..]);
        assert_eq!(buf, cipher, "cut at {cut}");
        assert_layer_eq(&b.finish(), &layer);
    }

    let back = decrypt_layer(&key, &counter, &layer.hmac, &cipher).unwrap();
    assert_eq!(back, plain);
}

/// Go's `cipher.NewCTR` increments the whole 16-byte block with carry and wraps at 2^128.
#[test]
fn counter_wraps_like_go() {
    let key = [0x42u8; 32];
    let nonce = [0xffu8; 16];
    let aes = aes::Aes256::new(&key.into());
    let mut expected = Vec::new();
    for counter in [[0xffu8; 16], [0u8; 16], {
        let mut c = [0u8; 16];
        c[15] = 1;
        c
    }] {
        let mut block = counter.into();
        aes.encrypt_block(&mut block);
        expected.extend_from_slice(&block);
    }
    let (keystream, _) = one_shot(key, nonce, &[0u8; 48]);
    assert_eq!(keystream, expected);
}

#[test]
fn random_chunks_with_resume_equal_one_shot() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..60 {
        let len = match round % 3 {
            0 => rng.gen_range(0..64),
            1 => rng.gen_range(0..5_000),
            _ => rng.gen_range(0..150_000),
        };
        let mut plain = vec![0u8; len];
        rng.fill_bytes(&mut plain);
        let enc = LayerEncryptor::generate(&mut rng);
        let saved = enc.to_bytes();
        let (key, nonce) = {
            let l = LayerEncryptor::from_bytes(&saved).unwrap().finish();
            (*l.symkey, l.nonce)
        };
        let (want_cipher, want) = one_shot(key, nonce, &plain);

        let mut state = saved;
        let mut out = plain.clone();
        let mut pos = 0;
        while pos < len {
            let n = rng.gen_range(0..=(len - pos).min(40_000));
            let mut e = LayerEncryptor::from_bytes(&state).unwrap();
            assert_eq!(e.offset(), pos as u64);
            e.encrypt_in_place(&mut out[pos..pos + n]);
            pos += n;
            state = e.to_bytes();
        }
        assert_eq!(out, want_cipher, "seed {seed} round {round}");
        let got = LayerEncryptor::from_bytes(&state).unwrap().finish();
        assert_layer_eq(&got, &want);
        assert_eq!(got.size, len as u64);
        assert_eq!(got.plaintext_digest, Digest::of(&plain));
        assert_eq!(got.encrypted_digest, Digest::of(&out));
        assert_eq!(
            got.hmac,
            hmac_ref(&key, &out),
            "HMAC is over the ciphertext"
        );
        assert_eq!(decrypt_layer(&key, &nonce, &got.hmac, &out).unwrap(), plain);
    }
}

#[test]
fn empty_layer() {
    let key = [9u8; 32];
    let (out, layer) = one_shot(key, [3u8; 16], &[]);
    assert!(out.is_empty());
    assert_eq!(layer.size, 0);
    assert_eq!(layer.plaintext_digest, Digest::of(b""));
    assert_eq!(layer.encrypted_digest, Digest::of(b""));
    assert_eq!(layer.hmac, hmac_ref(&key, b""));
}

#[test]
fn generate_draws_fresh_keys() {
    let a = LayerEncryptor::generate(&mut rand_core::OsRng).finish();
    let b = LayerEncryptor::generate(&mut rand_core::OsRng).finish();
    assert_ne!(*a.symkey, *b.symkey);
    assert_ne!(a.nonce, b.nonce);
}

#[test]
fn saved_state_is_checked() {
    let mut e = LayerEncryptor::new([1u8; 32], [2u8; 16]);
    e.encrypt_in_place(&mut [0u8; 100]);
    let good = e.to_bytes();
    assert!(LayerEncryptor::from_bytes(&good).is_ok());

    let err = LayerEncryptor::from_bytes(&good[..good.len() - 1]).unwrap_err();
    assert!(matches!(err, CipherError::StateLength { actual, .. } if actual == good.len() - 1));
    let mut longer = good.to_vec();
    longer.push(0);
    assert!(matches!(
        LayerEncryptor::from_bytes(&longer),
        Err(CipherError::StateLength { .. })
    ));

    let mut wrong_version = good.to_vec();
    wrong_version[0] = 99;
    assert_eq!(
        LayerEncryptor::from_bytes(&wrong_version).unwrap_err(),
        CipherError::StateVersion {
            found: 99,
            supported: 1
        }
    );

    // Offset field (after version, key and nonce) no longer agrees with the hash states.
    let mut moved = good.to_vec();
    moved[1 + 32 + 16 + 7] ^= 1;
    assert!(matches!(
        LayerEncryptor::from_bytes(&moved),
        Err(CipherError::StateInconsistent {
            offset: 101,
            plain: 100,
            cipher: 100,
            mac: 164
        })
    ));

    // Non-zero padding inside the first hash state.
    let mut bad_hash = good.to_vec();
    bad_hash[1 + 32 + 16 + 8 + 32 + 8 + 63] = 1;
    assert_eq!(
        LayerEncryptor::from_bytes(&bad_hash).unwrap_err(),
        CipherError::StateHash
    );
}

#[test]
fn decrypt_refuses_wrong_hmac_or_altered_ciphertext() {
    let key = [5u8; 32];
    let nonce = [6u8; 16];
    let (mut cipher, layer) = one_shot(key, nonce, b"some layer bytes");
    let mut wrong = layer.hmac;
    wrong[0] ^= 1;
    assert_eq!(
        decrypt_layer(&key, &nonce, &wrong, &cipher).unwrap_err(),
        CipherError::HmacMismatch { len: 16 }
    );
    cipher[3] ^= 0x80;
    assert!(decrypt_layer(&key, &nonce, &layer.hmac, &cipher).is_err());
    assert!(decrypt_layer(&[0u8; 32], &nonce, &layer.hmac, &cipher).is_err());
}

#[test]
fn debug_never_shows_the_key() {
    let key = [0xabu8; 32];
    let mut e = LayerEncryptor::new(key, [0u8; 16]);
    e.encrypt_in_place(&mut [0u8; 10]);
    let enc_dbg = format!("{e:?}");
    let layer_dbg = format!("{:?}", e.finish());
    for s in [enc_dbg, layer_dbg] {
        assert!(!s.contains("171, 171"), "{s}");
        assert!(!s.to_lowercase().contains("abababababababab"), "{s}");
    }
}

/// The data-parallel path (`encrypt_in_place_lanes`, what wasm runs) and the scalar path give
/// the same ciphertext and byte-identical saved states after every piece, whatever the split,
/// the mix of paths, or the counter wrapping mid-stream; and both match the reference crates.
#[test]
fn lanes_and_scalar_paths_agree_on_random_splits() {
    use aes::cipher::{KeyIvInit, StreamCipher};
    use sha2::Digest as _;
    let (seed, mut rng) = seeded_rng();
    for round in 0..40 {
        let key: [u8; 32] = rng.gen();
        let mut nonce: [u8; 16] = rng.gen();
        if round % 4 == 1 {
            nonce[..15].fill(0xff);
        }
        let len = match round % 3 {
            0 => rng.gen_range(0..300),
            1 => rng.gen_range(0..20_000),
            _ => rng.gen_range(0..200_000),
        };
        let mut plain = vec![0u8; len];
        rng.fill_bytes(&mut plain);

        let mut want = plain.clone();
        ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &nonce.into()).apply_keystream(&mut want);

        let mut lanes = LayerEncryptor::new(key, nonce);
        let mut scalar = LayerEncryptor::new(key, nonce);
        let mut a = plain.clone();
        let mut b = plain.clone();
        let mut pos = 0;
        while pos < len {
            let n = match rng.gen_range(0..4) {
                0 => rng.gen_range(0..=64),
                1 => 64 * rng.gen_range(0..=40),
                _ => rng.gen_range(0..=30_000),
            }
            .min(len - pos);
            if rng.gen_bool(0.8) {
                lanes.encrypt_in_place_lanes(&mut a[pos..pos + n]);
            } else {
                lanes.encrypt_in_place_scalar(&mut a[pos..pos + n]);
            }
            scalar.encrypt_in_place_scalar(&mut b[pos..pos + n]);
            pos += n;
            let saved = lanes.to_bytes();
            assert_eq!(
                *saved,
                *scalar.to_bytes(),
                "seed {seed} round {round} at {pos}"
            );
            if rng.gen_bool(0.3) {
                lanes = LayerEncryptor::from_bytes(&saved).unwrap();
            }
        }
        assert_eq!(a, want, "seed {seed} round {round} len {len}");
        assert_eq!(b, want);
        let got = lanes.finish();
        assert_layer_eq(&got, &scalar.finish());
        assert_eq!(
            got.plaintext_digest.0,
            <[u8; 32]>::from(sha2::Sha256::digest(&plain))
        );
        assert_eq!(
            got.encrypted_digest.0,
            <[u8; 32]>::from(sha2::Sha256::digest(&want))
        );
        assert_eq!(got.hmac, hmac_ref(&key, &want));
    }
}

/// Keystream computed elsewhere (`blockcipher::keystream`, what a helper worker sends) gives
/// the same ciphertext and saved states as computing it in place, whatever the split; a
/// keystream of another offset, nonce or key, or of the wrong length, is refused with nothing
/// changed.
#[test]
fn given_keystream_agrees_with_local_on_random_splits() {
    use ocicrypt_core::format::blockcipher::keystream;
    let (seed, mut rng) = seeded_rng();
    for round in 0..30 {
        let key: [u8; 32] = rng.gen();
        let mut nonce: [u8; 16] = rng.gen();
        if round % 5 == 2 {
            nonce[..15].fill(0xff);
        }
        let len = rng.gen_range(0..150_000);
        let mut plain = vec![0u8; len];
        rng.fill_bytes(&mut plain);
        let (want, want_layer) = one_shot(key, nonce, &plain);

        let mut enc = LayerEncryptor::new(key, nonce);
        let mut data = plain.clone();
        let mut pos = 0;
        while pos < len {
            let n = match rng.gen_range(0..3) {
                0 => rng.gen_range(1..=64),
                1 => 64 * rng.gen_range(1..=40),
                _ => rng.gen_range(1..=30_000),
            }
            .min(len - pos);
            let at = pos as u64;
            let piece = &mut data[pos..pos + n];
            match rng.gen_range(0..5) {
                0 => enc.encrypt_in_place(piece),
                1 => {
                    let before = (piece.to_vec(), enc.to_bytes());
                    let wrong = match rng.gen_range(0..5) {
                        0 => keystream(&key, &nonce, at + 16, n),
                        1 => keystream(&key, &[nonce[0] ^ 1; 16], at, n),
                        2 => keystream(&[key[0] ^ 1; 32], &nonce, at, n),
                        3 => keystream(&key, &nonce, at, n + 1),
                        // Right at the start, wrong at the end (a segment cut or shifted).
                        _ => {
                            let mut k = keystream(&key, &nonce, at, n);
                            if let Some(b) = k.last_mut() {
                                *b ^= 0x80;
                            }
                            k
                        }
                    };
                    assert!(enc.encrypt_in_place_given(piece, &wrong).is_err());
                    assert_eq!((piece.to_vec(), enc.to_bytes()), before, "seed {seed}");
                    enc.encrypt_in_place(piece);
                }
                2 => {
                    let ks = keystream(&key, &nonce, at, n);
                    assert_eq!(ks.len(), n);
                    enc.encrypt_in_place_given(piece, &ks).unwrap();
                }
                // The lanes path wasm takes, run natively on the portable vectors.
                _ => enc.encrypt_given_lanes(piece, &keystream(&key, &nonce, at, n)),
            }
            pos += n;
            if rng.gen_bool(0.2) {
                enc = LayerEncryptor::from_bytes(&enc.to_bytes()).unwrap();
            }
        }
        assert_eq!(data, want, "seed {seed} round {round} len {len}");
        assert_layer_eq(&enc.finish(), &want_layer);
    }
}

/// A lane that drops the first `skip` bytes it is given and doubles none: a helper that lost
/// part of a chunk.
struct LossyLane(InlineLane, usize);

impl CiphertextLane for LossyLane {
    fn absorb(&mut self, ciphertext: &[u8]) {
        let skip = self.1.min(ciphertext.len());
        self.1 -= skip;
        self.0.absorb(&ciphertext[skip..]);
    }
    fn join(self: Box<Self>) -> Option<CiphertextHashes> {
        Box::new(self.0).join()
    }
}

/// Hashing the ciphertext beside the stream (the native build's helper threads) gives the
/// layer hashing in line gives, however the chunks are cut, lanes started and ended, states
/// saved and restored, and with given keystream too.
#[test]
fn ciphertext_hashed_beside_equals_hashed_in_line() {
    use ocicrypt_core::format::blockcipher::keystream;
    let (seed, mut rng) = seeded_rng();
    for round in 0..40 {
        let key: [u8; 32] = rng.gen();
        let nonce: [u8; 16] = rng.gen();
        let len = rng.gen_range(0..120_000);
        let mut plain = vec![0u8; len];
        rng.fill_bytes(&mut plain);
        let (want, want_layer) = one_shot(key, nonce, &plain);

        let mut enc = LayerEncryptor::new(key, nonce);
        let mut lane: Option<Box<dyn CiphertextLane>> = None;
        let mut data = plain.clone();
        let mut pos = 0;
        while pos < len {
            let n = rng.gen_range(1..=20_000).min(len - pos);
            let at = pos as u64;
            if lane.is_none() && rng.gen_bool(0.5) {
                lane = Some(Box::new(InlineLane(enc.lend_ciphertext_hashes())));
            }
            let piece = &mut data[pos..pos + n];
            match (&mut lane, rng.gen_bool(0.3)) {
                (Some(l), false) => enc.encrypt_in_place_beside(piece, l.as_mut()),
                (Some(l), true) => enc
                    .encrypt_in_place_given_beside(
                        piece,
                        &keystream(&key, &nonce, at, n),
                        l.as_mut(),
                    )
                    .unwrap(),
                (None, _) => enc.encrypt_in_place(piece),
            }
            pos += n;
            // A request ends: the states come back, and the state is saved.
            if lane.is_some() && rng.gen_bool(0.3) {
                let hashes = lane.take().unwrap().join().unwrap();
                enc.take_back_ciphertext_hashes(hashes).unwrap();
                enc = LayerEncryptor::from_bytes(&enc.to_bytes()).unwrap();
            }
        }
        if let Some(l) = lane.take() {
            enc.take_back_ciphertext_hashes(l.join().unwrap()).unwrap();
        }
        assert!(data == want, "seed {seed} round {round}");
        assert_layer_eq(&enc.finish(), &want_layer);
    }
}

/// States that did not absorb exactly the bytes encrypted are never taken back: a helper that
/// lost bytes, states given back after the encryptor hashed in line meanwhile, or states of
/// another point of the stream. And a state saved while the states are lent does not restore.
#[test]
fn ciphertext_hashes_that_disagree_with_the_stream_are_refused() {
    let mut chunk = vec![7u8; 5000];

    // Lost bytes.
    let mut enc = LayerEncryptor::new([1; 32], [2; 16]);
    let mut lane: Box<dyn CiphertextLane> =
        Box::new(LossyLane(InlineLane(enc.lend_ciphertext_hashes()), 1));
    enc.encrypt_in_place_beside(&mut chunk, lane.as_mut());
    let err = enc.take_back_ciphertext_hashes(lane.join().unwrap());
    assert!(
        matches!(err, Err(CipherError::StateInconsistent { .. })),
        "{err:?}"
    );

    // Hashed in line while lent (a path that forgot the lane): both halves miss bytes.
    let mut enc = LayerEncryptor::new([1; 32], [2; 16]);
    let lent = enc.lend_ciphertext_hashes();
    enc.encrypt_in_place(&mut chunk);
    let err = enc.take_back_ciphertext_hashes(lent);
    assert!(
        matches!(err, Err(CipherError::StateInconsistent { .. })),
        "{err:?}"
    );

    // States of an earlier point of the stream.
    let mut enc = LayerEncryptor::new([1; 32], [2; 16]);
    let lent = enc.lend_ciphertext_hashes();
    let mut lane: Box<dyn CiphertextLane> = Box::new(InlineLane(enc.lend_ciphertext_hashes()));
    enc.encrypt_in_place_beside(&mut chunk, lane.as_mut());
    let err = enc.take_back_ciphertext_hashes(lent);
    assert!(
        matches!(err, Err(CipherError::StateInconsistent { .. })),
        "{err:?}"
    );

    // Saved while lent: the saved state does not restore.
    let mut enc = LayerEncryptor::new([1; 32], [2; 16]);
    let mut lane: Box<dyn CiphertextLane> = Box::new(InlineLane(enc.lend_ciphertext_hashes()));
    enc.encrypt_in_place_beside(&mut chunk, lane.as_mut());
    let err = LayerEncryptor::from_bytes(&enc.to_bytes());
    assert!(
        matches!(err, Err(CipherError::StateInconsistent { .. })),
        "{err:?}"
    );
    // Given back whole, it does.
    enc.take_back_ciphertext_hashes(lane.join().unwrap())
        .unwrap();
    assert!(LayerEncryptor::from_bytes(&enc.to_bytes()).is_ok());
}
