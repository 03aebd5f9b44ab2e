//! The workers' end of the usage channel. Owns: non-blocking send and the drop counter.
//! Must not: block a worker; a full channel drops the event and counts it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use switchyard_shared::usage::UsageEvent;

/// Events travel boxed: a bounded crossbeam channel allocates and touches every slot up
/// front, and 65,536 unboxed events would hold ~16 MiB of resident memory while idle.
pub type UsageReceiver = crossbeam_channel::Receiver<Box<UsageEvent>>;

#[derive(Clone)]
pub struct UsageSink {
    tx: crossbeam_channel::Sender<Box<UsageEvent>>,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// A bounded channel of `capacity` events and its receiving end.
    pub fn channel(capacity: usize) -> (UsageSink, UsageReceiver) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (
            UsageSink {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    pub fn send(&self, event: UsageEvent) {
        if self.tx.try_send(Box::new(event)).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}
