//! An instance's output as `factum logs` reads it: numbered lines kept on the instance's node in a bounded
//! buffer, read page by page from a sequence number, so a follower asks only for what it has not seen.

use serde::{Deserialize, Serialize};

/// Which of the guest's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// fd 1.
    Stdout,
    /// fd 2.
    Stderr,
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// One line of guest output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Numbers the instance's lines on its node from 1, across restarts.
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch (the agent's env clock) when the guest wrote it.
    pub time_ms: u64,
    /// Which run wrote it: 0 for the first, one more per restart.
    pub run: u32,
    /// The stream.
    pub stream: Stream,
    /// The line, control characters escaped, without its newline.
    pub text: String,
}

impl crate::journal::Entry for LogLine {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn weight(&self) -> usize {
        self.text.len()
    }
}

/// Lines after a sequence number, oldest first, at most [`MAX_LOG_PAGE`].
pub type LogPage = crate::journal::Page<LogLine>;

/// Most lines in one [`LogPage`].
pub const MAX_LOG_PAGE: usize = 500;

/// Most lines an agent keeps per instance.
pub const LOG_BUFFER_LINES: usize = 1_000;

/// Most bytes of text an agent keeps per instance.
pub const LOG_BUFFER_BYTES: usize = 128 * 1024;

/// An empty journal with the bounds an agent keeps per instance.
pub fn journal() -> crate::journal::Journal<LogLine> {
    crate::journal::Journal::new(LOG_BUFFER_LINES, LOG_BUFFER_BYTES)
}
