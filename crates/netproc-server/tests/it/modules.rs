//! The server crate's module graph is the one `docs/ARCHITECTURE.md`
//! documents (its "rooms and edges" table): no `use crate::…` edge outside
//! it, and no import cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/ARCHITECTURE.md");

type Graph = BTreeMap<String, BTreeSet<String>>;

/// `module -> modules it names as crate::<module>` (children count as their
/// parent; re-exports at the crate root are not edges).
fn actual() -> Graph {
    let mut graph = Graph::new();
    let mut stack = vec![Path::new(SRC).to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(SRC).unwrap();
            let top = rel.components().next().unwrap().as_os_str();
            let module = top.to_string_lossy().trim_end_matches(".rs").to_owned();
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = graph.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let name: String = text[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

/// The table between the `server-modules` markers of ARCHITECTURE.md.
fn documented() -> Graph {
    let doc = std::fs::read_to_string(DOC).unwrap();
    let start = doc
        .find("<!-- server-modules:begin -->")
        .expect("begin marker");
    let end = doc.find("<!-- server-modules:end -->").expect("end marker");
    let mut graph = Graph::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let module = cells[1].trim_matches('`').to_owned();
        let uses = cells[3]
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_owned())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        graph.insert(module, uses);
    }
    graph
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

#[test]
fn the_server_crate_s_module_graph_is_the_documented_one() {
    let actual = actual();
    let documented = documented();
    let modules: BTreeSet<&String> = actual.keys().collect();
    let listed: BTreeSet<&String> = documented.keys().collect();
    assert_eq!(modules, listed, "modules in src/ vs in ARCHITECTURE.md");
    for (module, uses) in &actual {
        let allowed = &documented[module];
        let extra: Vec<_> = uses.difference(allowed).collect();
        assert!(
            extra.is_empty(),
            "{module} uses {extra:?}, not allowed by docs/ARCHITECTURE.md"
        );
    }
    assert_eq!(cycle(&actual), None, "an import cycle among the modules");
    assert_eq!(cycle(&documented), None, "the documented graph has a cycle");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g: Graph = [
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]
    .into();
    assert!(cycle(&g).is_some());
}
