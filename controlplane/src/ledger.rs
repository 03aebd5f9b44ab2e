//! Usage ledger: drains usage events from the workers and keeps per-service totals.
//! Must not: block the workers (they never wait on this side).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use switchyard_dataplane::usage::UsageReceiver;
use switchyard_shared::category::Category;
use switchyard_shared::usage::UsageEvent;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServiceTotals {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: u64,
    pub cache_hits: u64,
    /// What cache hits would have cost upstream.
    pub saved_micros: u64,
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

#[derive(Default)]
pub struct Ledger {
    services: Mutex<BTreeMap<String, ServiceTotals>>,
    cache: Mutex<BTreeMap<(String, Category), CacheTotals>>,
}

impl Ledger {
    pub fn record(&self, e: &UsageEvent) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let t = services.entry(e.service.clone()).or_default();
        t.requests += 1;
        t.errors += u64::from(e.status >= 400 || e.incomplete);
        t.prompt_tokens += e.prompt_tokens;
        t.completion_tokens += e.completion_tokens;
        t.cost_micros += e.cost_micros;
        t.cache_hits += u64::from(e.cache == "hit");
        t.saved_micros += e.saved_micros;
        drop(services);
        if !e.cache.is_empty() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let c = cache.entry((e.service.clone(), e.category)).or_default();
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

    pub fn cache_totals(&self) -> BTreeMap<(String, Category), CacheTotals> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drains the channel every `period` until every sender is gone. Polling instead of a
    /// blocking receive means a worker's `try_send` never has a sleeping thread to wake: the
    /// futex wake-up it would cost per request showed in profiles of the request path.
    pub fn consume(&self, events: UsageReceiver, log_events: bool, period: std::time::Duration) {
        loop {
            let disconnected = loop {
                match events.try_recv() {
                    Ok(e) => {
                        if log_events {
                            if let Ok(line) = serde_json::to_string(&e) {
                                eprintln!("{line}");
                            }
                        }
                        self.record(&e);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break false,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
                }
            };
            if disconnected {
                return;
            }
            std::thread::sleep(period);
        }
    }

    pub fn totals(&self) -> BTreeMap<String, ServiceTotals> {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
            cached_tokens: 0,
            completion_tokens: 5,
            tokens_estimated: false,
            cost_micros: cost,
            first_byte_us: 1,
            total_us: 2,
            status,
            attempts: 1,
            streamed: false,
            incomplete: false,
            cache: "",
            saved_micros: 0,
            config_version: 1,
        }
    }

    #[test]
    fn totals_add_up_per_service() {
        let ledger = Ledger::default();
        let (tx, rx) = crossbeam_channel::bounded(8);
        tx.send(Box::new(event("a", 200, 1_500_000))).unwrap();
        tx.send(Box::new(event("a", 502, 0))).unwrap();
        tx.send(Box::new(event("b", 200, 7))).unwrap();
        let mut hit = event("b", 200, 0);
        hit.cache = "hit";
        hit.saved_micros = 7;
        tx.send(Box::new(hit)).unwrap();
        let mut stored = event("b", 200, 7);
        stored.cache = "stored";
        tx.send(Box::new(stored)).unwrap();
        drop(tx);
        ledger.consume(rx, false, std::time::Duration::from_millis(1));
        let t = ledger.totals();
        assert_eq!(
            t["a"],
            ServiceTotals {
                requests: 2,
                errors: 1,
                prompt_tokens: 20,
                completion_tokens: 10,
                cost_micros: 1_500_000,
                cache_hits: 0,
                saved_micros: 0,
            }
        );
        assert_eq!(t["b"].cost_micros, 14);
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
}
