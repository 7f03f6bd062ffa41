//! Docs that run: every shell recipe in README.md, docs/operations.md,
//! docs/propagation.md and docs/scripts.md is marked, and the marked ones run here against the
//! built binary, so none can rot.
//!
//! Markers, after the fence's language:
//!
//! - `sh run`: run with `bash -euo pipefail` in the document's directory;
//!   it must succeed.
//! - `sh run-background`: one long-running command (a server, an
//!   authority): started, probed (its first line on stdout), and stopped
//!   when the document is done.
//! - `sh no-run: <reason>`: not run; the reason starts with `cargo`,
//!   `bench`, `fuzz` or `signal` (nothing else may opt out).
//! - `toml file=<path>` (any language): written to that path when reached.
//!
//! Each document runs in a fresh temporary directory holding a copy of
//! `fixtures/examples`, with the debug `netproc` first on `PATH` and
//! `cargo run [--release] -p netproc --` read as `netproc`. The test picks
//! the ports: `6767` and `9464` become free ports, and the documentation
//! addresses `0.0.0.0` and `10.0.0.5` become `127.0.0.1`.
//! `NETPROC_DOCS_SHOW=1` prints each recipe's output.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The documents whose shell recipes are checked and run.
const DOCUMENTS: &[&str] = &[
    "README.md",
    "docs/operations.md",
    "docs/propagation.md",
    "docs/scripts.md",
    "docs/enrollment.md",
    "docs/performance.md",
];
/// Reasons a recipe may be left out.
const NO_RUN_REASONS: &[&str] = &["cargo", "bench", "fuzz", "signal"];
/// How long one `run` block may take.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
enum Marker {
    Run,
    Background,
    NoRun(String),
    File(String),
    /// No marker (a fragment of a file, an example of output, code).
    Unmarked,
}

#[derive(Debug, Clone)]
struct Block {
    line: usize,
    lang: String,
    marker: Marker,
    body: String,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The fenced blocks of a Markdown text, with their markers.
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match open.take() {
                Some(block) => out.push(block),
                None => {
                    let info = info.trim();
                    let (lang, rest) = info.split_once(char::is_whitespace).unwrap_or((info, ""));
                    let rest = rest.trim();
                    let marker = if rest == "run" {
                        Marker::Run
                    } else if rest == "run-background" {
                        Marker::Background
                    } else if let Some(reason) = rest.strip_prefix("no-run:") {
                        Marker::NoRun(reason.trim().to_owned())
                    } else if let Some(path) = rest.strip_prefix("file=") {
                        Marker::File(path.trim().to_owned())
                    } else {
                        Marker::Unmarked
                    };
                    open = Some(Block {
                        line: i + 1,
                        lang: lang.to_owned(),
                        marker,
                        body: String::new(),
                    });
                }
            }
        } else if let Some(block) = &mut open {
            block.body.push_str(line);
            block.body.push('\n');
        }
    }
    out
}

/// What the test changes in a recipe: the command, ports and addresses.
struct Environment {
    ports: [(String, String); 3],
}

impl Environment {
    fn new() -> Environment {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
                .to_string()
        };
        Environment {
            ports: [
                ("6767".into(), free()),
                ("9464".into(), free()),
                ("7443".into(), free()),
            ],
        }
    }

    fn apply(&self, text: &str) -> String {
        let mut s = text
            .replace("cargo run --release -p netproc --", "netproc")
            .replace("cargo run -p netproc --", "netproc")
            .replace("0.0.0.0", "127.0.0.1")
            .replace("10.0.0.5", "127.0.0.1");
        for (from, to) in &self.ports {
            s = s.replace(from.as_str(), to);
        }
        s
    }
}

/// Background processes of one document, stopped when it is done.
struct Background(Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Copies a directory, with the environment's substitutions in its text files.
fn copy_dir(from: &Path, to: &Path, env: &Environment) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target, env);
        } else {
            match std::fs::read_to_string(entry.path()) {
                Ok(text) => std::fs::write(target, env.apply(&text)).unwrap(),
                Err(_) => {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
    }
}

fn shell(dir: &Path, script: &str) -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_netproc")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join(".config"))
        .env("NO_COLOR", "1")
        .env_remove("NETPROC_CONFIG")
        .env_remove("NETPROC_LOG")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs one document's marked blocks in order.
fn run_document(name: &str) {
    let text = std::fs::read_to_string(workspace().join(name)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Environment::new();
    copy_dir(
        &workspace().join("fixtures/examples"),
        &dir.path().join("fixtures/examples"),
        &env,
    );
    let mut background = Background(Vec::new());
    for block in blocks(&text) {
        let at = format!("{name}:{}", block.line);
        match &block.marker {
            Marker::File(path) => {
                let target = dir.path().join(path);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(&target, env.apply(&block.body)).unwrap();
            }
            Marker::Run => {
                let mut child = shell(dir.path(), &env.apply(&block.body))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let started = Instant::now();
                let status = loop {
                    if let Some(status) = child.try_wait().unwrap() {
                        break status;
                    }
                    if started.elapsed() > BLOCK_TIMEOUT {
                        let _ = child.kill();
                        panic!("{at}: still running after {BLOCK_TIMEOUT:?}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let out = child.wait_with_output().unwrap();
                if std::env::var_os("NETPROC_DOCS_SHOW").is_some() {
                    eprintln!(
                        "{at}:\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                assert!(
                    status.success(),
                    "{at}: the recipe failed ({status}):\n{}\n--- stdout\n{}\n--- stderr\n{}",
                    env.apply(&block.body),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Marker::Background => {
                let script = format!("exec {}", env.apply(&block.body).trim());
                let mut child = shell(dir.path(), &script)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                // Ready when it says so: its first line on stdout.
                let mut line = String::new();
                BufReader::new(child.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                assert!(
                    !line.is_empty(),
                    "{at}: the background command ended without a word: {}",
                    child.wait().unwrap()
                );
                background.0.push(child);
            }
            Marker::NoRun(_) | Marker::Unmarked => {}
        }
    }
}

#[test]
fn every_shell_recipe_is_marked_and_no_run_only_for_cargo_bench_fuzz_or_signals() {
    let mut problems = Vec::new();
    for name in DOCUMENTS {
        let text = std::fs::read_to_string(workspace().join(name)).unwrap();
        for block in blocks(&text) {
            if !matches!(block.lang.as_str(), "sh" | "bash" | "shell" | "console") {
                continue;
            }
            match &block.marker {
                Marker::Run | Marker::Background => {}
                Marker::NoRun(reason) if NO_RUN_REASONS.iter().any(|r| reason.starts_with(r)) => {}
                Marker::NoRun(reason) => problems.push(format!(
                    "{name}:{}: no-run for {reason:?}: only {NO_RUN_REASONS:?} may opt out",
                    block.line
                )),
                other => problems.push(format!(
                    "{name}:{}: a shell recipe needs `run`, `run-background` or `no-run: <reason>` (got {other:?})",
                    block.line
                )),
            }
            if block.marker == Marker::Background
                && block
                    .body
                    .lines()
                    .filter(|l| {
                        let l = l.trim();
                        !l.is_empty() && !l.starts_with('#')
                    })
                    .count()
                    != 1
            {
                problems.push(format!(
                    "{name}:{}: run-background holds exactly one command",
                    block.line
                ));
            }
            if block.body.contains("pidof") {
                problems.push(format!(
                    "{name}:{}: signal the process you started (`kill -HUP \"$SERVE_PID\"`), not pidof",
                    block.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_readme_runs() {
    run_document("README.md");
}

#[test]
fn operations_md_runs() {
    run_document("docs/operations.md");
}

#[test]
fn propagation_md_runs() {
    run_document("docs/propagation.md");
}

#[test]
fn enrollment_md_runs() {
    run_document("docs/enrollment.md");
}

#[test]
fn scripts_md_runs() {
    run_document("docs/scripts.md");
}

#[test]
fn markers_are_read_from_the_fence() {
    let text = "a\n```sh run\nnetproc x\n```\n```sh no-run: cargo only\ncargo b\n```\n```toml file=a/b.toml\nk = 1\n```\n```rust\nfn f() {}\n```\n";
    let b = blocks(text);
    assert_eq!(b.len(), 4);
    assert_eq!(
        (b[0].marker.clone(), b[0].line, b[0].body.as_str()),
        (Marker::Run, 2, "netproc x\n")
    );
    assert_eq!(b[1].marker, Marker::NoRun("cargo only".into()));
    assert_eq!(b[2].marker, Marker::File("a/b.toml".into()));
    assert_eq!(b[3].marker, Marker::Unmarked);
    let env = Environment::new();
    let applied = env.apply("cargo run --release -p netproc -- serve 0.0.0.0:6767");
    assert!(
        applied.starts_with("netproc serve 127.0.0.1:") && !applied.ends_with(":6767"),
        "{applied}"
    );
}
