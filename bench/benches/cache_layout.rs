//! One shared response cache or one per core? Both layouts on the same skewed workload: two
//! threads (the machine's cores), Zipf-distributed keys (s = 1.0) over 200,000 distinct
//! requests, 1 KiB answers, 50 MiB in total (split in two for per-core caches). A miss inserts.
//! Prints hit rate and nanoseconds per lookup-or-insert for each layout.
//!
//!   cargo bench -p switchyard-bench --bench cache_layout

use quick_cache::{sync, unsync, Weighter};
use std::sync::Arc;
use std::time::Instant;

const KEYS: usize = 200_000;
const OPS_PER_THREAD: usize = 2_000_000;
const VALUE: usize = 1024;
const CAPACITY: u64 = 50 * 1024 * 1024;

#[derive(Clone)]
struct Bytes;
impl Weighter<u64, Arc<[u8]>> for Bytes {
    fn weight(&self, _: &u64, v: &Arc<[u8]>) -> u64 {
        v.len() as u64 + 64
    }
}

/// Key draws for one thread: Zipf(1.0) by inverse CDF, seeded per thread.
fn zipf_draws(seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(KEYS);
    let mut total = 0.0;
    for rank in 1..=KEYS {
        total += 1.0 / rank as f64;
        cdf.push(total);
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..OPS_PER_THREAD)
        .map(|_| {
            let u = rng.f64() * total;
            cdf.partition_point(|&c| c < u) as u64
        })
        .collect()
}

/// Runs `per_thread` on each thread's draws at once; returns (hit rate, ns per op per thread).
/// `per_thread` returns its hit count.
fn run(draws: &[Vec<u64>], per_thread: impl Fn(&[u64]) -> usize + Sync) -> (f64, f64) {
    let start = Instant::now();
    let hits: usize = std::thread::scope(|s| {
        let handles: Vec<_> = draws
            .iter()
            .map(|keys| s.spawn(|| per_thread(keys)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let ops = (OPS_PER_THREAD * draws.len()) as f64;
    (
        hits as f64 / ops,
        start.elapsed().as_nanos() as f64 * draws.len() as f64 / ops,
    )
}

fn run_shared(draws: &[Vec<u64>], value: &Arc<[u8]>) -> (f64, f64) {
    let cache: sync::Cache<u64, Arc<[u8]>, Bytes> =
        sync::Cache::with_weighter(KEYS / 4, CAPACITY, Bytes);
    run(draws, |keys| {
        let mut hits = 0;
        for &k in keys {
            if cache.get(&k).is_some() {
                hits += 1;
            } else {
                cache.insert(k, value.clone());
            }
        }
        hits
    })
}

fn run_per_core(draws: &[Vec<u64>], value: &Arc<[u8]>) -> (f64, f64) {
    let capacity = CAPACITY / draws.len() as u64;
    run(draws, |keys| {
        let mut cache: unsync::Cache<u64, Arc<[u8]>, Bytes> =
            unsync::Cache::with_weighter(KEYS / 8, capacity, Bytes);
        let mut hits = 0;
        for &k in keys {
            if cache.get(&k).is_some() {
                hits += 1;
            } else {
                cache.insert(k, value.clone());
            }
        }
        hits
    })
}

fn main() {
    // `cargo bench` passes flags such as --bench; this program takes none.
    let threads = 2;
    let draws: Vec<Vec<u64>> = (0..threads)
        .map(|t| zipf_draws(0x9e37_79b9 + t as u64))
        .collect();
    let value: Arc<[u8]> = vec![7u8; VALUE].into();
    println!("layout    | hit rate | ns per op (per thread)");
    for round in 1..=3 {
        let (hit, ns) = run_shared(&draws, &value);
        println!(
            "shared    | {:.1}%    | {:.0}   (round {round})",
            hit * 100.0,
            ns
        );
        let (hit, ns) = run_per_core(&draws, &value);
        println!(
            "per-core  | {:.1}%    | {:.0}   (round {round})",
            hit * 100.0,
            ns
        );
    }
}
