//! The remote data planes following the config. Owns: who follows now (one entry per snapshot
//! stream, gone when the stream ends), the version each reports in effect or refused, and the
//! wait of an apply for their answers.
//! Must not: hold a data plane's report for one that no longer follows (a stream that ended
//! took its entry with it).

use crate::api::pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an apply waits for the data planes to answer on the new version.
pub const SETTLE: Duration = Duration::from_secs(3);

/// A follower is (data plane name, instance).
type Key = (String, String);

struct Entry {
    /// Which stream registered it: a reconnected data plane's new stream replaces the entry,
    /// and the old stream ending must not remove the new one.
    stream: u64,
    state: pb::DataPlaneConfig,
}

#[derive(Default)]
pub struct Followers {
    entries: Mutex<BTreeMap<Key, Entry>>,
    streams: AtomicU64,
    /// Bumped on every change, for an apply waiting on the answers.
    changed: tokio::sync::watch::Sender<u64>,
}

/// Held by a snapshot stream; its end removes the follower.
pub struct Following {
    followers: Arc<Followers>,
    key: Key,
    stream: u64,
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut entries = self.followers.lock();
        if entries
            .get(&self.key)
            .is_some_and(|e| e.stream == self.stream)
        {
            entries.remove(&self.key);
        }
        drop(entries);
        self.followers.changed.send_modify(|n| *n += 1);
    }
}

impl Followers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A data plane opened its snapshot stream.
    pub fn join(self: &Arc<Self>, data_plane: String, instance: String) -> Following {
        let stream = self.streams.fetch_add(1, Relaxed);
        // One that names no instance (an older build) is told apart by its stream; it never
        // reports, so it is listed but not waited for.
        let instance = if instance.is_empty() {
            format!("stream {stream}")
        } else {
            instance
        };
        let key = (data_plane, instance);
        let state = pb::DataPlaneConfig {
            data_plane: key.0.clone(),
            instance: key.1.clone(),
            ..Default::default()
        };
        self.lock().insert(key.clone(), Entry { stream, state });
        self.changed.send_modify(|n| *n += 1);
        Following {
            followers: self.clone(),
            key,
            stream,
        }
    }

    /// A follower's report of its config; returns the one it replaces, or `None` when the
    /// data plane does not follow (the report is not kept).
    pub fn report(&self, state: pb::DataPlaneConfig) -> Option<pb::DataPlaneConfig> {
        let key = (state.data_plane.clone(), state.instance.clone());
        let mut entries = self.lock();
        let entry = entries.get_mut(&key)?;
        let before = std::mem::replace(&mut entry.state, state);
        drop(entries);
        self.changed.send_modify(|n| *n += 1);
        Some(before)
    }

    /// Every follower's last report, by name.
    pub fn states(&self) -> Vec<pb::DataPlaneConfig> {
        self.lock().values().map(|e| e.state.clone()).collect()
    }

    /// Waits until every follower that has reported has put `version` (or a later one) in
    /// effect or refused it, for at most `within`; returns the states as they are then.
    pub async fn settle(&self, version: u64, within: Duration) -> Vec<pb::DataPlaneConfig> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changes = self.changed.subscribe();
        loop {
            let states = self.states();
            if states
                .iter()
                .all(|s| s.in_effect == 0 || answered(s, version))
            {
                return states;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.states(),
            }
        }
    }
}

/// Whether a follower has taken `version` or refused it (or gone past it).
pub fn answered(state: &pb::DataPlaneConfig, version: u64) -> bool {
    state.in_effect >= version || state.refused >= version
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, in_effect: u64, refused: u64) -> pb::DataPlaneConfig {
        pb::DataPlaneConfig {
            data_plane: name.into(),
            instance: "i".into(),
            in_effect,
            refused,
            ..Default::default()
        }
    }

    #[test]
    fn a_follower_is_kept_while_its_stream_lasts() {
        let followers = Arc::new(Followers::default());
        assert!(
            followers.report(report("a", 1, 0)).is_none(),
            "not following"
        );
        let stream = followers.join("a".into(), "i".into());
        assert!(followers.report(report("a", 1, 0)).is_some());
        assert_eq!(followers.states()[0].in_effect, 1);
        // The same process reconnects before its old stream is noticed gone.
        let again = followers.join("a".into(), "i".into());
        drop(stream);
        assert_eq!(followers.states().len(), 1, "the new stream's entry stays");
        drop(again);
        assert!(followers.states().is_empty());
    }

    #[tokio::test]
    async fn settle_waits_for_every_answer_or_the_deadline() {
        let followers = Arc::new(Followers::default());
        let _a = followers.join("a".into(), "i".into());
        let _b = followers.join("b".into(), "i".into());
        followers.report(report("a", 1, 0));
        followers.report(report("b", 1, 0));
        let waiter = {
            let followers = followers.clone();
            tokio::spawn(async move { followers.settle(2, SETTLE).await })
        };
        tokio::task::yield_now().await;
        followers.report(report("a", 2, 0));
        followers.report(report("b", 1, 2));
        let states = waiter.await.unwrap();
        assert!(states.iter().all(|s| answered(s, 2)));
        // One that never answers: the wait ends at the deadline with it as it was.
        let started = tokio::time::Instant::now();
        let within = Duration::from_millis(100);
        let states = followers.settle(3, within).await;
        assert!(started.elapsed() >= within);
        assert!(states.iter().all(|s| !answered(s, 3)));
    }
}
