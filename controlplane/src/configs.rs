//! Live configuration. Owns: the config in effect and its history, validation of a new one
//! (the same for ApplyConfig, SIGHUP and the file watch), and publishing the new routing
//! snapshot that every worker picks up on its next request.
//! Must not: let a config with errors replace the running one, or change what only a restart
//! can change (listeners, workers, cache size) while pretending it took effect.

use arc_swap::ArcSwap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use switchyard_dataplane::snapshot::{tls_configs, SharedSnapshot, Snapshot};
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
        let mut table = load(&toml, source, &overrides)?;
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
        let mut table = load(toml, source, &self.overrides)?;
        let mut errors: Vec<String> = tls_configs(&table)
            .err()
            .map(|e| format!("{source}: {e}"))
            .into_iter()
            .collect();
        let changed = restart_only(&self.snapshot.load().table, &mut table, false);
        errors.extend(
            changed.into_iter().map(|key| {
                format!("{source}: {key}: cannot change while running; restart to apply")
            }),
        );
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    /// Validates and publishes; returns the new version. On error the running config stays.
    pub fn apply(&self, toml: String, source: &str) -> Result<u64, Vec<String>> {
        let mut history = self.history();
        let table = self.validate(&toml, source)?;
        let version = history.back().map_or(0, |r| r.version) + 1;
        self.publish(&mut history, table, toml, source, version)
    }

    /// A remote data plane's `apply` of the control plane's config `version`. Settings only a
    /// restart can change keep their running values here (this process started with them,
    /// and refusing would leave it on stale routing for good); the ones that differ are
    /// returned, to be told.
    pub fn follow(
        &self,
        toml: String,
        source: &str,
        version: u64,
    ) -> Result<Vec<&'static str>, Vec<String>> {
        let mut history = self.history();
        let mut table = load(&toml, source, &self.overrides)?;
        let kept = restart_only(&self.snapshot.load().table, &mut table, true);
        self.publish(&mut history, table, toml, source, version)?;
        Ok(kept)
    }

    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<ConfigRecord>>> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(
        &self,
        history: &mut VecDeque<Arc<ConfigRecord>>,
        mut table: RoutingTable,
        toml: String,
        source: &str,
        version: u64,
    ) -> Result<u64, Vec<String>> {
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

/// `toml` as a table, with the command line's overrides.
fn load(toml: &str, source: &str, overrides: &Overrides) -> Result<RoutingTable, Vec<String>> {
    let mut table = config::load_str(toml, source, &|name| std::env::var(name).ok())?;
    overrides(&mut table);
    Ok(table)
}

/// Settings read once at start: a reload that changes them is refused instead of half-applied
/// (or, with `keep_running`, given their running values). Returns the keys `new` changes.
fn restart_only(
    old: &RoutingTable,
    new: &mut RoutingTable,
    keep_running: bool,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! setting {
        ($key:literal, $($field:ident).+) => {
            if old.$($field).+ != new.$($field).+ {
                changed.push($key);
                if keep_running {
                    new.$($field).+ = old.$($field).+.clone();
                }
            }
        };
    }
    setting!("listener.address", listener.address);
    setting!("listener.workers", listener.workers);
    setting!("listener.io_driver", listener.io_driver);
    setting!("cache.enabled", cache.enabled);
    setting!("cache.max_bytes", cache.max_bytes);
    setting!("usage.channel_capacity", usage.channel_capacity);
    setting!("usage.log_events", usage.log_events);
    setting!("listener.drain_timeout_ms", listener.drain_timeout);
    setting!("admin", admin);
    setting!("storage.data_dir", data_dir);
    changed
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

    #[test]
    fn a_follower_applies_the_rest_and_keeps_its_restart_only_settings() {
        let c = configs();
        let changed = BASE.replace("127.0.0.1:0", "127.0.0.1:1").replace(
            "[[tiers]]",
            "[cache]\nmax_bytes = 1048576\n[routing]\nmax_attempts = 5\n[[tiers]]",
        );
        assert_eq!(
            c.follow(changed, "control plane", 12),
            Ok(vec!["listener.address", "cache.max_bytes"])
        );
        let snap = c.snapshot().load();
        assert_eq!(snap.table.version, 12);
        assert_eq!(snap.table.max_attempts, 5);
        assert_eq!(snap.table.listener.address.to_string(), "127.0.0.1:0");
        assert_ne!(snap.table.cache.max_bytes, 1048576);
        let errors = c.follow(BASE.replace("b/m", "b/nope"), "control plane", 13);
        assert!(errors.is_err(), "other errors still refuse");
        assert_eq!(c.current().version, 12);
    }
}
