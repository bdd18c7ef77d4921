//! The streaming layer decryptor (for `tools/rotate`): the reverse of the encryptor under any
//! chunk split, digests of both forms, and an altered byte or a wrong key refused at the end.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use ocicrypt_core::digest::Digest;
use ocicrypt_core::format::blockcipher::{
    decrypt_layer, CipherError, LayerDecryptor, LayerEncryptor,
};
use rand::{Rng, SeedableRng};

fn encrypted(plain: &[u8]) -> (Vec<u8>, ocicrypt_core::format::blockcipher::EncryptedLayer) {
    let mut data = plain.to_vec();
    let mut enc = LayerEncryptor::new([7u8; 32], [0xfe; 16]);
    enc.encrypt_in_place(&mut data);
    (data, enc.finish())
}

fn decrypt_split(
    cipher: &[u8],
    key: &[u8; 32],
    nonce: [u8; 16],
    hmac: &[u8; 32],
    cuts: &[usize],
) -> Result<(Vec<u8>, ocicrypt_core::format::blockcipher::DecryptedLayer), CipherError> {
    let mut dec = LayerDecryptor::new(key, nonce);
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&cipher.len())) {
        let mut chunk = cipher[at..cut].to_vec();
        dec.decrypt_in_place(&mut chunk)?;
        out.extend_from_slice(&chunk);
        at = cut;
    }
    Ok((out, dec.finish(hmac)?))
}

#[test]
fn reverses_the_encryptor_under_random_splits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    for len in [0usize, 1, 15, 16, 17, 4095, 70_000] {
        let plain: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let (cipher, layer) = encrypted(&plain);
        for _ in 0..8 {
            let mut cuts: Vec<usize> = (0..rng.gen_range(0..6))
                .map(|_| rng.gen_range(0..=len))
                .collect();
            cuts.sort_unstable();
            let (out, done) =
                decrypt_split(&cipher, &layer.symkey, layer.nonce, &layer.hmac, &cuts).unwrap();
            assert_eq!(out, plain);
            assert_eq!(done.plaintext_digest, Digest::of(&plain));
            assert_eq!(done.encrypted_digest, Digest::of(&cipher));
            assert_eq!(done.encrypted_digest, layer.encrypted_digest);
            assert_eq!(done.size, len as u64);
        }
        // The whole-blob decryptor agrees.
        assert_eq!(
            decrypt_layer(&layer.symkey, &layer.nonce, &layer.hmac, &cipher).unwrap(),
            plain
        );
    }
}

#[test]
fn an_altered_byte_or_a_wrong_key_fails_the_hmac() {
    let plain = vec![0x42u8; 5000];
    let (mut cipher, layer) = encrypted(&plain);
    let wrong = [8u8; 32];
    assert!(matches!(
        decrypt_split(&cipher, &wrong, layer.nonce, &layer.hmac, &[100]),
        Err(CipherError::HmacMismatch { len: 5000 })
    ));
    cipher[4321] ^= 1;
    assert!(matches!(
        decrypt_split(&cipher, &layer.symkey, layer.nonce, &layer.hmac, &[]),
        Err(CipherError::HmacMismatch { .. })
    ));
}
