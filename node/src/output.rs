//! Everything the `samverkan-node` command line writes to standard output and
//! standard error goes through here; `println!` and `eprintln!` are denied in
//! this crate (`lib.rs`), because they panic when the stream is closed.
//!
//! When the reader of standard output goes away early
//! (`samverkan-node list | head -1`), writing fails with `BrokenPipe` (Rust
//! ignores `SIGPIPE`). [`stdout`] then returns [`OutputClosed`], which the
//! command passes up with `?` like any error, and `main` ends the process
//! quietly with exit status 0 ([`is_output_closed`]): nothing is left to say
//! to anyone, and everything the command did is committed before it prints.
//! Standard error is best effort ([`stderr`]): a closed one loses the line.
//!
//! Why not restore the default `SIGPIPE` action instead: it would need the
//! code base's first `unsafe`, would also kill the long-running `daemon` when a
//! log reader goes away (and override a service manager's choice to ignore
//! `SIGPIPE`), and would end the process without closing the store.

use std::io::Write;

/// Standard output was closed by its reader: the command stops printing and
/// the process exits quietly with status 0.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct OutputClosed;

/// Writes `text` to standard output as is and flushes it. A closed stream is
/// [`OutputClosed`]; any other failure (a full disk behind a redirection) is
/// an error that names standard output.
pub fn stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Writes `text` and a newline to standard output (see [`stdout`]).
pub fn stdout_line(text: &str) -> anyhow::Result<()> {
    stdout(&format!("{text}\n"))
}

/// Writes a line to standard error, best effort: a closed stream loses it.
pub fn stderr(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Whether `error` is (or was caused by) [`OutputClosed`].
pub fn is_output_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<OutputClosed>())
}
