//! Service names callers choose themselves (`x-switchyard-service`). Owns: the bound on how many
//! distinct ones the router accepts (`usage.max_services`). Every service name labels spend
//! rows, metric series, rate-limit buckets and budget pools, each kept per name, so a client
//! that invents names (a request id in the header, say) would grow them without end.
//! Names of API keys and names the config mentions are never counted or refused.
//! Must not: lock per request (a worker asks the shared set once per name new to it).

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use switchyard_shared::routing::RoutingTable;

/// The names accepted so far, shared by the workers.
#[derive(Default)]
pub struct ServiceNames {
    accepted: Mutex<HashSet<Box<str>>>,
    /// The bound was reached once and said so in the log.
    logged: AtomicBool,
}

/// One worker's copy of the names it has seen accepted.
#[derive(Default)]
pub struct WorkerServiceNames {
    known: RefCell<HashSet<Box<str>>>,
}

impl ServiceNames {
    fn accept(&self, name: &str, max: usize) -> bool {
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.contains(name) {
            return true;
        }
        if accepted.len() >= max {
            if !self.logged.swap(true, Relaxed) {
                eprintln!("switchyard: {max} distinct x-switchyard-service names are in use (usage.max_services); requests naming another are refused");
            }
            return false;
        }
        accepted.insert(name.into());
        true
    }
}

impl WorkerServiceNames {
    /// Whether requests may name `service`: one the config mentions, one accepted before, or
    /// a new one while fewer than `usage.max_services` have been.
    pub fn accept(&self, shared: &ServiceNames, table: &RoutingTable, service: &str) -> bool {
        if service == "default" || self.known.borrow().contains(service) {
            return true;
        }
        let configured = table.budgets.services.contains_key(service)
            || table.rate_limits.services.contains_key(service)
            || table
                .rules
                .iter()
                .any(|r| r.when.services.iter().any(|s| s == service));
        if !configured && !shared.accept(service, table.usage.max_services) {
            return false;
        }
        self.known.borrow_mut().insert(service.into());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(max: usize) -> RoutingTable {
        let text = format!(
            r#"
[usage]
max_services = {max}
[budgets.services.billing]
daily_usd = 5.0
[[backends]]
name = "a"
url = "http://127.0.0.1:1"
models = [{{ name = "m" }}]
[[tiers]]
name = "t"
targets = ["a/m"]
"#
        );
        switchyard_shared::config::load_str(&text, "t", &|_| None).unwrap()
    }

    #[test]
    fn new_names_are_refused_past_the_bound_and_known_ones_never() {
        let shared = ServiceNames::default();
        let (one, two) = (WorkerServiceNames::default(), WorkerServiceNames::default());
        let t = table(2);
        assert!(one.accept(&shared, &t, "etl"));
        assert!(two.accept(&shared, &t, "search"));
        assert!(!one.accept(&shared, &t, "bulk-1"), "a third new name");
        assert!(!two.accept(&shared, &t, "bulk-2"));
        assert!(two.accept(&shared, &t, "etl"), "accepted on another worker");
        assert!(one.accept(&shared, &t, "etl"));
        assert!(one.accept(&shared, &t, "default"));
        assert!(one.accept(&shared, &t, "billing"), "the config names it");
        assert!(
            two.accept(&shared, &table(3), "bulk-2"),
            "a reload raised the bound"
        );
    }
}
