//! The last lines of one instance's output, kept on its node for `factum logs`: numbered across restarts,
//! bounded in lines and bytes (the oldest go first), read page by page after a sequence number.

use std::collections::VecDeque;

use factum_proto::logs::{LogLine, LogPage, Stream, LOG_BUFFER_BYTES, LOG_BUFFER_LINES, MAX_LOG_PAGE};

/// One instance's buffer.
#[derive(Debug, Default)]
pub(crate) struct LogBuffer {
    lines: VecDeque<LogLine>,
    bytes: usize,
    /// The newest line's number (0: none yet).
    last_seq: u64,
}

impl LogBuffer {
    /// Keeps one line, evicting the oldest while over either bound.
    pub(crate) fn push(&mut self, time_ms: u64, run: u32, stream: Stream, text: String) {
        self.last_seq += 1;
        self.bytes += text.len();
        self.lines.push_back(LogLine { seq: self.last_seq, time_ms, run, stream, text });
        while self.lines.len() > LOG_BUFFER_LINES || self.bytes > LOG_BUFFER_BYTES {
            let Some(old) = self.lines.pop_front() else { break };
            self.bytes -= old.text.len();
        }
    }

    /// Lines after number `after`, oldest first. Asking after a number this buffer never reached (the instance's
    /// node restarted, or the instance moved) starts from the beginning, so a follower is not stuck.
    pub(crate) fn page(&self, after: u64) -> LogPage {
        let after = if after > self.last_seq { 0 } else { after };
        let first_held = self.lines.front().map_or(self.last_seq + 1, |l| l.seq);
        let start = self.lines.partition_point(|l| l.seq <= after);
        let lines: Vec<LogLine> = self.lines.iter().skip(start).take(MAX_LOG_PAGE).cloned().collect();
        let next = lines.last().map_or(after.max(first_held.saturating_sub(1)), |l| l.seq);
        LogPage { evicted: first_held.saturating_sub(after + 1), next, lines }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever is written, the buffer stays within its bounds, and a reader that pages from any point gets
        /// every held line after it exactly once, in order, told how many it missed.
        #[test]
        fn pages_return_each_held_line_once_within_the_bounds(
            lengths in prop::collection::vec(0usize..600, 0..1_500),
            from in 0u64..1_600,
        ) {
            let mut buffer = LogBuffer::default();
            for (i, len) in lengths.iter().enumerate() {
                buffer.push(i as u64, 0, Stream::Stdout, "x".repeat(*len));
            }
            prop_assert!(buffer.lines.len() <= LOG_BUFFER_LINES && buffer.bytes <= LOG_BUFFER_BYTES);
            let total = lengths.len() as u64;
            let mut after = from;
            let mut seen = Vec::new();
            let mut evicted = None;
            loop {
                let page = buffer.page(after);
                evicted.get_or_insert(page.evicted);
                if page.lines.is_empty() {
                    break;
                }
                prop_assert!(page.lines.len() <= MAX_LOG_PAGE);
                seen.extend(page.lines.iter().map(|l| l.seq));
                after = page.next;
            }
            let start = if from > total { 0 } else { from };
            let want: Vec<u64> = buffer.lines.iter().map(|l| l.seq).filter(|s| *s > start).collect();
            prop_assert_eq!(&seen, &want);
            let missed = want.first().map_or(total.saturating_sub(start), |first| first - start - 1);
            prop_assert_eq!(evicted, Some(missed));
        }
    }

    #[test]
    fn an_empty_buffer_answers_an_empty_page() {
        let page = LogBuffer::default().page(0);
        assert_eq!((page.lines.len(), page.next, page.evicted), (0, 0, 0));
    }
}
