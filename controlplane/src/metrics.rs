//! Prometheus metrics. Owns: the registry, the counters and histograms fed from usage events,
//! and the gauges read from live state when scraped. Served at `/metrics` on the admin listener.
//! Must not: be touched by the data plane (workers only send usage events).

use crate::ledger::{same, slot, Map};
use hashbrown::Equivalent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};
use switchyard_shared::category::Category;
use switchyard_shared::usage::UsageEvent;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    category: String,
    tier: String,
    backend: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    service: String,
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    service: String,
    category: String,
    tier: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    service: String,
    category: String,
    tier: String,
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    service: String,
    category: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub service: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// "applied" or "refused" (invalid, or the file could not be read).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub service: String,
    /// "requests" or "tokens".
    pub limit: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every label an event's metrics carry, besides the service.
type SeriesKey = (
    Category,
    Arc<str>,
    Arc<str>,
    Arc<str>,
    u16,
    &'static str,
    &'static str,
);

/// A `SeriesKey` borrowed from an event, to find its handles without cloning an `Arc` (see
/// `ledger::RowKeyRef`). Hashes like `SeriesKey`.
#[derive(Hash)]
struct SeriesKeyRef<'e>(Category, &'e str, &'e str, &'e str, u16, &'e str, &'e str);

impl Equivalent<SeriesKey> for SeriesKeyRef<'_> {
    fn equivalent(&self, k: &SeriesKey) -> bool {
        self.0 == k.0
            && self.4 == k.4
            && same(self.1, &k.1)
            && same(self.2, &k.2)
            && same(self.3, &k.3)
            && same(self.5, k.5)
            && same(self.6, k.6)
    }
}

/// The metric handles of one label combination (clones share the registered metric).
struct Series {
    requests: Counter,
    duration: Histogram,
    first_byte: Histogram,
    /// prompt, cached, completion.
    tokens: [Counter; 3],
    cost: Counter,
    estimated: Counter,
    downgrades: Counter,
    refusals: Option<Counter>,
    /// Outcome counter and saved micro-dollars, for cacheable requests.
    cache: Option<(Counter, Counter)>,
}

impl Series {
    fn record(&self, e: &UsageEvent) {
        self.requests.inc();
        self.duration.observe(e.total_us as f64 / 1e6);
        self.first_byte.observe(e.first_byte_us as f64 / 1e6);
        let counts = [e.prompt_tokens, e.cached_tokens, e.completion_tokens];
        for (counter, n) in self.tokens.iter().zip(counts) {
            counter.inc_by(n);
        }
        self.cost.inc_by(e.cost_micros);
        if e.tokens_estimated {
            self.estimated.inc();
        }
        if e.budget_downgraded {
            self.downgrades.inc();
        }
        if let Some(refusals) = &self.refusals {
            refusals.inc();
        }
        if let Some((outcomes, saved)) = &self.cache {
            outcomes.inc();
            saved.inc_by(e.saved_micros);
        }
    }
}

fn series_key(e: &UsageEvent) -> SeriesKey {
    (
        e.category,
        e.tier.clone(),
        e.backend.clone(),
        e.model.clone(),
        e.status,
        e.cache,
        e.refused_by,
    )
}

fn latency_histogram() -> Histogram {
    // 1 ms .. about 33 s: cache hits at the bottom, long generations at the top.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric Switchyard exports. Counters are fed by [`Metrics::record`]; gauges are set by
/// the scrape handler from live state just before encoding.
pub struct Metrics {
    registry: Registry,
    /// service -> label combination -> handles.
    series: Mutex<Map<String, Map<SeriesKey, Series>>>,
    requests: Family<RequestLabels, Counter>,
    duration: Histograms<LatencyLabels>,
    first_byte: Histograms<LatencyLabels>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<SpendLabels, Counter>,
    estimated: Family<ServiceLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    cache_saved: Family<ServiceLabels, Counter>,
    pub budget_remaining: Family<BudgetLabels, Gauge>,
    pub budget_downgrades: Family<ServiceLabels, Counter>,
    pub budget_rejections: Family<ServiceLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub backend_healthy: Family<BackendLabels, Gauge>,
    pub backend_inflight: Family<BackendLabels, Gauge>,
    pub usage_dropped: Gauge,
    pub inflight: Gauge,
    pub config_version: Gauge,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    pub cache_evictions: Gauge,
    /// One scrape at a time: it clears the gauges of live state before setting them.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            first_byte: Family::new_with_constructor(latency_histogram),
            tokens: Family::default(),
            cost: Family::default(),
            estimated: Family::default(),
            cache: Family::default(),
            cache_saved: Family::default(),
            budget_remaining: Family::default(),
            budget_downgrades: Family::default(),
            budget_rejections: Family::default(),
            rate_limited: Family::default(),
            backend_healthy: Family::default(),
            backend_inflight: Family::default(),
            usage_dropped: Gauge::default(),
            inflight: Gauge::default(),
            config_version: Gauge::default(),
            config_reloads: Family::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_evictions: Gauge::default(),
            registry: Registry::default(),
            series: Mutex::default(),
            scraping: Mutex::default(),
        };
        let r = &mut registry;
        r.register("requests", "Finished requests", m.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time from receiving a request to its last response byte",
            m.duration.clone(),
        );
        r.register(
            "first_byte_seconds",
            "Time from receiving a request to its first response byte",
            m.first_byte.clone(),
        );
        r.register(
            "tokens",
            "Tokens by kind (prompt, cached, completion)",
            m.tokens.clone(),
        );
        r.register(
            "cost_microdollars",
            "Upstream cost charged, in micro-dollars",
            m.cost.clone(),
        );
        r.register(
            "estimated_usage_requests",
            "Requests charged by estimate because the backend sent no usage",
            m.estimated.clone(),
        );
        r.register(
            "cache_requests",
            "Response cache outcomes (hit, miss, stored, bypass)",
            m.cache.clone(),
        );
        r.register(
            "cache_saved_microdollars",
            "What cache hits would have cost upstream",
            m.cache_saved.clone(),
        );
        r.register(
            "budget_remaining_microdollars",
            "Today's budget left (negative when overspent)",
            m.budget_remaining.clone(),
        );
        r.register(
            "budget_downgrades",
            "Requests moved to a cheaper tier to fit the budget",
            m.budget_downgrades.clone(),
        );
        r.register(
            "budget_rejections",
            "Requests refused because no tier fits the budget",
            m.budget_rejections.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a rate limit",
            m.rate_limited.clone(),
        );
        r.register(
            "backend_healthy",
            "1 when the backend takes traffic, 0 when ejected",
            m.backend_healthy.clone(),
        );
        r.register(
            "backend_inflight",
            "Requests in flight per backend",
            m.backend_inflight.clone(),
        );
        r.register(
            "usage_events_dropped",
            "Usage events dropped because the channel was full",
            m.usage_dropped.clone(),
        );
        r.register(
            "inflight_requests",
            "Requests in flight",
            m.inflight.clone(),
        );
        r.register(
            "config_version",
            "Version of the config in effect",
            m.config_version.clone(),
        );
        r.register(
            "config_reloads",
            "Reloads of the config file (on change or SIGHUP) by outcome: a refused one leaves the running config in effect",
            m.config_reloads.clone(),
        );
        r.register(
            "cache_entries",
            "Response cache entries",
            m.cache_entries.clone(),
        );
        r.register("cache_bytes", "Response cache size", m.cache_bytes.clone());
        r.register(
            "cache_evictions",
            "Entries the response cache evicted to stay within its bound",
            m.cache_evictions.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts finished requests. The metric handles of each label combination are found once
    /// and kept, so a request costs a map lookup and atomic adds, not a dozen label strings.
    pub fn record_all(&self, events: &[UsageEvent]) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            let service = &*e.service;
            let of_service = slot(&mut series, service, || service.to_owned());
            let key = SeriesKeyRef(
                e.category,
                &e.tier,
                &e.backend,
                &e.model,
                e.status,
                e.cache,
                e.refused_by,
            );
            let s = of_service
                .raw_entry_mut()
                .from_key(&key)
                .or_insert_with(|| (series_key(e), self.series_of(e)))
                .1;
            s.record(e);
        }
    }

    /// The handles an event with these labels updates.
    fn series_of(&self, e: &UsageEvent) -> Series {
        let service = e.service.to_string();
        let category = e.category.as_str().to_string();
        let latency = LatencyLabels {
            service: service.clone(),
            tier: e.tier.to_string(),
        };
        let spend = SpendLabels {
            service: service.clone(),
            category: category.clone(),
            tier: e.tier.to_string(),
            model: e.model.to_string(),
        };
        let tokens = ["prompt", "cached", "completion"].map(|kind| {
            let labels = TokenLabels {
                service: service.clone(),
                category: category.clone(),
                tier: spend.tier.clone(),
                model: spend.model.clone(),
                kind,
            };
            self.tokens.get_or_create(&labels).clone()
        });
        let by_service = ServiceLabels {
            service: service.clone(),
        };
        let refusals = match e.refused_by {
            "budget" => Some(self.budget_rejections.get_or_create(&by_service).clone()),
            "rate_limit_requests" | "rate_limit_tokens" => {
                let labels = LimitLabels {
                    service: service.clone(),
                    limit: &e.refused_by["rate_limit_".len()..],
                };
                Some(self.rate_limited.get_or_create(&labels).clone())
            }
            _ => None,
        };
        let cache = (!e.cache.is_empty()).then(|| {
            let labels = CacheLabels {
                service: service.clone(),
                category: category.clone(),
                result: e.cache,
            };
            (
                self.cache.get_or_create(&labels).clone(),
                self.cache_saved.get_or_create(&by_service).clone(),
            )
        });
        Series {
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    service: service.clone(),
                    category,
                    tier: e.tier.to_string(),
                    backend: e.backend.to_string(),
                    status: e.status.to_string(),
                })
                .clone(),
            duration: self.duration.get_or_create(&latency).clone(),
            first_byte: self.first_byte.get_or_create(&latency).clone(),
            tokens,
            cost: self.cost.get_or_create(&spend).clone(),
            estimated: self.estimated.get_or_create(&by_service).clone(),
            downgrades: self.budget_downgrades.get_or_create(&by_service).clone(),
            refusals,
            cache,
        }
    }

    /// The OpenMetrics text exposition.
    /// Sets the gauges of live state (`set`) and encodes everything. The per-backend and
    /// per-budget gauges start empty, so a backend or budget that is gone leaves no series.
    pub fn scrape(&self, set: impl FnOnce(&Metrics)) -> String {
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        self.backend_healthy.clear();
        self.backend_inflight.clear();
        self.budget_remaining.clear();
        set(self);
        self.encode()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_gone_from_the_config_leaves_no_series() {
        let m = Metrics::default();
        let labels = |name: &str| BackendLabels {
            backend: name.into(),
        };
        let page = m.scrape(|m| {
            m.backend_healthy.get_or_create(&labels("old")).set(1);
            m.backend_healthy.get_or_create(&labels("kept")).set(1);
        });
        assert!(page.contains("backend=\"old\""), "{page}");
        let page = m.scrape(|m| {
            m.backend_healthy.get_or_create(&labels("kept")).set(0);
        });
        assert!(!page.contains("backend=\"old\""), "{page}");
        assert!(page.contains("backend=\"kept\""), "{page}");
    }
}
