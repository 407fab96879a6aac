//! Progress of long syncs (a node's first sync of many documents): a bar
//! redrawn in place on a terminal, plain lines (at every tenth of the way)
//! when standard error is not a terminal, nothing for short syncs.

use std::io::Write;

use crate::sync::SyncProgress;

/// Syncs of fewer documents than this show no progress.
pub const MIN_DOCUMENTS: usize = 5;

/// Draws [`SyncProgress`] updates to a writer (normally standard error).
pub struct ProgressDisplay<W: Write> {
    out: W,
    terminal: bool,
    last_drawn: Option<(usize, usize)>,
    last_tenth: Option<usize>,
    bar_open: bool,
}

impl<W: Write> std::fmt::Debug for ProgressDisplay<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressDisplay").field("terminal", &self.terminal).finish_non_exhaustive()
    }
}

impl ProgressDisplay<std::io::Stderr> {
    /// A display on standard error, as a bar if it is a terminal.
    pub fn stderr() -> Self {
        use std::io::IsTerminal;
        Self::new(std::io::stderr(), std::io::stderr().is_terminal())
    }
}

impl<W: Write> ProgressDisplay<W> {
    /// A display on `out`; `terminal` chooses the bar over plain lines.
    pub fn new(out: W, terminal: bool) -> Self {
        Self { out, terminal, last_drawn: None, last_tenth: None, bar_open: false }
    }

    /// Shows an update (output errors are ignored: progress is a courtesy).
    pub fn update(&mut self, p: SyncProgress) {
        if p.planned < MIN_DOCUMENTS || self.last_drawn == Some((p.done, p.planned)) {
            return;
        }
        self.last_drawn = Some((p.done, p.planned));
        let mib = (p.bytes_received + p.bytes_sent) as f64 / (1024.0 * 1024.0);
        if self.terminal {
            const WIDTH: usize = 30;
            let filled = p.done * WIDTH / p.planned;
            let _ = write!(
                self.out,
                "\r[{}{}] {}/{} documents, {mib:.1} MiB ",
                "#".repeat(filled),
                "-".repeat(WIDTH - filled),
                p.done,
                p.planned
            );
            self.bar_open = true;
        } else {
            let tenth = p.done * 10 / p.planned;
            if self.last_tenth == Some(tenth) {
                return;
            }
            self.last_tenth = Some(tenth);
            let _ = writeln!(self.out, "synced {}/{} documents ({mib:.1} MiB)", p.done, p.planned);
        }
        let _ = self.out.flush();
    }

    /// Ends the bar's line (call when the sync is over).
    pub fn finish(&mut self) {
        if self.bar_open {
            let _ = writeln!(self.out);
            self.bar_open = false;
        }
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: usize, planned: usize) -> SyncProgress {
        SyncProgress { done, planned, bytes_received: 1 << 20, bytes_sent: 0 }
    }

    #[test]
    fn not_a_terminal_gets_a_plain_line_per_tenth() {
        let mut out = Vec::new();
        let mut display = ProgressDisplay::new(&mut out, false);
        for done in 0..=100 {
            display.update(progress(done, 100));
            display.update(progress(done, 100));
        }
        display.finish();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 11, "{text}");
        assert!(text.starts_with("synced 0/100 documents (1.0 MiB)\n"));
        assert!(text.ends_with("synced 100/100 documents (1.0 MiB)\n"));
        assert!(!text.contains('\r'));
    }

    #[test]
    fn a_terminal_gets_a_bar_redrawn_in_place_and_short_syncs_show_nothing() {
        let mut out = Vec::new();
        let mut display = ProgressDisplay::new(&mut out, true);
        display.update(progress(1, 2));
        display.update(progress(3, 6));
        display.update(progress(6, 6));
        display.finish();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\r').count(), 2, "{text:?}");
        assert!(text.contains("[###############---------------] 3/6 documents"));
        assert!(text.ends_with("6/6 documents, 1.0 MiB \n"));
    }
}
