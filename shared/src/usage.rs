//! The usage event: one per finished request, sent from a worker to the control plane.
//! Must not: block; the data plane sends with `try_send` and counts what it drops.

use crate::category::Category;
use compact_str::CompactString;
use serde::{Serialize, Serializer};
use std::sync::Arc;

/// Names come from the routing table as `Arc<str>` and the caller's service name is stored
/// inline when short (up to 24 bytes), so building an event usually allocates nothing: an
/// allocation made on a worker and freed on the control thread was the costliest part of
/// counting a request (glibc's arenas serve that pattern slowly; perf, cache hits).
#[derive(Debug, Default, Clone, Serialize)]
pub struct UsageEvent {
    #[serde(serialize_with = "hex_id")]
    pub request_id: u64,
    pub service: CompactString,
    pub endpoint: &'static str,
    pub category: Category,
    /// Empty when the request failed before a tier was chosen.
    pub tier: Arc<str>,
    pub backend: Arc<str>,
    pub model: Arc<str>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Some counts are estimates from text length: the backend sent no `usage`, or an
    /// earlier attempt that a backend took failed without an answer (its prompt, estimated,
    /// is in `prompt_tokens` and `cost_micros`: providers may bill it).
    pub tokens_estimated: bool,
    pub cost_micros: u64,
    /// Microseconds from receiving the request to sending the first response byte.
    pub first_byte_us: u64,
    pub total_us: u64,
    pub status: u16,
    pub attempts: u32,
    pub streamed: bool,
    /// The response was cut off (upstream broke mid-body or the client left).
    pub incomplete: bool,
    /// `x-switchyard-cache`: "hit", "stored", "miss", "bypass", or "" when not cacheable.
    pub cache: &'static str,
    /// For a cache hit: what the original upstream call cost (the hit itself costs 0).
    pub saved_micros: u64,
    /// Answered by a cheaper tier than routed because the budget had no room.
    pub budget_downgraded: bool,
    /// Why the router itself refused the request: one of `REFUSED_BY`.
    pub refused_by: &'static str,
    pub config_version: u64,
}

impl UsageEvent {
    /// The event as one JSON line on stderr (`usage.log_events`).
    pub fn log(&self) {
        if let Ok(line) = serde_json::to_string(self) {
            eprintln!("{line}");
        }
    }
}

/// Every `UsageEvent::refused_by`: not refused, or refused by the budget, a rate limit, auth,
/// or the bound on service names (`usage.max_services`).
pub const REFUSED_BY: [&str; 6] = [
    "",
    "budget",
    "rate_limit_requests",
    "rate_limit_tokens",
    "auth",
    "max_services",
];

/// What requests are counted under when the router refused them before knowing the caller's
/// service: no valid key, an invalid name, a name past `usage.max_services`. The parentheses
/// make them no valid service name, so no caller's usage mixes with them.
pub const UNAUTHENTICATED: &str = "(unauthenticated)";
pub const INVALID_SERVICE: &str = "(invalid-service)";
pub const OVER_MAX_SERVICES: &str = "(over-max-services)";

/// Service names (from `x-switchyard-service`, keys and budgets) are 1 to 128 ASCII letters,
/// digits and `. - _ : / @`: they label spend, metrics and limits, so they must stay short and
/// printable.
pub fn is_valid_service(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/@".contains(&b))
}

/// A service a usage event can be counted under: a valid name or one of the refusal labels.
pub fn is_counted_service(name: &str) -> bool {
    is_valid_service(name) || [UNAUTHENTICATED, INVALID_SERVICE, OVER_MAX_SERVICES].contains(&name)
}

/// Names of backends, models and tiers label metrics and spend rows: no control characters,
/// quotes or backslashes, which would break the metrics text format (or forge lines in it).
pub fn is_label_safe(name: &str) -> bool {
    !name
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
}

/// What a caller sees when a service name is refused.
pub const SERVICE_NAME_RULE: &str =
    "a service name is 1 to 128 ASCII letters, digits and . - _ : / @";

/// Request ids are shown as 16 hex digits, as in `x-switchyard-request-id`.
pub fn format_request_id(id: u64) -> String {
    format!("{id:016x}")
}

fn hex_id<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_request_id(*id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_short_printable_and_never_a_refusal_label() {
        for good in [
            "default",
            "etl",
            "team/search@eu-1",
            "a.b_c:d",
            &"x".repeat(128),
        ] {
            assert!(is_valid_service(good), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "has space",
            "ümlaut",
            "new\nline",
            UNAUTHENTICATED,
            INVALID_SERVICE,
            OVER_MAX_SERVICES,
        ] {
            assert!(!is_valid_service(bad), "{bad:?}");
        }
    }
}
