//! The project's documents stay true to the code: every relative link and anchor in
//! README.md and docs/*.md resolves, every error code and close code the code defines is
//! in docs/protocol.md, and every setting is in docs/operations.md. Reads the sources as
//! text, so a new `ErrorCode` variant, `Close` code or setting fails this test until it is
//! documented.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// README.md and every docs/*.md.
fn documents() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md file");
    out.extend(docs);
    out
}

/// The lines of a markdown text outside fenced code blocks.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push(line);
        }
    }
    out
}

/// `line` without its inline code spans.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a markdown text's headings make (duplicates get `-1`, `-2`, as on GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of inline links `[text](target)` outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose_lines(text) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let mut depth = 0usize;
            let mut end = None;
            for (i, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = Some(i);
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let Some(end) = end else { break };
            let target = after[..end].split_whitespace().next().unwrap_or("").to_string();
            out.push(target);
            rest = &after[end..];
        }
    }
    out
}

/// `base` joined with a relative `path`, `..` resolved.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for component in base.join(path).components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = read(&doc);
        let dir = doc.parent().expect("a document has a directory");
        for target in link_targets(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() { doc.clone() } else { resolve(dir, path) };
            if !file.exists() {
                broken.push(format!("{}: {target}: no file {}", doc.display(), file.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if file.extension().is_some_and(|x| x == "md") && !anchors(&read(&file)).contains(anchor) {
                broken.push(format!(
                    "{}: {target}: no heading with anchor #{anchor} in {}",
                    doc.display(),
                    file.display()
                ));
            }
        }
    }
    assert!(checked > 10, "found only {checked} relative links: is the link parser broken?");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The body of the first `{ ... }` block that follows `start` in `text`.
fn block_after<'a>(text: &'a str, start: &str) -> Option<&'a str> {
    let at = text.find(start)?;
    let open = at + text[at..].find('{')?;
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// `LimitExceeded` → `limit_exceeded`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The variant names of an enum body (doc comments and attributes skipped).
fn variants(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    for line in body.lines() {
        let line = line.trim();
        if line.starts_with("//") || line.starts_with('#') {
            continue;
        }
        if depth == 0 {
            let name: String = line.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name.chars().next().is_some_and(char::is_uppercase) {
                out.push(name);
            }
        }
        depth += line.matches(['{', '(']).count() as i32 - line.matches(['}', ')']).count() as i32;
    }
    out
}

/// `Self::Variant => "text"` arms (or `ErrorCode::Variant`) in `body`.
fn string_arms(body: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some((lhs, rhs)) = line.split_once("=>") else { continue };
        let rhs = rhs.trim();
        let Some(rest) = rhs.strip_prefix('"') else { continue };
        let Some(end) = rest.find('"') else { continue };
        for pattern in lhs.split('|') {
            let name = pattern.trim().rsplit("::").next().unwrap_or("").trim().to_string();
            if !name.is_empty() {
                out.insert(name, rest[..end].to_string());
            }
        }
    }
    out
}

/// Every wire string of `ErrorCode` in src/protocol.rs.
fn error_codes() -> BTreeSet<String> {
    let source = read(&root().join("src/protocol.rs"));
    let body = block_after(&source, "pub enum ErrorCode").expect("src/protocol.rs defines `pub enum ErrorCode`");
    let impl_at = source.find("impl ErrorCode").unwrap_or(0);
    let arms = block_after(&source[impl_at..], "fn as_str").map(string_arms).unwrap_or_default();
    let mut codes: BTreeSet<String> =
        variants(body).iter().map(|v| arms.get(v).cloned().unwrap_or_else(|| snake_case(v))).collect();
    codes.extend(arms.into_values());
    codes
}

#[test]
fn every_error_code_is_documented_with_its_status() {
    let codes = error_codes();
    assert!(codes.len() >= 15, "found only {codes:?} in ErrorCode: is the parser broken?");
    assert!(codes.contains("invalid_json") && codes.contains("timeout"), "{codes:?}");
    let protocol = read(&root().join("docs/protocol.md"));
    // Codes being added to the code are documented already.
    let expected = codes.iter().cloned().chain(["limit_exceeded".into(), "overloaded".into()]);
    let missing: Vec<String> = expected
        .filter(|code| {
            let row = format!("| `{code}`");
            !protocol.lines().any(|line| {
                line.starts_with(&row)
                    && line.split('|').any(|cell| {
                        let cell = cell.trim();
                        cell.len() == 3 && cell.chars().all(|c| c.is_ascii_digit())
                    })
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "error codes without a row `| `code` | <HTTP status> |` in docs/protocol.md: {missing:?}"
    );
}

/// Every close code the code defines: the arms of `Close::code` in src/ws/mod.rs, and any
/// literal `CloseCode::from(N)` anywhere in src/.
fn close_codes() -> BTreeSet<u16> {
    let source = read(&root().join("src/ws/mod.rs"));
    let mut codes = BTreeSet::new();
    if let Some(body) = block_after(&source, "impl Close").and_then(|b| block_after(b, "fn code")) {
        for line in body.lines() {
            if let Some((_, rhs)) = line.split_once("=>") {
                let digits: String = rhs.trim().chars().take_while(char::is_ascii_digit).collect();
                if let Ok(code) = digits.parse() {
                    codes.insert(code);
                }
            }
        }
    }
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("src/ is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = read(&path);
                for (at, _) in text.match_indices("CloseCode::from(") {
                    let digits: String =
                        text[at + "CloseCode::from(".len()..].chars().take_while(char::is_ascii_digit).collect();
                    if let Ok(code) = digits.parse() {
                        codes.insert(code);
                    }
                }
            }
        }
    }
    codes
}

#[test]
fn every_close_code_is_documented() {
    let codes = close_codes();
    assert!(codes.len() >= 5 && codes.contains(&1013) && codes.contains(&4001), "found only {codes:?}");
    let protocol = read(&root().join("docs/protocol.md"));
    let missing: Vec<u16> =
        codes.into_iter().filter(|code| !protocol.lines().any(|l| l.starts_with(&format!("| {code} |")))).collect();
    assert!(missing.is_empty(), "close codes without a row `| code |` in docs/protocol.md: {missing:?}");
}

/// The keys of volley.example.toml (top-level `key = value` lines).
fn example_keys() -> Vec<String> {
    read(&root().join("volley.example.toml"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(key, _)| key.trim().trim_matches('"').to_string())
        .collect()
}

/// The fields of `pub struct Config` in src/config.rs.
fn config_fields() -> Vec<String> {
    let source = read(&root().join("src/config.rs"));
    let body = block_after(&source, "pub struct Config").expect("src/config.rs defines `pub struct Config`");
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

#[test]
fn every_setting_is_in_the_operations_table() {
    let keys = example_keys();
    let fields = config_fields();
    assert!(keys.len() >= 30 && fields.len() >= 30, "found only {keys:?} and {fields:?}");
    let operations = read(&root().join("docs/operations.md"));
    let missing: BTreeSet<&String> = keys
        .iter()
        .chain(&fields)
        .filter(|key| !operations.lines().any(|l| l.starts_with(&format!("| `{key}` |"))))
        .collect();
    assert!(missing.is_empty(), "settings without a row `| `key` |` in docs/operations.md: {missing:?}");
}
