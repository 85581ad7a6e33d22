//! How much one plugin may write to the gateway's log: a token bucket
//! refilled at `plugins.log_lines_per_second` and holding one second's
//! worth, shared by every instance of the plugin. Lines over the rate are
//! neither formatted nor written: they are counted
//! (`sessiongate_plugin_log_dropped_total{plugin}`) and summarized in at
//! most one warning per plugin per second.
//!
//! The clock is a parameter (`now`), so the bucket is tested with made-up
//! instants; the host passes `Instant::now()`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// One line's worth of credit. Credit is kept in billionths of a line so
/// that refilling is exact integer arithmetic: `elapsed_ns × rate`.
const LINE: u64 = 1_000_000_000;

/// The shortest time between two summaries of dropped lines.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Write,
    Drop,
    /// Drop it, and say that this many lines (it included) were dropped
    /// since the last summary.
    DropAndReport(u64),
}

struct Bucket {
    credit: u64,
    refilled_at: Instant,
    reported_at: Option<Instant>,
}

pub(crate) struct LogRate {
    per_second: u64,
    bucket: Mutex<Bucket>,
    /// Dropped since the last summary; read without the lock after each
    /// call, so a plugin that does not flood costs one atomic load.
    unreported: AtomicU64,
    dropped: Counter,
}

impl LogRate {
    /// A full bucket at `now`.
    pub(crate) fn new(per_second: u32, dropped: Counter, now: Instant) -> LogRate {
        let per_second = u64::from(per_second.max(1));
        LogRate {
            per_second,
            bucket: Mutex::new(Bucket {
                credit: per_second * LINE,
                refilled_at: now,
                reported_at: None,
            }),
            unreported: AtomicU64::new(0),
            dropped,
        }
    }

    /// Spends one line of credit if there is one.
    pub(crate) fn admit(&self, now: Instant) -> Admit {
        let mut b = self.bucket.lock().expect("log rate lock");
        // Past one second the bucket is full anyway; the cap keeps the
        // product within u64 (u32::MAX lines a second × 10⁹).
        let elapsed = now
            .saturating_duration_since(b.refilled_at)
            .min(Duration::from_secs(1))
            .as_nanos() as u64;
        b.credit = (b.credit + elapsed * self.per_second).min(self.per_second * LINE);
        if now > b.refilled_at {
            b.refilled_at = now;
        }
        if b.credit >= LINE {
            b.credit -= LINE;
            return Admit::Write;
        }
        self.dropped.inc();
        self.unreported.fetch_add(1, Ordering::Relaxed);
        match Self::report_due(&mut b, now) {
            true => Admit::DropAndReport(self.unreported.swap(0, Ordering::Relaxed)),
            false => Admit::Drop,
        }
    }

    /// Lines dropped since the last summary, if there are any and a
    /// summary is due at `now` (for the end of a call: a flood that
    /// stopped is still reported).
    pub(crate) fn due_report(&self, now: Instant) -> Option<u64> {
        if self.unreported.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut b = self.bucket.lock().expect("log rate lock");
        if !Self::report_due(&mut b, now) {
            return None;
        }
        Some(self.unreported.swap(0, Ordering::Relaxed)).filter(|n| *n > 0)
    }

    /// Whether a summary may be written at `now`; if so, it counts as
    /// written.
    fn report_due(b: &mut Bucket, now: Instant) -> bool {
        if b.reported_at
            .is_some_and(|at| now.saturating_duration_since(at) < REPORT_EVERY)
        {
            return false;
        }
        b.reported_at = Some(now);
        true
    }

    /// Whether any dropped line waits for a summary.
    pub(crate) fn has_unreported(&self) -> bool {
        self.unreported.load(Ordering::Relaxed) > 0
    }
}

/// The summary line.
pub(crate) fn report(plugin: &str, dropped: u64) {
    tracing::warn!(
        plugin,
        dropped,
        "plugin {plugin} dropped {dropped} log lines (over plugins.log_lines_per_second)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn holds_one_seconds_worth_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let counter = Counter::default();
        let rate = LogRate::new(10, counter.clone(), t0);
        // A full bucket: ten lines at once, then nothing.
        for i in 0..10 {
            assert_eq!(rate.admit(t0), Admit::Write, "line {i}");
        }
        // The first drop is summarized at once (nothing was reported yet).
        assert_eq!(rate.admit(t0), Admit::DropAndReport(1));
        assert_eq!(rate.admit(t0), Admit::Drop);
        assert_eq!(rate.admit(t0 + ms(50)), Admit::Drop);
        // 100 ms later: one line's credit.
        assert_eq!(rate.admit(t0 + ms(100)), Admit::Write);
        assert_eq!(rate.admit(t0 + ms(100)), Admit::Drop);
        assert_eq!(counter.get(), 4);
        // Within the second, no summary; at its end, one for the three
        // dropped since.
        assert_eq!(rate.due_report(t0 + ms(999)), None);
        assert_eq!(rate.due_report(t0 + ms(1000)), Some(3));
        assert_eq!(
            rate.due_report(t0 + ms(5000)),
            None,
            "nothing left to report"
        );
        // A long pause refills to one second's worth, never more.
        let later = t0 + Duration::from_secs(3600);
        for i in 0..10 {
            assert_eq!(rate.admit(later), Admit::Write, "line {i} after the pause");
        }
        assert_eq!(rate.admit(later), Admit::DropAndReport(1));
        assert_eq!(counter.get(), 5);
    }

    #[test]
    fn a_steady_flood_gets_the_rate_and_one_summary_a_second() {
        let t0 = Instant::now();
        let counter = Counter::default();
        let rate = LogRate::new(100, counter.clone(), t0);
        let (mut written, mut summaries, mut reported) = (0u64, 0u64, 0u64);
        // 10 s of a line every 100 µs (10,000 lines a second).
        for i in 0..100_000u64 {
            match rate.admit(t0 + Duration::from_micros(100 * i)) {
                Admit::Write => written += 1,
                Admit::Drop => {}
                Admit::DropAndReport(n) => {
                    summaries += 1;
                    reported += n;
                }
            }
        }
        reported += rate.due_report(t0 + Duration::from_secs(11)).unwrap_or(0);
        // One second's worth at the start, then the rate.
        assert!((1000..=1101).contains(&written), "{written}");
        assert!((10..=11).contains(&summaries), "{summaries}");
        assert_eq!(counter.get(), 100_000 - written);
        assert_eq!(reported, counter.get(), "every drop is summarized once");
    }

    #[test]
    fn the_largest_rate_does_not_overflow() {
        let t0 = Instant::now();
        let rate = LogRate::new(u32::MAX, Counter::default(), t0);
        assert_eq!(rate.admit(t0 + Duration::from_secs(10)), Admit::Write);
    }
}
