//! The house rules that the compiler does not check, checked over `src/` (as rust-analyzer's
//! tidy test does): every module file opens with a `//!` line saying what it is for, and a
//! module imports only modules of lower layers (ARCHITECTURE.md, "Layers"), so that no
//! import circle can come back; no file of `src/` or `tests/` grows past [`LONG`] lines
//! without saying at its top why it is long; and the node agent starts processes only through
//! `node::pages`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom up. A module may use the crate root (`crate::error_chain`, …) and the
/// modules of strictly lower layers; within a layer, none uses another.
const LAYERS: &[&[&str]] = &[
    &["digest", "utc", "datadir"],
    &["model"],
    &["config"],
    &["archive", "store"],
    &["node", "registry"],
    &["token", "audit"],
    &["metrics", "webhooks", "backup", "refusals"],
    &["artifacts", "curation", "ingest"],
    &["releases"],
    &["deploy"],
    &["server", "client"],
    &["cli"],
];

/// Past this many lines a file says "Long on purpose: …" in its opening `//!` lines.
const LONG: usize = 500;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/registry/tokens.rs` → `registry`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a file names through `crate::` in code (comments left out): both
/// `crate::x::…` and `crate::{x, y::…}`.
fn crate_uses(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let preceded = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue; // `$crate::`, `other_crate::`
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    used.insert(ident(item.trim()));
                }
            } else {
                used.insert(ident(rest));
            }
        }
    }
    used.retain(|name| !name.is_empty());
    used
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

#[test]
fn every_module_says_what_it_is_for_and_imports_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 50, "read {} files under {}", files.len(), src.display());

    let mut problems = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&src).unwrap().display().to_string();
        if !text.trim_start().starts_with("//!") {
            problems.push(format!("src/{shown}: does not open with a `//!` line saying what it is for"));
        }
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            problems.push(format!("src/{shown}: module `{module}` is in no layer of tests/it/tidy.rs"));
            continue;
        };
        for used in crate_uses(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(layer) if layer < own => {}
                Some(_) => problems
                    .push(format!("src/{shown}: `{module}` uses `crate::{used}`, which is not in a layer below it")),
                // The crate root's own items (`crate::error_chain`, `crate::crash_point`).
                None if !src.join(format!("{used}.rs")).exists() && !src.join(&used).is_dir() => {}
                None => problems.push(format!("src/{shown}: module `{used}` is in no layer of tests/it/tidy.rs")),
            }
        }
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn a_file_past_the_length_limit_says_why_at_its_top() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    files.sort();
    let long: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let text = fs::read_to_string(file).unwrap();
            let lines = text.lines().count();
            let header: String = text.lines().take_while(|l| l.starts_with("//!")).collect();
            (lines > LONG && !header.contains("Long on purpose"))
                .then(|| format!("{}: {lines} lines", file.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(long.is_empty(), "split these, or say at the top why they are long:\n{}", long.join("\n"));
}

/// The node agent runs with transparent huge pages off (`src/node/pages.rs`), a setting its
/// children would keep for good (a PM2 daemon started by a hook): it starts processes only
/// through that module, which gives them the setting the agent was started with.
const STARTS: &[&str] = &[
    ".spawn()",
    ".output()",
    ".status()",
    ".exec()",
    "Command::spawn",
    "Command::output",
    "Command::status",
    "::exec(",
];

#[test]
fn the_node_agent_starts_processes_only_through_its_pages_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/node"), &mut files);
    files.sort();
    let starting: Vec<String> = files
        .iter()
        .filter(|file| !file.ends_with("pages.rs") && !file.to_string_lossy().ends_with("tests.rs"))
        .flat_map(|file| {
            let text = fs::read_to_string(file).unwrap();
            let lines: Vec<(usize, String)> = text
                .lines()
                .enumerate()
                .filter(|(_, line)| {
                    // A comment left out (`//` at the start, or after code and a space).
                    let code = if line.trim_start().starts_with("//") { "" } else { line.split(" //").next().unwrap() };
                    // reqwest's answers have a status() too: only theirs, by name, let through.
                    let code = code.replace("response.status()", "").replace("answer.status()", "");
                    STARTS.iter().any(|call| code.contains(call))
                })
                .map(|(n, line)| (n + 1, line.trim().to_owned()))
                .collect();
            lines
                .into_iter()
                .map(move |(n, line)| format!("{}:{n}: {line}", file.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(starting.is_empty(), "start these through node::pages (spawn, output):\n{}", starting.join("\n"));
}

#[test]
fn the_import_reader_sees_paths_and_groups_and_skips_comments() {
    let text = "use crate::registry::{Registry, RegistryError};\n\
                use crate::{digest::Digest, utc};\n\
                // crate::server is only mentioned here\n\
                let x = $crate::nothing; let y = crate::store::Store::open();\n";
    let found: Vec<String> = crate_uses(text).into_iter().collect();
    assert_eq!(found, ["digest", "registry", "store", "utc"]);
}
