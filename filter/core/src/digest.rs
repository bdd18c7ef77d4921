//! OCI content digests (`sha256:<64 hex>`), the only algorithm distribution accepts for pushes
//! that this gateway rewrites.
use std::fmt;

/// A parsed `sha256:` digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// Only `sha256:` digests can be verified and rewritten by the gateway.
    #[error("unsupported digest algorithm in {0:?}: only sha256 is accepted")]
    Algorithm(String),
    /// The hex part is not 64 lowercase hex characters.
    #[error("malformed digest {0:?}: expected sha256:<64 lowercase hex>")]
    Malformed(String),
}

impl Digest {
    /// Parses `sha256:<hex>`; percent-encoded colons (`sha256%3A…`, as clients send in
    /// query strings) are accepted too.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let hex_part = if let Some(rest) = s.strip_prefix("sha256:") {
            rest
        } else if let Some(rest) = s
            .strip_prefix("sha256%3A")
            .or_else(|| s.strip_prefix("sha256%3a"))
        {
            rest
        } else {
            return Err(DigestError::Algorithm(s.to_string()));
        };
        if hex_part.len() != 64
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Malformed(s.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| DigestError::Malformed(s.to_string()))?;
        Ok(Digest(out))
    }

    /// Digest of a byte string.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_percent_encoded() {
        let d = Digest::of(b"abc");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(&s).unwrap(), d);
        assert_eq!(Digest::parse(&s.replace(':', "%3A")).unwrap(), d);
    }

    #[test]
    fn refuses_other_algorithms_and_bad_hex() {
        assert!(matches!(
            Digest::parse("sha512:00"),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            Digest::parse("sha256:zz"),
            Err(DigestError::Malformed(_))
        ));
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(matches!(
            Digest::parse(&upper),
            Err(DigestError::Malformed(_))
        ));
    }
}
