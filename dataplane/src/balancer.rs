//! Live backend state shared by all workers, and target choice within a tier.
//! Owns: in-flight counts and concurrency caps, passive outlier detection (consecutive
//! failures eject a backend for an exponentially growing period, then one half-open probe;
//! a backend that answers nothing while callers give up is failing too), and
//! power-of-two-choices selection weighted by backend weight.
//! Must not: allocate or lock; every field is an atomic touched at most twice per attempt,
//! except `answered_ms`, read per body read and written at most every `ANSWERED_GRAIN_MS`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_shared::routing::{HealthSettings, RoutingTable};

#[derive(Debug, Default)]
pub struct BackendState {
    inflight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `BackendStates::epoch`; 0 = not ejected.
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    /// When the last half-open probe passed (same clock; 0 = never): a backend that has stayed
    /// up for `max_ejection` since starts its next ejection from the base period again.
    recovered_ms: AtomicU64,
    /// A half-open probe request is in flight; others wait for its verdict.
    probing: AtomicBool,
    /// Last active check or proxied request succeeded (drives `/readyz`).
    healthy: AtomicBool,
    /// Active checks failed in a row, since the last check passed or request succeeded
    /// (counted apart from request failures: a check passing says nothing of completions).
    /// An ejection leaves it: checks failing through one, then passing, end it early.
    check_failures: AtomicU32,
    /// When a response head or body bytes last arrived from this backend (same clock; 0 =
    /// never), kept to within `ANSWERED_GRAIN_MS` so that most reads only load it.
    answered_ms: AtomicU64,
    /// When a stall was last counted as a failure (same clock; 0 = never).
    stall_counted_ms: AtomicU64,
}

/// A line on stderr about a backend's state. Not `eprintln!`, which panics when stderr is
/// gone: health checks run outside any connection's handler, where a panic ends the process.
pub(crate) fn log(line: std::fmt::Arguments<'_>) {
    let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("switchyard: {line}\n"));
}

/// How stale `answered_ms` may be: a shared cache line written at most this often.
const ANSWERED_GRAIN_MS: u64 = 100;

/// Backend states indexed like `RoutingTable::backends`. Each state is shared with the
/// snapshots before and after a reload that keeps its backend (see `carried_over`).
pub struct BackendStates {
    epoch: Instant,
    states: Vec<Arc<BackendState>>,
    /// The backends' names, for the log lines of ejections and recoveries.
    names: Vec<Arc<str>>,
    /// Active health checks run: readiness needs a passed check, not just no ejection.
    checks_enabled: bool,
    /// Tests move the clock forward instead of sleeping.
    #[cfg(test)]
    skew_ms: AtomicU64,
}

/// What an attempt reports back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// Connect error, timeout, 429 or 5xx: counts toward ejection.
    Failure,
    /// Ended for reasons that say nothing about the backend (client left, bad request).
    Neutral,
}

/// An admitted attempt; releases its in-flight slot when dropped.
pub struct Slot<'a> {
    state: &'a BackendState,
    probe: bool,
}

impl Slot<'_> {
    /// This request is a half-open backend's probe: its verdict decides the ejection.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.state.inflight.fetch_sub(1, Relaxed);
        if self.probe {
            self.state.probing.store(false, Relaxed);
        }
    }
}

impl BackendStates {
    pub fn new(backends: usize, checks_enabled: bool) -> Self {
        BackendStates::carried_over(None, (0..backends).map(|_| None), checks_enabled)
    }

    /// States for a new config's backends: `previous[i]`, where backend `i` is one of the old
    /// config's, keeps that backend's state (in flight, failures, ejection, health) on the same
    /// clock; a new backend starts fresh. So a reload that adds, removes or reorders backends
    /// neither forgets an ejected one nor lets concurrency caps overshoot under live traffic.
    pub fn carried_over(
        old: Option<&BackendStates>,
        previous: impl Iterator<Item = Option<usize>>,
        checks_enabled: bool,
    ) -> Self {
        let fresh = || {
            Arc::new(BackendState {
                healthy: AtomicBool::new(!checks_enabled),
                ..Default::default()
            })
        };
        let states: Vec<Arc<BackendState>> = previous
            .map(|i| match (old, i) {
                (Some(old), Some(i)) => old.states[i].clone(),
                _ => fresh(),
            })
            .collect();
        BackendStates {
            epoch: old.map_or_else(Instant::now, |o| o.epoch),
            names: (0..states.len())
                .map(|i| Arc::from(format!("#{i}")))
                .collect(),
            states,
            checks_enabled,
            #[cfg(test)]
            skew_ms: AtomicU64::new(old.map_or(0, |o| o.skew_ms.load(Relaxed))),
        }
    }

    /// The states named after their backends (numbered until then).
    pub fn named(mut self, names: impl Iterator<Item = Arc<str>>) -> Self {
        self.names = names.collect();
        self
    }

    fn now_ms(&self) -> u64 {
        let now = self.ms_of(Instant::now());
        #[cfg(test)]
        let now = now + self.skew_ms.load(Relaxed);
        now
    }

    #[cfg(test)]
    fn advance(&self, d: Duration) {
        self.skew_ms.fetch_add(d.as_millis() as u64, Relaxed);
    }

    pub fn get(&self, backend: usize) -> &BackendState {
        &self.states[backend]
    }

    /// Ready when at least one backend is not ejected and, with active checks, healthy. (Without
    /// checks only a request could set it healthy again, and a router taken out of rotation
    /// for being unready gets none.)
    pub fn any_ready(&self) -> bool {
        let now = self.now_ms();
        self.states.iter().any(|s| {
            (!self.checks_enabled || s.healthy.load(Relaxed))
                && s.ejected_until_ms.load(Relaxed) <= now
        })
    }

    /// Tries to take an in-flight slot on `backend`. Fails when it is at its cap, ejected, or
    /// half-open with its probe already out.
    pub fn admit(&self, backend: usize, cap: u32) -> Option<Slot<'_>> {
        let s = &self.states[backend];
        let until = s.ejected_until_ms.load(Relaxed);
        let mut probe = false;
        if until != 0 {
            if self.now_ms() < until || s.probing.swap(true, Relaxed) {
                return None;
            }
            probe = true;
        }
        if s.inflight.fetch_add(1, Relaxed) >= cap {
            s.inflight.fetch_sub(1, Relaxed);
            if probe {
                s.probing.store(false, Relaxed);
            }
            return None;
        }
        Some(Slot { state: s, probe })
    }

    /// The verdict of a proxied request (`probe`: it was the half-open probe). Once a backend
    /// has been ejected, only its probe's verdict decides: success restores full traffic,
    /// failure ejects again for twice as long; verdicts of requests admitted before the
    /// ejection neither end nor lengthen it, during the period or after.
    pub fn record(&self, backend: usize, verdict: Verdict, h: &HealthSettings, probe: bool) {
        let s = &self.states[backend];
        let until = s.ejected_until_ms.load(Relaxed);
        // The clock is read only for a probe.
        let half_open = probe && until != 0 && until <= self.now_ms();
        match verdict {
            Verdict::Neutral => {}
            Verdict::Success => {
                s.healthy.store(true, Relaxed);
                if s.consecutive_failures.load(Relaxed) != 0 {
                    s.consecutive_failures.store(0, Relaxed);
                }
                // Serving requests: failed checks say more about the check than the backend.
                if s.check_failures.load(Relaxed) != 0 {
                    s.check_failures.store(0, Relaxed);
                }
                if half_open {
                    s.ejected_until_ms.store(0, Relaxed);
                    s.recovered_ms.store(self.now_ms(), Relaxed);
                    let name = &self.names[backend];
                    log(format_args!(
                        "backend `{name}` answered its probe: full traffic again"
                    ));
                }
            }
            Verdict::Failure => {
                s.healthy.store(false, Relaxed);
                let failures = s.consecutive_failures.fetch_add(1, Relaxed) + 1;
                if half_open || until == 0 && failures >= h.eject_after_failures {
                    self.eject(backend, h, until, self.now_ms());
                }
            }
        }
    }

    /// The half-open probe `slot` got an answer that shows the backend working (its head):
    /// full traffic returns now, not once a generation streaming for minutes ends. What the
    /// rest of that answer does then counts like any request's.
    pub fn probe_answered(&self, backend: usize, slot: &mut Slot<'_>, h: &HealthSettings) {
        if slot.probe {
            self.record(backend, Verdict::Success, h, true);
            slot.probe = false;
            slot.state.probing.store(false, Relaxed);
        }
    }

    /// Ejects from the state `until` was read in: of workers that failed the same backend at
    /// once, one ejects it (the others would double the period).
    fn eject(&self, backend: usize, h: &HealthSettings, until: u64, now: u64) {
        let s = &self.states[backend];
        let recovered = s.recovered_ms.load(Relaxed);
        let mut n = s.ejections.load(Relaxed);
        // Only a backend that was taking traffic starts over; a failed probe keeps doubling.
        if until == 0
            && recovered != 0
            && now.saturating_sub(recovered) > h.max_ejection.as_millis() as u64
        {
            n = 0;
        }
        let period = h
            .base_ejection
            .saturating_mul(1 << n.min(20))
            .min(h.max_ejection);
        let new_until = now + period.as_millis() as u64;
        if s.ejected_until_ms
            .compare_exchange(until, new_until, Relaxed, Relaxed)
            .is_ok()
        {
            s.ejections.store(n + 1, Relaxed);
            s.consecutive_failures.store(0, Relaxed);
            let name = &self.names[backend];
            log(format_args!(
                "backend `{name}` ejected for {period:?} (ejection {} in a row)",
                n + 1
            ));
        }
    }

    /// A response head or body bytes arrived from `backend` at `at` (any status: it answers).
    pub fn answered(&self, backend: usize, at: Instant) {
        let s = &self.states[backend];
        let at = self.ms_of(at);
        if at > s.answered_ms.load(Relaxed) + ANSWERED_GRAIN_MS {
            s.answered_ms.fetch_max(at, Relaxed);
        }
    }

    /// `at` on this clock (tests' skew aside: an instant is not moved by it).
    fn ms_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// The caller of a request to `backend` gave up waiting for more of the answer, which it
    /// last had news of at `sent` (written to the backend, or its last bytes read): whether
    /// that counts as a failure of the backend. It does when `after` has passed and nothing
    /// arrived from the backend, for any request, since `sent`; and at most once per silence,
    /// for a request sent after the last stall counted, so that callers leaving together (the
    /// same timeout) count once, and ejection takes `eject_after_failures` such periods of
    /// silence in a row, not one burst of long generations.
    pub fn count_stall(&self, backend: usize, sent: Instant, after: Duration) -> bool {
        let s = &self.states[backend];
        let sent_ms = self.ms_of(sent);
        let after_ms = after.as_millis() as u64;
        // Nothing newer recorded. What came within the grain (100 ms) after `sent` may not be,
        // so a silence can be overstated by that much (stall_after is at least 1 s).
        let silent = s.answered_ms.load(Relaxed) <= sent_ms
            && self.now_ms().saturating_sub(sent_ms) >= after_ms;
        let counted = s.stall_counted_ms.load(Relaxed);
        // The next silence counted starts `after` past this one's start.
        silent
            && sent_ms > counted
            && s.stall_counted_ms
                .compare_exchange(counted, sent_ms + after_ms, Relaxed, Relaxed)
                .is_ok()
    }

    /// An active check failed: the backend is not ready, and enough of them in a row eject it
    /// (an idle backend that went down is found without a request failing on it).
    pub fn check_failed(&self, backend: usize, h: &HealthSettings) {
        let s = &self.states[backend];
        s.healthy.store(false, Relaxed);
        let failures = s.check_failures.fetch_add(1, Relaxed) + 1;
        let until = s.ejected_until_ms.load(Relaxed);
        if until == 0 && failures >= h.eject_after_failures {
            self.eject(backend, h, until, self.now_ms());
        }
    }

    /// An active check passed (readiness). After checks had failed, the backend came back:
    /// an ejection ends early, its next request being the half-open probe. Otherwise the
    /// check says nothing new (its endpoint may answer while completions fail): an ejection
    /// runs its course, growing as probes fail. Request failures counted so far stand.
    pub fn check_passed(&self, backend: usize) {
        let s = &self.states[backend];
        s.healthy.store(true, Relaxed);
        let came_back = s.check_failures.swap(0, Relaxed) > 0;
        let until = s.ejected_until_ms.load(Relaxed);
        let now = self.now_ms();
        if came_back && until > now {
            // Not over a re-ejection a failed probe made meanwhile.
            if s.ejected_until_ms
                .compare_exchange(until, now, Relaxed, Relaxed)
                .is_ok()
            {
                let name = &self.names[backend];
                log(format_args!(
                    "backend `{name}` passes its health check again: its next request is the probe"
                ));
            }
        }
    }

    /// Takes traffic: healthy by its last verdict and not ejected (for status and metrics).
    pub fn is_available(&self, backend: usize) -> bool {
        self.states[backend].healthy.load(Relaxed) && !self.is_ejected(backend)
    }

    /// Whether `admit` would take a request now (a hint: another may take the slot first).
    pub fn has_room(&self, backend: usize, cap: u32) -> bool {
        let s = &self.states[backend];
        let until = s.ejected_until_ms.load(Relaxed);
        let open = until == 0 || (self.now_ms() >= until && !s.probing.load(Relaxed));
        open && s.inflight.load(Relaxed) < cap
    }

    pub fn inflight(&self, backend: usize) -> u32 {
        self.states[backend].inflight.load(Relaxed)
    }

    /// Ejected, or past its ejection and not yet back (its half-open probe is to come or out).
    pub fn is_out(&self, backend: usize) -> bool {
        self.states[backend].ejected_until_ms.load(Relaxed) != 0
    }

    pub fn is_ejected(&self, backend: usize) -> bool {
        self.states[backend].ejected_until_ms.load(Relaxed) > self.now_ms()
    }

    /// How long until one of `backends` may take a request again, for `Retry-After`: the
    /// ejection that ends soonest, or nothing when one is only full (it frees up any moment).
    pub fn soonest_return(&self, backends: impl Iterator<Item = usize>) -> Duration {
        let now = self.now_ms();
        backends
            .map(|b| {
                self.states[b]
                    .ejected_until_ms
                    .load(Relaxed)
                    .saturating_sub(now)
            })
            .min()
            .map_or(Duration::ZERO, Duration::from_millis)
    }
}

/// Picks a target from `group` by power of two choices on in-flight load per unit of weight,
/// skipping `tried` and unavailable backends, and admits it.
pub fn choose<'s>(
    table: &RoutingTable,
    states: &'s BackendStates,
    group: &[usize],
    tried: &[usize],
) -> Option<(usize, Slot<'s>)> {
    let mut candidates = [0usize; 64];
    let mut n = 0;
    for &t in group {
        let b = table.targets[t].backend;
        if !tried.contains(&t) && !states.is_ejected(b) && n < candidates.len() {
            candidates[n] = t;
            n += 1;
        }
    }
    // Also consider ejected-but-due-for-probe backends: `admit` decides.
    if n == 0 {
        for &t in group {
            if !tried.contains(&t) && n < candidates.len() {
                candidates[n] = t;
                n += 1;
            }
        }
    }
    while n > 0 {
        let pick = if n == 1 {
            0
        } else {
            let backend = |i: usize| table.targets[candidates[i]].backend;
            let weight = |i: usize| u64::from(table.backends[backend(i)].weight);
            // The first candidate drawn by weight, the second uniformly from the rest; the
            // second is taken only if, with this request, it still has fewer in flight per unit
            // of weight than the first has now. So a lightly loaded group splits traffic by
            // weight (a canary at weight 1 of 10 gets a tenth, not every request the heavy one
            // is busy for), and a busy one balances load per unit of weight.
            let mut r = fastrand::u64(..(0..n).map(weight).sum::<u64>());
            let mut a = 0;
            while r >= weight(a) {
                r -= weight(a);
                a += 1;
            }
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let inflight = |i: usize| u64::from(states.get(backend(i)).inflight.load(Relaxed));
            // (inflight(b)+1)/weight(b) < inflight(a)/weight(a), without division.
            if (inflight(b) + 1) * weight(a) < inflight(a) * weight(b) {
                b
            } else {
                a
            }
        };
        let target = candidates[pick];
        let backend = table.targets[target].backend;
        if let Some(slot) = states.admit(backend, table.backends[backend].max_concurrency) {
            return Some((target, slot));
        }
        candidates[pick] = candidates[n - 1];
        n -= 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        let text = r#"
[health]
eject_after_failures = 2
base_ejection_ms = 5000
max_ejection_ms = 40000
[[backends]]
name = "a"
url = "http://127.0.0.1:1"
max_concurrency = 2
models = [{ name = "m" }]
[[backends]]
name = "b"
url = "http://127.0.0.1:2"
weight = 3
models = [{ name = "m" }]
[[tiers]]
name = "t"
targets = ["a/m", "b/m"]
"#;
        switchyard_shared::config::load_str(text, "t", &|_| None).unwrap()
    }

    #[test]
    fn a_backend_that_answers_nobody_counts_one_stall_per_silence() {
        let s = BackendStates::new(3, false);
        let after = Duration::from_secs(10);
        let sent = Instant::now();
        assert!(
            !s.count_stall(0, sent, after),
            "not before `after` has passed"
        );
        s.advance(Duration::from_secs(11));
        // Something from it, to any request, after this one was sent: slow, not hung.
        s.answered(1, sent + Duration::from_millis(500));
        assert!(!s.count_stall(1, sent, after));
        assert!(
            s.count_stall(0, sent, after),
            "nothing from it since the request went out"
        );
        // Callers that were waiting as long leave together: one silence, one failure.
        assert!(!s.count_stall(0, sent, after));
        // A request sent after that one was counted, and as unanswered: the silence goes on.
        let next = Instant::now() + Duration::from_secs(12);
        s.advance(Duration::from_secs(5));
        assert!(
            !s.count_stall(0, next, after),
            "not yet `after` since it was sent"
        );
        s.advance(Duration::from_secs(7));
        assert!(s.count_stall(0, next, after));
        // Something that arrived before a request went out says nothing about it.
        let last = Instant::now() + Duration::from_secs(30);
        s.advance(Duration::from_secs(20));
        assert!(s.count_stall(1, last, after));
        assert!(s.count_stall(2, sent, after), "per backend");
        // A stream's own last bytes, recorded when they came, start its silence; they do not
        // break it.
        let s = BackendStates::new(1, false);
        let heard = Instant::now() + Duration::from_secs(5);
        s.answered(0, heard);
        s.advance(Duration::from_secs(16));
        assert!(s.count_stall(0, heard, after));
    }

    #[test]
    fn failures_at_once_on_several_workers_eject_once() {
        let t = table();
        let s = BackendStates::new(2, false);
        // Two workers each see the backend not ejected, then both reach the threshold.
        let until = s.get(0).ejected_until_ms.load(Relaxed);
        s.eject(0, &t.health, until, s.now_ms());
        s.eject(0, &t.health, until, s.now_ms());
        assert_eq!(s.get(0).ejections.load(Relaxed), 1);
        // The base period (5 s), not twice it.
        s.advance(Duration::from_millis(6000));
        assert!(!s.is_ejected(0));
    }

    #[test]
    fn caps_are_respected_and_slots_release() {
        let t = table();
        let s = BackendStates::new(2, false);
        let a1 = s.admit(0, 2).unwrap();
        let _a2 = s.admit(0, 2).unwrap();
        assert!(s.admit(0, 2).is_none());
        drop(a1);
        assert!(s.admit(0, 2).is_some());
        // With `a` full, every choice lands on `b`.
        let _hold = (s.admit(0, 2), s.admit(0, 2));
        for _ in 0..20 {
            assert_eq!(choose(&t, &s, &t.tiers[0].targets, &[]).unwrap().0, 1);
        }
    }

    #[test]
    fn weights_skew_the_choice() {
        let t = table();
        let s = BackendStates::new(2, false);
        let mut hold = Vec::new();
        let mut counts = [0; 2];
        for _ in 0..40 {
            let (target, slot) = choose(&t, &s, &t.tiers[0].targets, &[]).unwrap();
            counts[target] += 1;
            hold.push(slot);
        }
        // `a` caps at 2; `b` takes the rest.
        assert_eq!(counts[0], 2);
        drop(hold);
    }

    #[test]
    fn an_idle_group_splits_traffic_by_weight() {
        let t = table();
        let s = BackendStates::new(2, false);
        let mut counts = [0u32; 2];
        for _ in 0..4000 {
            // Each slot is released at once: the group never has a request in flight.
            counts[choose(&t, &s, &t.tiers[0].targets, &[]).unwrap().0] += 1;
        }
        // Weights 1 and 3: a quarter and three quarters (binomial spread ~27 at n = 4000).
        assert!((850..1150).contains(&counts[0]), "{counts:?}");
        // One request held on the heavy backend (two callers in a closed loop): still a quarter.
        let held = s.admit(1, 100).unwrap();
        let mut light = 0;
        for _ in 0..4000 {
            light += u32::from(choose(&t, &s, &t.tiers[0].targets, &[]).unwrap().0 == 0);
        }
        assert!((850..1150).contains(&light), "{light}");
        drop(held);
    }

    #[test]
    fn failures_eject_then_half_open_probe_restores() {
        let t = table();
        let s = BackendStates::new(2, true);
        assert!(!s.any_ready());
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(!s.is_ejected(0));
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(s.is_ejected(0));
        assert!(s.admit(0, 10).is_none());
        // Tried-everything fallback still only yields the healthy backend.
        assert_eq!(choose(&t, &s, &t.tiers[0].targets, &[]).unwrap().0, 1);
        s.advance(Duration::from_millis(6000));
        let probe = s.admit(0, 10).expect("half-open probe");
        assert!(s.admit(0, 10).is_none(), "one probe at a time");
        s.record(0, Verdict::Failure, &t.health, probe.is_probe());
        drop(probe);
        assert!(s.is_ejected(0), "a failed probe ejects again, for longer");
        s.advance(Duration::from_millis(6000));
        assert!(s.admit(0, 10).is_none(), "second ejection is 10 s");
        s.advance(Duration::from_millis(5000));
        let probe = s.admit(0, 10).unwrap();
        s.record(0, Verdict::Success, &t.health, probe.is_probe());
        drop(probe);
        assert!(!s.is_ejected(0) && s.any_ready());
        assert!(s.admit(0, 10).is_some() && s.admit(0, 10).is_some());
    }

    #[test]
    fn late_verdicts_neither_end_nor_lengthen_an_ejection() {
        let t = table();
        let s = BackendStates::new(2, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(s.is_ejected(0));
        // Requests admitted before the ejection report back while it runs.
        for _ in 0..10 {
            s.record(0, Verdict::Failure, &t.health, false);
        }
        s.record(0, Verdict::Success, &t.health, false);
        assert!(s.is_ejected(0), "a late success does not end it");
        s.advance(Duration::from_millis(6000));
        assert!(
            !s.is_ejected(0),
            "late failures did not lengthen it: still 5 s"
        );
    }

    #[test]
    fn without_checks_a_failed_backend_is_ready_again_once_not_ejected() {
        let t = table();
        let s = BackendStates::new(1, false);
        assert!(s.any_ready());
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(
            s.any_ready(),
            "one failure, nothing to check it again: still ready"
        );
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(!s.any_ready(), "ejected");
        s.advance(Duration::from_millis(6000));
        assert!(s.any_ready(), "the half-open probe needs traffic");
    }

    #[test]
    fn after_an_ejection_only_the_probe_decides() {
        let t = table();
        let s = BackendStates::new(2, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.advance(Duration::from_millis(6000));
        let probe = s.admit(0, 10).expect("the probe");
        // A request admitted before the ejection ends now: it decides nothing.
        s.record(0, Verdict::Success, &t.health, false);
        assert!(s.admit(0, 10).is_none(), "still only the probe");
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(!s.is_ejected(0), "nor does a late failure eject again");
        s.record(0, Verdict::Success, &t.health, probe.is_probe());
        drop(probe);
        assert!(s.admit(0, 10).is_some() && s.admit(0, 10).is_some());
    }

    #[test]
    fn a_probe_answered_well_restores_traffic_while_it_still_runs() {
        let t = table();
        let s = BackendStates::new(2, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.advance(Duration::from_millis(6000));
        let mut probe = s.admit(0, 10).expect("the probe");
        assert!(s.admit(0, 10).is_none(), "only the probe");
        s.probe_answered(0, &mut probe, &t.health);
        assert!(!s.is_ejected(0) && !probe.is_probe());
        let other = s
            .admit(0, 10)
            .expect("full traffic while the probe's answer streams");
        // Its answer then breaks off: an ordinary failure, not a failed probe.
        s.record(0, Verdict::Failure, &t.health, probe.is_probe());
        assert!(!s.is_ejected(0), "one failure of two");
        drop((probe, other));
        // A later ejection gets its own probe.
        s.record(0, Verdict::Failure, &t.health, false);
        assert!(s.is_ejected(0));
        s.advance(Duration::from_millis(20000));
        assert!(s.admit(0, 10).is_some_and(|p| p.is_probe()));
    }

    #[test]
    fn retry_after_is_short_when_a_backend_is_only_full() {
        let t = table();
        let s = BackendStates::new(2, false);
        s.record(1, Verdict::Failure, &t.health, false);
        s.record(1, Verdict::Failure, &t.health, false);
        assert!(s.soonest_return([1].into_iter()) > Duration::ZERO);
        assert_eq!(s.soonest_return([0, 1].into_iter()), Duration::ZERO);
    }

    #[test]
    fn a_check_passing_after_failing_makes_the_next_request_a_probe_not_full_traffic() {
        let t = table();
        let s = BackendStates::new(2, true);
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        // Checks passing all along say nothing new: the ejection runs its course.
        s.check_passed(0);
        assert!(s.is_ejected(0) && s.admit(0, 10).is_none());
        // A backend that went down and came back, as checks saw it, gets its probe at once.
        s.check_failed(0, &t.health);
        s.check_passed(0);
        let probe = s.admit(0, 10).expect("the probe");
        assert!(s.admit(0, 10).is_none(), "only the probe until it passes");
        s.record(0, Verdict::Failure, &t.health, probe.is_probe());
        drop(probe);
        assert!(s.is_ejected(0), "the failed probe ejects again");
    }

    #[test]
    fn checks_failing_through_an_ejection_end_it_when_they_pass() {
        let t = table();
        let s = BackendStates::new(1, true);
        s.check_failed(0, &t.health);
        s.check_failed(0, &t.health);
        assert!(s.is_ejected(0));
        s.advance(Duration::from_millis(6000));
        let probe = s.admit(0, 10).expect("the probe");
        s.check_failed(0, &t.health);
        s.record(0, Verdict::Failure, &t.health, probe.is_probe());
        drop(probe);
        assert!(s.is_ejected(0), "still down: ejected again, for longer");
        // Back up, as the checks see it: its next request is the probe, at once.
        s.check_passed(0);
        assert!(s.admit(0, 10).is_some_and(|p| p.is_probe()));
    }

    #[test]
    fn only_checks_failing_in_a_row_eject() {
        let t = table();
        let s = BackendStates::new(1, true);
        // Failures hours apart with passes between: never ejected.
        for _ in 0..5 {
            s.check_failed(0, &t.health);
            s.check_passed(0);
        }
        assert!(!s.is_ejected(0));
        s.check_failed(0, &t.health);
        s.check_failed(0, &t.health);
        assert!(s.is_ejected(0) && !s.any_ready());
        // Its probe passes: one more failed check does not eject it again at once.
        s.advance(Duration::from_millis(6000));
        let probe = s.admit(0, 10).expect("the probe");
        s.record(0, Verdict::Success, &t.health, probe.is_probe());
        drop(probe);
        s.check_failed(0, &t.health);
        assert!(!s.is_ejected(0));
        // A backend that serves requests is not ejected for a check that keeps failing.
        for _ in 0..5 {
            s.record(0, Verdict::Success, &t.health, false);
            s.check_failed(0, &t.health);
        }
        assert!(!s.is_ejected(0));
    }

    #[test]
    fn a_backend_up_for_max_ejection_starts_again_from_the_base_period() {
        let t = table();
        let s = BackendStates::new(2, false);
        let eject_and_recover = |s: &BackendStates| {
            s.record(0, Verdict::Failure, &t.health, false);
            s.record(0, Verdict::Failure, &t.health, false);
            while s.is_ejected(0) {
                s.advance(Duration::from_millis(1000));
            }
            let probe = s.admit(0, 10).unwrap();
            s.record(0, Verdict::Success, &t.health, probe.is_probe());
            drop(probe);
        };
        // Flapping doubles the period: 5, 10, 20 s.
        for _ in 0..3 {
            eject_and_recover(&s);
        }
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.advance(Duration::from_millis(36000));
        assert!(s.is_ejected(0), "the fourth is 40 s");
        s.advance(Duration::from_millis(5000));
        let probe = s.admit(0, 10).unwrap();
        s.record(0, Verdict::Success, &t.health, probe.is_probe());
        drop(probe);
        // Up for longer than max_ejection (40 s): the next ejection is 5 s again ...
        s.advance(Duration::from_millis(45000));
        s.record(0, Verdict::Failure, &t.health, false);
        s.record(0, Verdict::Failure, &t.health, false);
        s.advance(Duration::from_millis(6000));
        assert!(!s.is_ejected(0));
        // ... and a failed probe doubles it from there (10 s), not from the base again.
        let probe = s.admit(0, 10).unwrap();
        s.record(0, Verdict::Failure, &t.health, probe.is_probe());
        drop(probe);
        s.advance(Duration::from_millis(6000));
        assert!(s.is_ejected(0), "the second is 10 s");
        s.advance(Duration::from_millis(5000));
        assert!(!s.is_ejected(0));
    }
}
