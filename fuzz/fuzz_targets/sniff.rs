//! The JSON / ciphertext sniffing of blob uploads: `upload::is_json_like`,
//! `upload::looks_encrypted`, and `upload::ChunkStream` fed a blob split at fuzzer-chosen
//! points.
//!
//! Input: [flags][number of splits][splits: 2 bytes each][blob...]; flags bit 0 sets
//! `accepting_encrypted`.
//!
//! Properties:
//! - the treatment is the one the blob's first window calls for, however the blob is split
//!   (chunks may be held back and released later: only the request's total is kept);
//! - a JSON blob passes unchanged, and is refused only if it holds a NUL;
//! - without `accepting_encrypted`, every blob that is not JSON is encrypted; the output has
//!   the input's length, is the same whatever the split, decrypts (with the layer's key, nonce
//!   and HMAC) to the input, and the layer's digests are those of the input and the output;
//! - with `accepting_encrypted`, a blob passed as ciphertext looked encrypted at its start,
//!   and every 4 KiB window of it (and its tail) does too; a refusal comes only for a window
//!   that does not, and only judged windows went on before it;
//! - the sniffers agree with their definitions on what they refuse (known magic, short
//!   windows, NUL bytes).
#![no_main]

use fuzz_support::{check, TestRng};
use libfuzzer_sys::fuzz_target;
use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::upload::{
    is_json_like, looks_encrypted, window_looks_encrypted, BodyVerdict, ChunkStream, Treatment,
    UploadRecord, PASS_WINDOW, SNIFF_WINDOW,
};
use ocicrypt_core::format::blockcipher::{decrypt_layer, LayerEncryptor};

const MAGIC: [&[u8]; 10] = [
    b"\x1f\x8b",
    b"\x28\xb5\x2f\xfd",
    b"\xfd7zXZ\x00",
    b"BZh",
    b"PK\x03\x04",
    b"7z\xbc\xaf\x27\x1c",
    b"\x04\x22\x4d\x18",
    b"\x00asm",
    b"\x7fELF",
    b"\x89PNG",
];

fn window(b: &[u8]) -> &[u8] {
    &b[..b.len().min(SNIFF_WINDOW)]
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let accept = flags & 1 != 0;
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % 16);
    let (split_bytes, blob) = rest.split_at((count * 2).min(rest.len()));
    let mut cuts: Vec<usize> = split_bytes
        .chunks(2)
        .map(|c| {
            usize::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])) % (blob.len() + 1)
        })
        .collect();
    cuts.sort_unstable();

    // The sniffers on their own.
    let w = window(blob);
    let json = is_json_like(w);
    check!(
        !json || (!w.contains(&0) && w.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')),
        "is_json_like of a window that does not open with '{{' or holds NUL"
    );
    if looks_encrypted(w) {
        check!(w.len() >= 32, "looks_encrypted of {} bytes", w.len());
        check!(
            !MAGIC.iter().any(|m| w.starts_with(m)),
            "looks_encrypted of a blob with a known format's magic"
        );
    }

    // The stream, chunk by chunk, as one request.
    let Ok(stream) = ChunkStream::new(UploadRecord::new("demo/app"), Some(0)) else {
        panic!("property broken: a fresh upload refused at offset 0");
    };
    let mut stream = stream.accepting_encrypted(accept);
    let mut rng = TestRng::new(u64::from(flags));
    let mut out = Vec::with_capacity(blob.len());
    let mut previous = 0usize;
    let bounds: Vec<usize> = cuts
        .into_iter()
        .chain(std::iter::once(blob.len()))
        .collect();
    // The treatment the blob's first window calls for.
    let starts_json = is_json_like(w);
    let passes = !starts_json && accept && looks_encrypted(w);
    for (i, &cut) in bounds.iter().enumerate() {
        let piece = &blob[previous..cut];
        previous = cut;
        let mut chunk = piece.to_vec();
        let last = i + 1 == bounds.len();
        match stream.on_body(&mut chunk, last, &mut rng) {
            Ok(BodyVerdict::Replaced) => out.extend_from_slice(&chunk),
            Ok(BodyVerdict::Unchanged) => {
                check!(chunk == piece, "an Unchanged chunk was changed");
                out.extend_from_slice(piece);
            }
            Err(e) => {
                // Refused: JSON that holds a NUL, or a blob passed as ciphertext with a window
                // that does not look so; whatever went on before is judged ciphertext.
                if starts_json {
                    check!(blob.contains(&0), "JSON without NUL refused: {e:?}");
                } else {
                    check!(passes, "chunk refused: {e:?}");
                    let judged = out.len() - out.len() % PASS_WINDOW;
                    check!(
                        out.len() == judged,
                        "a blob passed as ciphertext let {} unjudged bytes go on",
                        out.len() - judged
                    );
                    let bad = blob.chunks(PASS_WINDOW).any(|c| !window_looks_encrypted(c));
                    check!(bad, "refused, yet every window looks encrypted: {e:?}");
                }
                check!(
                    out.as_slice() == &blob[..out.len()] || !starts_json && !passes,
                    "refused after changing bytes"
                );
                return;
            }
        }
    }
    check!(
        out.len() == blob.len(),
        "{} bytes went on of {}",
        out.len(),
        blob.len()
    );
    check!(
        stream.offset() == blob.len() as u64 && stream.request_bytes() == blob.len() as u64,
        "stream offset {} after {} bytes",
        stream.offset(),
        blob.len()
    );
    let record = match stream.into_record() {
        Ok(record) => record,
        Err(e) => panic!("property broken: a request without a hashing helper refused at its end: {e}"),
    };
    match record.treatment {
        Treatment::Encrypt(encryptor) => {
            check!(
                !starts_json && !passes,
                "a blob that opens as JSON or as accepted ciphertext was encrypted"
            );
            // The same layer key and nonce (same RNG seed) over the whole blob at once.
            let mut at_once = blob.to_vec();
            LayerEncryptor::generate(&mut TestRng::new(u64::from(flags)))
                .encrypt_in_place(&mut at_once);
            check!(
                out == at_once,
                "the ciphertext depends on how the blob was split"
            );
            if blob.len() >= 16 {
                check!(out != blob, "an encrypted blob equals its plaintext");
            }
            let layer = encryptor.finish();
            check!(
                layer.plaintext_digest == Digest::of(blob)
                    && layer.encrypted_digest == Digest::of(&out)
                    && layer.size == blob.len() as u64,
                "the layer's digests or size do not describe the blob"
            );
            let plain = decrypt_layer(&layer.symkey, &layer.nonce, &layer.hmac, &out);
            check!(
                plain.as_deref() == Ok(blob),
                "the ciphertext does not decrypt to the blob"
            );
        }
        Treatment::Json => {
            check!(
                starts_json,
                "a blob that does not open as JSON passed as JSON"
            );
            check!(
                out == blob && !blob.contains(&0),
                "a JSON blob was changed or held NUL"
            );
        }
        Treatment::Passthrough => {
            check!(
                passes,
                "a blob passed as ciphertext without the policy or the look"
            );
            check!(out == blob, "a blob passed as ciphertext was changed");
            check!(
                blob.chunks(PASS_WINDOW).all(window_looks_encrypted),
                "a blob passed as ciphertext holds a window that does not look encrypted"
            );
        }
        Treatment::Undecided => check!(blob.is_empty(), "a blob with bytes left undecided"),
    }
});
