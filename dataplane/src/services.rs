//! Service names callers choose themselves (`x-switchyard-service`). Owns: the bound on how many
//! distinct ones the router accepts (`usage.max_services`). Every service name labels spend
//! rows, metric series, rate-limit buckets and budget pools, each kept per name, so a client
//! that invents names (a request id in the header, say) would grow them without end.
//! Names of API keys and names the config mentions are never counted or refused. The bound is
//! per process (a restart, or each remote data plane, starts counting afresh).
//! Must not: lock per request (a worker takes the lock once per name new to it; a refused name
//! is checked against a snapshot).

use crate::auth::KeyTable;
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use switchyard_shared::routing::RoutingTable;

/// The names accepted so far, shared by the workers: written under the mutex (once per new
/// name), read through the snapshot, so a refused name costs no lock.
#[derive(Default)]
pub struct ServiceNames {
    writing: Mutex<()>,
    accepted: ArcSwap<HashSet<Box<str>>>,
    /// The bound was reached once and said so in the log.
    logged: AtomicBool,
}

/// The names one worker has seen accepted, for the config version they were checked under
/// (a name the config stops mentioning must be counted again).
#[derive(Default)]
pub struct WorkerServiceNames {
    known: RefCell<(u64, HashSet<Box<str>>)>,
}

impl ServiceNames {
    fn accept(&self, name: &str, max: usize) -> bool {
        let refused = |accepted: &HashSet<Box<str>>| {
            let full = !accepted.contains(name) && accepted.len() >= max;
            if full && !self.logged.swap(true, Relaxed) {
                eprintln!("switchyard: {max} distinct x-switchyard-service names are in use (usage.max_services); requests naming another are refused");
            }
            full
        };
        if refused(&self.accepted.load()) {
            return false;
        }
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let accepted = self.accepted.load_full();
        if accepted.contains(name) {
            return true;
        }
        if refused(&accepted) {
            return false;
        }
        // Copied on write: at most `max` times over the process's life.
        let mut more = HashSet::clone(&accepted);
        more.insert(name.into());
        self.accepted.store(Arc::new(more));
        true
    }
}

impl WorkerServiceNames {
    /// Whether requests may name `service`: one the config or an API key names, one accepted
    /// before, or a new one while fewer than `usage.max_services` have been.
    pub fn accept(
        &self,
        shared: &ServiceNames,
        table: &RoutingTable,
        keys: &ArcSwap<KeyTable>,
        service: &str,
    ) -> bool {
        let mut known = self.known.borrow_mut();
        if known.0 != table.version {
            *known = (table.version, HashSet::new());
        }
        if service == "default" || known.1.contains(service) {
            return true;
        }
        let named = table.budgets.services.contains_key(service)
            || table.rate_limits.services.contains_key(service)
            || table
                .rules
                .iter()
                .any(|r| r.when.services.iter().any(|s| s == service))
            || keys.load().names(service);
        if !named && !shared.accept(service, table.usage.max_services) {
            return false;
        }
        known.1.insert(service.into());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{key_hash, KeyGrant};

    fn table(max: usize, budgeted: &str, version: u64) -> RoutingTable {
        let text = format!(
            r#"
[usage]
max_services = {max}
[budgets.services.{budgeted}]
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
        let mut t = switchyard_shared::config::load_str(&text, "t", &|_| None).unwrap();
        t.version = version;
        t
    }

    #[test]
    fn new_names_are_refused_past_the_bound_and_known_ones_never() {
        let shared = ServiceNames::default();
        let keys = ArcSwap::from_pointee(KeyTable::new([(
            key_hash(b"sy-search"),
            KeyGrant {
                service: "indexer".into(),
                any_service: false,
            },
        )]));
        let (one, two) = (WorkerServiceNames::default(), WorkerServiceNames::default());
        let t = table(2, "billing", 1);
        let accept =
            |w: &WorkerServiceNames, t: &RoutingTable, name| w.accept(&shared, t, &keys, name);
        assert!(accept(&one, &t, "etl"));
        assert!(accept(&two, &t, "search"));
        assert!(!accept(&one, &t, "bulk-1"), "a third new name");
        assert!(!accept(&two, &t, "bulk-2"));
        assert!(accept(&two, &t, "etl"), "accepted on another worker");
        assert!(accept(&one, &t, "etl"));
        assert!(accept(&one, &t, "default"));
        assert!(accept(&one, &t, "billing"), "the config names it");
        assert!(accept(&two, &t, "indexer"), "a key names it");
        let reloaded = table(2, "payroll", 2);
        assert!(
            !accept(&one, &reloaded, "billing"),
            "no longer named by the config: counted like any other"
        );
        assert!(accept(&one, &reloaded, "etl"));
        assert!(
            accept(&two, &table(3, "payroll", 3), "bulk-2"),
            "a reload raised the bound"
        );
    }
}
