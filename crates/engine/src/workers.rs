//! How many workers a block gets, and running them.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::trace::{SpanKind, Tracer};

/// With storage reads slower than this, workers mostly wait on storage, and engines run
/// `WORKERS_PER_THREAD_IF_SLOW` of them per thread so that reads overlap (`block-stm` and
/// `optimistic`, which read keys in batches, fewer: [`crate::prefetch::WORKERS_PER_THREAD`]).
pub const SLOW_READ: Duration = Duration::from_micros(5);
pub const WORKERS_PER_THREAD_IF_SLOW: usize = 16;
/// Transactions each worker must have to be worth starting on fast storage: waking a
/// pooled thread and sharing the block's structures with it costs on the order of 100
/// microseconds, as long as 50 to 100 light transactions take (measured on mainnet
/// blocks of 49 to 108 transactions, 0.1 to 0.5 ms: two workers ran them at 0.33x to
/// 0.76x of one).
pub const MIN_TXS_PER_WORKER: usize = 64;

/// A small block's heavy transactions earn it a worker only if that worker gets at least
/// this many of them (a handful of transactions rarely split evenly).
pub const MIN_HEAVY_TXS_PER_WORKER: usize = 8;

/// A block whose transactions weigh at least this many light ones on average (their gas
/// limits, [`parex_core::Vm::light_tx_equivalents`]) counts its weight twice when it asks
/// for workers: contract calls take more time per unit of gas limit than transfers
/// (mainnet 19923400 and 19933122, 24 and 45 calls: 9.4 and 5.5 us per 60k of limit,
/// against 1.6 us on 116525's transfers), so their weight alone left these blocks one
/// worker, and two run them 1.6x faster.
pub const HEAVY_BLOCK_WEIGHT: usize = 2;

/// The workers an engine runs for `txs` transactions worth `light_txs` light ones
/// ([`parex_core::Vm::light_tx_equivalents`]; asked only when `txs` alone does not fill
/// every thread; pass `|| txs` to count transactions only) on `threads` threads, when a
/// storage read takes `read_latency` (see [`crate::RunOptions::spread_small_blocks`]).
pub fn count(
    threads: usize,
    txs: usize,
    light_txs: impl FnOnce() -> usize,
    read_latency: Duration,
    spread_small_blocks: bool,
) -> usize {
    let threads = threads.max(1);
    let workers = if read_latency >= SLOW_READ {
        (threads * WORKERS_PER_THREAD_IF_SLOW).min(512)
    } else if spread_small_blocks || txs >= threads * MIN_TXS_PER_WORKER {
        threads
    } else {
        // A few heavy transactions repay a second worker as many light ones do.
        let light = light_txs();
        if light > txs {
            let work = if light >= HEAVY_BLOCK_WEIGHT * txs {
                2 * light
            } else {
                light
            };
            threads
                .min(work / MIN_TXS_PER_WORKER)
                .min(txs / MIN_HEAVY_TXS_PER_WORKER)
        } else {
            threads.min(txs / MIN_TXS_PER_WORKER)
        }
    };
    workers.min(txs).max(1)
}

/// How long an idle worker of an oversubscribed block (more workers than threads, on
/// slow storage) sleeps once its backoff is spent: spinning or yielding there takes the
/// cores from the workers whose reads just completed.
const IDLE_SLEEP: Duration = Duration::from_micros(20);

/// Waits a little before a worker with nothing to do looks for work again: spins, then
/// yields, and when `oversubscribed` (workers outnumber threads) sleeps.
#[inline]
pub fn idle(backoff: &crossbeam::utils::Backoff, oversubscribed: bool) {
    if oversubscribed && backoff.is_completed() {
        std::thread::sleep(IDLE_SLEEP);
    } else {
        backoff.snooze();
    }
}

/// Maps `f` over `range` on `workers` workers, which claim `claim` consecutive indices at
/// a time (one trip to the shared counter each) and record a `kind` span per index into
/// `tracer`. Returns the results in index order and the time the workers spent, summed.
/// (The hint and declaration passes.)
pub fn map_claimed<R, F>(
    workers: usize,
    range: Range<usize>,
    claim: usize,
    tracer: &Tracer,
    kind: SpanKind,
    f: F,
) -> (Vec<R>, Duration)
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    let mut results = Vec::new();
    let time = map_claimed_into(&mut results, workers, range, claim, tracer, kind, f);
    (results, time)
}

/// [`map_claimed`], appending the results to `results` (each moved once more, not twice,
/// when the caller wants them after others it has: pre-executions are large).
pub fn map_claimed_into<R, F>(
    results: &mut Vec<R>,
    workers: usize,
    range: Range<usize>,
    claim: usize,
    tracer: &Tracer,
    kind: SpanKind,
    f: F,
) -> Duration
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    let next = AtomicUsize::new(range.start);
    let workers = workers.clamp(1, range.len().max(1));
    let per_worker = run(workers, |id| {
        let started = Instant::now();
        let mut trace = tracer.recorder(id);
        // Sized for this worker's share, so that the results (large, for pre-executions)
        // are not copied as the vector grows; the runs of indices they belong to beside.
        let mut done = Vec::with_capacity(range.len() / workers + claim);
        let mut runs = Vec::new();
        loop {
            let first = next.fetch_add(claim, Relaxed);
            if first >= range.end {
                break;
            }
            let end = (first + claim).min(range.end);
            runs.push((first, end - first, id));
            for i in first..end {
                let span = trace.start();
                done.push(f(i));
                trace.record(kind, Some(i), span);
            }
        }
        tracer.submit(trace);
        (done, runs, started.elapsed())
    });
    let time = per_worker.iter().map(|(_, _, t)| *t).sum();
    // Each worker's runs are in index order (the counter only grows), so taking the runs
    // of all workers in index order from each worker's results in turn moves every result
    // once, straight into its place.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut done = Vec::with_capacity(per_worker.len());
    for (results, worker_runs, _) in per_worker {
        done.push(results.into_iter());
        runs.extend(worker_runs);
    }
    runs.sort_unstable();
    let before = results.len();
    results.reserve(range.len());
    for (first, len, worker) in runs {
        debug_assert_eq!(first, range.start + results.len() - before);
        results.extend(done[worker].by_ref().take(len));
    }
    assert_eq!(
        results.len() - before,
        range.len(),
        "every index is claimed by one worker"
    );
    time
}

/// Sets its flag if the holder unwinds: a worker holds one so that, if it panics, the
/// others see the flag and stop instead of waiting forever for its work.
pub struct SetOnPanic<'a>(pub &'a AtomicBool);

impl Drop for SetOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, SeqCst);
        }
    }
}

/// How long a helper woken ahead ([`wake_helpers`]) waits awake for its block's work.
const WAKE_AHEAD: Duration = Duration::from_micros(400);

/// Wakes the helpers that [`run`] will hand `workers` workers' work to, now, so that their
/// wake-up (tens of microseconds on a virtual machine: mainnet 4330482's helper started 50
/// us after the calling thread, 14396881's 44) overlaps the engine's setup of the block
/// instead of following it. Each woken helper waits awake, its core otherwise idle, and
/// runs the first work its pool is handed right there (whatever it is: a block that ends
/// up needing no helper costs nothing but that wait), or goes back to sleep after
/// `WAKE_AHEAD` (400 µs). Does nothing where `run` would not use the kept pools (one worker, a
/// caller inside a rayon pool, more workers than cores).
pub fn wake_helpers(workers: usize) {
    if workers < 2 || workers > cores() || rayon::current_thread_index().is_some() {
        return;
    }
    let Some(pool) = helpers(workers - 1) else {
        return;
    };
    for _ in 1..workers {
        pool.spawn(|| {
            let started = Instant::now();
            while started.elapsed() < WAKE_AHEAD {
                if let Some(rayon::Yield::Executed) = rayon::yield_now() {
                    return;
                }
                std::hint::spin_loop();
            }
        });
    }
}

/// Runs `workers` copies of `work` (each given its worker id, `0..workers`; the calling
/// thread is worker 0) and returns their results in worker order. Called from a thread of
/// a rayon pool (a caller's or a test's own) that has room for them, the workers run on
/// that pool; otherwise on a pool of exactly `workers - 1` threads kept for the process
/// ([`helpers`]), sparing a thread spawn per block. A panicking worker's panic is resumed
/// on the caller once the others have ended: engines that share work between workers must
/// make the others stop when one unwinds (see [`SetOnPanic`]).
pub fn run<R, F>(workers: usize, work: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    let workers = workers.max(1);
    if workers == 1 {
        return vec![work(0)];
    }
    if rayon::current_thread_index().is_some() && workers <= rayon::current_num_threads() {
        return in_place(None, workers, work);
    }
    if let Some(pool) = helpers(workers - 1) {
        return in_place(Some(&pool), workers, work);
    }
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (1..workers)
            .map(|id| scope.spawn(move || work(id)))
            .collect();
        let mut all = vec![work(0)];
        for handle in handles {
            all.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        all
    })
}

/// Runs `work(0)` on this thread and `work(1..workers)` as jobs on `pool` (the pool of the
/// calling thread if `None`), and returns the results in worker order. (Worker 0 runs right here: an
/// ordinary `scope` from outside the pool would hand the whole scope to a pool thread and
/// put this one to sleep: two wake-ups per block, which cost more than a small block's
/// execution.)
fn in_place<R, F>(pool: Option<&rayon::ThreadPool>, workers: usize, work: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Sync,
{
    let results = Mutex::new(Vec::with_capacity(workers));
    let finished = AtomicUsize::new(0);
    let (results_ref, finished_ref) = (&results, &finished);
    match pool {
        Some(pool) => {
            pool.in_place_scope(|s| spawn_all(s, workers, &work, results_ref, finished_ref))
        }
        None => rayon::in_place_scope(|s| spawn_all(s, workers, &work, results_ref, finished_ref)),
    }
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(id, _)| *id);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Spawns workers `1..workers` into `scope`, runs worker 0 here, and collects the results.
fn spawn_all<'s, R, F>(
    scope: &rayon::Scope<'s>,
    workers: usize,
    work: &'s F,
    results: &'s Mutex<Vec<(usize, R)>>,
    finished: &'s AtomicUsize,
) where
    R: Send + 's,
    F: Fn(usize) -> R + Sync,
{
    let push = move |id: usize, r: R| {
        results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, r));
        finished.fetch_add(1, SeqCst);
    };
    for id in 1..workers {
        scope.spawn(move |_| push(id, work(id)));
    }
    push(0, work(0));
    // Leaving the scope before the helpers are done puts this thread to sleep until the
    // last one wakes it (tens of microseconds on a virtual machine, at the end of every
    // block): wait for them awake a while first, yielding now and then (not when workers
    // outnumber the cores: they need the core).
    if workers > cores() {
        return;
    }
    let started = Instant::now();
    let mut spins = 0u32;
    while finished.load(SeqCst) < workers && started.elapsed() < AWAKE_JOIN {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The cores this process may run on, asked once: `available_parallelism` reads the
/// scheduler's affinity and the cgroup's quota at every call (about 9 us here), and
/// every block asks.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How long worker 0 waits awake for the helpers at the end of a block (see `spawn_all`).
const AWAKE_JOIN: Duration = Duration::from_micros(300);

/// The pool of exactly `threads` threads that runs the helpers of blocks with
/// `threads + 1` workers, started on first use and kept for the process's life (one per
/// worker count in use): starting threads for every block (each faults in a fresh stack
/// and allocator heap) cost a block of 1000 ERC20 transfers at 100 us per read about 15%
/// of its CPU time. Exactly as many threads as helpers: with rayon's global pool (a
/// thread per core, and the calling thread is worker 0, so one thread too many) a round
/// of `optimistic`'s helper started 2.3 ms late in about half the raw-transfer gigagas
/// blocks of `parex run --repeat 11` on 2 cores (the idle third thread woken for the job
/// held a core), and the medians of such runs spread over 47.8-61.8 ms; on exact pools
/// rounds started within 0.1 ms (one of 48 within 0.7) and the medians were 42.8-43.8 ms.
/// Helpers that outnumber the cores (blocks on slow storage, whose workers mostly sleep
/// on reads) take any kept pool at least that large, as all such blocks did before, so
/// that their varying counts do not each keep a pool of their own.
/// `None` if the pool cannot be built (the caller then starts threads of its own).
pub fn helpers(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let oversubscribed = threads >= cores();
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, pool)) = pools
        .iter()
        .find(|(size, _)| *size == threads || (oversubscribed && *size >= threads))
    {
        return Some(pool.clone());
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("parex-{threads}-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(built);
    pools.push((threads, pool.clone()));
    Some(pool)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn worker_count() {
        let fast = Duration::ZERO;
        let slow = super::SLOW_READ;
        let count = |threads, txs, fast_storage, spread| {
            let latency = if fast_storage { fast } else { slow };
            super::count(threads, txs, || txs, latency, spread)
        };
        assert_eq!(count(2, 18, true, false), 1);
        assert_eq!(count(2, 18, true, true), 2);
        assert_eq!(count(2, 127, true, false), 1);
        assert_eq!(count(2, 128, true, false), 2);
        assert_eq!(count(2, 1000, true, false), 2);
        assert_eq!(count(8, 300, true, false), 4);
        assert_eq!(count(2, 18, false, false), 18);
        assert_eq!(count(2, 1000, false, false), 32);
        assert_eq!(count(0, 0, true, false), 1);
        // Heavy transactions: 40 worth 200 light ones fill two workers, 24 worth 1000
        // three (8 each at least), 4 none; worth less than they number, they count as
        // themselves.
        assert_eq!(super::count(2, 40, || 200, fast, false), 2);
        assert_eq!(super::count(8, 24, || 1000, fast, false), 3);
        assert_eq!(super::count(8, 4, || 1000, fast, false), 1);
        assert_eq!(super::count(2, 127, || 3, fast, false), 1);
        // Weighing two light ones each or more on average, they count double: 24 worth 68
        // fill two workers (mainnet 19923400); 108 worth 126 (6196166) and 16 worth 51
        // (2674998) do not.
        assert_eq!(super::count(2, 24, || 68, fast, false), 2);
        assert_eq!(super::count(2, 24, || 63, fast, false), 1);
        assert_eq!(super::count(2, 108, || 126, fast, false), 1);
        assert_eq!(super::count(2, 16, || 51, fast, false), 1);
        // Large blocks never ask.
        assert_eq!(
            super::count(2, 500, || unreachable!("not asked"), fast, false),
            2
        );
    }

    #[test]
    fn a_panicking_worker_fails_the_run_on_either_pool() {
        for workers in [2, 40] {
            let run = std::panic::catch_unwind(|| {
                super::run(workers, |id| {
                    if id == 1 {
                        panic!("worker {id} fails");
                    }
                    id
                })
            });
            assert!(run.is_err(), "{workers} workers");
            // The pools still serve the next block.
            assert_eq!(super::run(workers, |id| id).len(), workers);
        }
    }

    /// A helper woken ahead runs the block's work as soon as it is handed out (a panic in
    /// it fails that block only); woken for a block that then needs no helper, it still
    /// serves the next block, whether that comes while it waits awake or after it went
    /// back to sleep.
    #[test]
    fn helpers_woken_ahead_serve_the_next_block() {
        for workers in [2, 3] {
            super::wake_helpers(workers);
            assert_eq!(
                super::run(workers, |id| id),
                (0..workers).collect::<Vec<_>>()
            );
        }
        super::wake_helpers(2);
        let failed = std::panic::catch_unwind(|| {
            super::run(2, |id| {
                assert_eq!(id, 0, "worker {id} fails");
                id
            })
        });
        assert!(failed.is_err());
        super::wake_helpers(2);
        assert_eq!(super::run(1, |id| id), vec![0]);
        assert_eq!(super::run(2, |id| id), vec![0, 1]);
        super::wake_helpers(2);
        std::thread::sleep(2 * super::WAKE_AHEAD);
        assert_eq!(super::run(2, |id| id), vec![0, 1]);
    }

    /// Outside any pool, a block's helpers run on a pool of exactly their number when they
    /// fit the cores (an idle extra thread would take a core from them), on a kept pool at
    /// least that large when they outnumber them; inside a pool, on that pool.
    #[test]
    fn helpers_run_on_a_pool_of_their_exact_number() {
        let name = || std::thread::current().name().map(str::to_owned);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for workers in [2, 3, cores + 5] {
            let helpers = workers - 1;
            let pool = super::helpers(helpers).expect("a pool");
            if helpers < cores {
                assert_eq!(pool.current_num_threads(), helpers);
            } else {
                assert!(pool.current_num_threads() >= helpers);
            }
            assert!(std::sync::Arc::ptr_eq(
                &pool,
                &super::helpers(helpers).unwrap()
            ));
            let names = std::thread::spawn(move || super::run(workers, |_| name()))
                .join()
                .unwrap();
            assert_eq!(names[0], None, "worker 0 is the calling thread");
            for helper in &names[1..] {
                let helper = helper.as_deref().unwrap_or_default();
                let exact = format!("parex-{helpers}-");
                let prefix = if helpers < cores {
                    exact.as_str()
                } else {
                    "parex-"
                };
                assert!(helper.starts_with(prefix), "{helper}");
            }
        }
        let own = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .thread_name(|i| format!("own-{i}"))
            .build()
            .unwrap();
        let names = own.install(|| super::run(2, |_| name()));
        assert!(
            names
                .iter()
                .all(|n| n.as_deref().unwrap().starts_with("own-")),
            "{names:?}"
        );
    }

    /// Whatever the workers, claims and range, every index is mapped once and the
    /// results come in index order.
    #[test]
    fn claimed_results_in_index_order() {
        let tracer = crate::trace::Tracer::new(false);
        for workers in [1, 2, 3, 7] {
            for claim in [1, 4, 5] {
                for range in [0..0, 3..4, 10..101, 0..1000] {
                    let calls = std::sync::atomic::AtomicUsize::new(0);
                    let (results, _) = super::map_claimed(
                        workers,
                        range.clone(),
                        claim,
                        &tracer,
                        crate::trace::SpanKind::Hint,
                        |i| {
                            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            format!("r{i}")
                        },
                    );
                    let expected: Vec<String> = range.clone().map(|i| format!("r{i}")).collect();
                    assert_eq!(results, expected, "{workers} workers, claim {claim}");
                    assert_eq!(calls.into_inner(), range.len());
                }
            }
        }
    }

    #[test]
    fn results_in_worker_order() {
        for workers in [1, 2, 3, 40] {
            let got = super::run(workers, |id| id * 10);
            assert_eq!(got, (0..workers).map(|id| id * 10).collect::<Vec<_>>());
        }
    }
}
