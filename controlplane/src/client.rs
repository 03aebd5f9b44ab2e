//! The command line's side of the control API: `switchyard status`, `spend`, `budgets`,
//! `config validate|apply`, `cache purge`, `keys create|list|revoke`. Each call connects, sends the admin token, and renders the reply
//! as text.
//! Must not: read or change state except through the API.

use crate::api::pb::{self, control_client::ControlClient};
use std::fmt::Write as _;
use switchyard_shared::config::MAX_BUDGET_MICROS;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::Channel;

/// Where the control API is and how to prove we may use it.
pub struct Admin {
    /// e.g. `http://127.0.0.1:8081`
    pub url: String,
    pub token: String,
}

pub enum Command {
    Status,
    Spend {
        service: String,
        day: String,
    },
    Budgets,
    SetBudget {
        service: String,
        category: String,
        /// `None` clears the API-set limit.
        daily_usd: Option<f64>,
    },
    ValidateConfig {
        toml: String,
        source: String,
    },
    ApplyConfig {
        toml: String,
        source: String,
    },
    PurgeCache,
    CreateKey {
        service: String,
        any_service: bool,
    },
    ListKeys,
    RevokeKey {
        id: String,
    },
}

pub(crate) fn usd(micros: u64) -> String {
    format!("${}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Runs one command; `Err` carries what to print on stderr (and means a non-zero exit).
pub fn run(admin: &Admin, command: Command) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(call(admin, command))
}

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type AuthedClient = ControlClient<InterceptedService<Channel, Bearer>>;

impl Admin {
    /// A client for the control API; with `lazy`, it connects (and reconnects) on use.
    pub async fn client(&self, lazy: bool) -> Result<AuthedClient, String> {
        let endpoint = Channel::from_shared(self.url.clone())
            .map_err(|e| format!("admin URL `{}`: {e}", self.url))?;
        let channel = if lazy {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.map_err(|e| {
                // tonic's transport error says only "transport error": its causes say why.
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                format!("cannot reach the control API at {}: {why}", self.url)
            })?
        };
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| "the admin token holds characters a header cannot carry".to_string())?;
        Ok(ControlClient::with_interceptor(channel, Bearer(bearer)))
    }
}

async fn call(admin: &Admin, command: Command) -> Result<String, String> {
    let mut client = admin.client(false).await?;
    let status = |s: tonic::Status| format!("control API: {}", s.message());
    let mut out = String::new();
    match command {
        Command::Status => {
            let s = client
                .get_stats(pb::GetStatsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let serving = if s.listen_address.is_empty() {
                "control plane only (its data planes serve requests)".to_string()
            } else {
                format!(
                    "listening on {} ({} workers, {})",
                    s.listen_address, s.workers, s.io_driver
                )
            };
            let _ = writeln!(
                out,
                "config version {}; up {} s; {serving}",
                s.config_version,
                s.uptime_ms / 1000,
            );
            let _ = writeln!(
                out,
                "requests {} in the stored spend ({} in flight); since start: budget downgrades {}, rejections {}; rate limited {}; usage events dropped {}",
                s.requests, s.inflight, s.budget_downgraded, s.budget_rejected, s.rate_limited, s.usage_events_dropped
            );
            // The cache lives where requests are served.
            if !s.listen_address.is_empty() {
                let _ = writeln!(
                    out,
                    "cache: {} entries, {} bytes, {} evicted",
                    s.cache_entries, s.cache_bytes, s.cache_evictions
                );
            }
            for b in s.backends {
                let state = if b.healthy { "up" } else { "down" };
                let _ = writeln!(out, "backend {}: {state}, {} in flight", b.name, b.inflight);
            }
            for dp in &s.data_planes {
                render_data_plane(&mut out, dp, s.config_version);
            }
        }
        Command::Spend { service, day } => {
            let r = client
                .get_spend(pb::GetSpendRequest { service, day })
                .await
                .map_err(status)?
                .into_inner();
            let _ = writeln!(
                out,
                "{:<10} {:<16} {:<14} {:<10} {:<24} {:>8} {:>10} {:>10} {:>14}",
                "day",
                "service",
                "category",
                "tier",
                "model",
                "requests",
                "prompt",
                "completion",
                "cost"
            );
            let mut total = 0;
            for row in r.rows {
                total += row.cost_micros;
                let _ = writeln!(
                    out,
                    "{:<10} {:<16} {:<14} {:<10} {:<24} {:>8} {:>10} {:>10} {:>14}",
                    row.day,
                    row.service,
                    row.category,
                    row.tier,
                    row.model,
                    row.requests,
                    row.prompt_tokens,
                    row.completion_tokens,
                    usd(row.cost_micros)
                );
            }
            let _ = writeln!(out, "total on {}: {}", r.day, usd(total));
        }
        Command::Budgets => {
            let r = client
                .get_budgets(pb::GetBudgetsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            render_budgets(&mut out, r);
        }
        Command::SetBudget {
            service,
            category,
            daily_usd,
        } => {
            let daily_micros = match daily_usd {
                Some(u)
                    if u.is_finite() && (0.0..=MAX_BUDGET_MICROS as f64).contains(&(u * 1e6)) =>
                {
                    (u * 1e6).round() as u64
                }
                Some(u) => return Err(format!("{u} is not a daily budget in USD")),
                None => 0,
            };
            let r = client
                .set_budget(pb::SetBudgetRequest {
                    service,
                    category,
                    daily_micros,
                    clear: daily_usd.is_none(),
                })
                .await
                .map_err(status)?
                .into_inner();
            render_budgets(&mut out, r);
        }
        Command::ValidateConfig { toml, source } => {
            let r = client
                .validate_config(pb::ConfigText { toml, source })
                .await
                .map_err(status)?
                .into_inner();
            if !r.valid {
                return Err(r.errors.join("\n"));
            }
            let _ = write!(out, "valid\n{}", r.resolved);
        }
        Command::ApplyConfig { toml, source } => {
            let r = client
                .apply_config(pb::ConfigText { toml, source })
                .await
                .map_err(status)?
                .into_inner();
            if !r.applied {
                return Err(format!(
                    "not applied; version {} stays in effect:\n{}",
                    r.version,
                    r.errors.join("\n")
                ));
            }
            let mut planes = String::new();
            let mut refused = false;
            for dp in &r.data_planes {
                refused |= render_data_plane(&mut planes, dp, r.version);
            }
            if refused {
                // Not in effect everywhere: a failure for scripts, with what did happen.
                return Err(format!(
                    "config version {} is applied, but not every data plane took it:\n{}",
                    r.version,
                    planes.trim_end()
                ));
            }
            let _ = write!(
                out,
                "applied: config version {} in effect\n{planes}",
                r.version
            );
        }
        Command::CreateKey {
            service,
            any_service,
        } => {
            let r = client
                .create_key(pb::CreateKeyRequest {
                    service,
                    any_service,
                })
                .await
                .map_err(status)?
                .into_inner();
            let _ = writeln!(
                out,
                "{}\n(key id {}; this is the only time the key is shown)",
                r.key, r.id
            );
        }
        Command::ListKeys => {
            let r = client
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for k in r.keys {
                let created = jiff::Timestamp::from_millisecond(k.created_unix_ms)
                    .map_or_else(|_| "?".to_string(), |t| t.to_string());
                let scope = if k.any_service { " (any service)" } else { "" };
                let _ = writeln!(out, "{} {}{scope} created {created}", k.id, k.service);
            }
        }
        Command::RevokeKey { id } => {
            let r = client
                .revoke_key(pb::RevokeKeyRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if r.revoked == 0 {
                return Err("no key has that id".into());
            }
            let _ = writeln!(out, "revoked {} key(s)", r.revoked);
        }
        Command::PurgeCache => {
            let r = client
                .purge_cache(pb::PurgeCacheRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let _ = writeln!(
                out,
                "purged {} entries ({} bytes)",
                r.entries_removed, r.bytes_removed
            );
        }
    }
    Ok(out)
}

/// One line (and its errors) on a remote data plane's config against `version`, the control
/// plane's; returns whether it refused that version.
fn render_data_plane(out: &mut String, dp: &pb::DataPlaneConfig, version: u64) -> bool {
    let who = format!("data plane `{}` ({})", dp.data_plane, dp.instance);
    let serves = match dp.in_effect {
        0 => "has not said which version it serves".to_string(),
        v => format!("serves version {v}"),
    };
    if dp.in_effect >= version {
        let _ = write!(out, "{who}: {serves}");
        if !dp.restart_needed.is_empty() {
            let _ = write!(
                out,
                "; {} take effect when it restarts",
                dp.restart_needed.join(", ")
            );
        }
        let _ = writeln!(out);
        return false;
    }
    if !crate::followers::answered(dp, version) {
        let _ = writeln!(out, "{who}: {serves}; no answer on version {version} yet");
        return false;
    }
    let _ = writeln!(out, "{who}: {serves}; refused version {}:", dp.refused);
    for e in &dp.errors {
        let _ = writeln!(out, "  {e}");
    }
    true
}

fn render_budgets(out: &mut String, r: pb::GetBudgetsReply) {
    let _ = writeln!(out, "budget day {} ({})", r.day, r.time_zone);
    for b in r.budgets {
        let scope = if b.category.is_empty() {
            b.service
        } else {
            format!("{}/{}", b.service, b.category)
        };
        let _ = writeln!(
            out,
            "{scope}: {} of {} spent, {} reserved ({})",
            usd(b.spent_micros),
            usd(b.daily_micros),
            usd(b.reserved_micros),
            b.source
        );
    }
}
