//! `samverkan-node`: parses flags, sets up logging and runs the command.

// Output goes through `samverkan_node::output`, which survives a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use samverkan_node::output;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAMVERKAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A closed standard error loses log lines; it must not panic (the default reports with `eprintln!`).
        .log_internal_errors(false)
        .init();
    let cli = samverkan_node::cli::Cli::parse();
    match samverkan_node::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `samverkan-node list | head -1`: the reader has what it wanted.
        Err(e) if output::is_output_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            output::stderr(&format!("error: {e:#}"));
            std::process::ExitCode::from(samverkan_node::cli::exit_code(&e))
        }
    }
}
