//! `cargo xtask`: development tasks for netproc.
//!
//! - `cargo xtask pki [--out DIR] [--force]`: `netproc pki dev`, writing the
//!   dev PKI with its negative fixtures to `fixtures/pki` (or DIR).
//! - `cargo xtask check-modules`: each documented crate's module graph is
//!   the one `docs/ARCHITECTURE.md` lists, with no import cycle.
//! - `cargo xtask fuzz <target> <seconds>`: run one cargo-fuzz target
//!   (installs cargo-fuzz if missing; sets `RUSTC_BOOTSTRAP=1` so its nightly
//!   flags work on the stable toolchain).

mod modules;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "usage:
  cargo xtask pki [--out DIR] [--force]   write the dev PKI (default DIR: fixtures/pki)
  cargo xtask check-modules               check the documented module graphs (docs/ARCHITECTURE.md)
  cargo xtask fuzz <target> <seconds>     run a fuzz target (targets: frame_decoder, message_decode, auth_exchange)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("pki") => pki(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("check-modules") => modules::check(&workspace_root()),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `netproc pki dev`, with `fixtures/pki` as the default directory.
fn pki(args: &[String]) -> Result<(), String> {
    let mut forwarded: Vec<String> = args.to_vec();
    if !args.iter().any(|a| a == "--out") {
        forwarded.push("--out".into());
        forwarded.push(workspace_root().join("fixtures/pki").display().to_string());
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "netproc",
            "--",
            "pki",
            "dev",
        ])
        .args(&forwarded)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("netproc pki dev failed".into())
    }
}

fn fuzz(args: &[String]) -> Result<(), String> {
    let [target, seconds] = args else {
        return Err(USAGE.to_owned());
    };
    let seconds: u64 = seconds
        .parse()
        .map_err(|_| format!("seconds must be a number, got {seconds:?}"))?;
    let have_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_cargo_fuzz {
        eprintln!("cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)");
        let status = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .map_err(|e| format!("running cargo install: {e}"))?;
        if !status.success() {
            return Err("cargo install cargo-fuzz failed".into());
        }
    }
    let status = Command::new("cargo")
        .current_dir(workspace_root().join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={seconds}"),
        ])
        .status()
        .map_err(|e| format!("running cargo fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("fuzz target {target} failed ({status})"))
    }
}
