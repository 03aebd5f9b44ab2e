//! The workers' end of the usage channel. Owns: non-blocking send and the drop counter.
//! Must not: block a worker; a full channel drops the event and counts it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use switchyard_shared::usage::UsageEvent;

/// Events travel by value on a list channel bounded by a length check: an array channel
/// touches every slot up front (megabytes resident while idle); a list channel holds memory
/// only for the events in it, in blocks of 31 (one allocation per block, not per event). The
/// check and the send are not one step, so concurrent senders may pass the bound by at most
/// one event each.
pub type UsageReceiver = crossbeam_channel::Receiver<UsageEvent>;

#[derive(Clone)]
pub struct UsageSink {
    tx: crossbeam_channel::Sender<UsageEvent>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// A channel of at most `capacity` events and its receiving end.
    pub fn channel(capacity: usize) -> (UsageSink, UsageReceiver) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (
            UsageSink {
                tx,
                capacity,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    pub fn send(&self, event: UsageEvent) {
        if self.tx.len() >= self.capacity || self.tx.send(event).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_growing() {
        let (sink, events) = UsageSink::channel(2);
        for _ in 0..5 {
            sink.send(UsageEvent::default());
        }
        assert_eq!(events.len(), 2);
        assert_eq!(sink.dropped(), 3);
        events.recv().unwrap();
        sink.send(UsageEvent::default());
        assert_eq!(events.len(), 2);
        assert_eq!(sink.dropped(), 3);
    }
}
