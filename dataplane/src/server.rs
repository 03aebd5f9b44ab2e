//! Thread-per-core workers. Owns: the listener (probe-bound once so a busy port fails loudly,
//! then one SO_REUSEPORT socket per worker), the monoio runtime per thread with the chosen I/O
//! driver, the accept loop, and drain on shutdown.
//! Must not: parse HTTP (conn/codec do) or route (proxy does).

use crate::auth::KeyTable;
use crate::budget::{BudgetBook, WorkerBudgets};
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::upstream::Pool;
use crate::usage::UsageSink;
use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use monoio::net::{ListenerOpts, TcpListener};
use std::cell::{Cell, RefCell};
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{
    AtomicBool, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::Arc;
use std::time::Duration;
use switchyard_shared::config::{IoDriver, MAX_WORKERS};
use switchyard_shared::routing::Listener;

/// A per-worker counter on its own cache line, so workers never share one.
#[repr(align(128))]
#[derive(Default)]
struct PaddedCounter(AtomicUsize);

/// State every worker and the control plane can see.
pub struct Shared {
    pub snapshot: SharedSnapshot,
    pub usage: UsageSink,
    /// The response cache, `None` when `[cache] enabled = false`.
    pub cache: Option<crate::cache::ResponseCache>,
    pub budgets: Arc<BudgetBook>,
    /// Cacheable misses being fetched by any worker, for coalescing.
    pub flights: crate::coalesce::Flights,
    /// Valid API keys, published by the control plane.
    pub keys: ArcSwap<KeyTable>,
    pub service_names: crate::services::ServiceNames,
    /// Addresses of backends given by name.
    pub resolved: Arc<crate::resolve::Resolved>,
    draining: AtomicBool,
    /// The drain deadline passed: requests still in flight end now, each with an error its
    /// caller can see and a usage event, instead of being cut off by the exit.
    cut: AtomicBool,
    /// Requests in flight per worker (summed only by the drain loop).
    inflight: Box<[PaddedCounter]>,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Relaxed)
    }

    /// Resolves once `is_cut` holds (looked at every `CUT_POLL`; only on a worker's runtime).
    pub async fn cut_passed(&self) {
        while !self.is_cut() {
            monoio::time::sleep(CUT_POLL).await;
        }
    }

    /// The flag `is_draining` reads, for state that outlives one look at it.
    pub fn draining_flag(&self) -> &AtomicBool {
        &self.draining
    }

    pub fn inflight(&self) -> usize {
        self.inflight.iter().map(|c| c.0.load(Acquire)).sum()
    }
}

/// One worker thread's state; lives in an `Rc` on its runtime.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub pool: Pool,
    /// This worker's budget leases.
    pub budgets: WorkerBudgets,
    /// This worker's rate-limit leases.
    pub limits: crate::ratelimit::WorkerLimits,
    pub service_names: crate::services::WorkerServiceNames,
    pub connections: crate::conn::OpenConnections,
    pub failures: crate::failures::FailureLog,
    seq: Cell<u64>,
    cache: RefCell<arc_swap::Cache<SharedSnapshot, Arc<Snapshot>>>,
}

/// Bits of a request id below the worker's index: as many as `MAX_WORKERS` leaves (54).
const SEQUENCE_BITS: u32 = u64::BITS - MAX_WORKERS.trailing_zeros();

/// The worker's index in the top bits, its sequence number below (2^54 requests before it wraps).
fn request_id(worker: usize, seq: u64) -> u64 {
    ((worker as u64) << SEQUENCE_BITS) | (seq & ((1 << SEQUENCE_BITS) - 1))
}

/// Where a worker's sequence starts: the start time in milliseconds times 4,096, so that ids
/// do not repeat across restarts (a later process starts above every id an earlier one made,
/// unless that one made over 4,096 a millisecond on one worker) and log lines and usage
/// records of different runs never share one. (Unix milliseconds stay below 2^42 until 2109.)
fn first_sequence() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms << 12) & ((1 << SEQUENCE_BITS) - 1)
}

impl Worker {
    /// The current snapshot; a thread-local cache makes this a pointer compare plus a refcount.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cache.borrow_mut().load().clone()
    }

    /// The current snapshot's listener settings, copied: what waiting for a request needs,
    /// without holding a snapshot that may be replaced during the wait.
    pub fn listener(&self) -> Listener {
        self.cache.borrow_mut().load().table.listener
    }

    /// Unique per process, and across restarts: see `request_id` and `first_sequence`.
    pub fn next_request_id(&self) -> u64 {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        request_id(self.id, n)
    }

    /// Counts a request in flight (what a drain waits for) until the guard drops, however the
    /// request ends (a panic included).
    pub fn request_in_flight(&self) -> InFlight<'_> {
        self.shared.inflight[self.id].0.fetch_add(1, Relaxed);
        InFlight(self)
    }
}

pub struct InFlight<'w>(&'w Worker);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Release: whoever sees the count drop sees the request's usage event sent.
        self.0.shared.inflight[self.0.id].0.fetch_sub(1, Release);
    }
}

pub struct DataPlane {
    pub shared: Arc<Shared>,
    pub address: SocketAddr,
    pub driver: &'static str,
    /// `io_driver = "auto"` found io_uring refused (old kernel, or a sandbox that blocks it).
    pub uring_refused: bool,
}

impl DataPlane {
    /// Stops accepting; connections finish their current request and close.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Relaxed);
    }

    /// Ends the requests still in flight after a drain (see `Shared::cut`); each worker does
    /// within `CUT_POLL`.
    pub fn cut_in_flight(&self) {
        self.shared.cut.store(true, Relaxed);
    }
}

fn uring_available() -> bool {
    monoio::utils::detect_uring()
}

/// Raises the soft limit on open files to the hard limit: each client and each upstream
/// connection is a descriptor, and the usual soft limit (1024) would refuse connections
/// from about a thousand concurrent callers while the hard limit allows far more.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for both calls to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Starts the workers and returns once every one is listening.
pub fn start(
    snapshot: SharedSnapshot,
    usage: UsageSink,
    budgets: Arc<BudgetBook>,
    keys: KeyTable,
) -> io::Result<DataPlane> {
    raise_open_files_limit();
    let (mut address, workers, driver_setting, cache) = {
        let s = snapshot.load();
        let c = &s.table.cache;
        let cache = c
            .enabled
            .then(|| crate::cache::ResponseCache::new(c.max_bytes));
        (
            s.table.listener.address,
            s.table.listener.workers,
            s.table.listener.io_driver,
            cache,
        )
    };
    // Without this probe, SO_REUSEPORT would silently share a port another process holds.
    let probe = std::net::TcpListener::bind(address)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
    address = probe.local_addr()?;
    drop(probe);
    let use_uring = match driver_setting {
        IoDriver::IoUring if !uring_available() => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_driver = \"io_uring\" but this kernel or sandbox refuses io_uring",
            ))
        }
        IoDriver::IoUring => true,
        IoDriver::Epoll => false,
        IoDriver::Auto => uring_available(),
    };
    let driver = if use_uring { "io_uring" } else { "epoll" };
    let resolved = Arc::new(crate::resolve::Resolved::default());
    crate::resolve::spawn_refresher(snapshot.clone(), resolved.clone());
    let shared = Arc::new(Shared {
        snapshot,
        resolved,
        usage,
        cache,
        budgets,
        flights: Default::default(),
        service_names: Default::default(),
        keys: ArcSwap::from_pointee(keys),
        draining: AtomicBool::new(false),
        cut: AtomicBool::new(false),
        inflight: (0..workers).map(|_| PaddedCounter::default()).collect(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    for id in 0..workers {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("switchyard-worker-{id}"))
            .spawn(move || {
                let worker = Rc::new(Worker {
                    id,
                    cache: RefCell::new(arc_swap::Cache::new(shared.snapshot.clone())),
                    shared,
                    pool: Pool::default(),
                    budgets: Default::default(),
                    limits: Default::default(),
                    service_names: Default::default(),
                    connections: Default::default(),
                    failures: Default::default(),
                    seq: Cell::new(first_sequence()),
                });
                let result = if use_uring {
                    let build = |setup| {
                        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                            .uring_builder(setup)
                            .enable_timer()
                            .build()
                    };
                    build(ring_setup())
                        .or_else(|e| {
                            if id == 0 {
                                eprintln!("switchyard: io_uring: the kernel refused a single-issuer, cooperative ring ({e}); using plain rings");
                            }
                            build(io_uring::IoUring::builder())
                        })
                        .map(|mut rt| rt.block_on(run_worker(worker, address, ready.clone())))
                } else {
                    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .map(|mut rt| rt.block_on(run_worker(worker, address, ready.clone())))
                };
                if let Err(e) = result {
                    let _ = ready.send(Err(io::Error::new(
                        e.kind(),
                        format!("worker {id}: cannot start the {driver} runtime: {e}"),
                    )));
                }
            })?;
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("a worker thread died while starting"))??;
    }
    Ok(DataPlane {
        shared,
        address,
        driver,
        uring_refused: driver_setting == IoDriver::Auto && !use_uring,
    })
}

/// Each ring has one user, its worker thread (single issuer), and that thread enters the
/// kernel on every turn of its loop, so completions need no interrupt to run (cooperative task
/// running): both spare the kernel work on every request (~0.9 us of system CPU per cache hit,
/// docs/BENCHMARKS.md). Kernels before 6.0 refuse these flags; callers then build a plain ring.
pub fn ring_setup() -> io_uring::Builder {
    let mut setup = io_uring::IoUring::builder();
    setup.setup_coop_taskrun().setup_single_issuer();
    setup
}

/// How often a wait for the drain deadline's cut looks for it.
const CUT_POLL: Duration = Duration::from_millis(20);

async fn run_worker(
    worker: Rc<Worker>,
    address: SocketAddr,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    let listener = match TcpListener::bind_with_config(address, &opts) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(
                e.kind(),
                format!("worker {}: cannot listen on {address}: {e}", worker.id),
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    if worker.id == 0 {
        crate::health::spawn_checks(worker.clone());
    }
    monoio::spawn(crate::upstream::sweep_pool(worker.clone()));
    monoio::spawn(crate::failures::flush_every_second(worker.clone()));
    'accepting: while !worker.shared.is_draining() {
        // One accept op stays armed until it completes: dropping an in-flight io_uring accept
        // (a timeout around it) can lose a connection the kernel already accepted. The timer
        // beside it only lets an idle worker notice a drain.
        let accept = listener.accept();
        let mut accept = std::pin::pin!(accept);
        let accepted = loop {
            monoio::select! {
                r = &mut accept => break r,
                _ = monoio::time::sleep(Duration::from_millis(100)) => {
                    if worker.shared.is_draining() {
                        break 'accepting;
                    }
                }
            }
        };
        match accepted {
            Ok((stream, _)) => {
                // A bug that panics while serving one connection closes that connection; it
                // must not end the worker thread and every other connection on it. (Combinators,
                // not an async block: one would hold the connection's future twice.)
                let id = worker.id;
                let serve = crate::panics::contain(crate::conn::serve(worker.clone(), stream));
                monoio::spawn(serve.map(move |served| {
                    if served.is_err() {
                        // Outside the contained handler: a failed write must not panic again.
                        let _ = writeln!(std::io::stderr(), "switchyard: worker {id}: a connection's handler panicked; that connection was closed");
                    }
                }));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("switchyard: worker {} accept failed: {e}", worker.id);
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    worker.connections.close_idle();
    // Connections in flight keep running on this runtime until the process exits, or until
    // the drain deadline cuts them: their waits for the caller's socket then end.
    worker.shared.cut_passed().await;
    worker.connections.shut_busy();
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_differ_across_all_workers() {
        let last = MAX_WORKERS - 1;
        let ids = [
            (0, 1),
            (256, 1),
            (last, 1),
            (0, 1 << 40),
            (last, u64::MAX >> 10),
        ];
        let made: std::collections::HashSet<u64> =
            ids.iter().map(|&(w, n)| request_id(w, n)).collect();
        assert_eq!(made.len(), ids.len());
        assert_eq!(request_id(last, 1) >> SEQUENCE_BITS, last as u64);
    }

    #[test]
    fn a_later_start_numbers_its_requests_above_an_earlier_one() {
        let earlier = first_sequence();
        std::thread::sleep(Duration::from_millis(2));
        let later = first_sequence();
        // An earlier process's 4,096 requests a millisecond stay below the later start.
        assert!(later >= earlier + 2 * 4096, "{earlier} {later}");
        assert!(
            later < 1 << SEQUENCE_BITS,
            "the worker's index is not touched"
        );
    }
}
