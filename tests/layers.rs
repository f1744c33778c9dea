//! The module tree is the architecture: every `crate::` path in `src/`
//! points to a lower layer (the table below, the same as the codemap in
//! `src/lib.rs`), a source or sink never reaches into another one, and the
//! codemap names every module there is. An edge not allowed here fails this
//! test, so the structure cannot erode quietly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layer of each top-level module, low to high.
const LAYERS: &[(&str, u32)] = &[
    ("record", 0),
    ("clock", 0),
    ("hash", 0),
    ("backoff", 0),
    ("problems", 0),
    ("logging", 0),
    ("systemd", 0),
    ("http_client", 0),
    ("http_server", 0),
    ("sketch", 1),
    ("state_dir", 1),
    ("wire", 2),
    ("outbox", 2),
    ("runtime", 3),
    ("aws", 3),
    ("sources", 4),
    ("sinks", 4),
    ("upstream", 5),
    ("config", 6),
    ("status", 7),
    ("agent", 8),
    ("cli", 9),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module `{module}` is not in the layer table"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `sinks/csv.rs` → ("sinks", Some("csv")); `agent.rs` → ("agent", None).
fn unit_of(rel: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    let top = parts[0].to_owned();
    let sub = parts.get(1).filter(|s| **s != "mod").map(|s| s.to_string());
    (top, sub)
}

/// Every `crate::a::b` in the non-test code of `text`: (a, b).
fn crate_paths(text: &str) -> Vec<(String, Option<String>)> {
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        };
        let a = ident(rest);
        let after = &rest[a.len()..];
        let b = after
            .strip_prefix("::")
            .map(ident)
            .filter(|b| !b.is_empty());
        if !a.is_empty() {
            out.push((a, b));
        }
    }
    // `use crate::{a, b::c}` groups.
    let mut rest = code;
    while let Some(i) = rest.find("use crate::{") {
        rest = &rest[i + "use crate::{".len()..];
        let group = &rest[..rest.find("};").unwrap_or(0)];
        for item in group.split(',') {
            let item = item.trim();
            let mut p = item.split("::");
            let a = p
                .next()
                .unwrap_or("")
                .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
            if !a.is_empty() && a != "self" {
                out.push((a.to_owned(), p.next().map(str::to_owned)));
            }
        }
    }
    out
}

#[test]
fn layers_point_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let submodules = |top: &str| -> BTreeSet<String> {
        let mut s = BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(src.join(top)) {
            for e in rd.flatten() {
                let name = e
                    .file_name()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_owned();
                if name != "mod" && name != "tests" {
                    s.insert(name);
                }
            }
        }
        s
    };
    let mut wrong = Vec::new();
    let mut edges = 0;
    for f in &files {
        let rel = f
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        if rel == "lib.rs"
            || rel == "main.rs"
            || rel.ends_with("/tests.rs")
            || rel.contains("/tests/")
        {
            continue;
        }
        let (top, sub) = unit_of(&rel);
        let text = std::fs::read_to_string(f).expect("read");
        for (a, b) in crate_paths(&text) {
            if a == top {
                // Inside one module: a component may use its registry, never
                // a sibling component.
                let component = |m: &str| matches!(m, "sources" | "sinks");
                if component(&top)
                    && let (Some(mine), Some(theirs)) = (&sub, &b)
                    && mine != theirs
                    && submodules(&top).contains(theirs)
                {
                    wrong.push(format!(
                        "{rel}: {top}::{mine} uses {top}::{theirs} (a sibling component)"
                    ));
                }
                continue;
            }
            edges += 1;
            if layer(&a) >= layer(&top) {
                wrong.push(format!(
                    "{rel}: {top} (layer {}) uses crate::{a} (layer {})",
                    layer(&top),
                    layer(&a)
                ));
            }
        }
    }
    assert!(
        edges > 50,
        "the scan found only {edges} edges: it is not reading the code"
    );
    assert!(
        wrong.is_empty(),
        "edges that do not point down:\n{}",
        wrong.join("\n")
    );
}

/// A planted upward edge is caught (the test above can fail).
#[test]
fn an_upward_edge_is_found() {
    let paths = crate_paths(
        "use crate::{agent, sinks::csv};\nfn f() { crate::cli::main(); }\n#[cfg(test)]\nuse crate::config;",
    );
    assert_eq!(
        paths,
        vec![
            ("cli".to_owned(), Some("main".to_owned())),
            ("agent".to_owned(), None),
            ("sinks".to_owned(), Some("csv".to_owned())),
        ]
    );
    assert!(layer("cli") > layer("record"));
}

#[test]
fn the_codemap_names_every_module_and_only_those() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_owned())
        .collect();
    let mut on_disk = BTreeSet::new();
    for e in std::fs::read_dir(root.join("src")).expect("src").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name == "lib.rs" || name == "main.rs" {
            continue;
        }
        on_disk.insert(name.trim_end_matches(".rs").to_owned());
    }
    assert_eq!(declared, on_disk, "src/ and the modules lib.rs declares");
    let table: BTreeSet<String> = LAYERS.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(declared, table, "the layer table and the modules");
    let codemap: String = lib
        .lines()
        .filter(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    for m in &declared {
        assert!(
            codemap.contains(&format!("[`{m}`]")),
            "the codemap does not name `{m}`"
        );
    }
}
