//! The `netproc` command: demo, serve, call, pki, keys, admin, metrics, bench.
//!
//! Exit codes: 0 success, 1 the operation failed (the error's code and
//! message are on stderr), 2 bad usage or configuration.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(cli::Failure::Usage(msg)) => {
            eprintln!("{}", cli::output::error_line(&msg, 2));
            ExitCode::from(2)
        }
        Err(cli::Failure::Failed(msg)) => {
            // An empty message: the command has said why (e.g. `doctor`).
            if !msg.is_empty() {
                eprintln!("{}", cli::output::error_line(&msg, 1));
            }
            ExitCode::FAILURE
        }
    }
}
