//! Memory back to the system once traffic stops. Owns: noticing, from the usage stream every
//! finished request feeds and the count of requests in flight, that a burst has ended, and
//! then asking the allocator to return the free pages it kept.
//!
//! glibc keeps what a burst freed in its arenas (one per thread) for the next one: after a load,
//! an idle router held 3.6-4.4 MB more than at start, of which trimming returns about 2 MB
//! (docs/BENCHMARKS.md). `malloc_trim` hands the free pages back; it walks every arena, so it
//! runs once per quiet spell, never under traffic.
//! Must not: run while requests flow (it takes each arena's lock).

use std::time::{Duration, Instant};

/// How long without a usage event before a burst counts as over: past the upstream pool's idle
/// expiry (4 s, swept every 4 s), so that the pooled connections are gone too.
const QUIET: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct IdleTrim {
    /// Requests finished since the last trim.
    active: bool,
    quiet_since: Option<Instant>,
}

impl IdleTrim {
    /// Called after each drain of the usage channel, at `now`; `events`: it found some, or
    /// requests are in flight.
    pub fn drained(&mut self, events: bool, now: Instant) {
        if self.due(events, now) {
            release_free_memory();
        }
    }

    /// Whether a burst has just turned into a quiet spell long enough to trim after.
    fn due(&mut self, events: bool, now: Instant) -> bool {
        if events {
            self.active = true;
            self.quiet_since = None;
            return false;
        }
        if !self.active || now.duration_since(*self.quiet_since.get_or_insert(now)) < QUIET {
            return false;
        }
        self.active = false;
        self.quiet_since = None;
        true
    }
}

/// Hands the allocator's free pages back to the system (glibc; elsewhere nothing).
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages; it has no preconditions.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_quiet_spell_after_traffic() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut t = IdleTrim::default();
        assert!(
            !t.due(false, at(0)) && !t.due(false, at(60_000)),
            "never busy: nothing to trim"
        );
        assert!(!t.due(true, at(60_001)));
        assert!(!t.due(false, at(60_002)), "quiet only just began");
        assert!(!t.due(true, at(65_000)), "traffic again");
        assert!(!t.due(false, at(65_001)));
        assert!(t.due(false, at(75_001)), "quiet for QUIET after traffic");
        assert!(!t.due(false, at(200_000)), "once per spell");
    }
}
