//! Active health checks. Owns: probing every backend's health path on an interval from
//! worker 0, feeding the verdicts into the shared backend states.
//! Must not: run on more than one worker (the states are shared, one prober is enough).

use crate::balancer::Verdict;
use crate::server::Worker;
use crate::upstream;
use std::rc::Rc;

pub fn spawn_checks(worker: Rc<Worker>) {
    let count = worker.snapshot().table.backends.len();
    for backend in 0..count {
        monoio::spawn(check_loop(worker.clone(), backend));
    }
}

async fn check_loop(worker: Rc<Worker>, backend: usize) {
    loop {
        let snap = worker.snapshot();
        let table = &snap.table;
        let Some(interval) = table.health.interval else {
            return;
        };
        let Some(b) = table.backends.get(backend) else {
            return;
        };
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
        let probe = upstream::exchange(
            &fresh,
            table.version,
            backend,
            b,
            snap.tls[backend].as_ref(),
            request,
            false,
        );
        let healthy = matches!(monoio::time::timeout(table.health.timeout, probe).await, Ok(Ok(r)) if (200..300).contains(&r.head.status));
        if healthy {
            snap.states.record(backend, Verdict::Success, &table.health);
            snap.states.allow_probe_now(backend);
        } else {
            snap.states.record(backend, Verdict::Failure, &table.health);
        }
        drop(snap);
        monoio::time::sleep(interval).await;
    }
}
