//! Resumable SHA-256 and HMAC-SHA256: NIST/RFC known answers, and equality with the `sha2` and
//! `hmac` crates under random chunking with save/restore at random points.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod crypto;
}

use common::crypto::{hmac_ref, seeded_rng, unhex};
use ocicrypt_core::format::sha256::{hmac_finish, hmac_init, Sha256State};
use rand::{Rng, RngCore};
use sha2::Digest as _;

fn one_shot(data: &[u8]) -> [u8; 32] {
    let mut s = Sha256State::new();
    s.update(data);
    s.finalize()
}

fn save_restore(s: &Sha256State) -> Sha256State {
    let mut buf = Vec::new();
    s.write_to(&mut buf);
    assert_eq!(buf.len(), Sha256State::SERIALIZED_LEN);
    let (restored, rest) = Sha256State::read_from(&buf).expect("own output reads back");
    assert!(rest.is_empty());
    restored
}

/// FIPS 180-2 appendix B / NIST CAVS examples.
#[test]
fn nist_vectors() {
    assert_eq!(
        one_shot(b"abc"),
        unhex::<32>("ba7816bf 8f01cfea 414140de 5dae2223 b00361a3 96177a9c b410ff61 f20015ad")
    );
    assert_eq!(
        one_shot(b""),
        unhex::<32>("e3b0c442 98fc1c14 9afbf4c8 996fb924 27ae41e4 649b934c a495991b 7852b855")
    );
    assert_eq!(
        one_shot(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        unhex::<32>("248d6a61 d20638b8 e5c02693 0c3e6039 a33ce459 64ff2167 f6ecedd4 19db06c1")
    );
    let million_a =
        unhex::<32>("cdc76e5c 9914fb92 81a1c7e2 84d73e67 f1809a48 a497200e 046d39cc c7112cd0");
    assert_eq!(one_shot(&vec![b'a'; 1_000_000]), million_a);

    // The same million, fed in odd pieces through save/restore.
    let mut s = Sha256State::new();
    let mut fed = 0usize;
    let mut step = 1usize;
    while fed < 1_000_000 {
        let n = step.min(1_000_000 - fed);
        s.update(&vec![b'a'; n]);
        s = save_restore(&s);
        fed += n;
        step = step * 7 % 9973 + 1;
    }
    assert_eq!(s.len(), 1_000_000);
    assert_eq!(s.finalize(), million_a);
}

/// RFC 4231 test case 2: HMAC zero-pads a short key to the block size, so "Jefe" padded to
/// 32 bytes is the same key.
#[test]
fn rfc4231_hmac_case_2() {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(b"Jefe");
    let mut inner = hmac_init(&key);
    inner.update(b"what do ya want for nothing?");
    assert_eq!(
        hmac_finish(&key, inner),
        unhex::<32>("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    );
}

#[test]
fn random_chunks_and_restores_match_sha2() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..200 {
        let len = if round % 4 == 0 {
            rng.gen_range(0..200)
        } else {
            rng.gen_range(0..20_000)
        };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let mut s = Sha256State::new();
        let mut pos = 0;
        while pos < len {
            let n = rng.gen_range(0..=(len - pos).min(300));
            s.update(&data[pos..pos + n]);
            pos += n;
            if rng.gen_bool(0.3) {
                s = save_restore(&s);
            }
        }
        let want: [u8; 32] = sha2::Sha256::digest(&data).into();
        assert_eq!(s.finalize(), want, "seed {seed} round {round} len {len}");
    }
}

#[test]
fn random_hmac_matches_hmac_crate() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..100 {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let len = rng.gen_range(0..10_000);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let mut inner = hmac_init(&key);
        let mut pos = 0;
        while pos < len {
            let n = rng.gen_range(1..=(len - pos).min(1000));
            inner.update(&data[pos..pos + n]);
            pos += n;
            if rng.gen_bool(0.5) {
                inner = save_restore(&inner);
            }
        }
        let want = hmac_ref(&key, &data);
        assert_eq!(hmac_finish(&key, inner), want, "seed {seed} round {round}");
    }
}

#[test]
fn read_from_returns_the_rest_and_refuses_bad_input() {
    let mut a = Sha256State::new();
    a.update(b"first state");
    let mut b = Sha256State::new();
    b.update(&[7u8; 100]);
    let mut buf = Vec::new();
    a.write_to(&mut buf);
    b.write_to(&mut buf);
    buf.extend_from_slice(b"trailer");

    let (a2, rest) = Sha256State::read_from(&buf).unwrap();
    let (b2, rest) = Sha256State::read_from(rest).unwrap();
    assert_eq!(rest, b"trailer");
    assert_eq!(a2.finalize(), one_shot(b"first state"));
    assert_eq!(b2.finalize(), one_shot(&[7u8; 100]));

    assert!(Sha256State::read_from(&buf[..Sha256State::SERIALIZED_LEN - 1]).is_none());
    assert!(Sha256State::read_from(&[]).is_none());
    // 11 bytes buffered: the padding after them must be zero.
    let mut bad = buf[..Sha256State::SERIALIZED_LEN].to_vec();
    bad[32 + 8 + 11] = 0xff;
    assert!(Sha256State::read_from(&bad).is_none());
}

#[test]
fn equal_states_serialize_equally_and_debug_hides_data() {
    let mut a = Sha256State::new();
    a.update(&[1u8; 70]);
    a.update(b"secret!");
    let mut b = Sha256State::default();
    b.update(&[1u8; 70]);
    b.update(b"secret!");
    let (mut x, mut y) = (Vec::new(), Vec::new());
    a.write_to(&mut x);
    b.write_to(&mut y);
    assert_eq!(x, y);
    assert!(
        !format!("{a:?}").contains("115, 101, 99"),
        "Debug must not show buffered bytes"
    );
    assert!(Sha256State::new().is_empty());
}
