//! The data-parallel primitives of `ocicrypt_core::format::simd` against known answers (FIPS 197,
//! NIST SP 800-38A, FIPS 180-4) and against the RustCrypto crates on random inputs. Natively
//! this checks the portable twin; `scripts/bench-micro --test` runs it as wasm with simd128,
//! where the vector code is checked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common {
    pub mod crypto;
}

use aes::cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher, StreamCipherSeek};
use common::crypto::{seeded_rng, sp800_38a_f55, unhex};
use ocicrypt_core::format::simd::aes256x8::Aes256x8;
use ocicrypt_core::format::simd::sha256x4::{Schedule, Sha256x4};
use ocicrypt_core::format::simd::U32x4;
use rand::{Rng, RngCore};
use sha2::digest::generic_array::GenericArray;

#[test]
fn vector_ops_match_scalar() {
    let (seed, mut rng) = seeded_rng();
    for _ in 0..200 {
        let a: [u32; 4] = rng.gen();
        let b: [u32; 4] = rng.gen();
        let m: [u32; 4] = rng.gen();
        let (va, vb, vm) = (
            U32x4::new(a[0], a[1], a[2], a[3]),
            U32x4::new(b[0], b[1], b[2], b[3]),
            U32x4::new(m[0], m[1], m[2], m[3]),
        );
        let each = |f: &dyn Fn(u32, u32, u32) -> u32| [0, 1, 2, 3].map(|i| f(a[i], b[i], m[i]));
        assert_eq!(
            (va + vb).lanes(),
            each(&|x, y, _| x.wrapping_add(y)),
            "seed {seed}"
        );
        assert_eq!((va ^ vb).lanes(), each(&|x, y, _| x ^ y));
        assert_eq!((va & vb).lanes(), each(&|x, y, _| x & y));
        assert_eq!((va | vb).lanes(), each(&|x, y, _| x | y));
        assert_eq!((!va).lanes(), each(&|x, _, _| !x));
        assert_eq!(
            U32x4::bitselect(va, vb, vm).lanes(),
            each(&|x, y, m| (x & m) | (y & !m))
        );
        assert_eq!(va.shl::<7>().lanes(), each(&|x, _, _| x << 7));
        assert_eq!(va.shr::<13>().lanes(), each(&|x, _, _| x >> 13));
        assert_eq!(
            va.rotr::<6, 26>().lanes(),
            each(&|x, _, _| x.rotate_right(6))
        );
        let bytes: [u8; 16] = rng.gen();
        let v = U32x4::from_bytes(&bytes);
        assert_eq!(v.to_bytes(), bytes);
        assert_eq!(
            v.lanes()[1],
            u32::from_le_bytes(bytes[4..8].try_into().unwrap())
        );
        let (lo, hi): (u64, u64) = rng.gen();
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&lo.to_le_bytes());
        want[8..].copy_from_slice(&hi.to_le_bytes());
        assert_eq!(U32x4::from_u64s(lo, hi).to_bytes(), want);
        assert!(v.bits_eq(U32x4::from_bytes(&bytes)));
    }
}

// ---------------------------------------------------------------------------------------------
// AES-256

/// FIPS 197 appendix C.3.
#[test]
fn fips197_c3_aes256() {
    let key = unhex::<32>("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
    let plain = unhex::<16>("00112233445566778899aabbccddeeff");
    let want = unhex::<16>("8ea2b7ca516745bfeafc49904b496089");
    let aes = Aes256x8::new(&key);
    let mut blocks = [plain; 8];
    aes.encrypt_blocks(&mut blocks);
    assert_eq!(blocks, [want; 8]);
}

#[test]
fn random_blocks_match_aes_crate() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..50 {
        let key: [u8; 32] = rng.gen();
        let mut blocks = [[0u8; 16]; 8];
        for b in blocks.iter_mut() {
            rng.fill_bytes(b);
        }
        let reference = aes::Aes256::new(&key.into());
        let mut want = blocks;
        for b in want.iter_mut() {
            let mut ga = GenericArray::clone_from_slice(b);
            reference.encrypt_block(&mut ga);
            b.copy_from_slice(&ga);
        }
        Aes256x8::new(&key).encrypt_blocks(&mut blocks);
        assert_eq!(blocks, want, "seed {seed} round {round}");
    }
}

/// NIST SP 800-38A F.5.5 CTR-AES256.Encrypt, from every starting offset.
#[test]
fn sp800_38a_f55_ctr_every_offset() {
    let (key, counter, plain, cipher) = sp800_38a_f55();
    let aes = Aes256x8::new(&key);
    for cut in 0..=64 {
        let mut buf = plain;
        let (a, b) = buf.split_at_mut(cut);
        aes.apply_keystream(&counter, 0, a);
        aes.apply_keystream(&counter, cut as u64, b);
        assert_eq!(buf, cipher, "cut {cut}");
    }
}

/// A random CTR case of round `round`: key, nonce (every third round within `wrap_span`
/// blocks of 2^128, so the counter wraps mid-stream), start offset, and the ctr crate's
/// keystream for up to `max_len` bytes from there.
fn ctr_case(
    rng: &mut impl Rng,
    round: usize,
    wrap_span: u8,
    max_len: usize,
) -> ([u8; 32], [u8; 16], u64, Vec<u8>) {
    let key: [u8; 32] = rng.gen();
    let mut nonce: [u8; 16] = rng.gen();
    if round.is_multiple_of(3) {
        nonce[..15].fill(0xff);
        nonce[15] = 0xff - rng.gen_range(0..wrap_span);
    }
    let start = rng.gen_range(0..5000u64);
    let mut keystream = vec![0u8; rng.gen_range(0..max_len)];
    let mut reference = ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &nonce.into());
    reference.seek(start);
    reference.apply_keystream(&mut keystream);
    (key, nonce, start, keystream)
}

#[test]
fn random_ctr_splits_and_wrap_match_ctr_crate() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..60 {
        let (key, nonce, start, keystream) = ctr_case(&mut rng, round, 20, 3000);
        let len = keystream.len();
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let want: Vec<u8> = data.iter().zip(&keystream).map(|(d, k)| d ^ k).collect();

        let aes = Aes256x8::new(&key);
        let mut pos = 0;
        while pos < len {
            let n = rng.gen_range(1..=(len - pos).min(300));
            aes.apply_keystream(&nonce, start + pos as u64, &mut data[pos..pos + n]);
            pos += n;
        }
        assert_eq!(
            data, want,
            "seed {seed} round {round} start {start} len {len}"
        );
    }
}

/// `write_keystream` (a helper's bulk path: whole batches written straight from the vectors)
/// writes the ctr crate's keystream at any offset and length, over whatever `out` held, with
/// the counter wrapping mid-stream.
#[test]
fn written_keystream_matches_ctr_crate() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..60 {
        let (key, nonce, start, want) = ctr_case(&mut rng, round, 40, 4000);
        let len = want.len();
        let mut out = vec![0u8; len];
        rng.fill_bytes(&mut out);
        Aes256x8::new(&key).write_keystream(&nonce, start, &mut out);
        assert_eq!(
            out, want,
            "seed {seed} round {round} start {start} len {len}"
        );
    }
}

#[test]
fn keystream_is_eight_consecutive_counters() {
    let key = [0x42u8; 32];
    let aes = Aes256x8::new(&key);
    let reference = aes::Aes256::new(&key.into());
    let start = u128::MAX - 3;
    let ks = aes.keystream(start);
    for (i, k) in ks.iter().enumerate() {
        let mut block = GenericArray::from(start.wrapping_add(i as u128).to_be_bytes());
        reference.encrypt_block(&mut block);
        assert_eq!(k.to_bytes(), <[u8; 16]>::from(block), "block {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// SHA-256

const H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

fn compress_ref(h: &mut [u32; 8], block: &[u8; 64]) {
    sha2::compress256(h, &[GenericArray::clone_from_slice(block)]);
}

/// Pads a message into blocks (FIPS 180-4 §5.1.1).
fn padded(msg: &[u8]) -> Vec<[u8; 64]> {
    let mut m = msg.to_vec();
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&((msg.len() as u64) * 8).to_be_bytes());
    m.chunks_exact(64).map(|c| c.try_into().unwrap()).collect()
}

fn digest(h: &[u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// FIPS 180-2 appendix B: the three examples in three lanes at once (padded to equal length
/// with junk blocks the test ignores after each message ends).
#[test]
fn nist_vectors_in_lanes() {
    let msgs: [&[u8]; 4] = [
        b"abc",
        b"",
        b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
        &[b'a'; 1000],
    ];
    let wants = [
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3",
    ];
    let blocks: Vec<Vec<[u8; 64]>> = msgs.iter().map(|m| padded(m)).collect();
    let n = blocks.iter().map(Vec::len).max().unwrap();
    let mut x = Sha256x4::new([&H0; 4]);
    let mut done = [[0u32; 8]; 4];
    let junk = [0x5au8; 64];
    for i in 0..n {
        let b: [&[u8; 64]; 4] = [0, 1, 2, 3].map(|l| blocks[l].get(i).unwrap_or(&junk));
        x.compress(&Schedule::four(b));
        let states = x.states();
        for l in 0..4 {
            if i + 1 == blocks[l].len() {
                done[l] = states[l];
            }
        }
    }
    for l in 0..4 {
        assert_eq!(hex::encode(digest(&done[l])), wants[l], "lane {l}");
    }
}

#[test]
fn random_states_and_blocks_match_compress256() {
    let (seed, mut rng) = seeded_rng();
    for round in 0..100 {
        let states: [[u32; 8]; 4] = rng.gen();
        let mut blocks = [[0u8; 64]; 4];
        for b in blocks.iter_mut() {
            rng.fill_bytes(b);
        }
        let mut x = Sha256x4::new([&states[0], &states[1], &states[2], &states[3]]);
        let steps = rng.gen_range(1..4);
        let mut want = states;
        for _ in 0..steps {
            x.compress(&Schedule::four([
                &blocks[0], &blocks[1], &blocks[2], &blocks[3],
            ]));
            for (h, b) in want.iter_mut().zip(&blocks) {
                compress_ref(h, b);
            }
        }
        assert_eq!(x.states(), want, "seed {seed} round {round}");

        // Lane 0 one block, lanes 1-3 another.
        let mut x = Sha256x4::new([&states[0], &states[1], &states[2], &states[3]]);
        x.compress(&Schedule::pc(&blocks[0], &blocks[1]));
        let mut want = states;
        compress_ref(&mut want[0], &blocks[0]);
        for h in &mut want[1..] {
            compress_ref(h, &blocks[1]);
        }
        assert_eq!(x.states(), want, "pc: seed {seed} round {round}");

        // Two blocks in a row: lane 0 blocks 0 then 2, lanes 1-3 blocks 1 then 3.
        let mut x = Sha256x4::new([&states[0], &states[1], &states[2], &states[3]]);
        let v = |b: &[u8; 64]| -> [U32x4; 4] {
            std::array::from_fn(|i| U32x4::from_bytes(b[16 * i..16 * i + 16].try_into().unwrap()))
        };
        x.compress_pc_pair(v(&blocks[0]), v(&blocks[1]), v(&blocks[2]), v(&blocks[3]));
        let mut want = states;
        compress_ref(&mut want[0], &blocks[0]);
        compress_ref(&mut want[0], &blocks[2]);
        for h in &mut want[1..] {
            compress_ref(h, &blocks[1]);
            compress_ref(h, &blocks[3]);
        }
        assert_eq!(x.states(), want, "pc pair: seed {seed} round {round}");
    }
}
