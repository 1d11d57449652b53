//! `sealevel`: declared access sets and read/write locks, as in Solana's Sealevel (and
//! Neon EVM, which runs EVM transactions under it with emulator-computed account lists).
//!
//! Two engine names select the source of declarations ([`Hints`]): `sealevel` uses the
//! VM's own ([`Vm::declared_access`]; for the EVM its EIP-2930 access list and what the
//! transaction's shape implies, see `parex_evm::declared`), `sealevel-preexec` joins
//! them with what a pre-execution on the pre-block state ([`crate::preexec`]) read and
//! wrote, which is what Neon does.
//!
//! # Algorithm
//! 1. **Declare.** Every transaction gets an access set: keys with a kind, `Read`,
//!    `Write` or `Delta` (a commutative update that does not read the key, such as the
//!    beneficiary's fee).
//! 2. **Lock.** Each declared key has a queue of lock requests in block order. A request
//!    is granted when it is compatible with every request ahead of it in the queue (many
//!    `Read`s together, many `Delta`s together, a `Write` alone), so conflicting
//!    transactions get a key in block order. A transaction whose requests are all
//!    granted is *ready*; ready transactions run in parallel on the workers, lowest
//!    index first.
//! 3. **Execute.** A transaction reads the *committed* state (pre-block storage plus the
//!    writes of committed transactions; no multi-version memory) through a view that
//!    lets it read only keys it declared readable. Its writes are buffered, and checked
//!    against its declaration once it returns. With pre-execution hints, a
//!    pre-execution whose every read still sees the committed value *is* the result
//!    (the VM is a pure function of the values it reads) and is used without executing.
//! 4. **Commit in block order.** The lowest uncommitted transaction (the *frontier*)
//!    commits as soon as it has a result: its writes are applied to the committed state
//!    (deltas on top of the value there), then its locks are released, which grants the
//!    next requests in the queues. One worker at a time commits, taking the frontier and
//!    the finished results after it; it applies restricted runs' writes outside the
//!    scheduler's lock (their keys stay locked until their commits are recorded), so the
//!    other workers keep taking and handing in work meanwhile.
//! 5. **Undeclared access.** A read outside the declaration aborts the execution (the
//!    view answers [`ReadError::Aborted`]); a write outside it voids the result. The
//!    transaction keeps its locks and is *deferred*: it runs again when it is the
//!    frontier, with an unrestricted view. A transaction that starts as the frontier
//!    always runs unrestricted (a transaction with no declaration only runs so).
//! 6. **In-order runs invalidate.** A frontier run may write keys it holds no write or
//!    delta lock on, which later transactions may already have read. Each frontier
//!    commit records those keys with a sequence number; a transaction records the
//!    sequence number when it starts, and at its commit, if it read a key written by a
//!    frontier run committed after it started, its result is discarded and it runs again
//!    (as the frontier, so once more at most).
//!
//! **Step 0: no conflict, no locks** (adaptive runs). When no two declarations ask for
//! one key in kinds that exclude each other (checked on every worker, each taking a share
//! of the keys: `declared::declarations_conflict`), every lock would be granted at once
//! and steps 2 to 6 would only cost: the block is cut into segments of consecutive
//! transactions, and workers run the segments' transactions restricted, in order, on the
//! pre-block state, applying their writes to keys of the segment's own; the segments then
//! become the state diff as `optimistic`'s committed ranges do. Exact by induction in
//! block order: a transaction read only keys it declared readable, no earlier transaction
//! declared them written (that would conflict), and an earlier run that wrote outside its
//! declaration would be void; so each read saw the serial value. (With pre-execution
//! hints a pre-execution is reused as it is: its reads are part of its declaration.) The
//! first void or failed run stops step 0 and the block starts over at step 2
//! (`conflict_free` says which way it went).
//!
//! # Invariants
//! * Commits happen in block order, so while transaction `i` runs the committed state
//!   holds writes of transactions below `i` only.
//! * When `i` reads a key it declared readable, every transaction below `i` that holds
//!   a write or delta lock on the key has committed (it was ahead in the key's queue
//!   with an incompatible request, and locks are released at commit). A transaction
//!   below `i` that wrote the key *without* such a lock ran unrestricted as the
//!   frontier; if it committed after `i` started, `i` is re-run (step 6). So every read
//!   of a committed result is the serial one.
//! * Keys declared `Delta` are never read by their holder; deltas are applied at commit,
//!   in block order, on the committed value, so they need no mutual exclusion.
//! * The frontier's locks are all granted (every request ahead of them belongs to a
//!   committed transaction), so some worker can always run it: no deadlock, and at
//!   worst the block runs serially, in order.
//! * Hence every committed output and write equals the serial one; the first committed
//!   error is where serial execution fails, and it is returned.
//!
//! Adaptive: when most runs ahead of the frontier are voided (at least half, after
//! `ADAPT_AFTER` voids: the declarations miss what the transactions touch, as for
//! contract calls without access lists), only the frontier runs from then on, which
//! spares the wasted runs; it is reported as `frontier_only`. It changes nothing
//! but speed. Before that, the declarations of the first 64 transactions are compared
//! with their predecessors': when most conflict (a chain, where locks would hand the
//! transactions out one at a time), the block runs in order as `sequential` does
//! (`sequential_fallback`).
//!
//! Locks are held until commit, and commits wait for every earlier transaction, so a
//! transaction that conflicts with an earlier one waits for that one *and* everything
//! before it. Write-after-read needs no lock with buffered in-order commits, but the
//! locks follow Sealevel's reader/writer rule all the same.
//!
//! # Metrics
//! `executions` (pre-executions included), `reexecutions` (beyond the first of each
//! transaction), `dependency_waits` (transactions that waited for a lock),
//! `execution_time`, `scheduling_time` (building the lock table, finding work, waiting),
//! `validation_time` (handing in results and committing: checks, applying writes,
//! releasing locks) and `finalize_time`; extras: `declaration_coverage_pct` (committed
//! transactions whose final execution stayed within their declaration, percent),
//! `undeclared_reruns` (executions voided by an undeclared access), `lock_acquisitions`,
//! `lock_blocked` (transactions that had to wait for a lock), `frontier_runs`,
//! `invalidated` (step 6), `preexec_reused`, `frontier_only`, `conflict_free` (step 0
//! committed the block; it takes no lock), `declared_keys`, `hint_us` (declaring,
//! pre-execution included) and `workers`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, RwLock, TryLockError};
use std::time::{Duration, Instant};

use crossbeam::utils::Backoff;
use parex_core::{
    AccessKind, BlockOutcome, PreBlockView, ReadError, ReadView, Storage, StorageError, TxIndex,
    Vm, VmError, Write,
};

use crate::chunk::{LocalMap, apply_write};
use crate::declared::{
    Declaration, declarations_conflict, declared_chain, declared_kind, normalize,
};
use crate::preexec::PreExecution;
use crate::ranges::ExecutedRun;
use crate::trace::{SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

type Hasher = alloy_primitives::map::DefaultHashBuilder;
type Writes<V> = Vec<(<V as Vm>::Key, Write<<V as Vm>::Value, <V as Vm>::Delta>)>;
type Declarations<V> = Vec<Declaration<<V as Vm>::Key>>;

/// Where declarations come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hints {
    /// The VM's declarations ([`Vm::declared_access`]).
    #[default]
    Declared,
    /// The VM's declarations joined with what a pre-execution on the pre-block state
    /// read (`Read`) and wrote (`Write`, or `Delta` for deltas).
    Preexec,
}

/// How the engine runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub hints: Hints,
    /// Stop running transactions ahead of the frontier once most such runs are voided
    /// by undeclared accesses (see the module documentation). Tests turn it off to
    /// exercise restricted runs on any block.
    pub adaptive: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hints: Hints::Declared,
            adaptive: true,
        }
    }
}

/// The adaptive rule: after this many voided runs, if at least half of the runs ahead
/// of the frontier were voided, only the frontier runs from then on.
const ADAPT_AFTER: u64 = 32;

/// Shards of the committed state (a power of two).
const SHARDS: usize = 64;
/// Transactions a worker declares at once in the hint phase.
const CLAIM: usize = 16;
/// Most restricted results a committer applies outside the scheduler's lock at once (their
/// locks are released when the whole run is recorded).
const COMMIT_BATCH: usize = 32;
/// Transactions a worker claims at once in the pass of pre-executions.
const PREEXEC_CLAIM: usize = 4;
/// A block whose declarations conflict nowhere runs in this many segments per worker
/// ([`Sealevel::run_unlocked`]): enough for a worker done early to find another.
const SEGMENTS_PER_WORKER: usize = 8;

/// Executes the block with declared hints (`sealevel`).
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

/// Executes the block with pre-execution hints (`sealevel-preexec`).
pub fn execute_preexec<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    execute_with(
        vm,
        storage,
        run,
        Options {
            hints: Hints::Preexec,
            ..Options::default()
        },
    )
}

/// Executes the block with `options`.
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
    let tracer = Tracer::new(run.trace);
    // Hints, declarations and execution run on as many workers as the block gets.
    let workers = run.workers(vm, storage);

    if options.adaptive && declared_chain(vm, storage, workers, false) {
        // Locks would hand the transactions out one by one anyway, with the lock table's
        // and the in-order commit's cost on top: run the block in order.
        return crate::sequential::in_order(vm, storage, run, &[]);
    }

    let hint_started = Instant::now();
    let (pre, declared) = declare(vm, storage, workers, options.hints, &tracer);
    let hint_time = hint_started.elapsed();

    let checked = Instant::now();
    // Step 0 applies when no two declarations ask for a key in exclusive kinds.
    let unlocked = options.adaptive
        && declared.iter().all(|d| !d.is_empty())
        && !declarations_conflict(&declared, workers);
    let declared_keys: u64 = declared.iter().map(|d| d.len() as u64).sum();
    let mut engine = Sealevel {
        vm,
        storage,
        declared,
        pre,
        // The lock table and the committed state: built below, unless step 0 commits the
        // block (it uses neither).
        sched: Mutex::new(Sched::new(&[])),
        state: Committed::new(0),
        halt: AtomicBool::new(false),
        tracer,
    };
    let extras = Extras {
        declared_keys,
        hint_us: hint_time.as_micros() as u64,
        workers: workers as u64,
    };
    let mut metrics = Metrics {
        scheduling_time: checked.elapsed(),
        ..Metrics::default()
    };
    if let Some(pre) = &engine.pre {
        // Pre-executions count as first executions.
        metrics.executions += pre.len() as u64;
    }
    if unlocked {
        let block = engine.run_unlocked(workers);
        metrics.executions += block.executions;
        metrics.execution_time += block.time;
        if let Some(segments) = block.segments {
            let counters = Counters {
                preexec_reused: block.preexec_reused,
                conflict_free: 1,
                ..Counters::default()
            };
            metrics.extra = extras.list(&counters);
            return commit_unlocked(vm, storage, engine.tracer, segments, workers, metrics);
        }
    }

    let build_started = Instant::now();
    let mut sched = Sched::<V>::new(&engine.declared);
    sched.adaptive = options.adaptive;
    let lock_blocked = sched.lock_blocked;
    engine.sched = Mutex::new(sched);
    // Most declared keys are written (reads are mostly of written keys too).
    engine.state = Committed::new(declared_keys as usize);
    metrics.scheduling_time += build_started.elapsed();
    metrics.dependency_waits = lock_blocked;

    let per_worker = crate::workers::run(workers, |id| engine.work(id));

    let finalize_started = Instant::now();
    let mut finalize_trace = engine.tracer.recorder(0);
    let finalize_span = finalize_trace.start();
    let mut undeclared_reruns = 0;
    let mut preexec_reused = 0;
    for w in &per_worker {
        metrics.executions += w.executions;
        preexec_reused += w.preexec_reused;
        metrics.execution_time += w.execution;
        metrics.scheduling_time += w.scheduling;
        metrics.validation_time += w.commit;
        undeclared_reruns += w.undeclared_reruns;
    }
    metrics.reexecutions = metrics.executions.saturating_sub(n as u64);
    let Sealevel {
        sched,
        state,
        tracer,
        ..
    } = engine;
    let sched = sched.into_inner().unwrap_or_else(|e| e.into_inner());
    let frontier_only = sched.frontier_only();
    if let Some(error) = sched.error {
        return Err(error.into());
    }
    let mut outputs = Vec::with_capacity(n);
    for (tx, output) in sched.outputs.into_iter().enumerate() {
        match output {
            Some(output) => outputs.push(output),
            None => {
                return Err(EngineError::Vm(VmError::Internal {
                    tx,
                    message: "sealevel ended without committing the transaction".into(),
                }));
            }
        }
    }
    vm.finalize_outputs(&mut outputs)?;
    let state_diff = state.into_diff();
    metrics.finalize_time = finalize_started.elapsed();
    finalize_trace.record(SpanKind::Finalize, None, finalize_span);
    tracer.submit(finalize_trace);
    metrics.trace = tracer.finish();
    let coverage = if n == 0 {
        100
    } else {
        sched.complete * 100 / n as u64
    };
    metrics.extra = extras.list(&Counters {
        coverage,
        undeclared_reruns,
        lock_acquisitions: sched.lock_acquisitions,
        lock_blocked,
        frontier_runs: sched.frontier_runs,
        invalidated: sched.invalidated,
        preexec_reused,
        frontier_only: u64::from(frontier_only),
        conflict_free: 0,
    });
    Ok((
        BlockOutcome {
            tx_outcomes: outputs,
            state_diff,
        },
        metrics,
    ))
}

/// The metrics' extras that do not depend on how the block ran.
struct Extras {
    declared_keys: u64,
    hint_us: u64,
    workers: u64,
}

/// The metrics' extras that count what the workers did.
struct Counters {
    coverage: u64,
    undeclared_reruns: u64,
    lock_acquisitions: u64,
    lock_blocked: u64,
    frontier_runs: u64,
    invalidated: u64,
    preexec_reused: u64,
    frontier_only: u64,
    conflict_free: u64,
}

impl Default for Counters {
    /// A block that ran without the lock table: every declaration complete, nothing else.
    fn default() -> Self {
        Self {
            coverage: 100,
            undeclared_reruns: 0,
            lock_acquisitions: 0,
            lock_blocked: 0,
            frontier_runs: 0,
            invalidated: 0,
            preexec_reused: 0,
            frontier_only: 0,
            conflict_free: 0,
        }
    }
}

impl Extras {
    fn list(&self, c: &Counters) -> Vec<(&'static str, u64)> {
        vec![
            ("declaration_coverage_pct", c.coverage),
            ("undeclared_reruns", c.undeclared_reruns),
            ("lock_acquisitions", c.lock_acquisitions),
            ("lock_blocked", c.lock_blocked),
            ("frontier_runs", c.frontier_runs),
            ("invalidated", c.invalidated),
            ("preexec_reused", c.preexec_reused),
            ("sequential_fallback", 0),
            ("frontier_only", c.frontier_only),
            ("conflict_free", c.conflict_free),
            ("declared_keys", self.declared_keys),
            ("hint_us", self.hint_us),
            ("workers", self.workers),
        ]
    }
}

/// A block whose declarations conflict nowhere, from its segments (in block order; see
/// [`Sealevel::run_unlocked`]), with its metrics (their extras already listed).
fn commit_unlocked<V, S>(
    vm: &V,
    storage: &S,
    tracer: Tracer,
    segments: Vec<ExecutedRun<V>>,
    workers: usize,
    mut metrics: Metrics,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let finalize_started = Instant::now();
    let mut trace = tracer.recorder(0);
    let span = trace.start();
    let outcome = crate::ranges::outcome_of_runs(vm, storage, segments, workers)?;
    metrics.reexecutions = metrics
        .executions
        .saturating_sub(outcome.tx_outcomes.len() as u64);
    metrics.finalize_time = finalize_started.elapsed();
    trace.record(SpanKind::Finalize, None, span);
    tracer.submit(trace);
    metrics.trace = tracer.finish();
    Ok((outcome, metrics))
}

// ---------------------------------------------------------------------------------------
// Step 1: declarations.

/// Every transaction's declaration, in block order, computed on `threads` workers; with
/// pre-execution hints, each transaction's pre-execution first (returned too), in the
/// same pass: declaring then finds the accounts the pre-execution just read in the cache.
fn declare<V, S>(
    vm: &V,
    storage: &S,
    threads: usize,
    hints: Hints,
    tracer: &Tracer,
) -> (Option<Vec<PreExecution<V>>>, Declarations<V>)
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let range = 0..vm.tx_count();
    let declare = |tx, pre: Option<&PreExecution<V>>| {
        let mut keys = vm.declared_access(tx, &mut PreBlockView(storage));
        if let Some(pre) = pre {
            keys.extend(pre.reads.iter().map(|(k, _)| (k.clone(), AccessKind::Read)));
            if let Ok(execution) = &pre.result {
                keys.extend(execution.writes.iter().map(|(k, w)| {
                    let kind = match w {
                        Write::Put(_) => AccessKind::Write,
                        Write::Delta(_) => AccessKind::Delta,
                    };
                    (k.clone(), kind)
                }));
            }
        }
        normalize(keys)
    };
    match hints {
        Hints::Declared => {
            let (declared, _) =
                crate::workers::map_claimed(threads, range, CLAIM, tracer, SpanKind::Hint, |tx| {
                    declare(tx, None)
                });
            (None, declared)
        }
        Hints::Preexec => {
            let (both, _) = crate::workers::map_claimed(
                threads,
                range,
                PREEXEC_CLAIM,
                tracer,
                SpanKind::Hint,
                |tx| {
                    let pre = crate::preexec::preexecute(vm, storage, tx);
                    let declaration = declare(tx, Some(&pre));
                    (pre, declaration)
                },
            );
            let (pre, declared) = both.into_iter().unzip();
            (Some(pre), declared)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Step 2: locks, and the scheduler's state (one mutex: lock work is short next to
// executing a transaction).

/// The lock of one key: its requests are `requests[head..end]` of the lock table (in
/// block order; those before `head` are released), and `requests[head..granted]` hold
/// it: one `Write`, or a run of `Read`s or of `Delta`s.
struct LockQueue {
    head: u32,
    granted: u32,
    end: u32,
}

impl LockQueue {
    /// Grants every request now compatible with all those ahead of it; calls `grant` with
    /// each newly granted transaction.
    fn grant(&mut self, requests: &[(TxIndex, AccessKind)], mut grant: impl FnMut(TxIndex)) {
        while self.granted < self.end {
            let (tx, kind) = requests[self.granted as usize];
            if self.granted > self.head && !requests[self.head as usize].1.compatible(kind) {
                break;
            }
            self.granted += 1;
            grant(tx);
        }
    }

    /// Releases `tx`'s request. Releases happen in block order (at commit), so it is the
    /// first unreleased one; every request up to it is released.
    fn release(&mut self, requests: &[(TxIndex, AccessKind)], tx: TxIndex) {
        while self.head < self.end && requests[self.head as usize].0 <= tx {
            self.head += 1;
        }
        self.granted = self.granted.max(self.head);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Some lock is not granted yet.
    Waiting,
    /// In the ready queue.
    Ready,
    Running,
    /// Executed within its declaration; the result waits for its turn to commit.
    Done,
    /// Must run as the frontier (undeclared access, or nothing declared).
    Deferred,
    Committed,
}

/// A finished execution, not yet committed.
struct Finished<V: Vm> {
    writes: Writes<V>,
    output: Result<V::Output, VmError>,
    /// Keys read (restricted runs only; checked at commit, step 6).
    reads: Vec<V::Key>,
    /// Ran as the frontier (unrestricted, exact by construction).
    frontier: bool,
    /// Every access was within the declaration.
    complete: bool,
}

/// What [`Sealevel::run_unlocked`] did: per segment in block order, the keys its
/// transactions wrote (with the thread that applied them) and their outputs (`None` if a
/// run was void or failed); and the executions and the time it took.
struct UnlockedBlock<V: Vm> {
    segments: Option<Vec<ExecutedRun<V>>>,
    executions: u64,
    preexec_reused: u64,
    time: Duration,
}

/// What a worker picked: a transaction, run restricted or as the frontier.
#[derive(Clone, Copy)]
struct Task {
    tx: TxIndex,
    frontier: bool,
    first: bool,
    /// Step 0: restricted, on the pre-block state (nothing is committed), its reads not
    /// kept (no commit checks them).
    unlocked: bool,
}

struct Sched<V: Vm> {
    status: Vec<Status>,
    /// Lock requests not yet granted, per transaction.
    pending: Vec<u32>,
    /// The locks (queue indexes) of transaction `tx`'s declared keys are
    /// `tx_locks[lock_offsets[tx]..lock_offsets[tx + 1]]`.
    tx_locks: Vec<u32>,
    lock_offsets: Vec<u32>,
    queues: Vec<LockQueue>,
    /// Every lock request, grouped by key, in block order within a key.
    requests: Vec<(TxIndex, AccessKind)>,
    ready: ReadySet,
    /// The frontier: every transaction below it is committed.
    next: TxIndex,
    runs: Vec<u32>,
    /// `frontier_seq` when the transaction's latest run started.
    start_seq: Vec<u64>,
    results: Vec<Option<Finished<V>>>,
    outputs: Vec<Option<V::Output>>,
    /// Frontier commits that wrote something so far, and per key the last one's number.
    frontier_seq: u64,
    frontier_writes: HashMap<V::Key, u64, Hasher>,
    error: Option<VmError>,
    adaptive: bool,
    /// Runs ahead of the frontier (restricted), and how many of them were voided.
    restricted_runs: u64,
    voided: u64,
    lock_acquisitions: u64,
    lock_blocked: u64,
    frontier_runs: u64,
    invalidated: u64,
    complete: u64,
    /// A worker is committing (see [`Sealevel::commit`]): results handed in meanwhile wait
    /// for it, even the frontier's.
    committing: bool,
}

impl<V: Vm> Sched<V> {
    /// Queues every declared key's requests in block order and grants what it can.
    fn new(declared: &[Declaration<V::Key>]) -> Self {
        let n = declared.len();
        // Number the keys, count each one's requests, then lay the queues out flat.
        // Sized for every request a distinct key (growing the table step by step rehashed
        // it a dozen times on a gigagas block).
        let requests_total = declared.iter().map(|d| d.len()).sum();
        let mut ids: HashMap<&V::Key, u32, Hasher> =
            HashMap::with_capacity_and_hasher(requests_total, Hasher::default());
        let mut counts: Vec<u32> = Vec::with_capacity(requests_total);
        let mut tx_locks = Vec::with_capacity(requests_total);
        let mut lock_offsets = Vec::with_capacity(n + 1);
        lock_offsets.push(0);
        for declaration in declared {
            for (key, _) in declaration.iter() {
                let id = *ids.entry(key).or_insert_with(|| {
                    counts.push(0);
                    (counts.len() - 1) as u32
                });
                counts[id as usize] += 1;
                tx_locks.push(id);
            }
            lock_offsets.push(tx_locks.len() as u32);
        }
        let mut queues = Vec::with_capacity(counts.len());
        let mut start = 0u32;
        for count in counts {
            queues.push(LockQueue {
                head: start,
                granted: start,
                end: start,
            });
            start += count;
        }
        let mut requests = vec![(0, AccessKind::Read); tx_locks.len()];
        for (tx, declaration) in declared.iter().enumerate() {
            let ids = &tx_locks[lock_offsets[tx] as usize..lock_offsets[tx + 1] as usize];
            for (&id, (_, kind)) in ids.iter().zip(declaration.iter()) {
                let queue = &mut queues[id as usize];
                requests[queue.end as usize] = (tx, *kind);
                queue.end += 1;
            }
        }
        let mut sched = Sched {
            status: vec![Status::Waiting; n],
            pending: declared.iter().map(|d| d.len() as u32).collect(),
            tx_locks,
            lock_offsets,
            queues,
            requests,
            ready: ReadySet::new(n),
            next: 0,
            runs: vec![0; n],
            start_seq: vec![0; n],
            results: (0..n).map(|_| None).collect(),
            outputs: (0..n).map(|_| None).collect(),
            frontier_seq: 0,
            frontier_writes: HashMap::default(),
            error: None,
            adaptive: false,
            restricted_runs: 0,
            voided: 0,
            lock_acquisitions: 0,
            lock_blocked: 0,
            frontier_runs: 0,
            invalidated: 0,
            complete: 0,
            committing: false,
        };
        for queue in 0..sched.queues.len() {
            sched.grant(queue);
        }
        // Granting queued every transaction whose locks were all granted.
        for (tx, declaration) in declared.iter().enumerate() {
            if declaration.is_empty() {
                sched.status[tx] = Status::Deferred;
            } else if sched.pending[tx] > 0 {
                sched.lock_blocked += 1;
            }
        }
        sched.promote_frontier();
        sched
    }

    fn finished(&self) -> bool {
        self.next >= self.status.len() || self.error.is_some()
    }

    /// Grants what queue `queue` can grant; transactions left with no pending request
    /// become ready.
    fn grant(&mut self, queue: usize) {
        let Sched {
            queues,
            requests,
            pending,
            status,
            ready,
            lock_acquisitions,
            ..
        } = self;
        queues[queue].grant(requests, |tx| {
            *lock_acquisitions += 1;
            pending[tx] = pending[tx].saturating_sub(1);
            if pending[tx] == 0 && status[tx] == Status::Waiting {
                status[tx] = Status::Ready;
                ready.push(tx);
            }
        });
    }

    /// Records the commit of `tx`, the frontier, whose writes are applied: moves the
    /// frontier past it and releases its locks.
    fn record_commit(&mut self, tx: TxIndex, output: V::Output, complete: bool) {
        debug_assert_eq!(tx, self.next, "commits are recorded in block order");
        if complete {
            self.complete += 1;
        }
        self.outputs[tx] = Some(output);
        self.status[tx] = Status::Committed;
        self.next += 1;
        self.release(tx);
    }

    /// Releases `tx`'s locks (at its commit) and grants the requests behind them.
    fn release(&mut self, tx: TxIndex) {
        let locks = self.lock_offsets[tx] as usize..self.lock_offsets[tx + 1] as usize;
        for i in locks {
            let lock = self.tx_locks[i];
            self.queues[lock as usize].release(&self.requests, tx);
            self.grant(lock as usize);
        }
    }

    /// Queues the frontier if it waits for its turn.
    fn promote_frontier(&mut self) {
        if let Some(status) = self.status.get_mut(self.next)
            && *status == Status::Deferred
        {
            *status = Status::Ready;
            self.ready.push(self.next);
        }
    }

    /// The lowest ready transaction, if any, marked running.
    fn pop(&mut self) -> Option<Task> {
        if self.frontier_only() && self.ready.peek() != Some(self.next) {
            return None;
        }
        let tx = self.ready.pop()?;
        self.status[tx] = Status::Running;
        self.start_seq[tx] = self.frontier_seq;
        self.runs[tx] += 1;
        // The frontier cannot move while it runs: only its own commit moves it.
        let frontier = tx == self.next;
        if frontier {
            self.frontier_runs += 1;
        } else {
            self.restricted_runs += 1;
        }
        Some(Task {
            tx,
            frontier,
            first: self.runs[tx] == 1,
            unlocked: false,
        })
    }

    /// The adaptive rule: most runs ahead of the frontier were voided, so only the
    /// frontier runs (the declarations mostly miss what transactions touch).
    fn frontier_only(&self) -> bool {
        self.adaptive && self.voided >= ADAPT_AFTER && 2 * self.voided >= self.restricted_runs
    }

    /// Whether a restricted run of `tx` read a key that a frontier run committed after
    /// it started wrote (step 6).
    fn read_stale(&self, tx: TxIndex, reads: &[V::Key]) -> bool {
        self.frontier_seq > self.start_seq[tx]
            && reads.iter().any(|k| {
                self.frontier_writes
                    .get(k)
                    .is_some_and(|&seq| seq >= self.start_seq[tx])
            })
    }
}

/// Transactions ready to run, lowest first: a bit per transaction and a bit per word of
/// those (whether it has any set), so that finding the lowest reads a few words. (A binary
/// heap of them took 7% of `sealevel`'s time on the raw-transfer gigagas block, where the
/// whole block is ready at once, all of it under the scheduler's lock.)
struct ReadySet {
    words: Vec<u64>,
    summary: Vec<u64>,
}

impl ReadySet {
    /// An empty set for transactions `0..n`.
    fn new(n: usize) -> Self {
        Self {
            words: vec![0; n.div_ceil(64)],
            summary: vec![0; n.div_ceil(64 * 64)],
        }
    }

    fn push(&mut self, tx: TxIndex) {
        let word = tx / 64;
        self.words[word] |= 1 << (tx % 64);
        self.summary[word / 64] |= 1 << (word % 64);
    }

    /// The lowest transaction in the set.
    fn peek(&self) -> Option<TxIndex> {
        let (group, bits) = self
            .summary
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != 0)?;
        let word = group * 64 + bits.trailing_zeros() as usize;
        Some(word * 64 + self.words[word].trailing_zeros() as usize)
    }

    /// Takes the lowest transaction out of the set.
    fn pop(&mut self) -> Option<TxIndex> {
        let tx = self.peek()?;
        let word = tx / 64;
        self.words[word] &= !(1 << (tx % 64));
        if self.words[word] == 0 {
            self.summary[word / 64] &= !(1 << (word % 64));
        }
        Some(tx)
    }
}

// ---------------------------------------------------------------------------------------
// The committed state: pre-block storage plus the writes of committed transactions.

/// One shard: per written key, its value (`None`: the key does not exist).
/// (Insertion-ordered: a new key's entry is appended, and only its slot in the index is
/// somewhere random; a hash map's bucket, key and value together, was three random lines
/// to fetch for every key the block writes.)
type Shard<K, V> = RwLock<ShardMap<K, V>>;
type ShardMap<K, V> = indexmap::IndexMap<K, Option<V>, Hasher>;

struct Committed<K, V> {
    shards: Box<[Shard<K, V>]>,
    hasher: Hasher,
}

impl<K: Eq + std::hash::Hash, V: Clone> Committed<K, V> {
    /// Sized for about `keys` written keys.
    fn new(keys: usize) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(ShardMap::with_capacity_and_hasher(
                        keys / SHARDS + 1,
                        Hasher::default(),
                    ))
                })
                .collect(),
            hasher: Hasher::default(),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, V> {
        &self.shards[self.shard_index(key)]
    }

    fn shard_index(&self, key: &K) -> usize {
        self.hasher.hash_one(key) as usize & (SHARDS - 1)
    }

    /// The value a committed transaction wrote, or `None` if none wrote the key.
    fn get(&self, key: &K) -> Option<Option<V>> {
        self.shard(key)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Replaces the value a committed transaction wrote under `key` with `f` of it; false
    /// (and `f` unused) if none wrote the key.
    fn update(&self, key: &K, f: impl FnOnce(Option<V>) -> Option<V>) -> bool {
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        match shard.get_mut(key) {
            Some(value) => {
                *value = f(value.take());
                true
            }
            None => false,
        }
    }

    fn put(&self, key: K, value: Option<V>) {
        self.shard(&key)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, value);
    }

    /// Every written key that exists after the block, with its value.
    fn into_diff(self) -> Vec<(K, V)> {
        let shards: Vec<ShardMap<K, V>> = self
            .shards
            .into_vec()
            .into_iter()
            .map(|shard| shard.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Sized up front: collecting the chained shards grew the vector from nothing,
        // copying it at every doubling.
        let mut diff = Vec::with_capacity(shards.iter().map(ShardMap::len).sum());
        for shard in shards {
            diff.extend(shard.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        }
        diff
    }
}

// ---------------------------------------------------------------------------------------
// Steps 3 to 6: workers.

struct Sealevel<'a, V: Vm, S> {
    vm: &'a V,
    storage: &'a S,
    declared: Vec<Declaration<V::Key>>,
    /// Pre-executions (`Hints::Preexec`), reused where still valid.
    pre: Option<Vec<PreExecution<V>>>,
    sched: Mutex<Sched<V>>,
    state: Committed<V::Key, V::Value>,
    /// Set when a worker unwinds, so that the others stop instead of waiting forever.
    halt: AtomicBool,
    tracer: Tracer,
}

/// One worker's counters and phase times.
#[derive(Default)]
struct WorkerStats {
    executions: u64,
    preexec_reused: u64,
    undeclared_reruns: u64,
    execution: Duration,
    scheduling: Duration,
    commit: Duration,
}

/// The result of one run: usable, or void (an undeclared access).
enum Run<V: Vm> {
    Finished(Finished<V>),
    Void,
}

impl<V, S> Sealevel<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    /// The scheduler, locked. Its holders keep it a microsecond or two (a pop, a hand-in,
    /// or a commit's bookkeeping): a worker spins and yields for it a while before it
    /// sleeps in the kernel, where a sleep and a wake-up cost more than the wait. On the raw-transfer gigagas
    /// block on 2 threads: 165-177 ms to 148-150 ms, of which committing (waits for the
    /// lock included) 130-151 ms to 95-98 ms, summed over the workers.
    fn sched(&self) -> MutexGuard<'_, Sched<V>> {
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            match self.sched.try_lock() {
                Ok(sched) => return sched,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => backoff.snooze(),
            }
        }
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One worker's loop: take the lowest ready transaction, run it, hand in the result.
    fn work(&self, id: usize) -> WorkerStats {
        let _halt = crate::workers::SetOnPanic(&self.halt);
        let mut trace = self.tracer.recorder(id);
        let mut stats = WorkerStats::default();
        let backoff = Backoff::new();
        loop {
            let started = Instant::now();
            let task = {
                let mut sched = self.sched();
                if sched.finished() || self.halt.load(Relaxed) {
                    break;
                }
                sched.pop()
            };
            let Some(task) = task else {
                let span = trace.start();
                backoff.snooze();
                trace.record(SpanKind::Wait, None, span);
                stats.scheduling += started.elapsed();
                continue;
            };
            backoff.reset();
            let executing = Instant::now();
            stats.scheduling += executing - started;
            let span = trace.start();
            let run = self.run(task, &mut stats);
            let kind = if task.first {
                SpanKind::Execute
            } else {
                SpanKind::Reexecute
            };
            trace.record(kind, Some(task.tx), span);
            let committing = Instant::now();
            stats.execution += committing - executing;
            let mut sched = self.sched();
            match run {
                Run::Void => {
                    stats.undeclared_reruns += 1;
                    sched.voided += 1;
                    sched.status[task.tx] = Status::Deferred;
                    sched.promote_frontier();
                }
                Run::Finished(finished) => {
                    sched.results[task.tx] = Some(finished);
                    sched.status[task.tx] = Status::Done;
                    // A worker that is committing already takes this result in turn.
                    if task.tx == sched.next && !sched.committing {
                        sched = self.commit(sched);
                    }
                }
            }
            drop(sched);
            stats.commit += committing.elapsed();
        }
        self.tracer.submit(trace);
        stats
    }

    /// Step 0: runs every transaction restricted, with no lock and no ordered commit (the
    /// committed state stays empty), for a block whose lock requests were all granted at
    /// once. The block is cut into segments of consecutive transactions, claimed in block
    /// order; a worker executes a segment's transactions in order and applies their writes
    /// to keys of the segment's own ([`crate::chunk::apply_write`]), which become the state
    /// diff as committed ranges do ([`crate::ranges::outcome_of_runs`]). Stops at the first
    /// run that is void or fails: the block then takes the usual way, from the start
    /// ([`UnlockedBlock::segments`] is `None`).
    fn run_unlocked(&self, workers: usize) -> UnlockedBlock<V> {
        let n = self.declared.len();
        let segments = (workers * SEGMENTS_PER_WORKER).clamp(1, n.max(1));
        let len = n.div_ceil(segments);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let per_worker = crate::workers::run(workers, |id| {
            let _halt = crate::workers::SetOnPanic(&stop);
            let mut trace = self.tracer.recorder(id);
            let mut stats = WorkerStats::default();
            let started = Instant::now();
            let mut done = Vec::new();
            'segments: loop {
                let segment = next.fetch_add(1, Relaxed);
                let first = segment * len;
                if first >= n {
                    break;
                }
                let txs = first..(first + len).min(n);
                let mut keys =
                    LocalMap::<V>::with_capacity_and_hasher(2 * txs.len(), Default::default());
                let mut outputs = Vec::with_capacity(txs.len());
                for tx in txs {
                    if stop.load(Relaxed) {
                        break 'segments;
                    }
                    let span = trace.start();
                    let pre = self.pre.as_ref().and_then(|p| p[tx].result.as_ref().ok());
                    if let Some(execution) = pre {
                        // It read the pre-block state, and only keys its declaration
                        // names (they include what it read and wrote): in this block that
                        // is the serial state, so it is the result, unchecked.
                        stats.preexec_reused += 1;
                        for (key, write) in &execution.writes {
                            apply_write(self.vm, &mut keys, key.clone(), write.clone());
                        }
                        outputs.push(execution.output.clone());
                        trace.record(SpanKind::Execute, Some(tx), span);
                        continue;
                    }
                    let task = Task {
                        tx,
                        frontier: false,
                        first: true,
                        unlocked: true,
                    };
                    let run = self.run(task, &mut stats);
                    trace.record(SpanKind::Execute, Some(tx), span);
                    let Run::Finished(Finished {
                        writes,
                        output: Ok(output),
                        ..
                    }) = run
                    else {
                        // Void (an undeclared access) or failed: the locked way decides.
                        stop.store(true, Relaxed);
                        break 'segments;
                    };
                    for (key, write) in writes {
                        apply_write(self.vm, &mut keys, key, write);
                    }
                    outputs.push(output);
                }
                done.push((segment, keys, outputs));
            }
            self.tracer.submit(trace);
            stats.execution = started.elapsed();
            (done, stats, std::thread::current().id())
        });
        let mut block = UnlockedBlock {
            segments: None,
            executions: 0,
            preexec_reused: 0,
            time: Duration::ZERO,
        };
        let mut segments = Vec::with_capacity(segments);
        for (done, stats, thread) in per_worker {
            block.executions += stats.executions;
            block.preexec_reused += stats.preexec_reused;
            block.time += stats.execution;
            segments.extend(
                done.into_iter()
                    .map(|(segment, keys, outputs)| (segment, (outputs, keys, thread))),
            );
        }
        if !stop.into_inner() {
            segments.sort_unstable_by_key(|(segment, _)| *segment);
            block.segments = Some(segments.into_iter().map(|(_, run)| run).collect());
        }
        block
    }

    /// Executes `task` and checks its writes against the declaration.
    fn run(&self, task: Task, stats: &mut WorkerStats) -> Run<V> {
        let Task {
            tx,
            frontier,
            unlocked,
            ..
        } = task;
        let declaration = &self.declared[tx];
        if let Some(finished) = self.reuse_preexecution(tx, frontier) {
            stats.preexec_reused += 1;
            return Run::Finished(finished);
        }
        let mut view = View {
            engine: self,
            declaration,
            frontier,
            unlocked,
            reads: Vec::new(),
            violated: false,
            undeclared: false,
        };
        let result = crate::execute_caught(self.vm, tx, &mut view);
        stats.executions += 1;
        if view.violated {
            // Whatever the VM made of the refused read, this execution is void.
            return Run::Void;
        }
        let (writes, output) = match result {
            Ok(execution) => (execution.writes, Ok(execution.output)),
            Err(error) => (Vec::new(), Err(error)),
        };
        let writes_declared = writes.iter().all(|(key, write)| {
            declared_kind(declaration, key).is_some_and(|kind| kind.permits_write(write))
        });
        if !writes_declared && !frontier {
            return Run::Void;
        }
        Run::Finished(Finished {
            writes,
            output,
            reads: view.reads,
            frontier,
            complete: writes_declared && !view.undeclared,
        })
    }

    /// The pre-execution of `tx` as its result, if every value it read is still the
    /// committed one: executing now would read the same values (its reads are declared,
    /// so they are exact as in any restricted run) and so do exactly the same.
    fn reuse_preexecution(&self, tx: TxIndex, frontier: bool) -> Option<Finished<V>> {
        let pre = self.pre.as_ref()?.get(tx)?;
        let execution = pre.result.as_ref().ok()?;
        for (key, seen) in &pre.reads {
            if self.read(key).ok()? != *seen {
                return None;
            }
        }
        Some(Finished {
            writes: execution.writes.clone(),
            output: Ok(execution.output.clone()),
            reads: pre.reads.iter().map(|(k, _)| k.clone()).collect(),
            frontier,
            complete: true,
        })
    }

    /// Commits the frontier and every finished transaction after it, in block order
    /// (steps 4 and 6), as the scheduler's one committer (`Sched::committing`); returns
    /// the scheduler, locked again. A run of restricted results is taken under the lock
    /// and applied outside it, in order, then recorded and released under it once more:
    /// their keys stay locked until then (a restricted run writes only keys it holds
    /// write or delta locks on, or is void), so no run can read them half applied, and
    /// meanwhile the other workers take and hand in work instead of waiting for the
    /// committed state's writes. A frontier result is committed under the lock: its writes
    /// outside its locks are logged for step 6 as they become readable.
    fn commit<'s>(&'s self, mut sched: MutexGuard<'s, Sched<V>>) -> MutexGuard<'s, Sched<V>> {
        sched.committing = true;
        let mut batch: Vec<(TxIndex, Writes<V>, V::Output, bool)> = Vec::new();
        loop {
            // Under the lock: the frontier's result, then the restricted results after it.
            let mut at = sched.next;
            while at < sched.status.len() && sched.status[at] == Status::Done {
                let Some(finished) = sched.results[at].take() else {
                    break;
                };
                if finished.frontier && !batch.is_empty() {
                    // Committed under the lock, once the results before it are.
                    sched.results[at] = Some(finished);
                    break;
                }
                if !finished.frontier && sched.read_stale(at, &finished.reads) {
                    sched.invalidated += 1;
                    sched.status[at] = Status::Ready;
                    sched.ready.push(at);
                    break;
                }
                let output = match finished.output {
                    Ok(output) => output,
                    Err(error) => {
                        // Where serial execution fails: the block fails with it.
                        sched.error = Some(error);
                        break;
                    }
                };
                if finished.frontier {
                    if let Err(error) = self.apply_run(std::iter::once(&finished.writes)) {
                        sched.error = Some(VmError::Read(ReadError::Storage(error)));
                        break;
                    }
                    self.log_frontier_writes(&mut sched, at, &finished.writes);
                    sched.record_commit(at, output, finished.complete);
                    at += 1;
                    continue;
                }
                batch.push((at, finished.writes, output, finished.complete));
                at += 1;
                if batch.len() == COMMIT_BATCH {
                    break;
                }
            }
            if batch.is_empty() || sched.error.is_some() {
                break;
            }
            drop(sched);
            let applied = self.apply_run(batch.iter().map(|(_, writes, _, _)| writes));
            sched = self.sched();
            if let Err(error) = applied {
                sched.error = Some(VmError::Read(ReadError::Storage(error)));
                break;
            }
            for (tx, _, output, complete) in batch.drain(..) {
                sched.record_commit(tx, output, complete);
            }
        }
        sched.committing = false;
        sched.promote_frontier();
        sched
    }

    /// Logs the keys a frontier run of `tx` wrote without a write or delta lock (only
    /// those can have been read by a later transaction before this commit: a reader of a
    /// locked key waits), for step 6.
    fn log_frontier_writes(&self, sched: &mut Sched<V>, tx: TxIndex, writes: &Writes<V>) {
        let declaration = &self.declared[tx];
        let seq = sched.frontier_seq;
        let mut logged = false;
        for (key, _) in writes {
            if declared_kind(declaration, key).is_none_or(|k| k == AccessKind::Read) {
                sched.frontier_writes.insert(key.clone(), seq);
                logged = true;
            }
        }
        if logged {
            sched.frontier_seq += 1;
        }
    }

    /// Applies the writes of committed transactions (a run of them, in block order) to the
    /// committed state. On fast storage each shard's lock is taken once for the whole
    /// run, and a delta to a key no committed transaction wrote reads the pre-block value
    /// under it (a read from memory): a turn of a shard's lock ends with the wait for every
    /// value just written to reach the cache, and one turn waits for all of them at once.
    /// A key's writes keep their block order (a stable sort by shard); writes of the run to
    /// one key are deltas anyway (they come from holders of compatible locks).
    fn apply_run<'w>(&self, run: impl Iterator<Item = &'w Writes<V>>) -> Result<(), StorageError>
    where
        V: 'w,
    {
        if self.storage.read_latency() >= crate::workers::SLOW_READ {
            // Slow storage: a pre-block value is read outside the shard's lock.
            for (key, write) in run.flatten() {
                match write {
                    Write::Put(value) => self.state.put(key.clone(), Some(value.clone())),
                    Write::Delta(delta) => {
                        let apply = |value| self.vm.apply_delta(key, value, delta);
                        if !self.state.update(key, apply) {
                            let base = self.storage.read(key)?;
                            self.state.put(key.clone(), apply(base));
                        }
                    }
                }
            }
            return Ok(());
        }
        // (shard, key, write), in block order.
        let mut writes: Vec<_> = run
            .flatten()
            .map(|(key, write)| (self.state.shard_index(key), key, write))
            .collect();
        writes.sort_by_key(|(shard, _, _)| *shard);
        for group in writes.chunk_by(|a, b| a.0 == b.0) {
            let mut shard = self.state.shards[group[0].0]
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for &(_, key, write) in group {
                match write {
                    Write::Put(value) => {
                        shard.insert(key.clone(), Some(value.clone()));
                    }
                    Write::Delta(delta) => match shard.get_mut(key) {
                        Some(value) => *value = self.vm.apply_delta(key, value.take(), delta),
                        None => {
                            let base = self.storage.read(key)?;
                            shard.insert(key.clone(), self.vm.apply_delta(key, base, delta));
                        }
                    },
                }
            }
        }
        Ok(())
    }

    /// A key's committed value.
    fn read(&self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        match self.state.get(key) {
            Some(value) => Ok(value),
            None => Ok(self.storage.read(key)?),
        }
    }
}

/// What a transaction reads through: the committed state, restricted to its declaration
/// unless it runs as the frontier.
struct View<'a, 'e, V: Vm, S> {
    engine: &'a Sealevel<'e, V, S>,
    declaration: &'a [(V::Key, AccessKind)],
    frontier: bool,
    /// A step-0 run ([`Task::unlocked`]).
    unlocked: bool,
    /// Keys read (restricted runs of the locked way).
    reads: Vec<V::Key>,
    /// A restricted run read an undeclared key: the execution is void.
    violated: bool,
    /// A frontier run read an undeclared key (its declaration was incomplete).
    undeclared: bool,
}

impl<V, S> ReadView<V::Key, V::Value> for View<'_, '_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        let readable = declared_kind(self.declaration, key).is_some_and(AccessKind::permits_read);
        if self.frontier {
            self.undeclared |= !readable;
        } else if readable && !self.violated {
            if self.unlocked {
                return Ok(self.engine.storage.read(key)?);
            }
            self.reads.push(key.clone());
        } else {
            self.violated = true;
            return Err(ReadError::Aborted);
        }
        self.engine.read(key)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The ready set gives the lowest transaction first, as an ordered set does,
        /// across words and groups of words.
        #[test]
        fn ready_set_pops_the_lowest(
            ops in prop::collection::vec((any::<bool>(), 0usize..9000), 0..300),
        ) {
            let mut ready = ReadySet::new(9000);
            let mut model = std::collections::BTreeSet::new();
            for (push, tx) in ops {
                if push {
                    ready.push(tx);
                    model.insert(tx);
                } else {
                    prop_assert_eq!(ready.peek(), model.first().copied());
                    prop_assert_eq!(ready.pop(), model.pop_first());
                }
            }
            while let Some(tx) = model.pop_first() {
                prop_assert_eq!(ready.pop(), Some(tx));
            }
            prop_assert_eq!(ready.pop(), None);
        }
    }

    fn queue(requests: &[(TxIndex, AccessKind)]) -> (LockQueue, Vec<TxIndex>) {
        let mut q = LockQueue {
            head: 0,
            granted: 0,
            end: requests.len() as u32,
        };
        let mut granted = Vec::new();
        q.grant(requests, |tx| granted.push(tx));
        (q, granted)
    }

    #[test]
    fn locks_are_granted_in_block_order() {
        use AccessKind::{Delta, Read, Write};
        // Readers share, a writer waits for them, and a reader behind it waits too.
        let r = [(0, Read), (1, Read), (2, Write), (3, Read)];
        let (mut q, granted) = queue(&r);
        assert_eq!(granted, vec![0, 1]);
        let mut more = Vec::new();
        q.release(&r, 0);
        q.grant(&r, |tx| more.push(tx));
        assert!(more.is_empty());
        q.release(&r, 1);
        q.grant(&r, |tx| more.push(tx));
        assert_eq!(more, vec![2]);
        q.release(&r, 2);
        q.grant(&r, |tx| more.push(tx));
        assert_eq!(more, vec![2, 3]);
        // Deltas share with deltas only.
        let (_, granted) = queue(&[(0, Delta), (1, Delta), (2, Read), (3, Delta)]);
        assert_eq!(granted, vec![0, 1]);
        let (_, granted) = queue(&[(0, Write), (1, Delta)]);
        assert_eq!(granted, vec![0]);
    }
}
