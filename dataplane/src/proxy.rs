//! The inference request path, as named phases run in order for every request:
//! `request_filter` (validate body and headers) -> `classify` -> `route` -> `upstream`
//! (attempts with failover) -> `relay` (response head and body to the client) -> `log`
//! (exactly one usage event). Must not: parse HTTP framing (codec) or hold connections
//! (upstream's pool does).

use crate::auth;
use crate::balancer::{self, Slot, Verdict};
use crate::budget::{Reservation, Reserve};
use crate::cache::Entry;
use crate::coalesce::{self, Lead, Origin, Role, Waiter};
use crate::codec::{self, BodyFraming, Head};
use crate::conn::{self, send_error, Client};
use crate::ratelimit::{Refusal, TokenCharge};
use crate::server::Worker;
use crate::snapshot::Snapshot;
use crate::sse::SseFilter;
use crate::upstream::{self, AttemptError, Response};
use std::cell::{Cell, OnceCell};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_shared::cache_key::{self, KeyScope};
use switchyard_shared::category::Category;
use switchyard_shared::error::{ErrorKind, Retry};
use switchyard_shared::finder;
use switchyard_shared::openai::{
    completed_normally, estimate_tokens, parse_usage, Endpoint, RequestView, TokenUsage,
};
use switchyard_shared::routing::{
    Backend, Decision, Price, Priority, RequestFacts, RouteError, RoutingTable, Target,
};
use switchyard_shared::usage::{
    is_valid_service, UsageEvent, INVALID_SERVICE, OVER_MAX_SERVICES, SERVICE_NAME_RULE,
    UNAUTHENTICATED,
};

/// Non-streamed bodies up to this size are kept whole to read `usage` from; of larger ones (a
/// big batch of embeddings) only the last `USAGE_TAIL` bytes, where servers put `usage`.
const USAGE_SCAN_LIMIT: usize = 4 * 1024 * 1024;
const USAGE_TAIL: usize = 64 * 1024;
/// Status recorded when the client went away before the answer was complete (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// Per-request facts gathered by the phases, read by `log`.
struct Ctx<'r> {
    request_id: u64,
    /// The routing snapshot's config version, for `x-switchyard-config-version`.
    config_version: u64,
    service: &'r str,
    endpoint: Endpoint,
    started: Instant,
    category: Category,
    /// `x-switchyard-rule`: the routing rule...
    rule: &'r str,
    /// ...and the classifier rule when the category decided the route.
    classifier_rule: Option<&'static str>,
    attempts: u32,
    streamed: bool,
    prompt_chars: usize,
    /// The connection may stay open as far as the request and its answer go (see `keep_alive`).
    keep_alive: bool,
    /// Set once the data plane drains: then no answer keeps its connection.
    draining: &'r AtomicBool,
    /// The caller speaks HTTP/1.0 (a kept connection must be announced).
    http10: bool,
    /// `x-switchyard-cache` (empty: the request is not cacheable).
    cache: &'static str,
    /// Cost of the original call that a cache hit replays.
    saved_micros: u64,
    /// Estimated prompt tokens and cost of earlier attempts that a backend took and then
    /// failed without an answer (timed out, closed, broke off before any of it was sent):
    /// providers may bill those, so the request's tokens and cost count them.
    abandoned_tokens: u64,
    abandoned_micros: u64,
    /// Budget held for the current attempt; `log` settles it with the actual cost.
    reservation: Cell<Option<Reservation>>,
    /// The budget did not fit the routed tier, so a cheaper one answers.
    downgraded: bool,
    /// The tier (rank) the current attempt's target was taken from: the one the response
    /// headers, the usage event and a stored answer name.
    tier: Option<usize>,
    /// The target of the last attempt: what an error answer after failed attempts names.
    last_target: Option<usize>,
    /// Why the router refused the request itself (usage event `refused_by`).
    refused_by: &'static str,
    /// Tokens admitted under the service's tokens-per-minute limit; `log` settles them.
    token_charge: Cell<Option<TokenCharge>>,
}

impl Ctx<'_> {
    /// Whether an answer written now keeps its connection: not once a drain has begun, even
    /// for a request that started before it.
    fn keep_alive(&self) -> bool {
        self.keep_alive && !self.draining.load(Relaxed)
    }

    /// A backend took this attempt's request and failed without an answer: its prompt is
    /// counted at the attempt's price, and settled now against the attempt's reservation.
    fn abandon(&mut self, price: Price) {
        let tokens = estimate_tokens(self.prompt_chars);
        let micros = price.cost_micros(tokens, 0, 0);
        if let Some(r) = self.reservation.take() {
            r.settle(micros);
        }
        self.abandoned_tokens = self.abandoned_tokens.saturating_add(tokens);
        self.abandoned_micros = self.abandoned_micros.saturating_add(micros);
    }
}

/// What the caller asked of the cache (`x-switchyard-cache`, `cache-control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheMode {
    Use,
    /// Neither look up nor store.
    Bypass,
    /// Store a fresh answer without looking up.
    Refresh,
}

/// How a stored stream is replayed to this caller.
#[derive(Clone, Copy)]
struct Replay {
    caller_wants_usage: bool,
    client_minor_version: u8,
}

/// A cacheable request's key and lifetime, carried to `relay` to store the answer.
struct Store {
    key: Vec<u8>,
    ttl: Duration,
}

/// How many 10 ms waits a request on a remote data plane gives its control plane's grant (a
/// busy control plane or a slow link may take a while to answer; one that cannot be reached
/// ends the wait at once, `BudgetBook::stop_waiting`).
const LEASE_WAIT_STEPS: usize = 200;

/// Waits for a remote data plane's grant: until `done` (looked at first, then every 10 ms)
/// says the request has what it waited for or waiting no longer helps, the drain deadline
/// passes, or `LEASE_WAIT_STEPS` are over.
async fn wait_for_grant(worker: &Worker, mut done: impl FnMut() -> bool) {
    for _ in 0..LEASE_WAIT_STEPS {
        if done() || worker.shared.is_cut() {
            return;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn handle(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    head: &Head,
    body: &[u8],
    endpoint: Endpoint,
    started: Instant,
    keep_alive: bool,
) -> bool {
    let table = &snap.table;
    let identity = auth::identify(&worker.shared.keys, table.auth_required, head);
    let trusted = identity.as_ref().is_ok_and(auth::Service::trusted);
    let headers = caller_headers(head, trusted);
    let variant = Variant::of(head);
    // A request answered from the cache before, byte for byte, takes its shortcut.
    let mut shortcut_key = match (&identity, &headers, &worker.shared.cache) {
        (Ok(service), Ok((_, _, CacheMode::Use)), Some(_)) => shortcut_key(
            service.as_str(),
            endpoint,
            table.version,
            head,
            trusted,
            &variant,
            body,
        ),
        _ => None,
    };
    let shortcut = shortcut_key
        .as_ref()
        .zip(worker.shared.cache.as_ref())
        .and_then(|(key, cache)| cache.get_shortcut(key, Instant::now()))
        // A reused config version (a reset control plane) must not index past the table.
        .filter(|(s, _)| s.target < table.targets.len());
    let service_ok = identity
        .as_ref()
        .map_or(true, |s| is_valid_service(s.as_str()));
    let service_accepted = match &identity {
        Ok(auth::Service::Named(name)) if service_ok => {
            let shared = &worker.shared;
            worker
                .service_names
                .accept(&shared.service_names, table, &shared.keys, name)
        }
        _ => true,
    };
    let mut ctx = Ctx {
        request_id: worker.next_request_id(),
        config_version: table.version,
        service: match &identity {
            Err(_) => UNAUTHENTICATED,
            Ok(_) if !service_ok => INVALID_SERVICE,
            Ok(_) if !service_accepted => OVER_MAX_SERVICES,
            Ok(s) => s.as_str(),
        },
        endpoint,
        started,
        category: Category::Other,
        rule: "",
        classifier_rule: None,
        attempts: 0,
        streamed: false,
        prompt_chars: 0,
        keep_alive,
        draining: worker.shared.draining_flag(),
        http10: head.minor_version == 0,
        cache: "",
        saved_micros: 0,
        abandoned_tokens: 0,
        abandoned_micros: 0,
        reservation: Cell::new(None),
        downgraded: false,
        tier: None,
        last_target: None,
        refused_by: "",
        token_charge: Cell::new(None),
    };
    // request_filter
    if let Err(msg) = identity {
        ctx.refused_by = "auth";
        return reject(
            worker,
            snap,
            client,
            &ctx,
            ErrorKind::InvalidApiKey,
            msg,
            None,
        )
        .await;
    }
    if !service_ok {
        let msg = format!("x-switchyard-service: {SERVICE_NAME_RULE}");
        let kind = ErrorKind::InvalidRequest;
        return reject(worker, snap, client, &ctx, kind, &msg, None).await;
    }
    if !service_accepted {
        ctx.refused_by = "max_services";
        let msg = format!(
            "x-switchyard-service: this router already serves {} distinct service names (usage.max_services); use one of those or raise the limit",
            table.usage.max_services
        );
        let kind = ErrorKind::InvalidRequest;
        return reject(worker, snap, client, &ctx, kind, &msg, None).await;
    }
    if let Some((shortcut, hit)) = &shortcut {
        ctx.streamed = shortcut.streamed;
        ctx.prompt_chars = shortcut.prompt_chars;
        if let Some(keep) = admit(worker, snap, client, &mut ctx, shortcut.admit_tokens, 0).await {
            return keep;
        }
        ctx.category = shortcut.category;
        ctx.rule = &shortcut.rule;
        ctx.classifier_rule = shortcut.classifier_rule;
        let replay = Replay {
            caller_wants_usage: shortcut.caller_wants_usage,
            client_minor_version: head.minor_version,
        };
        return serve_hit(worker, snap, client, &mut ctx, shortcut.target, hit, replay).await;
    }
    let view = match RequestView::parse(endpoint, body) {
        Ok(v) => v,
        Err(e) => {
            let param = e.param.as_deref();
            return reject(worker, snap, client, &ctx, e.kind, &e.message, param).await;
        }
    };
    ctx.streamed = view.stream;
    ctx.prompt_chars = view.total_chars;
    let admit_tokens = estimate_tokens(view.total_chars)
        .saturating_add(view.max_tokens.unwrap_or(0).saturating_mul(view.choices));
    // Without max_tokens, the output cap the budgets assume too (embeddings have no output).
    let assumed = match (view.max_tokens, endpoint) {
        (_, Endpoint::Embeddings) | (Some(_), _) => 0,
        (None, _) => snap
            .table
            .budgets
            .default_max_output_tokens
            .saturating_mul(view.choices),
    };
    if let Some(keep) = admit(worker, snap, client, &mut ctx, admit_tokens, assumed).await {
        return keep;
    }
    let (priority, category_override, cache_mode) = match headers {
        Ok(h) => h,
        Err(msg) => {
            return reject(
                worker,
                snap,
                client,
                &ctx,
                ErrorKind::InvalidRequest,
                &msg,
                None,
            )
            .await
        }
    };
    // classify
    let (alternative, long_context, classifier_rule) = match category_override {
        Some(c) => {
            ctx.category = c;
            (None, false, "header")
        }
        None if endpoint == Endpoint::Embeddings => (None, false, "embeddings"),
        None => {
            let c = table.classifier.classify(&view.prompt());
            ctx.category = c.category;
            (c.alternative, c.long_context, c.rule)
        }
    };
    // route
    let model = view.model.as_deref().unwrap_or("auto");
    let facts = RequestFacts {
        service: ctx.service,
        priority,
        model,
        path: endpoint.path(),
        // Like the category: a key's caller cannot route around the operator's rules.
        pinned_tier: head.header_str("x-switchyard-tier").filter(|_| trusted),
        category: ctx.category,
        alternative,
        long_context,
        classified: endpoint != Endpoint::Embeddings,
    };
    let decision = match table.decide(&facts) {
        Ok(d) => d,
        Err(e) => {
            let (kind, msg, param) = match e {
                RouteError::UnknownTier(t) => (
                    ErrorKind::InvalidRequest,
                    format!("x-switchyard-tier `{t}` is not a configured tier"),
                    None,
                ),
                RouteError::UnknownModel(m) => (
                    ErrorKind::ModelNotFound,
                    format!("The model `{m}` does not exist or is not served by this router"),
                    Some("model"),
                ),
                RouteError::Unclassifiable(m) => (
                    ErrorKind::ModelNotFound,
                    format!(
                        "The model `{m}` {how}, and {path} has no prompt to classify: name a served model, or route {path} with a rule",
                        how = if table.aliases.contains_key(&*m) {
                            "is chosen by classifying a prompt"
                        } else {
                            "is not served here (unknown names are routed by classifying a prompt)"
                        },
                        path = ctx.endpoint.path()
                    ),
                    Some("model"),
                ),
            };
            return reject(worker, snap, client, &ctx, kind, &msg, param).await;
        }
    };
    ctx.rule = decision.rule;
    ctx.classifier_rule = decision
        .rule
        .starts_with("category")
        .then_some(classifier_rule);
    // A remote data plane may not hold this budget's first lease yet: it is on its way (the
    // control plane is asked within 50 ms), so wait for it rather than refuse.
    let (budgets, book) = (&worker.budgets, &*worker.shared.budgets);
    wait_for_grant(worker, || {
        !budgets.awaiting_lease(book, ctx.service, ctx.category)
    })
    .await;
    // upstream
    let inject_usage = view.needs_injected_usage(endpoint);
    let mut tried: Vec<usize> = Vec::with_capacity(4);
    // Held while this request fetches a cacheable answer others may be waiting for.
    let mut lead: Option<Lead<'_>> = None;
    // A request that waited once and found no answer goes upstream itself, in parallel with
    // the other waiters, instead of queueing behind each of them in turn.
    let mut waited = false;
    let mut last_error: Option<AttemptError> = None;
    // A reservation was refused after the last attempt (or before any).
    let mut refused_since_attempt = false;
    // A remote data plane asked its control plane for more of the budget for this request.
    let mut asked_for_more = false;
    let mut plan_groups = table.groups(decision.plan);
    // Once a reservation is refused: the ranks of the cheaper tiers, most capable first.
    let mut cheaper: Option<std::iter::Rev<std::ops::Range<usize>>> = None;
    // Groups taken so far: the plan's first is 1.
    let mut groups_taken = 0;
    'groups: loop {
        let next = match &mut cheaper {
            Some(ranks) => ranks
                .next()
                .map(|rank| (Some(rank), table.tiers[rank].targets.as_slice())),
            None => plan_groups.next(),
        };
        let Some((group_tier, group)) = next else {
            break;
        };
        groups_taken += 1;
        let replay = Replay {
            caller_wants_usage: view.caller_wants_usage,
            client_minor_version: head.minor_version,
        };
        let embeddings = ctx.endpoint == Endpoint::Embeddings;
        // A zero TTL is how a rule or a category says "not cached": neither stored nor served.
        let ttl = decision
            .cache_ttl
            .unwrap_or(table.cache.category_ttl[ctx.category.index()]);
        while ctx.attempts < table.max_attempts {
            let Some((target, mut slot)) = balancer::choose(table, &snap.states, group, &tried)
            else {
                // No target of the group can take the request now (ejected or full): an
                // answer one of them gave before still serves, as it needs no backend.
                let stored = group.iter().find_map(|&target| {
                    let model = &table.targets[target].model;
                    let scope =
                        cache_scope(worker, table, &ctx, &view, cache_mode, model, &variant)
                            .filter(|_| cache_mode == CacheMode::Use && !ttl.is_zero())?;
                    let key = cache_key::key(&scope, body, embeddings)?;
                    let hit = worker.shared.cache.as_ref()?.get(&key, Instant::now())?;
                    Some((target, hit))
                });
                if let Some((target, hit)) = stored {
                    ctx.downgraded = cheaper.is_some();
                    return serve_hit(worker, snap, client, &mut ctx, target, &hit, replay).await;
                }
                continue 'groups;
            };
            let t = &table.targets[target];
            // The key names the resolved target model, so it is known only once a target is.
            let scope = cache_scope(worker, table, &ctx, &view, cache_mode, &t.model, &variant);
            let store = scope
                .filter(|_| !ttl.is_zero())
                .and_then(|s| cache_key::key(&s, body, embeddings))
                .map(|key| Store { key, ttl });
            // A lead is for one key: failing over to a target with another model frees the
            // first key's waiters to go on their own, and this request may lead the new key.
            if lead
                .as_ref()
                .is_some_and(|l| store.as_ref().map(|s| s.key.as_slice()) != Some(l.key()))
            {
                lead = None;
            }
            if let (Some(cache), Some(store), CacheMode::Use) =
                (&worker.shared.cache, &store, cache_mode)
            {
                if let Some(hit) = cache.get(&store.key, Instant::now()) {
                    // Only the plan's own first choice is remembered, not a failover's, a
                    // fallback group's (the first was full or ejected) or a budget downgrade's.
                    let first_choice = groups_taken == 1 && tried.is_empty() && cheaper.is_none();
                    if let Some(key) = shortcut_key.take().filter(|_| first_choice) {
                        cache.put_shortcut(
                            key,
                            &store.key,
                            target,
                            ctx.category,
                            ctx.rule,
                            ctx.classifier_rule,
                            view.stream,
                            view.caller_wants_usage,
                            view.total_chars,
                            admit_tokens,
                        );
                    }
                    drop(slot);
                    // From a cheaper tier than routed when the budget moved the request.
                    ctx.downgraded = cheaper.is_some();
                    return serve_hit(worker, snap, client, &mut ctx, target, &hit, replay).await;
                }
            }
            // Identical misses, on any worker, wait for the one fetching the answer. A refresh
            // neither waits (it would be served the entry it means to replace) nor leads.
            if let (Some(cache), Some(store), None, false, CacheMode::Use) =
                (&worker.shared.cache, &store, &lead, waited, cache_mode)
            {
                match worker.shared.flights.join(&store.key) {
                    Role::Lead(l) => lead = Some(l),
                    Role::Wait(wait) => {
                        drop(slot);
                        waited = true;
                        // Released when the leader is done, as soon as its answer is stored,
                        // or, for a stream, as soon as it starts (then followed live).
                        let stored = || cache.get(&store.key, Instant::now()).is_some();
                        let ready = || stored() || view.stream && wait.started();
                        if client
                            .unless_gone(Instant::now() + CLIENT_WATCH_DELAY, wait.wait(ready))
                            .await
                            .is_none()
                        {
                            if worker.shared.is_cut() {
                                let kind = ErrorKind::ShuttingDown;
                                return reject(
                                    worker,
                                    snap,
                                    client,
                                    &ctx,
                                    kind,
                                    SHUTDOWN_CUT,
                                    None,
                                )
                                .await;
                            }
                            log(
                                worker,
                                snap,
                                &ctx,
                                None,
                                None,
                                CLIENT_CLOSED,
                                None,
                                0,
                                None,
                                true,
                            );
                            return false;
                        }
                        if let Some(hit) = cache.get(&store.key, Instant::now()) {
                            return serve_hit(worker, snap, client, &mut ctx, target, &hit, replay)
                                .await;
                        }
                        if view.stream && wait.started() {
                            let (c, r) = (&mut ctx, replay);
                            return follow_stream(worker, snap, client, c, target, &wait, r).await;
                        }
                        // The fetch failed or was not storable: go upstream on our own, but not
                        // to a backend that failed the leader while the plan has another.
                        let failed = wait.failed_backends();
                        let failed_target = |o: usize| {
                            failed.contains(&table.backends[table.targets[o].backend].name)
                        };
                        let others = table
                            .groups(decision.plan)
                            .any(|(_, ids)| ids.iter().any(|&o| !failed_target(o)));
                        if others {
                            tried.extend((0..table.targets.len()).filter(|&o| failed_target(o)));
                        }
                        continue;
                    }
                }
            }
            let worst = worst_case_micros(t.price, endpoint, body.len(), &view, table);
            // An earlier attempt's reservation is released before this one is made.
            drop(ctx.reservation.take());
            let mut reserved = budgets.reserve(book, ctx.service, ctx.category, worst);
            // On a remote data plane, what it holds of the budget may be short of this one
            // request: the control plane is asked for the rest (once per request), and the
            // reservation tried again as the answer may come (briefly).
            if let (Reserve::Refused, false) = (&reserved, asked_for_more) {
                asked_for_more = true;
                if budgets.ask_for_more(book, ctx.service, ctx.category, worst) {
                    // The backend's slot is not held meanwhile (it counts against its
                    // concurrency), and is taken again for the attempt.
                    drop(slot);
                    wait_for_grant(worker, || {
                        reserved = budgets.reserve(book, ctx.service, ctx.category, worst);
                        !matches!(reserved, Reserve::Refused)
                            || !budgets.more_may_come(book, ctx.service, ctx.category)
                    })
                    .await;
                    let cap = table.backends[t.backend].max_concurrency;
                    let Some(again) = snap.states.admit(t.backend, cap) else {
                        // It filled up meanwhile: another target, or later.
                        continue;
                    };
                    slot = again;
                }
            }
            match reserved {
                Reserve::Unlimited => {}
                Reserve::Granted(r) => ctx.reservation.set(Some(r)),
                Reserve::Refused => {
                    drop(slot);
                    refused_since_attempt = true;
                    if cheaper.is_none() {
                        // The tiers cheaper than the one walked (for an explicit target list:
                        // the target's cheapest). A target in no tier (an explicitly requested
                        // model) and embeddings (another model kind) have no cheaper stand-in:
                        // they are refused instead.
                        let rank = match endpoint {
                            Endpoint::Embeddings => 0,
                            _ => group_tier
                                .or_else(|| table.first_tier_of(target))
                                .unwrap_or(0),
                        };
                        cheaper = Some((0..rank).rev());
                    }
                    // A cheaper target of this group may still fit before a cheaper tier is
                    // tried; this one is not tried again (in a cheaper tier it costs the same).
                    tried.push(target);
                    continue;
                }
            }
            ctx.downgraded = cheaper.is_some();
            // The tier of the group walked; an explicit target list names its target's first.
            ctx.tier = group_tier.or_else(|| table.first_tier_of(target));
            refused_since_attempt = false;
            if cache_mode == CacheMode::Bypass && worker.shared.cache.is_some() {
                ctx.cache = "bypass";
            }
            tried.push(target);
            ctx.last_target = Some(target);
            ctx.attempts += 1;
            let backend = &table.backends[t.backend];
            // A usage chunk is hidden from a caller who did not ask for it whether or not
            // this backend is asked for one (some send it anyway).
            let ask_usage = inject_usage && backend.stream_usage;
            let request = upstream_request(head, backend, ctx.request_id, |out| {
                view.rewrite_into(out, body, &t.model, ask_usage)
            });
            let written = std::cell::Cell::new(None);
            // Pinned here so that watching the client moves a pointer, not the whole exchange.
            let mut exchange = std::pin::pin!(upstream::exchange(
                &worker.pool,
                table.version,
                t.backend,
                backend,
                snap.tls[t.backend].as_ref(),
                &worker.shared.resolved,
                request,
                false,
                &written,
            ));
            let mut result = client
                .unless_gone(Instant::now() + CLIENT_WATCH_DELAY, exchange.as_mut())
                .await;
            if result.is_none() && lead.as_ref().is_some_and(Lead::has_followers) {
                // The caller left, others wait for this answer: it is fetched (and stored) for
                // them, as a followed stream is read to its end, instead of each of them
                // calling the backend again.
                result = monoio::select! {
                    biased;
                    r = exchange.as_mut() => Some(r),
                    _ = worker.shared.cut_passed() => None,
                };
            }
            match result {
                None if worker.shared.is_cut() => {
                    // The drain deadline, not the caller, ended the wait: the caller is told.
                    let mut headers = Vec::with_capacity(256);
                    explain(
                        &mut headers,
                        &ctx,
                        tier_name(table, &ctx).map_or("", |t| &**t),
                        &backend.name,
                        &t.model,
                    );
                    let kind = ErrorKind::ShuttingDown;
                    send_error(
                        client,
                        kind,
                        SHUTDOWN_CUT,
                        None,
                        false,
                        Some(&headers),
                        false,
                    )
                    .await;
                    // Priced from its prompt once the backend has it.
                    let usage = written.get().map_or(Some(TokenUsage::default()), |_| None);
                    let status = kind.status();
                    let answered = Some(Instant::now());
                    let tier = tier_name(table, &ctx);
                    log(
                        worker,
                        snap,
                        &ctx,
                        Some(target),
                        tier,
                        status,
                        usage,
                        0,
                        answered,
                        true,
                    );
                    return false;
                }
                None => {
                    // The caller gave up waiting; a backend that answered nobody meanwhile is
                    // hung, whatever the first-byte timeout (often longer than callers wait).
                    if let (Some(after), Some(sent)) = (table.health.stall_after, written.get()) {
                        if snap.states.count_stall(t.backend, sent, after) {
                            snap.states.record(
                                t.backend,
                                Verdict::Failure,
                                &table.health,
                                slot.is_probe(),
                            );
                        }
                    }
                    // Priced from its prompt once the backend has it; before, it cost nothing.
                    let usage = written.get().map_or(Some(TokenUsage::default()), |_| None);
                    log(
                        worker,
                        snap,
                        &ctx,
                        Some(target),
                        tier_name(table, &ctx),
                        CLIENT_CLOSED,
                        usage,
                        0,
                        None,
                        true,
                    );
                    return false;
                }
                Some(Ok(resp)) => {
                    snap.states.answered(t.backend, Instant::now());
                    if resp.head.status == 429 || resp.head.status >= 500 {
                        snap.states.record(
                            t.backend,
                            Verdict::Failure,
                            &table.health,
                            slot.is_probe(),
                        );
                        if let Some(l) = &lead {
                            l.failed(&backend.name);
                        }
                        // Targets left that can take the request: in this group, then in the
                        // groups still to walk (the plan's, or the cheaper tiers' once the
                        // budget downgraded).
                        let untried = |ids: &[usize]| {
                            ids.iter().any(|o| {
                                let b = table.targets[*o].backend;
                                // This request still holds a slot on the failed target's backend.
                                let cap = table.backends[b].max_concurrency;
                                let cap = cap.saturating_add(u32::from(b == t.backend));
                                !tried.contains(o) && snap.states.has_room(b, cap)
                            })
                        };
                        let untried_left = untried(group)
                            || match &cheaper {
                                Some(ranks) => {
                                    ranks.clone().any(|r| untried(&table.tiers[r].targets))
                                }
                                None => plan_groups.clone().any(|(_, ids)| untried(ids)),
                            };
                        let message =
                            format!("backend `{}` answered {}", backend.name, resp.head.status);
                        log_failure(worker, table, t, ctx.request_id, &message);
                        if ctx.attempts < table.max_attempts && untried_left {
                            last_error = Some(AttemptError {
                                kind: ErrorKind::UpstreamStatus,
                                message,
                            });
                            continue;
                        }
                        // Nothing left to try: the caller sees the backend's own error.
                    }
                    if resp.head.status != 200 {
                        // Not an answer to store: whoever waits for it goes on now. (One that
                        // is retried above keeps them: the next target may answer the key.)
                        lead = None;
                    }
                    let relayed = relay(
                        worker,
                        snap,
                        client,
                        &mut ctx,
                        resp,
                        target,
                        slot,
                        inject_usage,
                        head.minor_version,
                        store,
                        lead.take(),
                    )
                    .await;
                    match relayed {
                        Relayed::Done(keep_alive) => return keep_alive,
                        Relayed::Unsent(e, kept_lead) => {
                            ctx.abandon(t.price);
                            if let Some(l) = &kept_lead {
                                l.failed(&backend.name);
                            }
                            lead = kept_lead;
                            last_error = Some(e);
                        }
                    }
                }
                Some(Err(e)) => {
                    if written.get().is_some() {
                        ctx.abandon(t.price);
                    }
                    log_failure(worker, table, t, ctx.request_id, &e.message);
                    let verdict = if e.kind.retry() == Retry::Yes {
                        if let Some(l) = &lead {
                            l.failed(&backend.name);
                        }
                        Verdict::Failure
                    } else {
                        Verdict::Neutral
                    };
                    snap.states
                        .record(t.backend, verdict, &table.health, slot.is_probe());
                    if matches!(
                        e.kind,
                        ErrorKind::UpstreamConnect | ErrorKind::UpstreamTimeout
                    ) {
                        // The backend itself is unreachable or too slow to answer (down,
                        // overloaded, loading a model): its other models are no better.
                        let same_backend = (0..table.targets.len())
                            .filter(|&o| table.targets[o].backend == t.backend);
                        tried.extend(same_backend.filter(|&o| o != target));
                    }
                    last_error = Some(e);
                }
            }
        }
        break;
    }
    // The budget stopped the last step: that is the reason to give, even after a failed
    // attempt (which the message still names).
    if refused_since_attempt {
        ctx.refused_by = "budget";
        let mut msg = format!(
            "the daily budget of service `{}` has no room for this request on any tier",
            ctx.service
        );
        if worker.shared.budgets.is_granted() {
            // Not necessarily the whole budget: the control plane may be out of reach.
            msg.push_str(" in what the control plane has granted this data plane");
        }
        if let Some(e) = &last_error {
            msg.push_str(&format!(
                " left to try (an earlier attempt failed: {})",
                e.message
            ));
        }
        return reject(
            worker,
            snap,
            client,
            &ctx,
            ErrorKind::BudgetExceeded,
            &msg,
            None,
        )
        .await;
    }
    match last_error {
        Some(e) => reject(worker, snap, client, &ctx, e.kind, &e.message, None).await,
        None => {
            let wait = snap
                .states
                .soonest_return(tried_backends(table, decision))
                .as_secs_f64()
                .ceil()
                .max(1.0) as u64;
            let extra = format!("retry-after: {wait}\r\n");
            let (kind, msg) = if tried_backends(table, decision).any(|b| snap.states.is_out(b)) {
                let msg = "no healthy backend can take this request now; retry later";
                (ErrorKind::NoHealthyTarget, msg)
            } else {
                let msg = "every backend for this request is at its max_concurrency (busy, not failing); retry later";
                (ErrorKind::TargetsFull, msg)
            };
            send_reject(
                worker,
                snap,
                client,
                &ctx,
                kind,
                msg,
                None,
                Some(extra.as_bytes()),
            )
            .await
        }
    }
}

/// Admits the request under its service's rate limits; when refused, answers 429 with
/// Retry-After and returns whether the connection stays open.
async fn admit(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
    tokens: u64,
    assumed: u64,
) -> Option<bool> {
    let mut admitted = worker
        .limits
        .admit(&snap.limits, ctx.service, tokens, assumed);
    // On a remote data plane, a refusal may only mean the control plane's grant has not come
    // yet (a first request, a burst): the control plane is asked for what is missing, and the
    // admission tried again as its answer may come (briefly).
    let (limits, service) = (&worker.limits, ctx.service);
    // Whether the requests and the tokens limit asked for more, each once.
    let mut asked = [false; 2];
    let ask = |refusal: &Refusal, asked: &mut [bool; 2]| {
        let units = if refusal.tokens { tokens } else { 1 };
        let first = !std::mem::replace(&mut asked[usize::from(refusal.tokens)], true);
        first
            && refusal.too_large.is_none()
            && limits.ask_for_more(&snap.limits, service, refusal.tokens, units)
    };
    if let Err(refusal) = &admitted {
        if ask(refusal, &mut asked) {
            wait_for_grant(worker, || {
                admitted = limits.admit(&snap.limits, service, tokens, assumed);
                let Err(refusal) = &admitted else {
                    return true;
                };
                // Refused by the other limit now: that one asks too.
                ask(refusal, &mut asked);
                let waiting = |t: bool| {
                    asked[usize::from(t)] && limits.more_may_come(&snap.limits, service, t)
                };
                !(waiting(false) || waiting(true))
            })
            .await;
        }
    }
    let refusal = match admitted {
        Ok(charge) => {
            ctx.token_charge.set(charge);
            return None;
        }
        Err(refusal) => refusal,
    };
    let (kind, what);
    (kind, what, ctx.refused_by) = if refusal.tokens {
        (ErrorKind::TokenRateLimited, "tokens", "rate_limit_tokens")
    } else {
        (
            ErrorKind::RequestRateLimited,
            "requests",
            "rate_limit_requests",
        )
    };
    let wait = refusal.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let (msg, extra) = match refusal.too_large {
        // No Retry-After: waiting cannot make it fit.
        Some(limit) => (
            format!(
                "request too large for service `{}`: about {tokens} tokens (prompt estimate plus max_tokens for each choice) against a limit of {limit} tokens per minute; it can never be admitted: lower max_tokens or send less",
                ctx.service
            ),
            String::new(),
        ),
        None => (
            format!(
                "rate limit of service `{}` reached ({what} per minute); retry in {wait} s",
                ctx.service
            ),
            format!("retry-after: {wait}\r\n"),
        ),
    };
    Some(
        send_reject(
            worker,
            snap,
            client,
            ctx,
            kind,
            &msg,
            None,
            Some(extra.as_bytes()),
        )
        .await,
    )
}

/// The key of a request's cache shortcut: its exact bytes with everything else that routes
/// it (service, endpoint, config version, the steering headers). `None` when the request
/// cannot be cacheable: a chat or completion body that does not name `temperature` or `top_k`
/// is never deterministic, and skips the copy.
fn shortcut_key(
    service: &str,
    endpoint: Endpoint,
    version: u64,
    head: &Head,
    trusted: bool,
    variant: &Variant<'_>,
    body: &[u8],
) -> Option<Vec<u8>> {
    if endpoint != Endpoint::Embeddings
        && finder!(b"\"temperature\"").find(body).is_none()
        && finder!(b"\"top_k\"").find(body).is_none()
    {
        return None;
    }
    let variant = variant.bytes();
    let steering = |name| head.header(name).unwrap_or_default();
    // Present but empty is an error on the full path (an unknown tier); absent is not.
    let steering_names = [
        "x-switchyard-tier",
        "x-switchyard-priority",
        "x-switchyard-category",
    ];
    if steering_names
        .iter()
        .any(|h| head.header_str(h) == Some(""))
    {
        return None;
    }
    let mut version_digits = itoa::Buffer::new();
    let parts = [
        service.as_bytes(),
        endpoint.path().as_bytes(),
        version_digits.format(version).as_bytes(),
        // Untrusted callers' tier and category headers are ignored, so they cannot tell
        // requests apart.
        if trusted {
            steering("x-switchyard-tier")
        } else {
            b""
        },
        steering("x-switchyard-priority"),
        if trusted {
            steering("x-switchyard-category")
        } else {
            b""
        },
        variant,
    ];
    // A NUL inside a header would blur the separators: such a request takes no shortcut.
    if parts.iter().any(|p| p.contains(&0)) {
        return None;
    }
    Some(cache_key::request_key(&parts, body))
}

/// The caller's routing headers: `x-switchyard-priority`, `x-switchyard-category` and the
/// cache controls. A value that names nothing is the caller's mistake, reported rather than
/// ignored.
fn caller_headers(
    head: &Head,
    trusted: bool,
) -> Result<(Priority, Option<Category>, CacheMode), String> {
    let priority = match head.header_str("x-switchyard-priority") {
        None => Priority::Normal,
        Some(p) => Priority::parse(p).ok_or_else(|| {
            format!(
                "x-switchyard-priority `{p}` is not one of interactive, normal, background, bulk"
            )
        })?,
    };
    let category = match head.header_str("x-switchyard-category") {
        // A key's caller cannot pick the category its budget is charged to.
        _ if !trusted => None,
        None => None,
        Some(name) => Some(
            Category::parse(name)
                .ok_or_else(|| format!("x-switchyard-category `{name}` is not a known category"))?,
        ),
    };
    let no_cache = head.header_str("cache-control").is_some_and(|v| {
        v.split(',').any(|d| {
            d.trim().eq_ignore_ascii_case("no-cache") || d.trim().eq_ignore_ascii_case("no-store")
        })
    });
    let cache = match head.header_str("x-switchyard-cache") {
        _ if no_cache => CacheMode::Bypass,
        None => CacheMode::Use,
        Some(v) if v.eq_ignore_ascii_case("bypass") => CacheMode::Bypass,
        Some(v) if v.eq_ignore_ascii_case("refresh") => CacheMode::Refresh,
        Some(v) => {
            return Err(format!(
                "x-switchyard-cache `{v}` is not one of bypass, refresh"
            ))
        }
    };
    Ok((priority, category, cache))
}

/// The scope of this request's cache keys for `target_model`, when it may be looked up or
/// stored: cache on, not bypassed, and deterministic.
fn cache_scope<'a>(
    worker: &Worker,
    table: &RoutingTable,
    ctx: &Ctx<'a>,
    view: &RequestView<'_>,
    mode: CacheMode,
    target_model: &'a str,
    variant: &'a Variant<'_>,
) -> Option<KeyScope<'a>> {
    let embeddings = ctx.endpoint == Endpoint::Embeddings;
    if worker.shared.cache.is_none()
        || mode == CacheMode::Bypass
        || !(view.deterministic || embeddings)
    {
        return None;
    }
    let service = if table.cache.share_across_services {
        ""
    } else {
        ctx.service
    };
    Some(KeyScope {
        service,
        endpoint: ctx.endpoint.path(),
        target_model,
        variant: variant.bytes(),
    })
}

/// Answers from the cache: the stored body, `age`, and a usage event that costs nothing
/// and records what the original call cost.
async fn serve_hit(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
    target: usize,
    hit: &Entry,
    replay: Replay,
) -> bool {
    ctx.cache = "hit";
    ctx.saved_micros = hit.cost_micros;
    // A stored stream is replayed at full speed, filtered like a live one: the usage chunk the
    // router asked for is hidden unless this caller asked for it.
    let streamed = &*hit.content_type == b"text/event-stream";
    let mut body = Vec::new();
    if streamed {
        let mut filter = SseFilter::new(!replay.caller_wants_usage);
        filter.feed(&hit.body, &mut body);
        filter.finish(&mut body);
    }
    let body: &[u8] = if streamed { &body } else { &hit.body };
    let chunked = streamed && replay.client_minor_version > 0;
    if streamed && !chunked {
        ctx.keep_alive = false;
    }
    let framing = match (streamed, chunked) {
        (false, _) => ClientFraming::Length,
        (true, true) => ClientFraming::Chunked,
        (true, false) => ClientFraming::Close,
    };
    let mut out = Vec::with_capacity(512 + body.len());
    let age = hit.stored_at.elapsed().as_secs();
    let origin = (&*hit.tier, &*hit.backend, &*hit.model);
    stored_answer_head(
        &mut out,
        ctx,
        &hit.content_type,
        framing,
        body.len(),
        age,
        origin,
    );
    if chunked {
        codec::encode_chunk(&mut out, body);
        out.extend_from_slice(codec::LAST_CHUNK);
    } else {
        out.extend_from_slice(body);
    }
    let sent = client.write(out).await.0.is_ok();
    let status = if sent { 200 } else { CLIENT_CLOSED };
    // The event names who made the answer (another backend may serve the same model).
    let origin_target = snap.table.target_named(&hit.backend, &hit.model);
    log(
        worker,
        snap,
        ctx,
        Some(origin_target.unwrap_or(target)),
        Some(&hit.tier),
        status,
        Some(TokenUsage::default()),
        0,
        Some(Instant::now()),
        !sent,
    );
    sent && ctx.keep_alive()
}

fn tried_backends<'t>(
    table: &'t RoutingTable,
    decision: Decision<'t>,
) -> impl Iterator<Item = usize> + 't {
    table
        .groups(decision.plan)
        .flat_map(|(_, ids)| ids)
        .map(|&t| table.targets[t].backend)
}

/// Delay before watching a waiting client for a disconnect: the watch costs a `poll` (epoll)
/// or a poll op (io_uring) per request, which answers faster than this never need.
const CLIENT_WATCH_DELAY: Duration = Duration::from_millis(5);

/// The same while a body is relayed, where a caller that left is also found by the next write
/// failing while the backend sends: the watch is for a backend gone quiet, so the gaps between
/// a stream's tokens (tens of milliseconds) do not each cost a poll and its cancellation.
const BODY_WATCH_DELAY: Duration = Duration::from_millis(250);

/// Whether a caller's header goes on to the backend. Dropped: hop-by-hop, framing we
/// recompute, the caller's credentials (they are for the router, not the backend), compression
/// (we read usage from the body), our own headers.
fn is_forwarded(name: &[u8]) -> bool {
    header_use(name) != HeaderUse::Dropped
}

/// What becomes of a caller's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderUse {
    /// Not forwarded (see `is_forwarded`).
    Dropped,
    /// Forwarded, and cannot change a backend's answer, so left out of cache keys: content
    /// negotiation the router answers itself, tracing, proxies' client addresses, and the
    /// OpenAI SDKs' telemetry (`x-stainless-*`, whose retry count changes on every retry).
    Neutral,
    /// Forwarded, and part of cache keys.
    Relevant,
}

fn header_use(name: &[u8]) -> HeaderUse {
    if is_switchyard_header(name) {
        return HeaderUse::Dropped;
    }
    match codec::lower_name(name, &mut [0; codec::NAME_BUF]) {
        Some(lower) if codec::is_hop_by_hop_lowered(lower) => HeaderUse::Dropped,
        Some(
            b"host" | b"content-length" | b"authorization" | b"expect" | b"accept-encoding"
            | b"x-api-key" | b"api-key" | b"x-goog-api-key",
        ) => HeaderUse::Dropped,
        Some(
            b"accept" | b"content-type" | b"user-agent" | b"traceparent" | b"tracestate"
            | b"baggage" | b"x-request-id" | b"x-correlation-id" | b"x-forwarded-for"
            | b"x-forwarded-proto" | b"x-real-ip" | b"forwarded",
        ) => HeaderUse::Neutral,
        _ if name.len() >= 11 && name[..11].eq_ignore_ascii_case(b"x-stainless") => {
            HeaderUse::Neutral
        }
        _ => HeaderUse::Relevant,
    }
}

/// What reaches the backend besides the body and can change its answer, for cache keys: the
/// query string, then the forwarded headers that are not output-neutral, sorted, names in
/// lower case. Built on first use: most requests are never looked up in the cache.
struct Variant<'h> {
    head: &'h Head,
    built: OnceCell<Vec<u8>>,
}

impl<'h> Variant<'h> {
    fn of(head: &'h Head) -> Self {
        Variant {
            head,
            built: OnceCell::new(),
        }
    }

    fn bytes(&self) -> &[u8] {
        self.built.get_or_init(|| request_variant(self.head))
    }
}

/// The bytes of a `Variant`; empty (no allocation) for the usual request.
fn request_variant(head: &Head) -> Vec<u8> {
    // What the backend is sent (headers named in Connection are not).
    let relevant =
        |name: &[u8]| header_use(name) == HeaderUse::Relevant && !head.is_connection_option(name);
    let query = head.target().split_once('?').map_or("", |(_, q)| q);
    if query.is_empty() && !head.headers().any(|(name, _)| relevant(name)) {
        return Vec::new();
    }
    let mut lines: Vec<(Vec<u8>, &[u8])> = head
        .headers()
        .filter(|(name, _)| relevant(name))
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect();
    // By name only, and stably: repeated headers keep their order, which the backend sees.
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = query.as_bytes().to_vec();
    for (name, value) in lines {
        out.push(b'\n');
        out.extend_from_slice(&name);
        out.push(b':');
        out.extend_from_slice(value);
    }
    out
}

/// The upstream request: our request line and Host, the caller's end-to-end headers, the
/// backend's credentials, and the rewritten body.
/// `write_body` appends the body; its length is patched into the head afterwards.
fn upstream_request(
    head: &Head,
    backend: &Backend,
    request_id: u64,
    write_body: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head_len_hint(head) + 1024);
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(backend.base_path.as_bytes());
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(backend.authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers() {
        if is_forwarded(name) && !head.is_connection_option(name) {
            header(&mut out, name, value);
        }
    }
    if let Some(key) = &backend.api_key {
        out.extend_from_slice(b"authorization: Bearer ");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    header(&mut out, b"x-switchyard-request-id", &hex_id(request_id));
    out.extend_from_slice(b"content-length: ");
    // Room for any body length, filled in once the body is written.
    const DIGITS: usize = 20;
    let len_at = out.len();
    out.extend_from_slice(&[b' '; DIGITS]);
    out.extend_from_slice(b"\r\n\r\n");
    let body_at = out.len();
    write_body(&mut out);
    let mut digits = itoa::Buffer::new();
    let len = digits.format(out.len() - body_at);
    // Right-aligned digits after the colon: leading spaces are optional whitespace (RFC 9110 §5.6.3).
    out[len_at + DIGITS - len.len()..len_at + DIGITS].copy_from_slice(len.as_bytes());
    out
}

/// Capacity for the upstream request: the client's head and body sizes are a close bound.
fn head_len_hint(head: &Head) -> usize {
    match head.framing {
        codec::BodyFraming::Length(n) => n as usize + 512,
        _ => 4096,
    }
}

/// The head of an answer served without an upstream call (a cache hit, a followed stream):
/// `origin` is the tier, backend and model that gave it; `len` the body's, for `Length`.
fn stored_answer_head(
    out: &mut Vec<u8>,
    ctx: &Ctx<'_>,
    content_type: &[u8],
    framing: ClientFraming,
    len: usize,
    age_secs: u64,
    (tier, backend, model): (&str, &str, &str),
) {
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    header(out, b"content-type", content_type);
    match framing {
        ClientFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ClientFraming::Length => header(
            out,
            b"content-length",
            itoa::Buffer::new().format(len).as_bytes(),
        ),
        ClientFraming::Empty | ClientFraming::Close => {}
    }
    header(out, b"age", itoa::Buffer::new().format(age_secs).as_bytes());
    explain(out, ctx, tier, backend, model);
    conn::connection_header(out, ctx.keep_alive(), ctx.http10);
    out.extend_from_slice(b"\r\n");
}

/// Answers a waiting stream from the identical one its leader is relaying, as the leader
/// receives it (waiting for the stored answer would hold back its first byte until the
/// leader's last). Filtered per caller like a replay; a cut-off leader ends it with an error
/// event. Costs nothing upstream, saves what the answer cost.
#[allow(clippy::too_many_arguments)]
async fn follow_stream(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
    target: usize,
    leader: &Waiter,
    replay: Replay,
) -> bool {
    ctx.cache = "hit";
    let framing = if replay.client_minor_version > 0 {
        ClientFraming::Chunked
    } else {
        ctx.keep_alive = false;
        ClientFraming::Close
    };
    let mut filter = SseFilter::new(!replay.caller_wants_usage);
    let (mut raw, mut events, mut wire) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_byte = None;
    let mut tier = None;
    // Who made the answer: the event names it, and the saving is priced at its price.
    let mut answered_by = target;
    let mut read = 0;
    let complete = loop {
        raw.clear();
        let p = leader.read(read, &mut raw);
        read += raw.len();
        if first_byte.is_none() {
            let origin = p.origin.expect("a followed stream has started");
            let t = origin.tier.as_deref().unwrap_or("");
            stored_answer_head(
                &mut wire,
                ctx,
                b"text/event-stream",
                framing,
                0,
                0,
                (t, &origin.backend, &origin.model),
            );
            tier = origin.tier;
            answered_by = snap
                .table
                .target_named(&origin.backend, &origin.model)
                .unwrap_or(target);
        }
        events.clear();
        filter.feed(&raw, &mut events);
        // Past the drain deadline, a follower ends whether or not its leader has.
        let done = p.done || worker.shared.is_cut();
        if p.complete {
            filter.finish(&mut events);
        } else if worker.shared.is_cut() {
            events.extend_from_slice(&sse_error(ErrorKind::ShuttingDown, SHUTDOWN_CUT));
        } else if p.done {
            // As the first caller got it: an event cut off is dropped, then the error.
            let message = "the identical request this one followed was cut off upstream";
            events.extend_from_slice(&sse_error(ErrorKind::UpstreamBroken, message));
        }
        frame(&mut wire, framing, &events);
        if done && framing == ClientFraming::Chunked {
            wire.extend_from_slice(codec::LAST_CHUNK);
        }
        if !wire.is_empty() {
            let (res, buf) = client.write(std::mem::take(&mut wire)).await;
            wire = buf;
            wire.clear();
            first_byte.get_or_insert_with(Instant::now);
            if res.is_err() {
                log(
                    worker,
                    snap,
                    ctx,
                    Some(answered_by),
                    tier.as_ref(),
                    CLIENT_CLOSED,
                    Some(TokenUsage::default()),
                    0,
                    first_byte,
                    true,
                );
                return false;
            }
        }
        if done {
            break p.complete;
        }
        monoio::time::sleep(coalesce::POLL).await;
    };
    let price = snap.table.targets[answered_by].price;
    ctx.saved_micros = filter
        .usage
        .map_or(0, |u| price.cost_micros(u.prompt, u.cached, u.completion));
    // Answered 200 (the head went out with the first bytes); a cut-off stream is incomplete.
    log(
        worker,
        snap,
        ctx,
        Some(answered_by),
        tier.as_ref(),
        200,
        Some(TokenUsage::default()),
        0,
        first_byte,
        !complete,
    );
    ctx.keep_alive()
}

/// How the response body is framed towards the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientFraming {
    Empty,
    Length,
    Chunked,
    /// HTTP/1.0 clients without a length: the body ends when we close.
    Close,
}

/// Stores a complete 200 answer (the caller has checked that it finished normally).
#[allow(clippy::too_many_arguments)]
fn store_answer(
    worker: &Worker,
    table: &RoutingTable,
    target: usize,
    tier: Option<&Arc<str>>,
    store: Store,
    content_type: &[u8],
    body: &[u8],
    usage: TokenUsage,
) -> bool {
    let Some(cache) = &worker.shared.cache else {
        return false;
    };
    let t = &table.targets[target];
    let cost = t
        .price
        .cost_micros(usage.prompt, usage.cached, usage.completion);
    let tier = tier.map_or_else(|| Arc::from(""), Arc::clone);
    let backend = table.backends[t.backend].name.clone();
    cache.put(Entry::new(
        store.key,
        store.ttl,
        content_type,
        body,
        usage,
        cost,
        tier,
        backend,
        t.model.clone(),
    ))
}

/// What the caller of a request ended at the drain deadline is told.
const SHUTDOWN_CUT: &str = "the router is shutting down and its drain deadline ended this request";

/// Why a relay stopped early.
enum Cut {
    ClientLeft,
    Upstream(AttemptError),
    /// The drain deadline passed (`Shared::is_cut`): the caller is told, the backend is not
    /// to blame.
    Shutdown(AttemptError),
}

impl Cut {
    /// The error the caller is told of, when there is one to tell.
    fn error(&self) -> Option<&AttemptError> {
        match self {
            Cut::ClientLeft => None,
            Cut::Upstream(e) | Cut::Shutdown(e) => Some(e),
        }
    }

    /// Why a wait on the caller's socket ended: the caller left, or the drain deadline shut it.
    fn of_a_closed_wait(worker: &Worker) -> Cut {
        if worker.shared.is_cut() {
            Cut::Shutdown(AttemptError::new(ErrorKind::ShuttingDown, SHUTDOWN_CUT))
        } else {
            Cut::ClientLeft
        }
    }
}

/// Tells the operator why an attempt on target `t` failed (see `failures`).
fn log_failure(worker: &Worker, table: &RoutingTable, t: &Target, request_id: u64, message: &str) {
    let at = (t.backend, &table.backends[t.backend].name);
    worker
        .failures
        .failed(table.version, at, request_id, message);
}

/// How a relay ended.
enum Relayed<'f> {
    /// The caller was answered (in full or not); whether its connection stays open.
    Done(bool),
    /// The backend failed after its head, before any of the answer reached the caller or the
    /// request's followers: another target may still answer. The lead comes back for it.
    Unsent(AttemptError, Option<Lead<'f>>),
}

#[allow(clippy::too_many_arguments)]
async fn relay<'f>(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &mut Ctx<'_>,
    mut resp: Response,
    target: usize,
    mut slot: Slot<'_>,
    inject_usage: bool,
    client_minor_version: u8,
    mut store: Option<Store>,
    // Held while fetching a cacheable answer others wait for: a stream is passed on to them.
    mut lead: Option<Lead<'f>>,
) -> Relayed<'f> {
    let table = &snap.table;
    let t = &table.targets[target];
    let backend = &table.backends[t.backend];
    let status = resp.head.status;
    // A half-open probe is answered once some of the answer goes out: a backend that fails
    // right after its head has not answered it.
    let answers_probe = status != 429 && status < 500;
    if inject_usage && !backend.stream_usage {
        // Its stream has no usage chunk (the backend is not asked for one): it cannot serve
        // a caller who wants one, from the cache or by following it.
        if store.take().is_some() {
            ctx.cache = "miss";
        }
        lead = None;
    }
    // Larger answers are relayed as they arrive and not stored.
    let max_entry = table.cache.max_entry_bytes;
    // By its type only: an untyped answer to a stream request may be either (read as JSON,
    // the usage of either is found, as `parse_usage` takes the last `"usage"`).
    let sse = resp
        .head
        .header("content-type")
        .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"));
    // A cacheable 200 is read whole before anything is sent, so that `x-switchyard-cache` can
    // say truthfully whether it was stored. A chunked one is answered with its length then
    // (unless it outgrows what may be stored: then it is relayed on as it comes).
    let mut buffer_whole = store.is_some()
        && status == 200
        && !sse
        && match resp.body.framing() {
            BodyFraming::Length(n) => n <= max_entry,
            BodyFraming::Chunked => true,
            _ => false,
        };
    let streamed_framing = if client_minor_version == 0 {
        ClientFraming::Close
    } else {
        ClientFraming::Chunked
    };
    let mut framing = match resp.body.framing() {
        BodyFraming::Empty => ClientFraming::Empty,
        BodyFraming::Length(_) if !sse => ClientFraming::Length,
        _ if buffer_whole => ClientFraming::Length,
        _ => streamed_framing,
    };
    if framing == ClientFraming::Close {
        ctx.keep_alive = false;
    }
    let answer_tier = tier_name(table, ctx);
    let tier = answer_tier.map_or("", |t| &**t);
    if store.is_some() && !buffer_whole {
        ctx.cache = "miss";
    }
    // Bytes waiting to go to the client. Each send wakes the peer, so the head leaves together
    // with the body bytes that arrived with it, and the last bytes with the terminator.
    let mut wire = if buffer_whole {
        Vec::new()
    } else {
        let length = match resp.body.framing() {
            BodyFraming::Length(n) => Some(n),
            _ => None,
        };
        response_head(ctx, &resp.head, framing, length, tier, backend, &t.model)
    };
    // The head waits for the first of the body: a backend that fails before sending any (a
    // close or a stall right after its head) leaves the request free to go elsewhere.
    let head_len = wire.len();
    let mut first_byte: Option<Instant> = None;
    let mut filter = sse.then(|| SseFilter::new(inject_usage));
    // Bodies passed through unframed are decoded straight into `wire`; others go via `data`.
    let mut raw_passthrough = !sse && framing != ClientFraming::Chunked;
    // The body so far, for `usage`, when it does not arrive in one piece.
    let mut kept = Vec::new();
    let mut body_usage = None;
    let mut body_bytes = 0usize;
    let mut data = Vec::new();
    let mut events = Vec::new();
    let mut stream_copy = Vec::new();
    // A led stream's bytes not passed on yet: the unfinished event the filter holds.
    let mut unpublished = Vec::new();
    let mut read_socket = false;
    // The client left while others follow this stream: it is read to its end for them.
    let mut client_gone = false;
    let followed = || lead.as_ref().is_some_and(Lead::has_followers);
    // When the backend last sent something for this request (its head, then body bytes),
    // and whether the caller left while waiting for more of it (not on a failed write to it).
    let mut last_heard = Instant::now();
    let mut left_waiting = false;
    // The wait for each read of the body, in one timer moved forward (cheaper than one each).
    let mut idle = std::pin::pin!(monoio::time::sleep(Duration::MAX));
    let outcome: Result<(), Cut> = loop {
        let body_start = wire.len();
        let sink = if raw_passthrough {
            &mut wire
        } else {
            data.clear();
            &mut data
        };
        if read_socket && worker.shared.is_cut() {
            break Err(Cut::of_a_closed_wait(worker));
        }
        if read_socket {
            // Timed from now, not from the last bytes: writing them to a slow client may have
            // taken longer than the backend may stay silent (it cannot send while we do not read).
            let waiting_from = Instant::now();
            let next = std::pin::pin!(resp.body.next(
                &mut resp.conn,
                (backend.idle_timeout, idle.as_mut(), waiting_from),
                sink
            ));
            // The client is watched for leaving, so that a body that stopped does not hold
            // its connection until the idle timeout; not for a followed stream (that drops a
            // read half done; a failed write tells instead).
            let next = if !client_gone && !followed() {
                client
                    .unless_gone(waiting_from + BODY_WATCH_DELAY, next)
                    .await
            } else {
                // Nobody's socket to watch: the drain deadline is looked for instead.
                monoio::select! {
                    biased;
                    r = next => Some(r),
                    _ = worker.shared.cut_passed() => None,
                }
            };
            match next {
                None => {
                    let cut = Cut::of_a_closed_wait(worker);
                    left_waiting = matches!(cut, Cut::ClientLeft);
                    break Err(cut);
                }
                Some(Err(e)) => break Err(Cut::Upstream(e)),
                Some(Ok(_)) => {
                    last_heard = Instant::now();
                    snap.states.answered(t.backend, last_heard);
                }
            }
        } else if let Err(e) = resp.body.decode(sink) {
            break Err(Cut::Upstream(e));
        }
        read_socket = true;
        let body: &[u8] = if raw_passthrough {
            &wire[body_start..]
        } else {
            &data
        };
        body_bytes += body.len();
        if let Some(f) = filter.as_mut() {
            // The stream is cached as the upstream sent it, and filtered again on replay;
            // a lead keeps that copy for its followers, and the answer is stored from it.
            if store.is_some() && body_bytes as u64 > max_entry {
                store = None;
            }
            if store.is_some() && lead.is_none() {
                stream_copy.extend_from_slice(body);
            }
            events.clear();
            f.feed(body, &mut events);
            if resp.body.is_done() {
                f.finish(&mut events);
            }
            if let Some(l) = &lead {
                // Followers need every byte, of an answer too large to store too; with none
                // following by then, such an answer is not passed on (later waiters go on
                // their own). They get whole events only: a stream that breaks inside its
                // first one can still start over on another backend.
                if store.is_some() || l.has_followers() && !l.is_abandoned() {
                    unpublished.extend_from_slice(body);
                    let whole = unpublished.len().saturating_sub(f.pending_len());
                    if whole > 0 {
                        let origin = || Origin {
                            tier: answer_tier.cloned(),
                            backend: backend.name.clone(),
                            model: t.model.clone(),
                        };
                        l.publish(origin, &unpublished[..whole]);
                        unpublished.drain(..whole);
                    }
                } else {
                    l.abandon();
                }
            }
            frame(&mut wire, framing, &events);
        } else {
            if resp.body.is_done() && kept.is_empty() {
                // The whole body is here at once (the usual case): read usage in place.
                body_usage = parse_usage(body);
            } else {
                kept.extend_from_slice(body);
                if kept.len() > USAGE_SCAN_LIMIT {
                    kept.drain(..kept.len() - USAGE_TAIL);
                }
            }
            if !raw_passthrough {
                frame(&mut wire, framing, &data);
            }
        }
        let done = resp.body.is_done();
        let until_close = resp.body.framing() == BodyFraming::UntilClose;
        if done && body_bytes == 0 && until_close && (200..300).contains(&status) {
            // Closed before any of it, and nothing says the answer was meant to be empty.
            let e = AttemptError::new(
                ErrorKind::UpstreamBroken,
                "backend closed the connection without an answer",
            );
            break Err(Cut::Upstream(e));
        }
        if buffer_whole && wire.len() as u64 > max_entry {
            // A chunked answer too large to store: send what is here, relay the rest.
            buffer_whole = false;
            store = None;
            ctx.cache = "miss";
            framing = streamed_framing;
            raw_passthrough = framing != ClientFraming::Chunked;
            if framing == ClientFraming::Close {
                ctx.keep_alive = false;
            }
            let body = std::mem::take(&mut wire);
            wire = response_head(ctx, &resp.head, framing, None, tier, backend, &t.model);
            frame(&mut wire, framing, &body);
        }
        if buffer_whole {
            if !done {
                continue;
            }
            let content_type = resp
                .head
                .header("content-type")
                .unwrap_or(b"application/json");
            let stored = completed_normally(ctx.endpoint, &wire)
                && store.take().is_some_and(|s| {
                    // Read already when the body came in one piece.
                    let usage = body_usage
                        .or_else(|| parse_usage(&wire))
                        .unwrap_or_default();
                    store_answer(
                        worker,
                        table,
                        target,
                        answer_tier,
                        s,
                        content_type,
                        &wire,
                        usage,
                    )
                });
            ctx.cache = if stored { "stored" } else { "miss" };
            let length = Some(wire.len() as u64);
            let mut whole =
                response_head(ctx, &resp.head, framing, length, tier, backend, &t.model);
            whole.extend_from_slice(&wire);
            wire = whole;
        }
        if done && framing == ClientFraming::Chunked {
            wire.extend_from_slice(codec::LAST_CHUNK);
        }
        let head_only = first_byte.is_none() && !done && wire.len() == head_len;
        if client_gone {
            wire.clear();
        } else if !wire.is_empty() && !head_only {
            if first_byte.is_none() && answers_probe {
                snap.states
                    .probe_answered(t.backend, &mut slot, &table.health);
            }
            let (res, buf) = client.write(std::mem::take(&mut wire)).await;
            wire = buf;
            wire.clear();
            first_byte.get_or_insert_with(Instant::now);
            if res.is_err() {
                // Only a stream is followed; anything else needs no reading for others.
                if !(sse && followed()) {
                    break Err(Cut::ClientLeft);
                }
                client_gone = true;
            }
        }
        if done {
            break Ok(());
        }
    };
    if let Err(Cut::Upstream(e)) = &outcome {
        log_failure(worker, table, t, ctx.request_id, &e.message);
    }
    // Unsent: retried elsewhere unless followers took some of it already.
    if let (Err(Cut::Upstream(e)), None, 200..=299) = (&outcome, first_byte, status) {
        if lead.as_ref().is_none_or(Lead::restart) {
            snap.states
                .record(t.backend, Verdict::Failure, &table.health, slot.is_probe());
            return Relayed::Unsent(e.clone(), lead);
        }
    }
    let complete = outcome.is_ok();
    if let (Some(l), true) = (&lead, complete) {
        // Read to its end, cacheable or not (tool calls are not): followers get it as is.
        l.complete();
    }
    if let (true, 200, Some(f), Some(s)) = (complete, status, &filter, store.take()) {
        // The caller already has its head (`x-switchyard-cache: miss`); the usage event says
        // whether the stream was stored.
        let store_from = |stream: &[u8]| {
            let usage = f.usage.unwrap_or_default();
            let content_type = b"text/event-stream";
            store_answer(
                worker,
                table,
                target,
                answer_tier,
                s,
                content_type,
                stream,
                usage,
            )
        };
        let stored = f.ended_normally()
            && match &lead {
                Some(l) => l.with_bytes(store_from),
                None => store_from(&stream_copy),
            };
        if stored {
            ctx.cache = "stored";
        }
    }
    let mut client_left = client_gone || matches!(outcome, Err(Cut::ClientLeft));
    let failed = outcome.as_ref().err().and_then(Cut::error);
    if let (Some(e), Some(_), false) = (failed, &filter, client_left) {
        // The head (200) is gone already: the error travels as a final SSE event, and the
        // chunked body still ends cleanly.
        let message = match outcome {
            Err(Cut::Upstream(_)) => format!("upstream stream failed: {}", e.message),
            _ => e.message.clone(),
        };
        frame(&mut wire, framing, &sse_error(e.kind, &message));
        if framing == ClientFraming::Chunked {
            wire.extend_from_slice(codec::LAST_CHUNK);
        }
        client_left = client.write(wire).await.0.is_err();
        // The head may have gone only now, with the error (the stream broke at its start).
        first_byte.get_or_insert_with(Instant::now);
    }
    // What the client was answered: the upstream's status, unless nothing had reached the
    // client when the upstream failed (a cacheable answer is read whole before it is sent);
    // then an error answer, not a closed connection without one.
    let mut answered = status;
    if let (Some(e), None, None) = (failed, &filter, first_byte) {
        let mut headers = Vec::with_capacity(256);
        explain(&mut headers, ctx, tier, &backend.name, &t.model);
        answered = e.kind.status();
        send_error(
            client,
            e.kind,
            &e.message,
            None,
            false,
            Some(&headers),
            false,
        )
        .await;
        // What the client got first; and the backend had the request, so it is priced.
        first_byte = Some(Instant::now());
    }
    // A 429/5xx answer was already counted as a failure when it arrived (once per request,
    // even when its body then breaks off).
    let counted = status == 429 || status >= 500;
    // A caller that gave up waiting on a backend gone silent for everyone: hung mid-answer.
    // (One whose write failed says nothing of the backend: it stopped reading.)
    let stalled = || {
        left_waiting
            && !counted
            && table
                .health
                .stall_after
                .is_some_and(|after| snap.states.count_stall(t.backend, last_heard, after))
    };
    let verdict = match (&outcome, status) {
        (Err(Cut::Upstream(_)), _) => Verdict::Failure,
        (Err(Cut::ClientLeft), _) if stalled() => Verdict::Failure,
        (Err(Cut::ClientLeft | Cut::Shutdown(_)), _) => Verdict::Neutral,
        (Ok(()), 429 | 500..) => Verdict::Failure,
        (Ok(()), _) => Verdict::Success,
    };
    if !counted {
        snap.states
            .record(t.backend, verdict, &table.health, slot.is_probe());
    }
    drop(slot);
    if complete && resp.body.reusable() && resp.head.keep_alive {
        worker.pool.put(table.version, t.backend, resp.conn);
    }
    let usage = filter
        .as_ref()
        .and_then(|f| f.usage)
        .or(body_usage)
        .or_else(|| parse_usage(&kept))
        // Providers do not bill an error answer: without usage in it, it costs nothing.
        .or((status >= 400).then(TokenUsage::default));
    let completion_estimate = match &filter {
        // One event per token, less `[DONE]`.
        Some(f) => f.data_lines_passed.saturating_sub(1),
        None => estimate_tokens(body_bytes) / 4,
    };
    let logged_status = if client_left { CLIENT_CLOSED } else { answered };
    log(
        worker,
        snap,
        ctx,
        Some(target),
        answer_tier,
        logged_status,
        usage,
        completion_estimate,
        first_byte,
        !complete || client_left,
    );
    // A body cut short without chunked framing leaves the client unable to find the next response.
    let framed_end = !client_left && (complete || sse && framing == ClientFraming::Chunked);
    Relayed::Done(ctx.keep_alive() && framed_end)
}

/// The final event of a stream that broke off: an OpenAI-style error object.
fn sse_error(kind: ErrorKind, message: &str) -> Vec<u8> {
    format!(
        "data: {{\"error\":{}}}\n\n",
        kind.error_object(message, None)
    )
    .into_bytes()
}

fn frame(out: &mut Vec<u8>, framing: ClientFraming, payload: &[u8]) {
    match framing {
        ClientFraming::Chunked => codec::encode_chunk(out, payload),
        _ => out.extend_from_slice(payload),
    }
}

/// The head of a relayed answer; `length` is the body's, for `ClientFraming::Length`.
#[allow(clippy::too_many_arguments)]
fn response_head(
    ctx: &Ctx<'_>,
    upstream: &Head,
    framing: ClientFraming,
    length: Option<u64>,
    tier: &str,
    backend: &Backend,
    model: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(upstream.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(codec::reason(upstream.status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in upstream.headers() {
        let skip = codec::is_hop_by_hop(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || is_switchyard_header(name)
            || upstream.is_connection_option(name);
        if !skip {
            header(&mut out, name, value);
        }
    }
    match (framing, length) {
        (ClientFraming::Length, Some(n)) => header(
            &mut out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        (ClientFraming::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    explain(&mut out, ctx, tier, &backend.name, model);
    conn::connection_header(&mut out, ctx.keep_alive(), ctx.http10);
    out.extend_from_slice(b"\r\n");
    out
}

/// Our own `x-switchyard-*` headers never cross the proxy from either side.
fn is_switchyard_header(name: &[u8]) -> bool {
    name.len() > 13 && name[..13].eq_ignore_ascii_case(b"x-switchyard-")
}

/// Appends `name: value` and CRLF. Headers are built by appending bytes: `write!` formatting
/// was a tenth of the request path's instructions (callgrind).
fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request id as 16 lowercase hex digits.
pub fn hex_id(id: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(id >> (60 - 4 * i)) as usize & 0xf];
    }
    out
}

/// The name of the tier the current attempt's target was taken from.
fn tier_name<'t>(table: &'t RoutingTable, ctx: &Ctx<'_>) -> Option<&'t Arc<str>> {
    ctx.tier.map(|rank| &table.tiers[rank].name)
}

/// The `x-switchyard-*` headers that explain the decision.
fn explain(out: &mut Vec<u8>, ctx: &Ctx<'_>, tier: &str, backend: &str, model: &str) {
    header(out, b"x-switchyard-request-id", &hex_id(ctx.request_id));
    header(
        out,
        b"x-switchyard-category",
        ctx.category.as_str().as_bytes(),
    );
    if !ctx.rule.is_empty() {
        out.extend_from_slice(b"x-switchyard-rule: ");
        out.extend_from_slice(ctx.rule.as_bytes());
        if let Some(c) = ctx.classifier_rule {
            out.extend_from_slice(b"; classifier=");
            out.extend_from_slice(c.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    if !tier.is_empty() {
        header(out, b"x-switchyard-tier", tier.as_bytes());
    }
    if !backend.is_empty() {
        header(out, b"x-switchyard-backend", backend.as_bytes());
        // Model names come from config and may hold any UTF-8; header values must stay clean.
        if model.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            header(out, b"x-switchyard-model", model.as_bytes());
        } else {
            let clean: Vec<u8> = model
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c as u8
                    } else {
                        b'?'
                    }
                })
                .collect();
            header(out, b"x-switchyard-model", &clean);
        }
    }
    header(
        out,
        b"x-switchyard-attempts",
        itoa::Buffer::new().format(ctx.attempts).as_bytes(),
    );
    header(
        out,
        b"x-switchyard-config-version",
        itoa::Buffer::new().format(ctx.config_version).as_bytes(),
    );
    if !ctx.cache.is_empty() {
        header(out, b"x-switchyard-cache", ctx.cache.as_bytes());
    }
    if ctx.downgraded {
        header(out, b"x-switchyard-budget", b"downgraded");
    }
}

/// The most an attempt can cost, reserved before it is sent. Every body byte counts as a
/// prompt token (a byte-level BPE token is at least one byte, and the JSON around the text
/// more than covers chat-template tokens); output is `max_tokens` (or the configured cap when
/// the request sets none) for each of the `n` answers.
fn worst_case_micros(
    price: Price,
    endpoint: Endpoint,
    body_len: usize,
    view: &RequestView<'_>,
    table: &RoutingTable,
) -> u64 {
    let output = match endpoint {
        Endpoint::Embeddings => 0,
        _ => view
            .max_tokens
            .unwrap_or(table.budgets.default_max_output_tokens)
            .saturating_mul(view.choices),
    };
    price.cost_micros(body_len as u64, 0, output)
}

async fn reject(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &Ctx<'_>,
    kind: ErrorKind,
    message: &str,
    param: Option<&str>,
) -> bool {
    send_reject(worker, snap, client, ctx, kind, message, param, None).await
}

#[allow(clippy::too_many_arguments)]
async fn send_reject(
    worker: &Worker,
    snap: &Snapshot,
    client: &mut Client,
    ctx: &Ctx<'_>,
    kind: ErrorKind,
    message: &str,
    param: Option<&str>,
    extra: Option<&[u8]>,
) -> bool {
    // After failed attempts, the error names the last target tried (for the caller and the
    // usage event: which backend failed); before any, nothing.
    let table = &snap.table;
    let tier = ctx.last_target.and_then(|_| tier_name(table, ctx));
    let mut headers = Vec::with_capacity(256);
    match ctx.last_target {
        Some(target) => {
            let t = &table.targets[target];
            let backend = &table.backends[t.backend].name;
            explain(&mut headers, ctx, tier.map_or("", |t| t), backend, &t.model);
        }
        None => explain(&mut headers, ctx, "", "", ""),
    }
    if let Some(extra) = extra {
        headers.extend_from_slice(extra);
    }
    log(
        worker,
        snap,
        ctx,
        ctx.last_target,
        tier,
        kind.status(),
        None,
        0,
        None,
        false,
    );
    send_error(
        client,
        kind,
        message,
        param,
        ctx.keep_alive(),
        Some(&headers),
        false,
    )
    .await
}

/// The `log` phase: one usage event per request, whatever happened.
#[allow(clippy::too_many_arguments)]
fn log(
    worker: &Worker,
    snap: &Snapshot,
    ctx: &Ctx<'_>,
    target: Option<usize>,
    tier: Option<&Arc<str>>,
    status: u16,
    usage: Option<TokenUsage>,
    completion_estimate: u64,
    first_byte: Option<Instant>,
    incomplete: bool,
) {
    let table = &snap.table;
    let (tier, backend, model, price) = match target {
        Some(id) => {
            let t = &table.targets[id];
            (
                tier.map_or_else(|| Arc::from(""), Arc::clone),
                table.backends[t.backend].name.clone(),
                t.model.clone(),
                Some(t.price),
            )
        }
        None => (Arc::from(""), Arc::from(""), Arc::from(""), None),
    };
    // Requests that never reached a backend cost nothing; answered ones are priced even when
    // the backend sent no usage (then from estimates, flagged as such), and so is one whose
    // caller left while a backend worked on it: the backend read (and providers bill) the
    // prompt, so budgets count it. (A caller-closed request with a target that the backend
    // never got is logged with zero usage.)
    let reached = target.is_some() && (first_byte.is_some() || status == CLIENT_CLOSED);
    let mut tokens = match (reached, usage) {
        (false, _) => TokenUsage::default(),
        (true, Some(u)) => u,
        (true, None) => TokenUsage {
            prompt: estimate_tokens(ctx.prompt_chars),
            cached: 0,
            completion: completion_estimate,
        },
    };
    let micros = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
    let own_cost = price.map_or(0, |p| {
        p.cost_micros(tokens.prompt, tokens.cached, tokens.completion)
    });
    if let Some(r) = ctx.reservation.take() {
        r.settle(own_cost);
    }
    // Abandoned attempts were settled as they failed; the request counts them too.
    let cost_micros = own_cost.saturating_add(ctx.abandoned_micros);
    tokens.prompt = tokens.prompt.saturating_add(ctx.abandoned_tokens);
    if let Some(c) = ctx.token_charge.take() {
        c.settle(tokens.prompt.saturating_add(tokens.completion));
    }
    worker.shared.usage.send(UsageEvent {
        request_id: ctx.request_id,
        service: ctx.service.into(),
        endpoint: ctx.endpoint.path(),
        category: ctx.category,
        tier,
        backend,
        model,
        prompt_tokens: tokens.prompt,
        cached_tokens: tokens.cached,
        completion_tokens: tokens.completion,
        tokens_estimated: reached && usage.is_none() || ctx.abandoned_tokens > 0,
        cost_micros,
        budget_downgraded: ctx.downgraded,
        refused_by: ctx.refused_by,
        first_byte_us: first_byte.map_or(0, |f| micros(f - ctx.started)),
        total_us: micros(ctx.started.elapsed()),
        status,
        attempts: ctx.attempts,
        streamed: ctx.streamed,
        incomplete,
        cache: ctx.cache,
        saved_micros: ctx.saved_micros,
        config_version: table.version,
    });
}

#[cfg(test)]
mod tests {
    use super::{header_use, hex_id, request_variant, HeaderUse};

    fn head(headers: &str) -> crate::codec::Head {
        let raw = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        crate::codec::parse_request(raw.as_bytes(), 8192)
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn cache_variants_ignore_header_order_but_not_the_order_of_a_repeated_one() {
        let v = |headers: &str| request_variant(&head(headers));
        assert_eq!(
            v("OpenAI-Beta: x\r\nX-Custom: y\r\n"),
            v("x-custom: y\r\nopenai-beta: x\r\n")
        );
        assert_ne!(
            v("OpenAI-Organization: A\r\nOpenAI-Organization: B\r\n"),
            v("OpenAI-Organization: B\r\nOpenAI-Organization: A\r\n")
        );
        assert!(
            v("User-Agent: sdk\r\n").is_empty(),
            "output-neutral headers are left out"
        );
        assert!(
            v("Connection: x-hop\r\nX-Hop: 1\r\n").is_empty(),
            "as are headers the backend is not sent"
        );
    }

    #[test]
    fn header_names_are_classified_whatever_their_case() {
        let cases: [(&[u8], HeaderUse); 10] = [
            (b"Content-Length", HeaderUse::Dropped),
            (b"PROXY-AUTHORIZATION", HeaderUse::Dropped),
            (b"X-Switchyard-Service", HeaderUse::Dropped),
            (b"Authorization", HeaderUse::Dropped),
            (b"User-Agent", HeaderUse::Neutral),
            (b"X-Stainless-Retry-Count", HeaderUse::Neutral),
            (b"traceparent", HeaderUse::Neutral),
            (b"OpenAI-Beta", HeaderUse::Relevant),
            (
                b"x-a-custom-header-longer-than-any-known-name",
                HeaderUse::Relevant,
            ),
            (b"Content-Length-Extra", HeaderUse::Relevant),
        ];
        for (name, want) in cases {
            assert_eq!(header_use(name), want, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn request_ids_are_16_hex_digits() {
        assert_eq!(&hex_id(0x0100_0000_0000_00af), b"01000000000000af");
        assert_eq!(&hex_id(u64::MAX), b"ffffffffffffffff");
        assert_eq!(
            std::str::from_utf8(&hex_id(42)).unwrap(),
            format!("{:016x}", 42)
        );
    }
}
