//! Active health checks. Owns: probing every backend's health path on an interval from
//! worker 0, feeding the verdicts into the shared backend states.
//! Must not: run on more than one worker (the states are shared, one prober is enough).

use crate::resolve::Resolved;
use crate::server::Worker;
use crate::snapshot::Snapshot;
use crate::upstream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the wait between rounds looks for a reload.
const RELOAD_POLL: Duration = Duration::from_millis(100);

/// One round per interval over the backends of the snapshot in effect, and one at once after a
/// reload: a backend it added is checked (and shown healthy) within moments, not an interval.
pub fn spawn_checks(worker: Rc<Worker>) {
    monoio::spawn(async move {
        loop {
            let snap = worker.snapshot();
            let interval = snap.table.health.interval;
            if interval.is_some() {
                for backend in 0..snap.table.backends.len() {
                    let resolved = worker.shared.resolved.clone();
                    monoio::spawn(check(snap.clone(), resolved, backend));
                }
            }
            let version = snap.table.version;
            drop(snap);
            // Without checks, look again later: a reload may turn them on.
            let next = Instant::now() + interval.unwrap_or(Duration::from_secs(1));
            while worker.snapshot().table.version == version {
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                monoio::time::sleep(left.min(RELOAD_POLL)).await;
            }
        }
    });
}

async fn check(snap: Arc<Snapshot>, resolved: Arc<Resolved>, backend: usize) {
    let table = &snap.table;
    let b = &table.backends[backend];
    let mut request = format!(
        "GET {}{} HTTP/1.1\r\nhost: {}\r\n",
        b.base_path, b.health_path, b.authority
    )
    .into_bytes();
    if let Some(key) = &b.api_key {
        request.extend_from_slice(format!("authorization: Bearer {key}\r\n").as_bytes());
    }
    request.extend_from_slice(b"connection: close\r\n\r\n");
    // A fresh connection each time: a check must prove the backend accepts connections.
    let fresh = upstream::Pool::default();
    let written = std::cell::Cell::new(None);
    let probe = upstream::exchange(
        &fresh,
        table.version,
        backend,
        b,
        snap.tls[backend].as_ref(),
        &resolved,
        request,
        false,
        &written,
    );
    let healthy = matches!(monoio::time::timeout(table.health.timeout, probe).await, Ok(Ok(r)) if (200..300).contains(&r.head.status));
    if healthy {
        snap.states.check_passed(backend);
    } else {
        snap.states.check_failed(backend, &table.health);
    }
}
