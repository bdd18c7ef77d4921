//! Media types, digests and checks shared by the manifest and index rewrite tests
//! (`manifest_rewrite`, `manifest_artifacts`, `index_rewrite`). Pure code: these tests also run
//! as wasm32-wasip1 (`scripts/test-wasm`).
#![allow(dead_code)]

use std::collections::BTreeMap;

use ocicrypt_core::digest::Digest;
use ocicrypt_core::distribution::ledger::LedgerEntry;
use ocicrypt_core::distribution::manifest::{rewrite, ManifestError, RewriteOptions, Rewritten};
use ocicrypt_core::error::{Code, OciError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_TGZ_ENC: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_TGZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const JWE: &str = "org.opencontainers.image.enc.keys.jwe";
pub const PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";

/// The digest a client pushed manifest number `n` under.
pub fn pushed(n: u8) -> Digest {
    Digest::of(&[n, 0x11])
}

/// The digest of the manifest the gateway stored for manifest number `n`.
pub fn stored(n: u8) -> Digest {
    Digest::of(&[n, 0x22])
}

/// Rewrites `body`, pushed as `content_type`, in a repository whose ledger holds `ledger`.
pub fn rewrite_with(
    body: &[u8],
    content_type: &str,
    ledger: BTreeMap<Digest, LedgerEntry>,
) -> Result<Rewritten, ManifestError> {
    let lookup = move |d: &Digest| ledger.get(d).cloned();
    rewrite(body, content_type, &lookup)
}

/// [`rewrite_with`] with explicit options (for repositories that accept images encrypted
/// before the push).
pub fn rewrite_opts(
    body: &[u8],
    content_type: &str,
    ledger: BTreeMap<Digest, LedgerEntry>,
    options: &RewriteOptions,
) -> Result<Rewritten, ManifestError> {
    let lookup = move |d: &Digest| ledger.get(d).cloned();
    ocicrypt_core::distribution::manifest::rewrite_with(body, content_type, &lookup, options)
}

/// What a refusal table case expects of the error.
pub type Check = fn(&ManifestError) -> bool;

/// Checks the refusal of table case `name`: `result` is an error that `check` accepts, answered
/// as 400 MANIFEST_INVALID with a message holding each of `says`. Returns the answer.
pub fn assert_refused<S: AsRef<str> + std::fmt::Debug>(
    name: &str,
    result: Result<Rewritten, ManifestError>,
    check: Check,
    says: &[S],
) -> OciError {
    let err = match result {
        Ok(out) => panic!("{name}: accepted: {}", String::from_utf8_lossy(&out.body)),
        Err(e) => e,
    };
    assert!(check(&err), "{name}: wrong error {err:?}");
    let oci = err.to_oci();
    assert_eq!(oci.code, Code::ManifestInvalid, "{name}");
    assert_eq!(oci.status(), 400, "{name}");
    for fragment in says {
        assert!(
            oci.message.contains(fragment.as_ref()),
            "{name}: message {:?} lacks {fragment:?}",
            oci.message
        );
    }
    oci
}
