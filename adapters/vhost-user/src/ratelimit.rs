//! Rate limits for log lines that a front-end or a guest can cause.
//!
//! A hostile front-end can repeat a bad request, and a guest can break a ring, as often as it
//! likes; each must not turn into a log line per event (a ring re-polled every millisecond was
//! about 900 lines a second, 11 GB a day). Every such line goes through [`limited!`](crate::limited):
//! each call site may log [`BURST`] lines per [`WINDOW`], and the first line after a quiet
//! window says how many were suppressed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The `log` crate, for [`limited!`](crate::limited) in crates that do not depend on it.
#[doc(hidden)]
pub use log as __log;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The limiter of one call site (a `static` made by [`limited!`](crate::limited)).
#[derive(Debug)]
pub struct RateLimit {
    /// Start of the current window, in milliseconds since the process's first limited line.
    window: AtomicU64,
    /// Lines logged in the current window.
    count: AtomicU32,
    /// Lines suppressed since the last one logged.
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

impl RateLimit {
    /// A limiter with nothing logged yet.
    pub const fn new() -> RateLimit {
        RateLimit { window: AtomicU64::new(0), count: AtomicU32::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` if a line may be logged now, `n` being the lines suppressed before it;
    /// `None` if this one is suppressed (and counted).
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let window = self.window.load(Ordering::Relaxed);
        if now.saturating_sub(window) >= WINDOW.as_millis() as u64
            && self.window.compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // `+ WINDOW` so that the very first line of a call site opens a window.
    (EPOCH.get_or_init(Instant::now).elapsed() + WINDOW).as_millis() as u64
}

/// Logs like `log::warn!` (the level comes first: `limited!(warn, "...", args)`), at most
/// [`BURST`] lines per [`WINDOW`] from this call site; use it for every line a front-end or a
/// guest can cause.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                $crate::ratelimit::__log::$level!("{} ({} similar lines suppressed)", format_args!($($arg)+), suppressed);
            } else {
                $crate::ratelimit::__log::$level!($($arg)+);
            }
        }
    }};
}

/// [`limited!`](crate::limited) with a limiter of the caller's (`limited_by!(self.limit, info,
/// "...")`): a per-device limit, for lines every device logs at start-up and on reconnects, so
/// that many devices starting at once each keep their lines while each one alone is still
/// limited.
#[macro_export]
macro_rules! limited_by {
    ($limit:expr, $level:ident, $($arg:tt)+) => {{
        if let Some(suppressed) = $crate::ratelimit::RateLimit::check(&$limit) {
            if suppressed > 0 {
                $crate::ratelimit::__log::$level!("{} ({} similar lines suppressed)", format_args!($($arg)+), suppressed);
            } else {
                $crate::ratelimit::__log::$level!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_suppressed() {
        let l = RateLimit::new();
        let w = WINDOW.as_millis() as u64;
        let t0 = w;
        for _ in 0..BURST {
            assert_eq!(l.check_at(t0), Some(0));
        }
        for i in 0..1000 {
            assert_eq!(l.check_at(t0 + i), None);
        }
        assert_eq!(l.check_at(t0 + w), Some(1000), "the next window reports what was left out");
        assert_eq!(l.check_at(t0 + w + 1), Some(0));
    }
}
