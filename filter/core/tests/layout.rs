//! The core's layout, read from its sources: the crate is a stack of parts, each importing only
//! the parts before it in [`PARTS`], and no module cycle anywhere inside a part.
//!
//! What counts as an import: every `crate::…`, `super::…` and `self::…` path in library code,
//! `use` trees expanded (`use crate::{a::{b, c}, d}` names `a::b`, `a::c` and `d`), each resolved
//! to the deepest module the sources define. Comments (doc links to a caller are reading hints,
//! not imports), string literals and `#[cfg(test)]` items (a unit test may drive its module
//! through a later part) do not count.
//!
//! What counts as a cycle: a module and the modules under it are one unit to their siblings (a
//! `mod.rs` and its children are one module split into files), so a path from `a::x` to `b::y`
//! is an edge between the siblings `a` and `b`, and the sibling graph under every module must
//! have no cycle.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The crate's top-level modules, in import order: each may import only those before it.
const PARTS: &[&str] = &[
    // The shared vocabulary.
    "error",
    "spec",
    "digest",
    "store",
    // The ocicrypt format and its ciphers.
    "format",
    // The TUF client (spec 1.0), knowing nothing of what its targets hold.
    "tuf",
    // The distribution protocol: requests, uploads, manifests, the ledger.
    "distribution",
    // The plugin configuration and the encryption policy, compiled from JSON.
    "config",
    // Recipient keys: the key service's lookups and the records the workers share.
    "keys",
    // The stream machine and the process-wide planning the host drives.
    "gateway",
];

type ModPath = Vec<String>;

/// A token of Rust source, as much as the layout needs: identifiers and punctuation, with
/// comments, strings and character literals dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

fn lex(src: &str) -> Vec<Tok> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |k: usize| chars.get(k).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime: its name lexes as an identifier, harmless.
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // Raw and byte strings: r"…", r#"…"#, b"…", br#"…"#.
            if matches!(word.as_str(), "r" | "br" | "b") && matches!(at(i), '"' | '#') {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                if at(i) == '"' {
                    let raw = word != "b";
                    i += 1;
                    loop {
                        if i >= chars.len() {
                            break;
                        }
                        if !raw && chars[i] == '\\' {
                            i += 2;
                            continue;
                        }
                        if chars[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                            i += 1 + hashes;
                            break;
                        }
                        i += 1;
                    }
                    continue;
                }
            }
            out.push(Tok::Ident(word));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Tok::PathSep);
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(Tok::Punct(c));
            }
            i += 1;
        }
    }
    out
}

/// Drops every item marked `#[cfg(test)]`: the attribute, the rest of the item's head, and its
/// body or its `;`.
fn drop_test_items(toks: Vec<Tok>) -> Vec<Tok> {
    let cfg_test: Vec<Tok> = lex("#[cfg(test)]");
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i..].starts_with(&cfg_test) {
            i += cfg_test.len();
            while i < toks.len() && !matches!(toks[i], Tok::Punct('{' | ';')) {
                i += 1;
            }
            if toks.get(i) == Some(&Tok::Punct('{')) {
                let mut depth = 0;
                while i < toks.len() {
                    match toks[i] {
                        Tok::Punct('{') => depth += 1,
                        Tok::Punct('}') => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            } else {
                i += 1;
            }
        } else {
            out.push(toks[i].clone());
            i += 1;
        }
    }
    out
}

/// Every path starting at `crate`, `super` or `self`, with `use` trees expanded; each as its
/// segments, the leading keyword included.
fn paths(toks: &[Tok]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..toks.len() {
        let Tok::Ident(word) = &toks[i] else { continue };
        let starts = matches!(word.as_str(), "crate" | "super" | "self")
            && toks.get(i + 1) == Some(&Tok::PathSep)
            && (i == 0 || toks[i - 1] != Tok::PathSep);
        if starts {
            tree(toks, i, Vec::new(), &mut out);
        }
    }
    out
}

/// Reads one path or `use` tree from `toks[i]`, prefixed by `prefix`; returns where it ends.
fn tree(toks: &[Tok], mut i: usize, mut prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    loop {
        match toks.get(i) {
            Some(Tok::Ident(word)) => {
                prefix.push(word.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::PathSep) {
                    i += 1;
                    continue;
                }
                out.push(prefix);
                return i;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        None => return i,
                        Some(Tok::Punct('}')) => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        Some(_) => {
                            let next = tree(toks, i, prefix.clone(), out);
                            // A token the tree cannot read: skip it rather than loop.
                            i = next.max(i + 1);
                        }
                    }
                }
            }
            _ => {
                out.push(prefix);
                return i;
            }
        }
    }
}

/// The module a path names: the deepest module of `modules` its segments lead to, read from
/// module `from`.
fn resolve(modules: &BTreeSet<ModPath>, from: &ModPath, path: &[String]) -> Option<ModPath> {
    let mut at: ModPath = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("self") => from.clone(),
        Some("super") => from[..from.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    let mut rest = path[1..].iter().peekable();
    while let Some(seg) = rest.peek() {
        match seg.as_str() {
            "super" => {
                at.pop();
            }
            "self" => {}
            _ => break,
        }
        rest.next();
    }
    let full: Vec<String> = at.into_iter().chain(rest.cloned()).collect();
    (0..=full.len())
        .rev()
        .map(|k| full[..k].to_vec())
        .find(|m| modules.contains(m))
}

/// The module a source file defines: `a/b.rs` and `a/b/mod.rs` are `a::b`, `lib.rs` the root.
fn module_of(relative: &Path) -> ModPath {
    let mut segs: ModPath = relative
        .with_extension("")
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if matches!(segs.last().map(String::as_str), Some("mod" | "lib")) {
        segs.pop();
    }
    segs
}

fn sources(dir: &Path, root: &Path, out: &mut BTreeMap<ModPath, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).unwrap();
            out.insert(module_of(relative), std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Edges between siblings: (their parent, importer, imported) → the module paths that import.
type Edges = BTreeMap<(ModPath, String, String), BTreeSet<String>>;

fn sibling_edges(files: &BTreeMap<ModPath, String>) -> Edges {
    let modules: BTreeSet<ModPath> = files.keys().cloned().collect();
    let mut edges = Edges::new();
    for (from, src) in files {
        for path in paths(&drop_test_items(lex(src))) {
            let Some(to) = resolve(&modules, from, &path) else {
                continue;
            };
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // a module and what is under it are one unit
            }
            edges
                .entry((
                    from[..common].to_vec(),
                    from[common].clone(),
                    to[common].clone(),
                ))
                .or_default()
                .insert(format!("{} -> {}", from.join("::"), to.join("::")));
        }
    }
    edges
}

/// The cycles among the siblings under each module (Tarjan's strongly connected components of
/// more than one sibling), each with the imports that close it.
fn cycles(edges: &Edges) -> Vec<String> {
    let mut levels: BTreeMap<&ModPath, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (parent, a, b) in edges.keys() {
        levels
            .entry(parent)
            .or_default()
            .entry(a.as_str())
            .or_default()
            .insert(b.as_str());
    }
    let mut found = Vec::new();
    for (parent, graph) in levels {
        for component in strongly_connected(&graph) {
            let mut why = Vec::new();
            for a in &component {
                for b in &component {
                    let key = (parent.clone(), (*a).to_string(), (*b).to_string());
                    if let Some(imports) = edges.get(&key) {
                        why.extend(imports.iter().cloned());
                    }
                }
            }
            found.push(format!(
                "cycle under `{}`: {} ({})",
                if parent.is_empty() {
                    "crate".to_string()
                } else {
                    parent.join("::")
                },
                component.join(", "),
                why.join("; ")
            ));
        }
    }
    found
}

fn strongly_connected<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    struct Tarjan<'g, 'a> {
        graph: &'g BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'_, 'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for &w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort_unstable();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(a, bs)| std::iter::once(*a).chain(bs.iter().copied()))
        .collect();
    for v in nodes {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

/// Imports of a later part by an earlier one, and top-level modules in no part.
fn layering(files: &BTreeMap<ModPath, String>, edges: &Edges, parts: &[&str]) -> Vec<String> {
    let rank = |m: &str| parts.iter().position(|p| *p == m);
    let mut found: Vec<String> = files
        .keys()
        .filter_map(|m| m.first())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|m| rank(m).is_none())
        .map(|m| format!("`{m}` belongs to no part: add it to PARTS, or move it into a part"))
        .collect();
    for ((parent, a, b), imports) in edges {
        if !parent.is_empty() {
            continue;
        }
        if let (Some(ra), Some(rb)) = (rank(a), rank(b)) {
            if rb >= ra {
                found.push(format!(
                    "part `{a}` imports `{b}`, which comes after it: {}",
                    imports.iter().cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        }
    }
    found
}

fn core_sources() -> BTreeMap<ModPath, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    sources(&root, &root, &mut files);
    files
}

#[test]
fn parts_import_only_the_parts_before_them() {
    let files = core_sources();
    let problems = layering(&files, &sibling_edges(&files), PARTS);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_module_cycle_anywhere() {
    let files = core_sources();
    let problems = cycles(&sibling_edges(&files));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The reader on a crate made up here: what it must see and what it must not.
#[test]
fn the_reader_sees_imports_and_nothing_else() {
    let file = |path: &str, src: &str| (module_of(Path::new(path)), src.to_string());
    let files: BTreeMap<ModPath, String> = [
        file("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
        file(
            "a.rs",
            r##"
            use crate::{b::{self, X}, c};
            // crate::d in a comment
            /// [`crate::d`] in a doc link
            const S: &str = "crate::d::Y";
            const R: &str = r#"crate::d"#;
            const Q: char = '{';
            #[cfg(test)]
            mod tests { use crate::d::Z; }
            "##,
        ),
        file("b/mod.rs", "mod inner; pub use inner::X;"),
        file("b/inner.rs", "use super::super::c::Y; pub struct X;"),
        file("c.rs", "fn f() -> u8 { $crate::b::X; 0 }"),
        file("d.rs", ""),
    ]
    .into_iter()
    .collect();
    let edges = sibling_edges(&files);
    let pairs: BTreeSet<(String, String)> = edges
        .keys()
        .map(|(_, a, b)| (a.clone(), b.clone()))
        .collect();
    let expected = [("a", "b"), ("a", "c"), ("b", "c"), ("c", "b")]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .into_iter()
        .collect();
    assert_eq!(pairs, expected);

    let cycles = cycles(&edges);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("cycle under `crate`: b, c ("),
        "{cycles:?}"
    );
    assert!(cycles[0].contains("b::inner -> c"), "{cycles:?}");

    let problems = layering(&files, &edges, &["d", "c", "b"]);
    assert_eq!(
        problems,
        [
            "`a` belongs to no part: add it to PARTS, or move it into a part",
            "part `c` imports `b`, which comes after it: c -> b",
        ]
    );
}
