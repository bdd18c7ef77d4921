//! The ocicrypt format (`AES_256_CTR_HMAC_SHA256` layers, keys wrapped in JWE) and the
//! ciphers under it. Imports only the shared vocabulary.
//!
//! [`blockcipher`] encrypts a layer chunk by chunk, on [`sha256`] (a digest that spans
//! requests) and [`simd`] (the vector AES and SHA-256 of its hot loop); [`keystream`] computes
//! its AES-CTR keystream ahead on another worker; [`keywrap`] wraps the layer key to the
//! [`recipients`]' public keys and writes the layer annotations.
pub mod blockcipher;
pub mod ciphertext_hashes;
pub mod keystream;
pub mod keywrap;
pub mod recipients;
pub mod sha256;
pub mod simd;
