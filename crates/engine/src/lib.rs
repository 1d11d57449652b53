//! parex-engine: schedulers that execute a block of transactions, generic over the
//! [`Vm`] (what a transaction does) and the [`Storage`] (the pre-block state).
//!
//! Every engine returns the same [`BlockOutcome`] as [`sequential`] for the same block:
//! that is the contract the tests enforce.

pub mod analyze;
pub mod block_stm;
pub mod chunk;
pub mod dag;
mod declared;
pub mod gather;
mod heavy;
pub mod metrics;
pub mod mv_memory;
pub mod optimistic;
pub mod preexec;
pub mod prefetch;
mod ranges;
pub mod scheduler;
pub mod sealevel;
pub mod sequential;
pub mod trace;
pub mod workers;

use parex_core::{BlockOutcome, Storage, Vm, VmError};

pub use metrics::Metrics;

/// The outcome type of an engine run over `V`.
pub type VmOutcome<V> = BlockOutcome<<V as Vm>::Output, <V as Vm>::Key, <V as Vm>::Value>;

/// An engine failed to execute a block.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// How an engine runs a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Worker threads (at least 1; engines may run more workers when storage is slow).
    pub threads: usize,
    /// Record every worker's timeline into [`Metrics::trace`].
    pub trace: bool,
    /// Run all `threads` workers even on blocks too small to repay starting them (by
    /// default a worker needs [`workers::MIN_TXS_PER_WORKER`] transactions), and start
    /// `optimistic` in range rounds on blocks of any size. Tests set it to put small
    /// blocks under full concurrency.
    pub spread_small_blocks: bool,
}

impl RunOptions {
    /// `threads` threads, no tracing.
    pub fn threads(threads: usize) -> Self {
        Self {
            threads,
            trace: false,
            spread_small_blocks: false,
        }
    }

    /// `threads` workers on every block, however small (a stress setting for tests).
    pub fn stress(threads: usize) -> Self {
        Self {
            spread_small_blocks: true,
            ..Self::threads(threads)
        }
    }

    /// The workers to run `vm`'s block on `storage`, judging a small block by its
    /// transaction count (see [`workers::count`]): for engines with a pass over every
    /// transaction before execution (hints, declarations), which a few heavy
    /// transactions do not repay.
    pub fn workers<V: Vm, S: Storage>(&self, vm: &V, storage: &S) -> usize {
        let txs = vm.tx_count();
        self.count_workers(txs, || txs, storage)
    }

    /// The workers to run `vm`'s block on `storage`, judging a small block by its work
    /// ([`Vm::light_tx_equivalents`]): for engines that start executing at once
    /// (`block-stm`, `optimistic`).
    pub fn workers_by_work<V: Vm, S: Storage>(&self, vm: &V, storage: &S) -> usize {
        self.count_workers(vm.tx_count(), || vm.light_tx_equivalents(), storage)
    }

    fn count_workers<S: Storage>(
        &self,
        txs: usize,
        light_txs: impl FnOnce() -> usize,
        storage: &S,
    ) -> usize {
        workers::count(
            self.threads,
            txs,
            light_txs,
            storage.read_latency(),
            self.spread_small_blocks,
        )
    }
}

/// The engines parex has, by command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    Sequential,
    BlockStm,
    /// Parallel execution on the pre-block state, merged in block order (Monad).
    Optimistic,
    /// Dependency DAG from pre-execution hints, repaired at in-order commit (MegaETH, grevm).
    Dag,
    /// Sealevel locks on the VM's declared access (EIP-2930 lists, transaction shape).
    Sealevel,
    /// Sealevel locks on declarations joined with a pre-execution's accesses.
    SealevelPreexec,
}

impl EngineKind {
    pub const ALL: &'static [EngineKind] = &[
        EngineKind::Sequential,
        EngineKind::BlockStm,
        EngineKind::Optimistic,
        EngineKind::Dag,
        EngineKind::Sealevel,
        EngineKind::SealevelPreexec,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Sequential => "sequential",
            EngineKind::BlockStm => "block-stm",
            EngineKind::Optimistic => "optimistic",
            EngineKind::Dag => "dag",
            EngineKind::Sealevel => "sealevel",
            EngineKind::SealevelPreexec => "sealevel-preexec",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Executes `vm`'s block on `storage` with this engine.
    pub fn execute<V, S>(
        self,
        vm: &V,
        storage: &S,
        threads: usize,
    ) -> Result<(VmOutcome<V>, Metrics), EngineError>
    where
        V: Vm,
        S: Storage<Key = V::Key, Value = V::Value>,
    {
        self.run(vm, storage, &RunOptions::threads(threads))
    }

    /// The workers this engine gives `vm`'s block (engines that start executing at once
    /// judge a small block by its work, the others by its transaction count).
    fn workers<V: Vm, S: Storage>(self, vm: &V, storage: &S, options: &RunOptions) -> usize {
        match self {
            EngineKind::BlockStm | EngineKind::Optimistic => options.workers_by_work(vm, storage),
            _ => options.workers(vm, storage),
        }
    }

    /// Executes `vm`'s block on `storage` with this engine and `options`.
    pub fn run<V, S>(
        self,
        vm: &V,
        storage: &S,
        options: &RunOptions,
    ) -> Result<(VmOutcome<V>, Metrics), EngineError>
    where
        V: Vm,
        S: Storage<Key = V::Key, Value = V::Value>,
    {
        if options.threads == 0 {
            return Err(EngineError::Config("threads must be at least 1".into()));
        }
        if self != EngineKind::Sequential
            && options.threads > 1
            && !options.spread_small_blocks
            && self.workers(vm, storage, options) == 1
        {
            // Too small a block to repay a second worker (see `workers::count`): with
            // one worker every engine would execute in block order, so `sequential`
            // does it, without any engine's bookkeeping.
            return sequential::in_order(vm, storage, options, &[("workers", 1)]);
        }
        // On slow storage, the parallel engines without discovery of their own run over a
        // cache that discovery filled first (`sequential`, the baseline, reads as it goes).
        let discovers_first = matches!(
            self,
            EngineKind::Dag | EngineKind::Sealevel | EngineKind::SealevelPreexec
        );
        if discovers_first && storage.read_latency() >= workers::SLOW_READ {
            // `sealevel` runs every transaction its declarations miss in block order, one at
            // a time: it gets every key discovered, whatever the rounds cost.
            let exhaustive = self == EngineKind::Sealevel;
            return prefetch::discovered_first(
                vm,
                storage,
                options.threads,
                exhaustive,
                |cached| self.dispatch(vm, cached, options),
            );
        }
        self.dispatch(vm, storage, options)
    }

    /// Runs this engine's own function on `storage` as it is.
    fn dispatch<V, S>(
        self,
        vm: &V,
        storage: &S,
        options: &RunOptions,
    ) -> Result<(VmOutcome<V>, Metrics), EngineError>
    where
        V: Vm,
        S: Storage<Key = V::Key, Value = V::Value>,
    {
        match self {
            EngineKind::Sequential => sequential::execute(vm, storage, options),
            EngineKind::BlockStm => block_stm::execute(vm, storage, options),
            EngineKind::Optimistic => optimistic::execute(vm, storage, options),
            EngineKind::Dag => dag::execute(vm, storage, options),
            EngineKind::Sealevel => sealevel::execute(vm, storage, options),
            EngineKind::SealevelPreexec => sealevel::execute_preexec(vm, storage, options),
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The end of an engine's run: finalizes `outputs` (block order) with `vm`, builds the
/// state diff with `state_diff`, both as one `Finalize` span and in `finalize_time`, and
/// attaches the trace.
pub(crate) fn finish<V: Vm>(
    vm: &V,
    mut outputs: Vec<V::Output>,
    state_diff: impl FnOnce() -> Result<Vec<(V::Key, V::Value)>, VmError>,
    tracer: trace::Tracer,
    mut metrics: Metrics,
) -> Result<(VmOutcome<V>, Metrics), EngineError> {
    let started = std::time::Instant::now();
    let mut trace = tracer.recorder(0);
    let span = trace.start();
    vm.finalize_outputs(&mut outputs)?;
    let state_diff = state_diff()?;
    trace.record(trace::SpanKind::Finalize, None, span);
    tracer.submit(trace);
    metrics.finalize_time += started.elapsed();
    metrics.trace = tracer.finish();
    Ok((
        BlockOutcome {
            tx_outcomes: outputs,
            state_diff,
        },
        metrics,
    ))
}

/// Executes `tx` on `view`, a panic of the VM turned into the error that names the
/// transaction (every engine fails a block that way, as `sequential` does).
pub(crate) fn execute_caught<V: Vm, R: parex_core::ReadView<V::Key, V::Value>>(
    vm: &V,
    tx: parex_core::TxIndex,
    view: &mut R,
) -> Result<parex_core::VmExecution<V>, VmError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.execute(tx, view))).unwrap_or_else(
        |panic| {
            Err(VmError::Internal {
                tx,
                message: panic_message(&panic),
            })
        },
    )
}

/// The message of a caught panic, for an error naming it.
/// (Takes the box itself: a `&Box<dyn Any>` would otherwise coerce to a `&dyn Any` of
/// the box, and no downcast of the payload would match.)
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let panic: &(dyn std::any::Any + Send) = &**panic;
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string payload");
    format!("panicked during execution: {text}")
}
