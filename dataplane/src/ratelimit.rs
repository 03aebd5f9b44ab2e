//! Per-service rate limits: requests and tokens per minute. Owns: one shared bucket per service
//! and unit (a GCRA "theoretical arrival time" in one atomic), per-worker leases taken from it in
//! chunks of about 10 ms of allowance, and the admission check of a request.
//!
//! A worker admits from its own lease; only when the lease runs out does it take a chunk from
//! the shared bucket with one compare-and-swap. A low-rate service gets chunks of one unit (so
//! its limit is exact, and its few requests do not contend); a high-rate service touches the
//! shared bucket once per chunk. What workers hold in leases, at most one chunk each, is the
//! most a limit can be exceeded by in one process (remote data planes: see `RateLimits`).
//! Buckets hold one minute of allowance (a burst of a full minute's limit is allowed after an
//! idle minute).
//! Must not: lock per request (the mutex is taken once per worker, service and set of limits).

use ahash::AHashMap;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_shared::routing::{Limit, RateLimitSettings};

/// A token bucket as GCRA: `tat` is when the bucket would be full again, in nanoseconds
/// since `epoch`. On a remote data plane the allowance is not the clock's but what the control
/// plane granted (`granted`), except while the control plane is out of reach (`offline`).
struct Bucket {
    tat: AtomicU64,
    /// Nanoseconds of allowance per unit.
    interval: u64,
    /// Units a chunk takes: about 10 ms of allowance, at least 1.
    chunk: u64,
    /// Units granted by the control plane and not yet taken (remote data planes only); below
    /// zero when more was used than granted: later grants pay that first, so the service waits
    /// in proportion as it would on the control plane's own bucket.
    granted: Option<AtomicI64>,
    /// What the requests waiting for a grant lack, together: the next lease asks for at least
    /// this (a burst is granted in one answer).
    wanted: AtomicU64,
    /// The control plane's last answer granted nothing (its own bucket is empty): no use
    /// waiting for the next.
    dry: AtomicBool,
    /// Remote data planes: set while the control plane does not answer, when this data plane
    /// admits by its own clock (`tat`) instead of by grants (`RateLimits::unreachable`).
    offline: Option<Arc<AtomicBool>>,
}

/// A minute of allowance can be banked.
const WINDOW_NS: u64 = 60_000_000_000;
/// Admission sizes above this are refused without arithmetic.
const MAX_UNITS: u64 = 1 << 40;

impl Bucket {
    /// `offline`: a remote data plane's flag for a control plane out of reach.
    fn new(per_minute: u64, offline: Option<Arc<AtomicBool>>) -> Bucket {
        let per_minute = per_minute.max(1);
        let chunk = (per_minute / 6000).max(1);
        Bucket {
            tat: AtomicU64::new(0),
            interval: (WINDOW_NS / per_minute).max(1),
            chunk,
            wanted: AtomicU64::new(0),
            dry: AtomicBool::new(false),
            // A first chunk on credit, so a service's first request does not wait for a lease.
            granted: offline.is_some().then(|| AtomicI64::new(chunk as i64)),
            offline,
        }
    }

    /// What the control plane granted, unless it is out of reach.
    fn grant(&self) -> Option<&AtomicI64> {
        let offline = self.offline.as_ref().is_some_and(|o| o.load(Relaxed));
        self.granted.as_ref().filter(|_| !offline)
    }

    /// The most one take can ever get: a full bucket, a minute of allowance.
    fn capacity(&self) -> u64 {
        WINDOW_NS / self.interval
    }

    /// Takes `units`, or says how long until they would fit.
    fn take(&self, units: u64, now: u64) -> Result<(), Duration> {
        if let Some(granted) = self.grant() {
            // `units` is at most MAX_UNITS: no wrap.
            let units_signed = units as i64;
            return granted
                .fetch_update(Relaxed, Relaxed, |g| {
                    (g >= units_signed).then(|| g - units_signed)
                })
                .map(drop)
                .map_err(|g| {
                    // About when the control plane's bucket has refilled that much, and paid
                    // any debt first.
                    let debt = g.min(0).unsigned_abs();
                    Duration::from_nanos(units.saturating_add(debt).saturating_mul(self.interval))
                });
        }
        let cost = units.saturating_mul(self.interval);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(cost);
            let ahead = new_tat - now;
            if ahead > WINDOW_NS {
                return Err(Duration::from_nanos(ahead - WINDOW_NS));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Relaxed, Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Charges `units` already used, whether or not they fit: the service waits that much
    /// longer (a remote data plane's grant goes down as far as it has).
    fn charge(&self, units: u64, now: u64) {
        if let Some(granted) = self.grant() {
            let units = units.min(MAX_UNITS) as i64;
            let _ = granted.fetch_update(Relaxed, Relaxed, |g| Some(g.saturating_sub(units)));
            return;
        }
        let cost = units.saturating_mul(self.interval);
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            Some(tat.max(now).saturating_add(cost))
        });
    }

    /// Gives back `units` taken but not used (no further than a full bucket).
    fn refund(&self, units: u64, now: u64) {
        if let Some(granted) = self.grant() {
            granted.fetch_add(units.min(MAX_UNITS) as i64, Relaxed);
            return;
        }
        let cost = units.saturating_mul(self.interval);
        let _ = self.tat.fetch_update(Relaxed, Relaxed, |tat| {
            Some(tat.saturating_sub(cost).max(now.min(tat)))
        });
    }

    /// Takes as many of `want` units as fit now (for a remote data plane's lease).
    fn take_upto(&self, want: u64, now: u64) -> u64 {
        let mut tat = self.tat.load(Relaxed);
        loop {
            let start = tat.max(now);
            let room = (WINDOW_NS - (start - now).min(WINDOW_NS)) / self.interval;
            let n = want.min(room);
            if n == 0 {
                return 0;
            }
            match self
                .tat
                .compare_exchange_weak(tat, start + n * self.interval, Relaxed, Relaxed)
            {
                Ok(_) => return n,
                Err(seen) => tat = seen,
            }
        }
    }

    /// What a remote data plane asks for when its grant runs low: about 200 ms of allowance, or
    /// what a refused request needed, up to a minute's allowance.
    fn lease_size(&self) -> u64 {
        let usual = (200_000_000 / self.interval).max(self.chunk);
        usual
            .max(self.wanted.load(Relaxed))
            .min(WINDOW_NS / self.interval)
    }
}

struct ServiceBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// The rate-limit state of one set of limits, shared by the workers (and by successive configs
/// that leave the limits alone).
pub struct RateLimits {
    /// Tells worker leases which `RateLimits` they were taken from.
    id: u64,
    /// A remote data plane's: allowance comes from the control plane's grants.
    granted: bool,
    /// ... and its control plane did not answer the last lease request: nobody waits for one,
    /// and each data plane enforces the limits by its own clock until it answers again (a
    /// control plane outage must not refuse every limited service; N data planes then admit
    /// up to N times a limit). Shared with the limits of later configs.
    unreachable: Arc<AtomicBool>,
    epoch: Instant,
    settings: RateLimitSettings,
    buckets: Mutex<AHashMap<String, Arc<ServiceBuckets>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn limit_of(settings: &RateLimitSettings, service: &str) -> Limit {
    settings
        .services
        .get(service)
        .copied()
        .unwrap_or(settings.default)
}

impl RateLimits {
    pub fn new(settings: RateLimitSettings, granted: bool) -> RateLimits {
        RateLimits {
            id: NEXT_ID.fetch_add(1, Relaxed),
            granted,
            unreachable: Arc::default(),
            epoch: Instant::now(),
            settings,
            buckets: Mutex::default(),
        }
    }

    /// The limits of a new config: a service whose limit did not change keeps its buckets on
    /// the same clock; one whose limit changed gets new buckets that start from what it used
    /// of the window (a limit lowered to stop a client must not hand it a fresh burst). Workers
    /// keep their leases on kept buckets and drop the others (see `WorkerLimits::admit`).
    pub fn replacing(&self, settings: RateLimitSettings) -> RateLimits {
        let old = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.now();
        let offline = self.granted.then(|| self.unreachable.clone());
        let kept = old
            .iter()
            .map(|(service, buckets)| {
                let limit = limit_of(&settings, service);
                if limit_of(&self.settings, service) == limit {
                    return (service.clone(), buckets.clone());
                }
                let carried = |was: &Option<Bucket>, per_minute: Option<u64>| {
                    let bucket = Bucket::new(per_minute?, offline.clone());
                    if let Some(was) = was.as_ref().filter(|_| offline.is_none()) {
                        let ahead = was.tat.load(Relaxed).saturating_sub(now);
                        // No more than a window of the new limit: refused for a minute at most.
                        let used = ahead.div_ceil(was.interval).min(bucket.capacity());
                        let tat = now.saturating_add(used.saturating_mul(bucket.interval));
                        bucket.tat.store(tat, Relaxed);
                    }
                    Some(bucket)
                };
                let buckets = ServiceBuckets {
                    requests: carried(&buckets.requests, limit.requests_per_minute),
                    tokens: carried(&buckets.tokens, limit.tokens_per_minute),
                };
                (service.clone(), Arc::new(buckets))
            })
            .collect();
        RateLimits {
            id: NEXT_ID.fetch_add(1, Relaxed),
            granted: self.granted,
            unreachable: self.unreachable.clone(),
            epoch: self.epoch,
            settings,
            buckets: Mutex::new(kept),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether `shared` still holds `service`'s buckets.
    fn holds(&self, service: &str, shared: &Arc<ServiceBuckets>) -> bool {
        let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.get(service).is_some_and(|b| Arc::ptr_eq(b, shared))
    }

    fn limited(&self) -> bool {
        self.settings.default != Limit::default() || !self.settings.services.is_empty()
    }

    fn buckets(&self, service: &str) -> Arc<ServiceBuckets> {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(service.to_string())
            .or_insert_with(|| {
                let limit = limit_of(&self.settings, service);
                let offline = self.granted.then(|| self.unreachable.clone());
                let bucket = |per_minute: u64| Bucket::new(per_minute, offline.clone());
                Arc::new(ServiceBuckets {
                    requests: limit.requests_per_minute.map(bucket),
                    tokens: limit.tokens_per_minute.map(bucket),
                })
            })
            .clone()
    }

    /// Control plane: takes up to `want` of a service's allowance for a remote data plane
    /// (`tokens` picks the bucket). `None`: no such limit.
    pub fn lease(&self, service: &str, tokens: bool, want: u64) -> Option<u64> {
        let buckets = self.buckets(service);
        let bucket = if tokens {
            buckets.tokens.as_ref()
        } else {
            buckets.requests.as_ref()
        }?;
        Some(bucket.take_upto(want, self.now()))
    }

    /// Remote data plane: the buckets whose grant is below a lease, with the lease to ask
    /// for: (service, tokens, units).
    pub fn running_low(&self) -> Vec<(String, bool, u64)> {
        let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (service, b) in map.iter() {
            for (tokens, bucket) in [(false, &b.requests), (true, &b.tokens)] {
                let Some(bucket) = bucket else { continue };
                let Some(granted) = &bucket.granted else {
                    continue;
                };
                let size = bucket.lease_size();
                if granted.load(Relaxed) < size as i64 {
                    out.push((service.clone(), tokens, size));
                }
            }
        }
        out
    }

    /// Remote data plane: adds what the control plane granted.
    pub fn add_grant(&self, service: &str, tokens: bool, units: u64) {
        let buckets = self.buckets(service);
        let bucket = if tokens {
            &buckets.tokens
        } else {
            &buckets.requests
        };
        if let Some(b) = bucket {
            if let Some(granted) = &b.granted {
                granted.fetch_add(units.min(MAX_UNITS) as i64, Relaxed);
                b.wanted.store(0, Relaxed);
                b.dry.store(units == 0, Relaxed);
            }
        }
        self.unreachable.store(false, Relaxed);
    }

    /// Remote data plane: the control plane could not be asked; requests waiting for a grant
    /// go on instead of waiting in vain, admitted by this data plane's own clock until it
    /// answers again. That clock starts with nothing banked (what was admitted by grants this
    /// minute is not known here): the limit's steady rate, no burst.
    pub fn stop_waiting(&self) {
        if self.unreachable.swap(true, Relaxed) {
            return;
        }
        let now = self.now();
        let map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        for b in map.values() {
            for bucket in [&b.requests, &b.tokens].into_iter().flatten() {
                let drained = WINDOW_NS.saturating_sub(bucket.chunk * bucket.interval);
                bucket.tat.fetch_max(now.saturating_add(drained), Relaxed);
            }
        }
    }
}

/// One worker's leases on one service's buckets.
struct Lease {
    shared: Arc<ServiceBuckets>,
    requests: Cell<i64>,
    tokens: Cell<i64>,
}

/// Which limit refused a request, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub tokens: bool,
    pub retry_after: Duration,
    /// The request alone needs more than this limit's minute of tokens: waiting cannot help.
    pub too_large: Option<u64>,
}

/// Admitted tokens of one request; `settle` charges what it really used.
pub struct TokenCharge {
    lease: Rc<Lease>,
    admitted: u64,
    /// When it was admitted, on the limits' clock (nanoseconds since `epoch`).
    at: u64,
    epoch: Instant,
}

impl TokenCharge {
    pub fn settle(self, used: u64) {
        let t = &self.lease.tokens;
        let balance = t.get() + self.admitted as i64 - used.min(MAX_UNITS) as i64;
        let Some(b) = &self.lease.shared.tokens else {
            t.set(balance.max(0));
            return;
        };
        if balance < 0 {
            // Used more than admitted and leased: the shared bucket pays the rest, so the
            // service waits in proportion, and the lease never holds a debt no take could cover.
            b.charge(balance.unsigned_abs(), self.at);
            t.set(0);
        } else if balance as u64 > b.chunk {
            // Used less: what the lease holds beyond a chunk goes back to the shared bucket,
            // for every worker (kept here, it would be a burst past the limit later); only
            // within the bucket's window, past which the take no longer weighs on it.
            let now = self.epoch.elapsed().as_nanos() as u64;
            if now.saturating_sub(self.at) < WINDOW_NS {
                b.refund(balance as u64 - b.chunk, now);
            }
            t.set(b.chunk as i64);
        } else {
            t.set(balance);
        }
    }
}

/// Per-worker leases, for the `RateLimits` they were taken from.
#[derive(Default)]
pub struct WorkerLimits {
    limits_id: Cell<u64>,
    leases: RefCell<AHashMap<Box<str>, Rc<Lease>>>,
}

/// Takes from a lease, refilling it from the bucket by at least a chunk when short.
fn draw(balance: &Cell<i64>, bucket: &Bucket, units: u64, now: u64) -> Result<(), Duration> {
    let short = units as i64 - balance.get();
    if short > 0 {
        let want = bucket.chunk.max(short as u64);
        // A whole chunk may not fit when a just-enough amount does.
        if bucket.take(want, now).is_err() {
            bucket.take(short as u64, now)?;
            balance.set(balance.get() + short);
        } else {
            balance.set(balance.get() + want as i64);
        }
    }
    balance.set(balance.get() - units as i64);
    Ok(())
}

impl WorkerLimits {
    /// On a remote data plane, after a refusal by the requests limit (`tokens` false) or the
    /// tokens limit: asks the control plane for `units` more with the next lease, and says
    /// whether waiting for its answer may help (not where the control plane said its bucket
    /// is empty or does not answer, nor for limits of this process's own).
    pub fn ask_for_more(
        &self,
        limits: &RateLimits,
        service: &str,
        tokens: bool,
        units: u64,
    ) -> bool {
        self.with_remote_bucket(limits, service, tokens, |b| {
            if !b.dry.load(Relaxed) {
                b.wanted.fetch_add(units.min(MAX_UNITS), Relaxed);
            }
            !b.dry.load(Relaxed)
        })
        .unwrap_or(false)
    }

    /// Whether an answer the control plane has yet to give may grant what was asked for
    /// (`ask_for_more`).
    pub fn more_may_come(&self, limits: &RateLimits, service: &str, tokens: bool) -> bool {
        self.with_remote_bucket(limits, service, tokens, |b| {
            !b.dry.load(Relaxed) && b.wanted.load(Relaxed) > 0
        })
        .unwrap_or(false)
    }

    /// `f` of a bucket of this worker's lease, on a remote data plane whose control plane
    /// answers (the worker's own lease: no lock).
    fn with_remote_bucket<R>(
        &self,
        limits: &RateLimits,
        service: &str,
        tokens: bool,
        f: impl FnOnce(&Bucket) -> R,
    ) -> Option<R> {
        if !limits.granted || limits.unreachable.load(Relaxed) {
            return None;
        }
        let leases = self.leases.borrow();
        let shared = &leases.get(service)?.shared;
        let bucket = if tokens {
            &shared.tokens
        } else {
            &shared.requests
        };
        bucket.as_ref().map(f)
    }

    /// Admits one request of about `tokens` tokens (prompt estimate plus `max_tokens`), plus
    /// `assumed` output tokens when the caller set no `max_tokens`, counted as far as the
    /// request still fits a minute's allowance (so concurrent answers cannot burst far past
    /// the limit before they are charged, yet no request is refused for an assumption).
    /// `Ok(None)`: the service has no token limit.
    pub fn admit(
        &self,
        limits: &RateLimits,
        service: &str,
        tokens: u64,
        assumed: u64,
    ) -> Result<Option<TokenCharge>, Refusal> {
        if !limits.limited() {
            return Ok(None);
        }
        let mut leases = self.leases.borrow_mut();
        if self.limits_id.get() != limits.id {
            // Leases on buckets the new limits kept stay, with what they hold and what
            // requests in flight will give back.
            leases.retain(|service, lease| limits.holds(service, &lease.shared));
            self.limits_id.set(limits.id);
        }
        let lease = match leases.get(service) {
            Some(l) => l.clone(),
            None => {
                let l = Rc::new(Lease {
                    shared: limits.buckets(service),
                    requests: Cell::new(0),
                    tokens: Cell::new(0),
                });
                leases.insert(service.into(), l.clone());
                l
            }
        };
        drop(leases);
        let now = limits.now();
        if let Some(b) = &lease.shared.requests {
            draw(&lease.requests, b, 1, now).map_err(|retry_after| Refusal {
                tokens: false,
                retry_after,
                too_large: None,
            })?;
        }
        let Some(b) = &lease.shared.tokens else {
            return Ok(None);
        };
        // More than a minute's allowance can never be admitted (the bound also keeps the
        // leases' `i64` math sound).
        let capacity = b.capacity();
        let too_large = tokens > capacity.min(MAX_UNITS);
        let tokens = tokens.saturating_add(assumed.min(capacity.saturating_sub(tokens)));
        let drawn = if too_large {
            Err(Duration::ZERO)
        } else {
            draw(&lease.tokens, b, tokens, now)
        };
        if let Err(retry_after) = drawn {
            // The request was not admitted: its request unit goes back to the lease.
            lease.requests.set(lease.requests.get() + 1);
            return Err(Refusal {
                tokens: true,
                retry_after,
                too_large: too_large.then_some(capacity),
            });
        }
        Ok(Some(TokenCharge {
            lease,
            admitted: tokens,
            at: now,
            epoch: limits.epoch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings(rpm: Option<u64>, tpm: Option<u64>) -> RateLimitSettings {
        RateLimitSettings {
            default: Limit::default(),
            services: BTreeMap::from([(
                "etl".to_string(),
                Limit {
                    requests_per_minute: rpm,
                    tokens_per_minute: tpm,
                },
            )]),
        }
    }

    #[test]
    fn refused_requests_on_a_remote_data_plane_ask_together_until_an_answer() {
        let remote = RateLimits::new(settings(Some(60), None), true);
        let w = WorkerLimits::default();
        assert!(w.admit(&remote, "etl", 0, 0).is_ok(), "on credit");
        for _ in 0..3 {
            let refused = w.admit(&remote, "etl", 0, 0).err().expect("refused");
            assert!(w.ask_for_more(&remote, "etl", refused.tokens, 1));
        }
        // The three refused are one lease request, and may be answered.
        assert_eq!(remote.running_low(), vec![("etl".to_string(), false, 3)]);
        assert!(w.more_may_come(&remote, "etl", false));
        // An answer ends their wait; one of nothing (the control plane's bucket is empty)
        // also ends the next ones' before it starts; so does a control plane not reached.
        remote.add_grant("etl", false, 0);
        assert!(!w.more_may_come(&remote, "etl", false));
        assert!(!w.ask_for_more(&remote, "etl", false, 1), "dry");
        remote.add_grant("etl", false, 2);
        assert!(w.ask_for_more(&remote, "etl", false, 1));
        remote.stop_waiting();
        assert!(!w.more_may_come(&remote, "etl", false));
        assert!(!w.ask_for_more(&remote, "etl", false, 1), "unreachable");
        let local = limits(Some(60), None);
        assert!(w.admit(&local, "etl", 0, 0).is_ok());
        assert!(!w.ask_for_more(&local, "etl", false, 1), "local");
    }

    #[test]
    fn a_remote_data_plane_out_of_touch_enforces_the_limits_itself() {
        let remote = RateLimits::new(settings(Some(60), None), true);
        let w = WorkerLimits::default();
        assert!(w.admit(&remote, "etl", 0, 0).is_ok(), "on credit");
        assert!(w.admit(&remote, "etl", 0, 0).is_err(), "no grant yet");
        // The control plane is not reached: the limit, not the last grant, decides, at its
        // steady rate (one a second) with no burst banked.
        remote.stop_waiting();
        assert!(w.admit(&remote, "etl", 0, 0).is_ok());
        let refused = w.admit(&remote, "etl", 0, 0).err().expect("over the limit");
        assert!(refused.retry_after <= Duration::from_secs(1), "{refused:?}");
        // The limits of a new config share the state of the same control plane.
        let next = remote.replacing(settings(Some(60), None));
        assert!(
            w.admit(&next, "etl", 0, 0).is_err(),
            "same bucket, same clock"
        );
        // It answers again: grants decide once more.
        next.add_grant("etl", false, 2);
        assert!((0..2).all(|_| w.admit(&next, "etl", 0, 0).is_ok()));
        assert!(w.admit(&next, "etl", 0, 0).is_err());
    }

    #[test]
    fn a_remote_data_plane_admits_what_the_control_plane_granted() {
        let control = limits(Some(60), None);
        let remote = RateLimits::new(settings(Some(60), None), true);
        let w = WorkerLimits::default();
        // One on credit, then nothing until a grant.
        assert!(w.admit(&remote, "etl", 0, 0).is_ok());
        assert!(w.admit(&remote, "etl", 0, 0).is_err());
        assert_eq!(remote.running_low(), vec![("etl".to_string(), false, 1)]);
        // 60 per minute: the control plane's bucket holds 60, and grants what fits.
        assert_eq!(control.lease("etl", false, 50), Some(50));
        assert_eq!(control.lease("etl", false, 50), Some(10));
        assert_eq!(control.lease("etl", false, 50), Some(0));
        assert_eq!(control.lease("etl", true, 50), None, "no token limit");
        remote.add_grant("etl", false, 3);
        assert!((0..3).all(|_| w.admit(&remote, "etl", 0, 0).is_ok()));
        assert!(w.admit(&remote, "etl", 0, 0).is_err());
        // A request larger than a usual lease makes the next lease big enough for it.
        let tokens = RateLimits::new(settings(None, Some(600_000)), true);
        assert!(w.admit(&tokens, "etl", 50_000, 0).is_err());
        assert!(w.ask_for_more(&tokens, "etl", true, 50_000));
        assert_eq!(
            tokens.running_low(),
            vec![("etl".to_string(), true, 50_000)]
        );
        tokens.add_grant("etl", true, 50_000);
        assert!(w.admit(&tokens, "etl", 50_000, 0).is_ok());
        // An answer far larger than admitted: the overrun is a debt later grants pay first.
        let tokens = RateLimits::new(settings(None, Some(1_000)), true);
        tokens.add_grant("etl", true, 100);
        w.admit(&tokens, "etl", 10, 0)
            .unwrap()
            .unwrap()
            .settle(5_000);
        tokens.add_grant("etl", true, 100);
        let refused = w.admit(&tokens, "etl", 10, 0).err().expect("still in debt");
        // About 4,800 tokens of debt at 1,000 a minute: minutes, not the 10 tokens' 0.6 s.
        assert!(
            refused.retry_after > Duration::from_secs(200),
            "{refused:?}"
        );
        tokens.add_grant("etl", true, 5_000);
        assert!(w.admit(&tokens, "etl", 10, 0).is_ok(), "paid off");
    }

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> RateLimits {
        RateLimits::new(settings(rpm, tpm), false)
    }

    #[test]
    fn a_minute_of_requests_then_refusals_shared_across_workers() {
        let l = limits(Some(10), None);
        let workers = [WorkerLimits::default(), WorkerLimits::default()];
        let admitted = (0..30)
            .filter(|i| workers[i % 2].admit(&l, "etl", 0, 0).is_ok())
            .count();
        assert_eq!(admitted, 10, "exact for a low rate");
        let refusal = workers[0].admit(&l, "etl", 0, 0).err().unwrap();
        assert!(!refusal.tokens);
        assert!(refusal.retry_after <= Duration::from_secs(6), "{refusal:?}");
        assert!(
            workers[0].admit(&l, "other", 0, 0).is_ok(),
            "unlimited service"
        );
    }

    #[test]
    fn a_reload_keeps_what_services_with_unchanged_limits_used() {
        // etl's own limit, and a default of `other` for everyone else.
        let with = |etl: u64, other: u64| RateLimitSettings {
            default: settings(Some(other), None).services["etl"],
            ..settings(Some(etl), None)
        };
        let first = RateLimits::new(with(3, 2), false);
        let w = WorkerLimits::default();
        for service in ["etl", "etl", "etl", "other", "other"] {
            assert!(w.admit(&first, service, 0, 0).is_ok(), "{service}");
        }
        assert!(w.admit(&first, "etl", 0, 0).is_err() && w.admit(&first, "other", 0, 0).is_err());
        let second = first.replacing(with(3, 4));
        assert!(
            w.admit(&second, "etl", 0, 0).is_err(),
            "etl's minute is still used up"
        );
        // A changed limit counts what was used of the window: other used 2 of its new 4.
        assert!((0..2).all(|_| w.admit(&second, "other", 0, 0).is_ok()));
        assert!(w.admit(&second, "other", 0, 0).is_err());
        let third = second.replacing(with(5, 4));
        assert!(w.admit(&third, "etl", 0, 0).is_ok(), "etl's limit went up");
        // Lowered below what was used: nothing until that has drained, a minute at most.
        let fourth = third.replacing(with(1, 4));
        assert!(w.admit(&fourth, "etl", 0, 0).is_err(), "no fresh burst");
        let etl = fourth.buckets("etl");
        let tat = etl.requests.as_ref().unwrap().tat.load(Relaxed);
        assert!(
            tat <= fourth.now() + WINDOW_NS,
            "refused for a minute at most"
        );
    }

    #[test]
    fn leases_on_kept_buckets_survive_a_reload() {
        let first = limits(None, Some(1000));
        let w = WorkerLimits::default();
        let charge = w.admit(&first, "etl", 800, 0).unwrap().unwrap();
        // Another service's limit changes while the request is out; it used 100 of its 800.
        let mut changed = settings(None, Some(1000));
        changed.default.requests_per_minute = Some(50);
        let second = first.replacing(changed);
        assert!(w.admit(&second, "other", 0, 0).is_ok());
        charge.settle(100);
        assert!(
            w.admit(&second, "etl", 800, 0).is_ok(),
            "the 700 given back are still this worker's"
        );
    }

    #[test]
    fn tokens_are_admitted_by_estimate_and_settled_by_use() {
        let l = limits(None, Some(1000));
        let w = WorkerLimits::default();
        let charge = w.admit(&l, "etl", 600, 0).unwrap().unwrap();
        let refusal = w.admit(&l, "etl", 600, 0).err().unwrap();
        assert!(refusal.tokens && refusal.too_large.is_none());
        let never = w.admit(&l, "etl", 1001, 0).err().unwrap();
        assert_eq!(never.too_large, Some(1000), "more than a minute's tokens");
        // Used less than estimated: the difference is available again.
        charge.settle(100);
        w.admit(&l, "etl", 800, 0).unwrap().unwrap().settle(800);
        assert!(w.admit(&l, "etl", 200, 0).is_err());
    }

    #[test]
    fn tokens_admitted_but_unused_go_back_to_every_worker() {
        let l = limits(None, Some(60_000));
        let (a, b) = (WorkerLimits::default(), WorkerLimits::default());
        // Thirty requests estimated at 2,000 tokens that use 10 each, on one worker.
        for _ in 0..30 {
            a.admit(&l, "etl", 2_000, 0).unwrap().unwrap().settle(10);
        }
        // The other worker can take (almost) all the rest of the minute: nothing is banked
        // in the first one's lease beyond a chunk.
        b.admit(&l, "etl", 59_000, 0)
            .unwrap()
            .unwrap()
            .settle(59_000);
        assert!(
            a.admit(&l, "etl", 2_000, 0).is_err(),
            "and the minute is spent"
        );
    }

    #[test]
    fn without_max_tokens_the_assumed_output_is_admitted_as_far_as_it_fits() {
        let l = limits(None, Some(10_000));
        let w = WorkerLimits::default();
        // 100 of prompt and 4,096 assumed: two fit in the minute, a third waits ...
        let a = w.admit(&l, "etl", 100, 4_096).unwrap().unwrap();
        let b = w.admit(&l, "etl", 100, 4_096).unwrap().unwrap();
        let refused = w.admit(&l, "etl", 100, 4_096).err().unwrap();
        assert!(refused.tokens && refused.too_large.is_none(), "{refused:?}");
        // ... until the answers turn out short and give back what they did not use.
        a.settle(300);
        b.settle(300);
        assert!(w.admit(&l, "etl", 100, 4_096).is_ok());
        // An assumption never makes a request too large: on a small limit it counts as far
        // as the request fits.
        let small = limits(None, Some(1_000));
        assert!(w.admit(&small, "etl", 100, 4_096).is_ok());
        assert!(w.admit(&small, "etl", 100, 4_096).is_err());
    }

    #[test]
    fn answers_larger_than_admitted_delay_the_service_in_proportion() {
        let l = limits(None, Some(1000));
        let w = WorkerLimits::default();
        // Admitted at 1 token (no max_tokens), used 5,000: five minutes' worth.
        w.admit(&l, "etl", 1, 0).unwrap().unwrap().settle(5000);
        let wait = w.admit(&l, "etl", 10, 0).err().unwrap().retry_after;
        assert!(wait > Duration::from_secs(200), "{wait:?}");
        assert!(
            wait < Duration::from_secs(300),
            "and not for ever: {wait:?}"
        );
        // What a bucket holds is never less than a take needs.
        let bucket = Bucket::new(1000, None);
        bucket.charge(5000, 0);
        assert!(bucket.take(10, WINDOW_NS).is_err());
        assert!(bucket.take(10, 5 * WINDOW_NS).is_ok());
    }

    #[test]
    fn high_rates_take_chunks_and_stay_within_a_chunk_per_worker() {
        let l = limits(Some(600_000), None);
        let workers: Vec<_> = (0..4).map(|_| WorkerLimits::default()).collect();
        let mut admitted = 0;
        for i in 0..1_000_000 {
            if workers[i % 4].admit(&l, "etl", 0, 0).is_ok() {
                admitted += 1;
            }
        }
        // One minute banked, plus what the test's own runtime refilled, plus a chunk per worker.
        let elapsed_ns = l.now();
        let refilled = elapsed_ns / (WINDOW_NS / 600_000);
        let bound = 600_000 + refilled + 4 * 100;
        assert!(
            (600_000..=bound).contains(&admitted),
            "{admitted} > {bound}"
        );
    }
}
