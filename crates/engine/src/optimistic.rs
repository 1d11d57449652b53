//! `optimistic`: execute every transaction in parallel on a stale state, then merge the
//! results in block order (Monad's optimistic execution).
//!
//! Pre-executors claim transactions in block order and execute them on the pre-block
//! state, recording every key read with the value seen. Worker 0 is the *merger*: it
//! keeps the merged state (a cache over storage, as `sequential` has) and merges
//! transaction `i` as soon as its pre-execution is done, while the other workers keep
//! pre-executing later ones. Merging checks the recorded reads against the merged
//! state: if every value read is still the current one, the execution is exactly the
//! serial one (an execution is a pure function of the values it reads) and its writes
//! are applied (deltas with `Vm::apply_delta`, so a shared fee credit is no conflict);
//! otherwise the merger re-executes `i` on the merged state, which is then final. When
//! the merger has nothing to merge it pre-executes a later transaction itself (on the
//! merged state, checked the same way); when the next one is still unclaimed it simply
//! executes it on the merged state.
//!
//! On fast storage the pre-executions of heavy transactions ([`Vm::light_tx_equivalents_of`]
//! at least `GUARDED_FROM`) are guarded: one stops, as a failed pre-execution, as soon as
//! a key it read or is about to read was written by a merged transaction
//! (`StaleGuard`, `stopped_stale`), instead of running to its end only to fail its
//! merge check and be executed again, alone, by the merger.
//!
//! Heavy first: on fast storage the last pre-executor starts with the block's heavy
//! transactions (`heavy::heavy_first`), out of turn: in block order one would
//! be pre-executed (or executed by the merger) only when the claims reach it, and then
//! run alone at the end. Merged like any pre-execution (only if its reads still hold;
//! guarded as above), so exact either way; metric `heavy_first`.
//!
//! On slow storage, a pre-execution of a transaction whose sender (its
//! [`Vm::sequence_key`]) sent an earlier one reads the sender's account as the earlier
//! one's pre-execution left it, while that is done and not yet merged, or else as the
//! pre-block account in sequence ([`Vm::in_sequence`]): on the pre-block state the later
//! transactions of a nonce sequence fail at once and read nothing else, and the merger
//! would wait for their keys. The check then also requires the merged state to hold
//! exactly that predicted value.
//!
//! Invariants: (1) transactions `< i` are merged when `i` is checked, so the merged
//! state is the serial state before `i`; (2) a key absent from the merged cache still
//! has its pre-block value, and every recorded read of such a key came from storage (a
//! predicted read is kept apart, and holds only if its key is merged with that value); so
//! (3) a committed execution read exactly the serial values. Failed or panicking
//! pre-executions are never committed: only the merger's in-order execution can fail
//! the block, with the error serial execution would hit.
//!
//! Large blocks (see [`crate::ranges`]) start in range rounds: each worker executes a
//! range of consecutive transactions on the committed state, the ranges are validated
//! and merged in parallel, and only when contention makes that wasteful does the rest of
//! the block run as described here, per transaction, over the committed state.
//!
//! Slow storage (reads that block): the engine runs 8 workers per thread over a shared
//! cache of pre-block values ([`crate::prefetch::PreBlockCache`]: each key read once,
//! by whichever worker needs it first), filled first by a discovery of the whole block
//! that reads the keys its transactions miss in batches ([`crate::prefetch::chain_check`],
//! which also judges whether the block is a chain), so that pre-executions and the
//! merger's re-executions find them cached (counters `prefetched`, `prefetch_batches`,
//! `discovery_executions`).
//!
//! Adapting: pre-executors stay within a window ahead of the merger, and when most
//! merge checks fail (a chain of dependent transactions) they stop and the merger
//! executes the rest in order, as `sequential` does (`serial_switch` in the metrics);
//! the merger speculates only while most checks pass. A block whose first
//! transactions' declared accesses ([`Vm::declared_access`]) already form a chain runs
//! in order from the start (`sequential_fallback`).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::map::{DefaultHashBuilder, foldhash};
use crossbeam::utils::Backoff;
use parex_core::{ReadError, ReadView, Storage, TxIndex, Vm, VmError, Write};

use crate::preexec::{PreExecution, preexecute_checked, preexecute_predicted};
use crate::prefetch::ChainCheck;
use crate::trace::{Recorder, SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

const UNCLAIMED: u8 = 0;
const CLAIMED: u8 = 1;
const DONE: u8 = 2;

/// Merge checks before the engine judges whether speculation pays...
const JUDGE_AFTER: u64 = 32;
/// ...and the share of failed checks at which it stops speculating.
const SERIAL_SHARE: f64 = 0.75;

/// How far (in transactions, per worker) pre-executors may run ahead of the merger.
const LOOKAHEAD_PER_WORKER: usize = 64;

/// On fast storage, pre-executions of transactions at least this heavy
/// ([`Vm::light_tx_equivalents_of`]: about 480k gas of limit for the EVM) stop as soon as
/// what they read is out of date ([`StaleGuard`])...
const GUARDED_FROM: usize = 8;
/// ...judged at each read from the pre-block state, for that key and, when transactions
/// were merged since, for every key read before (not more often than this many reads
/// plus a quarter of those so far, so that a long execution's checks stay a small part
/// of it).
const RECHECK_AFTER_READS: usize = 8;

/// Transactions merged before the merged state is sized for the whole block.
const SIZING_SAMPLE: usize = 64;

use crate::sequential::{Cache, Entry as Cached};
/// The merged state and the outputs in block order.
type Merged<V> = (
    Cache<<V as Vm>::Key, <V as Vm>::Value>,
    Vec<<V as Vm>::Output>,
);
/// Where a pre-executor leaves its result for the merger.
type Slot<V> = Mutex<Option<Box<PreExecution<V>>>>;
type Garbage<V> = Vec<(Box<PreExecution<V>>, Writes<V>)>;
type Writes<V> = Vec<(<V as Vm>::Key, Write<<V as Vm>::Value, <V as Vm>::Delta>)>;

struct Shared<'a, V: Vm, S> {
    vm: &'a V,
    storage: &'a S,
    /// Per transaction, the previous one with the same sequence key, if any (slow storage
    /// only, where predictions pay; empty otherwise: no predictions).
    previous_in_sequence: Box<[Option<TxIndex>]>,
    /// Keys the merger has written, if the block has a transaction to guard
    /// (`GUARDED_FROM`; fast storage only).
    merged_writes: Option<WrittenKeys>,
    /// Transactions the last pre-executor claims first, out of turn
    /// ([`crate::heavy::heavy_first`]; fast storage only).
    heavy_first: Box<[TxIndex]>,
    workers: usize,
    /// Per transaction: `UNCLAIMED`, `CLAIMED` (being executed) or `DONE` (in `results`).
    status: Box<[AtomicU8]>,
    /// Boxed: most slots of a dependent block stay empty, and a block's slots are
    /// created up front.
    results: Box<[Slot<V>]>,
    /// The next transaction pre-executors try to claim.
    next_claim: AtomicUsize,
    /// Transactions merged so far; pre-executors stay within `lookahead` of it.
    merged: AtomicUsize,
    lookahead: usize,
    /// Pre-executors stop claiming (the merger does the rest alone).
    serial: AtomicBool,
    /// Everyone stops: the merger is finished, failed or a worker panicked.
    stop: AtomicBool,
    tracer: &'a Tracer,
}

/// What one worker did.
#[derive(Default)]
struct WorkerReport {
    executions: u64,
    execution_time: Duration,
    /// Guarded pre-executions stopped as out of date ([`StaleGuard`]).
    stopped_stale: u64,
}

/// What the merger did: its metrics, the merged state and outputs, or the block's error.
struct MergeReport<V: Vm> {
    metrics: Metrics,
    merge_reexecutions: u64,
    own_speculations: u64,
    serial_switch: bool,
    result: Result<Merged<V>, VmError>,
    garbage: Garbage<V>,
}

/// Executes the block optimistically on `run.threads` workers.
pub fn execute<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let workers = run.workers_by_work(vm, storage);
    let slow_storage = storage.read_latency() >= crate::workers::SLOW_READ;
    if slow_storage {
        // The block's keys are discovered and read in batches before the declarations
        // say whether it is a chain (merge checks would all fail: it runs in order); if
        // not, the same cache serves the engine.
        let in_order = |cached: &_| crate::sequential::in_order(vm, cached, run, &[]);
        return match crate::prefetch::chain_check(vm, storage, run.threads, in_order) {
            ChainCheck::Chain(result) => result,
            ChainCheck::NotChain(cached, judging) => {
                judging.added_to(merge_discovered(vm, &cached, run.threads, run.trace))
            }
        };
    }
    if crate::declared::declared_chain(vm, storage, workers, false) {
        // The declarations already say the block is a chain: merge checks would all fail.
        return crate::sequential::in_order(vm, storage, run, &[]);
    }
    if crate::ranges::applies(n, workers, slow_storage, run) {
        return crate::ranges::execute(vm, storage, run, workers, |rest, committed| {
            let tracer = Tracer::new(run.trace);
            let workers = run.workers_by_work(rest, committed);
            let (state, outputs, mut metrics) =
                merge_units(rest, committed, workers, &tracer, false)?;
            metrics.trace = tracer.finish();
            Ok((state, outputs, metrics))
        });
    }
    let tracer = Tracer::new(run.trace);
    let (cache, outputs, metrics) = merge_units(vm, storage, workers, &tracer, false)?;
    let state_diff = || Ok(crate::sequential::into_state_diff(cache));
    crate::finish(vm, outputs, state_diff, tracer, metrics)
}

/// The engine on slow storage, over `cached`, which [`crate::prefetch::chain_check`]
/// filled with the keys that discovery found for the whole block: pre-executions and the
/// merger share it.
fn merge_discovered<V, S>(
    vm: &V,
    cached: &crate::prefetch::PreBlockCache<'_, S>,
    threads: usize,
    trace: bool,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let tracer = Tracer::new(trace);
    let workers = crate::prefetch::workers(threads, n);
    let (cache, outputs, metrics) = merge_units(vm, cached, workers, &tracer, true)?;
    let state_diff = || Ok(crate::sequential::into_state_diff(cache));
    crate::finish(vm, outputs, state_diff, tracer, metrics)
}

/// Per transaction of `vm`'s block, the previous transaction with the same sequence key
/// ([`Vm::sequence_key`]: for the EVM the sender), if any.
fn previous_in_sequence<V: Vm>(vm: &V) -> Box<[Option<TxIndex>]> {
    let mut last: HashMap<V::Key, TxIndex, DefaultHashBuilder> =
        HashMap::with_capacity_and_hasher(vm.tx_count(), DefaultHashBuilder::default());
    (0..vm.tx_count())
        .map(|tx| {
            let key = vm.sequence_key(tx)?;
            last.insert(key, tx)
        })
        .collect()
}

/// The engine over `vm`'s transactions on `workers`: the merged state (written keys
/// marked) and the outputs, not yet finalized. `predict`: pre-executions predict their
/// sender's account ([`Shared::prediction`]; slow storage).
fn merge_units<V, S>(
    vm: &V,
    storage: &S,
    workers: usize,
    tracer: &Tracer,
    predict: bool,
) -> Result<crate::ranges::Rest<V>, EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let shared = Shared {
        vm,
        storage,
        // A serial pass over the block before any worker starts (3% of the instructions
        // of a 1346-transaction mainnet block): worth it where a failed pre-execution's
        // missing keys cost the merger storage waits, not measured to pay elsewhere.
        previous_in_sequence: if predict {
            previous_in_sequence(vm)
        } else {
            Box::default()
        },
        merged_writes: (!predict
            && (0..n).any(|tx| vm.light_tx_equivalents_of(tx) >= GUARDED_FROM))
        .then(|| WrittenKeys::new(n)),
        heavy_first: if !predict && workers > 1 {
            crate::heavy::heavy_first(vm, workers)
        } else {
            Box::default()
        },
        workers,
        status: (0..n).map(|_| AtomicU8::new(UNCLAIMED)).collect(),
        results: (0..n).map(|_| Mutex::new(None)).collect(),
        next_claim: AtomicUsize::new(0),
        merged: AtomicUsize::new(0),
        lookahead: LOOKAHEAD_PER_WORKER * workers,
        serial: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        tracer,
    };
    let mut reports = crate::workers::run(workers, |id| {
        let _stop = crate::workers::SetOnPanic(&shared.stop);
        if id == 0 {
            let report = shared.merge();
            shared.stop.store(true, Ordering::SeqCst);
            (WorkerReport::default(), Some(report))
        } else {
            (shared.pre_execute(id), None)
        }
    });
    let mut merge = reports[0].1.take().expect("worker 0 merges");
    drop(std::mem::take(&mut merge.garbage));
    let mut metrics = merge.metrics;
    let mut stopped_stale = 0;
    for (worker, _) in &reports {
        metrics.executions += worker.executions;
        metrics.execution_time += worker.execution_time;
        stopped_stale += worker.stopped_stale;
    }
    metrics.reexecutions = metrics.executions.saturating_sub(n as u64);
    metrics.extra = vec![
        ("merge_reexecutions", merge.merge_reexecutions),
        ("merger_speculations", merge.own_speculations),
        ("stopped_stale", stopped_stale),
        ("sequential_fallback", 0),
        ("serial_switch", u64::from(merge.serial_switch)),
        ("heavy_first", shared.heavy_first.len() as u64),
        ("workers", workers as u64),
    ];
    let (cache, outputs) = merge.result?;
    Ok((cache, outputs, metrics))
}

/// Which of `pres` (executions of transactions `0..pres.len()` on a stale state, in
/// block order) would fail their merge check: how far a block's stale executions are
/// from the serial ones (the `dag` engine judges its hints with it). From an in-order
/// failure on, every transaction counts as failed.
pub(crate) fn stale<V, S>(vm: &V, storage: &S, pres: Vec<PreExecution<V>>) -> Vec<bool>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let mut merger = Merger {
        vm,
        storage,
        cache: Cache::with_capacity_and_hasher(pres.len() * 4, Default::default()),
        outputs: Vec::with_capacity(pres.len()),
        trace: Recorder::off(),
        metrics: Metrics::default(),
        merge_reexecutions: 0,
        own_speculations: 0,
        serial_switch: false,
        garbage: Vec::new(),
        merged_writes: None,
    };
    let mut stale = vec![true; pres.len()];
    for (tx, pre) in pres.into_iter().enumerate() {
        match merger.check(tx, Box::new(pre)) {
            Ok(valid) => stale[tx] = !valid,
            Err(_) => break,
        }
    }
    stale
}

/// The keys merged transactions wrote, as a Bloom filter (three bits of 512 per
/// transaction each): "not written" is exact, "written" is wrong for about one key in
/// 100,000 (a guarded execution checks each key it read again and again: with one bit
/// of 64 per transaction nearly every long one looked out of date). The bits come from
/// 21-bit pieces of one hash, so a block beyond 4096 transactions (the rest of a large
/// block handed over by its range rounds) gets fewer per transaction: more false stops,
/// each only a transaction the merger executes itself. The hash is foldhash's quality
/// variant: the fast one (a single folded multiply by the process's seed) gives pieces
/// that are correlated under some seeds, up to 72 false answers in 100,000 instead of
/// about one. Shared by the merger, which marks, and guarded pre-executions, which look.
struct WrittenKeys {
    words: Box<[AtomicU64]>,
    /// log2 of the number of bits.
    bits: u32,
    hasher: foldhash::quality::RandomState,
}

impl WrittenKeys {
    fn new(txs: usize) -> Self {
        let bits = (txs * 512).next_power_of_two().clamp(1 << 13, 1 << 21);
        Self {
            words: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            bits: bits.trailing_zeros(),
            hasher: foldhash::quality::RandomState::default(),
        }
    }

    /// The key's three bits (word, mask), from three 21-bit pieces of its hash.
    fn bits<K: Hash>(&self, key: &K) -> [(usize, u64); 3] {
        let hash = self.hasher.hash_one(key);
        let mask = (1u64 << self.bits) - 1;
        [0, 21, 42].map(|shift| {
            let bit = (hash >> shift) & mask;
            ((bit / 64) as usize, 1 << (bit % 64))
        })
    }

    fn mark<K: Hash>(&self, key: &K) {
        for (word, bit) in self.bits(key) {
            self.words[word].fetch_or(bit, Ordering::Relaxed);
        }
    }

    fn may_contain<K: Hash>(&self, key: &K) -> bool {
        self.bits(key)
            .iter()
            .all(|&(word, bit)| self.words[word].load(Ordering::Relaxed) & bit != 0)
    }
}

/// Stops a heavy transaction's pre-execution on the pre-block state as soon as a key it
/// read, or is about to read, has been written by a merged (hence earlier) transaction:
/// its result could only fail the merge check, after the whole execution, which the
/// merger would then repeat alone on the critical path (mainnet 12244000: a 9M-gas call
/// pre-executed while its predecessors merged, 3.4 ms spent on a result that failed, in
/// most runs). The stopped pre-execution fails, so the merger executes the transaction
/// on the merged state when it gets there, as it does after any failed check. Only a
/// heuristic: exactness rests on the merge check, whatever this says.
struct StaleGuard<'a> {
    written: &'a WrittenKeys,
    merged: &'a AtomicUsize,
    /// Transactions merged when the reads so far were last checked.
    checked_at: usize,
    /// Reads then.
    reads_at_check: usize,
    stopped: bool,
}

impl<'a> StaleGuard<'a> {
    fn new(written: &'a WrittenKeys, merged: &'a AtomicUsize) -> Self {
        Self {
            written,
            merged,
            checked_at: merged.load(Ordering::Relaxed),
            reads_at_check: 0,
            stopped: false,
        }
    }

    /// Whether the execution is out of date, with `reads` so far and `key` next.
    fn stale<K: Hash, V>(&mut self, reads: &[(K, Option<V>)], key: &K) -> bool {
        let mut stale = self.written.may_contain(key);
        let merged = self.merged.load(Ordering::Relaxed);
        if !stale
            && merged != self.checked_at
            && reads.len() >= self.reads_at_check + RECHECK_AFTER_READS + self.reads_at_check / 4
        {
            self.checked_at = merged;
            self.reads_at_check = reads.len();
            stale = reads.iter().any(|(read, _)| self.written.may_contain(read));
        }
        self.stopped |= stale;
        stale
    }
}

impl<V, S> Shared<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    /// Claims `tx` if nobody has.
    fn claim(&self, tx: TxIndex) -> bool {
        self.status[tx]
            .compare_exchange(UNCLAIMED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The next unclaimed transaction from the shared counter, claimed.
    fn claim_next(&self) -> Option<TxIndex> {
        loop {
            let tx = self.next_claim.fetch_add(1, Ordering::Relaxed);
            if tx >= self.status.len() {
                return None;
            }
            if self.claim(tx) {
                return Some(tx);
            }
        }
    }

    /// What `tx`'s sequence key (the sender's account) will likely hold when `tx` runs:
    /// its value after the pre-execution of the previous transaction with the same key,
    /// if that is done, unmerged and wrote it; else its pre-block value in sequence. On
    /// the pre-block state a nonce sequence's later transactions fail at once (the nonce
    /// is not yet bumped) and read none of their other keys; with the prediction they
    /// read them, so that on slow storage the merger's re-execution finds them cached,
    /// and a prediction that held needs no re-execution at all. (Mix at hot ratio 0.3,
    /// 1000 transactions at 100 us per read: predicting only from earlier pre-executions
    /// left the merger waiting for about a hundred reads, 47-54 ms; with the fallback it
    /// waits for a few, 32-37 ms.)
    fn prediction(&self, tx: TxIndex) -> Option<(V::Key, Option<V::Value>)> {
        let previous = (*self.previous_in_sequence.get(tx)?)?;
        let key = self.vm.sequence_key(tx)?;
        if self.status[previous].load(Ordering::Acquire) == DONE {
            let result = self.results[previous]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let written = result.as_ref().and_then(|pre| {
                let writes = &pre.result.as_ref().ok()?.writes;
                writes.iter().find_map(|(k, write)| match write {
                    Write::Put(value) if *k == key => Some(value.clone()),
                    _ => None,
                })
            });
            if let Some(value) = written {
                return Some((key, Some(value)));
            }
        }
        // No earlier pre-execution to go by: the pre-block value in sequence
        // ([`Vm::in_sequence`]), which rarely holds at the merge (the earlier
        // transactions' fees are not paid in it) but makes the pre-execution read, in
        // parallel with the others, the keys that the merger's re-execution will need.
        // (Unless that changes nothing: the plain read then holds whenever the key is
        // unchanged, a prediction only if the key was merged.)
        let pre_block = self.storage.read(&key).ok()?;
        let in_sequence = self.vm.in_sequence(tx, pre_block.clone());
        (in_sequence != pre_block).then_some((key, in_sequence))
    }

    fn publish(&self, tx: TxIndex, pre: PreExecution<V>) {
        *self.results[tx].lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(pre));
        self.status[tx].store(DONE, Ordering::Release);
    }

    /// A pre-executor's loop: execute claimed transactions on the pre-block state (the
    /// last pre-executor starts with the heavy ones it can claim).
    fn pre_execute(&self, id: usize) -> WorkerReport {
        let mut trace = self.tracer.recorder(id);
        let mut report = WorkerReport::default();
        if id + 1 == self.workers {
            for &tx in &self.heavy_first {
                if self.serial.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed) {
                    break;
                }
                if self.claim(tx) {
                    self.pre_execute_one(tx, &mut report, &mut trace);
                }
            }
        }
        let backoff = Backoff::new();
        while !self.serial.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            if self.next_claim.load(Ordering::Relaxed)
                >= self.merged.load(Ordering::Relaxed) + self.lookahead
            {
                // Far enough ahead: on a dependent block more would only be wasted.
                let span = trace.start();
                backoff.snooze();
                trace.record(SpanKind::Wait, None, span);
                continue;
            }
            backoff.reset();
            let Some(tx) = self.claim_next() else { break };
            self.pre_execute_one(tx, &mut report, &mut trace);
        }
        self.tracer.submit(trace);
        report
    }

    /// Pre-executes `tx` (claimed) and publishes the result.
    fn pre_execute_one(&self, tx: TxIndex, report: &mut WorkerReport, trace: &mut Recorder) {
        let started = Instant::now();
        let span = trace.start();
        let pre = match &self.merged_writes {
            Some(written) if self.vm.light_tx_equivalents_of(tx) >= GUARDED_FROM => {
                let mut guard = StaleGuard::new(written, &self.merged);
                let pre = preexecute_checked(
                    self.vm,
                    self.storage,
                    tx,
                    self.prediction(tx),
                    Some(&mut |reads, key| guard.stale(reads, key)),
                );
                report.stopped_stale += u64::from(guard.stopped);
                pre
            }
            _ => preexecute_predicted(self.vm, self.storage, tx, self.prediction(tx)),
        };
        trace.record(SpanKind::Execute, Some(tx), span);
        report.execution_time += started.elapsed();
        report.executions += 1;
        self.publish(tx, pre);
    }

    /// The merger's loop: merge every transaction in block order.
    fn merge(&self) -> MergeReport<V> {
        let n = self.status.len();
        let mut merger = Merger {
            vm: self.vm,
            storage: self.storage,
            cache: Cache::with_capacity_and_hasher(n.min(64) * 4, Default::default()),
            outputs: Vec::with_capacity(n),
            trace: self.tracer.recorder(0),
            metrics: Metrics::default(),
            merge_reexecutions: 0,
            own_speculations: 0,
            serial_switch: false,
            garbage: Vec::new(),
            merged_writes: self.merged_writes.as_ref(),
        };
        let started = Instant::now();
        let mut result = Ok(());
        for tx in 0..n {
            if tx == SIZING_SAMPLE && n > 2 * SIZING_SAMPLE {
                // Size the merged state for the block from the keys per transaction
                // so far (as `sequential` does): growing it step by step costs more.
                let per_tx = merger.cache.len() as f64 / SIZING_SAMPLE as f64;
                let expected = (per_tx * 1.1 * n as f64) as usize;
                merger
                    .cache
                    .reserve(expected.saturating_sub(merger.cache.len()));
            }
            result = self.merge_one(&mut merger, tx);
            self.merged.store(tx + 1, Ordering::Relaxed);
            if result.is_err() {
                break;
            }
        }
        // The merger's time, less its checks, counts as execution (it executes or
        // merges, or waits for the transaction to merge).
        merger.metrics.execution_time = started
            .elapsed()
            .saturating_sub(merger.metrics.validation_time);
        let Merger {
            cache,
            outputs,
            trace,
            metrics,
            merge_reexecutions,
            own_speculations,
            serial_switch,
            garbage,
            ..
        } = merger;
        self.tracer.submit(trace);
        MergeReport {
            metrics,
            merge_reexecutions,
            own_speculations,
            serial_switch,
            result: result.map(|()| (cache, outputs)),
            garbage,
        }
    }

    /// Merges `tx`: waits for its pre-execution (doing other work meanwhile), or runs it
    /// on the merged state if nobody has claimed it.
    fn merge_one(&self, m: &mut Merger<'_, V, S>, tx: TxIndex) -> Result<(), VmError> {
        let backoff = Backoff::new();
        loop {
            match self.status[tx].load(Ordering::Acquire) {
                DONE => {
                    let pre = self.results[tx]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .expect("a done transaction has its result");
                    let valid = m.check(tx, pre)?;
                    if !valid {
                        m.metrics.validation_failures += 1;
                    }
                    if !m.serial_switch
                        && m.metrics.validations >= JUDGE_AFTER
                        && m.metrics.validation_failures as f64
                            >= SERIAL_SHARE * m.metrics.validations as f64
                    {
                        m.serial_switch = true;
                        self.serial.store(true, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                UNCLAIMED if self.claim(tx) => {
                    return m.execute_final(tx, SpanKind::Execute, &[]);
                }
                UNCLAIMED => {}
                _ => {
                    // A pre-executor has it: pre-execute a later one meanwhile, unless
                    // speculation was given up on or most checks fail (then the
                    // merger's time is better spent merging as soon as it can).
                    if !self.serial.load(Ordering::Relaxed)
                        && m.metrics.validation_failures * 2 <= m.metrics.validations
                        && let Some(later) = self.claim_next()
                    {
                        let pre = m.speculate(later);
                        self.publish(later, pre);
                        backoff.reset();
                        continue;
                    }
                    if self.stop.load(Ordering::Relaxed) {
                        // A pre-executor panicked; `workers::run` resumes its panic.
                        return Err(VmError::Internal {
                            tx,
                            message: "a pre-executor stopped".into(),
                        });
                    }
                    let span = m.trace.start();
                    backoff.snooze();
                    m.trace.record(SpanKind::Wait, None, span);
                }
            }
        }
    }
}

/// The merger's state: the merged state so far and the outputs of merged transactions.
struct Merger<'a, V: Vm, S> {
    vm: &'a V,
    storage: &'a S,
    cache: Cache<V::Key, V::Value>,
    outputs: Vec<V::Output>,
    trace: Recorder,
    metrics: Metrics,
    merge_reexecutions: u64,
    own_speculations: u64,
    serial_switch: bool,
    /// Merged pre-executions, freed once the workers are done: freeing them here, on
    /// another thread than the one that allocated them, contends for the allocator.
    garbage: Garbage<V>,
    /// Where the merged writes' keys are marked for guarded pre-executions, if any.
    merged_writes: Option<&'a WrittenKeys>,
}

impl<V, S> Merger<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    /// Checks `tx`'s pre-execution against the merged state and commits it, or
    /// re-executes `tx` on the merged state. Returns whether the pre-execution held.
    fn check(&mut self, tx: TxIndex, mut pre: Box<PreExecution<V>>) -> Result<bool, VmError> {
        let started = Instant::now();
        let span = self.trace.start();
        self.metrics.validations += 1;
        // A key not in the cache (neither merged nor read here) still has its pre-block
        // value, which is what the pre-executor read. A predicted value holds only if the
        // merged state has exactly it (its writer, an earlier transaction, is merged).
        let valid = pre.result.is_ok()
            && pre.reads.iter().all(|(key, seen)| {
                self.cache
                    .get(key)
                    .is_none_or(|cached| cached.value == *seen)
            })
            && pre.predicted.as_deref().is_none_or(|(key, predicted)| {
                self.cache
                    .get(key)
                    .is_some_and(|cached| cached.value == *predicted)
            });
        self.metrics.validation_time += started.elapsed();
        self.trace.record(SpanKind::Validate, Some(tx), span);
        let outcome =
            match std::mem::replace(&mut pre.result, Err(VmError::Read(ReadError::Aborted))) {
                Ok(mut execution) if valid => {
                    let span = self.trace.start();
                    self.commit(execution.writes.drain(..))?;
                    self.outputs.push(execution.output);
                    self.trace.record(SpanKind::Merge, Some(tx), span);
                    self.garbage.push((pre, execution.writes));
                    return Ok(true);
                }
                // A stale read, or a failure that may be an artefact of one: only the
                // in-order execution tells.
                outcome => outcome,
            };
        self.merge_reexecutions += 1;
        self.execute_final(tx, SpanKind::Reexecute, &pre.reads)?;
        drop(outcome);
        self.garbage.push((pre, Vec::new()));
        Ok(false)
    }

    /// Executes `tx` on the merged state (every earlier transaction merged): the serial
    /// execution. Its failure is the block's. `warm`: reads of an earlier execution of
    /// `tx`, whose values of keys absent from the cache are the pre-block ones.
    fn execute_final(
        &mut self,
        tx: TxIndex,
        kind: SpanKind,
        warm: &[(V::Key, Option<V::Value>)],
    ) -> Result<(), VmError> {
        let span = self.trace.start();
        let mut view = MergedView {
            cache: &mut self.cache,
            storage: self.storage,
            warm,
            reads: None,
        };
        let result = crate::execute_caught(self.vm, tx, &mut view);
        self.metrics.executions += 1;
        self.trace.record(kind, Some(tx), span);
        let execution = result?;
        let span = self.trace.start();
        self.commit(execution.writes)?;
        self.outputs.push(execution.output);
        self.trace.record(SpanKind::Merge, Some(tx), span);
        Ok(())
    }

    /// Pre-executes a later transaction on the merged state as it is now, recording reads.
    fn speculate(&mut self, tx: TxIndex) -> PreExecution<V> {
        let span = self.trace.start();
        let mut reads = Vec::new();
        let mut view = MergedView {
            cache: &mut self.cache,
            storage: self.storage,
            warm: &[],
            reads: Some(&mut reads),
        };
        let result = crate::execute_caught(self.vm, tx, &mut view);
        self.metrics.executions += 1;
        self.own_speculations += 1;
        self.trace.record(SpanKind::Execute, Some(tx), span);
        PreExecution {
            reads,
            predicted: None,
            result,
        }
    }

    /// Applies a merged transaction's writes to the merged state.
    fn commit(
        &mut self,
        writes: impl IntoIterator<Item = (V::Key, Write<V::Value, V::Delta>)>,
    ) -> Result<(), VmError> {
        for (key, write) in writes {
            if let Some(written) = self.merged_writes {
                written.mark(&key);
            }
            match write {
                Write::Put(value) => {
                    self.cache.insert(
                        key,
                        Cached {
                            value: Some(value),
                            written: true,
                        },
                    );
                }
                Write::Delta(delta) => {
                    let cached = cached_entry(&mut self.cache, self.storage, &[], &key)?;
                    cached.written = true;
                    cached.value = self.vm.apply_delta(&key, cached.value.take(), &delta);
                }
            }
        }
        Ok(())
    }
}

/// The cache entry of `key`, on first use taken from `warm` (pre-block values already
/// read) or read from storage.
fn cached_entry<'c, K, V, S>(
    cache: &'c mut Cache<K, V>,
    storage: &S,
    warm: &[(K, Option<V>)],
    key: &K,
) -> Result<&'c mut Cached<V>, ReadError>
where
    K: Clone + Eq + Hash,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    Ok(match cache.entry(key.clone()) {
        indexmap::map::Entry::Occupied(e) => e.into_mut(),
        indexmap::map::Entry::Vacant(e) => {
            let value = match warm.iter().find(|(k, _)| k == key) {
                Some((_, value)) => value.clone(),
                None => storage.read(key)?,
            };
            e.insert(Cached {
                value,
                written: false,
            })
        }
    })
}

/// The merged state as the next transaction to merge sees it; with `reads`, records
/// every read with its value (for an execution checked later).
struct MergedView<'a, K, V, S> {
    cache: &'a mut Cache<K, V>,
    storage: &'a S,
    warm: &'a [(K, Option<V>)],
    reads: Option<&'a mut Vec<(K, Option<V>)>>,
}

impl<K, V, S> ReadView<K, V> for MergedView<'_, K, V, S>
where
    K: Clone + Eq + Hash,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError> {
        let value = cached_entry(self.cache, self.storage, self.warm, key)?
            .value
            .clone();
        if let Some(reads) = &mut self.reads {
            reads.push((key.clone(), value.clone()));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marked keys are always "written"; of 100,000 unmarked ones, next to 4,000 marked
    /// (a thousand transactions' writes), hardly any.
    #[test]
    fn written_keys_never_miss_a_mark_and_rarely_invent_one() {
        let written = WrittenKeys::new(1000);
        for key in 0..4000u64 {
            written.mark(&key);
        }
        assert!((0..4000u64).all(|key| written.may_contain(&key)));
        let invented = (1_000_000..1_100_000u64)
            .filter(|key| written.may_contain(key))
            .count();
        assert!(invented < 50, "{invented} false answers");
    }

    /// The guard stops at a key merged transactions wrote, whether it is about to be read
    /// or was read before the write was merged; it looks at earlier reads again only once
    /// transactions were merged since it last did, and not at every read.
    #[test]
    fn the_stale_guard_stops_at_merged_writes() {
        let written = WrittenKeys::new(64);
        let merged = AtomicUsize::new(3);
        let mut guard = StaleGuard::new(&written, &merged);
        let mut reads: Vec<(u64, Option<u64>)> = Vec::new();
        for key in 0..20u64 {
            assert!(!guard.stale(&reads, &key));
            reads.push((key, None));
        }
        // Key 5, read already, is written by a transaction merged now.
        written.mark(&5u64);
        assert!(!guard.stopped);
        merged.store(4, Ordering::Relaxed);
        let mut stopped_at = None;
        for key in 20..100u64 {
            if guard.stale(&reads, &key) {
                stopped_at = Some(reads.len());
                break;
            }
            reads.push((key, None));
        }
        let stopped_at = stopped_at.expect("the merged write of a read key stops it");
        assert!(
            stopped_at <= 20 + RECHECK_AFTER_READS + 20 / 4,
            "{stopped_at}"
        );
        assert!(guard.stopped);

        // Nothing merged since the last look: earlier reads are not looked at again, but
        // a written key about to be read stops it at once.
        let mut guard = StaleGuard::new(&written, &merged);
        let early: Vec<(u64, Option<u64>)> = vec![(5, None)];
        assert!(!guard.stale(&early, &1000));
        assert!(guard.stale::<u64, u64>(&[], &5));
    }
}
