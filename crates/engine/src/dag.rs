//! `dag`: schedule transactions along a dependency DAG learnt from hints (MegaETH,
//! grevm).
//!
//! 1. Hints: every transaction is pre-executed on the pre-block state
//!    ([`crate::preexec`]), giving its reads (with values) and writes.
//! 2. DAG: an edge `i -> j` when `j` reads a key whose nearest writer before `j` is `i`
//!    (for a key updated by deltas, the deltas since the last full write and that
//!    write), and when `i` is the nearest before `j` with the same sequence key
//!    ([`Vm::sequence_key`]: a nonce sequence). A transaction with no edge in keeps its pre-execution; the others are
//!    executed once their predecessors have executed, on a multi-version memory
//!    ([`MvMemory`]): runs of adjacent transactions whose only dependency is the
//!    previous one (`i -> i+1`) form a group, executed by one worker in order.
//! 3. Commit, in block order, by whichever worker gets there: when every transaction
//!    before `j` is committed, `j`'s recorded reads are compared with the memory (now
//!    final below `j`); a mismatch is a misprediction (the hints missed a dependency),
//!    repaired by re-executing `j` on that final state. A kept pre-execution needs no
//!    memory read: no hint before it writes what it read, so only a *surprise* write
//!    (an execution writing a key its hint did not) below it can make it stale.
//!
//! Invariants: (1) the memory holds, per transaction, the writes of its latest
//! execution, with the reads recorded beside them; (2) every write outside a
//! transaction's hint is noted as a surprise before that transaction commits; (3) a
//! committed transaction's reads equal the serial ones (checked with every earlier
//! transaction final), so its output and writes are the serial ones (execution is a
//! pure function of the values read); (4) nobody writes a committed transaction's
//! entries again. Failed or
//! panicking executions are never committed as they are: the committer re-executes, and
//! that in-order failure is the block's.
//!
//! Adapting: a block whose first 64 transactions' declared accesses
//! ([`Vm::declared_access`]) each conflict with the one before runs in order at once
//! (as in `block-stm`, `optimistic` and `sealevel`). Then the hints of a first sample of
//! the block are judged before the rest are computed. If their DAG is nearly a chain, speculation cannot pay and the block is
//! executed in order on one thread (`sequential_fallback` in the metrics); if most of
//! them are stale without an edge in (hints that miss dependencies, e.g. transactions
//! invalid on the pre-block state), the block goes to `optimistic`
//! (`optimistic_fallback`). A whole block whose DAG has no edge (and no failed hint) is
//! committed straight from its hints, with no schedule and no memory (`commit_hints`,
//! `hints_committed` in the metrics).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use alloy_primitives::map::DefaultHashBuilder;
use crossbeam::utils::Backoff;
use hashbrown::{HashTable, hash_table};
use parex_core::{BlockOutcome, ReadError, ReadView, Storage, TxIndex, Vm, VmError, Write};

use crate::chunk::{LocalMap, apply_write};
use crate::gather::gather_into;
use crate::mv_memory::{Entry, Incarnation, MvMemory, Origin, Read, append_parts};
use crate::preexec::{PreExecution, preexecute};
use crate::trace::{Recorder, SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

/// Transactions per thread in the sample whose DAG is judged first...
const SAMPLE_PER_THREAD: usize = 16;
const MIN_SAMPLE: usize = 32;
/// ...falling back to `sequential` when its longest path or its mispredicted hints
/// cover this share of it, to `optimistic` when this share of it is mispredicted.
const CHAIN_SHARE: f64 = 0.75;
const MISPREDICTED_SHARE: f64 = 0.5;
/// A reader depends on at most this many delta writers of one key (the most recent):
/// edges only steer scheduling, so a long tail of deltas (a busy beneficiary) is cut.
const MAX_DELTA_EDGES: usize = 64;

/// Incarnations: the pre-execution, the scheduled execution, the commit's re-execution.
const SCHEDULED: Incarnation = 1;
const REPAIR: Incarnation = 2;

/// One read of an execution: the key, the value seen, and whether that value is the
/// pre-block one (then validation can seed the memory with it instead of storage).
struct ReadRecord<K, V> {
    key: K,
    value: Option<V>,
    pre_block: bool,
}

type Writes<V> = Vec<(<V as Vm>::Key, Write<<V as Vm>::Value, <V as Vm>::Delta>)>;

/// A transaction's latest execution (whose writes are in the memory).
struct Record<V: Vm> {
    reads: Vec<ReadRecord<V::Key, V::Value>>,
    written: Vec<V::Key>,
    /// `None` until executed; an error is never committed as is.
    output: Option<Result<V::Output, VmError>>,
    /// A read failed (storage), so the reads are incomplete.
    broken: bool,
    /// The pre-execution, until it is published (transactions with no edge in).
    hint: Option<PreExecution<V>>,
    /// The keys the pre-execution wrote (what the DAG was built from; for a transaction
    /// with no edge in, noted when its hint is published).
    hinted: Vec<V::Key>,
    /// The recorded execution is the published pre-execution (`hint`; its writes are
    /// `hinted`).
    reused: bool,
    /// The emptied write buffer of the published pre-execution.
    spent: Writes<V>,
}

impl<V: Vm> Record<V> {
    /// A record holding nothing (what an emptied one is left as).
    fn empty() -> Self {
        Self {
            reads: Vec::new(),
            written: Vec::new(),
            output: None,
            broken: false,
            hint: None,
            hinted: Vec::new(),
            reused: false,
            spent: Vec::new(),
        }
    }
}

/// The dependency DAG over transactions that need scheduling.
struct Dag {
    /// Per transaction: group heads that wait for it.
    successors: Vec<Vec<TxIndex>>,
    /// Per transaction: whether it is scheduled (it has an edge in).
    scheduled: Vec<bool>,
    /// Per group head: the last transaction of its group; `usize::MAX` for non-heads.
    group_end: Vec<TxIndex>,
    /// Per group head: its predecessors.
    in_degree: Vec<usize>,
    edges: u64,
    groups: u64,
    max_group: u64,
    critical_path: u64,
}

/// A pre-execution with the hashes of the keys it read and wrote, computed by the
/// hinting workers so that building the DAG (serial) hashes nothing. Keys are told
/// apart by hash alone there: a collision only adds an edge, and edges only steer
/// scheduling (every read is validated at commit).
struct Hint<V: Vm> {
    pre: PreExecution<V>,
    reads: Vec<u64>,
    /// Written keys, and whether the write is a full one (not a delta).
    writes: Vec<(u64, bool)>,
    /// The transaction's sequence key ([`Vm::sequence_key`]): it depends on the previous
    /// transaction with the same one (a nonce sequence), whatever the hints say (the
    /// pre-execution of all but the first of a sequence is invalid on the pre-block
    /// state, so it writes nothing).
    sequence: Option<u64>,
}

impl<V: Vm> Hint<V> {
    fn new(pre: PreExecution<V>, sequence: Option<V::Key>, hasher: &DefaultHashBuilder) -> Self {
        let reads = pre.reads.iter().map(|(k, _)| hasher.hash_one(k)).collect();
        let writes = match &pre.result {
            Ok(execution) => execution
                .writes
                .iter()
                .map(|(k, w)| (hasher.hash_one(k), matches!(w, Write::Put(_))))
                .collect(),
            Err(_) => Vec::new(),
        };
        let sequence = sequence.map(|k| hasher.hash_one(&k));
        Self {
            pre,
            reads,
            writes,
            sequence,
        }
    }

    /// Asks the CPU to fetch the buffers of this hint that committing it touches (its
    /// writes, and the reads and hashes it frees): hints are read back long after
    /// they were made, one cache miss after another unless fetched ahead.
    fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let writes = self
                .pre
                .result
                .as_ref()
                .map_or(std::ptr::null(), |e| e.writes.as_ptr());
            for address in [
                writes.cast::<i8>(),
                self.pre.reads.as_ptr().cast(),
                self.reads.as_ptr().cast(),
                self.writes.as_ptr().cast(),
            ] {
                // SAFETY: a prefetch is only a hint: it reads nothing the program can
                // observe and never faults, whatever the address (here buffers of a live
                // hint, or a dangling pointer of an empty vector: a wasted hint). `sse`,
                // which `_mm_prefetch` needs, is part of every x86_64 target. Exercised by
                // every test of a block whose DAG has no edge (`commit_hints`).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(address) };
            }
        }
    }
}

/// Hints ahead of the one being committed whose buffers are fetched ([`Hint::prefetch`]).
const HINT_LOOKAHEAD: usize = 8;

/// Who wrote a key last, in the hints, while building the DAG.
struct Writers {
    hash: u64,
    put: Option<TxIndex>,
    deltas: Vec<TxIndex>,
}

/// Per transaction, the transactions it depends on (sorted, distinct).
fn predecessors<V: Vm>(hints: &[Hint<V>]) -> Vec<Vec<TxIndex>> {
    let mut writers: HashTable<Writers> = HashTable::with_capacity(hints.len() * 2);
    // The last transaction of each sequence key, by the key's hash (which the hints hold
    // already). (A std hash map, grown from nothing and hashing the hash again, was a
    // third of this function on the raw-transfer gigagas block: every transaction has a
    // sender.)
    let mut sequences: HashTable<(u64, TxIndex)> = HashTable::with_capacity(hints.len());
    let mut preds = Vec::with_capacity(hints.len());
    for (j, hint) in hints.iter().enumerate() {
        let mut mine = Vec::new();
        if let Some(sequence) = hint.sequence {
            match sequences.entry(sequence, |&(s, _)| s == sequence, |&(s, _)| s) {
                hash_table::Entry::Occupied(mut e) => {
                    mine.push(std::mem::replace(&mut e.get_mut().1, j));
                }
                hash_table::Entry::Vacant(e) => {
                    e.insert((sequence, j));
                }
            }
        }
        for &hash in &hint.reads {
            if let Some(w) = writers.find(hash, |w| w.hash == hash) {
                mine.extend(w.put);
                mine.extend(w.deltas.iter().rev().take(MAX_DELTA_EDGES));
            }
        }
        mine.sort_unstable();
        mine.dedup();
        preds.push(mine);
        for &(hash, put) in &hint.writes {
            let w = writers
                .entry(hash, |w| w.hash == hash, |w| w.hash)
                .or_insert_with(|| Writers {
                    hash,
                    put: None,
                    deltas: Vec::new(),
                })
                .into_mut();
            if put {
                w.put = Some(j);
                w.deltas.clear();
            } else {
                w.deltas.push(j);
            }
        }
    }
    preds
}

/// The number of transactions on the longest path of the DAG.
fn longest_path(preds: &[Vec<TxIndex>]) -> usize {
    let mut depth = vec![0usize; preds.len()];
    for j in 0..preds.len() {
        depth[j] = 1 + preds[j].iter().map(|&p| depth[p]).max().unwrap_or(0);
    }
    depth.into_iter().max().unwrap_or(0)
}

impl Dag {
    fn build<V: Vm>(hints: &[Hint<V>]) -> Self {
        let n = hints.len();
        let preds = predecessors(hints);
        let scheduled: Vec<bool> = preds.iter().map(|p| !p.is_empty()).collect();
        let mut group_end = vec![usize::MAX; n];
        let mut in_degree = vec![0; n];
        let mut successors = vec![Vec::new(); n];
        let (mut groups, mut max_group) = (0, 0);
        let mut head = None;
        for j in 0..n {
            if !scheduled[j] {
                head = None;
                continue;
            }
            // `j` continues the group of `j - 1` if that is its only dependency.
            if let Some(h) = head
                && preds[j] == [j - 1]
            {
                group_end[h] = j;
                max_group = max_group.max((j - h + 1) as u64);
                continue;
            }
            head = Some(j);
            groups += 1;
            max_group = max_group.max(1);
            group_end[j] = j;
            in_degree[j] = preds[j].len();
            for &p in &preds[j] {
                successors[p].push(j);
            }
        }
        Self {
            edges: preds.iter().map(|p| p.len() as u64).sum(),
            critical_path: longest_path(&preds) as u64,
            successors,
            scheduled,
            group_end,
            in_degree,
            groups,
            max_group,
        }
    }
}

/// Pre-executes `range` on `workers` workers, appending the hints to `hints` in block
/// order; returns the time spent, summed over workers.
fn hint<V, S>(
    hints: &mut Vec<Hint<V>>,
    vm: &V,
    storage: &S,
    range: Range<TxIndex>,
    workers: usize,
    hasher: &DefaultHashBuilder,
    tracer: &Tracer,
) -> Duration
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let kind = SpanKind::Hint;
    crate::workers::map_claimed_into(hints, workers, range, 4, tracer, kind, |tx| {
        Hint::new(preexecute(vm, storage, tx), vm.sequence_key(tx), hasher)
    })
}

/// What to run instead of the DAG, when its sample says it cannot pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fallback {
    /// A chain: in order on one thread (`optimistic` with no pre-executors is
    /// `sequential` that turns a panicking transaction into an error naming it).
    Sequential,
    /// Hints that miss most dependencies: `optimistic` merges the same stale executions
    /// without waiting on a schedule built from them (and turns serial if it must).
    Optimistic,
}

/// Judges the hints of the sample: a DAG whose longest path covers most of it is a
/// chain; hints of which most are stale although they have no edge in (the merge check
/// of an in-order pass over the sample tells) predict nothing (nearly all: a chain the
/// hints cannot see, e.g. of transactions invalid on the pre-block state).
fn judge_sample<V, S>(vm: &V, storage: &S, hints: &[Hint<V>]) -> Option<Fallback>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let preds = predecessors(hints);
    if longest_path(&preds) as f64 >= CHAIN_SHARE * hints.len() as f64 {
        return Some(Fallback::Sequential);
    }
    let pres = hints
        .iter()
        .map(|h| PreExecution {
            reads: h.pre.reads.clone(),
            predicted: h.pre.predicted.clone(),
            result: h.pre.result.clone(),
        })
        .collect();
    let stale = crate::optimistic::stale(vm, storage, pres);
    let mispredicted = stale
        .iter()
        .zip(&preds)
        .filter(|(stale, preds)| **stale && preds.is_empty())
        .count();
    let share = mispredicted as f64 / hints.len() as f64;
    if share >= CHAIN_SHARE {
        Some(Fallback::Sequential)
    } else if share >= MISPREDICTED_SHARE {
        Some(Fallback::Optimistic)
    } else {
        None
    }
}

/// Executes the block along its hinted dependency DAG on `run.threads` workers.
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

/// How the engine runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Judge a sample of hints and fall back when the DAG cannot pay (see the module
    /// documentation). Tests turn it off to exercise the DAG on any block.
    pub adaptive: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { adaptive: true }
    }
}

/// Executes the block along its hinted dependency DAG on `run.threads` workers.
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
    let threads = run.threads.max(1);
    let workers = run.workers(vm, storage);
    let tracer = Tracer::new(run.trace);

    if options.adaptive && crate::declared::declared_chain(vm, storage, workers, false) {
        // The declarations already say the block is a chain (one sender's nonce
        // sequence, say, whose hints on the pre-block state would all be invalid).
        return crate::sequential::in_order(vm, storage, run, &[("optimistic_fallback", 0)]);
    }

    // Hints of a sample first: a chain is handed to `sequential` before hinting it all.
    let sample = n.min((SAMPLE_PER_THREAD * threads).max(MIN_SAMPLE));
    // One hasher for every hint: the DAG tells keys apart by hash.
    let hasher = DefaultHashBuilder::default();
    let mut hints = Vec::new();
    let mut hint_time = hint(
        &mut hints,
        vm,
        storage,
        0..sample,
        workers,
        &hasher,
        &tracer,
    );
    if options.adaptive
        && sample >= MIN_SAMPLE
        && let Some(fallback) = judge_sample(vm, storage, &hints)
    {
        drop(tracer);
        let (outcome, mut metrics) = crate::optimistic::execute(
            vm,
            storage,
            &RunOptions {
                threads: match fallback {
                    Fallback::Sequential => 1,
                    Fallback::Optimistic => threads,
                },
                ..*run
            },
        )?;
        metrics.executions += sample as u64;
        metrics.reexecutions += sample as u64;
        // The engine that ran the block may report its own fallback; this one's counts.
        metrics
            .extra
            .retain(|(name, _)| *name != "sequential_fallback");
        metrics.extra.push((
            "sequential_fallback",
            u64::from(fallback == Fallback::Sequential),
        ));
        metrics.extra.push((
            "optimistic_fallback",
            u64::from(fallback == Fallback::Optimistic),
        ));
        return Ok((outcome, metrics));
    }
    hint_time += hint(
        &mut hints,
        vm,
        storage,
        sample..n,
        workers,
        &hasher,
        &tracer,
    );

    let build_started = Instant::now();
    let dag = Dag::build(&hints);
    if options.adaptive && dag.edges == 0 && hints.iter().all(|h| h.pre.result.is_ok()) {
        let metrics = Metrics {
            executions: n as u64,
            execution_time: hint_time,
            scheduling_time: build_started.elapsed(),
            ..Metrics::default()
        };
        return commit_hints(vm, storage, hints, &dag, workers, tracer, metrics);
    }
    let engine = DagEngine {
        vm,
        storage,
        // Sized for every key the hints write, and some more.
        memory: MvMemory::new(
            n + hints.iter().map(|h| h.writes.len()).sum::<usize>(),
            storage.read_latency() >= crate::workers::SLOW_READ,
        )
        .with_sinks(vm.delta_sinks(), workers, n),
        records: hints
            .into_iter()
            .enumerate()
            .map(|(tx, Hint { pre: hint, .. })| {
                Mutex::new(Record {
                    reads: Vec::new(),
                    written: Vec::new(),
                    output: None,
                    broken: false,
                    // A published hint's keys are noted as it is published, in parallel.
                    hinted: if dag.scheduled[tx] {
                        hint.written_keys().cloned().collect()
                    } else {
                        Vec::new()
                    },
                    hint: (!dag.scheduled[tx]).then_some(hint),
                    reused: false,
                    spent: Vec::new(),
                })
            })
            .collect(),
        pending: dag.in_degree.iter().map(|&d| AtomicUsize::new(d)).collect(),
        executed: (0..n).map(|_| AtomicBool::new(false)).collect(),
        ready: Mutex::new(BinaryHeap::new()),
        next_publish: AtomicUsize::new(0),
        committing: AtomicBool::new(false),
        committed: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        surprises: Mutex::new(HashMap::new()),
        any_surprise: AtomicBool::new(false),
        mispredictions: AtomicU64::new(0),
        dag,
        tracer,
    };
    let build_time = build_started.elapsed();
    let reports = crate::workers::run(workers, |id| engine.work(id));

    let finalize_started = Instant::now();
    let DagEngine {
        memory,
        records,
        error,
        dag,
        tracer,
        mispredictions,
        ..
    } = engine;
    if let Some(error) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(error.into());
    }
    let mut metrics = Metrics {
        executions: n as u64,
        execution_time: hint_time,
        scheduling_time: build_time,
        ..Metrics::default()
    };
    for r in reports {
        metrics.executions += r.executions;
        metrics.validations += r.validations;
        metrics.validation_failures += r.validation_failures;
        metrics.execution_time += r.execution_time;
        metrics.validation_time += r.validation_time;
        metrics.dependency_waits += r.waits;
    }
    metrics.reexecutions = metrics.executions.saturating_sub(n as u64);
    let mut trace = tracer.recorder(0);
    let span = trace.start();
    // The records are emptied on every worker: their buffers (hints, reads) were
    // allocated by the workers that hinted and executed, and freeing them one by one on
    // this thread took 9.4 of the 15 ms that finalizing the raw-transfer gigagas block took.
    // Then the same workers resolve the memory's final values side by side.
    let share = n.div_ceil(workers).max(1);
    let next_shard = AtomicUsize::new(0);
    let mut state_diff = Vec::new();
    let room = memory.keys();
    let parts = gather_into(&mut state_diff, room, |out| {
        crate::workers::run(workers.min(n).max(1), |w| {
            let mine = &records[(w * share).min(n)..((w + 1) * share).min(n)];
            let outputs = mine
                .iter()
                .map(|record| {
                    let mut record = record.lock().unwrap_or_else(|e| e.into_inner());
                    match std::mem::replace(&mut *record, Record::empty()).output {
                        Some(Ok(output)) => output,
                        _ => unreachable!("every committed transaction has an output"),
                    }
                })
                .collect::<Vec<_>>();
            let values = memory.drain_final_values(
                &next_shard,
                out,
                |k| storage.read(k),
                |k, v, d| vm.apply_delta(k, v, d),
                |earlier, later| vm.merge_deltas(earlier, later),
            );
            (outputs, values)
        })
    });
    drop(records);
    drop(memory);
    let mut outputs = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(parts.len());
    for (mut part, part_values) in parts {
        outputs.append(&mut part);
        values.push(part_values);
    }
    vm.finalize_outputs(&mut outputs)?;
    let state_diff =
        append_parts(state_diff, values).map_err(|e| VmError::Read(ReadError::Storage(e)))?;
    trace.record(SpanKind::Finalize, None, span);
    tracer.submit(trace);
    metrics.finalize_time = finalize_started.elapsed();
    metrics.trace = tracer.finish();
    metrics.extra = counters(&dag, mispredictions.into_inner(), false, workers);
    Ok((
        BlockOutcome {
            tx_outcomes: outputs,
            state_diff,
        },
        metrics,
    ))
}

/// The engine's counters in the metrics (see the module documentation).
fn counters(
    dag: &Dag,
    mispredictions: u64,
    hints_committed: bool,
    workers: usize,
) -> Vec<(&'static str, u64)> {
    vec![
        ("sequential_fallback", 0),
        ("optimistic_fallback", 0),
        ("dag_edges", dag.edges),
        ("groups", dag.groups),
        ("max_group_size", dag.max_group),
        ("critical_path", dag.critical_path),
        (
            "reused_hints",
            dag.scheduled.iter().filter(|s| !**s).count() as u64,
        ),
        ("mispredictions", mispredictions),
        ("hints_committed", u64::from(hints_committed)),
        ("workers", workers as u64),
    ]
}

/// The block when its DAG has no edge and every hint succeeded: then every hint is the
/// serial execution (by induction in block order: no transaction read a key that a hint
/// before it wrote, and those hints are exact, so it read the serial values), and the
/// block is its hints: their outputs, and their writes applied in block order. No
/// multi-version memory, no scheduling: each of `workers` workers takes a contiguous
/// share of the hints, applies their writes in order to keys of its own and keeps their
/// outputs (freeing the rest of the hints side by side); the shares then make the block's
/// outcome as committed ranges do ([`crate::ranges::outcome_of_runs`]). Metric
/// `hints_committed`.
fn commit_hints<V, S>(
    vm: &V,
    storage: &S,
    mut hints: Vec<Hint<V>>,
    dag: &Dag,
    workers: usize,
    tracer: Tracer,
    mut metrics: Metrics,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let finalize_started = Instant::now();
    let n = hints.len();
    let workers = workers.clamp(1, n.max(1));
    let mut trace = tracer.recorder(0);
    let span = trace.start();
    let share = n.div_ceil(workers);
    let mut shares = Vec::with_capacity(workers);
    while hints.len() > share {
        let tail = hints.split_off(hints.len() - share);
        shares.push(Mutex::new(tail));
    }
    shares.push(Mutex::new(hints));
    shares.reverse();
    let per_share = crate::workers::run(shares.len(), |w| {
        let mine = std::mem::take(&mut *shares[w].lock().unwrap_or_else(|e| e.into_inner()));
        let writes = mine.iter().map(|hint| hint.writes.len()).sum();
        let mut keys = LocalMap::<V>::with_capacity_and_hasher(writes, Default::default());
        let mut outputs = Vec::with_capacity(mine.len());
        let mut hints = mine.into_iter();
        loop {
            if let Some(ahead) = hints.as_slice().get(HINT_LOOKAHEAD) {
                ahead.prefetch();
            }
            let Some(hint) = hints.next() else { break };
            let Ok(execution) = hint.pre.result else {
                unreachable!("only blocks whose hints all succeeded come here")
            };
            for (key, write) in execution.writes {
                apply_write(vm, &mut keys, key, write);
            }
            outputs.push(execution.output);
        }
        (outputs, keys, std::thread::current().id())
    });
    let outcome = crate::ranges::outcome_of_runs(vm, storage, per_share, workers)?;
    trace.record(SpanKind::Finalize, None, span);
    tracer.submit(trace);
    metrics.finalize_time = finalize_started.elapsed();
    metrics.trace = tracer.finish();
    metrics.extra = counters(dag, 0, true, workers);
    Ok((outcome, metrics))
}

struct DagEngine<'a, V: Vm, S> {
    vm: &'a V,
    storage: &'a S,
    memory: MvMemory<V::Key, V::Value, V::Delta>,
    records: Box<[Mutex<Record<V>>]>,
    /// Per group head: predecessors not yet executed.
    pending: Box<[AtomicUsize]>,
    /// Per transaction: its first execution (or published hint) is in the memory.
    executed: Box<[AtomicBool]>,
    /// Group heads whose predecessors have all executed, lowest first.
    ready: Mutex<BinaryHeap<Reverse<TxIndex>>>,
    /// The next transaction whose hint may be published (claimed in chunks).
    next_publish: AtomicUsize,
    /// Held by the worker committing (see [`DagEngine::try_commit`]).
    committing: AtomicBool,
    /// Transactions committed (all below this index).
    committed: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<VmError>>,
    /// Keys some execution wrote although its transaction's hint did not, with the
    /// lowest such writer: the only way a transaction with no edge in can be invalid.
    surprises: Mutex<HashMap<V::Key, TxIndex>>,
    any_surprise: AtomicBool,
    mispredictions: AtomicU64,
    dag: Dag,
    tracer: Tracer,
}

/// What one worker did.
#[derive(Default)]
struct Report {
    executions: u64,
    validations: u64,
    validation_failures: u64,
    waits: u64,
    execution_time: Duration,
    validation_time: Duration,
}

/// Hints a worker publishes at once.
const PUBLISH_CHUNK: usize = 16;

impl<V, S> DagEngine<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    fn work(&self, id: usize) -> Report {
        let _fail = crate::workers::SetOnPanic(&self.failed);
        let n = self.records.len();
        let mut trace = self.tracer.recorder(id);
        let mut report = Report::default();
        let backoff = Backoff::new();
        while !self.failed.load(SeqCst) && self.committed.load(SeqCst) < n {
            // Publish hints of unscheduled transactions (their executions are done)...
            let first = self.next_publish.fetch_add(PUBLISH_CHUNK, SeqCst);
            if first < n {
                for tx in first..(first + PUBLISH_CHUNK).min(n) {
                    if !self.dag.scheduled[tx] {
                        let span = trace.start();
                        self.publish_hint(tx, id);
                        trace.record(SpanKind::Merge, Some(tx), span);
                    }
                }
                self.try_commit(id, &mut trace, &mut report);
                continue;
            }
            // ...then run groups whose dependencies are done.
            let head = self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(Reverse(head)) = head {
                backoff.reset();
                for tx in head..=self.dag.group_end[head] {
                    let started = Instant::now();
                    let span = trace.start();
                    self.execute(tx, SCHEDULED, id);
                    trace.record(SpanKind::Execute, Some(tx), span);
                    report.execution_time += started.elapsed();
                    report.executions += 1;
                    self.mark_executed(tx);
                    self.try_commit(id, &mut trace, &mut report);
                }
                continue;
            }
            self.try_commit(id, &mut trace, &mut report);
            let span = trace.start();
            report.waits += 1;
            backoff.snooze();
            trace.record(SpanKind::Wait, None, span);
        }
        self.tracer.submit(trace);
        report
    }

    /// Puts an unscheduled transaction's pre-execution into the memory as its execution
    /// (by `worker`).
    fn publish_hint(&self, tx: TxIndex, worker: usize) {
        let mut record = self.records[tx].lock().unwrap_or_else(|e| e.into_inner());
        let record = &mut *record;
        let hint = record
            .hint
            .as_mut()
            .expect("an unscheduled transaction has its hint");
        // The hint's buffers stay in the record (its reads are the reads): they were
        // allocated by another thread, and freeing them here contends for the allocator.
        let placeholder = Err(VmError::Read(ReadError::Aborted));
        match std::mem::replace(&mut hint.result, placeholder) {
            Ok(mut execution) => {
                record.hinted = execution.writes.iter().map(|(k, _)| k.clone()).collect();
                for (key, write) in execution.writes.drain(..) {
                    let _ = self.memory.write(key, tx, entry(0, write), worker);
                }
                record.output = Some(Ok(execution.output));
                record.spent = execution.writes;
            }
            Err(error) => record.output = Some(Err(error)),
        }
        record.reused = true;
        self.mark_executed(tx);
    }

    /// `tx`'s first execution is in the memory: release the groups waiting for it.
    fn mark_executed(&self, tx: TxIndex) {
        self.executed[tx].store(true, SeqCst);
        for &head in &self.dag.successors[tx] {
            if self.pending[head].fetch_sub(1, SeqCst) == 1 {
                self.ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Reverse(head));
            }
        }
    }

    /// Executes `tx` on the memory and records it (writes, reads, output).
    fn execute(&self, tx: TxIndex, incarnation: Incarnation, worker: usize) {
        let mut view = View {
            engine: self,
            tx,
            reads: Vec::new(),
            broken: false,
        };
        let result = crate::execute_caught(self.vm, tx, &mut view);
        let View { reads, broken, .. } = view;
        let mut record = self.records[tx].lock().unwrap_or_else(|e| e.into_inner());
        let record = &mut *record;
        let (writes, output): (Writes<V>, _) = match result {
            Ok(execution) => (execution.writes, Ok(execution.output)),
            Err(error) => (Vec::new(), Err(error)),
        };
        let previous = if record.reused {
            record.hinted.clone()
        } else {
            std::mem::take(&mut record.written)
        };
        for (key, write) in writes {
            if !record.hinted.contains(&key) {
                self.surprise(&key, tx);
            }
            record.written.push(key.clone());
            let _ = self
                .memory
                .write(key, tx, entry(incarnation, write), worker);
        }
        for key in previous {
            if !record.written.contains(&key) {
                self.memory.remove(&key, tx);
            }
        }
        record.reads = reads;
        record.broken = broken;
        record.output = Some(output);
        record.reused = false;
    }

    /// Notes that `tx` wrote `key`, which its hint did not write.
    fn surprise(&self, key: &V::Key, tx: TxIndex) {
        let mut surprises = self.surprises.lock().unwrap_or_else(|e| e.into_inner());
        let lowest = surprises.entry(key.clone()).or_insert(tx);
        *lowest = (*lowest).min(tx);
        self.any_surprise.store(true, SeqCst);
    }

    /// Commits as many transactions as are executed, in order, unless another worker is
    /// at it. After letting go, looks again: a transaction may have been executed by a
    /// worker that found the flag taken (all flags are sequentially consistent, so one
    /// of the two sees the other).
    fn try_commit(&self, worker: usize, trace: &mut Recorder, report: &mut Report) {
        let n = self.records.len();
        loop {
            if self.committing.swap(true, SeqCst) {
                return;
            }
            let mut next = self.committed.load(SeqCst);
            while next < n && self.executed[next].load(SeqCst) && !self.failed.load(SeqCst) {
                if let Err(error) = self.commit(next, worker, trace, report) {
                    *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                    self.failed.store(true, SeqCst);
                    break;
                }
                next += 1;
                self.committed.store(next, SeqCst);
            }
            self.committing.store(false, SeqCst);
            if !(next < n && self.executed[next].load(SeqCst)) || self.failed.load(SeqCst) {
                return;
            }
        }
    }

    /// Validates `tx` (every transaction before it committed) and re-executes it if it
    /// read a stale value or failed; the re-execution is final, and so is its failure.
    fn commit(
        &self,
        tx: TxIndex,
        worker: usize,
        trace: &mut Recorder,
        report: &mut Report,
    ) -> Result<(), VmError> {
        let started = Instant::now();
        let span = trace.start();
        report.validations += 1;
        let valid = self.validate(tx);
        report.validation_time += started.elapsed();
        trace.record(SpanKind::Validate, Some(tx), span);
        if !valid {
            report.validation_failures += 1;
            self.mispredictions.fetch_add(1, SeqCst);
            let started = Instant::now();
            let span = trace.start();
            self.execute(tx, REPAIR, worker);
            trace.record(SpanKind::Reexecute, Some(tx), span);
            report.execution_time += started.elapsed();
            report.executions += 1;
        }
        let record = self.records[tx].lock().unwrap_or_else(|e| e.into_inner());
        match &record.output {
            Some(Err(error)) => Err(error.clone()),
            _ => Ok(()),
        }
    }

    /// Whether `tx`'s recorded execution read what serial execution reads (every
    /// transaction before it is committed).
    fn validate(&self, tx: TxIndex) -> bool {
        let record = self.records[tx].lock().unwrap_or_else(|e| e.into_inner());
        if record.broken || !matches!(record.output, Some(Ok(_))) {
            return false;
        }
        if record.reused {
            // No edge in: no transaction before `tx` writes a key it read in the hints.
            // Every final write outside the hints is a surprise, noted before its
            // writer committed; without one below `tx` on its keys, its reads (all
            // pre-block values) are the serial ones.
            if !self.any_surprise.load(SeqCst) {
                return true;
            }
            let surprises = self.surprises.lock().unwrap_or_else(|e| e.into_inner());
            let hint = record.hint.as_ref().expect("a reused hint is kept");
            return hint
                .reads
                .iter()
                .all(|(key, _)| surprises.get(key).is_none_or(|&w| w > tx));
        }
        record.reads.iter().all(|r| {
            // A value read from storage seeds the memory's base, sparing a storage read.
            let load = |k: &V::Key| {
                if r.pre_block {
                    Ok(r.value.clone())
                } else {
                    self.storage.read(k)
                }
            };
            match self
                .memory
                .read(&r.key, tx, load, |k, v, d| self.vm.apply_delta(k, v, d))
            {
                Read::Value(Ok(value), _) => value == r.value,
                _ => false,
            }
        })
    }
}

fn entry<V, D>(incarnation: Incarnation, write: Write<V, D>) -> Entry<V, D> {
    match write {
        Write::Put(value) => Entry::Write(incarnation, value),
        Write::Delta(delta) => Entry::Delta(incarnation, delta),
    }
}

/// The memory as transaction `tx` sees it, recording each key's first read.
struct View<'a, 'e, V: Vm, S> {
    engine: &'a DagEngine<'e, V, S>,
    tx: TxIndex,
    reads: Vec<ReadRecord<V::Key, V::Value>>,
    broken: bool,
}

impl<V, S> ReadView<V::Key, V::Value> for View<'_, '_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        // One value per key per execution, whatever other workers write meanwhile.
        if let Some(r) = self.reads.iter().find(|r| r.key == *key) {
            return Ok(r.value.clone());
        }
        let engine = self.engine;
        let read = engine.memory.read(
            key,
            self.tx,
            |k| engine.storage.read(k),
            |k, v, d| engine.vm.apply_delta(k, v, d),
        );
        match read {
            Read::Value(Ok(value), origin) => {
                self.reads.push(ReadRecord {
                    key: key.clone(),
                    value: value.clone(),
                    pre_block: matches!(origin, Origin::Storage),
                });
                Ok(value)
            }
            Read::Value(Err(error), _) => {
                self.broken = true;
                Err(ReadError::Storage(error))
            }
            // The engine writes no estimates; should one appear, the execution is void.
            Read::Blocked(_) => {
                self.broken = true;
                Err(ReadError::Aborted)
            }
        }
    }
}
