//! A data plane in its own process (`switchyard data --control URL`), following a control plane
//! elsewhere. Owns: the first snapshot and every later one (WatchSnapshots, reconnecting with
//! back-off), streaming usage to the control plane (ReportUsage) from a bounded buffer, budget
//! leases granted by the control plane, and the API keys it publishes.
//! A data plane that loses its control plane keeps serving on its last snapshot, keys and
//! leases; usage waits in the buffer (drops counted when full) and is sent on reconnect. Batches
//! carry sequence numbers, so a batch resent after a lost reply is counted once.
//! Must not: serve before it has a snapshot.

use crate::api::{pb, record_from_event};
use crate::client::{Admin, AuthedClient};
use crate::configs::{Configs, Overrides};
use crate::{drain_on_signal, runtime, Ready, Shutdown};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_dataplane::auth::{KeyGrant, KeyTable};
use switchyard_dataplane::budget::{BudgetBook, BudgetKey, Limits};
use switchyard_dataplane::server::{self, DataPlane};
use switchyard_dataplane::usage::{UsageReceiver, UsageSink};
use switchyard_shared::category::Category;

/// Records sent per ReportUsage call.
const BATCH: usize = 1000;
/// How often buffered usage is sent.
const REPORT_PERIOD: Duration = Duration::from_millis(200);
/// How often API keys and API-set budgets are fetched.
const SYNC_PERIOD: Duration = Duration::from_secs(2);
/// How often budget pools are checked for a new lease.
const LEASE_PERIOD: Duration = Duration::from_millis(50);
/// How long a lease request or a config report may take before the control plane counts as
/// not answering (requests waiting on a grant then go on without one).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct RemoteStart {
    pub control: Admin,
    /// Names this data plane to the control plane (its usage sequences are per name).
    pub name: String,
    pub overrides: Overrides,
    /// Usage records kept while the control plane is unreachable; more are dropped and counted.
    pub buffer: usize,
}

/// Usage waiting to be reported, with the sequence number of the first record.
struct Outbox {
    records: VecDeque<pb::UsageRecord>,
    first_sequence: u64,
    capacity: usize,
}

struct Remote {
    name: String,
    /// Random per process: the control plane counts sequences per (name, instance).
    instance: String,
    /// What it tells the control plane of its config: the version in effect, the last refused.
    config_state: Mutex<pb::DataPlaneConfig>,
    /// The last report of it failed.
    config_unreported: AtomicBool,
    configs: Configs,
    budgets: Arc<BudgetBook>,
    dataplane: DataPlane,
    outbox: Mutex<Outbox>,
    /// Held for a whole send: the periodic reporter and the final send at shutdown would
    /// otherwise send the same records and then both remove them (losing the next ones).
    sending: tokio::sync::Mutex<()>,
    /// Held for a round of lease requests; taken for good at exit (`return_budgets`), so no
    /// grant arrives after what was not used is given back.
    leasing: tokio::sync::Mutex<()>,
    dropped: AtomicU64,
}

pub fn serve_data(start: RemoteStart, on_ready: impl FnOnce(&Ready)) -> i32 {
    match run(start, on_ready) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("switchyard: {e}");
            1
        }
    }
}

async fn first_snapshot(
    client: &mut AuthedClient,
    (name, instance): (&str, &str),
) -> Result<(tonic::Streaming<pb::ConfigVersion>, pb::ConfigVersion), tonic::Status> {
    let mut watch = client
        .watch_snapshots(pb::WatchSnapshotsRequest {
            data_plane: name.to_string(),
            instance: instance.to_string(),
        })
        .await?
        .into_inner();
    match watch.message().await? {
        Some(first) => Ok((watch, first)),
        None => Err(tonic::Status::unavailable("the snapshot stream ended")),
    }
}

/// Subscribes to the snapshots, retrying with back-off until the control plane answers; a
/// refused token is no reason to wait, and comes back as the error.
async fn subscribe(
    client: &mut AuthedClient,
    who: (&str, &str),
    url: &str,
) -> Result<(tonic::Streaming<pb::ConfigVersion>, pb::ConfigVersion), tonic::Status> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match first_snapshot(client, who).await {
            Ok(got) => return Ok(got),
            Err(e)
                if matches!(
                    e.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                return Err(e)
            }
            Err(e) => {
                eprintln!(
                    "switchyard: waiting for the control plane at {url}: {}",
                    e.message()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn run(start: RemoteStart, on_ready: impl FnOnce(&Ready)) -> Result<(), String> {
    let runtime = runtime()?;
    let mut client = runtime.block_on(start.control.client(true))?;
    let name = start.name;
    let instance = crate::random_hex(8)?;
    // Nothing to serve without a first snapshot: wait for the control plane, saying why.
    let (watch, first) = runtime
        .block_on(subscribe(&mut client, (&name, &instance), &start.control.url))
        .map_err(|e| {
            format!(
                "the control plane at {} refuses this data plane: {} (check $SWITCHYARD_DATA_PLANE_TOKEN)",
                start.control.url,
                e.message()
            )
        })?;
    let source = format!("{} (version {})", start.control.url, first.version);
    let configs = Configs::start(first.toml, &source, first.version, start.overrides, true)
        .map_err(|errors| errors.join("\n"))?;
    let snapshot = configs.snapshot().clone();
    let table = &snapshot.load().table;
    let today = table.budgets.day_of(jiff::Timestamp::now());
    let budgets = Arc::new(BudgetBook::granted(
        today,
        Limits::from_settings(&table.budgets),
    ));
    let keys = runtime
        .block_on(fetch_keys(&mut client))
        .unwrap_or_else(|e| {
            eprintln!("switchyard: cannot fetch API keys yet ({e}); retrying");
            KeyTable::default()
        });
    let (usage, events) = UsageSink::channel(table.usage.channel_capacity);
    let drain_timeout = table.listener.drain_timeout;
    // Before it listens (see `listen_for`); not earlier, while a signal's default action
    // still ends a data plane waiting for its control plane.
    let shutdown = Shutdown::listen(&runtime)?;
    let dataplane =
        server::start(snapshot.clone(), usage, budgets.clone(), keys).map_err(|e| e.to_string())?;
    let config_state = Mutex::new(pb::DataPlaneConfig {
        data_plane: name.clone(),
        instance: instance.clone(),
        in_effect: first.version,
        ..Default::default()
    });
    let remote = Arc::new(Remote {
        name,
        instance,
        config_state,
        config_unreported: AtomicBool::new(false),
        configs,
        budgets,
        dataplane,
        outbox: Mutex::new(Outbox {
            records: VecDeque::new(),
            first_sequence: 1,
            capacity: start.buffer.max(1),
        }),
        sending: tokio::sync::Mutex::new(()),
        leasing: tokio::sync::Mutex::new(()),
        dropped: AtomicU64::new(0),
    });
    // Budgets are leased for the services this data plane serves, as their requests come
    // (the first waits for its lease): a grant is held until the day ends, so leasing every
    // configured budget up front would park money other data planes need.
    let consumer = remote.clone();
    runtime.spawn_blocking(move || consumer.collect(events));
    runtime.spawn(
        remote
            .clone()
            .follow(client.clone(), start.control.url.clone(), watch),
    );
    runtime.spawn(remote.clone().report(client.clone()));
    runtime.spawn(remote.clone().sync(client.clone()));
    runtime.spawn(remote.clone().lease(client.clone()));
    on_ready(&Ready {
        dataplane: Some(&remote.dataplane),
        config_version: remote.configs.current().version,
        admin: None,
    });
    runtime.block_on(async {
        drain_on_signal(shutdown, Some(&remote.dataplane), drain_timeout).await;
        // The events of the drained requests reach the outbox within a poll period.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let left = remote.send_all(&mut client).await;
        if left > 0 {
            // Grants are kept: the control plane cannot tell what of them was spent.
            eprintln!("switchyard: {left} usage records could not be reported before exit");
        } else {
            remote.return_budgets(&mut client).await;
        }
    });
    runtime.shutdown_background();
    Ok(())
}

async fn fetch_keys(client: &mut AuthedClient) -> Result<KeyTable, String> {
    let reply = client
        .get_key_hashes(pb::GetKeyHashesRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok(KeyTable::new(reply.keys.into_iter().filter_map(|k| {
        let hash: [u8; 32] = k.sha256.try_into().ok()?;
        let grant = KeyGrant {
            service: k.service.into(),
            any_service: k.any_service,
        };
        Some((hash, grant))
    })))
}

impl Remote {
    /// Moves usage events from the workers' channel into the outbox, stamped with the time.
    fn collect(&self, events: UsageReceiver) {
        let mut trim = crate::trim::IdleTrim::default();
        // A restart-only setting: read once.
        let log_events = self.configs.snapshot().load().table.usage.log_events;
        loop {
            let mut drained = false;
            let disconnected = loop {
                match events.try_recv() {
                    Ok(e) => {
                        drained = true;
                        if log_events {
                            e.log();
                        }
                        let record = record_from_event(&e, jiff::Timestamp::now().as_millisecond());
                        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
                        if outbox.records.len() < outbox.capacity {
                            outbox.records.push_back(record);
                        } else {
                            self.dropped.fetch_add(1, Relaxed);
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break false,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
                }
            };
            if disconnected {
                return;
            }
            let in_flight = self.dataplane.shared.inflight() > 0;
            trim.drained(drained || in_flight, std::time::Instant::now());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the oldest batch; on success it leaves the outbox. Returns whether one was sent.
    async fn send_batch(&self, client: &mut AuthedClient) -> Result<bool, tonic::Status> {
        let _one_sender = self.sending.lock().await;
        let batch = {
            let outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            if outbox.records.is_empty() {
                return Ok(false);
            }
            pb::UsageBatch {
                data_plane: self.name.clone(),
                instance: self.instance.clone(),
                first_sequence: outbox.first_sequence,
                records: outbox.records.iter().take(BATCH).cloned().collect(),
                dropped: self.dropped.load(Relaxed) + self.dataplane.shared.usage.dropped(),
            }
        };
        let sent = batch.records.len();
        client.report_usage(tokio_stream::iter([batch])).await?;
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        outbox.records.drain(..sent);
        outbox.first_sequence += sent as u64;
        Ok(true)
    }

    /// At exit, with every request's usage reported: gives back what the control plane granted
    /// and no worker leased (what a worker leased and did not reserve stays out: at most a
    /// lease per worker and budget), so a restart does not leave it stranded until the day ends.
    async fn return_budgets(&self, client: &mut AuthedClient) {
        // No lease request from now on, nor one still on its way: the lock is held until exit.
        std::mem::forget(self.leasing.lock().await);
        let day = self.budgets.day();
        let mut returned = 0u64;
        for (key, micros) in self.budgets.withdraw_unused() {
            let request = pb::ReturnBudgetRequest {
                data_plane: self.name.clone(),
                service: key.0.clone(),
                category: Category::scope_name(key.1).to_string(),
                micros,
                day: day.clone(),
            };
            match tokio::time::timeout(CALL_TIMEOUT, client.return_budget(request)).await {
                Ok(Ok(reply)) => returned += reply.into_inner().returned_micros,
                _ => {
                    eprintln!("switchyard: could not give back the unused budget grants");
                    return;
                }
            }
        }
        if returned > 0 {
            eprintln!(
                "switchyard: gave back {} of unused budget grants",
                crate::client::usd(returned)
            );
        }
    }

    /// Reports until the outbox is empty or the control plane fails; returns what is left.
    async fn send_all(&self, client: &mut AuthedClient) -> usize {
        while let Ok(true) = self.send_batch(client).await {}
        let outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        outbox.records.len()
    }

    async fn report(self: Arc<Self>, mut client: AuthedClient) {
        let mut backoff = REPORT_PERIOD;
        loop {
            tokio::time::sleep(backoff).await;
            match self.send_batch(&mut client).await {
                Ok(_) => backoff = REPORT_PERIOD,
                Err(e) => {
                    if backoff == REPORT_PERIOD {
                        eprintln!(
                            "switchyard: cannot report usage ({}); buffering",
                            e.message()
                        );
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Applies every snapshot the control plane publishes and says how that went; reconnects
    /// when the stream breaks.
    async fn follow(
        self: Arc<Self>,
        mut client: AuthedClient,
        url: String,
        mut watch: tonic::Streaming<pb::ConfigVersion>,
    ) {
        self.report_config(&mut client).await;
        loop {
            match watch.message().await {
                Ok(Some(record)) => {
                    if self.apply(record) {
                        self.report_config(&mut client).await;
                    }
                }
                Ok(None) | Err(_) => {
                    eprintln!("switchyard: lost the control plane; serving on config version {} and reconnecting", self.configs.current().version);
                    match subscribe(&mut client, (&self.name, &self.instance), &url).await {
                        Ok((w, first)) => {
                            watch = w;
                            self.apply(first);
                            // A new stream: the control plane knows nothing of this one yet.
                            self.report_config(&mut client).await;
                        }
                        Err(e) => {
                            eprintln!(
                                "switchyard: the control plane refuses this data plane now: {}",
                                e.message()
                            );
                            tokio::time::sleep(MAX_BACKOFF).await;
                        }
                    }
                }
            }
        }
    }

    /// Puts a published config in effect here, or refuses it; returns whether that changed
    /// what this data plane reports (not for the version already in effect).
    fn apply(&self, record: pb::ConfigVersion) -> bool {
        if record.version == self.configs.current().version {
            return false;
        }
        // Errors name the config as read here: against this data plane's environment and files.
        let source = format!("config version {} as read here", record.version);
        let mut state = self.config_state.lock().unwrap_or_else(|p| p.into_inner());
        match self.configs.follow(record.toml, &source, record.version) {
            Ok(kept) => {
                state.in_effect = record.version;
                state.restart_needed = kept.iter().map(|k| k.to_string()).collect();
                if state.refused < record.version {
                    // A refusal of an older version is no longer news.
                    state.refused = 0;
                    state.errors.clear();
                }
                let snapshot = self.configs.snapshot().load();
                // A remote's pools hold grants: nothing to seed from spend.
                let limits = Limits::from_settings(&snapshot.table.budgets);
                self.budgets.set_limits(limits, BTreeMap::new);
                eprintln!("switchyard: config version {} in effect", record.version);
                if !kept.is_empty() {
                    eprintln!(
                        "switchyard: {} changed but only take effect when this data plane restarts",
                        kept.join(", ")
                    );
                }
            }
            Err(errors) => {
                eprintln!(
                    "switchyard: config version {} refused here:",
                    record.version
                );
                for e in &errors {
                    eprintln!("  {e}");
                }
                state.refused = record.version;
                state.errors = errors;
            }
        }
        true
    }

    /// Tells the control plane which config is in effect here and which was refused; one
    /// that fails is sent again with the next sync.
    async fn report_config(&self, client: &mut AuthedClient) {
        let state = self
            .config_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let failed =
            match tokio::time::timeout(CALL_TIMEOUT, client.report_config_state(state)).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.message().to_string()),
                Err(_) => Some(format!("no answer within {CALL_TIMEOUT:?}")),
            };
        // Said once until it works again.
        if let (Some(why), false) = (&failed, self.config_unreported.load(Relaxed)) {
            eprintln!("switchyard: cannot tell the control plane which config is in effect: {why}");
        }
        self.config_unreported.store(failed.is_some(), Relaxed);
    }

    /// API keys and API-set budgets, and the budget day.
    async fn sync(self: Arc<Self>, mut client: AuthedClient) {
        loop {
            if self.config_unreported.load(Relaxed) {
                self.report_config(&mut client).await;
            }
            if let Ok(keys) = fetch_keys(&mut client).await {
                self.dataplane.shared.keys.store(Arc::new(keys));
            }
            self.sync_budgets(&mut client).await;
            tokio::time::sleep(SYNC_PERIOD).await;
        }
    }

    /// The API-set budgets and the budget day, as the control plane has them.
    async fn sync_budgets(&self, client: &mut AuthedClient) {
        let Ok(reply) = client.get_budgets(pb::GetBudgetsRequest {}).await else {
            return;
        };
        let reply = reply.into_inner();
        let wanted: BTreeMap<_, _> = reply
            .budgets
            .into_iter()
            .filter(|b| b.source == "api")
            .filter_map(|b| {
                let category = Category::parse_scope(&b.category)?;
                Some(((b.service, category), b.daily_micros))
            })
            .collect();
        let have = self.budgets.overrides();
        for key in have.keys().filter(|k| !wanted.contains_key(*k)) {
            self.budgets.set_override(key.clone(), None, BTreeMap::new);
        }
        for (key, limit) in wanted {
            if have.get(&key) != Some(&limit) {
                self.budgets.set_override(key, Some(limit), BTreeMap::new);
            }
        }
        if reply.day != self.budgets.day() {
            self.budgets.start_day(reply.day, BTreeMap::new());
        }
    }

    /// Keeps every budget pool and rate-limit bucket this data plane uses stocked with a lease
    /// from the control plane: budgets a few leases' worth per worker, fetched when below one
    /// lease per worker; rate limits about 200 ms of allowance.
    async fn lease(self: Arc<Self>, mut client: AuthedClient) {
        // Budgets the control plane had nothing left of: asked again only after a pause (a
        // budget refills only when raised), while rate limits refill by the second.
        let mut spent_out: BTreeMap<BudgetKey, tokio::time::Instant> = BTreeMap::new();
        loop {
            tokio::time::sleep(LEASE_PERIOD).await;
            let _round = self.leasing.lock().await;
            let limits = self.configs.snapshot().load().limits.clone();
            for (service, tokens, units) in limits.running_low() {
                let request = pb::LeaseRateRequest {
                    data_plane: self.name.clone(),
                    service: service.clone(),
                    tokens,
                    units,
                };
                let asked = tokio::time::timeout(CALL_TIMEOUT, client.lease_rate(request));
                let Ok(Ok(reply)) = asked.await else {
                    limits.stop_waiting();
                    break;
                };
                // Nothing granted is an answer too, for the requests waiting on one.
                limits.add_grant(&service, tokens, reply.into_inner().granted);
            }
            let (lease, workers) = {
                let snapshot = self.configs.snapshot().load();
                let t = &snapshot.table;
                (t.budgets.lease_micros, t.listener.workers as u64)
            };
            let now = tokio::time::Instant::now();
            spent_out.retain(|_, until| *until > now);
            for (key, wanted) in self.budgets.running_low(lease * workers) {
                if spent_out.contains_key(&key) {
                    continue;
                }
                let request = pb::LeaseBudgetRequest {
                    data_plane: self.name.clone(),
                    service: key.0.clone(),
                    category: Category::scope_name(key.1).to_string(),
                    micros: lease * workers * 4,
                    day: self.budgets.day(),
                    // A request waits for this much (granted whole if the budget has it).
                    need_micros: wanted,
                };
                let asked = tokio::time::timeout(CALL_TIMEOUT, client.lease_budget(request));
                let Ok(Ok(reply)) = asked.await else {
                    // Unreachable (or not answering): serve on what is held, ask again later.
                    self.budgets.stop_waiting();
                    break;
                };
                let reply = reply.into_inner();
                if reply.unlimited || reply.day != self.budgets.day() {
                    // Behind the control plane (a budget it cleared, or a new day): catch up
                    // now, not at the next sync.
                    self.budgets.answered(&key);
                    self.sync_budgets(&mut client).await;
                    if reply.day != self.budgets.day() {
                        break; // A new day: the next round leases on its fresh pools.
                    }
                    spent_out.insert(key, now + SYNC_PERIOD);
                    continue;
                }
                if reply.granted_micros == 0 {
                    spent_out.insert(key.clone(), now + SYNC_PERIOD);
                }
                self.budgets.add_grant(key, reply.granted_micros);
            }
        }
    }
}
