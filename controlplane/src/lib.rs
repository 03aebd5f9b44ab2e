//! The control plane: a tokio runtime that owns the configuration (live reloads included),
//! spending and budgets, the data store and the admin API, publishes routing snapshots for the
//! workers, drains their usage events, and runs shutdown.
//! Must not: sit on the request path; workers only read snapshots, reserve from their own
//! budget leases and `try_send` usage.
//!
//! Layout: `configs` (live configuration), `ledger` (spend), `metrics` (Prometheus), `store`
//! (persistence), `api` (gRPC control API and `/metrics`), `client` (the CLI's side of the API),
//! `remote` (a data plane in its own process, following a control plane elsewhere),
//! `followers` (the control plane's view of those data planes' configs).

pub mod api;
pub mod client;
pub mod configs;
pub mod followers;
pub mod ledger;
pub mod metrics;
pub mod remote;
pub mod store;
mod trim;

use api::pb;
use compact_str::CompactString;
use configs::{Configs, Overrides};
use ledger::Ledger;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::Store;
use switchyard_dataplane::auth::{KeyGrant, KeyTable};
use switchyard_dataplane::budget::{BudgetBook, BudgetKey, Limits};
use switchyard_dataplane::server::{self, DataPlane};
use switchyard_dataplane::usage::UsageSink;
use switchyard_shared::category::Category;
use switchyard_shared::config;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How often the ledger drains usage events while they come, and once they stopped; the
/// second is also the longest an event waits to be counted.
const USAGE_DRAIN_PERIODS: (Duration, Duration) =
    (Duration::from_millis(2), Duration::from_millis(20));
/// How often changed spend is committed to the store: the most a `kill -9` can lose.
const FLUSH_PERIOD: Duration = Duration::from_millis(250);
/// How often the config file is checked for changes, and the budget day for its end.
const TICK: Duration = Duration::from_secs(1);

/// Everything the admin API and the background tasks work on.
pub struct ControlPlane {
    pub configs: Configs,
    pub ledger: Ledger,
    pub budgets: Arc<BudgetBook>,
    pub store: Store,
    /// The data plane in this process.
    pub local: Option<DataPlane>,
    started: Instant,
    remotes: Mutex<Remotes>,
    /// The remote data planes following the config, with the versions they report.
    pub followers: Arc<followers::Followers>,
    flushing: Mutex<()>,
    /// Held while the budget book changes (an API-set budget written to the store and put in
    /// force, a config's limits, a new day), so changes reach the store and the book in the
    /// same order, and a day roll never falls between reading spend and seeding from it.
    changing_budgets: Mutex<()>,
    /// Set at exit: the usage consumer records what is left and stops.
    usage_stop: AtomicBool,
    /// The same for API keys (`change_keys`).
    changing_keys: Mutex<()>,
}

/// What remote data planes reported, as far as it is not committed yet.
#[derive(Default)]
struct Remotes {
    /// Per remote data plane: the last usage sequence counted, and the events it dropped.
    sequences: HashMap<String, (u64, u64)>,
    /// What their counted records cost since the last commit.
    spent: RemoteSpent,
}

/// (day, service, category or none for the service's whole budget) -> micro-dollars. Inline
/// strings: counting a record allocates nothing.
type RemoteSpent = BTreeMap<(CompactString, CompactString, Option<Category>), u64>;

impl Remotes {
    fn from_store(store: &Store) -> Result<Remotes, String> {
        let sequences = store.load_sequences()?.into_iter();
        Ok(Remotes {
            sequences: sequences.map(|(name, last)| (name, (last, 0))).collect(),
            spent: BTreeMap::new(),
        })
    }
}

impl ControlPlane {
    /// The budget day now, in the configured time zone.
    pub fn today(&self) -> String {
        let snapshot = self.configs.snapshot().load();
        snapshot.table.budgets.day_of(jiff::Timestamp::now())
    }

    /// Counts a remote data plane's batch; records it has sent before are skipped, and records
    /// that cannot be read are logged and skipped for good (a resend would fail the same way).
    pub fn record_remote(&self, batch: pb::UsageBatch) -> pb::ReportUsageReply {
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        let remotes = &mut *remotes;
        let source = format!("{}/{}", batch.data_plane, batch.instance);
        let (last, dropped) = remotes.sequences.entry(source).or_insert((0, 0));
        // A count of dropped events, not more than a data plane could have made.
        *dropped = (*dropped).max(batch.dropped.min(1 << 40));
        let mut reply = pb::ReportUsageReply::default();
        let snapshot = self.configs.snapshot().load();
        for (i, r) in batch.records.into_iter().enumerate() {
            let sequence = batch.first_sequence.saturating_add(i as u64);
            if sequence <= *last {
                reply.duplicates += 1;
                continue;
            }
            *last = sequence;
            let read = jiff::Timestamp::from_millisecond(r.unix_ms)
                .map_err(|e| format!("time: {e}"))
                .and_then(|at| Ok((at, api::event_from_record(r)?)));
            match read {
                Ok((at, event)) => {
                    let day = snapshot.table.budgets.day_of(at);
                    self.ledger.record(&event, &day);
                    for scope in [None, Some(event.category)] {
                        let key = (CompactString::from(&day), event.service.clone(), scope);
                        let spent = remotes.spent.entry(key).or_default();
                        *spent = spent.saturating_add(event.cost_micros);
                    }
                    reply.accepted += 1;
                }
                Err(e) => {
                    eprintln!(
                        "switchyard: usage record {sequence} from `{}` skipped: {e}",
                        batch.data_plane.escape_debug()
                    );
                    reply.rejected += 1;
                }
            }
        }
        reply
    }

    /// Every budget of today with what it has spent and holds.
    pub fn budget_report(&self) -> pb::GetBudgetsReply {
        let day = self.budgets.day();
        let spent = self.ledger.spent_by_budget(&day);
        let services = spent.keys().map(|(s, _)| s.clone()).collect::<Vec<_>>();
        let budgets = self
            .budgets
            .views(services)
            .into_iter()
            .map(|v| {
                let spent_micros = spent.get(&v.key).copied().unwrap_or(0);
                pb::Budget {
                    service: v.key.0,
                    category: Category::scope_name(v.key.1).to_string(),
                    daily_micros: v.limit,
                    spent_micros,
                    reserved_micros: v.leased.saturating_sub(spent_micros),
                    source: v.source.to_string(),
                }
            })
            .collect();
        let snapshot = self.configs.snapshot().load();
        pb::GetBudgetsReply {
            day,
            time_zone: snapshot.table.budgets.time_zone_name.clone(),
            budgets,
        }
    }

    pub fn stats(&self) -> pb::Stats {
        let snap = self.configs.snapshot().load();
        let table = &snap.table;
        let totals = self.ledger.totals();
        let mut stats = pb::Stats {
            config_version: table.version,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            requests: totals.values().map(|t| t.requests).sum(),
            usage_events_dropped: self.remote_dropped(),
            budget_downgraded: self.ledger.budget_downgrades(),
            ..Default::default()
        };
        // Backends' health and load are known where requests are served: a control plane
        // alone (its data planes remote) has none to report.
        if let Some(dp) = &self.local {
            stats.backends = table
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| pb::BackendStats {
                    name: b.name.to_string(),
                    healthy: snap.states.is_available(i),
                    inflight: u64::from(snap.states.inflight(i)),
                })
                .collect();
            stats.listen_address = dp.address.to_string();
            stats.io_driver = dp.driver.to_string();
            stats.workers = table.listener.workers as u32;
            stats.inflight = dp.shared.inflight() as u64;
            stats.usage_events_dropped += dp.shared.usage.dropped();
            if let Some(c) = &dp.shared.cache {
                stats.cache_entries = c.len() as u64;
                stats.cache_bytes = c.bytes();
                stats.cache_evictions = c.evictions();
            }
        }
        stats.budget_rejected = self.ledger.budget_rejections();
        stats.rate_limited = self.ledger.rate_limited();
        stats.data_planes = self.followers.states();
        stats
    }

    fn remote_dropped(&self) -> u64 {
        let remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        remotes.sequences.values().map(|(_, dropped)| dropped).sum()
    }

    /// The `/metrics` page: counters from the ledger, gauges read now.
    pub fn scrape(&self) -> String {
        let stats = self.stats();
        let budgets = self.budget_report().budgets;
        self.ledger
            .metrics
            .scrape(|m| set_live_gauges(m, &stats, budgets))
    }

    /// Changes the stored keys (`change`) and gives the data plane the new table, one change
    /// at a time: two overlapping ones could publish an older table last (a revoked key
    /// accepted again).
    pub fn change_keys<T>(
        &self,
        change: impl FnOnce(&Store) -> Result<T, String>,
    ) -> Result<T, String> {
        let _one_at_a_time = self.changing_keys.lock().unwrap_or_else(|p| p.into_inner());
        let changed = change(&self.store)?;
        let keys = key_table(&self.store)?;
        if let Some(dp) = &self.local {
            dp.shared.keys.store(Arc::new(keys));
        }
        Ok(changed)
    }

    /// Commits changed spend rows; on failure they stay marked for the next flush.
    /// Remote data planes' sequences are committed in the same transaction as the spend they
    /// produced, so a control plane restarted after a crash neither loses nor recounts a batch.
    pub fn flush(&self) -> Result<(), String> {
        // One flush at a time: two overlapping ones could commit older totals last.
        let _flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let (rows, sequences, remote_spent) = {
            // Held while taking the rows: `record_remote` counts a batch under this lock.
            let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
            let sequences: Vec<(String, u64)> = remotes
                .sequences
                .iter()
                .map(|(name, (last, _))| (name.clone(), *last))
                .collect();
            let spent = std::mem::take(&mut remotes.spent);
            (self.ledger.take_dirty(), sequences, spent)
        };
        if rows.is_empty() {
            return Ok(());
        }
        let saved = self.store.save_spend(
            rows.iter().map(|(k, t)| (k, t)),
            &sequences,
            remote_added(&remote_spent),
        );
        if saved.is_err() {
            self.ledger.mark_dirty(rows.into_iter().map(|(k, _)| k));
            let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
            for (key, added) in remote_spent {
                let spent = remotes.spent.entry(key).or_default();
                *spent = spent.saturating_add(added);
            }
        }
        saved
    }

    /// What each budget has given out today (for a budget that gets a limit mid-day).
    fn spent_today(&self) -> BTreeMap<BudgetKey, u64> {
        let day = self.budgets.day();
        self.already_out(&day).unwrap_or_else(|e| {
            eprintln!("switchyard: budgets: {e}; counting settled spend only");
            self.ledger.spent_by_budget(&day)
        })
    }

    fn changing_budgets(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing_budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or, with `None`, clears) an API-set budget: stored, then in force.
    pub fn set_budget(&self, key: BudgetKey, limit: Option<u64>) -> Result<(), String> {
        let _one_at_a_time = self.changing_budgets();
        self.store.set_budget(&key, limit)?;
        self.budgets.set_override(key, limit, || self.spent_today());
        Ok(())
    }

    /// Puts a config's budget limits in force, then starts a new day if midnight passed.
    fn apply_budget_limits(&self, limits: Limits) {
        let _one_at_a_time = self.changing_budgets();
        self.budgets.set_limits(limits, || self.spent_today());
        self.roll_day_now();
    }

    /// `already_out` of `day`, with remote spend not committed yet. No flush runs meanwhile
    /// (one holds remote spend in neither place while it commits), and the remotes' lock is
    /// held as when their records are counted, so the ledger and their spend agree.
    fn already_out(&self, day: &str) -> Result<BTreeMap<BudgetKey, u64>, String> {
        let _no_flush = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        already_out(&self.ledger, &self.store, &remotes.spent, day)
    }

    /// Starts a new budget day when midnight has passed in the budget time zone.
    fn roll_day(&self) {
        let _one_at_a_time = self.changing_budgets();
        self.roll_day_now();
    }

    /// `roll_day` under `changing_budgets`, held by the caller.
    fn roll_day_now(&self) {
        let today = self.today();
        if today != self.budgets.day() {
            match self.already_out(&today) {
                Ok(out) => self.budgets.start_day(today, out),
                Err(e) => eprintln!("switchyard: new budget day: {e}"),
            }
        }
    }

    /// Applies the config file again (SIGHUP, or the file changed).
    fn reload(&self, path: &Path, source: &str) {
        let counted = |outcome| {
            let labels = metrics::ReloadLabels { outcome };
            self.ledger
                .metrics
                .config_reloads
                .get_or_create(&labels)
                .inc();
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!(
                    "switchyard: reload ({source}): cannot read {}: {e}",
                    path.display()
                );
                counted("refused");
                return;
            }
        };
        let current = self.configs.current();
        if text == current.toml {
            return;
        }
        let file = path.display().to_string();
        // Read from this file at start, or reloaded from it ("PATH (SIGHUP)").
        let from_file = current
            .source
            .strip_prefix(&file)
            .is_some_and(|how| ["", " (SIGHUP)", " (file changed)"].contains(&how));
        match self.configs.apply(text, &format!("{file} ({source})")) {
            // The file wins on reload, over a config applied another way (the API): said so.
            Ok(v) if !from_file => {
                eprintln!(
                    "switchyard: reload ({source}): config version {v} in effect, replacing version {} from {}",
                    current.version, current.source
                );
                counted("applied");
            }
            Ok(v) => {
                eprintln!("switchyard: reload ({source}): config version {v} in effect");
                counted("applied");
            }
            Err(errors) => {
                eprintln!("switchyard: reload ({source}) refused; the running config stays:");
                for e in errors {
                    eprintln!("  {e}");
                }
                counted("refused");
            }
        }
    }
}

/// What `serve` starts from.
pub struct Start {
    pub toml: String,
    /// A file path, or a label such as `<demo config>`.
    pub source: String,
    /// The config file to reload on SIGHUP and on change (none for the demo).
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Where the admin token came from, for the banner.
pub enum TokenSource {
    Env(String),
    /// Generated (or found from an earlier run) in this file.
    File(PathBuf),
}

/// What the banner shows once everything listens.
pub struct Ready<'a> {
    /// `None` when this process runs only the control plane.
    pub dataplane: Option<&'a DataPlane>,
    pub config_version: u64,
    pub admin: Option<(SocketAddr, TokenSource)>,
}

/// A token from the environment variable `name`, trimmed (a secret mounted from a file
/// usually ends in a newline); `None` when unset or blank.
pub fn token_from_env(name: &str) -> Option<String> {
    let token = std::env::var(name).ok()?;
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// The admin token: from the environment variable the config names, else from (or newly
/// written to) `<data_dir>/admin-token`, readable only by this user.
pub fn admin_token(env_name: &str, data_dir: &Path) -> Result<(String, TokenSource), String> {
    if let Some(t) = token_from_env(env_name) {
        return Ok((t, TokenSource::Env(env_name.to_string())));
    }
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            return Ok((t.trim().to_string(), TokenSource::File(path)));
        }
        // Empty (a start cut short between creating and writing it): written anew.
        Ok(_) => {
            let _ = std::fs::remove_file(&path);
        }
        Err(_) => {}
    }
    let token = random_hex(24)?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(token.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((token, TokenSource::File(path)))
}

/// What each budget has already given out on `day`: the spend settled so far, where the part
/// remote data planes spent counts as what they were granted when that is more (a grant is
/// spent, or held, by them). `remote_uncommitted`: remote spend not in the store yet.
fn already_out(
    ledger: &Ledger,
    store: &Store,
    remote_uncommitted: &RemoteSpent,
    day: &str,
) -> Result<BTreeMap<BudgetKey, u64>, String> {
    let mut out = ledger.spent_by_budget(day);
    let mut by_remotes = store.remote_spent_on(day)?;
    for ((d, service, scope), added) in remote_uncommitted {
        if d == day {
            let spent = by_remotes.entry((service.to_string(), *scope)).or_default();
            *spent = spent.saturating_add(*added);
        }
    }
    for (key, granted) in store.granted_on(day)? {
        let remote = by_remotes.get(&key).copied().unwrap_or(0);
        let spent = out.entry(key).or_default();
        *spent = spent
            .saturating_sub(remote)
            .saturating_add(remote.max(granted));
    }
    Ok(out)
}

/// Remote spend as the store takes it: (day, service, category or none, micro-dollars).
fn remote_added(spent: &RemoteSpent) -> impl Iterator<Item = (&str, &str, Option<Category>, u64)> {
    spent
        .iter()
        .map(|((day, service, scope), added)| (day.as_str(), service.as_str(), *scope, *added))
}

/// The gauges of live state: config version, requests in flight, cache, backends, budgets.
fn set_live_gauges(m: &metrics::Metrics, stats: &pb::Stats, budgets: Vec<pb::Budget>) {
    m.config_version.set(stats.config_version as i64);
    m.inflight.set(stats.inflight as i64);
    m.usage_dropped.set(stats.usage_events_dropped as i64);
    m.cache_entries.set(stats.cache_entries as i64);
    m.cache_bytes.set(stats.cache_bytes as i64);
    m.cache_evictions.set(stats.cache_evictions as i64);
    for b in &stats.backends {
        let labels = metrics::BackendLabels {
            backend: b.name.clone(),
        };
        m.backend_healthy
            .get_or_create(&labels)
            .set(i64::from(b.healthy));
        m.backend_inflight
            .get_or_create(&labels)
            .set(b.inflight as i64);
    }
    for b in budgets {
        let labels = metrics::BudgetLabels {
            service: b.service,
            category: b.category,
        };
        m.budget_remaining.get_or_create(&labels).set(
            (i128::from(b.daily_micros) - i128::from(b.spent_micros))
                .clamp(i64::MIN.into(), i64::MAX.into()) as i64,
        );
    }
}

/// `n` random bytes from the kernel, as hex: admin tokens and API keys.
pub fn random_hex(n: usize) -> Result<String, String> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn key_table(store: &Store) -> Result<KeyTable, String> {
    Ok(KeyTable::new(store.load_keys()?.into_iter().map(|k| {
        let grant = KeyGrant {
            service: k.service.into(),
            any_service: k.any_service,
        };
        (k.hash, grant)
    })))
}

/// Runs both planes (`local`) or only the control plane until SIGTERM/SIGINT; returns the
/// process exit code. `on_ready` runs once everything listens (the CLI prints its banner there).
pub fn serve(start: Start, local: bool, on_ready: impl FnOnce(&Ready)) -> i32 {
    match run(start, local, Box::new(on_ready)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("switchyard: {e}");
            1
        }
    }
}

/// The control plane's tokio runtime: one thread is plenty for its work.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("switchyard-control")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control plane runtime: {e}"))
}

/// Not generic (the callback is boxed), so it and the usage consumer it starts are compiled in
/// this crate, at its optimisation level, not in the binary's size-optimised one.
fn run(start: Start, local: bool, on_ready: Box<dyn FnOnce(&Ready) + '_>) -> Result<(), String> {
    // Taken now, before anything can edit the file after it was read.
    let file_stamp = start.file.as_deref().and_then(stamp);
    let runtime = runtime()?;
    let shutdown = Shutdown::listen(&runtime)?;
    let hangup = match &start.file {
        Some(_) => Some(listen_for(&runtime, SignalKind::hangup())?),
        None => None,
    };
    // Read once for the store's place, then dropped: it holds its own classifier (~1.3 MB).
    let data_dir = config::load_str(&start.toml, &start.source, &|n| std::env::var(n).ok())
        .map_err(|errors| errors.join("\n"))?
        .data_dir;
    let store = Store::open(&data_dir)?;
    let version = store.last_config()?.map_or(0, |r| r.version) + 1;
    let configs = Configs::start(start.toml, &start.source, version, start.overrides, false)
        .map_err(|errors| errors.join("\n"))?;
    store.save_config(&configs.current())?;
    let snapshot = configs.snapshot().clone();
    let table = &snapshot.load().table;
    let ledger = Ledger::with_spend(store.load_spend()?);
    let today = table.budgets.day_of(jiff::Timestamp::now());
    let budgets = Arc::new(BudgetBook::new(
        today.clone(),
        Limits::from_settings(&table.budgets),
    ));
    for (key, limit) in store.load_budgets()? {
        // `start_day` below seeds every pool with what was spent today.
        budgets.set_override(key, Some(limit), BTreeMap::new);
    }
    let out = already_out(&ledger, &store, &BTreeMap::new(), &today)?;
    budgets.start_day(today.clone(), out);
    let log_events = table.usage.log_events;
    let drain_timeout = table.listener.drain_timeout;
    let admin = table.admin.clone();
    let keys = key_table(&store)?;
    if table.auth_required && keys.is_empty() {
        eprintln!("switchyard: auth.required is on and no API key exists yet: create one with `switchyard keys create SERVICE`");
    }
    let (dataplane, events) = if local {
        let (usage, events) = UsageSink::channel(table.usage.channel_capacity);
        let dp = server::start(snapshot.clone(), usage, budgets.clone(), keys)
            .map_err(|e| e.to_string())?;
        (Some(dp), Some(events))
    } else {
        (None, None)
    };
    let remotes = Remotes::from_store(&store)?;
    let cp = Arc::new(ControlPlane {
        configs,
        ledger,
        budgets,
        store,
        local: dataplane,
        started: Instant::now(),
        remotes: Mutex::new(remotes),
        followers: Default::default(),
        flushing: Mutex::default(),
        changing_budgets: Mutex::default(),
        changing_keys: Mutex::default(),
        usage_stop: AtomicBool::new(false),
    });
    let mut consumer_done = None;
    if let Some(events) = events {
        let consumer = cp.clone();
        // On a blocking thread of the runtime: the channel is crossbeam, fed from non-tokio
        // threads.
        consumer_done = Some(runtime.spawn_blocking(move || {
            let days = consumer.clone();
            let workers = consumer.local.as_ref().map(|dp| dp.shared.clone());
            consumer.ledger.consume(
                events,
                log_events,
                USAGE_DRAIN_PERIODS,
                move || days.today(),
                move || workers.as_ref().is_some_and(|w| w.inflight() > 0),
                &consumer.usage_stop,
            )
        }));
    }
    let flusher = cp.clone();
    // The store's commits wait for the disk: a blocking thread too.
    runtime.spawn_blocking(move || loop {
        std::thread::sleep(FLUSH_PERIOD);
        if let Err(e) = flusher.flush() {
            eprintln!("switchyard: {e}; will retry");
        }
    });
    let admin_info = match admin.address {
        None => None,
        Some(address) => {
            if !address.ip().is_loopback() {
                eprintln!("switchyard: warning: the admin API on {address} is reachable from the network and speaks plaintext: keep it on a private network (its token can change routing and budgets)");
            }
            let (token, token_source) = admin_token(&admin.token_env, &data_dir)?;
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(address))
                .map_err(|e| format!("admin listener: cannot listen on {address}: {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            let api_cp = cp.clone();
            let tokens = api::Tokens {
                admin: token.into(),
                data_plane: token_from_env(&admin.data_plane_token_env).map(Into::into),
            };
            runtime.spawn(async move {
                let never = std::future::pending::<()>();
                if let Err(e) = api::serve(listener, api_cp, tokens, never).await {
                    eprintln!("switchyard: {e}");
                }
            });
            Some((bound, token_source))
        }
    };
    runtime.spawn(follow_configs(cp.clone()));
    runtime.spawn(tick(cp.clone(), start.file.clone(), file_stamp));
    if let (Some(file), Some(hangup)) = (start.file, hangup) {
        runtime.spawn(reload_on_sighup(cp.clone(), file, hangup));
    }
    on_ready(&Ready {
        dataplane: cp.local.as_ref(),
        config_version: cp.configs.current().version,
        admin: admin_info,
    });
    // Start-up freed more than it keeps (the first config read's classifier, the builders'
    // intermediate automata): give those pages back rather than hold them while idle.
    trim::release_free_memory();
    runtime.block_on(drain_on_signal(shutdown, cp.local.as_ref(), drain_timeout));
    // The requests are done (or cut): their usage events are all sent. The consumer records
    // them and stops, so that the flush below saves all of their spend.
    cp.usage_stop
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(done) = consumer_done {
        // The timeout is made inside the runtime (its timer needs one).
        let waited =
            runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), done).await });
        if waited.is_err() {
            eprintln!("switchyard: usage of the last requests not recorded within 5 s");
        }
    }
    if let Err(e) = cp.flush() {
        eprintln!("switchyard: the spend of the last seconds before exit is not saved: {e}");
    }
    let dropped = cp.local.as_ref().map_or(0, |dp| dp.shared.usage.dropped());
    eprintln!("{}", cp.ledger.summary(dropped));
    if let Some(cache) = cp.local.as_ref().and_then(|dp| dp.shared.cache.as_ref()) {
        eprintln!(
            "switchyard: response cache: {} entries, {} bytes, {} evicted",
            cache.len(),
            cache.bytes(),
            cache.evictions()
        );
    }
    // The consumer blocks on a channel the (still running) workers hold: do not wait for it.
    runtime.shutdown_background();
    Ok(())
}

/// Waits for SIGTERM/SIGINT, then lets the data plane's requests in flight finish (up to
/// `drain_timeout`); a second signal exits at once.
pub(crate) async fn drain_on_signal(
    mut shutdown: Shutdown,
    dataplane: Option<&DataPlane>,
    drain_timeout: Duration,
) {
    shutdown.next().await;
    tokio::spawn(async move {
        let signal = shutdown.next().await;
        eprintln!("switchyard: second signal: exiting now");
        // As a process the signal killed would (130 for SIGINT, 143 for SIGTERM).
        std::process::exit(128 + signal);
    });
    let Some(dataplane) = dataplane else {
        eprintln!("switchyard: shutting down");
        return;
    };
    eprintln!("switchyard: shutting down: draining requests in flight (up to {drain_timeout:?}; signal again to exit now)");
    dataplane.begin_drain();
    let left = in_flight_after(dataplane, drain_timeout).await;
    if left > 0 {
        // Ended rather than cut off by the exit: each caller gets an error (a last SSE event
        // for a stream) and each request its usage event, counted in the spend saved below.
        eprintln!("switchyard: drain deadline passed with {left} requests in flight; ending them");
        dataplane.cut_in_flight();
        let left = in_flight_after(dataplane, CUT_GRACE).await;
        if left > 0 {
            eprintln!("switchyard: {left} requests did not end within {CUT_GRACE:?}; exiting");
        }
    }
}

/// The requests still in flight once they are all done or `wait` has passed.
async fn in_flight_after(dataplane: &DataPlane, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    while dataplane.shared.inflight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dataplane.shared.inflight()
}

/// How long requests cut at the drain deadline get to tell their callers and record usage
/// (a wait on the caller's socket ends within a quarter second, `BODY_WATCH_DELAY`).
const CUT_GRACE: Duration = Duration::from_secs(2);

/// Each applied config: recorded in the store, its budget limits put in force.
async fn follow_configs(cp: Arc<ControlPlane>) {
    let mut changes = cp.configs.subscribe();
    let mut saved_up_to = changes.borrow().version;
    while changes.changed().await.is_ok() {
        let newest = changes.borrow_and_update().version;
        let from = saved_up_to + 1;
        saved_up_to = newest;
        let cp = cp.clone();
        // Off the runtime thread: the history's lock is held while a config validates, and
        // the store and today's spend (read only when the limits changed) wait for the disk.
        let _ = tokio::task::spawn_blocking(move || {
            // The channel keeps only the newest: versions applied in between come from the
            // history, each saved on its own.
            for record in (from..=newest).filter_map(|v| cp.configs.version(v)) {
                if let Err(e) = cp.store.save_config(&record) {
                    eprintln!("switchyard: config version {}: {e}", record.version);
                }
            }
            let snapshot = cp.configs.snapshot().load();
            cp.apply_budget_limits(Limits::from_settings(&snapshot.table.budgets));
        })
        .await;
    }
}

/// Once a second: a new budget day after midnight, and a reload when the config file changed.
/// What tells a changed config file: its modification time and length.
type FileStamp = Option<(Option<std::time::SystemTime>, u64)>;

fn stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().ok(), m.len()))
}

/// `seen`: the file's stamp when the config in effect was read from it.
async fn tick(cp: Arc<ControlPlane>, file: Option<PathBuf>, mut seen: FileStamp) {
    loop {
        tokio::time::sleep(TICK).await;
        let roller = cp.clone();
        let _ = tokio::task::spawn_blocking(move || roller.roll_day()).await;
        if let Some(path) = &file {
            let now = stamp(path);
            if now != seen {
                seen = now;
                let cp = cp.clone();
                let path = path.clone();
                let _ = tokio::task::spawn_blocking(move || cp.reload(&path, "file changed")).await;
            }
        }
    }
}

async fn reload_on_sighup(cp: Arc<ControlPlane>, file: PathBuf, mut hangup: Signal) {
    while hangup.recv().await.is_some() {
        let cp = cp.clone();
        let file = file.clone();
        let _ = tokio::task::spawn_blocking(move || cp.reload(&file, "SIGHUP")).await;
    }
}

/// Takes over a signal's default action (for SIGTERM, SIGINT and SIGHUP: ending the process)
/// from now on. Done at start, before anything listens: a signal sent as soon as the process
/// answers, or a second one sent while the first is handled, is then never missed.
fn listen_for(runtime: &tokio::runtime::Runtime, kind: SignalKind) -> Result<Signal, String> {
    let _in_runtime = runtime.enter();
    signal(kind).map_err(|e| format!("cannot handle signal {}: {e}", kind.as_raw_value()))
}

/// SIGTERM and SIGINT: each asks for a drain (a second one, for an exit now).
pub(crate) struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    pub(crate) fn listen(runtime: &tokio::runtime::Runtime) -> Result<Shutdown, String> {
        Ok(Shutdown {
            term: listen_for(runtime, SignalKind::terminate())?,
            int: listen_for(runtime, SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT; returns its number.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.int.recv() => libc::SIGINT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control_plane(dir: &Path) -> ControlPlane {
        let toml = format!(
            "[storage]\ndata_dir = \"{}\"\n[[backends]]\nname = \"b\"\nurl = \"http://127.0.0.1:9\"\nmodels = [{{ name = \"m\" }}]\n[[tiers]]\nname = \"small\"\ntargets = [\"b/m\"]\n",
            dir.display()
        );
        let store = Store::open(dir).unwrap();
        let remotes = Remotes::from_store(&store).unwrap();
        ControlPlane {
            configs: Configs::start(toml, "test", 1, Box::new(|_| {}), false).unwrap(),
            ledger: Ledger::with_spend(store.load_spend().unwrap()),
            budgets: Arc::new(BudgetBook::new("2026-11-27".into(), Limits::default())),
            store,
            local: None,
            started: Instant::now(),
            remotes: Mutex::new(remotes),
            followers: Default::default(),
            flushing: Mutex::default(),
            changing_budgets: Mutex::default(),
            changing_keys: Mutex::default(),
            usage_stop: AtomicBool::new(false),
        }
    }

    fn batch(instance: &str, first_sequence: u64, n: usize) -> pb::UsageBatch {
        let record = pb::UsageRecord {
            request_id: "01".into(),
            service: "etl".into(),
            endpoint: "/v1/chat/completions".into(),
            category: "chat".into(),
            status: 200,
            cost_micros: 10,
            unix_ms: jiff::Timestamp::now().as_millisecond(),
            ..Default::default()
        };
        pb::UsageBatch {
            data_plane: "dp1".into(),
            instance: instance.into(),
            first_sequence,
            records: vec![record; n],
            dropped: 0,
        }
    }

    fn counts(r: pb::ReportUsageReply) -> (u64, u64, u64) {
        (r.accepted, r.duplicates, r.rejected)
    }

    #[test]
    fn a_resent_batch_is_counted_once_even_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("switchyard-remote-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let cp = control_plane(&dir);
            assert_eq!(counts(cp.record_remote(batch("a", 1, 3))), (3, 0, 0));
            assert_eq!(
                counts(cp.record_remote(batch("a", 1, 3))),
                (0, 3, 0),
                "resent"
            );
            assert_eq!(
                counts(cp.record_remote(batch("a", 3, 2))),
                (1, 1, 0),
                "overlapping"
            );
            cp.flush().unwrap();
        }
        let cp = control_plane(&dir);
        assert_eq!(
            counts(cp.record_remote(batch("a", 1, 4))),
            (0, 4, 0),
            "after a restart"
        );
        // The same data plane restarted: a new instance counts from 1 again.
        assert_eq!(counts(cp.record_remote(batch("b", 1, 2))), (2, 0, 0));
        assert_eq!(cp.ledger.totals()["etl"].requests, 6);
        let mut bad = batch("b", 3, 2);
        bad.records[0] = pb::UsageRecord::default();
        assert_eq!(
            counts(cp.record_remote(bad)),
            (1, 0, 1),
            "skipped, not blocking"
        );
        assert_eq!(counts(cp.record_remote(batch("b", 3, 2))), (0, 2, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_remotes_were_granted_counts_on_top_of_local_spend_across_a_restart() {
        let dir = std::env::temp_dir().join(format!("switchyard-granted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let etl = ("etl".to_string(), None);
        {
            let cp = control_plane(&dir);
            let day = cp.today();
            // This process's data plane spent 50; a remote one was granted 40 and spent 30.
            let local = switchyard_shared::usage::UsageEvent {
                service: "etl".into(),
                cost_micros: 50,
                ..Default::default()
            };
            cp.ledger.record(&local, &day);
            cp.store.add_granted(&day, &etl, 40).unwrap();
            cp.record_remote(batch("a", 1, 3));
            assert_eq!(cp.already_out(&day).unwrap()[&etl], 90, "before a commit");
            cp.flush().unwrap();
            assert_eq!(cp.already_out(&day).unwrap()[&etl], 90, "after it");
        }
        let cp = control_plane(&dir);
        let day = cp.today();
        assert_eq!(cp.already_out(&day).unwrap()[&etl], 90, "after a restart");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
