//! A scratch directory for the tests that hand files to another program (python3, skopeo).
//! It compiles for wasm32-wasip1 but is only created once such a program is found to run, which
//! never happens there.
#![allow(dead_code)]

use rand::RngCore;
use std::path::PathBuf;

/// A fresh directory under the system temporary directory, removed with everything in it on
/// drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let mut n = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut n);
        let p = std::env::temp_dir().join(format!("ocicrypt-{tag}-{}", hex::encode(n)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
