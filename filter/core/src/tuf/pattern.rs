//! Delegation path matching (spec §4.5 `paths` and `path_hash_prefixes`, TAP 15 succinct
//! hash bins).
//!
//! A `PATHPATTERN` is a shell glob: `*` matches any run of characters, `?` one character,
//! `[abc]`/`[a-z]`/`[!abc]` one character of (not of) a set, anything else itself; matching
//! is case-sensitive. "A path separator in a path SHOULD NOT be matched by a wildcard": pattern
//! and path are split at `/` and must have the same number of segments, and each segment must
//! match (python-tuf does the same with `fnmatch` per segment).

use sha2::{Digest, Sha256};

/// Whether `target_path` matches the delegation pattern `pattern`.
pub fn path_matches(pattern: &str, target_path: &str) -> bool {
    let pattern_parts: Vec<&str> = pattern.split('/').collect();
    let target_parts: Vec<&str> = target_path.split('/').collect();
    pattern_parts.len() == target_parts.len()
        && pattern_parts.iter().zip(target_parts.iter()).all(|(p, t)| {
            let p: Vec<char> = p.chars().collect();
            let t: Vec<char> = t.chars().collect();
            glob_segment(&p, &t)
        })
}

/// Lowercase hex SHA-256 of the target path, the value `path_hash_prefixes` are prefixes of.
pub fn target_path_hash(target_path: &str) -> String {
    hex::encode(Sha256::digest(target_path.as_bytes()))
}

/// Whether the target path hashes into one of `prefixes`.
pub fn hash_prefix_matches(prefixes: &[String], target_path: &str) -> bool {
    let digest = target_path_hash(target_path);
    prefixes.iter().any(|p| digest.starts_with(p.as_str()))
}

/// Iterative glob match with single-star backtracking (linear in practice, no recursion).
fn glob_segment(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some('?') => Some(p + 1),
            Some('[') => match class_match(pattern, p, text.get(t).copied()) {
                ClassMatch::Matched(next) => Some(next),
                ClassMatch::Unmatched => None,
                ClassMatch::NotAClass => (text.get(t) == Some(&'[')).then_some(p + 1),
            },
            Some(c) => (text.get(t) == Some(c)).then_some(p + 1),
            None => None,
        };
        match step {
            Some(next) => {
                p = next;
                t += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|c| *c == '*'))
}

enum ClassMatch {
    Matched(usize),
    Unmatched,
    NotAClass,
}

/// Match `c` against the class starting at `pattern[start] == '['`, fnmatch rules: a `]`
/// right after `[` or `[!` is literal; an unterminated `[` is a literal `[`.
fn class_match(pattern: &[char], start: usize, c: Option<char>) -> ClassMatch {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&'!');
    if negate {
        i += 1;
    }
    let first = i;
    let mut matched = false;
    loop {
        let Some(&pc) = pattern.get(i) else {
            return ClassMatch::NotAClass;
        };
        if pc == ']' && i > first {
            break;
        }
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|e| *e != ']') {
            let hi = pattern.get(i + 2).copied().unwrap_or(pc);
            if c.is_some_and(|c| pc <= c && c <= hi) {
                matched = true;
            }
            i += 3;
        } else {
            if c == Some(pc) {
                matched = true;
            }
            i += 1;
        }
    }
    if c.is_some() && matched != negate {
        ClassMatch::Matched(i + 1)
    } else {
        ClassMatch::Unmatched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        assert!(path_matches("targets/*.tgz", "targets/foo.tgz"));
        assert!(!path_matches("targets/*.tgz", "targets/foo.txt"));
        assert!(path_matches("foo-version-?.tgz", "foo-version-2.tgz"));
        assert!(path_matches("foo-version-?.tgz", "foo-version-a.tgz"));
        assert!(!path_matches("foo-version-?.tgz", "foo-version-alpha.tgz"));
        assert!(path_matches("*.tgz", "foo.tgz"));
        assert!(!path_matches("*.tgz", "targets/foo.tgz"));
        assert!(path_matches("foo.tgz", "foo.tgz"));
        assert!(!path_matches("foo.tgz", "bar.tgz"));
    }

    #[test]
    fn star_does_not_cross_slash() {
        assert!(path_matches(
            "projects/tribe-a*",
            "projects/tribe-a-web.json"
        ));
        assert!(!path_matches(
            "projects/tribe-a*",
            "projects/tribe-a/x.json"
        ));
        assert!(!path_matches("*", "a/b"));
        assert!(path_matches("*/*", "a/b"));
        assert!(path_matches("releases/*/*", "releases/x/x_v1"));
        assert!(!path_matches("*.md", "releases/README.md"));
    }

    #[test]
    fn case_sensitive_and_classes() {
        assert!(!path_matches("*.md", "README.MD"));
        assert!(path_matches("file[0-9].txt", "file7.txt"));
        assert!(!path_matches("file[!0-9].txt", "file7.txt"));
        assert!(path_matches("file[!0-9].txt", "fileX.txt"));
        assert!(path_matches("a[]]b", "a]b"));
        assert!(path_matches("a[b", "a[b"));
        assert!(path_matches("*a*b*", "xxaxxbxx"));
        assert!(!path_matches("*a*b", "xxaxxbxx"));
        assert!(path_matches("", ""));
        assert!(!path_matches("", "a"));
    }

    #[test]
    fn hash_prefixes() {
        let h = target_path_hash("projects/demo.json");
        assert!(hash_prefix_matches(
            &[h[..2].to_owned()],
            "projects/demo.json"
        ));
        assert!(!hash_prefix_matches(
            &["zz".to_owned()],
            "projects/demo.json"
        ));
    }
}
