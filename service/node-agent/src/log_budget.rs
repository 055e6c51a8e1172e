//! How much one instance may put into its node's log: guest output and audit lines are admitted per
//! one-second window of the env clock, up to a number of lines and bytes; what is over is counted, never
//! silently lost, and the count is logged when the next window opens or the run ends. Without it a guest could
//! fill the node's disk with `fd_write`, or bury other instances' audit lines under its own denied calls.
//!
//! Guest text is also made safe to log here: one log event per line, control characters escaped, so a guest
//! cannot start a line of its own that looks like another target's (`factum::audit`) or move a terminal's
//! cursor.

use std::time::Duration;

/// Per-instance log limits, per second of the env clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Guest output lines (stdout and stderr together).
    pub output_lines: u32,
    /// Guest output bytes.
    pub output_bytes: usize,
    /// Audit lines about the instance (denied calls, undelivered messages).
    pub audit_lines: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits { output_lines: 100, output_bytes: 64 * 1024, audit_lines: 20 }
    }
}

/// Longest guest output line logged; the rest of a longer line is dropped and counted.
pub const MAX_LINE_BYTES: usize = 4096;

/// One window's admission count for one kind of line.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// When the current window opened (env clock).
    opened: Option<Duration>,
    lines: u32,
    bytes: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
}

/// Lines and bytes dropped since the last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub lines: u64,
    pub bytes: u64,
}

impl Window {
    /// Whether a line of `bytes` fits in the window open at `now`, counting it either way. Returns what was
    /// dropped in earlier windows when this call opened a new one, for the caller to report.
    pub(crate) fn admit(
        &mut self,
        now: Duration,
        bytes: usize,
        max_lines: u32,
        max_bytes: usize,
    ) -> (bool, Option<Dropped>) {
        let mut report = None;
        if self.opened.is_none_or(|opened| now.saturating_sub(opened) >= Duration::from_secs(1)) {
            report = self.take_dropped();
            *self = Window { opened: Some(now), ..Window::default() };
        }
        let fits = self.lines < max_lines && self.bytes.saturating_add(bytes) <= max_bytes;
        if fits {
            self.lines += 1;
            self.bytes += bytes;
        } else {
            self.dropped_lines += 1;
            self.dropped_bytes = self.dropped_bytes.saturating_add(bytes as u64);
        }
        (fits, report)
    }

    /// Counts `bytes` dropped outside any line (the cut-off end of an over-long line).
    pub(crate) fn count_dropped(&mut self, bytes: usize) {
        self.dropped_bytes = self.dropped_bytes.saturating_add(bytes as u64);
    }

    /// What was dropped and not yet reported.
    pub(crate) fn take_dropped(&mut self) -> Option<Dropped> {
        let dropped = Dropped { lines: self.dropped_lines, bytes: self.dropped_bytes };
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
        (dropped.lines > 0 || dropped.bytes > 0).then_some(dropped)
    }
}

/// The lines of one guest write, each safe to log: split on `\n`, at most [`MAX_LINE_BYTES`] of each, invalid
/// UTF-8 replaced, control characters (but tab) escaped; blank lines skipped. The second value is how many
/// bytes were cut from over-long lines.
pub(crate) fn guest_lines(bytes: &[u8]) -> (Vec<String>, usize) {
    let mut cut = 0;
    let lines = bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let kept = line.get(..MAX_LINE_BYTES).unwrap_or(line);
            cut += line.len() - kept.len();
            let text = String::from_utf8_lossy(kept);
            let text = text.trim_end();
            (!text.is_empty()).then(|| escape_controls(text))
        })
        .collect();
    (lines, cut)
}

fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_window_admits_up_to_its_limits_then_counts_and_reports_once() {
        let mut w = Window::default();
        assert_eq!(w.admit(at(0), 10, 2, 100), (true, None));
        assert_eq!(w.admit(at(100), 10, 2, 100), (true, None));
        assert_eq!(w.admit(at(200), 10, 2, 100), (false, None));
        assert_eq!(w.admit(at(300), 500, 2, 100), (false, None));
        // The next window reports what the last one dropped, and admits again.
        assert_eq!(w.admit(at(1_000), 10, 2, 100), (true, Some(Dropped { lines: 2, bytes: 510 })));
        assert_eq!(w.take_dropped(), None);
        // Bytes bound too: one line over the byte limit alone is dropped.
        assert_eq!(w.admit(at(1_100), 91, 10, 100), (false, None));
        assert_eq!(w.take_dropped(), Some(Dropped { lines: 1, bytes: 91 }));
    }

    #[test]
    fn guest_text_cannot_forge_a_log_line() {
        let forged = b"hello\n2026-11-30T00:00:00Z WARN factum::audit: capability call denied\r\x1b[2Kok\n\n";
        let (lines, cut) = guest_lines(forged);
        assert_eq!(
            lines,
            vec![
                "hello".to_string(),
                "2026-11-30T00:00:00Z WARN factum::audit: capability call denied\\r\\u{1b}[2Kok".to_string()
            ]
        );
        assert_eq!(cut, 0);
        let long = vec![b'a'; MAX_LINE_BYTES + 10];
        let (lines, cut) = guest_lines(&long);
        assert_eq!((lines[0].len(), cut), (MAX_LINE_BYTES, 10));
        assert_eq!(guest_lines(b"tab\there\xff").0, vec!["tab\there\u{fffd}".to_string()]);
    }
}
