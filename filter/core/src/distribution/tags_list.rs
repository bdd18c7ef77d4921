//! The distribution API's tag listing (`GET /v2/<name>/tags/list`) as a user of an encrypted
//! repository sees it: without the tags the gateway reserves for its ledger
//! ([`crate::distribution::ledger::is_reserved_tag`]).
//!
//! Only tags are removed; every other member of the answer is copied as the registry wrote it,
//! and pagination stays the registry's: a page it answered with `n` tags may hold fewer once
//! the reserved ones are gone, and its `Link` names the next page after the last tag *the
//! registry* listed, so a client that follows `Link` sees every user tag exactly once
//! (rewriting `last` to the last tag kept would loop on a page of reserved tags only). A page
//! left with no tag while a `Link` follows is not shown at all: the gateway reads the next one
//! instead (oras-py stops at an empty page).
//!
//! The answer is read without a document tree: tags are filtered as they are parsed, each
//! borrowed from the body where it has no escape, so the memory held is the answer and its
//! filtered copy, whatever the count of tags (an answer of countless tiny tags grows no tree).
use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::distribution::ledger::is_reserved_tag;

/// The answer without reserved tags: `Ok(None)` when it holds none (send it as it is); an
/// error when it is not a JSON object whose `tags` is an array of strings or `null`.
pub fn without_reserved(body: &[u8]) -> Result<Option<Vec<u8>>, serde_json::Error> {
    shown(body).map(|page| page.body)
}

/// A page of the tags list as the gateway shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    /// The answer without reserved tags; `None` when it held none (send it as it is).
    pub body: Option<Vec<u8>>,
    /// Tags left in it.
    pub kept: usize,
    /// Reserved tags left out.
    pub removed: usize,
}

/// Reads a tags list answer: what to show, and how many tags it keeps and leaves out. An error
/// when it is not a JSON object whose `tags` is an array of strings or `null`.
pub fn shown(body: &[u8]) -> Result<Shown, serde_json::Error> {
    let mut out = Vec::with_capacity(body.len());
    let mut counts = Counts::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_map(Answer {
        out: &mut out,
        counts: &mut counts,
    })?;
    de.end()?;
    Ok(Shown {
        body: (counts.removed > 0).then_some(out),
        kept: counts.kept,
        removed: counts.removed,
    })
}

#[derive(Default)]
struct Counts {
    kept: usize,
    removed: usize,
}

/// The top-level object, copied member by member.
struct Answer<'w> {
    out: &'w mut Vec<u8>,
    counts: &'w mut Counts,
}

impl<'de> Visitor<'de> for Answer<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a tags list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut first = true;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            if !first {
                self.out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *self.out, key.0.as_ref()).map_err(de::Error::custom)?;
            self.out.push(b':');
            if key.0 == "tags" {
                map.next_value_seed(Tags {
                    out: &mut *self.out,
                    counts: &mut *self.counts,
                })?;
            } else {
                let raw: &RawValue = map.next_value()?;
                self.out.extend_from_slice(raw.get().as_bytes());
            }
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// A string, borrowed from the body when it holds no escape.
struct Text<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The `tags` member: an array written back without its reserved tags, or `null`.
struct Tags<'w> {
    out: &'w mut Vec<u8>,
    counts: &'w mut Counts,
}

impl<'de> DeserializeSeed<'de> for Tags<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tags<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of tags, or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        while let Some(tag) = seq.next_element::<Text<'de>>()? {
            if is_reserved_tag(&tag.0) {
                self.counts.removed = self.counts.removed.saturating_add(1);
                continue;
            }
            self.counts.kept = self.counts.kept.saturating_add(1);
            if !first {
                self.out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *self.out, tag.0.as_ref()).map_err(de::Error::custom)?;
        }
        self.out.push(b']');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_tags_are_read_as_the_registry_reads_them() {
        // `\u006f` is `o`: the registry (and every client) reads this tag as reserved.
        let body = br#"{"name":"demo/app","tags":["v1","\u006fcicrypt.sha256-00"]}"#;
        assert_eq!(
            without_reserved(body).unwrap().unwrap(),
            br#"{"name":"demo/app","tags":["v1"]}"#
        );
    }
}
