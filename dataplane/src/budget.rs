//! Daily budgets, reserve then settle. Owns: the shared budget book (one pool per budget: a
//! limit and what has been leased from it today), per-worker leases taken from the pools in
//! chunks, and reservations made against a lease.
//!
//! A reservation is a worker-local operation: it only touches the worker's own lease. A worker
//! takes a new chunk (`lease_micros`, or what the request needs; at most half of what is left
//! unless the request needs more) from the pool with one compare-and-swap when its lease runs
//! short, and the pool never leases out more than its limit. So the money reserved by all
//! workers together never exceeds the budget. Spend goes over it only where a request's actual
//! cost exceeds its worst-case reservation: an answer longer than the assumed output cap when
//! the request sets no `max_tokens`, or image and audio parts that cost more tokens than their
//! bytes. The overrun is charged to the pool, so later requests see it. Remote data planes
//! reserve from grants (`BudgetBook::grant`), which the control plane records before sending,
//! so a restart does not grant the same money twice. A request still running when its budget
//! day ends is charged to the new day, on which the ledger books its spend.
//! Must not: lock per request (the book's mutex is taken once per worker, service and
//! generation), or let a lease outlive its generation (workers return it when the book changes).

use ahash::AHashMap;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{
    AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, OnceLock};
use switchyard_shared::category::Category;
use switchyard_shared::routing::BudgetSettings;

/// One budget: a service's, or a service's within one category.
#[derive(Debug, Default)]
pub struct Pool {
    limit: AtomicU64,
    /// Micro-dollars handed to worker leases today (spent, reserved or idle in a lease).
    leased: AtomicU64,
    /// A remote data plane's pool: how often the control plane answered a lease request for
    /// it (or could not be reached), for the requests waiting on its first answer.
    answers: AtomicU64,
    /// ... and whether its last answer granted nothing (the budget is spent: no use waiting).
    dry: AtomicBool,
    /// ... and whether a request of this budget came: only such pools are leased (a category
    /// nobody asks this data plane for would hold up to half of its budget idle).
    requested: AtomicBool,
    /// The most a waiting request's reservation was short by since the last answer: the next
    /// lease request asks for that (a lease smaller than one request's worst case would
    /// otherwise refuse it however much of the budget is left).
    wanted: AtomicU64,
    /// The pool of the same budget that replaced this one (a new day): reservations made here
    /// and settled after that are charged there, on the day the spend is booked.
    successor: OnceLock<Arc<Pool>>,
}

impl Pool {
    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    pub fn leased(&self) -> u64 {
        self.leased.load(Relaxed)
    }

    /// A request of this budget came (written once: the flag's cache line is shared).
    fn mark_requested(&self) {
        if !self.requested.load(Relaxed) {
            self.requested.store(true, Relaxed);
        }
    }

    /// Takes `want` for a lease, but no more than half of what is left unless `need` is more:
    /// one lease must not hold a small budget that other workers (or data planes) need.
    /// Returns what was taken; `None` when less than `need` is left.
    fn take(&self, need: u64, want: u64) -> Option<u64> {
        let mut leased = self.leased.load(Relaxed);
        loop {
            let left = self.limit().saturating_sub(leased);
            if left < need {
                return None;
            }
            let take = want.min(left / 2).max(need);
            match self
                .leased
                .compare_exchange_weak(leased, leased + take, Relaxed, Relaxed)
            {
                Ok(_) => return Some(take),
                Err(now) => leased = now,
            }
        }
    }

    /// The pool now in effect for this budget, if this one was replaced.
    fn current_successor(&self) -> Option<&Arc<Pool>> {
        let mut next = self.successor.get()?;
        while let Some(later) = next.successor.get() {
            next = later;
        }
        Some(next)
    }

    /// Returns unused money (`delta` > 0) or charges an overrun (`delta` < 0).
    fn settle(&self, delta: i64) {
        let amount = delta.unsigned_abs();
        if delta < 0 {
            self.leased.fetch_add(amount, Relaxed);
        } else {
            let _ = self
                .leased
                .fetch_update(Relaxed, Relaxed, |l| Some(l.saturating_sub(amount)));
        }
    }
}

/// Which budget a pool is.
pub type BudgetKey = (String, Option<Category>);

/// Micro-dollars each budget has given out today.
pub type Spent = BTreeMap<BudgetKey, u64>;

struct BookState {
    day: String,
    settings: Limits,
    /// Limits set through the control API; they win over the config.
    overrides: BTreeMap<BudgetKey, u64>,
    /// Spent earlier today (before a restart), per budget: a new pool starts from it.
    spent_before: BTreeMap<BudgetKey, u64>,
    pools: BTreeMap<BudgetKey, Arc<Pool>>,
    /// A remote data plane's book: a pool's limit is what the control plane has granted it
    /// today, not the configured limit.
    granted: bool,
}

/// The limits of the config in effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub default_daily: Option<u64>,
    pub services: BTreeMap<String, (Option<u64>, BTreeMap<Category, u64>)>,
    pub lease_micros: u64,
}

impl Limits {
    fn any(&self) -> bool {
        self.default_daily.is_some()
            || self
                .services
                .values()
                .any(|(daily, cats)| daily.is_some() || !cats.is_empty())
    }

    pub fn from_settings(b: &BudgetSettings) -> Limits {
        Limits {
            default_daily: b.default_daily,
            services: b
                .services
                .iter()
                .map(|(k, v)| (k.clone(), (v.daily, v.categories.clone())))
                .collect(),
            lease_micros: b.lease_micros,
        }
    }
}

impl BookState {
    fn limit(&self, key: &BudgetKey) -> Option<u64> {
        if let Some(&l) = self.overrides.get(key) {
            return Some(l);
        }
        let (service, category) = key;
        let own = self.settings.services.get(service);
        match category {
            None => own
                .and_then(|(daily, _)| *daily)
                .or(self.settings.default_daily),
            Some(c) => own.and_then(|(_, cats)| cats.get(c).copied()),
        }
    }

    /// Which of the budgets that spent today have a limit now.
    fn limited_now(&self, spent_today: &BTreeMap<BudgetKey, u64>) -> Vec<bool> {
        spent_today
            .keys()
            .map(|k| self.limit(k).is_some())
            .collect()
    }

    /// A budget that had no limit until now starts from what it spent today: that spend never
    /// went through its pool (nor through a pool left from a limit it had earlier today).
    /// Granted books are left alone: their pools hold what the control plane granted.
    fn reseed_newly_limited(
        &mut self,
        was_limited: Vec<bool>,
        spent_today: &BTreeMap<BudgetKey, u64>,
    ) {
        if self.granted {
            return;
        }
        for ((key, &spent), was) in spent_today.iter().zip(was_limited) {
            if !was && self.limit(key).is_some() {
                self.pools.remove(key);
                self.spent_before.insert(key.clone(), spent);
            }
        }
    }

    fn pool(&mut self, key: BudgetKey) -> Option<Arc<Pool>> {
        let limit = self.limit(&key)?;
        let spent = self.spent_before.get(&key).copied().unwrap_or(0);
        let pool = self.pools.entry(key).or_insert_with(|| {
            Arc::new(Pool {
                leased: AtomicU64::new(spent),
                ..Pool::default()
            })
        });
        if !self.granted {
            pool.limit.store(limit, Relaxed);
        }
        Some(pool.clone())
    }
}

/// Every budget pool of the current day. Shared by the workers and the control plane.
pub struct BudgetBook {
    /// Changes whenever limits or the day change; workers then drop and return their leases.
    generation: AtomicU64,
    /// Any limit at all: without one, a request skips budgets entirely.
    limited: AtomicBool,
    /// A remote data plane's book (see `BookState::granted`).
    granted: AtomicBool,
    /// ... whose control plane did not answer the last lease request: nobody waits for one.
    unreachable: AtomicBool,
    state: Mutex<BookState>,
}

/// A budget as the control API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetView {
    pub key: BudgetKey,
    pub limit: u64,
    pub leased: u64,
    /// "api", "config" or "default".
    pub source: &'static str,
}

impl BudgetBook {
    pub fn new(day: String, settings: Limits) -> BudgetBook {
        BudgetBook::build(day, settings, false)
    }

    /// The book of a data plane whose budgets the control plane grants (`add_grant`).
    pub fn granted(day: String, settings: Limits) -> BudgetBook {
        BudgetBook::build(day, settings, true)
    }

    fn build(day: String, settings: Limits, granted: bool) -> BudgetBook {
        BudgetBook {
            generation: AtomicU64::new(1),
            limited: AtomicBool::new(settings.any()),
            granted: AtomicBool::new(granted),
            unreachable: AtomicBool::new(false),
            state: Mutex::new(BookState {
                day,
                settings,
                overrides: BTreeMap::new(),
                spent_before: BTreeMap::new(),
                pools: BTreeMap::new(),
                granted,
            }),
        }
    }

    /// A remote data plane's book: it holds only what the control plane granted it.
    pub fn is_granted(&self) -> bool {
        self.granted.load(Relaxed)
    }

    /// Leases up to `want` of a budget to a remote data plane (never more than half of what
    /// is left, as `Pool::take` does), or at least `need` when that much is left (a request
    /// waits for it). `None`: no limit applies.
    pub fn grant(&self, key: BudgetKey, want: u64, need: u64) -> Option<u64> {
        let pool = self.state().pool(key)?;
        let needed = (need > 0)
            .then(|| pool.take(need, want.max(need)))
            .flatten();
        Some(needed.or_else(|| pool.take(1, want)).unwrap_or(0))
    }

    /// Takes back a grant that could not be delivered.
    pub fn return_grant(&self, key: BudgetKey, amount: u64) {
        if let Some(pool) = self.state().pool(key) {
            pool.settle(amount as i64);
        }
    }

    /// Adds what the control plane granted to a remote data plane's pool (perhaps nothing).
    pub fn add_grant(&self, key: BudgetKey, amount: u64) {
        if let Some(pool) = self.state().pool(key) {
            pool.limit.fetch_add(amount, Relaxed);
            pool.wanted.store(0, Relaxed);
            pool.dry.store(amount == 0, Relaxed);
            // Release: a worker that sees the answer sees the grant with it.
            pool.answers.fetch_add(1, Release);
        }
        self.unreachable.store(false, Relaxed);
    }

    /// A remote data plane shutting down, its requests done: what each pool was granted and
    /// did not lease to a worker, taken out of the pool (so none of it is leased later) to be
    /// given back.
    pub fn withdraw_unused(&self) -> Vec<(BudgetKey, u64)> {
        let s = self.state();
        s.pools
            .iter()
            .filter_map(|(key, pool)| {
                let unused = pool.limit().saturating_sub(pool.leased());
                pool.limit.fetch_sub(unused, Relaxed);
                (unused > 0).then(|| (key.clone(), unused))
            })
            .collect()
    }

    /// The control plane answered for this budget without a grant (it is behind: the data
    /// plane catches up): requests waiting on a lease go on.
    pub fn answered(&self, key: &BudgetKey) {
        if let Some(pool) = self.state().pools.get(key) {
            pool.wanted.store(0, Relaxed);
            pool.answers.fetch_add(1, Release);
        }
    }

    /// The control plane could not be asked: requests waiting for a budget's first lease go
    /// on with what is held (nothing: downgraded or refused) instead of each waiting in vain.
    pub fn stop_waiting(&self) {
        self.unreachable.store(true, Relaxed);
        for pool in self.state().pools.values() {
            pool.answers.fetch_add(1, Release);
        }
    }

    /// Pools with less than `low_water` left to lease, or less than a refused reservation
    /// wanted: a remote data plane asks for more, at least the amount given with each. A pool
    /// whose budget has no limit any more, or that no request came for, is not asked for.
    pub fn running_low(&self, low_water: u64) -> Vec<(BudgetKey, u64)> {
        let s = self.state();
        s.pools
            .iter()
            .filter(|(k, p)| s.limit(k).is_some() && p.requested.load(Relaxed))
            .filter_map(|(k, p)| {
                let left = p.limit().saturating_sub(p.leased());
                let wanted = p.wanted.load(Relaxed);
                (left < low_water || wanted > left).then(|| (k.clone(), wanted))
            })
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BookState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a change of limits or day to the workers.
    fn bump(&self, s: std::sync::MutexGuard<'_, BookState>) {
        self.limited
            .store(s.settings.any() || !s.overrides.is_empty(), Relaxed);
        drop(s);
        self.generation.fetch_add(1, Relaxed);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    pub fn day(&self) -> String {
        self.state().day.clone()
    }

    /// A new config's limits; pools keep what they leased today. `spent_today`: what each
    /// budget has given out today, for those the change limits that had no limit before
    /// (asked only when the limits change, and never by a granted book).
    pub fn set_limits(&self, settings: Limits, spent_today: impl FnOnce() -> Spent) {
        if self.state().settings == settings {
            return;
        }
        // Outside the lock: it may wait for the store.
        let spent = self.spent_for_reseed(spent_today);
        let mut s = self.state();
        let was_limited = s.limited_now(&spent);
        s.settings = settings;
        s.reseed_newly_limited(was_limited, &spent);
        self.bump(s);
    }

    /// A limit set (or, with `None`, cleared) through the control API; `spent_today` as for
    /// `set_limits`.
    pub fn set_override(
        &self,
        key: BudgetKey,
        limit: Option<u64>,
        spent_today: impl FnOnce() -> Spent,
    ) {
        let spent = self.spent_for_reseed(spent_today);
        let mut s = self.state();
        let was_limited = s.limited_now(&spent);
        let before = match limit {
            Some(l) => s.overrides.insert(key, l),
            None => s.overrides.remove(&key),
        };
        if before != limit {
            s.reseed_newly_limited(was_limited, &spent);
            self.bump(s);
        }
    }

    /// What `spent_today` says, for a book whose pools are seeded from spend (not granted).
    fn spent_for_reseed(&self, spent_today: impl FnOnce() -> Spent) -> Spent {
        if self.granted.load(Relaxed) {
            Spent::new()
        } else {
            spent_today()
        }
    }

    pub fn overrides(&self) -> BTreeMap<BudgetKey, u64> {
        self.state().overrides.clone()
    }

    /// Starts a new budget day: fresh pools, seeded with what was spent on it already (after a
    /// restart within the day).
    pub fn start_day(&self, day: String, spent_before: BTreeMap<BudgetKey, u64>) {
        let mut s = self.state();
        s.day = day;
        s.spent_before = spent_before;
        for (key, old) in std::mem::take(&mut s.pools) {
            if let Some(new) = s.pool(key) {
                let _ = old.successor.set(new);
            }
        }
        self.bump(s);
    }

    /// Every budget that applies to a service seen today or named in the config.
    pub fn views(&self, services: impl IntoIterator<Item = String>) -> Vec<BudgetView> {
        let mut s = self.state();
        let mut keys: Vec<BudgetKey> = s.pools.keys().cloned().collect();
        keys.extend(s.overrides.keys().cloned());
        for (name, (_, cats)) in &s.settings.services {
            keys.push((name.clone(), None));
            keys.extend(cats.keys().map(|c| (name.clone(), Some(*c))));
        }
        keys.extend(services.into_iter().map(|name| (name, None)));
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let source = if s.overrides.contains_key(&key) {
                    "api"
                } else if s
                    .settings
                    .services
                    .get(&key.0)
                    .is_some_and(|(daily, cats)| {
                        key.1.map_or(daily.is_some(), |c| cats.contains_key(&c))
                    })
                {
                    "config"
                } else {
                    "default"
                };
                let pool = s.pool(key.clone())?;
                Some(BudgetView {
                    limit: pool.limit(),
                    leased: pool.leased(),
                    key,
                    source,
                })
            })
            .collect()
    }

    fn leases_for(&self, service: &str) -> ServiceLeases {
        let mut s = self.state();
        let chunk = s.settings.lease_micros;
        let lease = |pool: Option<Arc<Pool>>| {
            pool.map(|pool| {
                Rc::new(Lease {
                    pool,
                    balance: Cell::new(0),
                    chunk,
                    detached: Cell::new(false),
                })
            })
        };
        let own = lease(s.pool((service.to_string(), None)));
        let categories = Category::ALL.map(|c| lease(s.pool((service.to_string(), Some(c)))));
        ServiceLeases { own, categories }
    }
}

/// Larger amounts (a saturated worst case from an absurd `max_tokens`) are refused outright,
/// so lease arithmetic in `i64` can never wrap.
const MAX_AMOUNT: u64 = 1 << 60;

/// A worker's share of one pool: money it may reserve without asking anyone.
struct Lease {
    pool: Arc<Pool>,
    /// May go below zero when a request cost more than it reserved.
    balance: Cell<i64>,
    /// What a lease takes from its pool at a time, and the most it keeps unused.
    chunk: u64,
    /// Returned to the pool (the book changed): reservations still out settle with the pool.
    detached: Cell<bool>,
}

impl Lease {
    fn reserve(&self, amount: u64) -> bool {
        let short = amount as i64 - self.balance.get();
        if short > 0 {
            let Some(taken) = self.pool.take(short as u64, self.chunk.max(short as u64)) else {
                return false;
            };
            self.balance.set(self.balance.get() + taken as i64);
        }
        self.balance.set(self.balance.get() - amount as i64);
        true
    }

    /// Records what reserving `amount` would lack, for the next lease request to ask for.
    fn ask_for(&self, amount: u64) {
        // (A pool of a new day may not have been marked by `awaiting_lease` yet.)
        self.pool.mark_requested();
        let short = (amount as i64 - self.balance.get()).max(0) as u64;
        let left = self.pool.limit().saturating_sub(self.pool.leased());
        if short > left {
            self.pool.wanted.fetch_max(short, Relaxed);
        }
    }

    fn settle(&self, reserved: u64, actual: u64) {
        let actual = actual.min(MAX_AMOUNT);
        if let Some(current) = self.pool.current_successor() {
            // Reserved on a day that has ended: the reservation goes back to this lease (its
            // pool's day is over), the cost to the day it is booked on.
            self.give_back(reserved as i64);
            current.settle(-(actual as i64));
            return;
        }
        self.give_back(reserved as i64 - actual as i64);
    }

    /// `delta` > 0: money back to this lease (or its pool, once detached); < 0: a charge.
    fn give_back(&self, delta: i64) {
        if self.detached.get() {
            self.pool.settle(delta);
            return;
        }
        // Unused money beyond one chunk goes back (a request's worst case may have taken
        // much more): held here, other workers could not reserve it.
        let balance = self.balance.get() + delta;
        let excess = balance - self.chunk as i64;
        if excess > 0 {
            self.pool.settle(excess);
            self.balance.set(self.chunk as i64);
        } else {
            self.balance.set(balance);
        }
    }

    /// Settles the lease with its pool: an unused balance is returned, a debt is charged.
    fn detach(&self) {
        self.detached.set(true);
        self.pool.settle(self.balance.replace(0));
    }
}

struct ServiceLeases {
    own: Option<Rc<Lease>>,
    categories: [Option<Rc<Lease>>; Category::COUNT],
}

/// One worker's leases, per service, for the book's current generation.
#[derive(Default)]
pub struct WorkerBudgets {
    generation: Cell<u64>,
    services: RefCell<AHashMap<Box<str>, Rc<ServiceLeases>>>,
}

/// Money held for one attempt; `settle` replaces it with the actual cost. Dropped unsettled
/// (the attempt never reached a backend), it is released in full.
pub struct Reservation {
    leases: [Option<Rc<Lease>>; 2],
    amount: u64,
}

impl Reservation {
    pub fn amount(&self) -> u64 {
        self.amount
    }

    pub fn settle(mut self, actual: u64) {
        for lease in self.leases.iter_mut().filter_map(Option::take) {
            lease.settle(self.amount, actual);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for lease in self.leases.iter().flatten() {
            lease.settle(self.amount, 0);
        }
    }
}

/// The answer to "may this attempt spend `amount`?".
pub enum Reserve {
    /// No budget applies to this service and category.
    Unlimited,
    Granted(Reservation),
    Refused,
}

impl WorkerBudgets {
    fn leases(&self, book: &BudgetBook, service: &str) -> Rc<ServiceLeases> {
        let generation = book.generation();
        let mut services = self.services.borrow_mut();
        if self.generation.get() != generation {
            for leases in services.values() {
                leases.own.iter().for_each(|l| l.detach());
                leases.categories.iter().flatten().for_each(|l| l.detach());
            }
            services.clear();
            self.generation.set(generation);
        }
        if let Some(l) = services.get(service) {
            return l.clone();
        }
        let leases = Rc::new(book.leases_for(service));
        services.insert(service.into(), leases.clone());
        leases
    }

    /// On a remote data plane: a budget of this service and category has not had its first
    /// lease from the control plane yet (a request then waits briefly instead of being refused
    /// for want of a lease nobody asked for before).
    pub fn awaiting_lease(&self, book: &BudgetBook, service: &str, category: Category) -> bool {
        if !book.limited.load(Relaxed) || !book.granted.load(Relaxed) {
            return false;
        }
        let leases = self.leases(book, service);
        let mut waiting = false;
        for lease in [&leases.own, &leases.categories[category.index()]]
            .into_iter()
            .flatten()
        {
            lease.pool.mark_requested();
            waiting |= lease.pool.answers.load(Acquire) == 0;
        }
        waiting
    }

    /// On a remote data plane, after a refused reservation: asks the control plane for what
    /// `amount` lacks in each of the service's budgets, and says whether waiting may help
    /// (not for a local book, a budget the control plane said is spent, a control plane not
    /// answering, or an amount no budget can hold).
    pub fn ask_for_more(
        &self,
        book: &BudgetBook,
        service: &str,
        category: Category,
        amount: u64,
    ) -> bool {
        if !Self::answers_may_come(book) || amount > MAX_AMOUNT {
            return false;
        }
        let leases = self.leases(book, service);
        let applicable = [&leases.own, &leases.categories[category.index()]];
        let leases = || applicable.into_iter().flatten();
        if leases().any(|l| l.pool.dry.load(Relaxed)) {
            return false;
        }
        leases().for_each(|l| l.ask_for(amount));
        true
    }

    /// Whether the control plane may still answer what was asked for (`ask_for_more`) with
    /// more of the service's budgets.
    pub fn more_may_come(&self, book: &BudgetBook, service: &str, category: Category) -> bool {
        if !Self::answers_may_come(book) {
            return false;
        }
        let leases = self.leases(book, service);
        let applicable = [&leases.own, &leases.categories[category.index()]];
        let pools = || applicable.into_iter().flatten().map(|l| &l.pool);
        let dry = pools().any(|p| p.dry.load(Relaxed));
        // Asked for and not answered yet (or never answered at all).
        let asked = pools().any(|p| p.wanted.load(Relaxed) > 0 || p.answers.load(Acquire) == 0);
        !dry && asked
    }

    /// A remote data plane's book with a limit, whose control plane answers.
    fn answers_may_come(book: &BudgetBook) -> bool {
        book.limited.load(Relaxed) && book.granted.load(Relaxed) && !book.unreachable.load(Relaxed)
    }

    /// Reserves `amount` against the service's budget and its category's, both or neither.
    pub fn reserve(
        &self,
        book: &BudgetBook,
        service: &str,
        category: Category,
        amount: u64,
    ) -> Reserve {
        if !book.limited.load(Relaxed) {
            return Reserve::Unlimited;
        }
        let leases = self.leases(book, service);
        let applicable = [
            leases.own.clone(),
            leases.categories[category.index()].clone(),
        ];
        if applicable.iter().all(Option::is_none) {
            return Reserve::Unlimited;
        }
        if amount > MAX_AMOUNT {
            return Reserve::Refused;
        }
        let mut granted: [Option<Rc<Lease>>; 2] = [None, None];
        for (slot, lease) in granted.iter_mut().zip(applicable) {
            let Some(lease) = lease else { continue };
            if !lease.reserve(amount) {
                // Release what the other budget already granted (the Drop of this partial
                // reservation settles it at zero).
                drop(Reservation {
                    leases: granted,
                    amount,
                });
                return Reserve::Refused;
            }
            *slot = Some(lease);
        }
        Reserve::Granted(Reservation {
            leases: granted,
            amount,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(default: Option<u64>, lease: u64) -> Limits {
        Limits {
            default_daily: default,
            services: BTreeMap::from([(
                "etl".to_string(),
                (Some(1_000), BTreeMap::from([(Category::Code, 100)])),
            )]),
            lease_micros: lease,
        }
    }

    fn book(default: Option<u64>, lease: u64) -> BudgetBook {
        BudgetBook::new("2026-11-27".into(), limits(default, lease))
    }

    fn granted(r: Reserve) -> Reservation {
        match r {
            Reserve::Granted(r) => r,
            _ => panic!("expected a grant"),
        }
    }

    #[test]
    fn reservations_never_exceed_the_limit_across_workers() {
        let book = book(None, 300);
        let workers: Vec<WorkerBudgets> = (0..4).map(|_| WorkerBudgets::default()).collect();
        let mut held = Vec::new();
        let mut total = 0;
        for round in 0..100 {
            let w = &workers[round % 4];
            if let Reserve::Granted(r) = w.reserve(&book, "etl", Category::Chat, 70) {
                total += r.amount();
                held.push(r);
            }
        }
        assert!(total <= 1_000, "{total}");
        assert!(
            total >= 1_000 - 4 * 70,
            "leases are used up, not stranded: {total}"
        );
        assert!(matches!(
            workers[0].reserve(&book, "etl", Category::Chat, 70),
            Reserve::Refused
        ));
        // Settling below the reservation frees the difference for later requests.
        for r in held {
            r.settle(10);
        }
        assert!(matches!(
            workers[0].reserve(&book, "etl", Category::Chat, 50),
            Reserve::Granted(_)
        ));
    }

    #[test]
    fn money_a_worst_case_held_but_did_not_spend_goes_back_to_the_pool() {
        let book = book(None, 10);
        let (a, b) = (WorkerBudgets::default(), WorkerBudgets::default());
        granted(a.reserve(&book, "etl", Category::Chat, 600)).settle(10);
        // 10 spent of 1,000: the other worker may reserve the rest less a's one-chunk lease.
        granted(b.reserve(&book, "etl", Category::Chat, 980)).settle(980);
        assert!(matches!(
            b.reserve(&book, "etl", Category::Chat, 11),
            Reserve::Refused
        ));
    }

    #[test]
    fn a_lease_takes_no_more_than_half_of_a_small_budget() {
        // A chunk larger than the whole budget (1,000).
        let book = book(None, 50_000);
        let (a, b) = (WorkerBudgets::default(), WorkerBudgets::default());
        granted(a.reserve(&book, "etl", Category::Chat, 100)).settle(10);
        granted(b.reserve(&book, "etl", Category::Chat, 400)).settle(10);
        // 100 is left outside the two leases: a request may take all of it (more than half).
        let c = WorkerBudgets::default();
        granted(c.reserve(&book, "etl", Category::Chat, 100)).settle(100);
        assert!(matches!(
            c.reserve(&book, "etl", Category::Chat, 1),
            Reserve::Refused
        ));
    }

    #[test]
    fn a_request_that_ends_on_the_next_day_is_charged_to_that_day() {
        let book = book(None, 10);
        let w = WorkerBudgets::default();
        let running = granted(w.reserve(&book, "etl", Category::Chat, 600));
        book.start_day("2026-11-28".into(), Spent::new());
        // Booked when it ends: on the new day, whose pool counts it.
        running.settle(300);
        let leased = |book: &BudgetBook| {
            let views = book.views([]);
            views
                .iter()
                .find(|v| v.key == ("etl".into(), None))
                .unwrap()
                .leased
        };
        assert_eq!(leased(&book), 300);
        granted(w.reserve(&book, "etl", Category::Chat, 700)).settle(700);
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 1),
            Reserve::Refused
        ));
    }

    #[test]
    fn category_budget_and_service_budget_both_apply() {
        let book = book(None, 1_000);
        let w = WorkerBudgets::default();
        let code = granted(w.reserve(&book, "etl", Category::Code, 80));
        assert!(matches!(
            w.reserve(&book, "etl", Category::Code, 30),
            Reserve::Refused
        ));
        // The refused category reservation gave its service share back.
        let chat = granted(w.reserve(&book, "etl", Category::Chat, 920));
        drop((code, chat));
        assert!(matches!(
            w.reserve(&book, "other", Category::Chat, 1 << 40),
            Reserve::Unlimited
        ));
    }

    #[test]
    fn the_default_applies_per_service_and_overrides_win() {
        let book = book(Some(50), 10);
        let w = WorkerBudgets::default();
        assert!(matches!(
            w.reserve(&book, "a", Category::Chat, 60),
            Reserve::Refused
        ));
        let a = granted(w.reserve(&book, "a", Category::Chat, 50));
        let b = granted(w.reserve(&book, "b", Category::Chat, 50));
        a.settle(50);
        b.settle(50);
        book.set_override(("a".into(), None), Some(500), Spent::new);
        granted(w.reserve(&book, "a", Category::Chat, 400)).settle(400);
        assert!(matches!(
            w.reserve(&book, "b", Category::Chat, 1),
            Reserve::Refused
        ));
        let views = book.views([]);
        let a = views.iter().find(|v| v.key.0 == "a").unwrap();
        assert_eq!((a.limit, a.source), (500, "api"));
        assert!(a.leased >= 450 && a.leased <= 500, "{a:?}");
    }

    #[test]
    fn a_remote_book_spends_only_what_the_control_plane_granted() {
        let control = book(None, 100);
        let remote = BudgetBook::granted("2026-11-27".into(), limits(None, 100));
        let w = WorkerBudgets::default();
        let etl = ("etl".to_string(), None);
        assert!(w.awaiting_lease(&remote, "etl", Category::Chat));
        assert!(
            !w.awaiting_lease(&control, "etl", Category::Chat),
            "only remote books wait"
        );
        assert!(matches!(
            w.reserve(&remote, "etl", Category::Chat, 10),
            Reserve::Refused
        ));
        // Only the budgets a request came for are leased: the service's own, not its code
        // budget, until a code request comes.
        assert_eq!(remote.running_low(50), vec![(etl.clone(), 0)]);
        assert!(w.awaiting_lease(&remote, "etl", Category::Code));
        assert_eq!(
            remote.running_low(50),
            vec![
                (etl.clone(), 0),
                (("etl".to_string(), Some(Category::Code)), 0)
            ]
        );
        // At most half of what is left at a time.
        assert_eq!(control.grant(etl.clone(), 600, 0), Some(500));
        remote.add_grant(etl.clone(), 500);
        remote.add_grant(("etl".to_string(), Some(Category::Code)), 0);
        assert!(!w.awaiting_lease(&remote, "etl", Category::Chat));
        assert!(
            !w.awaiting_lease(&remote, "etl", Category::Code),
            "answered, if with nothing"
        );
        granted(w.reserve(&remote, "etl", Category::Chat, 500)).settle(500);
        assert!(matches!(
            w.reserve(&remote, "etl", Category::Chat, 200),
            Reserve::Refused
        ));
        // A request that waits asks for what it lacks, even with more than the low water
        // left, until an answer; a budget the control plane said is spent is not waited for,
        // nor one of this process's own.
        assert!(remote.running_low(0).is_empty());
        assert!(w.ask_for_more(&remote, "etl", Category::Chat, 200));
        assert_eq!(remote.running_low(0), vec![(etl.clone(), 200)]);
        assert!(w.more_may_come(&remote, "etl", Category::Chat));
        assert!(
            !w.ask_for_more(&remote, "etl", Category::Code, 200),
            "spent"
        );
        assert!(
            !w.ask_for_more(&control, "etl", Category::Chat, 200),
            "local"
        );
        remote.add_grant(etl.clone(), 300);
        assert!(!w.more_may_come(&remote, "etl", Category::Chat), "answered");
        assert!(remote.running_low(0).is_empty());
        granted(w.reserve(&remote, "etl", Category::Chat, 200)).settle(0);
        // A control plane not answering: nobody waits until it answers again.
        assert!(w.ask_for_more(&remote, "etl", Category::Chat, 1 << 30));
        remote.stop_waiting();
        assert!(!w.more_may_come(&remote, "etl", Category::Chat));
        assert!(!w.ask_for_more(&remote, "etl", Category::Chat, 1 << 30));
        // What a waiting request needs is granted whole when that much is left, even past
        // half of it.
        let small = book(None, 100);
        assert_eq!(small.grant(etl.clone(), 100, 900), Some(900));
        assert_eq!(
            small.grant(etl.clone(), 100, 900),
            Some(50),
            "else the usual lease"
        );
        assert_eq!(control.grant(etl.clone(), 600, 0), Some(250));
        assert_eq!(control.grant(etl.clone(), 100, 0), Some(100));
        for _ in 0..20 {
            control.grant(etl.clone(), 600, 0);
        }
        assert_eq!(control.grant(etl, 600, 0), Some(0), "all granted");
        assert_eq!(
            control.grant(("other".into(), None), 600, 0),
            None,
            "unlimited"
        );
    }

    #[test]
    fn reservations_out_when_the_book_changes_settle_with_the_pool() {
        let book = book(None, 500);
        let w = WorkerBudgets::default();
        let out = granted(w.reserve(&book, "etl", Category::Chat, 300));
        let over = granted(w.reserve(&book, "etl", Category::Chat, 100));
        // A config change: the worker returns its idle lease; the two requests still run.
        book.set_override(("etl".into(), None), Some(1_000), Spent::new);
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 1),
            Reserve::Granted(_)
        ));
        out.settle(50);
        over.settle(150);
        let etl = book
            .views([])
            .into_iter()
            .find(|v| v.key == ("etl".into(), None))
            .unwrap();
        // 50 + 150 spent, plus the new worker lease (half of the 600 left then, under one
        // chunk of 500), is all that is out.
        assert_eq!(etl.leased, 500, "{etl:?}");
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 1 << 62),
            Reserve::Refused
        ));
    }

    #[test]
    fn a_budget_limited_mid_day_starts_from_what_it_spent_without_one() {
        let unlimited = Limits {
            lease_micros: 100,
            ..Limits::default()
        };
        let book = BudgetBook::new("2026-11-27".into(), unlimited);
        let w = WorkerBudgets::default();
        let etl = ("etl".to_string(), None);
        let spent = BTreeMap::from([(etl.clone(), 500)]);
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 1 << 40),
            Reserve::Unlimited
        ));
        book.set_override(etl.clone(), Some(600), || spent.clone());
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 150),
            Reserve::Refused
        ));
        granted(w.reserve(&book, "etl", Category::Chat, 100)).settle(100);
        // Unlimited for a while (spending 300 more), then limited again by the config: the
        // pool left from the first limit missed that spend.
        book.set_override(etl.clone(), None, Spent::new);
        let spent = BTreeMap::from([(etl.clone(), 900)]);
        book.set_limits(limits(None, 100), || spent.clone());
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 150),
            Reserve::Refused
        ));
        granted(w.reserve(&book, "etl", Category::Chat, 100));
    }

    #[test]
    fn a_new_day_starts_from_what_was_spent_before_a_restart() {
        let book = book(None, 100);
        let w = WorkerBudgets::default();
        book.start_day(
            "2026-11-28".into(),
            BTreeMap::from([(("etl".to_string(), None), 990)]),
        );
        assert!(matches!(
            w.reserve(&book, "etl", Category::Chat, 20),
            Reserve::Refused
        ));
        granted(w.reserve(&book, "etl", Category::Chat, 10)).settle(10);
    }
}
