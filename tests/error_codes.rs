//! Docs and code agree on every error code: each code in an error table of
//! `docs/*.md` is produced somewhere in `src/`, and each code `src/` emits is in
//! such a table. A table counts when its first header cell is `code`; every
//! backticked token of its first column is a code.
//!
//! What `src/` emits is found by the shapes the code uses to make errors (listed
//! in [`EMITTERS`]); each shape must still find something, so a refactor that
//! renames a constructor makes this test fail instead of silently passing.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Codes in the docs' error tables, with the file that documents each.
fn documented() -> BTreeMap<String, String> {
    let token = Regex::new(r"`([A-Za-z][A-Za-z0-9_/.-]*)`").unwrap();
    let mut docs = Vec::new();
    files(&root().join("docs"), "md", &mut docs);
    let mut out = BTreeMap::new();
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.file_name().unwrap().to_string_lossy().into_owned();
        let mut in_table = false;
        let mut header_seen = false;
        for line in text.lines() {
            let line = line.trim();
            if !line.starts_with('|') {
                in_table = false;
                header_seen = false;
                continue;
            }
            let first = line
                .trim_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim();
            if !header_seen {
                header_seen = true;
                in_table = first.eq_ignore_ascii_case("code");
                continue;
            }
            if !in_table || first.starts_with("--") || first.starts_with(":-") {
                continue;
            }
            for c in token.captures_iter(first) {
                out.insert(c[1].to_owned(), name.clone());
            }
        }
    }
    out
}

/// The shapes that make an error code in `src/`: (what, pattern with the code
/// as group 1).
const EMITTERS: &[(&str, &str)] = &[
    (
        "ApiError constructors",
        r#"ApiError::(?:new|bad_request|unauthorized)\(\s*(?:StatusCode::\w+\s*,\s*)?"([^"]+)""#,
    ),
    (
        "share errors",
        r#"share_error\(\s*StatusCode::\w+\s*,\s*"([^"]+)""#,
    ),
    (
        "(status, code) pairs",
        // A tuple, not a call: the parenthesis follows no name.
        r#"(?:^|[^\w!])\(\s*(?:StatusCode|S)::\w+\s*,\s*"([^"]+)"\s*\)"#,
    ),
    (
        "GoTrue and storage API errors",
        r#"(?:GoTrueError|StorageApiError|Self)::new\(\s*(?:StatusCode|S)::\w+\s*,\s*"([^"]+)""#,
    ),
    ("code fields", r#"\bcode:\s*"([^"]+)""#),
    (
        "code constants",
        r#"pub const (?:CODE_\w+|[A-Z_]+): &str = "([A-Za-z_/-]+)";"#,
    ),
    (
        "WebSocket frame errors",
        r#"\b(?:frame_error|FrameError::new|err)\(\s*"([^"]+)""#,
    ),
    (
        "WebSocket error frames",
        r#"error_frames?\(\s*"[^"]+"\s*,\s*"([^"]+)""#,
    ),
];

/// Functions whose match arms are codes: `=> "code"` or `=> ("code", …)`.
const CODE_FUNCTIONS: &[&str] = &["code", "code_for_native", "generic_error"];

/// The body of every `fn name(` in `text`.
fn fn_bodies<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let needle = format!("fn {name}(");
    let mut from = 0;
    while let Some(i) = text[from..].find(&needle) {
        let start = from + i;
        let Some(open) = text[start..].find('{').map(|o| start + o) else {
            break;
        };
        let mut depth = 0usize;
        let mut end = open;
        for (j, ch) in text[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push(&text[open..end]);
        from = end.max(start + needle.len());
    }
    out
}

/// Codes `src/` emits, with where each was found.
fn emitted(sources: &[(String, String)]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (what, pattern) in EMITTERS {
        let re = Regex::new(pattern).unwrap();
        let mut found = 0;
        for (path, text) in sources {
            for c in re.captures_iter(text) {
                found += 1;
                out.entry(c[1].to_owned())
                    .or_insert_with(|| format!("{path} ({what})"));
            }
        }
        assert!(
            found > 0,
            "the pattern for {what} finds nothing in the sources: update EMITTERS"
        );
    }
    let arm = Regex::new(r#"=>\s*\(?\s*"([^"]+)""#).unwrap();
    for name in CODE_FUNCTIONS {
        let mut found = 0;
        for (path, text) in sources {
            for body in fn_bodies(text, name) {
                for c in arm.captures_iter(body) {
                    found += 1;
                    out.entry(c[1].to_owned())
                        .or_insert_with(|| format!("{path} (fn {name})"));
                }
            }
        }
        assert!(
            found > 0,
            "fn {name} has no code arms in the sources: update CODE_FUNCTIONS"
        );
    }
    out
}

fn sources() -> Vec<(String, String)> {
    let mut paths = Vec::new();
    files(&root().join("src"), "rs", &mut paths);
    // The workspace's library crates (the router answers subscriptions); the
    // benchmark answers no client.
    for e in std::fs::read_dir(root().join("crates")).unwrap().flatten() {
        if e.file_name() != "bench" {
            files(&e.path().join("src"), "rs", &mut paths);
        }
    }
    paths
        .into_iter()
        // The settings (whose errors name variables) answer no client.
        .filter(|p| !p.to_string_lossy().ends_with("src/config.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            // Unit tests name codes to check them, not to emit them.
            let text = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            let rel = p
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, text)
        })
        .collect()
}

#[test]
fn every_documented_error_code_is_produced_by_the_code() {
    let docs = documented();
    assert!(docs.len() > 50, "few codes found in docs/: {docs:?}");
    let all_src: String = sources().into_iter().map(|(_, t)| t).collect();
    let missing: Vec<_> = docs
        .iter()
        .filter(|(code, _)| !all_src.contains(&format!("\"{code}\"")))
        .map(|(code, doc)| format!("{code} ({doc})"))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but produced nowhere in the sources: {missing:#?}"
    );
}

#[test]
fn every_error_code_the_code_emits_is_documented() {
    let docs: BTreeSet<String> = documented().into_keys().collect();
    let emitted = emitted(&sources());
    assert!(
        emitted.len() > 50,
        "few codes found in the sources: {emitted:?}"
    );
    let undocumented: Vec<_> = emitted
        .iter()
        .filter(|(code, _)| !docs.contains(*code))
        .map(|(code, at)| format!("{code} ← {at}"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "emitted by src/ but in no error table of docs/: {undocumented:#?}"
    );
}
