//! Live configuration. Owns: the config in effect and its history, validation of a new one
//! (the same for ApplyConfig, SIGHUP and the file watch), and publishing the new routing
//! snapshot that every worker picks up on its next request.
//! Must not: let a config with errors replace the running one, or change what only a restart
//! can change (listeners, workers, cache size) while pretending it took effect.

use arc_swap::ArcSwap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use switchyard_dataplane::snapshot::{SharedSnapshot, Snapshot};
use switchyard_shared::config;
use switchyard_shared::routing::RoutingTable;
use tokio::sync::watch;

/// Applied configs kept for `GetConfig(version)`.
const HISTORY: usize = 32;

/// One applied config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRecord {
    pub version: u64,
    pub toml: String,
    pub source: String,
    pub applied_unix_ms: i64,
}

/// Changes made to every table after it is loaded (the command line's `--listen`, `--workers`).
pub type Overrides = Box<dyn Fn(&mut RoutingTable) + Send + Sync>;

pub struct Configs {
    snapshot: SharedSnapshot,
    overrides: Overrides,
    /// Newest last; serialises applies, so versions are handed out in order.
    history: Mutex<VecDeque<Arc<ConfigRecord>>>,
    published: watch::Sender<Arc<ConfigRecord>>,
}

pub fn now_unix_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl Configs {
    /// Loads the first config. `version` continues the numbering of earlier runs.
    /// `granted_limits`: a remote data plane's (rate-limit allowance is granted, not timed).
    pub fn start(
        toml: String,
        source: &str,
        version: u64,
        overrides: Overrides,
        granted_limits: bool,
    ) -> Result<Configs, Vec<String>> {
        let mut table = load(&toml, source)?;
        overrides(&mut table);
        table.version = version;
        let snapshot = Arc::new(ArcSwap::from_pointee(
            Snapshot::new(table, granted_limits).map_err(|e| vec![e])?,
        ));
        let record = Arc::new(ConfigRecord {
            version,
            toml,
            source: source.to_string(),
            applied_unix_ms: now_unix_ms(),
        });
        let (published, _) = watch::channel(record.clone());
        Ok(Configs {
            snapshot,
            overrides,
            history: Mutex::new(VecDeque::from([record])),
            published,
        })
    }

    pub fn snapshot(&self) -> &SharedSnapshot {
        &self.snapshot
    }

    pub fn current(&self) -> Arc<ConfigRecord> {
        self.published.borrow().clone()
    }

    pub fn version(&self, version: u64) -> Option<Arc<ConfigRecord>> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.iter().find(|r| r.version == version).cloned()
    }

    /// Every config applied from now on, starting with the one in effect.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigRecord>> {
        self.published.subscribe()
    }

    /// The table `toml` would produce, or every error in it (restart-only changes included).
    pub fn validate(&self, toml: &str, source: &str) -> Result<RoutingTable, Vec<String>> {
        let mut table = load(toml, source)?;
        (self.overrides)(&mut table);
        let errors = restart_only_changes(&self.snapshot.load().table, &table, source);
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// Validates and publishes; returns the new version. On error the running config stays.
    pub fn apply(&self, toml: String, source: &str) -> Result<u64, Vec<String>> {
        self.apply_as(toml, source, None)
    }

    /// `apply` with the version a remote control plane gave the config (`None`: the next one).
    pub fn apply_as(
        &self,
        toml: String,
        source: &str,
        version: Option<u64>,
    ) -> Result<u64, Vec<String>> {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let mut table = self.validate(&toml, source)?;
        let version = version.unwrap_or_else(|| history.back().map_or(0, |r| r.version) + 1);
        table.version = version;
        let next = Snapshot::replacing(table, &self.snapshot.load()).map_err(|e| vec![e])?;
        self.snapshot.store(Arc::new(next));
        let record = Arc::new(ConfigRecord {
            version,
            toml,
            source: source.to_string(),
            applied_unix_ms: now_unix_ms(),
        });
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(record.clone());
        self.published.send_replace(record);
        Ok(version)
    }
}

fn load(toml: &str, source: &str) -> Result<RoutingTable, Vec<String>> {
    config::load_str(toml, source, &|name| std::env::var(name).ok())
}

/// Settings read once at start: changing them needs a restart, so a reload that changes them
/// is refused instead of half-applied.
fn restart_only_changes(old: &RoutingTable, new: &RoutingTable, source: &str) -> Vec<String> {
    let checks = [
        (
            "listener.address",
            old.listener.address == new.listener.address,
        ),
        (
            "listener.workers",
            old.listener.workers == new.listener.workers,
        ),
        (
            "listener.io_driver",
            old.listener.io_driver == new.listener.io_driver,
        ),
        ("cache.enabled", old.cache.enabled == new.cache.enabled),
        (
            "cache.max_bytes",
            old.cache.max_bytes == new.cache.max_bytes,
        ),
        (
            "usage.channel_capacity",
            old.usage.channel_capacity == new.usage.channel_capacity,
        ),
        (
            "usage.log_events",
            old.usage.log_events == new.usage.log_events,
        ),
        (
            "listener.drain_timeout_ms",
            old.listener.drain_timeout == new.listener.drain_timeout,
        ),
        ("admin", old.admin == new.admin),
        ("storage.data_dir", old.data_dir == new.data_dir),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| format!("{source}: {key}: cannot change while running; restart to apply"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listener]
address = "127.0.0.1:0"
workers = 1
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
models = [{ name = "m" }]
[[tiers]]
name = "small"
targets = ["b/m"]
"#;

    fn configs() -> Configs {
        Configs::start(
            BASE.into(),
            "test.toml",
            7,
            Box::new(|t| t.listener.workers = 3),
            false,
        )
        .unwrap()
    }

    #[test]
    fn apply_publishes_a_new_version_and_keeps_history() {
        let c = configs();
        let mut watch = c.subscribe();
        assert_eq!(c.snapshot().load().table.version, 7);
        let changed = BASE.replace("[[tiers]]", "[routing]\nmax_attempts = 5\n[[tiers]]");
        assert_eq!(c.apply(changed.clone(), "api"), Ok(8));
        let snap = c.snapshot().load();
        assert_eq!((snap.table.version, snap.table.max_attempts), (8, 5));
        assert_eq!(
            snap.table.listener.workers, 3,
            "overrides apply to every reload"
        );
        assert!(watch.has_changed().unwrap());
        assert_eq!(watch.borrow_and_update().version, 8);
        assert_eq!(c.version(7).unwrap().toml, BASE);
        assert_eq!(c.current().toml, changed);
    }

    #[test]
    fn a_config_with_errors_never_replaces_the_running_one() {
        let c = configs();
        let bad = BASE.replace("b/m", "b/nope") + "\n[cache]\nmax_bytes = 1\n";
        let errors = c.apply(bad, "api").unwrap_err();
        assert!(errors.len() >= 2, "every error at once: {errors:?}");
        let moved = BASE.replace("127.0.0.1:0", "127.0.0.1:1");
        let errors = c.apply(moved, "api").unwrap_err();
        assert_eq!(
            errors,
            vec!["api: listener.address: cannot change while running; restart to apply"]
        );
        assert_eq!(c.snapshot().load().table.version, 7);
        assert_eq!(c.current().version, 7);
    }
}
