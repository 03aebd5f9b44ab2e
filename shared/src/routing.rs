//! The runtime routing table (an immutable snapshot the workers read through arc-swap) and
//! the routing decision: request facts in, an ordered plan of target groups out.
//! Must not: look at live health or load (the data plane's balancer does that per attempt).

use crate::category::Category;
use crate::classifier::Classifier;
use crate::config::IoDriver;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub struct RoutingTable {
    /// Increases with every applied config; shown in `check-config` and usage.
    pub version: u64,
    pub listener: Listener,
    pub backends: Vec<Backend>,
    /// Every (backend, model) pair any backend serves; tiers and rules hold indexes into it.
    pub targets: Vec<Target>,
    /// Cheapest first; `rank` is the index.
    pub tiers: Vec<Tier>,
    /// Tier rank per `Category::index()`.
    pub category_tier: [usize; 10],
    pub long_context_tier: usize,
    pub aliases: ahash::AHashMap<String, AliasRoute>,
    /// Concrete model name -> targets serving it, cheapest tier first.
    pub models: ahash::AHashMap<String, Vec<usize>>,
    pub rules: Vec<Rule>,
    pub max_attempts: u32,
    pub unknown_model: UnknownModel,
    pub health: HealthSettings,
    pub usage: UsageSettings,
    pub classifier: Classifier,
    pub cache: CacheSettings,
    pub admin: AdminSettings,
    pub data_dir: std::path::PathBuf,
    pub budgets: BudgetSettings,
    /// Requests need an API key, which decides their service.
    pub auth_required: bool,
    pub rate_limits: RateLimitSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub default: Limit,
    pub services: BTreeMap<String, Limit>,
}

/// Per-minute limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

pub struct BudgetSettings {
    pub time_zone: jiff::tz::TimeZone,
    pub time_zone_name: String,
    /// Micro-dollars per day for services without their own limit; `None`: unlimited.
    pub default_daily: Option<u64>,
    pub services: BTreeMap<String, ServiceBudget>,
    pub default_max_output_tokens: u64,
    pub lease_micros: u64,
}

impl BudgetSettings {
    /// The budget day (YYYY-MM-DD in the configured zone) of a moment.
    pub fn day_of(&self, at: jiff::Timestamp) -> String {
        at.to_zoned(self.time_zone.clone()).date().to_string()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceBudget {
    /// `None`: the default limit applies.
    pub daily: Option<u64>,
    pub categories: BTreeMap<Category, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// `None`: the admin listener is off.
    pub address: Option<SocketAddr>,
    pub token_env: String,
    pub data_plane_token_env: String,
}

pub struct CacheSettings {
    pub enabled: bool,
    pub max_bytes: u64,
    /// The largest answer stored.
    pub max_entry_bytes: u64,
    /// Entry lifetime per `Category::index()` (the category's, else the default).
    pub category_ttl: [Duration; 10],
    pub share_across_services: bool,
}

impl fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoutingTable v{}\n{}", self.version, self.describe())
    }
}

#[derive(Clone, Copy)]
pub struct Listener {
    pub address: SocketAddr,
    pub workers: usize,
    pub io_driver: IoDriver,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub send_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

pub struct Backend {
    /// `Arc` so usage events can name it without allocating.
    pub name: Arc<str>,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Value of the `Host` header: host, with `:port` unless it is the scheme's default.
    pub authority: String,
    /// Prefix of every upstream path, without a trailing `/` (e.g. `/v1` is NOT implied).
    pub base_path: String,
    pub api_key: Option<String>,
    pub max_concurrency: u32,
    pub weight: u32,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub health_path: String,
    /// Extra CA certificates (PEM) trusted for this backend.
    pub tls_ca_file: Option<String>,
    /// Streams whose caller did not ask for usage ask for it here (see `BackendFile`).
    pub stream_usage: bool,
}

impl fmt::Debug for Backend {
    // Hand-written so the API key can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field(
                "url",
                &format_args!(
                    "{}://{}{}",
                    self.scheme.as_str(),
                    self.authority,
                    self.base_path
                ),
            )
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub backend: usize,
    pub model: Arc<str>,
    pub price: Price,
}

/// Integer micro-dollars per 1M tokens, so costs add up exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub input_micros_per_mtok: u64,
    pub cached_input_micros_per_mtok: u64,
    pub output_micros_per_mtok: u64,
}

impl Price {
    /// Cost in micro-dollars, rounded up so many tiny requests never add up to less than spent.
    /// `cached` is the part of `prompt` that the backend served from its prefix cache.
    pub fn cost_micros(&self, prompt: u64, cached: u64, completion: u64) -> u64 {
        let cached = cached.min(prompt);
        let per_mtok = (prompt - cached) as u128 * self.input_micros_per_mtok as u128
            + cached as u128 * self.cached_input_micros_per_mtok as u128
            + completion as u128 * self.output_micros_per_mtok as u128;
        per_mtok.div_ceil(1_000_000).min(u64::MAX as u128) as u64
    }
}

#[derive(Debug)]
pub struct Tier {
    pub name: Arc<str>,
    pub rank: usize,
    pub targets: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasRoute {
    Classify,
    Tier(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownModel {
    Classify,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    Interactive,
    #[default]
    Normal,
    Background,
    Bulk,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Priority::Interactive),
            "normal" => Some(Priority::Normal),
            "background" => Some(Priority::Background),
            "bulk" => Some(Priority::Bulk),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Normal => "normal",
            Priority::Background => "background",
            Priority::Bulk => "bulk",
        }
    }
}

pub struct Rule {
    pub name: String,
    pub when: MatchSet,
    pub action: RuleAction,
    /// Cache lifetime for requests this rule routes, overriding the category's.
    pub cache_ttl: Option<Duration>,
}

pub struct MatchSet {
    pub services: Vec<String>,
    pub categories: Vec<Category>,
    pub priorities: Vec<Priority>,
    pub models: Vec<String>,
    pub paths: Vec<String>,
}

pub enum RuleAction {
    Tier(usize),
    Targets(Vec<usize>),
}

pub struct HealthSettings {
    pub interval: Option<Duration>,
    pub timeout: Duration,
    pub eject_after_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// See `HealthFile::stall_after_ms`; `None` = off.
    pub stall_after: Option<Duration>,
}

pub struct UsageSettings {
    pub channel_capacity: usize,
    pub log_events: bool,
    pub max_services: usize,
}

/// What the router knows about a request when it routes it.
pub struct RequestFacts<'a> {
    pub service: &'a str,
    pub priority: Priority,
    pub model: &'a str,
    pub path: &'a str,
    /// The tier named by `x-switchyard-tier`, if any.
    pub pinned_tier: Option<&'a str>,
    pub category: Category,
    /// Set when the classifier was unsure: route to the higher tier of the two.
    pub alternative: Option<Category>,
    pub long_context: bool,
    /// Whether a classifier (or the caller's category header) decided `category`.
    pub classified: bool,
}

/// Where a request may go, in failover order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan<'t> {
    /// This tier first, then every more capable tier.
    FromTier(usize),
    /// Exactly these targets (a concrete model or a rule's target list).
    Targets(&'t [usize]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'t> {
    pub plan: Plan<'t>,
    /// What decided, for `x-switchyard-rule`: a rule's name or a built-in reason.
    pub rule: &'t str,
    /// Set when a rule with its own cache lifetime decided.
    pub cache_ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    UnknownTier(String),
    UnknownModel(String),
    /// `auto` (or an unknown name routed like it) on a request with no prompt to classify
    /// (embeddings): it needs a named model, or a rule for its path.
    Unclassifiable(String),
}

impl RoutingTable {
    /// Picks the plan: a pinned tier, then the first matching rule, then the requested model
    /// (concrete, alias, or unknown), then the classifier's category.
    pub fn decide<'t>(&'t self, facts: &RequestFacts<'_>) -> Result<Decision<'t>, RouteError> {
        // Embeddings (no classified prompt) are only of use beside others from the same model:
        // a served model they name is kept over a pinned tier, and over rules that name
        // neither their path nor a model (written for chat: a service's or a priority's
        // cheaper tier).
        let keep_model = !facts.classified && self.models.contains_key(facts.model);
        if let Some(name) = facts.pinned_tier.filter(|_| !keep_model) {
            let rank = self
                .tiers
                .iter()
                .position(|t| &*t.name == name)
                .ok_or_else(|| RouteError::UnknownTier(name.to_string()))?;
            return Ok(Decision {
                plan: Plan::FromTier(rank),
                rule: "header:x-switchyard-tier",
                cache_ttl: None,
            });
        }
        let for_chat = |r: &Rule| r.when.paths.is_empty() && r.when.models.is_empty();
        let applies = |r: &&Rule| r.when.matches(facts) && !(keep_model && for_chat(r));
        if let Some(rule) = self.rules.iter().find(applies) {
            let plan = match &rule.action {
                RuleAction::Tier(rank) => Plan::FromTier(*rank),
                RuleAction::Targets(ids) => Plan::Targets(ids),
            };
            return Ok(Decision {
                plan,
                rule: &rule.name,
                cache_ttl: rule.cache_ttl,
            });
        }
        if let Some(ids) = self.models.get(facts.model) {
            return Ok(Decision {
                plan: Plan::Targets(ids),
                rule: "model",
                cache_ttl: None,
            });
        }
        match self.aliases.get(facts.model) {
            Some(AliasRoute::Tier(rank)) => Ok(Decision {
                plan: Plan::FromTier(*rank),
                rule: "alias",
                cache_ttl: None,
            }),
            Some(AliasRoute::Classify) => self.classified(facts),
            None if self.unknown_model == UnknownModel::Classify => self.classified(facts),
            None => Err(RouteError::UnknownModel(facts.model.to_string())),
        }
    }

    fn classified(&self, facts: &RequestFacts<'_>) -> Result<Decision<'_>, RouteError> {
        if facts.classified {
            Ok(self.by_category(facts))
        } else {
            Err(RouteError::Unclassifiable(facts.model.to_string()))
        }
    }

    fn by_category(&self, facts: &RequestFacts<'_>) -> Decision<'_> {
        let mut rank = self.category_tier[facts.category.index()];
        let mut rule = "category";
        if let Some(alt) = facts.alternative {
            let alt_rank = self.category_tier[alt.index()];
            if alt_rank > rank {
                rank = alt_rank;
                rule = "category:ambiguous-higher";
            }
        }
        if facts.long_context && self.long_context_tier > rank {
            rank = self.long_context_tier;
            rule = "category:long-context";
        }
        Decision {
            plan: Plan::FromTier(rank),
            rule,
            cache_ttl: None,
        }
    }

    /// The target groups of a plan in failover order, each with the rank of its tier (`None`
    /// for an explicit target list).
    pub fn groups<'t>(
        &'t self,
        plan: Plan<'t>,
    ) -> impl Iterator<Item = (Option<usize>, &'t [usize])> + Clone + 't {
        let (ranks, fixed) = match plan {
            Plan::FromTier(rank) => (rank..self.tiers.len(), None),
            Plan::Targets(ids) => (0..0, Some((None, ids))),
        };
        fixed
            .into_iter()
            .chain(ranks.map(|rank| (Some(rank), self.tiers[rank].targets.as_slice())))
    }

    /// The rank of the first tier that lists `target` (a target can be in several).
    pub fn first_tier_of(&self, target: usize) -> Option<usize> {
        self.tiers.iter().position(|t| t.targets.contains(&target))
    }

    /// The target that is `model` on the backend named `backend`, if this table has it.
    pub fn target_named(&self, backend: &str, model: &str) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| &*self.backends[t.backend].name == backend && &*t.model == model)
    }
}

impl MatchSet {
    fn matches(&self, f: &RequestFacts<'_>) -> bool {
        (self.services.is_empty() || self.services.iter().any(|s| s == f.service))
            && (self.categories.is_empty() || self.categories.contains(&f.category))
            && (self.priorities.is_empty() || self.priorities.contains(&f.priority))
            && (self.models.is_empty() || self.models.iter().any(|m| m == f.model))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p == f.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> RoutingTable {
        let text = format!(
            r#"
[[backends]]
name = "a"
url = "http://127.0.0.1:1"
models = [{{ name = "s" }}, {{ name = "m" }}, {{ name = "l" }}]
[[tiers]]
name = "small"
targets = ["a/s"]
[[tiers]]
name = "medium"
targets = ["a/m"]
[[tiers]]
name = "large"
targets = ["a/l"]
{extra}"#
        );
        crate::config::load_str(&text, "t.toml", &|_| None).unwrap()
    }

    fn facts(model: &str, category: Category) -> RequestFacts<'_> {
        RequestFacts {
            service: "svc",
            priority: Priority::Normal,
            model,
            path: "/v1/chat/completions",
            pinned_tier: None,
            category,
            alternative: None,
            long_context: false,
            classified: true,
        }
    }

    #[test]
    fn auto_routes_by_category_and_ambiguity_goes_up() {
        let t = table("");
        let d = t.decide(&facts("auto", Category::Extraction)).unwrap();
        assert_eq!(d.plan, Plan::FromTier(0));
        let mut f = facts("auto", Category::Extraction);
        f.alternative = Some(Category::Reasoning);
        assert_eq!(
            t.decide(&f).unwrap(),
            Decision {
                plan: Plan::FromTier(2),
                rule: "category:ambiguous-higher",
                cache_ttl: None,
            }
        );
        f.alternative = None;
        f.long_context = true;
        assert_eq!(t.decide(&f).unwrap().plan, Plan::FromTier(2));
    }

    #[test]
    fn precedence_is_pin_rule_model_alias() {
        let t = table("[[rules]]\nname = \"etl\"\ntier = \"medium\"\nmatch = { service = [\"etl\"], priority = [\"bulk\"] }\n");
        let mut f = facts("l", Category::Chat);
        assert_eq!(t.decide(&f).unwrap().rule, "model");
        f.service = "etl";
        assert_eq!(
            t.decide(&f).unwrap().rule,
            "model",
            "rule needs both service and priority"
        );
        f.priority = Priority::Bulk;
        assert_eq!(
            t.decide(&f).unwrap(),
            Decision {
                plan: Plan::FromTier(1),
                rule: "etl",
                cache_ttl: None,
            }
        );
        f.pinned_tier = Some("small");
        assert_eq!(t.decide(&f).unwrap().plan, Plan::FromTier(0));
        f.pinned_tier = Some("nope");
        assert_eq!(t.decide(&f), Err(RouteError::UnknownTier("nope".into())));
        assert_eq!(
            t.decide(&facts("smart", Category::Chat)).unwrap().plan,
            Plan::FromTier(2)
        );
        assert_eq!(
            t.decide(&facts("medium", Category::Chat)).unwrap().plan,
            Plan::FromTier(1)
        );
    }

    #[test]
    fn embeddings_keep_the_served_model_they_name() {
        let t = table(concat!(
            "[[rules]]\nname = \"etl\"\ntier = \"small\"\nmatch = { service = [\"etl\"] }\n",
            "[[rules]]\nname = \"vectors\"\ntier = \"medium\"\n",
            "match = { service = [\"etl\"], path = [\"/v1/embeddings\"] }\n",
        ));
        let mut f = facts("l", Category::Other);
        f.path = "/v1/embeddings";
        f.classified = false;
        f.pinned_tier = Some("small");
        assert_eq!(
            t.decide(&f).unwrap().rule,
            "model",
            "not swapped by a pinned tier"
        );
        f.pinned_tier = None;
        f.service = "etl";
        assert_eq!(
            t.decide(&f).unwrap().rule,
            "vectors",
            "a rule that names the path still routes them, one that does not is skipped"
        );
        let pinned =
            table("[[rules]]\nname = \"pin\"\ntier = \"large\"\nmatch = { model = [\"l\"] }\n");
        assert_eq!(
            pinned.decide(&f).unwrap().rule,
            "pin",
            "so does one that names the model"
        );
        // Without a served model the tier and the rules are how embeddings are routed.
        let mut f = facts("auto", Category::Other);
        f.classified = false;
        f.pinned_tier = Some("small");
        assert_eq!(t.decide(&f).unwrap().plan, Plan::FromTier(0));
        f.pinned_tier = None;
        f.service = "etl";
        assert_eq!(t.decide(&f).unwrap().rule, "etl");
    }

    #[test]
    fn unknown_models_classify_or_reject() {
        let t = table("");
        assert_eq!(
            t.decide(&facts("gpt-4o", Category::Code)).unwrap().plan,
            Plan::FromTier(1)
        );
        let t = table("[routing]\nunknown_model = \"reject\"\n");
        assert_eq!(
            t.decide(&facts("gpt-4o", Category::Code)),
            Err(RouteError::UnknownModel("gpt-4o".into()))
        );
    }

    #[test]
    fn groups_walk_up_the_tiers() {
        let t = table("");
        let groups: Vec<_> = t.groups(Plan::FromTier(1)).collect();
        assert_eq!(
            groups,
            vec![(Some(1), &[1usize][..]), (Some(2), &[2usize][..])]
        );
        let ids = [0usize, 2];
        assert_eq!(t.groups(Plan::Targets(&ids)).count(), 1);
    }

    #[test]
    fn cost_is_integer_micros_rounded_up() {
        let p = Price {
            input_micros_per_mtok: 150_000,
            cached_input_micros_per_mtok: 75_000,
            output_micros_per_mtok: 600_000,
        };
        // 1000 * 0.15 + 0 + 500 * 0.6 = 150 + 300 micro-dollars... per 1M: (1000*150000 + 500*600000)/1e6
        assert_eq!(p.cost_micros(1000, 0, 500), 450);
        assert_eq!(p.cost_micros(1000, 1000, 0), 75);
        assert_eq!(
            p.cost_micros(1, 0, 0),
            1,
            "a fraction of a micro-dollar rounds up"
        );
        assert_eq!(p.cost_micros(0, 5, 0), 0, "cached is clamped to prompt");
    }
}
