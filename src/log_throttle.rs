//! A log-line rate limiter for events a peer or the system can repeat as fast as the loop runs
//! (an accept loop out of file descriptors): the first occurrence is logged, then at most one
//! line per interval, carrying how many were left out since the last one. Sans-I/O: it takes
//! the time and answers whether to log, so it is tested on tokio's paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// Whether, and with what count, to log occurrences of one kind of event.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> LogThrottle {
        LogThrottle {
            interval,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// One occurrence at `now`: `Some(n)` to log it, `n` being the occurrences left out since
    /// the last line; `None` to leave it out (it is counted for the next line).
    pub fn occurred(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_is_logged_then_one_line_per_interval_with_the_count_left_out() {
        let mut throttle = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(throttle.occurred(Instant::now()), Some(0));
        // A burst: every 100 ms (an accept loop's back-off) for just under the interval.
        let mut logged = Vec::new();
        for _ in 0..99 {
            tokio::time::advance(Duration::from_millis(100)).await;
            if let Some(n) = throttle.occurred(Instant::now()) {
                logged.push(n);
            }
        }
        assert!(logged.is_empty(), "{logged:?}");
        // 9.9 s after the first line: still quiet; at 10 s a line with the 99 left out and
        // this one logged.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(throttle.occurred(Instant::now()), Some(99));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(throttle.occurred(Instant::now()), None);
        // After a quiet spell the next one is logged at once, with the one left out before it.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(throttle.occurred(Instant::now()), Some(1));
        assert_eq!(throttle.occurred(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn over_minutes_of_failures_the_lines_are_bounded_by_the_interval() {
        // 2,075 failures in 3.5 minutes, as seen out of file descriptors.
        let mut throttle = LogThrottle::new(Duration::from_secs(10));
        let (mut lines, mut counted) = (0u64, 0u64);
        for _ in 0..2075 {
            if let Some(left_out) = throttle.occurred(Instant::now()) {
                lines += 1;
                counted += 1 + left_out;
            }
            tokio::time::advance(Duration::from_millis(101)).await;
        }
        assert!(lines <= 22, "{lines} lines");
        // Every failure is in a line or in the count of the next one, but for those after the
        // last line.
        assert!(counted <= 2075 && counted > 2075 - 100, "{counted}");
    }
}
