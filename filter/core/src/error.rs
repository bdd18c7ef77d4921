//! The one place where failures become HTTP answers: an OCI distribution error body
//! `{"errors":[{"code":…,"message":…,"detail":…}]}` with its status.

/// Error codes of the distribution spec that the gateway answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 400: the pushed content does not match the digest the client named.
    DigestInvalid,
    /// 400: the manifest cannot be stored encrypted (or is not a manifest).
    ManifestInvalid,
    /// 400: the upload request is not one the gateway can continue.
    BlobUploadInvalid,
    /// 404: the upload session is unknown.
    BlobUploadUnknown,
    /// 413: a body the gateway must hold in memory is too large.
    SizeInvalid,
    /// 403: the request is not allowed through the gateway.
    Denied,
    /// 405: the operation is not supported on an encrypted repository.
    Unsupported,
    /// 503: recipients cannot be had, or the registry could not finish the upload.
    Unavailable,
    /// 500: a bug or host failure; nothing was forwarded in plaintext.
    Unknown,
    /// 502: the registry answered something the gateway must not follow (a `Location` out of
    /// the repository or off the gateway, a redirect, a `Range` that is not what was sent).
    BadGateway,
    /// 401: the registry refused the client's credentials on a callout made for it; the answer
    /// carries the registry's challenge ([`OciError::challenge`]).
    Unauthorized,
}

impl Code {
    /// The code string of the distribution spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unknown | Code::BadGateway => "UNKNOWN",
            Code::Unauthorized => "UNAUTHORIZED",
        }
    }

    /// HTTP status for the code.
    pub fn status(self) -> u16 {
        match self {
            Code::DigestInvalid | Code::ManifestInvalid | Code::BlobUploadInvalid => 400,
            Code::BlobUploadUnknown => 404,
            Code::SizeInvalid => 413,
            Code::Denied => 403,
            Code::Unsupported => 405,
            Code::Unavailable => 503,
            Code::Unknown => 500,
            Code::BadGateway => 502,
            Code::Unauthorized => 401,
        }
    }
}

/// A refusal, ready to be sent as a local reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciError {
    /// Distribution error code (decides the status).
    pub code: Code,
    /// What went wrong and what to do about it; never contains key material.
    pub message: String,
    /// The registry's `WWW-Authenticate` challenge, sent with the answer (a `401` to a callout
    /// made with the client's credentials: how the client learns which token to fetch).
    pub challenge: Option<String>,
}

impl OciError {
    /// Builds an error with a message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        OciError {
            code,
            message: message.into(),
            challenge: None,
        }
    }

    /// With the registry's `WWW-Authenticate` challenge (`Some`): answered `401
    /// UNAUTHORIZED` with it, as the registry would have (a `401` without a challenge would
    /// leave the client nothing to act on, so without one the error stays as it is).
    pub fn with_challenge(mut self, challenge: Option<String>) -> Self {
        if challenge.is_some() {
            self.code = Code::Unauthorized;
            self.challenge = challenge;
        }
        self
    }

    /// HTTP status of the answer.
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "errors": [{
                "code": self.code.as_str(),
                "message": self.message,
                "detail": {"gateway": "ocicrypt-filter"},
            }]
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status(),
            self.code.as_str(),
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_an_oci_error_document() {
        let e = OciError::new(Code::DigestInvalid, "digest mismatch");
        assert_eq!(e.status(), 400);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DIGEST_INVALID");
        assert_eq!(v["errors"][0]["message"], "digest mismatch");
    }
}
