//! `block-stm`: optimistic parallel execution with multi-version memory, validation and
//! re-execution (Block-STM, Gelashvili et al. 2022, as in Aptos' block executor).
//!
//! Workers take tasks from the collaborative [`Scheduler`]: *execute* transaction `i`
//! (incarnation `k`) against the [`MvMemory`] as of position `i`, recording its read
//! set (the origin of every value it read) and publishing its writes under `(i, k)`;
//! *validate* `i` by re-reading its read set and comparing origins. A failed validation
//! aborts the incarnation: its writes become estimates and `i` runs again. A read that
//! meets an estimate of `j < i` suspends `i` on `j` (no spinning) until `j` finishes;
//! the worker that finishes `j` then runs the lowest transaction it resumed (what it
//! waited for is in that worker's cache).
//! Transactions sharing a sequence key ([`Vm::sequence_key`], the sender of a nonce
//! sequence) start ordered: before any execution, the earlier one's write of the key is
//! an estimate (a hint: its first execution replaces or removes it), and a worker that
//! draws the later one before the earlier has executed suspends it without running it.
//!
//! Invariants: (1) a transaction's recorded read set and writes belong to the same,
//! latest incarnation; (2) when the scheduler reports done, every transaction's latest
//! incarnation has been executed and validated after every write below it was final,
//! so its reads are exactly the serial ones and no estimate is left; (3) hence the
//! outputs are the serial outputs and the final value of a key is its last write with
//! the later deltas applied, or the pre-block value with all its deltas applied.
//!
//! Adapting to dependent blocks: each worker watches its own share of failed validations
//! and dependency waits; once most of its executions are wasted (a chain of dependent
//! transactions, where speculation only adds work) in three judging windows in a row (of
//! a few dozen executions; an eighth of the block, and at least a dozen, on small blocks;
//! one or two windows could be a conflicting cluster at the start of a block), the other
//! workers stop at their next idle moment and this one finishes the block alone (on slow
//! storage the stopped workers first load, side by side, the pre-block values that the
//! rest of the block declares, so that the lone worker finds them cached: `preloaded`). A
//! lone worker takes tasks in block order, so it executes each transaction only after
//! every one below it is final and meets no new conflict, while every speculative
//! execution that still validates is kept (handing the block to
//! `sequential` instead threw that work away: mainnet block 12244000 then took twice as
//! long as serial execution). A block whose first 64 transactions' declared accesses
//! ([`Vm::declared_access`]) already conflict each with the one before (a chain; the
//! pairs inside a sequence run, below, are one unit's work and are not judged) goes to
//! the `sequential` engine before any speculation (on slow storage the whole block's keys
//! are discovered and read in batches first, [`crate::prefetch::chain_check`]; any other
//! block starts with those values in its memory and needs no discovery of its own). Both
//! are counted in the metrics as
//! `sequential_fallback` (and `finished_alone` for the first).
//!
//! Chunks: on large blocks (4096 transactions and more, on fast storage) the scheduled
//! unit is a run of up to 16 consecutive transactions ([`crate::chunk::ChunkVm`]): a chunk
//! executes its transactions in order on a local overlay and publishes their net writes
//! (the fee credits of all of them as one delta), so scheduling, read-set, validation and
//! multi-version costs are paid per chunk and dependencies inside a chunk cost nothing;
//! a conflict with an earlier chunk re-executes the chunk. Everything above holds with
//! "chunk" for "transaction" (a chunk's execution is a pure function of what it reads).
//! In the metrics of a chunked block, `executions` and `reexecutions` count transactions;
//! `validations`, `validation_failures` and `dependency_waits` count chunks.
//!
//! Heavy first: on blocks scheduled by transaction or sequence run (fast storage), the
//! units that weigh ([`Vm::light_tx_equivalents_of`]) at least 5% of the block, or 2% when
//! in block order they would end it, and would not start at once are executed first, out
//! of turn and in block order, by the last worker (`heavy_first`, metric `heavy_first`):
//! in block order such a transaction starts only when the index reaches it and then runs
//! alone at the end. Block order is only the order in which tasks are offered, so this is
//! exact as any execution is (it reads the memory as of its position and is validated in
//! order); a worker that reaches a unit in order after it was claimed passes over it.
//!
//! Sequence runs: on smaller blocks (fast storage) a sender's run of consecutive light
//! transactions (up to 64; [`crate::chunk::ChunkVm::sequence_runs`]: an exchange's or a
//! pool's payouts, a nonce chain that no worker could run ahead of anyway) is one unit,
//! the other transactions one each: the run is executed by one worker in one go, with
//! one publication of its writes and one round of revalidation above it, instead of a
//! suspension, a publication and a revalidation of everything above at every step, on
//! whichever worker resumed it (mainnet 4330482 opens with 37 payouts from its
//! beneficiary: 0.94x `sequential` before, 0.98x as one unit). Metric `sequence_runs`:
//! the runs made units.
//!
//! Slow storage: when `Storage::read_latency` says reads block (a disk), the engine runs
//! more workers than threads (8 per thread), so that reads overlap while the cores stay
//! busy, after discovery ([`crate::prefetch`], in the chain check, or in the workers
//! themselves when the engine does not adapt): windows of transactions are executed on
//! the cached pre-block values, and the keys they miss are read together, one storage
//! wait for many keys, so that their real executions find most of their keys cached
//! instead of waiting for each (counters `prefetched`, `prefetch_batches`,
//! `discovery_executions`). The
//! multi-version memory then sees every read, so a first execution that writes keys no
//! later transaction has read yet does not send validation back to it (with 32 workers
//! finishing in any order, that re-validated each transaction about seven times).
//! Exact: a later read of such a key is ordered after the write by the key's lock and
//! sees it.
//!
//! Chunks publish each incarnation's writes whole ([`MvMemory::publish`]): the list the
//! chunk's execution returned stays as it is for the keys of buckets no other chunk wrote
//! (its *owner list*), and only the others are filed in the memory's shards.
//!
//! Final state: once the scheduler is done, the workers that are still running resolve
//! the memory's final values side by side ([`MvMemory::drain_final_values`]), each
//! shard's and owner list's straight into a block of the one vector of the state diff ([`crate::gather`];
//! a key's deltas merged into one and applied once), and each frees the read and write
//! sets it recorded, before they return.
//!
//! Errors: a [`VmError`] (or a panic) from speculative execution may be an artefact of
//! inconsistent reads, so it is recorded as that incarnation's output with no writes
//! and validated like any other; once done, the lowest transaction whose final output is
//! an error is exactly where serial execution fails, and that error is returned.

use std::cell::Cell;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use alloy_primitives::map::DefaultHashBuilder;
use crossbeam::utils::Backoff;
use hashbrown::{HashTable, hash_table};
use parex_core::{BlockOutcome, ReadError, ReadView, Storage, TxIndex, Vm, VmError, Write};

use crate::chunk::ChunkVm;
use crate::gather::gather_into;
use crate::mv_memory::{CachedBases, Entry, Incarnation, MvMemory, Origin, Read, append_parts};
use crate::prefetch::ChainCheck;
use crate::scheduler::{Scheduler, Task};
use crate::trace::{Recorder, SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

/// One read of an execution: the key, its hash in the memory ([`MvMemory::hash`]: its
/// validation, at least once per execution, does not hash it again) and where its value
/// came from.
struct ReadRecord<K, V> {
    key: K,
    hash: u64,
    origin: Origin<V>,
}

/// A read set. Slots hold plain vectors, so that a block's slots are small and cheap to
/// create (they are made for every transaction up front); workers swap their buffers in.
type ReadSet<V> = Vec<ReadRecord<<V as Vm>::Key, <V as Vm>::Value>>;
/// An incarnation's writes, as the VM returns them.
type Writes<V> = Vec<(<V as Vm>::Key, Write<<V as Vm>::Value, <V as Vm>::Delta>)>;
/// The keys an incarnation wrote.
type KeySet<V> = Vec<<V as Vm>::Key>;

/// What the latest recorded incarnation of a transaction read, wrote and produced.
struct TxSlot<V: Vm> {
    reads: ReadSet<V>,
    written: KeySet<V>,
    output: Option<Result<V::Output, VmError>>,
    /// The worker that recorded it, whose allocations the two sets are (it frees them at
    /// the end: see [`execute_units`]).
    recorder: usize,
}

struct BlockStm<'a, V: Vm, S> {
    vm: &'a V,
    storage: &'a S,
    memory: MvMemory<V::Key, V::Value, V::Delta>,
    scheduler: Scheduler,
    slots: Box<[Mutex<TxSlot<V>>]>,
    /// Set when a worker finds speculation mostly wasted and goes on alone (see the
    /// module documentation); the other workers then stop.
    gave_up: AtomicBool,
    adaptive: bool,
    /// Workers running the block (see [`give_up_waste`]).
    workers: usize,
    /// Executions in a worker's judging window (see [`judge_interval`]).
    judge_interval: u64,
    /// More workers than threads (slow storage): idle workers sleep rather than spin.
    oversubscribed: bool,
    /// The next transaction whose declared keys a stopped worker loads (slow storage; see
    /// [`BlockStm::load_declared`]).
    next_declared: AtomicUsize,
    /// Slow storage: workers first run discovery on these windows ([`crate::prefetch`]).
    discovery: Option<crate::prefetch::Windows>,
    /// Per transaction, the nearest earlier one with its sequence key, if any (see
    /// [`BlockStm::seed_sequence_estimates`]; empty on chunked blocks).
    sequence_predecessors: Box<[Option<u32>]>,
    /// The units the last worker executes first, out of turn
    /// ([`crate::heavy::heavy_first`]).
    heavy_first: Box<[TxIndex]>,
    tracer: Tracer,
}

/// A worker judges its speculation in windows of this many executions of its own (at
/// most; on blocks of fewer than `8 * JUDGE_AFTER` units, an eighth of the block's units,
/// but no fewer than `MIN_JUDGE_AFTER`: a small block's waste is a large share of it)...
const JUDGE_AFTER: u64 = 48;
const MIN_JUDGE_AFTER: u64 = 12;
/// ...calls a window wasted when at least this share of its executions failed validation
/// or had to wait...
const GIVE_UP_WASTE: f64 = 0.3;
/// ...and gives up after this many wasted windows in a row. One is not enough: mainnet
/// blocks tend to open with a cluster of conflicting transactions (arbitrage and bundles
/// on the same pools) and then spread out; judged on its first window alone, block-stm
/// gave up on blocks with an analysis bound of 2.0 (19932148, 18988207) and ran them at
/// sequential's speed. Nor are two: 5526571 (143 transactions, 31 paying one account,
/// bound 1.54x) gave up after two windows of 17 executions in some runs (0.96x) and not in
/// others (1.22x).
const WASTED_WINDOWS_TO_GIVE_UP: u32 = 3;

/// A worker's reusable buffers and its share of the metrics.
struct Worker<V: Vm> {
    /// The worker's number (its count of tasks in flight, its lane of each of the memory's
    /// delta sinks).
    id: usize,
    reads: ReadSet<V>,
    keys: KeySet<V>,
    metrics: Metrics,
    dependency_retries: u64,
    /// Dependency waits on the transaction's own sequence key (see
    /// [`BlockStm::seed_sequence_estimates`]): expected, and cheap (taken before the
    /// execution, or at its first read).
    sequence_waits: u64,
    /// Pre-block values this worker loaded (a shared counter would bounce between cores).
    storage_reads: u64,
    /// Of those, the ones it loaded for the lone worker ([`BlockStm::load_declared`]).
    preloaded: u64,
    /// What its discovery prefetched (slow storage; [`crate::prefetch`]).
    discovered: crate::prefetch::Discovered,
    judge: WasteJudge,
    /// The transactions this worker recorded, in order (repeats included): it frees their
    /// sets at the end.
    recorded: Vec<TxIndex>,
    /// Dependents of transactions this worker executed, claimed for it by the scheduler
    /// ([`Scheduler::finish_execution`]): its next tasks once the current one is done
    /// (a validation can end in a re-execution that claims another before they run).
    resumed: Vec<Task>,
    clock: PhaseClock,
    trace: Recorder,
}

/// Phase times of one worker, from the CPU's timestamp counter where there is one (a
/// few nanoseconds per reading: tasks take microseconds), scaled to wall time at the end.
struct PhaseClock {
    started: Instant,
    started_ticks: u64,
    last: u64,
    execution: u64,
    validation: u64,
    scheduling: u64,
}

impl PhaseClock {
    #[inline]
    fn ticks() -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: RDTSC has no preconditions on x86-64.
            #[allow(unused_unsafe)]
            unsafe {
                std::arch::x86_64::_rdtsc()
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
        }
    }

    fn new() -> Self {
        let ticks = Self::ticks();
        Self {
            started: Instant::now(),
            started_ticks: ticks,
            last: ticks,
            execution: 0,
            validation: 0,
            scheduling: 0,
        }
    }

    /// Ticks since the previous lap.
    #[inline]
    fn lap(&mut self) -> u64 {
        let now = Self::ticks();
        let elapsed = now.wrapping_sub(self.last);
        self.last = now;
        elapsed
    }

    fn write_to(&self, metrics: &mut Metrics) {
        let ticks = Self::ticks().wrapping_sub(self.started_ticks).max(1);
        let ns_per_tick = self.started.elapsed().as_nanos() as f64 / ticks as f64;
        let duration = |t: u64| Duration::from_nanos((t as f64 * ns_per_tick) as u64);
        metrics.execution_time = duration(self.execution);
        metrics.validation_time = duration(self.validation);
        metrics.scheduling_time = duration(self.scheduling);
    }
}

/// How the engine runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Hand blocks on which speculation is mostly wasted to `sequential` (see the module
    /// documentation). Tests turn it off to exercise conflict handling on any block.
    pub adaptive: bool,
    /// Transactions per scheduled unit ([`crate::chunk::ChunkVm`]); `None`: chosen from the block's
    /// size and the storage (see [`crate::chunk::chunk_size`]).
    pub chunk_size: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            adaptive: true,
            chunk_size: None,
        }
    }
}

/// Executes the block with Block-STM on `run.threads` workers (adaptive).
pub fn execute<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    execute_with(vm, storage, run, Options::default())
}

/// Executes the block with Block-STM on `run.threads` workers.
pub fn execute_with<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
    options: Options,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let slow_storage = storage.read_latency() >= crate::workers::SLOW_READ;
    let workers = if slow_storage {
        crate::prefetch::workers(run.threads, n)
    } else {
        run.workers_by_work(vm, storage)
    };
    // The declarations already say the block is a chain: skip the speculation. On slow
    // storage the whole block's keys are discovered and read in batches first
    // (speculating instead also read them many at a time, but spent the cores on
    // executions that failed validation: 1000 dependent transfers at 100 us per read ran
    // 12-27x faster than `sequential` that way, 22-32x in order).
    let extra = [
        ("workers", 1),
        ("chunk_size", 1),
        ("sequence_runs", 0),
        ("dependency_retries", 0),
        ("storage_reads", 0),
        ("preloaded", 0),
    ];
    let chunk = options
        .chunk_size
        .unwrap_or_else(|| crate::chunk::chunk_size(n, workers, slow_storage))
        .max(1);
    // A sender's run of light transactions is one unit (see `ChunkVm::sequence_runs`),
    // unless the caller fixed the unit size.
    let sequence_runs_are_units = chunk == 1 && options.chunk_size.is_none() && !slow_storage;
    // Not a chain on slow storage: the memory starts with the pre-block values that the
    // chain check discovered for the whole block, and the metrics count their reads.
    let (cached, judging) = if options.adaptive && slow_storage {
        let in_order = |cached: &_| crate::sequential::in_order(vm, cached, run, &extra);
        match crate::prefetch::chain_check(vm, storage, run.threads, in_order) {
            ChainCheck::Chain(result) => return result,
            ChainCheck::NotChain(cache, pass) => (cache.into_cached(), pass),
        }
    } else if options.adaptive
        && crate::declared::declared_chain(vm, storage, workers, sequence_runs_are_units)
    {
        let extra = [&extra[..], &crate::prefetch::Discovered::default().extras()].concat();
        return crate::sequential::in_order(vm, storage, run, &extra);
    } else {
        Default::default()
    };
    // Not a chain: the helpers wake while the block's structures are set up.
    crate::workers::wake_helpers(workers);
    let sizes = Sizes {
        // Three keys per light transaction; a large block (chunked) counts its heavy ones
        // by their light equivalents: 9493 swaps write about seven keys each, and with
        // three the shards' tables grew, copying their states (0.4% of the block).
        keys: 3 * if chunk > 1 {
            vm.light_tx_equivalents()
        } else {
            n
        },
        workers,
        // On slow storage, unless the chain check discovered the whole block already.
        discover: slow_storage && !options.adaptive,
        // A chunk of 16 writes a list of some 30 to 100 keys, filed in the shards one by
        // one otherwise (a lookup in a shard's table of positions and a 192-byte state
        // each); a single transaction writes a handful, and its list would cost more to
        // keep and to drain than its keys cost to file (mainnet block 14396881: the final
        // assembly took 0.44 ms instead of 0.2).
        owner_lists: chunk > 1,
    };
    if chunk == 1 {
        // One transaction per unit, except that a sender's run of consecutive transactions
        // (a nonce chain) is one unit.
        let runs = sequence_runs_are_units
            .then(|| ChunkVm::sequence_runs(vm))
            .flatten();
        if let Some(runs) = runs {
            return crate::chunk::run_chunked(runs, |units| {
                execute_units(units, storage, run, options.adaptive, true, sizes, cached)
            });
        }
        let (outcome, mut metrics) =
            execute_units(vm, storage, run, options.adaptive, true, sizes, cached)?;
        metrics.extra.push(("chunk_size", 1));
        metrics.extra.push(("sequence_runs", 0));
        metrics.add_extra("storage_reads", judging.found.keys);
        return judging.added_to(Ok((outcome, metrics)));
    }
    crate::chunk::run_chunked(ChunkVm::new(vm, chunk), |chunks| {
        execute_units(chunks, storage, run, options.adaptive, false, sizes, cached)
    })
}

/// What [`execute_units`] sizes from the block's transactions (not its units).
#[derive(Clone, Copy)]
struct Sizes {
    /// Expected keys in the multi-version memory.
    keys: usize,
    workers: usize,
    /// Workers first run discovery ([`crate::prefetch`]).
    discover: bool,
    /// Units keep the writes of keys only they wrote in lists of their own
    /// ([`MvMemory::with_owners`]): chunks, not single transactions.
    owner_lists: bool,
}

/// Block-STM over the units of `vm` (transactions, or chunks of them).
fn execute_units<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
    adaptive: bool,
    sequence_dependencies: bool,
    Sizes {
        keys,
        workers,
        discover,
        owner_lists,
    }: Sizes,
    cached: CachedBases<V::Key, V::Value>,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let slow_storage = storage.read_latency() >= crate::workers::SLOW_READ;
    let memory = MvMemory::new(keys, slow_storage).with_sinks(vm.delta_sinks(), workers, n);
    let memory = if owner_lists {
        memory.with_owners(n)
    } else {
        memory
    };
    memory.seed_bases(cached);
    let mut engine = BlockStm {
        vm,
        storage,
        memory,
        scheduler: Scheduler::new(n, workers),
        slots: (0..n)
            .map(|_| {
                Mutex::new(TxSlot {
                    reads: Vec::new(),
                    written: Vec::new(),
                    output: None,
                    recorder: 0,
                })
            })
            .collect(),
        gave_up: AtomicBool::new(false),
        adaptive,
        workers,
        judge_interval: judge_interval(n),
        oversubscribed: workers > run.threads.max(1),
        next_declared: AtomicUsize::new(0),
        discovery: discover.then(|| crate::prefetch::Windows::new(n, workers)),
        sequence_predecessors: Box::default(),
        // Units of one transaction or a sequence run each (not fixed chunks, whose weights
        // even out), on fast storage (slow storage runs many workers, each waiting on reads).
        heavy_first: if workers > 1 && sequence_dependencies && !slow_storage {
            crate::heavy::heavy_first(vm, workers)
        } else {
            Box::default()
        },
        tracer: Tracer::new(run.trace),
    };
    let sequenced = if sequence_dependencies {
        engine.seed_sequence_estimates()
    } else {
        0
    };
    // Once done, the workers assemble the final state side by side, each taking shards of
    // the memory until none is left (a worker that stopped early takes none), then each
    // frees the read and write sets it recorded (still in its caches, and freed by the
    // thread that allocated them: freeing them in shared turns took 87 of the 164 us each
    // worker spent on 14396881's end, a third of the frees going to the other thread's
    // heap). Sets whose recorder stopped early are freed with the slots.
    let next_shard = AtomicUsize::new(0);
    // The final values go straight into one vector, a block of it per shard (room for
    // twice the keys the block was expected to write, never touched unless written; any
    // beyond are kept apart and appended).
    let mut state_diff = Vec::new();
    let results = gather_into(&mut state_diff, 2 * keys, |out| {
        crate::workers::run(workers, |id| {
            let (mut metrics, recorded) = engine.work(id);
            if !engine.scheduler.completed() {
                return (metrics, None);
            }
            let mut trace = engine.tracer.recorder(id);
            let span = trace.start();
            let started = Instant::now();
            let part = engine.memory.drain_final_values(
                &next_shard,
                out,
                |k| storage.read(k),
                |k, v, d| vm.apply_delta(k, v, d),
                |earlier, later| vm.merge_deltas(earlier, later),
            );
            for tx in recorded {
                let mut slot = engine.slots[tx].lock().unwrap_or_else(|e| e.into_inner());
                // Recorded again by another worker since: that one frees it.
                if slot.recorder == id {
                    drop(std::mem::take(&mut slot.reads));
                    drop(std::mem::take(&mut slot.written));
                }
            }
            metrics.finalize_time += started.elapsed();
            trace.record(SpanKind::Finalize, None, span);
            engine.tracer.submit(trace);
            (metrics, Some(part))
        })
    });
    let mut worker_metrics = Vec::with_capacity(results.len());
    let mut parts = Vec::with_capacity(results.len());
    for (metrics, part) in results {
        worker_metrics.push(metrics);
        parts.extend(part);
    }
    let finalize_started = Instant::now();
    let mut finalize_trace = engine.tracer.recorder(0);
    let finalize_span = finalize_trace.start();
    let mut metrics = Metrics::default();
    let mut dependency_retries = 0;
    let mut sequence_waits = 0;
    let mut storage_reads = 0;
    let mut preloaded = 0;
    let mut discovered = crate::prefetch::Discovered::default();
    for w in worker_metrics {
        metrics.add_counts(&w);
        dependency_retries += w.extra("dependency_retries").unwrap_or(0);
        sequence_waits += w.extra("sequence_waits").unwrap_or(0);
        storage_reads += w.extra("storage_reads").unwrap_or(0);
        preloaded += w.extra("preloaded").unwrap_or(0);
        discovered += crate::prefetch::Discovered::from_metrics(&w);
    }
    metrics.reexecutions = metrics.executions.saturating_sub(n as u64);
    let finished_alone = u64::from(engine.gave_up.load(Relaxed));
    let BlockStm {
        memory,
        slots,
        heavy_first,
        tracer,
        ..
    } = engine;
    let mut outputs = Vec::with_capacity(n);
    for slot in slots.into_vec() {
        let slot = slot.into_inner().unwrap_or_else(|e| e.into_inner());
        match slot
            .output
            .expect("every transaction is executed before the scheduler is done")
        {
            Ok(output) => outputs.push(output),
            Err(e) => return Err(e.into()),
        }
    }
    vm.finalize_outputs(&mut outputs)?;
    drop(memory);
    // The worker that completed the block drained the memory (or its part of it).
    assert!(!parts.is_empty(), "no worker assembled the final state");
    let state_diff =
        append_parts(state_diff, parts).map_err(|e| VmError::Read(ReadError::Storage(e)))?;
    metrics.finalize_time += finalize_started.elapsed();
    finalize_trace.record(SpanKind::Finalize, None, finalize_span);
    tracer.submit(finalize_trace);
    metrics.trace = tracer.finish();
    metrics.extra = vec![
        ("sequential_fallback", finished_alone),
        ("finished_alone", finished_alone),
        ("workers", workers as u64),
        ("dependency_retries", dependency_retries),
        ("storage_reads", storage_reads),
        ("preloaded", preloaded),
        ("sequenced", sequenced),
        ("sequence_waits", sequence_waits),
        ("heavy_first", heavy_first.len() as u64),
    ];
    metrics.extra.extend(discovered.extras());
    Ok((
        BlockOutcome {
            tx_outcomes: outputs,
            state_diff,
        },
        metrics,
    ))
}

/// The fallback rule, per worker: its executions are judged in windows of `interval`,
/// a window is wasted when at least [`give_up_waste`] of its executions failed
/// validation or waited on a dependency, and the worker gives up after
/// `WASTED_WINDOWS_TO_GIVE_UP` wasted windows in a row.
struct WasteJudge {
    interval: u64,
    threshold: f64,
    /// The worker's totals when the current window opened.
    window_executions: u64,
    window_wasted: u64,
    /// Wasted windows in a row, up to the current one.
    wasted_windows: u32,
}

impl WasteJudge {
    fn new(interval: u64, workers: usize) -> Self {
        Self {
            interval: interval.max(1),
            threshold: give_up_waste(workers),
            window_executions: 0,
            window_wasted: 0,
            wasted_windows: 0,
        }
    }

    /// Whether to give up, given the worker's totals so far (cheap: called between tasks).
    fn give_up(&mut self, executions: u64, wasted: u64) -> bool {
        let done = executions - self.window_executions;
        if done < self.interval {
            return false;
        }
        let window_waste = wasted.saturating_sub(self.window_wasted);
        if window_waste as f64 >= self.threshold * done as f64 {
            self.wasted_windows += 1;
        } else {
            self.wasted_windows = 0;
        }
        self.window_executions = executions;
        self.window_wasted = wasted;
        self.wasted_windows >= WASTED_WINDOWS_TO_GIVE_UP
    }
}

/// Executions in a worker's judging window on a block of `units` units.
fn judge_interval(units: usize) -> u64 {
    (units as u64 / 8).clamp(MIN_JUDGE_AFTER, JUDGE_AFTER)
}

/// The share of wasted executions at which `workers` workers stop speculating: where
/// their useful work falls to about one worker's (a worker runs at roughly 0.7 of
/// `sequential`'s speed on light transactions), from `GIVE_UP_WASTE` with two workers
/// up to 0.8 with many (on slow storage even a chain's wasted executions overlap its
/// reads, which serial execution would wait for one by one).
fn give_up_waste(workers: usize) -> f64 {
    (1.0 - 1.4 / workers.max(1) as f64).clamp(GIVE_UP_WASTE, 0.8)
}

/// Stops the other workers if this one unwinds, so that the block fails instead of hanging.
struct HaltOnPanic<'a>(&'a Scheduler);

impl Drop for HaltOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.halt();
        }
    }
}

impl<V, S> BlockStm<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    /// Makes each transaction that shares its sequence key ([`Vm::sequence_key`]) with an
    /// earlier one wait for the nearest such: an estimate of that one's write is left
    /// under the key (and the key counted as written by it, so that its first recorded
    /// execution replaces or removes the estimate), and the earlier one is recorded as
    /// its predecessor, so that a worker that draws it while the predecessor has not
    /// executed suspends it at once instead of running it up to its first read (see
    /// [`BlockStm::wait_for_predecessor`]). Returns the transactions so ordered.
    fn seed_sequence_estimates(&mut self) -> u64 {
        let n = self.vm.tx_count();
        // Each sequence key's latest transaction so far, found by the key's hash (an
        // entry of 16 bytes, not a key's 64: this pass is serial setup, before any
        // worker starts, and a block's senders are mostly distinct).
        let hasher = DefaultHashBuilder::default();
        let mut last: HashTable<(u64, TxIndex)> = HashTable::with_capacity(n);
        let mut predecessors = vec![None; n];
        let mut sequenced = 0;
        for (tx, predecessor) in predecessors.iter_mut().enumerate() {
            let Some(key) = self.vm.sequence_key(tx) else {
                continue;
            };
            let hash = hasher.hash_one(&key);
            let earlier = match last.entry(hash, |&(h, _)| h == hash, |&(h, _)| h) {
                hash_table::Entry::Occupied(mut entry) => {
                    std::mem::replace(&mut entry.get_mut().1, tx)
                }
                hash_table::Entry::Vacant(entry) => {
                    entry.insert((hash, tx));
                    continue;
                }
            };
            // Another key of the same hash (vanishingly rare) orders nothing.
            if self.vm.sequence_key(earlier).as_ref() != Some(&key) {
                continue;
            }
            let mut slot = self.slots[earlier]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            slot.written.push(key.clone());
            let _ = self.memory.write(key, earlier, Entry::Estimate, 0);
            *predecessor = u32::try_from(earlier).ok();
            sequenced += 1;
        }
        self.sequence_predecessors = predecessors.into_boxed_slice();
        sequenced
    }

    /// Suspends `tx` (drawn for execution) until its sequence predecessor has executed, if
    /// that one has not yet: its execution would read the predecessor's estimate first
    /// thing and be void (a blocked execution of a light transaction cost 4 us on
    /// 14396881). Waiting is never wrong, only later than needed: a transaction waits
    /// only for an earlier one, which never waits for it. Returns whether it suspended.
    fn wait_for_predecessor(&self, tx: TxIndex, w: &mut Worker<V>) -> bool {
        let Some(&Some(earlier)) = self.sequence_predecessors.get(tx) else {
            return false;
        };
        let earlier = earlier as TxIndex;
        if self.scheduler.executed(earlier) {
            return false;
        }
        let span = w.trace.start();
        if !self.scheduler.add_dependency(tx, earlier, w.id) {
            return false;
        }
        w.trace.record(SpanKind::Blocked, Some(tx), span);
        w.metrics.dependency_waits += 1;
        w.sequence_waits += 1;
        true
    }

    /// One worker's loop: run tasks until the scheduler is done. Returns its metrics and
    /// the transactions it recorded.
    fn work(&self, id: usize) -> (Metrics, Vec<TxIndex>) {
        let _halt = HaltOnPanic(&self.scheduler);
        let mut w = Worker::<V> {
            id,
            reads: Vec::new(),
            keys: Vec::new(),
            metrics: Metrics::default(),
            dependency_retries: 0,
            sequence_waits: 0,
            storage_reads: 0,
            preloaded: 0,
            discovered: Default::default(),
            judge: WasteJudge::new(self.judge_interval, self.workers),
            recorded: Vec::new(),
            resumed: Vec::new(),
            clock: PhaseClock::new(),
            trace: self.tracer.recorder(id),
        };
        if let Some(windows) = &self.discovery {
            w.discovered = crate::prefetch::discover(
                self.vm,
                self.storage,
                &self.memory,
                windows,
                || self.scheduler.done(),
                &mut w.trace,
            );
            w.storage_reads += w.discovered.keys;
            w.clock.execution += w.clock.lap();
        }
        let backoff = Backoff::new();
        // The last worker starts with the heavy units, if there are any (worker 0 starts
        // the block's order).
        let mut heavy: &[TxIndex] = if id + 1 == self.workers {
            &self.heavy_first
        } else {
            &[]
        };
        let mut task = None;
        // This worker judged speculation wasted and finishes the block by itself.
        let mut alone = false;
        loop {
            task = match task {
                Some(Task::Execute(tx, incarnation)) => self.try_execute(tx, incarnation, &mut w),
                Some(Task::Validate(tx, incarnation)) => self.validate(tx, incarnation, &mut w),
                None if !w.resumed.is_empty() => w.resumed.pop(),
                // (None once a worker has given up speculating and finishes in order.)
                None if !heavy.is_empty() && !self.gave_up.load(Relaxed) => {
                    let unit = heavy[0];
                    heavy = &heavy[1..];
                    self.scheduler.claim_out_of_turn(unit, w.id)
                }
                None => {
                    if self.scheduler.done() {
                        break;
                    }
                    if !alone {
                        if self.gave_up.load(Relaxed) {
                            // Another worker goes on alone; this one holds no task.
                            self.load_declared(&mut w);
                            break;
                        }
                        if self.speculation_wasted(&mut w) {
                            alone = !self.gave_up.swap(true, Relaxed);
                            if !alone {
                                self.load_declared(&mut w);
                                break;
                            }
                        }
                    }
                    let span = w.trace.start();
                    let next = self.scheduler.next_task(w.id);
                    if next.is_some() {
                        backoff.reset();
                    } else {
                        crate::workers::idle(&backoff, self.oversubscribed);
                        w.trace.record(SpanKind::Wait, None, span);
                    }
                    w.clock.scheduling += w.clock.lap();
                    next
                }
            };
        }
        w.clock.write_to(&mut w.metrics);
        self.tracer
            .submit(std::mem::replace(&mut w.trace, Recorder::off()));
        w.metrics.extra = vec![
            ("dependency_retries", w.dependency_retries),
            ("sequence_waits", w.sequence_waits),
            ("storage_reads", w.storage_reads),
            ("preloaded", w.preloaded),
        ];
        w.metrics.extra.extend(w.discovered.extras());
        (w.metrics, w.recorded)
    }

    /// Whether this worker should give up speculating ([`WasteJudge`]; only its own
    /// counters: no shared traffic). Waits on a transaction's own sequence key are not
    /// waste: they happen at its first read.
    fn speculation_wasted(&self, w: &mut Worker<V>) -> bool {
        let m = &w.metrics;
        self.adaptive
            && w.judge.give_up(
                m.executions,
                m.validation_failures + m.dependency_waits - w.sequence_waits,
            )
    }

    /// What a worker does when another goes on alone, on slow storage (where workers
    /// outnumber threads): loads into the memory, side by side with the other stopped
    /// workers, the pre-block values of the keys the rest of the block declares
    /// ([`Vm::declared_access`], and what declaring reads), so that the lone worker finds
    /// them cached instead of waiting for each in turn. Pre-block values never change, so
    /// loading them early changes no result; on fast storage it would only add work.
    fn load_declared(&self, w: &mut Worker<V>) {
        if !self.oversubscribed {
            return;
        }
        let n = self.vm.tx_count();
        let mut view = PreBlockValues {
            engine: self,
            loads: Cell::new(0),
        };
        while !self.scheduler.done() {
            let tx = self.next_declared.fetch_add(1, Relaxed);
            if tx >= n {
                break;
            }
            // Declarations are hints: a VM that panics declaring ends the preloading, and
            // the lone worker meets (and reports) whatever is wrong with the transaction.
            let Ok(declared) =
                catch_unwind(AssertUnwindSafe(|| self.vm.declared_access(tx, &mut view)))
            else {
                break;
            };
            for (key, _) in declared {
                // A failed load fails the transaction that reads the key, in order.
                let _ = view.read(&key);
            }
        }
        w.storage_reads += view.loads.get();
        w.preloaded += view.loads.get();
    }

    /// Executes `tx`'s `incarnation`, records it, and reports it to the scheduler.
    fn try_execute(
        &self,
        tx: TxIndex,
        incarnation: Incarnation,
        w: &mut Worker<V>,
    ) -> Option<Task> {
        if self.wait_for_predecessor(tx, w) {
            return None;
        }
        loop {
            let span = w.trace.start();
            w.reads.clear();
            w.reads.reserve(8);
            let mut view = View {
                engine: self,
                tx,
                reads: &mut w.reads,
                blocked: None,
                blocked_on_sequence: false,
                storage_reads: &mut w.storage_reads,
            };
            let result = crate::execute_caught(self.vm, tx, &mut view);
            let blocked = view.blocked;
            let blocked_on_sequence = view.blocked_on_sequence;
            w.metrics.executions += 1;
            if let Some(blocking_tx) = blocked {
                // Whatever the VM made of the blocked read, this execution is void.
                w.clock.execution += w.clock.lap();
                w.trace.record(SpanKind::Blocked, Some(tx), span);
                if self.scheduler.add_dependency(tx, blocking_tx, w.id) {
                    w.metrics.dependency_waits += 1;
                    w.sequence_waits += u64::from(blocked_on_sequence);
                    return None;
                }
                w.dependency_retries += 1;
                continue;
            }
            let (writes, output) = match result {
                Ok(execution) => (execution.writes, Ok(execution.output)),
                Err(error) => (Vec::new(), Err(error)),
            };
            let wrote_new_path = self.record(tx, incarnation, writes, output, w);
            // Reporting to the scheduler counts as part of the task (one clock reading).
            let (next, resumed) =
                self.scheduler
                    .finish_execution(tx, incarnation, wrote_new_path, w.id);
            w.resumed.extend(resumed);
            w.clock.execution += w.clock.lap();
            let kind = if incarnation == 0 {
                SpanKind::Execute
            } else {
                SpanKind::Reexecute
            };
            w.trace.record(kind, Some(tx), span);
            return next;
        }
    }

    /// Publishes an incarnation's writes (removing those of the previous incarnation it
    /// did not repeat) and stores its read set and output. Returns whether it wrote a key
    /// the previous incarnation did not and that a later transaction may have read
    /// already (on slow storage the memory knows which keys were read above `tx`: a new
    /// key none of them read needs none of them validated again).
    fn record(
        &self,
        tx: TxIndex,
        incarnation: Incarnation,
        writes: Writes<V>,
        output: Result<V::Output, VmError>,
        w: &mut Worker<V>,
    ) -> bool {
        let mut slot = self.slots[tx].lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut *slot;
        w.keys.clear();
        let mut read_above = false;
        if self.memory.owns_writes() {
            // Published whole; on fast storage any later transaction may have read past.
            w.keys.extend(writes.iter().map(|(key, _)| key.clone()));
            self.memory.publish(tx, incarnation, writes, w.id);
            read_above = true;
        } else {
            for (key, write) in writes {
                w.keys.push(key.clone());
                let entry = match write {
                    Write::Put(value) => Entry::Write(incarnation, value),
                    Write::Delta(delta) => Entry::Delta(incarnation, delta),
                };
                read_above |= self.memory.write(key, tx, entry, w.id);
            }
        }
        let previous = &slot.written;
        let wrote_new_path = if previous.is_empty() {
            !w.keys.is_empty()
        } else if previous.len() * w.keys.len() <= 256 {
            for key in previous {
                if !w.keys.contains(key) {
                    self.memory.remove(key, tx);
                }
            }
            w.keys.iter().any(|k| !previous.contains(k))
        } else {
            let new: HashSet<&V::Key> = w.keys.iter().collect();
            for key in previous {
                if !new.contains(key) {
                    self.memory.remove(key, tx);
                }
            }
            let previous: HashSet<&V::Key> = previous.iter().collect();
            w.keys.iter().any(|k| !previous.contains(k))
        };
        std::mem::swap(&mut slot.written, &mut w.keys);
        std::mem::swap(&mut slot.reads, &mut w.reads);
        // The vectors swapped in are the previous incarnation's (none, mostly): the next
        // execution starts with room for as many keys as this one had, so that its read set
        // is allocated once instead of growing from nothing (a chunk reads about 50 keys).
        w.keys.clear();
        w.keys.reserve(slot.written.len());
        w.reads.clear();
        w.reads.reserve(slot.reads.len());
        slot.output = Some(output);
        slot.recorder = w.id;
        w.recorded.push(tx);
        wrote_new_path && read_above
    }

    /// Validates `tx`'s `incarnation`; on failure aborts it (its writes become estimates).
    fn validate(&self, tx: TxIndex, incarnation: Incarnation, w: &mut Worker<V>) -> Option<Task> {
        let span = w.trace.start();
        w.metrics.validations += 1;
        let slot = self.slots[tx].lock().unwrap_or_else(|e| e.into_inner());
        let valid = slot.reads.iter().all(|r| {
            self.memory.validate_hashed(
                &r.key,
                r.hash,
                tx,
                &r.origin,
                |k| self.storage.read(k),
                |k, v, d| self.vm.apply_delta(k, v, d),
            )
        });
        let aborted = !valid && self.scheduler.try_validation_abort(tx, incarnation);
        if !valid {
            w.metrics.validation_failures += 1;
        }
        if aborted {
            for key in &slot.written {
                self.memory.mark_estimate(key, tx);
            }
        }
        drop(slot);
        let next = self.scheduler.finish_validation(tx, aborted, w.id);
        w.clock.validation += w.clock.lap();
        w.trace.record(SpanKind::Validate, Some(tx), span);
        next
    }
}

/// The state as transaction `tx` sees it, recording what it reads.
struct View<'a, 'e, V: Vm, S> {
    engine: &'a BlockStm<'e, V, S>,
    tx: TxIndex,
    reads: &'a mut ReadSet<V>,
    /// Set once a read meets an estimate: the execution is void from then on.
    blocked: Option<TxIndex>,
    /// Whether that read was of the transaction's own sequence key.
    blocked_on_sequence: bool,
    /// The worker's count of pre-block values loaded.
    storage_reads: &'a mut u64,
}

impl<V, S> ReadView<V::Key, V::Value> for View<'_, '_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        if let Some(blocking_tx) = self.blocked {
            return Err(ReadError::Blocked { blocking_tx });
        }
        let engine = self.engine;
        let loads = Cell::new(0);
        let hash = engine.memory.hash(key);
        let read = engine.memory.read_hashed(
            key,
            hash,
            self.tx,
            |k| {
                loads.set(loads.get() + 1);
                engine.storage.read(k)
            },
            |k, v, d| engine.vm.apply_delta(k, v, d),
        );
        *self.storage_reads += loads.get();
        match read {
            Read::Value(value, origin) => {
                self.reads.push(ReadRecord {
                    key: key.clone(),
                    hash,
                    origin,
                });
                value.map_err(ReadError::Storage)
            }
            Read::Blocked(blocking_tx) => {
                self.blocked = Some(blocking_tx);
                self.blocked_on_sequence = engine.vm.sequence_key(self.tx).as_ref() == Some(key);
                Err(ReadError::Blocked { blocking_tx })
            }
        }
    }
}

/// The pre-block state through the memory's cache of pre-block values (what
/// [`BlockStm::load_declared`] declares through).
struct PreBlockValues<'e, 'a, V: Vm, S> {
    engine: &'e BlockStm<'a, V, S>,
    /// Values loaded from storage.
    loads: Cell<u64>,
}

impl<V, S> ReadView<V::Key, V::Value> for PreBlockValues<'_, '_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        let engine = self.engine;
        let loads = &self.loads;
        let value = engine.memory.pre_block(key, |k| {
            loads.set(loads.get() + 1);
            engine.storage.read(k)
        });
        value.map_err(ReadError::Storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `windows` windows of `J` executions with `wasted[k]` wasted in window `k`
    /// to a judge for `workers` workers (checking between every execution, as workers
    /// do); returns the window in which it gave up.
    fn gives_up_in(workers: usize, wasted: &[u64]) -> Option<usize> {
        const J: u64 = JUDGE_AFTER;
        let mut judge = WasteJudge::new(J, workers);
        let (mut executions, mut total_wasted) = (0, 0);
        for (window, &w) in wasted.iter().enumerate() {
            for e in 0..J {
                executions += 1;
                total_wasted += u64::from(e < w);
                if judge.give_up(executions, total_wasted) {
                    return Some(window);
                }
            }
        }
        None
    }

    #[test]
    fn fallback_rule() {
        const J: u64 = JUDGE_AFTER;
        // A chain: about half the executions fail, window after window. One window is
        // not enough to tell.
        assert_eq!(gives_up_in(2, &[J / 2]), None);
        assert_eq!(gives_up_in(2, &[J / 2; 4]), Some(2));
        assert_eq!(gives_up_in(2, &[J, J]), None);
        assert_eq!(gives_up_in(2, &[J, J, J]), Some(2));
        // A block that opens with a conflicting cluster and then spreads out.
        assert_eq!(gives_up_in(2, &[J - 1, J / 10, J / 10, J / 10]), None);
        // Wasted windows must follow each other.
        assert_eq!(gives_up_in(2, &[J / 2, 0, J / 2, J / 2, 0, J / 2]), None);
        assert_eq!(gives_up_in(2, &[J / 2, 0, J / 2, J / 2, J / 2]), Some(4));
        // Ordinary contention is tolerated.
        assert_eq!(gives_up_in(2, &[J / 10; 10]), None);
        assert_eq!(gives_up_in(2, &[J / 4; 10]), None);
        // Many workers tolerate more waste, up to a point.
        assert_eq!(give_up_waste(1), GIVE_UP_WASTE);
        assert!((give_up_waste(2) - GIVE_UP_WASTE).abs() < 1e-9);
        assert_eq!(gives_up_in(8, &[J / 2; 4]), None);
        assert_eq!(gives_up_in(32, &[J - 1; 4]), Some(2));
        // Small blocks are judged in shorter windows, large ones in JUDGE_AFTER.
        assert_eq!(judge_interval(40), MIN_JUDGE_AFTER);
        assert_eq!(judge_interval(160), 20);
        assert_eq!(judge_interval(100_000), J);
        let mut judge = WasteJudge::new(judge_interval(160), 2);
        assert!(!judge.give_up(19, 19));
        assert!(!judge.give_up(20, 10));
        assert!(!judge.give_up(40, 20));
        assert!(judge.give_up(60, 30));
    }
}
