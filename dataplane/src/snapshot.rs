//! What a worker reads per request: the routing table plus live backend state and
//! precomputed bodies, published as one immutable snapshot through arc-swap.
//! Must not: be mutated after publication; a new config is a new snapshot.

use crate::balancer::BackendStates;
use crate::ratelimit::RateLimits;
use arc_swap::ArcSwap;
use std::sync::Arc;
use switchyard_shared::routing::{Backend, RoutingTable, Scheme};

pub struct Snapshot {
    pub table: RoutingTable,
    /// Shared by successive snapshots of the same backends, so health survives a reload.
    pub states: Arc<BackendStates>,
    /// `GET /v1/models` body: every alias and served model, OpenAI list format.
    pub models_body: Vec<u8>,
    /// rustls client config per backend (`None` for plain http).
    pub tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// Rate-limit buckets of this config's limits (kept across reloads that leave them alone).
    pub limits: Arc<RateLimits>,
}

impl Snapshot {
    /// `GET /v1/models/{id}`: the model object, if the router knows the name.
    pub fn model_body(&self, id: &str) -> Option<Vec<u8>> {
        model_object(&self.table, id)
            .map(|m| serde_json::to_vec(&m).expect("JSON values serialise"))
    }

    /// Fails only on TLS material that cannot be loaded. `granted_limits`: rate-limit
    /// allowance comes from a control plane's grants (a remote data plane).
    pub fn new(table: RoutingTable, granted_limits: bool) -> Result<Snapshot, String> {
        let limits = Arc::new(RateLimits::new(table.rate_limits.clone(), granted_limits));
        let checks = table.health.interval.is_some();
        let states = BackendStates::new(table.backends.len(), checks);
        Snapshot::build(table, states, limits)
    }

    /// The snapshot for a newly applied config. Each backend that is still there (same name
    /// and address) keeps its health and in-flight count (`BackendStates::carried_over`); all
    /// start fresh when active health checks were turned on or off, which changes what a new
    /// state assumes.
    pub fn replacing(table: RoutingTable, previous: &Snapshot) -> Result<Snapshot, String> {
        let old = &previous.table;
        let same = |a: &Backend, b: &Backend| {
            (&a.name, a.scheme, &a.host, a.port, &a.base_path)
                == (&b.name, b.scheme, &b.host, b.port, &b.base_path)
        };
        let checks = table.health.interval.is_some();
        let carried = (old.health.interval.is_some() == checks).then_some(&*previous.states);
        let states = BackendStates::carried_over(
            carried,
            table
                .backends
                .iter()
                .map(|b| old.backends.iter().position(|a| same(a, b))),
            checks,
        );
        let limits = if old.rate_limits == table.rate_limits {
            previous.limits.clone()
        } else {
            Arc::new(previous.limits.replacing(table.rate_limits.clone()))
        };
        Snapshot::build(table, states, limits)
    }

    fn build(
        table: RoutingTable,
        states: BackendStates,
        limits: Arc<RateLimits>,
    ) -> Result<Snapshot, String> {
        let tls = tls_configs(&table)?;
        let states = states.named(table.backends.iter().map(|b| b.name.clone()));
        let models_body = models_body(&table);
        Ok(Snapshot {
            limits,
            table,
            states: Arc::new(states),
            models_body,
            tls,
        })
    }
}

/// Each backend's TLS client config (`None` for plain HTTP), or why one cannot be built: the
/// TLS material (CA files) a table needs, loaded as serving it would.
pub fn tls_configs(table: &RoutingTable) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, String> {
    table
        .backends
        .iter()
        .map(|b| match b.scheme {
            Scheme::Https => crate::upstream::tls_config(b).map(Some),
            Scheme::Http => Ok(None),
        })
        .collect()
}

fn models_body(table: &RoutingTable) -> Vec<u8> {
    let mut names: Vec<&str> = table.aliases.keys().map(String::as_str).collect();
    names.extend(table.models.keys().map(String::as_str));
    names.sort();
    let data: Vec<serde_json::Value> = names
        .into_iter()
        .filter_map(|id| model_object(table, id))
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
        .expect("JSON values serialise")
}

/// One entry of `GET /v1/models` (and the answer to `GET /v1/models/{id}`): an alias the
/// router resolves, or a model a backend serves.
fn model_object(table: &RoutingTable, id: &str) -> Option<serde_json::Value> {
    let owner = if table.aliases.contains_key(id) {
        "switchyard"
    } else if table.models.contains_key(id) {
        "switchyard-backend"
    } else {
        return None;
    };
    Some(serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
}

/// The published snapshot. Workers read it; the control plane swaps it.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::Verdict;

    fn table(backends: &[(&str, u16)]) -> RoutingTable {
        let mut text = String::from("[health]\ninterval_ms = 0\neject_after_failures = 1\n");
        for (name, port) in backends {
            text += &format!(
                "[[backends]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}\"\nmodels = [{{ name = \"m\" }}]\n"
            );
        }
        let targets: Vec<String> = backends.iter().map(|(n, _)| format!("\"{n}/m\"")).collect();
        text += &format!(
            "[[tiers]]\nname = \"t\"\ntargets = [{}]\n",
            targets.join(", ")
        );
        switchyard_shared::config::load_str(&text, "t", &|_| None).unwrap()
    }

    #[test]
    fn a_reload_keeps_the_state_of_every_backend_still_there() {
        let first = Snapshot::new(table(&[("a", 1), ("b", 2)]), false).unwrap();
        let health = &first.table.health;
        let in_flight = first.states.admit(0, 10).unwrap();
        first.states.record(1, Verdict::Failure, health, false);
        assert!(first.states.is_ejected(1));
        // Reordered, one added, and `a` moved to another port (a different backend now).
        let moved = table(&[("c", 3), ("b", 2), ("a", 9)]);
        let second = Snapshot::replacing(moved, &first).unwrap();
        assert!(second.states.is_ejected(1), "b stays ejected");
        assert!(!second.states.is_ejected(0) && second.states.inflight(0) == 0);
        assert_eq!(
            second.states.inflight(2),
            0,
            "a at a new address starts fresh"
        );
        let back = Snapshot::replacing(table(&[("b", 2), ("a", 1)]), &second).unwrap();
        assert_eq!(
            back.states.inflight(1),
            0,
            "a's old state was not kept by `second`"
        );
        let kept = Snapshot::replacing(table(&[("b", 2), ("a", 1)]), &first).unwrap();
        assert_eq!(
            kept.states.inflight(1),
            1,
            "a's request in flight still counts"
        );
        drop(in_flight);
        assert_eq!(
            kept.states.inflight(1),
            0,
            "and its end is seen by the new snapshot"
        );
        assert!(kept.states.is_ejected(0));
    }
}
