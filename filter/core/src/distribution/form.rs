//! Query strings and request forms read the way the registry reads them.
//!
//! Distribution (Go) takes the parameters it acts on — `mount`, `from`, `digest`, `_state` —
//! with `r.FormValue`, which reads `net/url`'s `ParseQuery` of the query and, for `POST`, `PUT`
//! and `PATCH` with a form `Content-Type`, the body's form values first. Go decodes keys as well
//! as values (`mo%75nt` is `mount`, `+` is a space), keeps the first of repeated keys, and (since
//! Go 1.17) drops pairs holding `;` where older builds split on it. A gateway that reads a
//! request differently from the registry can be walked around: [`Query::strict`] reads the query
//! as Go does and refuses every shape where two readings could differ, and
//! [`is_form_content_type`] names the bodies whose form values the registry would read.

/// Why a query cannot be read unambiguously.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `;` separates pairs for some Go versions and voids them for others.
    #[error(
        "the query holds ';', which registries built with different Go versions read differently"
    )]
    Semicolon,
    /// A key is escaped (`mo%75nt`, `a+b`): clients never need to, and a reader that does not
    /// decode keys would miss it.
    #[error("query key {0:?} is percent- or plus-encoded")]
    EncodedKey(String),
    /// A `%` escape that Go refuses (the pair would be silently dropped by the registry).
    #[error("query pair {0:?} holds an invalid %-escape")]
    BadEscape(String),
    /// A decoded value that is not UTF-8.
    #[error("the value of query key {0:?} is not UTF-8 once decoded")]
    NotUtf8(String),
    /// A parameter the gateway acts on appears more than once.
    #[error("query key {0:?} appears more than once")]
    Repeated(String),
}

/// A query string decoded as Go's `url.ParseQuery` decodes it, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Reads `raw` (the part after `?`, without it). `interpreted` names the keys whose value the
    /// gateway or the registry acts on: each may appear at most once. Every pair must decode the
    /// way Go decodes it, with no key escaped and no `;` anywhere.
    pub fn strict(raw: &str, interpreted: &[&str]) -> Result<Query, QueryError> {
        if raw.contains(';') {
            return Err(QueryError::Semicolon);
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        for piece in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            if key.contains('%') || key.contains('+') {
                return Err(QueryError::EncodedKey(key.to_string()));
            }
            let value = unescape(value).ok_or_else(|| QueryError::BadEscape(piece.to_string()))?;
            let value =
                String::from_utf8(value).map_err(|_| QueryError::NotUtf8(key.to_string()))?;
            if interpreted.contains(&key) && pairs.iter().any(|(k, _)| k == key) {
                return Err(QueryError::Repeated(key.to_string()));
            }
            pairs.push((key.to_string(), value));
        }
        Ok(Query { pairs })
    }

    /// The first value of `key`, as Go's `Values.Get` answers.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Go's `url.QueryUnescape`: `%XX` (either hex case) and `+` as a space; `None` for a `%` not
/// followed by two hex digits (Go returns an error, and `ParseQuery` drops the pair).
pub fn unescape(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|&h| (h as char).to_digit(16))?;
                let lo = bytes.get(i + 2).and_then(|&h| (h as char).to_digit(16))?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// True when `content_type` makes Go's `r.FormValue` read the request body as a form
/// (`application/x-www-form-urlencoded`, `multipart/form-data`): its values then win over the
/// query's. Deliberately broad (any parameters, any case, `multipart/*`), because a body the
/// registry reads as a form can carry `mount`, `from` or `digest` the gateway never sees.
pub fn is_form_content_type(content_type: &[u8]) -> bool {
    let lower = content_type.to_ascii_lowercase();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    has(b"form-urlencoded") || has(b"multipart")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["mount", "from", "digest", "_state"];

    #[test]
    fn decodes_values_as_go_does() {
        let q = Query::strict("digest=sha256%3Aab&_state=a%2Bb%3D&x=a+b", KEYS).unwrap();
        assert_eq!(q.get("digest"), Some("sha256:ab"));
        assert_eq!(q.get("_state"), Some("a+b="));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("mount"), None);
        assert_eq!(Query::strict("", KEYS).unwrap(), Query::default());
        assert_eq!(Query::strict("&&a=1&", KEYS).unwrap().get("a"), Some("1"));
    }

    #[test]
    fn refuses_every_ambiguous_shape() {
        let cases: &[(&str, QueryError)] = &[
            (
                "mo%75nt=sha256:ab&from=plain/y",
                QueryError::EncodedKey("mo%75nt".into()),
            ),
            ("%6Dount=x", QueryError::EncodedKey("%6Dount".into())),
            ("mo+unt=x", QueryError::EncodedKey("mo+unt".into())),
            ("mount=a;from=b", QueryError::Semicolon),
            (
                "mount=a&mount=b&from=c",
                QueryError::Repeated("mount".into()),
            ),
            ("digest=a&digest=b", QueryError::Repeated("digest".into())),
            ("_state=a&_state=b", QueryError::Repeated("_state".into())),
            (
                "digest=sha256%3",
                QueryError::BadEscape("digest=sha256%3".into()),
            ),
            ("digest=%zz", QueryError::BadEscape("digest=%zz".into())),
            ("digest=%ff", QueryError::NotUtf8("digest".into())),
        ];
        for (raw, want) in cases {
            assert_eq!(Query::strict(raw, KEYS).as_ref(), Err(want), "{raw}");
        }
        // Keys nobody acts on may repeat (Go keeps them all; nothing reads them).
        assert!(Query::strict("n=1&n=2", KEYS).is_ok());
    }

    #[test]
    fn unescape_matches_go() {
        assert_eq!(unescape("%41%6a+%2B").unwrap(), b"Aj +");
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%"), None);
        assert_eq!(unescape("100%"), None);
    }

    #[test]
    fn form_content_types() {
        for ct in [
            &b"application/x-www-form-urlencoded"[..],
            b"Application/X-WWW-Form-Urlencoded; charset=utf-8",
            b"multipart/form-data; boundary=x",
            b"multipart/mixed",
            b" application/x-www-form-urlencoded\xff",
        ] {
            assert!(is_form_content_type(ct), "{ct:?}");
        }
        for ct in [
            &b"application/octet-stream"[..],
            b"application/vnd.oci.image.manifest.v1+json",
            b"",
        ] {
            assert!(!is_form_content_type(ct), "{ct:?}");
        }
    }
}
