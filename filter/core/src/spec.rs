//! Constants of the OCI image and image-encryption formats, as containers/ocicrypt uses them.

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest v2 schema 2.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Suffix ocicrypt appends to a layer media type.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";

/// Annotation holding the JWE-wrapped private options.
pub const ANNOTATION_KEYS_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation holding the public options (cipher, HMAC).
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// Prefix of every encryption annotation; stripped on decryption.
pub const ANNOTATION_ENC_PREFIX: &str = "org.opencontainers.image.enc.";

/// The only block cipher ocicrypt implements.
pub const CIPHER_AES_256_CTR_HMAC_SHA256: &str = "AES_256_CTR_HMAC_SHA256";

/// Maps a plaintext layer media type to the encrypted type every decryptor understands, or
/// `None` when the type is not an image layer that ocicrypt encrypts. Docker layer types map
/// to the OCI encrypted types, as containerd/imgcrypt and containers/image do.
pub fn encrypted_media_type(plain: &str) -> Option<&'static str> {
    Some(match plain {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => {
            "application/vnd.oci.image.layer.v1.tar+encrypted"
        }
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        }
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted"
        }
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd+encrypted"
        }
        _ => return None,
    })
}

/// True for media types that are image layers a runtime unpacks (and so must be encrypted in an
/// encrypted repository).
pub fn is_image_layer(media_type: &str) -> bool {
    encrypted_media_type(media_type).is_some()
}

/// True for encrypted layer types some decryptor understands (the OCI `+encrypted` types).
pub fn is_known_encrypted(media_type: &str) -> bool {
    media_type
        .strip_suffix(ENCRYPTED_SUFFIX)
        .and_then(encrypted_media_type)
        .is_some_and(|enc| enc == media_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_types_map_to_oci_encrypted_types() {
        assert_eq!(
            encrypted_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
        );
        assert!(
            encrypted_media_type("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
                .is_none()
        );
        assert!(encrypted_media_type("application/vnd.in-toto+json").is_none());
    }

    #[test]
    fn known_encrypted_types() {
        assert!(is_known_encrypted(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
        assert!(!is_known_encrypted(
            "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted"
        ));
        assert!(!is_known_encrypted("application/json+encrypted"));
    }
}
