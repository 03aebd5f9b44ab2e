//! The exact response cache. Owns: storing complete successful answers under their canonical
//! key (see `switchyard_shared::cache_key`), bounded by bytes with quick_cache's admission and
//! eviction, TTL checked on every read, and the key bytes kept as a verifier so that a hash
//! collision can never serve another request's answer.
//! Must not: decide what is cacheable (the key and the proxy do).

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_shared::category::Category;
use switchyard_shared::openai::TokenUsage;

/// One stored answer and what is needed to replay and account for it.
pub struct Entry {
    /// The canonical key bytes: compared on every hit.
    key: Box<[u8]>,
    pub stored_at: Instant,
    pub ttl: Duration,
    pub content_type: Box<[u8]>,
    pub body: Box<[u8]>,
    pub usage: TokenUsage,
    /// What the original upstream call cost: a hit saves this much.
    pub cost_micros: u64,
    pub tier: Arc<str>,
    pub backend: Arc<str>,
    pub model: Arc<str>,
}

impl Entry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: Vec<u8>,
        ttl: Duration,
        content_type: &[u8],
        body: &[u8],
        usage: TokenUsage,
        cost_micros: u64,
        tier: Arc<str>,
        backend: Arc<str>,
        model: Arc<str>,
    ) -> Entry {
        Entry {
            key: key.into(),
            stored_at: Instant::now(),
            ttl,
            content_type: content_type.into(),
            body: body.into(),
            usage,
            cost_micros,
            tier,
            backend,
            model,
        }
    }
}

/// Bookkeeping bytes charged per entry beyond its key and body.
const ENTRY_OVERHEAD: u64 = 160;

#[derive(Clone)]
struct ByBytes;

impl Weighter<u64, Arc<Entry>> for ByBytes {
    fn weight(&self, _: &u64, e: &Arc<Entry>) -> u64 {
        e.key.len() as u64 + e.body.len() as u64 + e.content_type.len() as u64 + ENTRY_OVERHEAD
    }
}

/// Counts entries the byte bound pushed out (not TTL removals or replacements): an insert
/// collects the slots it pushed out, and `ResponseCache::put` counts those of other entries.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<u64, Arc<Entry>> for CountEvictions {
    type RequestState = Vec<u64>;
    fn on_evict(&self, evicted: &mut Vec<u64>, slot: u64, _: Arc<Entry>) {
        evicted.push(slot);
    }
}

/// A request answered from the cache before, byte for byte and routed the same way (see
/// `cache_key::request_key`): where its answer is and what routing decided, so the same
/// request again skips parsing, classifying, routing and canonicalising.
pub struct Shortcut {
    /// The request key: compared on every use.
    request: Box<[u8]>,
    pub canonical: Box<[u8]>,
    pub target: usize,
    pub category: Category,
    pub rule: Box<str>,
    pub classifier_rule: Option<&'static str>,
    pub streamed: bool,
    pub caller_wants_usage: bool,
    pub prompt_chars: usize,
    /// Tokens its rate-limit admission counts.
    pub admit_tokens: u64,
}

#[derive(Clone)]
struct ShortcutBytes;

impl Weighter<u64, Arc<Shortcut>> for ShortcutBytes {
    fn weight(&self, _: &u64, s: &Arc<Shortcut>) -> u64 {
        (s.request.len() + s.canonical.len() + s.rule.len()) as u64 + ENTRY_OVERHEAD
    }
}

/// Share of `max_bytes` kept for shortcuts.
const SHORTCUT_SHARE: u64 = 8;

/// One cache for all workers: a shared cache keeps the hit rate of the whole process, which
/// matters more than its lookup cost, since a miss is an LLM call (field notes: 58% vs 45%
/// hit rate against per-core caches on a skewed workload).
pub struct ResponseCache {
    entries: Cache<u64, Arc<Entry>, ByBytes, DefaultHashBuilder, CountEvictions>,
    /// Exact requests -> their answer's key and routing. Bounded on its own, by
    /// `max_bytes / SHORTCUT_SHARE`.
    shortcuts: Cache<u64, Arc<Shortcut>, ShortcutBytes>,
    hash: fn(&[u8]) -> u64,
    evictions: CountEvictions,
}

/// foldhash: half of ahash's time on a 1 KiB key (FIELD-NOTES). The hash only finds the slot
/// (the verifier decides what is served); a seed random per process keeps slots from being
/// computed offline from this source, though foldhash is no keyed cryptographic hash, so a
/// determined caller could still make two keys share a slot (and evict each other).
fn foldhash64(key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static STATE: std::sync::LazyLock<foldhash::fast::RandomState> =
        std::sync::LazyLock::new(Default::default);
    STATE.hash_one(key)
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> ResponseCache {
        ResponseCache::with_hash(max_bytes, foldhash64)
    }

    /// `hash` is replaceable so tests can force collisions.
    pub fn with_hash(max_bytes: u64, hash: fn(&[u8]) -> u64) -> ResponseCache {
        let estimated_items = (max_bytes / 4096).clamp(16, 1 << 20) as usize;
        let evictions = CountEvictions::default();
        let shortcut_bytes = max_bytes / SHORTCUT_SHARE;
        let entries = Cache::with(
            estimated_items,
            max_bytes - shortcut_bytes,
            ByBytes,
            DefaultHashBuilder::default(),
            evictions.clone(),
        );
        let shortcuts = Cache::with_weighter(estimated_items, shortcut_bytes, ShortcutBytes);
        ResponseCache {
            entries,
            shortcuts,
            hash,
            evictions,
        }
    }

    /// The shortcut of exactly `request` and the live entry it leads to.
    pub fn get_shortcut(
        &self,
        request: &[u8],
        now: Instant,
    ) -> Option<(Arc<Shortcut>, Arc<Entry>)> {
        let shortcut = self.shortcuts.get(&(self.hash)(request))?;
        if *shortcut.request != *request {
            return None;
        }
        let entry = self.get(&shortcut.canonical, now)?;
        Some((shortcut, entry))
    }

    /// Remembers how `request` was routed and where its answer is.
    #[allow(clippy::too_many_arguments)]
    pub fn put_shortcut(
        &self,
        request: Vec<u8>,
        canonical: &[u8],
        target: usize,
        category: Category,
        rule: &str,
        classifier_rule: Option<&'static str>,
        streamed: bool,
        caller_wants_usage: bool,
        prompt_chars: usize,
        admit_tokens: u64,
    ) {
        let shortcut = Shortcut {
            request: request.into(),
            canonical: canonical.into(),
            target,
            category,
            rule: rule.into(),
            classifier_rule,
            streamed,
            caller_wants_usage,
            prompt_chars,
            admit_tokens,
        };
        self.shortcuts
            .insert((self.hash)(&shortcut.request), Arc::new(shortcut));
    }

    /// The live entry for exactly `key`, if any.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Arc<Entry>> {
        let slot = (self.hash)(key);
        let entry = self.entries.get(&slot)?;
        if *entry.key != *key {
            return None;
        }
        if now.saturating_duration_since(entry.stored_at) >= entry.ttl {
            // Only this expired entry: another worker may have stored a fresh one meanwhile.
            self.entries
                .remove_if(&slot, |current| Arc::ptr_eq(current, &entry));
            return None;
        }
        Some(entry)
    }

    /// Stores `entry`; false when the cache refused it (heavier than one of its shards holds).
    pub fn put(&self, entry: Entry) -> bool {
        let slot = (self.hash)(&entry.key);
        let entry = Arc::new(entry);
        let mut evicted = Vec::new();
        self.entries
            .insert_with_lifecycle(slot, entry.clone(), &mut evicted);
        // Not the entry this one replaced (a refresh), nor this one if it is too heavy to keep.
        let others = evicted.iter().filter(|&&s| s != slot).count();
        self.evictions.0.fetch_add(others as u64, Relaxed);
        self.entries
            .peek(&slot)
            .is_some_and(|stored| Arc::ptr_eq(&stored, &entry))
    }

    /// Drops every entry (the control API's PurgeCache); returns the entries and bytes removed.
    pub fn purge(&self) -> (u64, u64) {
        let removed = (self.len() as u64, self.bytes());
        self.entries.clear();
        self.shortcuts.clear();
        removed
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.0.load(Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, body: &str, ttl: Duration) -> Entry {
        Entry::new(
            key.as_bytes().to_vec(),
            ttl,
            b"application/json",
            body.as_bytes(),
            TokenUsage::default(),
            7,
            "t".into(),
            "b".into(),
            "m".into(),
        )
    }

    #[test]
    fn hits_need_the_exact_key_and_a_live_ttl() {
        let c = ResponseCache::new(1 << 20);
        c.put(entry("k1", "answer", Duration::from_secs(60)));
        let now = Instant::now();
        assert_eq!(&*c.get(b"k1", now).unwrap().body, b"answer");
        assert!(c.get(b"k2", now).is_none());
        assert!(c.get(b"k1", now + Duration::from_secs(59)).is_some());
        assert!(
            c.get(b"k1", now + Duration::from_secs(60)).is_none(),
            "expired at its TTL"
        );
        assert!(c.get(b"k1", now).is_none(), "and removed");
    }

    #[test]
    fn a_hash_collision_never_serves_another_answer() {
        let c = ResponseCache::with_hash(1 << 20, |_| 42);
        c.put(entry(
            "tenant-a:question",
            "a's answer",
            Duration::from_secs(60),
        ));
        assert!(c.get(b"tenant-b:question", Instant::now()).is_none());
        c.put(entry(
            "tenant-b:question",
            "b's answer",
            Duration::from_secs(60),
        ));
        assert_eq!(
            &*c.get(b"tenant-b:question", Instant::now()).unwrap().body,
            b"b's answer"
        );
        assert!(
            c.get(b"tenant-a:question", Instant::now()).is_none(),
            "the slot now verifies only for b"
        );
    }

    #[test]
    fn a_shortcut_finds_the_live_entry_and_only_for_its_exact_request() {
        let c = ResponseCache::with_hash(1 << 20, |_| 9);
        let remember = |c: &ResponseCache| {
            c.put_shortcut(
                b"request bytes".to_vec(),
                b"canonical",
                3,
                Category::Extraction,
                "rule",
                Some("kw:extraction"),
                false,
                false,
                20,
                5,
            )
        };
        c.put(entry("canonical", "answer", Duration::from_secs(60)));
        remember(&c);
        let now = Instant::now();
        let (shortcut, hit) = c.get_shortcut(b"request bytes", now).unwrap();
        assert_eq!((&*hit.body, shortcut.target), (&b"answer"[..], 3));
        assert!(
            c.get_shortcut(b"other request", now).is_none(),
            "verified, not hashed"
        );
        assert!(c
            .get_shortcut(b"request bytes", now + Duration::from_secs(61))
            .is_none());
        c.put(entry("canonical", "answer", Duration::from_secs(60)));
        remember(&c);
        c.purge();
        c.put(entry("canonical", "answer", Duration::from_secs(60)));
        assert!(c.get_shortcut(b"request bytes", now).is_none(), "purged");
    }

    #[test]
    fn bytes_stay_within_the_bound() {
        let max = 64 * 1024;
        let c = ResponseCache::new(max);
        let body = "x".repeat(1000);
        for i in 0..500 {
            c.put(entry(&format!("key-{i}"), &body, Duration::from_secs(60)));
            assert!(c.bytes() <= max, "{} > {max}", c.bytes());
        }
        assert!(c.len() < 500 && !c.is_empty());
        assert!(c.evictions() > 0 && c.evictions() + c.len() as u64 <= 500);
        let (entries, bytes) = (c.len() as u64, c.bytes());
        assert_eq!(c.purge(), (entries, bytes));
        assert!(c.is_empty() && c.bytes() == 0);
        // An answer heavier than the cache holds is refused, and `put` says so.
        let huge = "x".repeat(max as usize * 2);
        assert!(!c.put(entry("huge", &huge, Duration::from_secs(60))));
        assert!(c.put(entry("small", "answer", Duration::from_secs(60))));
        // A refreshed answer replaces the stored one: not an eviction.
        let evictions = c.evictions();
        assert!(c.put(entry("small", "newer", Duration::from_secs(60))));
        assert_eq!(c.evictions(), evictions);
        assert_eq!(c.len(), 1);
    }
}
