//! The control plane: a tokio runtime that owns the configuration, publishes routing snapshots
//! for the workers, drains their usage events, and runs shutdown.
//! Must not: sit on the request path; workers only read the snapshot and `try_send` usage.

pub mod ledger;

use arc_swap::ArcSwap;
use ledger::Ledger;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_dataplane::server::{self, DataPlane};
use switchyard_dataplane::snapshot::Snapshot;
use switchyard_dataplane::usage::UsageSink;
use switchyard_shared::routing::RoutingTable;

/// How often the ledger drains usage events; also the longest an event waits to be counted.
const USAGE_DRAIN_PERIOD: Duration = Duration::from_millis(20);

/// Runs both planes until SIGTERM/SIGINT; returns the process exit code.
/// `on_ready` runs once the workers listen (the CLI prints its banner there).
pub fn serve(table: RoutingTable, on_ready: impl FnOnce(&DataPlane)) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("switchyard-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start the control plane runtime: {e}");
            return 1;
        }
    };
    let (usage, events) = UsageSink::channel(table.usage.channel_capacity);
    let log_events = table.usage.log_events;
    let drain_timeout = table.listener.drain_timeout;
    let snapshot = match Snapshot::new(table) {
        Ok(s) => Arc::new(ArcSwap::from_pointee(s)),
        Err(e) => {
            eprintln!("switchyard: {e}");
            return 1;
        }
    };
    let dataplane = match server::start(snapshot, usage) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return 1;
        }
    };
    let ledger = Arc::new(Ledger::default());
    let consumer = ledger.clone();
    // On a blocking thread of the runtime: the channel is crossbeam, fed from non-tokio threads.
    runtime.spawn_blocking(move || consumer.consume(events, log_events, USAGE_DRAIN_PERIOD));
    on_ready(&dataplane);
    runtime.block_on(async {
        wait_for_signal().await;
        eprintln!("switchyard: shutting down: draining requests in flight (up to {drain_timeout:?}; signal again to exit now)");
        dataplane.begin_drain();
        tokio::spawn(async {
            wait_for_signal().await;
            eprintln!("switchyard: second signal: exiting now");
            std::process::exit(130);
        });
        let deadline = Instant::now() + drain_timeout;
        while dataplane.shared.inflight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = dataplane.shared.inflight();
        if left > 0 {
            eprintln!("switchyard: drain deadline passed with {left} requests in flight");
        }
        // Let the consumer take the last events before the summary.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    eprintln!("{}", ledger.summary(dataplane.shared.usage.dropped()));
    if let Some(cache) = &dataplane.shared.cache {
        eprintln!(
            "switchyard: response cache: {} entries, {} bytes, {} evicted",
            cache.len(),
            cache.bytes(),
            cache.evictions()
        );
    }
    // The consumer blocks on a channel the (still running) workers hold: do not wait for it.
    runtime.shutdown_background();
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
