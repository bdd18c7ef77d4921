//! Keystream prefetch messages (`keystream::SegmentRequest` and `Segment` decoders) and what
//! a worker does with the segments it is handed.
//!
//! Modes (first byte):
//! - 0: the rest as a request off the shared queue: one that decodes re-encodes to the same
//!   bytes, asks for 1 to `SEGMENT_BYTES` bytes, and (when small) is answered with a segment
//!   that decodes to the same job and offset and holds AES-CTR keystream of that key;
//! - 1: the rest as a segment off the queue: one that decodes holds 1 to `SEGMENT_BYTES`
//!   bytes of keystream, which are the message's bytes after its header;
//! - 2: a stream encrypted chunk by chunk through a `Prefetcher`, with the segments it asks
//!   for delivered or not, right or wrong (another key, another offset, cut, a first or last
//!   byte changed, another job), chosen by the input: the ciphertext is always exactly what
//!   encrypting the stream at once gives. (A helper is another worker of the same process;
//!   the check on arrival covers the first and last block of a segment, so changes in the
//!   middle of a segment are not among the wrong answers tried.)
#![no_main]

use fuzz_support::{check, TestRng};
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::distribution::upload::{BodyVerdict, ChunkStream, Treatment, UploadRecord};
use ocicrypt_core::format::blockcipher::{self, LayerEncryptor};
use ocicrypt_core::format::keystream::{Prefetcher, Segment, SegmentRequest, SEGMENT_BYTES};

/// Wire layout of a request: tag, job, reply_to, symkey, nonce, offset, len.
const REQUEST_LEN: usize = 1 + 8 + 4 + 32 + 16 + 8 + 4;

fn segment_message(job: u64, offset: u64, keystream: &[u8]) -> Vec<u8> {
    let mut m = vec![b'S'];
    m.extend_from_slice(&job.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(keystream);
    m
}

fn requests(bytes: &[u8]) {
    let Some(request) = SegmentRequest::decode(bytes) else {
        return;
    };
    check!(
        bytes.len() == REQUEST_LEN,
        "a request of {} bytes decoded",
        bytes.len()
    );
    check!(
        request.encode().as_slice() == bytes,
        "a decoded request re-encodes to other bytes"
    );
    check!(
        request.len >= 1 && u64::from(request.len) <= SEGMENT_BYTES,
        "a request for {} bytes decoded",
        request.len
    );
    if request.len <= 4096 {
        let answer = request.answer();
        let Some(segment) = Segment::decode(answer.to_vec()) else {
            // An answer the helper could not compute (offset past the counter's end) is empty
            // and refused on arrival.
            check!(
                answer.len() == 17,
                "an answer that does not decode is not empty"
            );
            return;
        };
        check!(
            segment.job == request.job && segment.offset == request.offset,
            "an answer for another job or offset"
        );
        let symkey: [u8; 32] = bytes[13..45].try_into().unwrap_or_default();
        let nonce: [u8; 16] = bytes[45..61].try_into().unwrap_or_default();
        let expected =
            blockcipher::keystream(&symkey, &nonce, request.offset, request.len as usize);
        check!(
            segment.keystream() == expected.as_slice(),
            "the answer is not the keystream asked for"
        );
    }
}

fn segments(bytes: &[u8]) {
    let Some(segment) = Segment::decode(bytes.to_vec()) else {
        return;
    };
    let ks = segment.keystream();
    check!(
        !ks.is_empty() && ks.len() as u64 <= SEGMENT_BYTES,
        "a segment of {} bytes decoded",
        ks.len()
    );
    check!(
        bytes.first() == Some(&b'S') && bytes.get(17..) == Some(ks),
        "a segment's keystream is not the message after its header"
    );
    check!(
        bytes
            .get(1..9)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            == Some(segment.job)
            && bytes
                .get(9..17)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                == Some(segment.offset),
        "a segment's job or offset is not its header's"
    );
}

fn stream(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let symkey: [u8; 32] = u.arbitrary().unwrap_or_default();
    let nonce: [u8; 16] = u.arbitrary().unwrap_or_default();
    // Lengths up to a little over two segments, so that whole grid pieces are asked for.
    // (Mostly short ones: a long stream costs milliseconds.)
    let total = match u.int_in_range(0..=7u8).unwrap_or(0) {
        0..=4 => u.int_in_range(1..=5000usize).unwrap_or(1),
        5 | 6 => u
            .int_in_range(1..=SEGMENT_BYTES as usize + 100)
            .unwrap_or(1),
        _ => u
            .int_in_range(SEGMENT_BYTES as usize..=2 * SEGMENT_BYTES as usize + 4096)
            .unwrap_or(1),
    };
    let declared = u.arbitrary::<bool>().unwrap_or(true);
    let plaintext: Vec<u8> = (0..total).map(|i| (i * 7 + 3) as u8).collect();

    let mut expected = plaintext.clone();
    LayerEncryptor::new(symkey, nonce).encrypt_in_place(&mut expected);

    let record = UploadRecord {
        repository: "demo/app".to_string(),
        offset: 0,
        treatment: Treatment::Encrypt(Box::new(LayerEncryptor::new(symkey, nonce))),
    };
    let Ok(mut chunks) = ChunkStream::new(record, Some(0)) else {
        panic!("property broken: a fresh stream refused");
    };
    let mut prefetcher = Prefetcher::with_budget(u.int_in_range(0..=40u64).unwrap_or(32) << 20);
    let job = prefetcher.start(0, declared.then_some(total as u64));
    let other_key = [symkey[0] ^ 1; 32];
    let mut out = Vec::with_capacity(total);
    let mut rng = TestRng::new(1);
    let mut at = 0usize;
    while at < total {
        // Once the input is used up, the rest of the stream goes in one chunk.
        let pick = if u.is_empty() {
            2
        } else {
            u.int_in_range(0..=2u8).unwrap_or(2)
        };
        let len = match pick {
            0 => u.int_in_range(1..=70_000usize).unwrap_or(total),
            1 => u.int_in_range(1..=64usize).unwrap_or(total),
            _ => total,
        }
        .min(total - at);
        for (offset, n) in prefetcher.plan(job, (at + len) as u64) {
            let right = blockcipher::keystream(&symkey, &nonce, offset, n as usize);
            let message = match u.int_in_range(0..=8u8).unwrap_or(0) {
                0 | 1 => Some(segment_message(job, offset, &right)),
                2 => None,
                3 => Some(segment_message(
                    job,
                    offset,
                    &blockcipher::keystream(&other_key, &nonce, offset, n as usize),
                )),
                4 => {
                    let shift = u.int_in_range(1..=40u64).unwrap_or(16);
                    let ks = blockcipher::keystream(&symkey, &nonce, offset + shift, n as usize);
                    Some(segment_message(job, offset, &ks))
                }
                5 => {
                    let keep = u.int_in_range(1..=n as usize).unwrap_or(1);
                    let mut ks = right.clone();
                    // A segment cut short, then claiming the full length with zeros.
                    let from = keep.min(ks.len() - 1);
                    ks[from..].fill(0);
                    ks.truncate(if u.arbitrary().unwrap_or(false) {
                        keep
                    } else {
                        ks.len()
                    });
                    Some(segment_message(job, offset, &ks))
                }
                6 => {
                    let mut ks = right.clone();
                    let first = u.int_in_range(0..=15usize).unwrap_or(0).min(ks.len() - 1);
                    ks[first] ^= 0x01;
                    Some(segment_message(job, offset, &ks))
                }
                7 => {
                    let mut ks = right.clone();
                    let back = u.int_in_range(1..=16usize).unwrap_or(1).min(ks.len());
                    let i = ks.len() - back;
                    ks[i] ^= 0x80;
                    Some(segment_message(job, offset, &ks))
                }
                _ => Some(segment_message(job.wrapping_add(1), offset, &right)),
            };
            if let Some(message) = message {
                if let Some(segment) = Segment::decode(message) {
                    prefetcher.deliver(segment);
                }
            }
        }
        let mut chunk = plaintext[at..at + len].to_vec();
        let verdict = chunks.on_body_with(
            &mut chunk,
            at + len == total,
            &mut rng,
            &mut prefetcher.supply(job),
        );
        check!(
            matches!(verdict, Ok(BodyVerdict::Replaced)),
            "an encrypting stream did not replace a chunk: {verdict:?}"
        );
        out.extend_from_slice(&chunk);
        at += len;
    }
    prefetcher.end(job);
    check!(
        chunks.offset() == total as u64,
        "stream offset {} after {total} bytes",
        chunks.offset()
    );
    if out != expected {
        let first = out.iter().zip(&expected).position(|(a, b)| a != b);
        panic!("property broken: ciphertext with prefetched keystream differs from local encryption at byte {first:?} of {total}");
    }
    let tally = prefetcher.tally();
    check!(
        tally.used <= total as u64,
        "used {} keystream bytes of {total}",
        tally.used
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => requests(rest),
        1 => segments(rest),
        _ => stream(rest),
    }
});
