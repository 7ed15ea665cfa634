//! The daemon's modules (the gateway's included) depend on each other
//! without cycles: data flows one way, API → store → worker → engine →
//! store → delivery, and a newcomer can read a file knowing what it stands
//! on. A `use crate::…`, `super::…` or `self::…` path (in a `use` or
//! written out in code) that names another file's module is an arrow; an
//! arrow back to a module that depends on this one fails the test with the
//! loop it closes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src` (`api/tasks.rs` → `api::tasks`,
/// `api/mod.rs` → `api`, `lib.rs` → the crate root).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code of `source` without comments and string literals (well enough
/// for paths: a `crate::` inside a doc or a message is not an import).
fn code_of(source: &str) -> String {
    let mut code = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        code.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => escaped = false,
                    }
                }
                code.push_str("\"\"");
            }
            _ => code.push(c),
        }
    }
    code
}

/// The paths (as segments) a `use` tree or a written-out path starting at
/// `text` names, e.g. `a::{b::C, d}` → `[a, b, C]`, `[a, d]`.
fn paths_at(text: &str) -> Vec<Vec<String>> {
    fn tree(text: &str, at: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let bytes = text.as_bytes();
        let mut path = prefix.to_vec();
        loop {
            while *at < bytes.len() && bytes[*at].is_ascii_whitespace() {
                *at += 1;
            }
            if *at < bytes.len() && bytes[*at] == b'{' {
                *at += 1;
                loop {
                    tree(text, at, &path, out);
                    while *at < bytes.len() && bytes[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    match bytes.get(*at) {
                        Some(b',') => *at += 1,
                        Some(b'}') => {
                            *at += 1;
                            break;
                        }
                        _ => return,
                    }
                    while *at < bytes.len() && bytes[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    if bytes.get(*at) == Some(&b'}') {
                        *at += 1;
                        break;
                    }
                }
                return;
            }
            let start = *at;
            while *at < bytes.len() && (bytes[*at].is_ascii_alphanumeric() || bytes[*at] == b'_') {
                *at += 1;
            }
            if start == *at {
                if bytes.get(*at) == Some(&b'*') {
                    *at += 1;
                }
                out.push(path);
                return;
            }
            path.push(text[start..*at].to_owned());
            if text[*at..].starts_with("::") {
                *at += 2;
            } else {
                out.push(path);
                // `as NAME` renames it.
                let rest = &text[*at..];
                let trimmed = rest.trim_start();
                if let Some(name) = trimmed.strip_prefix("as ") {
                    let name = name.trim_start();
                    let len = name
                        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(name.len());
                    *at = text.len() - name.len() + len;
                }
                return;
            }
        }
    }
    let mut out = Vec::new();
    tree(text, &mut 0, &[], &mut out);
    out
}

/// The modules `file` (module `me`) names, resolved to the longest known
/// module of each path.
fn dependencies(
    source: &str,
    me: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> BTreeSet<Vec<String>> {
    let code = code_of(source);
    let mut found = BTreeSet::new();
    for keyword in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(keyword) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `$crate::`, `a::super::` or a longer name
            }
            let base: Vec<String> = match keyword {
                "crate::" => Vec::new(),
                "super::" => me[..me.len().saturating_sub(1)].to_vec(),
                _ => me.to_vec(),
            };
            for tail in paths_at(&code[at + keyword.len()..]) {
                let mut full = base.clone();
                full.extend(tail);
                while !full.is_empty() && !modules.contains(&full) {
                    full.pop();
                }
                if !full.is_empty() && full != me && !me.starts_with(&full) {
                    found.insert(full);
                }
            }
        }
    }
    found
}

#[test]
fn the_daemons_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|f| (module_of(&src, f), std::fs::read_to_string(f).unwrap()))
        .filter(|(module, _)| !module.is_empty()) // lib.rs only declares and re-exports
        .collect();
    let modules: BTreeSet<Vec<String>> = sources.keys().cloned().collect();
    let graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = sources
        .iter()
        .map(|(module, source)| (module.clone(), dependencies(source, module, &modules)))
        .collect();

    fn visit(
        module: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) {
        if done.contains(module) {
            return;
        }
        if let Some(start) = path.iter().position(|m| m == module) {
            let names: Vec<String> = path[start..]
                .iter()
                .chain([module])
                .map(|m| m.join("::"))
                .collect();
            panic!("module cycle: {}", names.join(" -> "));
        }
        path.push(module.clone());
        for dep in &graph[module] {
            visit(dep, graph, path, done);
        }
        path.pop();
        done.insert(module.clone());
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }

    // The reader finds what it claims: the API stands on the app, the
    // gateway's phases on the gateway's own modules, nothing on the server.
    let api_tasks = vec!["api".to_owned(), "tasks".to_owned()];
    assert!(
        graph[&api_tasks].contains(&vec!["app".to_owned()]),
        "{graph:?}"
    );
    let server = vec!["server".to_owned()];
    for (module, deps) in &graph {
        assert!(
            !deps.contains(&server),
            "{} depends on the server (start and stop), which nothing should",
            module.join("::")
        );
    }
}

#[test]
fn the_path_reader_reads_use_trees() {
    let paths = paths_at("a::{b::{C, d::E}, f as g, h::*}; x");
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(joined, ["a::b::C", "a::b::d::E", "a::f", "a::h"]);
    assert_eq!(
        code_of("let a = \"crate::x\"; // crate::y\nz"),
        "let a = \"\"; \nz"
    );
}
