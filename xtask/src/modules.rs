//! `cargo xtask check-modules`: each crate's module graph is the one
//! `docs/ARCHITECTURE.md` documents. For every crate with a table between
//! `<!-- <crate>-modules:begin -->` and `<!-- <crate>-modules:end -->`
//! (module | what it holds | may use), each `src/` module may name
//! `crate::<other>` only for the modules its row allows (children count as
//! their parent), every module is listed, and there is no import cycle.
//! Run by `cargo test --workspace` too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every crate of the workspace (each directory under `crates/`), sorted:
/// all of them must have a documented module graph.
fn crates(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("crates");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.path().join("src").is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Names the crate root re-exports, and the module each comes from
/// (`pub use module::{A, B};`), so `crate::A` counts as an edge to it.
fn reexports(src: &Path) -> Result<BTreeMap<String, String>, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let mut rest = lib.as_str();
    while let Some(i) = rest.find("pub use ") {
        rest = &rest[i + "pub use ".len()..];
        let end = rest.find(';').unwrap_or(rest.len());
        let item = &rest[..end];
        if let Some((module, names)) = item.split_once("::") {
            let names = names.trim().trim_start_matches('{').trim_end_matches('}');
            for name in names.split(',') {
                let name = name.trim();
                if !name.is_empty() {
                    out.insert(name.to_owned(), module.trim().to_owned());
                }
            }
        }
    }
    Ok(out)
}

/// The names following each `crate::` in `text`: a path segment, or each
/// name of a `crate::{…}` group.
fn crate_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        } else {
            out.push(
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

/// `module -> modules it names as crate::<module>` (or through a name the
/// crate root re-exports).
fn actual(src: &Path) -> Result<Graph, String> {
    let reexported = reexports(src)?;
    let mut graph = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).map_err(|e| e.to_string())?;
            let Some(top) = rel.components().next() else {
                continue;
            };
            let module = top
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            // Crate roots (a library's lib.rs, a binary's main.rs) only
            // declare and re-export.
            if module == "lib" || module == "main" {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // Doc links and comments are not imports.
            let text: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let uses = graph.entry(module.clone()).or_default();
            for name in crate_names(&text) {
                let target = reexported.get(&name).cloned().unwrap_or(name);
                let is_module = target.chars().all(|c| c.is_ascii_lowercase() || c == '_');
                if !target.is_empty() && is_module && target != module {
                    uses.insert(target);
                }
            }
        }
    }
    // Names that are not modules of this crate (re-exported crates such as
    // the facade's `crate::server`) are not edges between its modules.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|m| modules.contains(m));
    }
    Ok(graph)
}

/// The table of `krate` in ARCHITECTURE.md.
fn documented(doc: &str, krate: &str) -> Result<Graph, String> {
    let begin = format!("<!-- {krate}-modules:begin -->");
    let end = format!("<!-- {krate}-modules:end -->");
    let start = doc
        .find(&begin)
        .ok_or_else(|| format!("no {begin} in ARCHITECTURE.md"))?;
    let stop = doc
        .find(&end)
        .ok_or_else(|| format!("no {end} in ARCHITECTURE.md"))?;
    let mut graph = Graph::new();
    for line in doc[start..stop].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let module = cells
            .get(1)
            .ok_or("a row without cells")?
            .trim_matches('`')
            .to_owned();
        let uses = cells
            .get(3)
            .ok_or_else(|| format!("row {module}: no 'may use' cell"))?
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        graph.insert(module, uses);
    }
    Ok(graph)
}

fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            return Some(path[i..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// Checks every documented crate of the workspace at `root`.
pub(crate) fn check(root: &Path) -> Result<(), String> {
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md"))
        .map_err(|e| format!("docs/ARCHITECTURE.md: {e}"))?;
    for krate in &crates(root)? {
        let actual = actual(&root.join("crates").join(krate).join("src"))?;
        let documented = documented(&doc, krate)?;
        let modules: BTreeSet<&String> = actual.keys().collect();
        let listed: BTreeSet<&String> = documented.keys().collect();
        if modules != listed {
            return Err(format!(
                "{krate}: modules in src/ {modules:?} vs in ARCHITECTURE.md {listed:?}"
            ));
        }
        let wrong: Vec<String> = actual
            .iter()
            .filter_map(|(module, uses)| {
                let extra: Vec<_> = uses.difference(&documented[module]).collect();
                (!extra.is_empty()).then(|| format!("{module} uses {extra:?}"))
            })
            .collect();
        if !wrong.is_empty() {
            return Err(format!(
                "{krate}: not allowed by docs/ARCHITECTURE.md: {}",
                wrong.join("; ")
            ));
        }
        if let Some(c) = cycle(&actual) {
            return Err(format!("{krate}: an import cycle: {}", c.join(" -> ")));
        }
        if let Some(c) = cycle(&documented) {
            return Err(format!(
                "{krate}: the documented graph has a cycle: {}",
                c.join(" -> ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_module_graphs_hold() {
        check(&crate::workspace_root()).unwrap();
    }

    #[test]
    fn the_cycle_finder_finds_cycles() {
        let g: Graph = [
            ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
            ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
        ]
        .into();
        assert!(cycle(&g).is_some());
        let g: Graph = [("a".to_owned(), BTreeSet::from(["b".to_owned()]))].into();
        assert!(cycle(&g).is_none());
    }
}
