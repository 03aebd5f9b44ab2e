//! Persistence: spend per day, budgets set through the API, API keys and applied configs, in
//! one crash-safe redb file in the data directory. Every commit is durable when it returns
//! (redb's immediate durability), so after `kill -9` the store holds what the last flush wrote.
//! Must not: be written from the data plane; the ledger flushes changed rows in small batches.

use crate::configs::ConfigRecord;
use crate::ledger::{SpendKey, SpendTotals};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use switchyard_dataplane::budget::BudgetKey;
use switchyard_shared::category::Category;

/// (day, service, category, tier, model) -> the totals as [`SpendTotals::to_array`].
const SPEND: TableDefinition<(&str, &str, &str, &str, &str), [u64; 8]> =
    TableDefinition::new("spend");
/// (service, category or "") -> daily micro-dollars set through SetBudget.
const BUDGETS: TableDefinition<(&str, &str), u64> = TableDefinition::new("budgets");
/// version -> (toml, source, applied unix ms).
const CONFIGS: TableDefinition<u64, (&str, &str, i64)> = TableDefinition::new("configs");
/// SHA-256 of an API key -> (service, may act for other services, created unix ms).
const API_KEYS: TableDefinition<[u8; 32], (&str, bool, i64)> = TableDefinition::new("api_keys");
/// (day, service, category or "") -> micro-dollars of that budget granted to remote data
/// planes that day, so a restarted control plane does not grant them again.
const GRANTS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("grants");
/// (day, service, category or "") -> micro-dollars of that budget spent by remote data planes
/// (their spend is in SPEND too; a restarted control plane counts what it granted them instead).
const REMOTE_SPEND: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("remote_spend");
/// remote data plane name -> the last usage sequence counted from it.
const SEQUENCES: TableDefinition<&str, u64> = TableDefinition::new("sequences");

pub struct Store {
    db: Database,
}

/// An API key as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub hash: [u8; 32],
    pub service: String,
    pub any_service: bool,
    pub created_unix_ms: i64,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("data store: {e}")
}

impl Store {
    /// Opens (or creates) `<data_dir>/switchyard.redb`.
    pub fn open(data_dir: &Path) -> Result<Store, String> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", data_dir.display()))?;
        let path = data_dir.join("switchyard.redb");
        let db = Database::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let store = Store { db };
        // Create every table, so readers never meet a missing one.
        let txn = store.db.begin_write().map_err(err)?;
        txn.open_table(SPEND).map_err(err)?;
        txn.open_table(BUDGETS).map_err(err)?;
        txn.open_table(CONFIGS).map_err(err)?;
        txn.open_table(API_KEYS).map_err(err)?;
        txn.open_table(SEQUENCES).map_err(err)?;
        txn.open_table(GRANTS).map_err(err)?;
        txn.open_table(REMOTE_SPEND).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(store)
    }

    /// Writes the given spend rows (whole totals, so writing a row twice is harmless) and,
    /// in the same transaction, the remote data planes' usage sequences they include and what
    /// those added to each budget's remote spend (`remote_added`, per day and budget).
    pub fn save_spend<'a>(
        &self,
        rows: impl IntoIterator<Item = (&'a SpendKey, &'a SpendTotals)>,
        sequences: &[(String, u64)],
        remote_added: impl IntoIterator<Item = (&'a str, &'a str, Option<Category>, u64)>,
    ) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(SEQUENCES).map_err(err)?;
            for (name, last) in sequences {
                t.insert(name.as_str(), *last).map_err(err)?;
            }
        }
        {
            let mut t = txn.open_table(REMOTE_SPEND).map_err(err)?;
            for (day, service, scope, added) in remote_added {
                let k = (day, service, Category::scope_name(scope));
                let before = t.get(k).map_err(err)?.map_or(0, |v| v.value());
                t.insert(k, before.saturating_add(added)).map_err(err)?;
            }
        }
        {
            let mut t = txn.open_table(SPEND).map_err(err)?;
            for (k, v) in rows {
                let key = (
                    k.day.as_str(),
                    k.service.as_str(),
                    k.category.as_str(),
                    &*k.tier,
                    &*k.model,
                );
                t.insert(key, v.to_array()).map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    }

    pub fn load_spend(&self) -> Result<BTreeMap<SpendKey, SpendTotals>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SPEND).map_err(err)?;
        let mut out = BTreeMap::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (day, service, category, tier, model) = k.value();
            let Some(category) = Category::parse(category) else {
                continue;
            };
            out.insert(
                SpendKey {
                    day: day.to_string(),
                    service: service.to_string(),
                    category,
                    tier: tier.into(),
                    model: model.into(),
                },
                SpendTotals::from_array(v.value()),
            );
        }
        Ok(out)
    }

    /// Adds `amount` to what `key` granted remote data planes on `day`.
    pub fn add_granted(&self, day: &str, key: &BudgetKey, amount: u64) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(GRANTS).map_err(err)?;
            let k = (day, key.0.as_str(), Category::scope_name(key.1));
            let before = t.get(k).map_err(err)?.map_or(0, |v| v.value());
            t.insert(k, before.saturating_add(amount)).map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// Takes back up to `amount` of what `key` granted on `day` (a data plane returned it);
    /// returns how much.
    pub fn sub_granted(&self, day: &str, key: &BudgetKey, amount: u64) -> Result<u64, String> {
        let txn = self.db.begin_write().map_err(err)?;
        let taken = {
            let mut t = txn.open_table(GRANTS).map_err(err)?;
            let k = (day, key.0.as_str(), Category::scope_name(key.1));
            let before = t.get(k).map_err(err)?.map_or(0, |v| v.value());
            let taken = amount.min(before);
            t.insert(k, before - taken).map_err(err)?;
            taken
        };
        txn.commit().map_err(err)?;
        Ok(taken)
    }

    /// What each budget granted remote data planes on `day`.
    pub fn granted_on(&self, day: &str) -> Result<BTreeMap<BudgetKey, u64>, String> {
        self.per_budget_on(GRANTS, day)
    }

    /// What remote data planes spent of each budget on `day` (as committed).
    pub fn remote_spent_on(&self, day: &str) -> Result<BTreeMap<BudgetKey, u64>, String> {
        self.per_budget_on(REMOTE_SPEND, day)
    }

    fn per_budget_on(
        &self,
        table: TableDefinition<(&str, &str, &str), u64>,
        day: &str,
    ) -> Result<BTreeMap<BudgetKey, u64>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(table).map_err(err)?;
        let mut out = BTreeMap::new();
        for row in t.range((day, "", "")..).map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (d, service, category) = k.value();
            if d != day {
                break;
            }
            if let Some(category) = Category::parse_scope(category) {
                out.insert((service.to_string(), category), v.value());
            }
        }
        Ok(out)
    }

    pub fn load_sequences(&self) -> Result<Vec<(String, u64)>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SEQUENCES).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    pub fn set_budget(&self, key: &BudgetKey, limit: Option<u64>) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(BUDGETS).map_err(err)?;
            let k = (key.0.as_str(), Category::scope_name(key.1));
            match limit {
                Some(l) => t.insert(k, l).map(drop),
                None => t.remove(k).map(drop),
            }
            .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    pub fn load_budgets(&self) -> Result<BTreeMap<BudgetKey, u64>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(BUDGETS).map_err(err)?;
        let mut out = BTreeMap::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (service, category) = k.value();
            if let Some(category) = Category::parse_scope(category) {
                out.insert((service.to_string(), category), v.value());
            }
        }
        Ok(out)
    }

    pub fn save_config(&self, r: &ConfigRecord) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(CONFIGS).map_err(err)?;
            t.insert(
                r.version,
                (r.toml.as_str(), r.source.as_str(), r.applied_unix_ms),
            )
            .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// The newest applied config, if any.
    pub fn last_config(&self) -> Result<Option<ConfigRecord>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(CONFIGS).map_err(err)?;
        let last = t.last().map_err(err)?;
        Ok(last.map(|(k, v)| {
            let (toml, source, applied_unix_ms) = v.value();
            ConfigRecord {
                version: k.value(),
                toml: toml.to_string(),
                source: source.to_string(),
                applied_unix_ms,
            }
        }))
    }

    pub fn config(&self, version: u64) -> Result<Option<ConfigRecord>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(CONFIGS).map_err(err)?;
        let found = t.get(version).map_err(err)?;
        Ok(found.map(|v| {
            let (toml, source, applied_unix_ms) = v.value();
            ConfigRecord {
                version,
                toml: toml.to_string(),
                source: source.to_string(),
                applied_unix_ms,
            }
        }))
    }

    pub fn add_key(&self, k: &StoredKey) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(API_KEYS).map_err(err)?;
            t.insert(
                k.hash,
                (k.service.as_str(), k.any_service, k.created_unix_ms),
            )
            .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// Removes the keys with these hashes; returns how many existed.
    pub fn revoke_keys(&self, hashes: &[[u8; 32]]) -> Result<usize, String> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0;
        {
            let mut t = txn.open_table(API_KEYS).map_err(err)?;
            for h in hashes {
                removed += usize::from(t.remove(*h).map_err(err)?.is_some());
            }
        }
        txn.commit().map_err(err)?;
        Ok(removed)
    }

    pub fn load_keys(&self) -> Result<Vec<StoredKey>, String> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(API_KEYS).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (service, any_service, created_unix_ms) = v.value();
            out.push(StoredKey {
                hash: k.value(),
                service: service.to_string(),
                any_service,
                created_unix_ms,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("switchyard-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn everything_survives_a_reopen() {
        let d = dir("reopen");
        let key = SpendKey {
            day: "2026-11-27".into(),
            service: "etl".into(),
            category: Category::Extraction,
            tier: "small".into(),
            model: "m".into(),
        };
        let totals = SpendTotals {
            requests: 3,
            cost_micros: 42,
            ..Default::default()
        };
        let config = ConfigRecord {
            version: 4,
            toml: "x = 1".into(),
            source: "api".into(),
            applied_unix_ms: 9,
        };
        let stored_key = StoredKey {
            hash: [7; 32],
            service: "etl".into(),
            any_service: false,
            created_unix_ms: 1,
        };
        {
            let s = Store::open(&d).unwrap();
            s.save_spend([(&key, &totals)], &[("dp1".into(), 41)], [])
                .unwrap();
            s.set_budget(&("etl".into(), Some(Category::Code)), Some(5))
                .unwrap();
            s.set_budget(&("etl".into(), None), Some(6)).unwrap();
            s.set_budget(&("etl".into(), None), None).unwrap();
            s.save_config(&config).unwrap();
            s.add_key(&stored_key).unwrap();
        }
        let s = Store::open(&d).unwrap();
        assert_eq!(s.load_spend().unwrap(), BTreeMap::from([(key, totals)]));
        assert_eq!(s.load_sequences().unwrap(), vec![("dp1".to_string(), 41)]);
        let etl = ("etl".to_string(), None);
        s.add_granted("2026-11-27", &etl, 5).unwrap();
        s.add_granted("2026-11-27", &etl, 7).unwrap();
        assert_eq!(s.sub_granted("2026-11-27", &etl, 2).unwrap(), 2);
        s.add_granted("2026-11-27", &etl, 2).unwrap();
        assert_eq!(
            s.sub_granted("2026-11-26", &etl, 2).unwrap(),
            0,
            "no more than granted"
        );
        s.add_granted("2026-11-28", &etl, 100).unwrap();
        assert_eq!(
            s.granted_on("2026-11-27").unwrap(),
            BTreeMap::from([(etl, 12)])
        );
        assert_eq!(
            s.load_budgets().unwrap(),
            BTreeMap::from([(("etl".to_string(), Some(Category::Code)), 5)])
        );
        assert_eq!(s.last_config().unwrap(), Some(config.clone()));
        assert_eq!(s.config(4).unwrap(), Some(config));
        assert_eq!(s.load_keys().unwrap(), vec![stored_key]);
        assert_eq!(s.revoke_keys(&[[7; 32], [8; 32]]).unwrap(), 1);
        assert!(s.load_keys().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
