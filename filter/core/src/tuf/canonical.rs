//! OLPC canonical JSON (<http://wiki.laptop.org/go/Canonical_JSON>), the form TUF signs (spec §4.1
//! "Metaformat").
//!
//! Rules, as securesystemslib's `encode_canonical` applies them: object keys sorted by their
//! UTF-8 bytes, no insignificant whitespace, strings escape only `\` and `"` (everything else,
//! control characters and non-ASCII included, is written raw), numbers must be integers.

use serde_json::Value;
use thiserror::Error;

/// A value that has no canonical JSON form.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no canonical JSON form: {reason}")]
pub struct CanonicalError {
    /// What was found (for example a floating-point number).
    pub reason: String,
}

/// Serialise `value` as canonical JSON.
pub fn to_canonical(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(CanonicalError {
                    reason: format!("non-integer number {n}"),
                });
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for byte in s.bytes() {
        if byte == b'"' || byte == b'\\' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        let v =
            json!({"b": 1, "a": [true, null, -3], "c": {"z": "x", "y": 18446744073709551615u64}});
        assert_eq!(
            to_canonical(&v).unwrap(),
            br#"{"a":[true,null,-3],"b":1,"c":{"y":18446744073709551615,"z":"x"}}"#
        );
    }

    #[test]
    fn escapes_only_quote_and_backslash() {
        let v = json!("a\"b\\c\nd\u{e9}\u{1}");
        assert_eq!(
            to_canonical(&v).unwrap(),
            "\"a\\\"b\\\\c\nd\u{e9}\u{1}\"".as_bytes()
        );
    }

    #[test]
    fn keys_sort_by_utf8_bytes() {
        let v = json!({"\u{e9}": 1, "z": 2, "A": 3});
        assert_eq!(
            to_canonical(&v).unwrap(),
            "{\"A\":3,\"z\":2,\"\u{e9}\":1}".as_bytes()
        );
    }

    #[test]
    fn refuses_floats() {
        assert!(to_canonical(&json!({"a": 1.5})).is_err());
    }
}
