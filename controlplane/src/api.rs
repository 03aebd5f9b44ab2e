//! The admin listener: the gRPC control API (`switchyard.control.v1.Control`, with server
//! reflection for grpcurl) and the Prometheus `/metrics` page, all behind one bearer token.
//! Must not: answer anything without the token.

use crate::configs::ConfigRecord;
use crate::followers;
use crate::store::StoredKey;
use crate::ControlPlane;
use std::pin::Pin;
use std::sync::Arc;
use switchyard_dataplane::auth::key_hash;
use switchyard_shared::category::Category;
use switchyard_shared::config::MAX_BUDGET_MICROS;
use switchyard_shared::openai::{Endpoint, MAX_TOKENS};
use switchyard_shared::usage::{
    is_counted_service, is_label_safe, is_valid_service, UsageEvent, REFUSED_BY, SERVICE_NAME_RULE,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("switchyard.control.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("control_descriptor");
}

use pb::control_server::{Control, ControlServer};

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `authorization` header value carries the admin token.
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    header
        .and_then(|h| h.strip_prefix(b"Bearer "))
        .is_some_and(|given| same_secret(given, token.as_bytes()))
}

fn record(r: &ConfigRecord) -> pb::ConfigVersion {
    pb::ConfigVersion {
        version: r.version,
        toml: r.toml.clone(),
        source: r.source.clone(),
        applied_unix_ms: r.applied_unix_ms,
    }
}

fn source_or_api(source: String) -> String {
    if source.is_empty() {
        "api".into()
    } else {
        source
    }
}

fn parse_category(name: &str) -> Result<Option<Category>, Status> {
    Category::parse_scope(name)
        .ok_or_else(|| Status::invalid_argument(format!("unknown category `{name}`")))
}

/// The budget a request names: a valid service, and a category or none (the service's own).
fn budget_key(
    service: String,
    category: &str,
) -> Result<switchyard_dataplane::budget::BudgetKey, Status> {
    if !is_valid_service(&service) {
        return Err(Status::invalid_argument(SERVICE_NAME_RULE));
    }
    Ok((service, parse_category(category)?))
}

/// A usage record from a remote data plane, as the ledger's event.
pub fn event_from_record(r: pb::UsageRecord) -> Result<UsageEvent, String> {
    let endpoint = Endpoint::from_path(&r.endpoint)
        .ok_or_else(|| format!("unknown endpoint `{}`", r.endpoint))?
        .path();
    let category =
        Category::parse(&r.category).ok_or_else(|| format!("unknown category `{}`", r.category))?;
    let cache = ["", "hit", "miss", "stored", "bypass"]
        .into_iter()
        .find(|c| *c == r.cache)
        .ok_or_else(|| format!("unknown cache outcome `{}`", r.cache))?;
    let request_id = u64::from_str_radix(&r.request_id, 16)
        .map_err(|_| format!("request id `{}` is not hex", r.request_id))?;
    // These label metrics and spend rows: what a local data plane could not produce is refused.
    if !is_counted_service(&r.service) {
        return Err(format!(
            "service `{}`: {SERVICE_NAME_RULE}",
            r.service.escape_debug()
        ));
    }
    // Token counts no request can reach (what the data planes' own figures are capped at):
    // a bad or compromised data plane must not saturate spend or wrap the metrics.
    for (what, n) in [
        ("prompt_tokens", r.prompt_tokens),
        ("cached_tokens", r.cached_tokens),
        ("completion_tokens", r.completion_tokens),
    ] {
        if n > MAX_TOKENS {
            return Err(format!(
                "{what} {n} is more than any request reaches ({MAX_TOKENS})"
            ));
        }
    }
    for (what, name) in [
        ("tier", &r.tier),
        ("backend", &r.backend),
        ("model", &r.model),
    ] {
        if !is_label_safe(name) {
            return Err(format!(
                "{what} `{}` has quotes, backslashes or control characters",
                name.escape_debug()
            ));
        }
    }
    Ok(UsageEvent {
        request_id,
        service: r.service.into(),
        endpoint,
        category,
        tier: r.tier.into(),
        backend: r.backend.into(),
        model: r.model.into(),
        prompt_tokens: r.prompt_tokens,
        cached_tokens: r.cached_tokens,
        completion_tokens: r.completion_tokens,
        tokens_estimated: r.tokens_estimated,
        // Booked, but never more than a day's largest budget for one request.
        cost_micros: r.cost_micros.min(MAX_BUDGET_MICROS),
        first_byte_us: r.first_byte_us,
        total_us: r.total_us,
        status: u16::try_from(r.status).map_err(|_| format!("status {}", r.status))?,
        attempts: r.attempts,
        streamed: r.streamed,
        incomplete: r.incomplete,
        cache,
        saved_micros: r.saved_micros.min(MAX_BUDGET_MICROS),
        budget_downgraded: r.budget_downgraded,
        refused_by: REFUSED_BY
            .into_iter()
            .find(|c| *c == r.refused_by)
            .ok_or_else(|| format!("unknown refusal `{}`", r.refused_by))?,
        config_version: r.config_version,
    })
}

/// The usage record a data plane sends for an event that ended at `unix_ms`.
pub fn record_from_event(e: &UsageEvent, unix_ms: i64) -> pb::UsageRecord {
    pb::UsageRecord {
        request_id: switchyard_shared::usage::format_request_id(e.request_id),
        service: e.service.to_string(),
        endpoint: e.endpoint.to_string(),
        category: e.category.as_str().to_string(),
        tier: e.tier.to_string(),
        backend: e.backend.to_string(),
        model: e.model.to_string(),
        prompt_tokens: e.prompt_tokens,
        cached_tokens: e.cached_tokens,
        completion_tokens: e.completion_tokens,
        tokens_estimated: e.tokens_estimated,
        cost_micros: e.cost_micros,
        first_byte_us: e.first_byte_us,
        total_us: e.total_us,
        status: u32::from(e.status),
        attempts: e.attempts,
        streamed: e.streamed,
        incomplete: e.incomplete,
        cache: e.cache.to_string(),
        saved_micros: e.saved_micros,
        config_version: e.config_version,
        budget_downgraded: e.budget_downgraded,
        refused_by: e.refused_by.to_string(),
        unix_ms,
    }
}

pub struct Api(pub Arc<ControlPlane>);

impl Api {
    /// Runs store writes on a blocking thread: a redb commit waits for the disk, and the
    /// runtime's one worker thread also answers the data planes' lease and usage calls.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ControlPlane) -> Result<T, String> + Send + 'static,
    ) -> Result<T, Status> {
        let cp = self.0.clone();
        tokio::task::spawn_blocking(move || work(&cp))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::internal)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigVersion, Status>> + Send>>;

#[tonic::async_trait]
impl Control for Api {
    async fn get_config(
        &self,
        request: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ConfigVersion>, Status> {
        let version = request.into_inner().version;
        // The history waits while a config validates, the store for the disk.
        let found = self
            .blocking(move |cp| {
                if version == 0 {
                    return Ok(Some(cp.configs.current()));
                }
                match cp.configs.version(version) {
                    Some(r) => Ok(Some(r)),
                    None => Ok(cp.store.config(version)?.map(Arc::new)),
                }
            })
            .await?;
        found
            .map(|r| Response::new(record(&r)))
            .ok_or_else(|| Status::not_found(format!("no config version {version}")))
    }

    async fn validate_config(
        &self,
        request: Request<pb::ConfigText>,
    ) -> Result<Response<pb::ValidateConfigReply>, Status> {
        let r = request.into_inner();
        let source = source_or_api(r.source);
        // Parsing a config and building its classifier takes a while: not on the runtime's
        // thread, which serves the data planes' leases meanwhile.
        let reply = self
            .blocking(move |cp| {
                Ok(match cp.configs.validate(&r.toml, &source) {
                    Ok(table) => pb::ValidateConfigReply {
                        valid: true,
                        errors: vec![],
                        resolved: table.describe(),
                    },
                    Err(errors) => pb::ValidateConfigReply {
                        valid: false,
                        errors,
                        resolved: String::new(),
                    },
                })
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn apply_config(
        &self,
        request: Request<pb::ConfigText>,
    ) -> Result<Response<pb::ApplyConfigReply>, Status> {
        let r = request.into_inner();
        let source = source_or_api(r.source);
        let mut reply = self
            .blocking(move |cp| {
                Ok(match cp.configs.apply(r.toml, &source) {
                    Ok(version) => pb::ApplyConfigReply {
                        applied: true,
                        version,
                        ..Default::default()
                    },
                    Err(errors) => pb::ApplyConfigReply {
                        applied: false,
                        version: cp.configs.current().version,
                        errors,
                        ..Default::default()
                    },
                })
            })
            .await?;
        if reply.applied {
            // Remote data planes load it with their own environment (API keys' variables)
            // and may refuse it: the caller hears which did.
            let followers = &self.0.followers;
            reply.data_planes = followers.settle(reply.version, followers::SETTLE).await;
        }
        Ok(Response::new(reply))
    }

    async fn get_snapshot_version(
        &self,
        _: Request<pb::GetSnapshotVersionRequest>,
    ) -> Result<Response<pb::SnapshotVersion>, Status> {
        Ok(Response::new(pb::SnapshotVersion {
            version: self.0.configs.current().version,
        }))
    }

    type WatchSnapshotsStream = WatchStream;

    async fn watch_snapshots(
        &self,
        request: Request<pb::WatchSnapshotsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let r = request.into_inner();
        eprintln!(
            "switchyard: data plane `{}` follows the config",
            r.data_plane
        );
        let following = self.0.followers.join(r.data_plane, r.instance);
        let stream =
            tokio_stream::wrappers::WatchStream::new(self.0.configs.subscribe()).map(move |r| {
                // Ends with the stream: the data plane no longer follows.
                let _ = &following;
                Ok(record(&r))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_config_state(
        &self,
        request: Request<pb::DataPlaneConfig>,
    ) -> Result<Response<pb::ReportConfigStateReply>, Status> {
        let state = request.into_inner();
        let refusal = format!(
            "switchyard: data plane `{}` refused config version {}: {}",
            state.data_plane,
            state.refused,
            state.errors.join("; ")
        );
        let refused = state.refused;
        let Some(before) = self.0.followers.report(state) else {
            return Err(Status::failed_precondition(
                "this data plane does not follow the config (no snapshot stream open)",
            ));
        };
        if refused > before.refused {
            eprintln!("{refusal}");
        }
        Ok(Response::new(pb::ReportConfigStateReply {}))
    }

    async fn report_usage(
        &self,
        request: Request<Streaming<pb::UsageBatch>>,
    ) -> Result<Response<pb::ReportUsageReply>, Status> {
        let mut batches = request.into_inner();
        let mut reply = pb::ReportUsageReply::default();
        while let Some(batch) = batches.message().await? {
            let r = self.0.record_remote(batch);
            reply.accepted += r.accepted;
            reply.duplicates += r.duplicates;
            reply.rejected += r.rejected;
        }
        // Acknowledged only once committed: a data plane forgets what was acknowledged. When
        // the commit fails, it sends the batch again later (counted once, by its sequences).
        let cp = self.0.clone();
        tokio::task::spawn_blocking(move || cp.flush())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        Ok(Response::new(reply))
    }

    async fn get_spend(
        &self,
        request: Request<pb::GetSpendRequest>,
    ) -> Result<Response<pb::GetSpendReply>, Status> {
        let r = request.into_inner();
        let day = if r.day.is_empty() {
            self.0.budgets.day()
        } else if let Ok(date) = jiff::civil::Date::strptime("%Y-%m-%d", r.day.trim()) {
            // As spend rows name days: `2026-1-5` finds 2026-01-05.
            date.to_string()
        } else {
            return Err(Status::invalid_argument(format!(
                "day `{}` is not YYYY-MM-DD",
                r.day
            )));
        };
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let rows = self
            .0
            .ledger
            .spend(&day, service)
            .into_iter()
            .map(|(k, t)| pb::SpendRow {
                day: k.day,
                service: k.service,
                category: k.category.as_str().to_string(),
                tier: k.tier.to_string(),
                model: k.model.to_string(),
                requests: t.requests,
                errors: t.errors,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                cost_micros: t.cost_micros,
                saved_micros: t.saved_micros,
                estimated: t.estimated,
            })
            .collect();
        Ok(Response::new(pb::GetSpendReply { day, rows }))
    }

    async fn get_budgets(
        &self,
        _: Request<pb::GetBudgetsRequest>,
    ) -> Result<Response<pb::GetBudgetsReply>, Status> {
        Ok(Response::new(self.0.budget_report()))
    }

    async fn set_budget(
        &self,
        request: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::GetBudgetsReply>, Status> {
        let r = request.into_inner();
        let key = budget_key(r.service, &r.category)?;
        if !r.clear && r.daily_micros > MAX_BUDGET_MICROS {
            return Err(Status::invalid_argument(format!(
                "daily_micros must be at most {MAX_BUDGET_MICROS} ($1e9)"
            )));
        }
        if r.clear && !self.0.budgets.overrides().contains_key(&key) {
            return Err(Status::not_found(format!(
                "`{}`{} has no budget set through the API to clear (a config budget changes with the config)",
                key.0,
                key.1.map_or(String::new(), |c| format!(" ({c})"))
            )));
        }
        let limit = (!r.clear).then_some(r.daily_micros);
        self.blocking(move |cp| cp.set_budget(key, limit)).await?;
        Ok(Response::new(self.0.budget_report()))
    }

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        Ok(Response::new(self.0.stats()))
    }

    async fn purge_cache(
        &self,
        _: Request<pb::PurgeCacheRequest>,
    ) -> Result<Response<pb::PurgeCacheReply>, Status> {
        let Some(dp) = &self.0.local else {
            return Err(Status::failed_precondition(
                "this process runs no data plane (`switchyard control`): remote data planes keep their caches",
            ));
        };
        let (entries_removed, bytes_removed) =
            dp.shared.cache.as_ref().map_or((0, 0), |c| c.purge());
        Ok(Response::new(pb::PurgeCacheReply {
            entries_removed,
            bytes_removed,
        }))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyReply>, Status> {
        let r = request.into_inner();
        if !is_valid_service(&r.service) {
            return Err(Status::invalid_argument(SERVICE_NAME_RULE));
        }
        let key = format!("sy-{}", crate::random_hex(24).map_err(Status::internal)?);
        let stored = StoredKey {
            hash: key_hash(key.as_bytes()),
            service: r.service,
            any_service: r.any_service,
            created_unix_ms: crate::configs::now_unix_ms(),
        };
        let id = key_id(&stored.hash);
        self.blocking(move |cp| cp.change_keys(|store| store.add_key(&stored)))
            .await?;
        Ok(Response::new(pb::CreateKeyReply { key, id }))
    }

    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysReply>, Status> {
        let keys = self.0.store.load_keys().map_err(Status::internal)?;
        Ok(Response::new(pb::ListKeysReply {
            keys: keys
                .into_iter()
                .map(|k| pb::KeyInfo {
                    id: key_id(&k.hash),
                    service: k.service,
                    any_service: k.any_service,
                    created_unix_ms: k.created_unix_ms,
                })
                .collect(),
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyReply>, Status> {
        let id = request.into_inner().id.to_ascii_lowercase();
        if id.len() < 6 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(
                "a key id is at least 6 hex digits (see ListKeys)",
            ));
        }
        let revoked = self
            .blocking(move |cp| {
                cp.change_keys(|store| {
                    let matching: Vec<[u8; 32]> = store
                        .load_keys()?
                        .into_iter()
                        .map(|k| k.hash)
                        .filter(|h| key_id_full(h).starts_with(&id))
                        .collect();
                    store.revoke_keys(&matching)
                })
            })
            .await? as u64;
        Ok(Response::new(pb::RevokeKeyReply { revoked }))
    }

    async fn lease_budget(
        &self,
        request: Request<pb::LeaseBudgetRequest>,
    ) -> Result<Response<pb::LeaseBudgetReply>, Status> {
        let r = request.into_inner();
        let budgets = &self.0.budgets;
        let day = budgets.day();
        if r.day != day {
            return Ok(Response::new(pb::LeaseBudgetReply {
                granted_micros: 0,
                unlimited: false,
                day,
            }));
        }
        let key = budget_key(r.service, &r.category)?;
        let granted = budgets.grant(key.clone(), r.micros, r.need_micros);
        if let Some(amount @ 1..) = granted {
            // Recorded before the data plane hears of it: a restarted control plane knows it.
            let day = day.clone();
            self.blocking(move |cp| {
                cp.store.add_granted(&day, &key, amount).inspect_err(|_| {
                    // Not delivered: the money goes back to the budget.
                    cp.budgets.return_grant(key, amount);
                })
            })
            .await?;
        }
        Ok(Response::new(pb::LeaseBudgetReply {
            granted_micros: granted.unwrap_or(0),
            unlimited: granted.is_none(),
            day,
        }))
    }

    async fn return_budget(
        &self,
        request: Request<pb::ReturnBudgetRequest>,
    ) -> Result<Response<pb::ReturnBudgetReply>, Status> {
        let r = request.into_inner();
        let key = budget_key(r.service, &r.category)?;
        if r.day != self.0.budgets.day() {
            // A past day's grants no longer matter; a future one's are not out yet.
            return Ok(Response::new(pb::ReturnBudgetReply { returned_micros: 0 }));
        }
        let returned = self
            .blocking(move |cp| {
                // Recorded first: a control plane restarted after this counts it as back.
                let taken = cp.store.sub_granted(&r.day, &key, r.micros)?;
                cp.budgets.return_grant(key, taken);
                Ok(taken)
            })
            .await?;
        Ok(Response::new(pb::ReturnBudgetReply {
            returned_micros: returned,
        }))
    }

    async fn lease_rate(
        &self,
        request: Request<pb::LeaseRateRequest>,
    ) -> Result<Response<pb::LeaseRateReply>, Status> {
        let r = request.into_inner();
        let snapshot = self.0.configs.snapshot().load();
        let granted = snapshot.limits.lease(&r.service, r.tokens, r.units);
        Ok(Response::new(pb::LeaseRateReply {
            granted: granted.unwrap_or(0),
            unlimited: granted.is_none(),
        }))
    }

    async fn get_key_hashes(
        &self,
        _: Request<pb::GetKeyHashesRequest>,
    ) -> Result<Response<pb::GetKeyHashesReply>, Status> {
        let keys = self.0.store.load_keys().map_err(Status::internal)?;
        Ok(Response::new(pb::GetKeyHashesReply {
            keys: keys
                .into_iter()
                .map(|k| pb::KeyHash {
                    sha256: k.hash.to_vec(),
                    service: k.service,
                    any_service: k.any_service,
                })
                .collect(),
        }))
    }
}

fn key_id_full(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// How keys are named in listings: enough of the hash to tell them apart, nothing of the key.
fn key_id(hash: &[u8; 32]) -> String {
    key_id_full(hash)[..12].to_string()
}

/// The calls a data-plane token may make: what a remote data plane needs, nothing that
/// changes configuration, budgets or keys.
const DATA_PLANE_CALLS: [&str; 8] = [
    "WatchSnapshots",
    "ReportConfigState",
    "ReportUsage",
    "LeaseBudget",
    "ReturnBudget",
    "LeaseRate",
    "GetKeyHashes",
    "GetBudgets",
];

/// The tokens the admin listener accepts.
pub struct Tokens {
    /// Everything.
    pub admin: Arc<str>,
    /// Only `DATA_PLANE_CALLS` (for remote data planes, so they need not hold the admin token).
    pub data_plane: Option<Arc<str>>,
}

impl Tokens {
    fn is_data_plane(&self, authorization: Option<&[u8]>) -> bool {
        self.data_plane
            .as_deref()
            .is_some_and(|t| authorized(authorization, t))
    }

    /// Whether `authorization` allows a request for `path`.
    fn allow(&self, authorization: Option<&[u8]>, path: &str) -> bool {
        if authorized(authorization, &self.admin) {
            return true;
        }
        let call = path.strip_prefix("/switchyard.control.v1.Control/");
        self.is_data_plane(authorization) && call.is_some_and(|c| DATA_PLANE_CALLS.contains(&c))
    }
}

/// Every request on the admin listener (gRPC, reflection, `/metrics`) passes here first.
async fn guard(
    axum::extract::State(tokens): axum::extract::State<Arc<Tokens>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let path = request.uri().path();
    if tokens.allow(authorization, path) {
        return next.run(request).await;
    }
    // Plain HTTP (`/metrics`, a browser, a health check) gets a plain 401; gRPC callers get a
    // gRPC status (carried on an HTTP 200, which plain clients would take for success).
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let text = "this needs `authorization: Bearer <admin token>`\n";
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain")],
            text,
        )
            .into_response();
    }
    if tokens.is_data_plane(authorization) {
        return Status::permission_denied(
            "this call needs the admin token, not the data-plane token",
        )
        .into_http();
    }
    let message = if authorization.is_some() {
        "the token given is not this control plane's admin token (check $SWITCHYARD_ADMIN_TOKEN or the admin-token file), nor its data-plane token ($SWITCHYARD_DATA_PLANE_TOKEN)"
    } else {
        "this call needs `authorization: Bearer <admin token>`"
    };
    Status::unauthenticated(message).into_http()
}

/// Serves the admin listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cp: Arc<ControlPlane>,
    tokens: Tokens,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // Both versions of the reflection service: older grpcurl and grpcio clients ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let routes = tonic::service::Routes::new(ControlServer::new(Api(cp.clone())))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let metrics = axum::routing::get(move || {
        let cp = cp.clone();
        async move {
            use axum::http::header;
            (
                [(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                cp.scrape(),
            )
        }
    });
    let router = routes.into_axum_router().route("/metrics", metrics).layer(
        axum::middleware::from_fn_with_state(Arc::new(tokens), guard),
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    // Pings find a data plane that hangs (its snapshot stream, and its place in `status`,
    // would otherwise last as long as the TCP connection).
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("admin listener: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_records_from_remote_data_planes_read_back_every_refusal() {
        for refused_by in REFUSED_BY {
            let event = UsageEvent {
                request_id: 7,
                service: "etl".into(),
                endpoint: "/v1/chat/completions",
                refused_by,
                status: 429,
                ..UsageEvent::default()
            };
            let back = event_from_record(record_from_event(&event, 0)).unwrap();
            assert_eq!((back.refused_by, &*back.service), (refused_by, "etl"));
        }
    }

    #[test]
    fn remote_records_whose_names_could_break_metrics_are_refused() {
        let record = |service: &str, model: &str| {
            let event = UsageEvent {
                request_id: 7,
                service: service.into(),
                endpoint: "/v1/chat/completions",
                model: model.into(),
                ..UsageEvent::default()
            };
            event_from_record(record_from_event(&event, 0))
        };
        assert!(record("etl", "org/model:v1").is_ok());
        assert!(record(switchyard_shared::usage::UNAUTHENTICATED, "").is_ok());
        assert!(record("x\"} 1\nswitchyard_fake 9\n#", "m").is_err());
        assert!(record("etl", "m\"} 1").is_err());
        // Counts no request reaches would saturate spend or wrap the metrics.
        let absurd = |change: fn(&mut pb::UsageRecord)| {
            let mut r = record_from_event(&UsageEvent::default(), 0);
            r.service = "etl".into();
            r.endpoint = "/v1/chat/completions".into();
            change(&mut r);
            event_from_record(r)
        };
        assert!(absurd(|_| {}).is_ok());
        assert!(absurd(|r| r.prompt_tokens = 1 << 63).is_err());
        let capped = absurd(|r| r.cost_micros = (1 << 63) + 5).unwrap();
        assert_eq!(capped.cost_micros, MAX_BUDGET_MICROS);
        let capped = absurd(|r| r.saved_micros = u64::MAX).unwrap();
        assert_eq!(capped.saved_micros, MAX_BUDGET_MICROS);
    }
}
