//! The data plane: thread-per-core monoio workers that parse HTTP, classify, route and relay
//! requests to model backends. Reads routing only from an arc-swap snapshot; reports every
//! finished request on a bounded usage channel.
//!
//! Layout: `codec` (bytes <-> HTTP, no I/O), `sse` (event filter, no I/O), `conn` (a client
//! connection), `proxy` (request phases), `balancer` (backend state and choice), `upstream`
//! (connections and pool), `health` (active checks), `server` (workers), `snapshot`, `usage`,
//! `cache` and `coalesce` (response cache), `budget` (daily budgets: leases and reservations), `auth` (API keys),
//! `ratelimit` (requests and tokens per minute), `services` (the bound on caller-named services),
//! `resolve` (backend names looked up off the workers), `panics` (what a panic ends),
//! `failures` (log lines for failed upstream attempts).

pub mod auth;
pub mod balancer;
pub mod budget;
pub mod cache;
pub mod coalesce;
pub mod codec;
pub mod conn;
pub mod failures;
pub mod health;
pub mod panics;
pub mod proxy;
pub mod ratelimit;
pub mod resolve;
pub mod server;
pub mod services;
pub mod snapshot;
pub mod sse;
pub mod upstream;
pub mod usage;
