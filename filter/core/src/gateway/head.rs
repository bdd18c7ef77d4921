//! Header maps as the host hands them over: names lowercased, values as bytes. A value is
//! decoded only where the gateway interprets it (a header value may hold any byte HTTP/1.1
//! allows, obs-text included).
use crate::error::{Code, OciError};

/// Request headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    /// Every header in order, pseudo-headers included; names lowercased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the request ends with its headers (no body).
    pub end_of_stream: bool,
}

impl RequestHead {
    /// Headers from `(name, value)` pairs (tests and simple hosts).
    pub fn new<N: AsRef<str>, V: AsRef<[u8]>>(headers: &[(N, V)], end_of_stream: bool) -> Self {
        RequestHead {
            headers: headers
                .iter()
                .map(|(n, v)| (n.as_ref().to_ascii_lowercase(), v.as_ref().to_vec()))
                .collect(),
            end_of_stream,
        }
    }

    /// The first value of `name`, as Envoy's header-map read answers.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` as text; `None` when absent or not UTF-8.
    pub fn text(&self, name: &str) -> Option<String> {
        self.bytes(name)
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    /// A header the gateway interprets: `Ok(None)` when absent; a value that is not UTF-8 is
    /// refused with `code`, naming the header but never echoing its bytes (it may be a
    /// credential).
    pub fn strict(&self, name: &str, code: Code) -> Result<Option<String>, OciError> {
        let Some(bytes) = self.bytes(name) else {
            return Ok(None);
        };
        String::from_utf8(bytes.to_vec()).map(Some).map_err(|e| {
            OciError::new(
                code,
                format!(
                    "header {name} is not valid UTF-8 (first bad byte at offset {}); nothing was \
                     stored. Send it as ASCII",
                    e.utf8_error().valid_up_to()
                ),
            )
        })
    }

    /// Every value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// A pseudo-header decoded with U+FFFD in place of bytes that are not UTF-8.
    fn lossy(&self, name: &str) -> String {
        String::from_utf8_lossy(self.bytes(name).unwrap_or_default()).into_owned()
    }

    /// `PUT` of something under `/manifests/` (read loosely: for the drain-before-refusal rule).
    pub fn is_manifest_put(&self) -> bool {
        self.lossy(":method") == "PUT" && self.lossy(":path").contains("/manifests/")
    }
}

/// Response headers (names lowercased, values as bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseHead {
    /// Every header in order, `:status` included.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    /// Headers from `(name, value)` pairs.
    pub fn new(headers: &[(&str, &str)]) -> Self {
        ResponseHead {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// A header as text; a value that is not UTF-8 reads as absent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
    }

    /// `:status` (lossy: a status that is not UTF-8 matches no status the gateway acts on).
    pub fn status(&self) -> String {
        self.headers
            .iter()
            .find(|(n, _)| n == ":status")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    }
}

/// The answer to a callout: headers (names lowercased, values as bytes) and body. A callout
/// that failed (reset, timeout, over Envoy's limit) has no headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CalloutAnswer {
    /// Response headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Response body.
    pub body: Vec<u8>,
}

impl CalloutAnswer {
    /// An answer with `status`, these headers and body.
    pub fn new(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Self {
        let mut all = vec![(":status".to_string(), status.to_string().into_bytes())];
        all.extend(
            headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.as_bytes().to_vec())),
        );
        CalloutAnswer {
            headers: all,
            body: body.to_vec(),
        }
    }

    /// A header as text; a value that is not UTF-8 reads as absent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
    }

    /// The status; a failed callout (no status) counts as `503`.
    pub fn status(&self) -> String {
        self.header(":status").unwrap_or_else(|| "503".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_headers_refuse_non_utf8_without_echoing_it() {
        let head = RequestHead::new(
            &[
                ("Content-Type", &b"application/json"[..]),
                ("authorization", b"Basic s3cr\xff"),
                ("x-bad", b"\x80"),
            ],
            true,
        );
        let strict = |name| head.strict(name, Code::BlobUploadInvalid);
        assert_eq!(strict("content-type"), Ok(Some("application/json".into())));
        assert_eq!(strict("absent"), Ok(None));
        let err = strict("authorization").unwrap_err();
        assert_eq!((err.code, err.status()), (Code::BlobUploadInvalid, 400));
        assert!(err
            .message
            .contains("header authorization is not valid UTF-8"));
        assert!(err.message.contains("offset 10"), "{}", err.message);
        assert!(!err.message.contains("s3cr"), "{}", err.message);
        assert_eq!(head.text("authorization"), None);
        assert_eq!(
            head.strict("x-bad", Code::ManifestInvalid)
                .unwrap_err()
                .code,
            Code::ManifestInvalid
        );
    }

    #[test]
    fn the_first_value_is_the_one_read() {
        let head = RequestHead::new(&[("a", "1"), ("b", "2"), ("a", "3")], false);
        assert_eq!(head.bytes("a"), Some(&b"1"[..]));
        assert_eq!(head.all("a").collect::<Vec<_>>(), [&b"1"[..], b"3"]);
    }
}
