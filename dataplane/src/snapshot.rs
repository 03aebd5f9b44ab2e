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
    /// Fails only on TLS material that cannot be loaded. `granted_limits`: rate-limit
    /// allowance comes from a control plane's grants (a remote data plane).
    pub fn new(table: RoutingTable, granted_limits: bool) -> Result<Snapshot, String> {
        let limits = Arc::new(RateLimits::new(table.rate_limits.clone(), granted_limits));
        Snapshot::build(table, None, limits)
    }

    /// The snapshot for a newly applied config. Backend health and in-flight counts carry over
    /// when the backends are the same ones (same names and addresses, same order), so a reload
    /// neither forgets an ejected backend nor resets concurrency caps under live traffic.
    pub fn replacing(table: RoutingTable, previous: &Snapshot) -> Result<Snapshot, String> {
        let old = &previous.table;
        let same = |a: &Backend, b: &Backend| {
            (&a.name, a.scheme, &a.host, a.port, &a.base_path)
                == (&b.name, b.scheme, &b.host, b.port, &b.base_path)
        };
        let keep = old.backends.len() == table.backends.len()
            && old.health.interval.is_some() == table.health.interval.is_some()
            && old
                .backends
                .iter()
                .zip(&table.backends)
                .all(|(a, b)| same(a, b));
        let limits = if old.rate_limits == table.rate_limits {
            previous.limits.clone()
        } else {
            let granted = previous.limits.is_granted();
            Arc::new(RateLimits::new(table.rate_limits.clone(), granted))
        };
        Snapshot::build(table, keep.then(|| previous.states.clone()), limits)
    }

    fn build(
        table: RoutingTable,
        states: Option<Arc<BackendStates>>,
        limits: Arc<RateLimits>,
    ) -> Result<Snapshot, String> {
        let tls = table
            .backends
            .iter()
            .map(|b| match b.scheme {
                Scheme::Https => crate::upstream::tls_config(b).map(Some),
                Scheme::Http => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let states = states.unwrap_or_else(|| {
            let checks = table.health.interval.is_some();
            Arc::new(BackendStates::new(table.backends.len(), checks))
        });
        let models_body = models_body(&table);
        Ok(Snapshot {
            limits,
            table,
            states,
            models_body,
            tls,
        })
    }
}

fn models_body(table: &RoutingTable) -> Vec<u8> {
    let mut names: Vec<(&str, &str)> = table
        .aliases
        .keys()
        .map(|a| (a.as_str(), "switchyard"))
        .collect();
    names.extend(
        table
            .models
            .keys()
            .map(|m| (m.as_str(), "switchyard-backend")),
    );
    names.sort();
    let data: Vec<serde_json::Value> = names
        .into_iter()
        .map(|(id, owner)| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
        .expect("JSON values serialise")
}

/// The published snapshot. Workers read it; the control plane swaps it.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;
