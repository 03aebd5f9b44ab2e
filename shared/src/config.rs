//! `switchyard.toml`: the file schema, its validation, and its conversion into the runtime
//! [`RoutingTable`]. Owns: defaults, error messages that name the file, key and fault.
//! Must not: read anything but the file and the environment variables it names.

use crate::category::Category;
use crate::classifier::{Classifier, ClassifierConfig};
use crate::routing::{
    AdminSettings, AliasRoute, Backend, BudgetSettings, CacheSettings, HealthSettings, Limit,
    Listener, MatchSet, Price, Priority, RateLimitSettings, RoutingTable, Rule, RuleAction, Scheme,
    ServiceBudget, Target, Tier, UnknownModel, UsageSettings,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub listener: ListenerFile,
    #[serde(default)]
    pub routing: RoutingFile,
    #[serde(default)]
    pub health: HealthFile,
    #[serde(default)]
    pub usage: UsageFile,
    #[serde(default)]
    pub backends: Vec<BackendFile>,
    #[serde(default)]
    pub tiers: Vec<TierFile>,
    /// category name -> tier name; categories left out get the cost-principle default.
    #[serde(default)]
    pub categories: BTreeMap<String, String>,
    /// requested model name -> tier name, or "classify".
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
    #[serde(default)]
    pub classifier: ClassifierConfig,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub storage: StorageFile,
    #[serde(default)]
    pub budgets: BudgetsFile,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub rate_limits: RateLimitsFile,
}

/// `[rate_limits]`: requests and tokens per minute, per service.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsFile {
    /// For services without their own entry.
    pub default: LimitFile,
    pub services: BTreeMap<String, LimitFile>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct LimitFile {
    pub requests_per_minute: Option<u64>,
    /// Admission counts the prompt estimate plus `max_tokens` (without it, the budgets'
    /// `default_max_output_tokens`, as far as the request fits a minute's allowance); answers
    /// are then charged what they really used.
    pub tokens_per_minute: Option<u64>,
}

/// `[auth]`: API keys (`switchyard keys create SERVICE`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFile {
    /// Every request needs `Authorization: Bearer <key>`, and the key decides the service.
    /// Off, `x-switchyard-service` names the service (trusted callers only).
    pub required: bool,
}

/// `[budgets]`: daily spending limits that downgrade requests to cheaper tiers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsFile {
    /// IANA time zone whose midnight starts a new budget day.
    pub time_zone: String,
    /// Daily limit in USD for services without their own; absent: no limit.
    pub default_daily_usd: Option<f64>,
    /// Output tokens assumed for the worst case of a request without `max_tokens`.
    pub default_max_output_tokens: u64,
    /// Budget a worker takes from the shared pool at a time, in USD. Larger leases mean fewer
    /// refills; unused lease is at most `workers * lease_usd` per budget held back from others,
    /// and a lease never takes more than half of what is left unless one request needs more.
    pub lease_usd: f64,
    /// service name -> its limits.
    pub services: BTreeMap<String, ServiceBudgetFile>,
}

impl Default for BudgetsFile {
    fn default() -> Self {
        BudgetsFile {
            time_zone: "UTC".into(),
            default_daily_usd: None,
            default_max_output_tokens: 4096,
            lease_usd: 0.05,
            services: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceBudgetFile {
    pub daily_usd: Option<f64>,
    /// category name -> daily USD, on top of the service's own limit.
    pub categories: BTreeMap<String, f64>,
}

/// `[admin]`: the listener of the gRPC control API and `/metrics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    pub enabled: bool,
    /// Loopback by default: the admin API can change routing and read spend.
    pub address: String,
    /// Environment variable holding the admin bearer token. When it is unset, a random token
    /// is generated and written to `<data_dir>/admin-token` (mode 0600).
    pub token_env: String,
    /// Environment variable holding a token that allows only what remote data planes need
    /// (snapshots, usage reports, leases, key hashes); unset: no such token.
    pub data_plane_token_env: String,
}

impl Default for AdminFile {
    fn default() -> Self {
        AdminFile {
            enabled: true,
            address: "127.0.0.1:8081".into(),
            token_env: "SWITCHYARD_ADMIN_TOKEN".into(),
            data_plane_token_env: "SWITCHYARD_DATA_PLANE_TOKEN".into(),
        }
    }
}

/// `[storage]`: where spend, budgets, API keys and config versions are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageFile {
    pub data_dir: String,
}

impl Default for StorageFile {
    fn default() -> Self {
        StorageFile {
            data_dir: "switchyard-data".into(),
        }
    }
}

/// `[cache]`: the exact response cache for deterministic requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheFile {
    /// The off switch.
    pub enabled: bool,
    /// Upper bound on stored answers and their keys, in bytes.
    pub max_bytes: u64,
    /// The largest answer stored, in bytes (a larger one is relayed and not kept; at most
    /// `max_bytes`).
    pub max_entry_bytes: u64,
    /// How long an answer is served from the cache, unless its category or rule says otherwise.
    pub ttl_secs: u64,
    /// category name -> seconds, overriding `ttl_secs`.
    pub category_ttl_secs: BTreeMap<String, u64>,
    /// Let different services share entries; off, every service has its own.
    pub share_across_services: bool,
}

impl Default for CacheFile {
    fn default() -> Self {
        CacheFile {
            enabled: true,
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
            ttl_secs: 3600,
            category_ttl_secs: BTreeMap::new(),
            share_across_services: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    IoUring,
    Epoll,
}

impl IoDriver {
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriver::Auto => "auto",
            IoDriver::IoUring => "io_uring",
            IoDriver::Epoll => "epoll",
        }
    }
}

/// Worker threads at most (a power of two: request ids hold the worker's index in their top bits).
pub const MAX_WORKERS: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerFile {
    /// Address the data plane listens on.
    pub address: String,
    /// Worker threads, one monoio runtime each; 0 = one per core.
    pub workers: usize,
    pub io_driver: IoDriver,
    /// Largest request head (request line + headers) in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Largest request body in bytes; larger gets 413 before the body is read.
    pub max_body_bytes: usize,
    /// Time allowed to receive a whole request head, from its first byte.
    pub header_timeout_ms: u64,
    /// Time allowed to receive a whole request body.
    pub body_timeout_ms: u64,
    /// Time one write to a client may wait for the client to take the bytes; a client that
    /// stops reading is disconnected, so it cannot hold a backend slot forever.
    pub send_timeout_ms: u64,
    /// How long an idle keep-alive client connection is kept open.
    pub keepalive_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long requests in flight may run before the process exits.
    pub drain_timeout_ms: u64,
}

impl Default for ListenerFile {
    fn default() -> Self {
        ListenerFile {
            address: "127.0.0.1:8080".into(),
            workers: 0,
            io_driver: IoDriver::Auto,
            max_header_bytes: 32 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            keepalive_timeout_ms: 75_000,
            drain_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingFile {
    /// Upstream attempts per request, failovers included.
    pub max_attempts: u32,
    /// What a requested model that is neither a configured model nor an alias does:
    /// "classify" routes it like `auto`, "reject" answers 404.
    pub unknown_model: UnknownModel,
    /// Tier for prompts the classifier flags as long-context; default: the most capable tier.
    pub long_context_tier: Option<String>,
}

impl Default for RoutingFile {
    fn default() -> Self {
        RoutingFile {
            max_attempts: 3,
            unknown_model: UnknownModel::Classify,
            long_context_tier: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthFile {
    /// Active check period per backend; 0 disables active checks (passive detection stays on).
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures (connect errors, timeouts, 5xx, 429) that eject a backend.
    pub eject_after_failures: u32,
    /// First ejection length; each further ejection doubles it up to `max_ejection_ms`.
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    /// A caller that gives up waiting on a request after this long, while the backend sent
    /// nothing (no response head, no body bytes) for any request since this one was written
    /// to it (or, for a stream, since its last bytes), counts as a failure of that backend (it
    /// takes requests but answers none, or stopped mid-stream); once per such silence. 0 =
    /// callers leaving never count; else at least 1000. The default (30 s) stays above what
    /// slow models take to a first byte, or pause inside a stream, while callers still wait.
    pub stall_after_ms: u64,
}

impl Default for HealthFile {
    fn default() -> Self {
        HealthFile {
            interval_ms: 5_000,
            timeout_ms: 2_000,
            eject_after_failures: 3,
            base_ejection_ms: 5_000,
            max_ejection_ms: 300_000,
            stall_after_ms: 30_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageFile {
    /// Capacity of the bounded channel from the workers to the control plane; events that do
    /// not fit are dropped and counted, never waited for.
    pub channel_capacity: usize,
    /// Write every usage event as a JSON line to stderr.
    pub log_events: bool,
    /// Distinct service names callers may choose with `x-switchyard-service`; requests naming
    /// another are refused (names of keys and names in the config do not count).
    pub max_services: usize,
}

impl Default for UsageFile {
    fn default() -> Self {
        UsageFile {
            channel_capacity: 65_536,
            log_events: false,
            max_services: 1000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub name: String,
    /// `http://host[:port][/base]` or `https://...`; request paths are appended to the base.
    pub url: String,
    #[serde(default)]
    pub kind: BackendKindFile,
    /// Name of the environment variable that holds the API key (never the key itself).
    pub api_key_env: Option<String>,
    pub models: Vec<ModelFile>,
    /// Requests in flight to this backend across all workers.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// Relative share of traffic among equally loaded targets of a tier.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time from sending the request to the response head. Non-streamed completions send
    /// their head only when generation ends, so this bounds the whole generation for them.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two reads of a response body (a stalled stream).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Path probed by active health checks (GET, 2xx = healthy).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// PEM file of extra CA certificates to trust for this https backend (an internal CA),
    /// on top of the public web PKI roots.
    pub tls_ca_file: Option<String>,
    /// Ask for `stream_options.include_usage` on streams whose caller did not (for their
    /// token counts); off for a server that refuses unknown fields (its streams' tokens are
    /// then estimated).
    #[serde(default = "default_stream_usage")]
    pub stream_usage: bool,
}

fn default_stream_usage() -> bool {
    true
}

fn default_max_concurrency() -> u32 {
    1024
}
fn default_weight() -> u32 {
    1
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_first_byte_timeout_ms() -> u64 {
    120_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_health_path() -> String {
    "/v1/models".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BackendKindFile {
    /// Any OpenAI-compatible server: vLLM, Ollama's /v1, llama.cpp, cloud APIs.
    #[default]
    Openai,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub name: String,
    /// USD per 1M prompt tokens.
    #[serde(default)]
    pub input_per_mtok: f64,
    /// USD per 1M cached prompt tokens; default: the input price.
    pub cached_input_per_mtok: Option<f64>,
    /// USD per 1M completion tokens.
    #[serde(default)]
    pub output_per_mtok: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierFile {
    pub name: String,
    /// `backend/model`; the backend name ends at the first `/`, so model names may hold `/`.
    pub targets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub name: String,
    #[serde(rename = "match", default)]
    pub when: MatchFile,
    /// Route to this tier (failing over to higher tiers)...
    pub tier: Option<String>,
    /// ...or to exactly these `backend/model` targets.
    pub targets: Option<Vec<String>>,
    /// Cache lifetime for requests this rule routes, overriding the category's.
    pub cache_ttl_secs: Option<u64>,
}

/// Each list is OR; the lists are ANDed; an empty list matches anything.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MatchFile {
    pub service: Vec<String>,
    pub category: Vec<String>,
    pub priority: Vec<String>,
    pub model: Vec<String>,
    pub path: Vec<String>,
}

/// Parses and validates a config file's text. `path` only labels the messages.
pub fn load_str(
    text: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RoutingTable, Vec<String>> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| vec![format!("{path}: {e}")])?;
    build(file, env).map_err(|errs| errs.into_iter().map(|e| format!("{path}: {e}")).collect())
}

pub fn load_file(path: &str) -> Result<RoutingTable, Vec<String>> {
    load_file_with(path, &|name| std::env::var(name).ok())
}

/// `load_file` with environment variables looked up by `env`.
pub fn load_file_with(
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RoutingTable, Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{path}: cannot read: {e}")])?;
    load_str(&text, path, env)
}

/// Collects every error instead of stopping at the first, so one run shows them all.
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, key: impl std::fmt::Display, what: impl std::fmt::Display) {
        self.0.push(format!("{key}: {what}"));
    }
}

fn price_micros(errs: &mut Errors, key: &str, usd_per_mtok: f64) -> u64 {
    if !usd_per_mtok.is_finite() || !(0.0..=1_000_000.0).contains(&usd_per_mtok) {
        errs.push(
            key,
            format!("price {usd_per_mtok} must be between 0 and 1000000 USD per 1M tokens"),
        );
        return 0;
    }
    (usd_per_mtok * 1_000_000.0).round() as u64
}

/// The largest daily budget, in micro-dollars ($1e9): from the config, the CLI or the API.
pub const MAX_BUDGET_MICROS: u64 = 1_000_000_000 * 1_000_000;

fn usd_micros(errs: &mut Errors, key: &str, usd: f64) -> u64 {
    let micros = usd * 1_000_000.0;
    if !usd.is_finite() || !(0.0..=MAX_BUDGET_MICROS as f64).contains(&micros) {
        errs.push(key, format!("{usd} must be between 0 and 1000000000 USD"));
        return 0;
    }
    micros.round() as u64
}

fn build_budgets(errs: &mut Errors, b: &BudgetsFile) -> BudgetSettings {
    let time_zone = jiff::tz::TimeZone::get(&b.time_zone).unwrap_or_else(|e| {
        errs.push("budgets.time_zone", format!("`{}`: {e}", b.time_zone));
        jiff::tz::TimeZone::UTC
    });
    let default_daily = b
        .default_daily_usd
        .map(|usd| usd_micros(errs, "budgets.default_daily_usd", usd));
    let mut services = BTreeMap::new();
    for (name, s) in &b.services {
        if !crate::usage::is_valid_service(name) {
            errs.push(
                format!("budgets.services.{name}"),
                crate::usage::SERVICE_NAME_RULE,
            );
        }
        let daily = s
            .daily_usd
            .map(|usd| usd_micros(errs, &format!("budgets.services.{name}.daily_usd"), usd));
        let mut categories = BTreeMap::new();
        for (cat, usd) in &s.categories {
            let key = format!("budgets.services.{name}.categories.{cat}");
            match Category::parse(cat) {
                Some(c) => {
                    categories.insert(c, usd_micros(errs, &key, *usd));
                }
                None => errs.push(
                    key,
                    format!("unknown category; expected one of {}", category_names()),
                ),
            }
        }
        services.insert(name.clone(), ServiceBudget { daily, categories });
    }
    if b.default_max_output_tokens == 0 {
        errs.push(
            "budgets.default_max_output_tokens",
            "must be greater than 0",
        );
    }
    let lease_micros = usd_micros(errs, "budgets.lease_usd", b.lease_usd);
    if lease_micros == 0 {
        errs.push("budgets.lease_usd", "must be at least 0.000001");
    }
    BudgetSettings {
        time_zone,
        time_zone_name: b.time_zone.clone(),
        default_daily,
        services,
        default_max_output_tokens: b.default_max_output_tokens,
        lease_micros,
    }
}

fn parse_backend_url(url: &str) -> Result<(Scheme, String, u16, String), String> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else {
        return Err(format!("`{url}` must start with http:// or https://"));
    };
    // The base path is put before each request's path: a query or fragment there would end up
    // in the middle of the request line.
    if rest.contains(|c: char| c == '?' || c == '#' || c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{url}`: no query, fragment or whitespace (a base URL is a scheme, a host and an optional path)"
        ));
    }
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    // Request paths start with /v1; a base URL written the OpenAI SDKs' way (`.../v1`) means
    // the same server, not `/v1/v1/...`.
    let base = base.strip_suffix("/v1").unwrap_or(base);
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{url}` needs a host (and no user info)"));
    }
    let default_port = if scheme == Scheme::Https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("`{url}`: unclosed IPv6 bracket"))?;
        let port = match &v6[end + 1..] {
            "" => default_port,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("`{url}`: bad port"))?,
        };
        (v6[..end].to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(format!("`{url}`: an IPv6 address goes in brackets"));
            }
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("`{url}`: bad port `{p}`"))?,
            ),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(format!("`{url}` needs a host and a non-zero port"));
    }
    Ok((scheme, host, port, base.to_string()))
}

fn build(
    file: ConfigFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RoutingTable, Vec<String>> {
    let mut errs = Errors(Vec::new());
    let l = &file.listener;
    if l.address.parse::<std::net::SocketAddr>().is_err() {
        errs.push(
            "listener.address",
            format!("`{}` is not an ip:port socket address", l.address),
        );
    }
    if l.max_header_bytes < 1024 {
        errs.push("listener.max_header_bytes", "must be at least 1024");
    }
    if l.max_body_bytes == 0 {
        errs.push("listener.max_body_bytes", "must be greater than 0");
    }
    for (key, v) in [
        ("listener.header_timeout_ms", l.header_timeout_ms),
        ("listener.body_timeout_ms", l.body_timeout_ms),
        ("listener.send_timeout_ms", l.send_timeout_ms),
        ("listener.keepalive_timeout_ms", l.keepalive_timeout_ms),
    ] {
        if v == 0 {
            errs.push(key, "must be greater than 0");
        }
    }
    let workers = if l.workers == 0 {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS)
    } else {
        l.workers
    };
    if workers > MAX_WORKERS {
        errs.push("listener.workers", format!("must be at most {MAX_WORKERS}"));
    }

    let mut backends = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for (i, b) in file.backends.iter().enumerate() {
        let key = format!("backends[{i}] ({})", b.name.escape_debug());
        if b.name.is_empty()
            || b.name.contains('/')
            || b.name.contains(char::is_whitespace)
            || !crate::usage::is_label_safe(&b.name)
        {
            errs.push(
                &key,
                "name must be non-empty, without `/`, spaces, quotes, backslashes or control characters",
            );
        }
        if file.backends[..i].iter().any(|o| o.name == b.name) {
            errs.push(&key, "duplicate backend name");
        }
        let (scheme, host, port, base_path) = match parse_backend_url(&b.url) {
            Ok(u) => u,
            Err(e) => {
                errs.push(format!("{key}.url"), e);
                (Scheme::Http, String::new(), 0, String::new())
            }
        };
        let api_key = match &b.api_key_env {
            None => None,
            // Surrounding whitespace is how secrets mounted from files usually end (a newline).
            Some(var) => match env(var).map(|v| v.trim().to_string()) {
                // It goes into a header line: a control character would break the request.
                Some(v) if v.chars().any(|c| c.is_control()) => {
                    errs.push(
                        format!("{key}.api_key_env"),
                        format!("environment variable `{var}` holds a control character"),
                    );
                    None
                }
                Some(v) if !v.is_empty() => Some(v),
                _ => {
                    errs.push(
                        format!("{key}.api_key_env"),
                        format!("environment variable `{var}` is not set"),
                    );
                    None
                }
            },
        };
        if b.models.is_empty() {
            errs.push(format!("{key}.models"), "list at least one model");
        }
        if b.max_concurrency == 0 {
            errs.push(format!("{key}.max_concurrency"), "must be greater than 0");
        }
        if !(1..=10_000).contains(&b.weight) {
            errs.push(format!("{key}.weight"), "must be between 1 and 10000");
        }
        for (field, v) in [
            ("connect_timeout_ms", b.connect_timeout_ms),
            ("first_byte_timeout_ms", b.first_byte_timeout_ms),
            ("idle_timeout_ms", b.idle_timeout_ms),
        ] {
            if v == 0 {
                errs.push(format!("{key}.{field}"), "must be greater than 0");
            }
        }
        if let Some(path) = &b.tls_ca_file {
            let key = format!("{key}.tls_ca_file");
            if scheme != Scheme::Https {
                errs.push(&key, "only applies to https:// backends");
            }
            match std::fs::read_to_string(path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => errs.push(&key, format!("`{path}` holds no PEM certificate")),
                Err(e) => errs.push(&key, format!("cannot read `{path}`: {e}")),
            }
        }
        if !b.health_path.starts_with('/') {
            errs.push(format!("{key}.health_path"), "must start with `/`");
        }
        for (j, m) in b.models.iter().enumerate() {
            let mkey = format!("{key}.models[{j}] ({})", m.name.escape_debug());
            if m.name.is_empty() || !crate::usage::is_label_safe(&m.name) {
                errs.push(
                    &mkey,
                    "name must be non-empty, without quotes, backslashes or control characters",
                );
            }
            if b.models[..j].iter().any(|o| o.name == m.name) {
                errs.push(&mkey, "duplicate model name in this backend");
            }
            let input = price_micros(
                &mut errs,
                &format!("{mkey}.input_per_mtok"),
                m.input_per_mtok,
            );
            let price = Price {
                input_micros_per_mtok: input,
                cached_input_micros_per_mtok: match m.cached_input_per_mtok {
                    Some(c) => price_micros(&mut errs, &format!("{mkey}.cached_input_per_mtok"), c),
                    None => input,
                },
                output_micros_per_mtok: price_micros(
                    &mut errs,
                    &format!("{mkey}.output_per_mtok"),
                    m.output_per_mtok,
                ),
            };
            targets.push(Target {
                backend: i,
                model: m.name.as_str().into(),
                price,
            });
        }
        let authority = match (scheme, port) {
            (Scheme::Http, 80) | (Scheme::Https, 443) => bracket_v6(&host),
            _ => format!("{}:{port}", bracket_v6(&host)),
        };
        backends.push(Backend {
            name: b.name.as_str().into(),
            scheme,
            host,
            port,
            authority,
            base_path,
            api_key,
            max_concurrency: b.max_concurrency,
            weight: b.weight,
            connect_timeout: Duration::from_millis(b.connect_timeout_ms),
            first_byte_timeout: Duration::from_millis(b.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(b.idle_timeout_ms),
            health_path: b.health_path.clone(),
            tls_ca_file: b.tls_ca_file.clone(),
            stream_usage: b.stream_usage,
        });
    }
    let find_target = |spec: &str| -> Result<usize, String> {
        let (backend, model) = spec
            .split_once('/')
            .ok_or_else(|| format!("`{spec}` must be `backend/model`"))?;
        let b = file
            .backends
            .iter()
            .position(|b| b.name == backend)
            .ok_or_else(|| format!("unknown backend `{backend}` in `{spec}`"))?;
        targets
            .iter()
            .position(|t| t.backend == b && &*t.model == model)
            .ok_or_else(|| format!("backend `{backend}` does not list model `{model}`"))
    };

    if file.tiers.is_empty() {
        errs.push("tiers", "declare at least one tier, cheapest first");
    }
    let mut tiers = Vec::new();
    for (rank, t) in file.tiers.iter().enumerate() {
        let key = format!("tiers[{rank}] ({})", t.name.escape_debug());
        if t.name.is_empty() || file.tiers[..rank].iter().any(|o| o.name == t.name) {
            errs.push(&key, "name must be non-empty and unique");
        }
        if t.name == "auto" {
            // Tier names are model aliases: this one would route `auto` past the classifier.
            errs.push(
                &key,
                "`auto` is the classifier's model name; name the tier otherwise",
            );
        }
        if !crate::usage::is_label_safe(&t.name) {
            errs.push(
                &key,
                "name must be without quotes, backslashes or control characters",
            );
        }
        if t.targets.is_empty() {
            errs.push(
                format!("{key}.targets"),
                "list at least one `backend/model` target",
            );
        }
        let mut ids = Vec::new();
        for spec in &t.targets {
            match find_target(spec) {
                Ok(id) if ids.contains(&id) => {
                    errs.push(format!("{key}.targets"), format!("`{spec}` listed twice"))
                }
                Ok(id) => ids.push(id),
                Err(e) => errs.push(format!("{key}.targets"), e),
            }
        }
        tiers.push(Tier {
            name: t.name.as_str().into(),
            rank,
            targets: ids,
        });
    }
    let tier_rank = |name: &str| file.tiers.iter().position(|t| t.name == name);
    let top = file.tiers.len().saturating_sub(1);

    let mut category_tier = Category::ALL.map(|c| default_category_rank(c, file.tiers.len()));
    for (name, tier) in &file.categories {
        let key = format!("categories.{name}");
        match (Category::parse(name), tier_rank(tier)) {
            (None, _) => errs.push(
                key,
                format!("unknown category; expected one of {}", category_names()),
            ),
            (_, None) => errs.push(key, format!("unknown tier `{tier}`")),
            (Some(c), Some(r)) => category_tier[c.index()] = r,
        }
    }
    let long_context_tier = match &file.routing.long_context_tier {
        None => top,
        Some(t) => tier_rank(t).unwrap_or_else(|| {
            errs.push("routing.long_context_tier", format!("unknown tier `{t}`"));
            top
        }),
    };
    if file.routing.max_attempts == 0 || file.routing.max_attempts > 16 {
        errs.push("routing.max_attempts", "must be between 1 and 16");
    }

    // Built-in aliases first so the operator's entries override them.
    let mut aliases = ahash::AHashMap::new();
    aliases.insert("auto".to_string(), AliasRoute::Classify);
    if !tiers.is_empty() {
        aliases.insert("fast".to_string(), AliasRoute::Tier(0));
        aliases.insert("smart".to_string(), AliasRoute::Tier(top));
    }
    for t in &tiers {
        aliases.insert(t.name.to_string(), AliasRoute::Tier(t.rank));
    }
    for (name, to) in &file.aliases {
        let route = if to == "classify" {
            Some(AliasRoute::Classify)
        } else {
            tier_rank(to).map(AliasRoute::Tier)
        };
        match route {
            Some(r) => {
                aliases.insert(name.clone(), r);
            }
            None => errs.push(
                format!("aliases.{name}"),
                format!("`{to}` is neither a tier nor \"classify\""),
            ),
        }
    }

    let mut models: ahash::AHashMap<String, Vec<usize>> = ahash::AHashMap::new();
    // Concrete models list their targets cheapest tier first, so failover moves up in cost.
    let mut by_rank: Vec<usize> = (0..targets.len()).collect();
    let rank_of = |id: usize| {
        tiers
            .iter()
            .position(|t| t.targets.contains(&id))
            .unwrap_or(usize::MAX)
    };
    by_rank.sort_by_key(|&id| rank_of(id));
    for id in by_rank {
        models
            .entry(targets[id].model.to_string())
            .or_default()
            .push(id);
    }
    for name in models.keys() {
        if aliases.contains_key(name) {
            errs.push(
                format!("aliases.{name}"),
                "also the name of a served model; rename the alias or the tier",
            );
        }
    }

    let mut rules = Vec::new();
    for (i, r) in file.rules.iter().enumerate() {
        let key = format!("rules[{i}] ({})", r.name.escape_debug());
        // It is sent in `x-switchyard-rule` and labels usage: a line break would split the
        // response head.
        if r.name.is_empty() || !crate::usage::is_label_safe(&r.name) {
            errs.push(
                &key,
                "name must be non-empty, without quotes, backslashes or control characters",
            );
        }
        // `x-switchyard-rule` and the usage events name the rule that decided.
        if file.rules[..i].iter().any(|o| o.name == r.name) {
            errs.push(&key, "another rule has this name; names must be unique");
        }
        for name in &r.when.service {
            // A name no caller can have would never match.
            if !crate::usage::is_valid_service(name) {
                errs.push(
                    format!("{key}.match.service"),
                    format!(
                        "`{}`: {}",
                        name.escape_debug(),
                        crate::usage::SERVICE_NAME_RULE
                    ),
                );
            }
        }
        let action = match (&r.tier, &r.targets) {
            (Some(t), None) => match tier_rank(t) {
                Some(rank) => RuleAction::Tier(rank),
                None => {
                    errs.push(format!("{key}.tier"), format!("unknown tier `{t}`"));
                    RuleAction::Tier(0)
                }
            },
            (None, Some(list)) if !list.is_empty() => {
                let mut ids = Vec::new();
                for spec in list {
                    match find_target(spec) {
                        Ok(id) => ids.push(id),
                        Err(e) => errs.push(format!("{key}.targets"), e),
                    }
                }
                RuleAction::Targets(ids)
            }
            _ => {
                errs.push(&key, "set exactly one of `tier` or a non-empty `targets`");
                RuleAction::Tier(0)
            }
        };
        let mut categories = Vec::new();
        for c in &r.when.category {
            match Category::parse(c) {
                Some(c) => categories.push(c),
                None => errs.push(
                    format!("{key}.match.category"),
                    format!("unknown category `{c}`"),
                ),
            }
        }
        let mut priorities = Vec::new();
        for p in &r.when.priority {
            match Priority::parse(p) {
                Some(p) => priorities.push(p),
                None => errs.push(
                    format!("{key}.match.priority"),
                    format!(
                        "unknown priority `{p}`; expected interactive, normal, background or bulk"
                    ),
                ),
            }
        }
        for p in &r.when.path {
            // Only routed endpoints reach rules: any other path could never match.
            if crate::openai::Endpoint::from_path(p).is_none() {
                errs.push(
                    format!("{key}.match.path"),
                    format!("`{p}` is not a routed endpoint; expected /v1/chat/completions, /v1/completions or /v1/embeddings"),
                );
            }
        }
        rules.push(Rule {
            name: r.name.clone(),
            when: MatchSet {
                services: r.when.service.clone(),
                categories,
                priorities,
                models: r.when.model.clone(),
                paths: r.when.path.clone(),
            },
            action,
            cache_ttl: r.cache_ttl_secs.map(Duration::from_secs),
        });
    }

    let classifier = Classifier::new(&file.classifier).unwrap_or_else(|e| {
        errs.push("classifier", e);
        Classifier::new(&ClassifierConfig::default()).expect("default classifier config is valid")
    });
    let h = &file.health;
    if h.timeout_ms == 0 {
        errs.push("health.timeout_ms", "must be greater than 0");
    }
    if h.eject_after_failures == 0 {
        errs.push("health.eject_after_failures", "must be at least 1");
    }
    if h.stall_after_ms != 0 && h.stall_after_ms < 1000 {
        errs.push(
            "health.stall_after_ms",
            "must be 0 (off) or at least 1000: shorter silences are within the clock's grain",
        );
    }
    if h.base_ejection_ms == 0 || h.max_ejection_ms < h.base_ejection_ms {
        errs.push(
            "health.max_ejection_ms",
            "must be at least base_ejection_ms, which must be > 0",
        );
    }
    let c = &file.cache;
    let mut category_ttl = [Duration::from_secs(c.ttl_secs); 10];
    for (name, secs) in &c.category_ttl_secs {
        match Category::parse(name) {
            Some(cat) => category_ttl[cat.index()] = Duration::from_secs(*secs),
            None => errs.push(
                format!("cache.category_ttl_secs.{name}"),
                format!("unknown category; expected one of {}", category_names()),
            ),
        }
    }
    if c.enabled && c.max_bytes < 64 * 1024 {
        errs.push(
            "cache.max_bytes",
            "must be at least 65536 (or set enabled = false)",
        );
    }
    if c.enabled && c.max_entry_bytes < 1024 {
        errs.push("cache.max_entry_bytes", "must be at least 1024");
    }
    let cache = CacheSettings {
        enabled: c.enabled,
        max_bytes: c.max_bytes,
        // No entry is larger than the whole cache.
        max_entry_bytes: c.max_entry_bytes.min(c.max_bytes),
        category_ttl,
        share_across_services: c.share_across_services,
    };
    let admin_address = match (file.admin.enabled, file.admin.address.parse()) {
        (false, _) => None,
        (true, Ok(a)) => Some(a),
        (true, Err(_)) => {
            errs.push(
                "admin.address",
                format!("`{}` is not an ip:port socket address", file.admin.address),
            );
            None
        }
    };
    if file.admin.token_env.is_empty() {
        errs.push("admin.token_env", "must name an environment variable");
    }
    if file.storage.data_dir.is_empty() {
        errs.push("storage.data_dir", "must not be empty");
    }
    let budgets = build_budgets(&mut errs, &file.budgets);
    let mut limit = |key: String, l: &LimitFile| {
        for (name, v) in [
            ("requests_per_minute", l.requests_per_minute),
            ("tokens_per_minute", l.tokens_per_minute),
        ] {
            if v == Some(0) {
                errs.push(
                    format!("{key}.{name}"),
                    "must be greater than 0 (leave it out for no limit)",
                );
            }
        }
        Limit {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
        }
    };
    let rate_limits = RateLimitSettings {
        default: limit("rate_limits.default".into(), &file.rate_limits.default),
        services: file
            .rate_limits
            .services
            .iter()
            .map(|(name, l)| {
                (
                    name.clone(),
                    limit(format!("rate_limits.services.{name}"), l),
                )
            })
            .collect(),
    };
    for name in file.rate_limits.services.keys() {
        if !crate::usage::is_valid_service(name) {
            errs.push(
                format!("rate_limits.services.{name}"),
                crate::usage::SERVICE_NAME_RULE,
            );
        }
    }
    if file.usage.channel_capacity == 0 {
        errs.push("usage.channel_capacity", "must be greater than 0");
    }
    if file.usage.max_services == 0 {
        errs.push("usage.max_services", "must be greater than 0");
    }
    if !errs.0.is_empty() {
        return Err(errs.0);
    }
    Ok(RoutingTable {
        version: 1,
        listener: Listener {
            address: l.address.parse().expect("validated above"),
            workers,
            io_driver: l.io_driver,
            max_header_bytes: l.max_header_bytes,
            max_body_bytes: l.max_body_bytes,
            header_timeout: Duration::from_millis(l.header_timeout_ms),
            body_timeout: Duration::from_millis(l.body_timeout_ms),
            send_timeout: Duration::from_millis(l.send_timeout_ms),
            keepalive_timeout: Duration::from_millis(l.keepalive_timeout_ms),
            drain_timeout: Duration::from_millis(l.drain_timeout_ms),
        },
        backends,
        targets,
        tiers,
        category_tier,
        long_context_tier,
        aliases,
        models,
        rules,
        admin: AdminSettings {
            address: admin_address,
            token_env: file.admin.token_env,
            data_plane_token_env: file.admin.data_plane_token_env,
        },
        data_dir: file.storage.data_dir.into(),
        budgets,
        auth_required: file.auth.required,
        rate_limits,
        max_attempts: file.routing.max_attempts,
        unknown_model: file.routing.unknown_model,
        health: HealthSettings {
            interval: (h.interval_ms > 0).then(|| Duration::from_millis(h.interval_ms)),
            timeout: Duration::from_millis(h.timeout_ms),
            eject_after_failures: h.eject_after_failures,
            base_ejection: Duration::from_millis(h.base_ejection_ms),
            max_ejection: Duration::from_millis(h.max_ejection_ms),
            stall_after: (h.stall_after_ms > 0).then(|| Duration::from_millis(h.stall_after_ms)),
        },
        usage: UsageSettings {
            channel_capacity: file.usage.channel_capacity,
            log_events: file.usage.log_events,
            max_services: file.usage.max_services,
        },
        classifier,
        cache,
    })
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn category_names() -> String {
    Category::ALL.map(|c| c.as_str()).join(", ")
}

/// The cost principle: routine transformation work goes to the cheapest tier, open questions to
/// the next one up, generation that needs capability to the larger tiers, and what the
/// classifier cannot place (`other`) to a middle tier rather than the cheapest.
pub fn default_category_rank(category: Category, tiers: usize) -> usize {
    let top = tiers.saturating_sub(1);
    let rank = match category {
        Category::Extraction
        | Category::Classification
        | Category::Summarisation
        | Category::Translation
        | Category::Chat => 0,
        Category::Qa | Category::Other => 1,
        Category::Creative | Category::Code => tiers.saturating_sub(2).max(1),
        Category::Reasoning => top,
    };
    rank.min(top)
}

impl RoutingTable {
    /// Human-readable resolved table for `switchyard check-config`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let l = &self.listener;
        let _ = writeln!(
            out,
            "listener {} workers={} io_driver={} max_header_bytes={} max_body_bytes={}",
            l.address,
            l.workers,
            l.io_driver.as_str(),
            l.max_header_bytes,
            l.max_body_bytes
        );
        let _ = writeln!(out, "backends:");
        for b in &self.backends {
            let key = if b.api_key.is_some() {
                "api key set"
            } else {
                "no api key"
            };
            let _ = writeln!(
                out,
                "  {} {}://{}{} ({key}, max_concurrency={}, weight={})",
                b.name,
                b.scheme.as_str(),
                b.authority,
                b.base_path,
                b.max_concurrency,
                b.weight
            );
        }
        let _ = writeln!(out, "tiers (cheapest first):");
        for t in &self.tiers {
            let names: Vec<String> = t.targets.iter().map(|&id| self.target_name(id)).collect();
            let _ = writeln!(out, "  {} {}: {}", t.rank, t.name, names.join(", "));
        }
        let _ = writeln!(out, "categories:");
        for c in Category::ALL {
            let _ = writeln!(
                out,
                "  {c} -> {}",
                self.tiers[self.category_tier[c.index()]].name
            );
        }
        let _ = writeln!(
            out,
            "  long-context -> {}",
            self.tiers[self.long_context_tier].name
        );
        let mut aliases: Vec<_> = self.aliases.iter().collect();
        aliases.sort_by(|a, b| a.0.cmp(b.0));
        let _ = writeln!(out, "aliases:");
        for (name, route) in aliases {
            match route {
                AliasRoute::Classify => _ = writeln!(out, "  {name} -> classifier"),
                AliasRoute::Tier(r) => {
                    _ = writeln!(out, "  {name} -> tier {}", self.tiers[*r].name)
                }
            }
        }
        let _ = writeln!(out, "rules (first match wins):");
        for r in &self.rules {
            let to = match &r.action {
                RuleAction::Tier(t) => format!("tier {}", self.tiers[*t].name),
                RuleAction::Targets(ids) => ids
                    .iter()
                    .map(|&id| self.target_name(id))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let _ = writeln!(out, "  {} -> {to}", r.name);
        }
        let _ = writeln!(
            out,
            "unknown models: {:?}; max attempts: {}",
            self.unknown_model, self.max_attempts
        );
        out
    }

    pub fn target_name(&self, id: usize) -> String {
        let t = &self.targets[id];
        format!("{}/{}", self.backends[t.backend].name, t.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[backends]]
name = "local"
url = "http://127.0.0.1:8000"
models = [{ name = "small-model", input_per_mtok = 0.1, output_per_mtok = 0.2 },
          { name = "org/big:latest", input_per_mtok = 3, output_per_mtok = 15 }]

[[tiers]]
name = "small"
targets = ["local/small-model"]

[[tiers]]
name = "large"
targets = ["local/org/big:latest"]
"#;

    fn load(text: &str) -> Result<RoutingTable, Vec<String>> {
        load_str(text, "test.toml", &|name| {
            (name == "SET_KEY").then(|| "sk-secret".to_string())
        })
    }

    #[test]
    fn minimal_config_resolves_with_defaults() {
        let t = load(MINIMAL).unwrap();
        assert_eq!(t.listener.address.to_string(), "127.0.0.1:8080");
        assert_eq!(t.tiers.len(), 2);
        assert_eq!(t.target_name(t.tiers[1].targets[0]), "local/org/big:latest");
        assert_eq!(t.category_tier[Category::Extraction.index()], 0);
        assert_eq!(t.category_tier[Category::Reasoning.index()], 1);
        assert_eq!(t.aliases["auto"], AliasRoute::Classify);
        assert_eq!(t.aliases["smart"], AliasRoute::Tier(1));
        assert_eq!(t.targets[1].price.output_micros_per_mtok, 15_000_000);
        assert_eq!(t.targets[0].price.cached_input_micros_per_mtok, 100_000);
        assert!(t.describe().contains("small-model"));
    }

    #[test]
    fn unknown_keys_are_errors_naming_file_and_key() {
        let err = load(&format!("{MINIMAL}\n[listener]\nadress = \"x\"\n")).unwrap_err();
        assert!(err[0].starts_with("test.toml:"), "{err:?}");
        assert!(err[0].contains("adress"), "{err:?}");
    }

    #[test]
    fn every_semantic_error_is_reported_at_once() {
        let text = MINIMAL
            .replace("local/small-model", "nope/small-model")
            .replace("name = \"large\"", "name = \"small\"")
            + "\n[categories]\ncode = \"huge\"\n[routing]\nmax_attempts = 0\n[health]\nstall_after_ms = 200\ntimeout_ms = 0\n";
        let err = load(&text).unwrap_err();
        let all = err.join("\n");
        assert!(
            all.contains("health.timeout_ms: must be greater than 0"),
            "{all}"
        );
        assert!(
            all.contains("health.stall_after_ms: must be 0 (off) or at least 1000"),
            "{all}"
        );
        assert!(all.contains("unknown backend `nope`"), "{all}");
        assert!(all.contains("name must be non-empty and unique"), "{all}");
        assert!(
            all.contains("categories.code: unknown tier `huge`"),
            "{all}"
        );
        assert!(all.contains("routing.max_attempts"), "{all}");
        assert!(err.iter().all(|e| e.starts_with("test.toml: ")));
    }

    #[test]
    fn names_that_label_metrics_cannot_break_them() {
        let text = MINIMAL
            .replace("name = \"local\"", "name = \"lo\\\"cal\"")
            .replace("\"local/", "\"lo\\\"cal/")
            .replace("small-model\"", "small\\nmodel\"")
            .replace("name = \"large\"", "name = \"lar\\\\ge\"")
            + "[[rules]]\nname = \"a\\r\\nset-cookie: x=y\"\ntier = \"small\"\n";
        let all = load(&text).unwrap_err().join("\n");
        for key in ["backends[0]", "models[0]", "tiers[1]", "rules[0]"] {
            assert!(
                all.lines()
                    .any(|l| l.contains(key) && l.contains("quotes, backslashes")),
                "{key}: {all}"
            );
        }
    }

    #[test]
    fn api_key_comes_from_the_environment_only() {
        let with_key = MINIMAL.replace(
            "url = \"http://127.0.0.1:8000\"",
            "url = \"https://api.example.com/openai/v1\"\napi_key_env = \"SET_KEY\"",
        );
        let t = load(&with_key).unwrap();
        let b = &t.backends[0];
        assert_eq!(b.api_key.as_deref(), Some("sk-secret"));
        assert_eq!(
            (b.port, b.authority.as_str(), b.base_path.as_str()),
            (443, "api.example.com", "/openai")
        );
        assert!(
            !format!("{b:?}").contains("sk-secret"),
            "Debug must redact the key"
        );
        // A trailing newline (a secret mounted from a file) is not part of the key; a line
        // break inside it is refused, without showing it.
        let env =
            |value: &'static str| move |name: &str| (name == "SET_KEY").then(|| value.to_string());
        let t = load_str(&with_key, "test.toml", &env("sk-secret\n")).unwrap();
        assert_eq!(t.backends[0].api_key.as_deref(), Some("sk-secret"));
        let err = load_str(&with_key, "test.toml", &env("sk-se\r\ncret"))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("api_key_env: environment variable `SET_KEY` holds a control character")
                && !err.contains("sk-se"),
            "{err}"
        );
        let missing = with_key.replace("SET_KEY", "UNSET_KEY");
        let err = load(&missing).unwrap_err().join("\n");
        assert!(
            err.contains("api_key_env: environment variable `UNSET_KEY` is not set"),
            "{err}"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/switchyard.toml");
        let t = load_str(text, "examples/switchyard.toml", &|name| {
            (name == "OPENAI_API_KEY").then(|| "sk-x".to_string())
        })
        .unwrap();
        assert_eq!(t.tiers.len(), 3);
        assert_eq!(t.rules.len(), 2);
    }

    #[test]
    fn budgets_admin_and_storage_are_validated() {
        let t = load(&(MINIMAL.to_string()
            + "[budgets]\ntime_zone = \"America/New_York\"\ndefault_daily_usd = 2.5\n[budgets.services.etl]\ncategories = { code = 0.5 }\n"))
        .unwrap();
        assert_eq!(t.budgets.default_daily, Some(2_500_000));
        assert_eq!(
            t.budgets.services["etl"],
            crate::routing::ServiceBudget {
                daily: None,
                categories: BTreeMap::from([(Category::Code, 500_000)]),
            }
        );
        // 2026-11-27 03:00 UTC is still the 26th in New York.
        let at: jiff::Timestamp = "2026-11-27T03:00:00Z".parse().unwrap();
        assert_eq!(t.budgets.day_of(at), "2026-11-26");
        assert_eq!(t.admin.address, Some("127.0.0.1:8081".parse().unwrap()));
        let err = load(&(MINIMAL.to_string()
            + "[admin]\naddress = \"nowhere\"\n[storage]\ndata_dir = \"\"\n[budgets]\ntime_zone = \"Mars/Olympus\"\ndefault_daily_usd = -1.0\nlease_usd = 0.0\n[budgets.services.etl]\ncategories = { poetry = 1.0 }\n[budgets.services.\"a b\"]\ndaily_usd = 1.0\n"))
        .unwrap_err()
        .join("\n");
        for needle in [
            "admin.address: `nowhere` is not an ip:port",
            "storage.data_dir: must not be empty",
            "budgets.time_zone: `Mars/Olympus`",
            "budgets.default_daily_usd: -1 must be between 0",
            "budgets.lease_usd: must be at least 0.000001",
            "budgets.services.etl.categories.poetry: unknown category",
            "budgets.services.a b: a service name is 1 to 128",
        ] {
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }

    #[test]
    fn tls_ca_file_must_be_readable_pem_on_an_https_backend() {
        let with = |url: &str, file: &str| {
            MINIMAL.replace(
                "url = \"http://127.0.0.1:8000\"",
                &format!("url = \"{url}\"\ntls_ca_file = \"{file}\""),
            )
        };
        let err = load(&with("https://h", "/nonexistent/ca.pem"))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("tls_ca_file: cannot read `/nonexistent/ca.pem`"),
            "{err}"
        );
        let err = load(&with("http://h", "Cargo.toml"))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("only applies to https://") && err.contains("holds no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn backend_urls_parse_or_fail_clearly() {
        assert_eq!(
            parse_backend_url("http://[::1]:9000/x/").unwrap(),
            (Scheme::Http, "::1".into(), 9000, "/x".into())
        );
        assert_eq!(
            parse_backend_url("https://h").unwrap(),
            (Scheme::Https, "h".into(), 443, String::new())
        );
        for url in ["http://h:8000/v1", "http://h:8000/v1/", "http://h:8000"] {
            assert_eq!(parse_backend_url(url).unwrap().3, "", "{url}");
        }
        assert_eq!(
            parse_backend_url("https://api.groq.com/openai/v1")
                .unwrap()
                .3,
            "/openai"
        );
        assert!(parse_backend_url("ftp://h").is_err());
        assert!(parse_backend_url("http://h:99999").is_err());
        assert!(parse_backend_url("http://:80").is_err());
        assert!(parse_backend_url("http://u:p@h").is_err());
        for url in [
            "http://2001:db8::1",
            "https://x.openai.azure.com/openai?api-version=2024-06-01",
            "http://h/v1#top",
            "http://h/v 1",
        ] {
            assert!(parse_backend_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn default_category_ranks_follow_the_cost_principle() {
        use Category::*;
        let ranks = |n| [Extraction, Qa, Code, Reasoning].map(|c| default_category_rank(c, n));
        assert_eq!(ranks(1), [0, 0, 0, 0]);
        assert_eq!(ranks(2), [0, 1, 1, 1]);
        assert_eq!(ranks(4), [0, 1, 2, 3]);
    }

    #[test]
    fn rules_validate_their_references() {
        let text = format!("{MINIMAL}\n[[rules]]\nname = \"r\"\ntier = \"small\"\ntargets = [\"local/small-model\"]\n[[rules]]\nname = \"p\"\ntier = \"large\"\nmatch = {{ priority = [\"urgent\"], category = [\"code\"] }}\n");
        let err = load(&text).unwrap_err().join("\n");
        assert!(err.contains("rules[0] (r): set exactly one"), "{err}");
        assert!(
            err.contains("rules[1] (p).match.priority: unknown priority `urgent`"),
            "{err}"
        );
        let text = format!("{MINIMAL}\n[[rules]]\nname = \"p\"\ntier = \"large\"\nmatch = {{ path = [\"/v1/embeddings\", \"/chat/completions\"] }}\n");
        let err = load(&text).unwrap_err().join("\n");
        assert!(
            err.contains("rules[0] (p).match.path: `/chat/completions` is not a routed endpoint")
                && !err.contains("`/v1/embeddings`"),
            "{err}"
        );
        let text = format!("{MINIMAL}\n[[rules]]\nname = \"p\"\ntier = \"large\"\nmatch = {{ service = [\"ok\", \"bad name\"] }}\n[[rules]]\nname = \"p\"\ntier = \"small\"\n");
        let err = load(&text).unwrap_err().join("\n");
        assert!(
            err.contains("rules[0] (p).match.service: `bad name`") && !err.contains("`ok`"),
            "{err}"
        );
        assert!(
            err.contains("rules[1] (p): another rule has this name"),
            "{err}"
        );
    }

    #[test]
    fn a_tier_may_not_take_the_classifiers_name() {
        let err = load(&MINIMAL.replace("name = \"small\"", "name = \"auto\""))
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("tiers[0] (auto): `auto` is the classifier's"),
            "{err}"
        );
    }
}
#[cfg(test)]
mod mutation_tests {
    use super::*;

    /// Loading a config never panics, whatever its values: each run gives a few settings of
    /// the example config extreme or malformed values of their own type (so that most runs
    /// get past TOML parsing into validation), or cuts a line short.
    #[test]
    fn mutated_configs_never_panic() {
        let seed = include_str!("../../examples/switchyard.toml");
        let numbers = [
            "0",
            "-1",
            "1e308",
            "-1e308",
            "nan",
            "inf",
            "-inf",
            "18446744073709551615",
            "9223372036854775807",
            "-9223372036854775808",
            "0.0000001",
            "4294967296",
            "65536",
        ];
        let strings = [
            "\"\"",
            "\"\\u0000\"",
            "\"a/b/c\"",
            "\"x\\r\\ny\"",
            "\"http://[::1\"",
            "\"*\"",
            "\"é\"",
            "\"https://\"",
            "\"http://127.0.0.1:0\"",
            "\"/\"",
            "\"auto\"",
            "\"small\"",
            "\" \"",
        ];
        let others = ["[]", "{}", "true", "[\"\"]", "[{}]"];
        let settings: Vec<usize> = seed
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim_start().starts_with('#') && l.contains('='))
            .map(|(i, _)| i)
            .collect();
        let mut rng = fastrand::Rng::with_seed(0x5eed_c0f1_6000_0001);
        let (mut validated, mut runs) = (0, 0);
        let started = std::time::Instant::now();
        while runs < 600 && started.elapsed() < std::time::Duration::from_secs(20) {
            runs += 1;
            let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
            for _ in 0..rng.usize(1..=3) {
                let line = &mut lines[settings[rng.usize(..settings.len())]];
                // A line cut short by an earlier mutation may have lost its `=`.
                let Some(eq) = line.find('=') else { continue };
                let old = line[eq + 1..].trim_start();
                let pool: &[&str] = match old.as_bytes().first() {
                    Some(b'"') => &strings,
                    Some(b'0'..=b'9' | b'-') => &numbers,
                    _ => &others,
                };
                if rng.usize(..5) == 0 {
                    let cut = rng.usize(..=line.len());
                    if line.is_char_boundary(cut) {
                        line.truncate(cut);
                    }
                } else {
                    *line = format!("{} {}", &line[..=eq], pool[rng.usize(..pool.len())]);
                }
            }
            let text = lines.join("\n");
            match load_str(&text, "mutated.toml", &|_| Some("sk-x".to_string())) {
                Err(e) if e.iter().all(|e| e.contains("TOML parse error")) => {}
                _ => validated += 1,
            }
        }
        assert!(
            validated * 5 > runs,
            "{validated} of {runs} runs got past parsing"
        );
    }
}
