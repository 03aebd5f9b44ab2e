//! Usage ledger: drains usage events from the workers and keeps per-service totals.
//! Must not: block the workers (they never wait on this side).

use crate::metrics::Metrics;
use crossbeam_channel::TryRecvError;
use hashbrown::Equivalent;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use switchyard_dataplane::budget::BudgetKey;
use switchyard_dataplane::usage::UsageReceiver;
use switchyard_shared::category::Category;
use switchyard_shared::usage::UsageEvent;

/// Spend of one (day, service, category, tier, model): the rows of `GetSpend`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpendKey {
    pub day: String,
    pub service: String,
    pub category: Category,
    pub tier: Arc<str>,
    pub model: Arc<str>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpendTotals {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: u64,
    pub cache_hits: u64,
    /// What cache hits would have cost upstream.
    pub saved_micros: u64,
    /// Requests charged by estimate because the backend sent no usage.
    pub estimated: u64,
}

impl SpendTotals {
    /// Saturating: a remote data plane's figures are not to be trusted to stay small.
    fn add(&mut self, o: &SpendTotals) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cost_micros = self.cost_micros.saturating_add(o.cost_micros);
        self.cache_hits = self.cache_hits.saturating_add(o.cache_hits);
        self.saved_micros = self.saved_micros.saturating_add(o.saved_micros);
        self.estimated = self.estimated.saturating_add(o.estimated);
    }

    /// The stored form (see `store`).
    pub fn to_array(&self) -> [u64; 8] {
        [
            self.requests,
            self.errors,
            self.prompt_tokens,
            self.completion_tokens,
            self.cost_micros,
            self.cache_hits,
            self.saved_micros,
            self.estimated,
        ]
    }

    pub fn from_array(a: [u64; 8]) -> SpendTotals {
        let [requests, errors, prompt_tokens, completion_tokens, cost_micros, cache_hits, saved_micros, estimated] =
            a;
        SpendTotals {
            requests,
            errors,
            prompt_tokens,
            completion_tokens,
            cost_micros,
            cache_hits,
            saved_micros,
            estimated,
        }
    }

    fn of(e: &UsageEvent) -> SpendTotals {
        SpendTotals {
            requests: 1,
            errors: u64::from(e.status >= 400 || e.incomplete),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cost_micros: e.cost_micros,
            cache_hits: u64::from(e.cache == "hit"),
            saved_micros: e.saved_micros,
            estimated: u64::from(e.tokens_estimated),
        }
    }
}

/// Response-cache outcomes of one service and category.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheTotals {
    pub hits: u64,
    /// Lookups that found nothing (including those whose answer was then stored).
    pub misses: u64,
    pub stores: u64,
    pub bypasses: u64,
    pub saved_micros: u64,
}

/// A spend row within one day and service: (category, tier, model).
type RowKey = (Category, Arc<str>, Arc<str>);

/// A `RowKey` borrowed from an event. Finding a row with it clones no `Arc`: each clone and
/// drop is an atomic write to a count the workers write too, which moved the cache line
/// between cores for every request. Hashes like `RowKey` (a derived `Hash` hashes the fields
/// in order, as a tuple does, and `Arc<str>` hashes as `str`).
#[derive(Hash)]
struct RowKeyRef<'e>(Category, &'e str, &'e str);

impl Equivalent<RowKey> for RowKeyRef<'_> {
    fn equivalent(&self, key: &RowKey) -> bool {
        self.0 == key.0 && same(self.1, &key.1) && same(self.2, &key.2)
    }
}

/// String equality that skips the byte comparison when both are the same string: names in
/// events and in keys usually come from one routing table's `Arc<str>` (the comparisons were
/// most of the metrics' cost per event; perf).
pub(crate) fn same(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

#[derive(Default)]
struct Row {
    totals: SpendTotals,
    /// Changed since the last flush to the store.
    dirty: bool,
}

/// foldhash (hashbrown's default): about twice as fast as ahash's portable hash on the short
/// names these maps are keyed by, which are hashed several times per event.
pub(crate) type Map<K, V> = hashbrown::HashMap<K, V>;

/// day -> service -> rows: nested, so counting an event looks up by `&str` without allocating.
type Spend = Map<String, Map<String, Map<RowKey, Row>>>;

/// The value at `key`, found in one lookup by a borrowed key, and inserted empty with the key
/// `owned` makes if missing (allocating only then).
pub(crate) fn slot<'m, K: Hash, Q: Hash + Equivalent<K> + ?Sized, V: Default>(
    map: &'m mut Map<K, V>,
    key: &Q,
    owned: impl FnOnce() -> K,
) -> &'m mut V {
    map.raw_entry_mut()
        .from_key(key)
        .or_insert_with(|| (owned(), V::default()))
        .1
}

/// The rows of `service` on the day `days` belongs to.
fn rows_of<'m>(
    days: &'m mut Map<String, Map<RowKey, Row>>,
    service: &str,
) -> &'m mut Map<RowKey, Row> {
    slot(days, service, || service.to_owned())
}

/// Moves events into `batch` up to its capacity; `Err` says why it stopped before that.
fn fill(events: &UsageReceiver, batch: &mut Vec<UsageEvent>) -> Result<(), TryRecvError> {
    while batch.len() < batch.capacity() {
        batch.push(events.try_recv()?);
    }
    Ok(())
}

/// Events counted under one take of the ledger's locks.
const BATCH: usize = 256;

#[derive(Default)]
pub struct Ledger {
    spend: Mutex<Spend>,
    /// service -> category: nested like `spend`, so a cache event allocates nothing.
    cache: Mutex<Map<String, BTreeMap<Category, CacheTotals>>>,
    budget_downgrades: AtomicU64,
    budget_rejections: AtomicU64,
    rate_limited: AtomicU64,
    pub metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ledger {
    /// Counts one finished request on `day` (its budget day).
    pub fn record(&self, e: &UsageEvent, day: &str) {
        self.record_all(std::slice::from_ref(e), day);
    }

    /// Counts finished requests on `day`, taking each lock once for all of them.
    pub fn record_all(&self, events: &[UsageEvent], day: &str) {
        let mut spend = lock(&self.spend);
        let days = slot(&mut spend, day, || day.to_owned());
        for e in events {
            let key = RowKeyRef(e.category, &e.tier, &e.model);
            let row = slot(rows_of(days, &e.service), &key, || {
                (e.category, e.tier.clone(), e.model.clone())
            });
            row.totals.add(&SpendTotals::of(e));
            row.dirty = true;
        }
        drop(spend);
        self.metrics.record_all(events);
        let mut cache = lock(&self.cache);
        for e in events {
            if e.budget_downgraded {
                self.budget_downgrades.fetch_add(1, Relaxed);
            }
            match e.refused_by {
                "budget" => self.budget_rejections.fetch_add(1, Relaxed),
                "rate_limit_requests" | "rate_limit_tokens" => {
                    self.rate_limited.fetch_add(1, Relaxed)
                }
                _ => 0,
            };
            if e.cache.is_empty() {
                continue;
            }
            let service = &*e.service;
            let c = slot(&mut cache, service, || service.to_owned())
                .entry(e.category)
                .or_default();
            match e.cache {
                "hit" => c.hits += 1,
                "stored" => {
                    c.misses += 1;
                    c.stores += 1;
                }
                "miss" => c.misses += 1,
                _ => c.bypasses += 1,
            }
            c.saved_micros += e.saved_micros;
        }
    }

    pub fn budget_downgrades(&self) -> u64 {
        self.budget_downgrades.load(Relaxed)
    }

    pub fn budget_rejections(&self) -> u64 {
        self.budget_rejections.load(Relaxed)
    }

    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Relaxed)
    }

    /// Starts from spend loaded from the store.
    pub fn with_spend(loaded: BTreeMap<SpendKey, SpendTotals>) -> Ledger {
        let mut spend = Spend::default();
        for (k, totals) in loaded {
            let rows = rows_of(slot(&mut spend, &k.day, || k.day.clone()), &k.service);
            rows.insert(
                (k.category, k.tier, k.model),
                Row {
                    totals,
                    dirty: false,
                },
            );
        }
        Ledger {
            spend: Mutex::new(spend),
            ..Ledger::default()
        }
    }

    /// Every row that `keep` selects by day and service, as (key, totals).
    fn rows(
        &self,
        mut keep: impl FnMut(&str, &str, &mut Row) -> bool,
    ) -> Vec<(SpendKey, SpendTotals)> {
        let mut out = Vec::new();
        for (day, services) in lock(&self.spend).iter_mut() {
            for (service, rows) in services.iter_mut() {
                for ((category, tier, model), row) in rows.iter_mut() {
                    if keep(day, service, row) {
                        let key = SpendKey {
                            day: day.clone(),
                            service: service.clone(),
                            category: *category,
                            tier: tier.clone(),
                            model: model.clone(),
                        };
                        out.push((key, row.totals.clone()));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The rows changed since the last call, with their totals now, for the store.
    pub fn take_dirty(&self) -> Vec<(SpendKey, SpendTotals)> {
        self.rows(|_, _, row| std::mem::take(&mut row.dirty))
    }

    /// Puts rows back after a failed flush, so the next one writes them.
    pub fn mark_dirty(&self, keys: impl IntoIterator<Item = SpendKey>) {
        let mut spend = lock(&self.spend);
        for k in keys {
            let rows = rows_of(slot(&mut spend, &k.day, || k.day.clone()), &k.service);
            if let Some(row) = rows.get_mut(&(k.category, k.tier, k.model)) {
                row.dirty = true;
            }
        }
    }

    /// Cost spent on `day` per budget: per service, and per service and category.
    pub fn spent_by_budget(&self, day: &str) -> BTreeMap<BudgetKey, u64> {
        let mut out = BTreeMap::new();
        for (k, t) in self.spend(day, None) {
            for key in [(k.service.clone(), None), (k.service, Some(k.category))] {
                let spent: &mut u64 = out.entry(key).or_default();
                *spent = spent.saturating_add(t.cost_micros);
            }
        }
        out
    }

    /// Spend rows of `day`, optionally of one service.
    pub fn spend(&self, day: &str, service: Option<&str>) -> Vec<(SpendKey, SpendTotals)> {
        self.rows(|d, s, _| d == day && service.is_none_or(|want| want == s))
    }

    /// Totals per service over every day.
    pub fn totals(&self) -> BTreeMap<String, SpendTotals> {
        let mut out: BTreeMap<String, SpendTotals> = BTreeMap::new();
        for (k, t) in self.rows(|_, _, _| true) {
            out.entry(k.service).or_default().add(&t);
        }
        out
    }

    pub fn cache_totals(&self) -> BTreeMap<(String, Category), CacheTotals> {
        let cache = lock(&self.cache);
        let per_service = cache.iter().flat_map(|(service, categories)| {
            categories
                .iter()
                .map(move |(category, c)| ((service.clone(), *category), c.clone()))
        });
        per_service.collect()
    }

    /// Drains the channel until every sender is gone, every `busy` period while events come
    /// and every `idle` period once a drain found none; `today` names the budget day events
    /// are counted on. Polling instead of a blocking receive means a worker's `try_send` never
    /// has a sleeping thread to wake: the futex wake-up it would cost per request showed in
    /// profiles of the request path. Short periods under load keep each drain short, so it
    /// takes a core from the workers for less time at once. `in_flight` says whether requests
    /// are running (for returning free memory only once there is no traffic). Returns once
    /// `stop` is set and everything sent before has been recorded (at exit: no spend lost).
    pub fn consume(
        &self,
        events: UsageReceiver,
        log_events: bool,
        (busy, idle): (std::time::Duration, std::time::Duration),
        today: impl Fn() -> String,
        in_flight: impl Fn() -> bool,
        stop: &AtomicBool,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut trim = crate::trim::IdleTrim::default();
        loop {
            // Read before the drain: whatever was sent before the stop is taken by it.
            let stopping = stop.load(SeqCst);
            let day = today();
            let mut drained = false;
            let disconnected = loop {
                let stopped = fill(&events, &mut batch);
                drained |= !batch.is_empty();
                if log_events {
                    batch.iter().for_each(UsageEvent::log);
                }
                self.record_all(&batch, &day);
                batch.clear();
                match stopped {
                    Ok(()) => {}
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            if disconnected || stopping {
                return;
            }
            trim.drained(drained || in_flight(), std::time::Instant::now());
            std::thread::sleep(if drained { busy } else { idle });
        }
    }

    pub fn summary(&self, dropped: u64) -> String {
        let mut out = String::from("switchyard: usage by service:");
        for (name, t) in self.totals() {
            let _ = write!(
                out,
                "\n  {name}: {} requests ({} failed), {} prompt + {} completion tokens, ${}.{:06}",
                t.requests,
                t.errors,
                t.prompt_tokens,
                t.completion_tokens,
                t.cost_micros / 1_000_000,
                t.cost_micros % 1_000_000
            );
            if t.cache_hits > 0 {
                let saved = t.saved_micros;
                let _ = write!(
                    out,
                    "; {} cache hits saved ${}.{:06}",
                    t.cache_hits,
                    saved / 1_000_000,
                    saved % 1_000_000
                );
            }
        }
        for ((service, category), c) in self.cache_totals() {
            let _ = write!(
                out,
                "\n  cache {service}/{category}: {} hits, {} misses, {} stored, {} bypassed, ${}.{:06} saved",
                c.hits, c.misses, c.stores, c.bypasses, c.saved_micros / 1_000_000, c.saved_micros % 1_000_000
            );
        }
        if dropped > 0 {
            let _ = write!(out, "\n  {dropped} usage events dropped (channel full)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, status: u16, cost: u64) -> UsageEvent {
        UsageEvent {
            request_id: 1,
            service: service.into(),
            endpoint: "/v1/chat/completions",
            category: Category::Chat,
            tier: "small".into(),
            backend: "b".into(),
            model: "m".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            cost_micros: cost,
            first_byte_us: 1,
            total_us: 2,
            status,
            attempts: 1,
            config_version: 1,
            ..UsageEvent::default()
        }
    }

    #[test]
    fn totals_add_up_per_service() {
        let ledger = Ledger::default();
        let (tx, rx) = crossbeam_channel::bounded(8);
        tx.send(event("a", 200, 1_500_000)).unwrap();
        tx.send(event("a", 502, 0)).unwrap();
        tx.send(event("b", 200, 7)).unwrap();
        let mut hit = event("b", 200, 0);
        hit.cache = "hit";
        hit.saved_micros = 7;
        tx.send(hit).unwrap();
        let mut stored = event("b", 200, 7);
        stored.cache = "stored";
        tx.send(stored).unwrap();
        drop(tx);
        let period = std::time::Duration::from_millis(1);
        ledger.consume(
            rx,
            false,
            (period, period),
            || "2026-11-27".into(),
            || false,
            &AtomicBool::new(false),
        );
        let t = ledger.totals();
        assert_eq!(
            t["a"],
            SpendTotals {
                requests: 2,
                errors: 1,
                prompt_tokens: 20,
                completion_tokens: 10,
                cost_micros: 1_500_000,
                cache_hits: 0,
                saved_micros: 0,
                estimated: 0,
            }
        );
        assert_eq!(t["b"].cost_micros, 14);
        let dirty = ledger.take_dirty();
        assert_eq!(
            dirty.len(),
            2,
            "one row per day, service, category, tier, model"
        );
        assert!(ledger.take_dirty().is_empty(), "flushed rows are clean");
        ledger.mark_dirty(dirty.into_iter().map(|(k, _)| k));
        assert_eq!(ledger.take_dirty().len(), 2, "a failed flush is retried");
        assert_eq!(ledger.spend("2026-11-27", Some("b")).len(), 1);
        assert!(ledger.spend("2026-11-28", None).is_empty());
        assert_eq!(
            ledger.spent_by_budget("2026-11-27")[&("b".to_string(), Some(Category::Chat))],
            14
        );
        assert_eq!((t["b"].cache_hits, t["b"].saved_micros), (1, 7));
        let cache = ledger.cache_totals();
        assert_eq!(
            cache[&("b".to_string(), Category::Chat)],
            CacheTotals {
                hits: 1,
                misses: 1,
                stores: 1,
                bypasses: 0,
                saved_micros: 7
            }
        );
        assert!(
            !cache.contains_key(&("a".to_string(), Category::Chat)),
            "uncacheable requests leave no cache counts"
        );
        assert!(ledger
            .summary(0)
            .contains("cache b/chat: 1 hits, 1 misses, 1 stored, 0 bypassed, $0.000007 saved"));
        assert!(ledger
            .summary(3)
            .contains("a: 2 requests (1 failed), 20 prompt + 10 completion tokens, $1.500000"));
        assert!(ledger.summary(3).contains("3 usage events dropped"));
    }

    #[test]
    fn more_events_than_one_batch_are_all_counted() {
        let ledger = Ledger::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let n = BATCH * 2 + 7;
        for i in 0..n {
            tx.send(event(if i % 2 == 0 { "a" } else { "b" }, 200, 1))
                .unwrap();
        }
        drop(tx);
        let period = std::time::Duration::from_millis(1);
        ledger.consume(
            rx,
            false,
            (period, period),
            || "2026-11-28".into(),
            || false,
            &AtomicBool::new(false),
        );
        let t = ledger.totals();
        assert_eq!(t["a"].requests + t["b"].requests, n as u64);
        assert_eq!(t["a"].cost_micros, n.div_ceil(2) as u64);
    }
}
