//! Usage ledger: drains usage events from the workers and keeps per-service totals.
//! Must not: block the workers (they never wait on this side).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use switchyard_dataplane::usage::UsageReceiver;
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

#[derive(Default)]
pub struct Ledger {
    services: Mutex<BTreeMap<String, ServiceTotals>>,
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
        if dropped > 0 {
            let _ = write!(out, "\n  {dropped} usage events dropped (channel full)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_shared::category::Category;

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
        assert_eq!(t["b"].cost_micros, 7);
        assert!(ledger
            .summary(3)
            .contains("a: 2 requests (1 failed), 20 prompt + 10 completion tokens, $1.500000"));
        assert!(ledger.summary(3).contains("3 usage events dropped"));
    }
}
