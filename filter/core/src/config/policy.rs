//! Which repositories are encrypted: glob rules over repository names `<project>/<repo...>`,
//! first match wins, a default for the rest. An `encrypt` rule may also accept images encrypted
//! before the push ([`Rule::accept_encrypted`], [`Policy::accepts_encrypted`]); nothing else
//! does.
//!
//! Pattern syntax, segment by segment (segments are separated by `/`):
//! - `**` as a whole segment matches any number of segments, including none, so `demo/**`
//!   matches `demo`, `demo/app` and `demo/a/b`, and `**` alone matches every repository;
//! - `*` inside a segment matches any run of characters within that one segment
//!   (`demo/*` matches `demo/app` but not `demo/a/b`; `demo/app-*` matches `demo/app-prod`);
//! - every other character is literal. Allowed characters are those of repository names
//!   (`a-z`, `0-9`, `.`, `_`, `-`) plus `*` and `/`.
use std::fmt;

/// What the gateway does with pushes to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Layers are encrypted and manifests rewritten.
    Encrypt,
    /// Requests pass unchanged.
    Passthrough,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Encrypt => "encrypt",
            Action::Passthrough => "passthrough",
        })
    }
}

/// Why a repository pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is the empty string.
    #[error("empty repository pattern: write e.g. \"demo/**\" (one project) or \"**\" (every repository)")]
    Empty,
    /// A character that can appear neither in a repository name nor as a wildcard.
    #[error(
        "repository pattern {pattern:?} has invalid character {character:?} at byte {position}: \
         use lowercase a-z, 0-9, '.', '_', '-', '/' and the wildcards '*' and '**'"
    )]
    InvalidCharacter {
        /// The refused pattern.
        pattern: String,
        /// The offending character.
        character: char,
        /// Its byte offset in the pattern.
        position: usize,
    },
    /// A leading, trailing or doubled `/`.
    #[error(
        "repository pattern {pattern:?} has an empty path segment: \
         remove the leading, trailing or doubled '/'"
    )]
    EmptySegment {
        /// The refused pattern.
        pattern: String,
    },
    /// `**` mixed with other characters inside one segment (e.g. `app**` or `***`).
    #[error(
        "repository pattern {pattern:?} has segment {segment:?}: '**' must stand alone between \
         slashes (e.g. \"demo/**\"); use a single '*' to match within a segment"
    )]
    DoubleStarInSegment {
        /// The refused pattern.
        pattern: String,
        /// The segment holding the misplaced `**`.
        segment: String,
    },
}

/// One compiled path segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of segments, including none.
    AnySegments,
    /// A segment with or without `*` wildcards.
    Glob(String),
}

/// A compiled repository-name glob (see the module documentation for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Compiles a pattern, refusing empty patterns, characters that no repository name holds,
    /// empty segments and `**` that does not stand alone in its segment.
    pub fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some((position, character)) = pattern.char_indices().find(|&(_, c)| {
            !(c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, '.' | '_' | '-' | '/' | '*'))
        }) {
            return Err(PatternError::InvalidCharacter {
                pattern: pattern.to_string(),
                character,
                position,
            });
        }
        let mut segments = Vec::new();
        for segment in pattern.split('/') {
            if segment.is_empty() {
                return Err(PatternError::EmptySegment {
                    pattern: pattern.to_string(),
                });
            }
            if segment == "**" {
                // Consecutive `**` segments mean the same as one.
                if segments.last() != Some(&Segment::AnySegments) {
                    segments.push(Segment::AnySegments);
                }
            } else if segment.contains("**") {
                return Err(PatternError::DoubleStarInSegment {
                    pattern: pattern.to_string(),
                    segment: segment.to_string(),
                });
            } else {
                segments.push(Segment::Glob(segment.to_string()));
            }
        }
        Ok(Pattern {
            source: pattern.to_string(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the repository name matches the whole pattern.
    pub fn matches(&self, repository: &str) -> bool {
        let names: Vec<&str> = repository.split('/').collect();
        // reachable[i]: the pattern segments seen so far can consume exactly names[..i].
        let mut reachable: Vec<bool> = std::iter::once(true)
            .chain(names.iter().map(|_| false))
            .collect();
        for segment in &self.segments {
            reachable = match segment {
                Segment::AnySegments => {
                    let mut seen = false;
                    reachable
                        .iter()
                        .map(|&r| {
                            seen |= r;
                            seen
                        })
                        .collect()
                }
                Segment::Glob(glob) => std::iter::once(false)
                    .chain(
                        reachable
                            .iter()
                            .zip(&names)
                            .map(|(&r, name)| r && glob_segment(glob, name)),
                    )
                    .collect(),
            };
        }
        reachable.last().copied().unwrap_or(false)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Pattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pattern::parse(s)
    }
}

/// Matches one name segment against one pattern segment in which `*` matches any run of
/// characters (the segment holds no `/`, so neither does the run).
fn glob_segment(glob: &str, name: &str) -> bool {
    let mut pieces = glob.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else {
        // No `*`: the segment is literal.
        return rest.is_empty();
    };
    // Leftmost matches of the middle pieces leave the most room for the rest.
    for piece in middle {
        let Some(found) = rest.find(piece) else {
            return false;
        };
        rest = rest.get(found + piece.len()..).unwrap_or_default();
    }
    rest.ends_with(last)
}

/// A pattern and what to do with the repositories it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Which repositories the rule covers.
    pub pattern: Pattern,
    /// What to do with them.
    pub action: Action,
    /// For an [`Action::Encrypt`] rule: images whose layers were encrypted before the push (by
    /// the pipeline, with well-formed ocicrypt annotations) are accepted as they are. Off by
    /// default: every layer must be one the gateway encrypted.
    pub accept_encrypted: bool,
}

impl Rule {
    /// A rule that does not accept images encrypted before the push.
    pub fn new(pattern: Pattern, action: Action) -> Self {
        Rule {
            pattern,
            action,
            accept_encrypted: false,
        }
    }
}

/// Ordered rules plus a default: the first rule whose pattern matches decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Rules in the order they are tried.
    pub rules: Vec<Rule>,
    /// Action for repositories no rule matches.
    pub default: Action,
}

impl Policy {
    /// A policy from its rules (tried in order) and default.
    pub fn new(rules: Vec<Rule>, default: Action) -> Self {
        Policy { rules, default }
    }

    /// The action for a repository: that of the first matching rule, else the default.
    pub fn action(&self, repository: &str) -> Action {
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches(repository))
            .map_or(self.default, |rule| rule.action)
    }

    /// Whether an encrypted repository accepts images encrypted before the push: the first
    /// matching rule decides (like [`Policy::action`]), and only an `encrypt` rule with
    /// `accept_encrypted` says yes; the default never does.
    pub fn accepts_encrypted(&self, repository: &str) -> bool {
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches(repository))
            .is_some_and(|rule| rule.action == Action::Encrypt && rule.accept_encrypted)
    }
}

/// The Harbor project of a repository: its first path segment (the whole name when it has
/// no `/`).
pub fn project_of(repository: &str) -> &str {
    repository
        .split_once('/')
        .map_or(repository, |(project, _)| project)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn pattern_table() {
        // (pattern, repository, matches)
        let table: &[(&str, &str, bool)] = &[
            ("demo/app", "demo/app", true),
            ("demo/app", "demo/app2", false),
            ("demo/app", "demo", false),
            ("demo/app", "demo/app/x", false),
            ("demo/*", "demo/app", true),
            ("demo/*", "demo/a/b", false),
            ("demo/*", "demo", false),
            ("demo/*", "other/app", false),
            ("demo/**", "demo/app", true),
            ("demo/**", "demo/a/b", true),
            ("demo/**", "demo/a/b/c/d", true),
            ("demo/**", "demo", true),
            ("demo/**", "demo2/app", false),
            ("demo/**", "dem/app", false),
            ("**", "demo", true),
            ("**", "demo/app", true),
            ("**", "a/b/c", true),
            ("*", "demo", true),
            ("*", "demo/app", false),
            ("*/app", "demo/app", true),
            ("*/app", "other/app", true),
            ("*/app", "demo/x/app", false),
            ("**/app", "demo/x/app", true),
            ("**/app", "app", true),
            ("**/app", "demo/app2", false),
            ("demo/**/app", "demo/app", true),
            ("demo/**/app", "demo/x/y/app", true),
            ("demo/**/app", "demo/x/y/app/z", false),
            ("demo/**/**", "demo/x", true),
            ("demo/app-*", "demo/app-prod", true),
            ("demo/app-*", "demo/app-", true),
            ("demo/app-*", "demo/ap", false),
            ("demo/*-prod", "demo/web-prod", true),
            ("demo/*-prod", "demo/web-prod2", false),
            ("demo/a*b*c", "demo/abc", true),
            ("demo/a*b*c", "demo/axxbyyc", true),
            ("demo/a*b*c", "demo/axxcyyb", false),
            ("demo/a*a", "demo/a", false),
            ("demo/a*a", "demo/aa", true),
            ("team-*/**", "team-a/x/y", true),
            ("team-*/**", "teams/x", false),
            ("proj.v1_x/app", "proj.v1_x/app", true),
        ];
        for &(p, repo, want) in table {
            assert_eq!(pattern(p).matches(repo), want, "pattern {p:?} vs {repo:?}");
        }
    }

    #[test]
    fn bad_patterns() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        for (p, want) in [
            (
                "Demo/**",
                PatternError::InvalidCharacter {
                    pattern: "Demo/**".into(),
                    character: 'D',
                    position: 0,
                },
            ),
            (
                "demo/a b",
                PatternError::InvalidCharacter {
                    pattern: "demo/a b".into(),
                    character: ' ',
                    position: 6,
                },
            ),
            (
                "demo/?",
                PatternError::InvalidCharacter {
                    pattern: "demo/?".into(),
                    character: '?',
                    position: 5,
                },
            ),
            (
                "demo/é",
                PatternError::InvalidCharacter {
                    pattern: "demo/é".into(),
                    character: 'é',
                    position: 5,
                },
            ),
            (
                "/demo",
                PatternError::EmptySegment {
                    pattern: "/demo".into(),
                },
            ),
            (
                "demo/",
                PatternError::EmptySegment {
                    pattern: "demo/".into(),
                },
            ),
            (
                "demo//app",
                PatternError::EmptySegment {
                    pattern: "demo//app".into(),
                },
            ),
            (
                "demo/app**",
                PatternError::DoubleStarInSegment {
                    pattern: "demo/app**".into(),
                    segment: "app**".into(),
                },
            ),
            (
                "***",
                PatternError::DoubleStarInSegment {
                    pattern: "***".into(),
                    segment: "***".into(),
                },
            ),
        ] {
            assert_eq!(Pattern::parse(p), Err(want), "{p:?}");
        }
        let message = Pattern::parse("Demo").unwrap_err().to_string();
        assert!(message.contains("lowercase"), "{message}");
    }

    #[test]
    fn policy_first_match_wins_else_default() {
        let policy = Policy::new(
            vec![
                Rule::new(pattern("demo/public-*"), Action::Passthrough),
                Rule::new(pattern("demo/**"), Action::Encrypt),
                Rule::new(pattern("demo/other"), Action::Passthrough),
            ],
            Action::Passthrough,
        );
        let table = [
            ("demo/public-docs", Action::Passthrough),
            ("demo/app", Action::Encrypt),
            ("demo/other", Action::Encrypt),
            ("demo", Action::Encrypt),
            ("library/alpine", Action::Passthrough),
        ];
        for (repo, want) in table {
            assert_eq!(policy.action(repo), want, "{repo}");
        }
        let strict = Policy::new(
            vec![Rule::new(pattern("open/**"), Action::Passthrough)],
            Action::Encrypt,
        );
        assert_eq!(strict.action("open/x"), Action::Passthrough);
        assert_eq!(strict.action("closed/x"), Action::Encrypt);
        assert_eq!(
            Policy::new(vec![], Action::Encrypt).action("a/b"),
            Action::Encrypt
        );
    }

    #[test]
    fn accept_encrypted_first_match_decides() {
        let opt_in = |p: &str| Rule {
            accept_encrypted: true,
            ..Rule::new(pattern(p), Action::Encrypt)
        };
        let policy = Policy::new(
            vec![
                Rule::new(pattern("demo/strict-*"), Action::Encrypt),
                opt_in("demo/**"),
                Rule::new(pattern("plain/**"), Action::Passthrough),
                // Never reached for demo/…: the first match decides.
                Rule::new(pattern("demo/app"), Action::Encrypt),
            ],
            Action::Encrypt,
        );
        for (repo, want) in [
            ("demo/app", true),
            ("demo/x/y", true),
            ("demo/strict-app", false),
            ("plain/app", false),
            // The default action has no opt-in.
            ("other/app", false),
        ] {
            assert_eq!(policy.accepts_encrypted(repo), want, "{repo}");
        }
        // A passthrough rule never accepts (its repositories are not encrypted at all).
        let odd = Policy::new(
            vec![Rule {
                accept_encrypted: true,
                ..Rule::new(pattern("x/**"), Action::Passthrough)
            }],
            Action::Passthrough,
        );
        assert!(!odd.accepts_encrypted("x/y"));
        assert!(!Policy::new(vec![], Action::Encrypt).accepts_encrypted("a/b"));
    }

    #[test]
    fn project_is_the_first_segment() {
        for (repo, project) in [
            ("demo/app", "demo"),
            ("demo/a/b", "demo"),
            ("alpine", "alpine"),
            ("", ""),
        ] {
            assert_eq!(project_of(repo), project);
        }
    }

    #[test]
    fn action_serde_is_lowercase() {
        assert_eq!(
            serde_json::to_string(&Action::Encrypt).unwrap(),
            "\"encrypt\""
        );
        assert_eq!(
            serde_json::from_str::<Action>("\"passthrough\"").unwrap(),
            Action::Passthrough
        );
        assert!(serde_json::from_str::<Action>("\"Encrypt\"").is_err());
        assert_eq!(Action::Encrypt.to_string(), "encrypt");
    }
}
