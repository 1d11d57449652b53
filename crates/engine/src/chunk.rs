//! [`ChunkVm`]: runs of consecutive transactions presented to an engine as one
//! transaction each, so that the engine's per-transaction costs (scheduling, read-set
//! bookkeeping, validation, multi-version entries) are paid once per chunk.
//!
//! Executing chunk `c` executes its transactions in block order on a chunk-local overlay
//! of the engine's view, exactly as `sequential` does on its cache: a read the chunk's
//! earlier transactions answer (a value they wrote or read) stays local; any other read
//! goes to the engine's view and becomes part of the chunk's read set. The chunk's writes
//! are the net effect of its transactions on each key they changed: the last full value
//! (with the deltas after it applied) or, for a key that only received deltas, their
//! merge (so that a fee credit by every transaction stays one commutative delta).
//!
//! Invariant: a chunk's execution is a pure function of the chunk's index and the values
//! its reads return, because each transaction's is (the [`Vm`] contract); so an engine
//! that is exact for transactions is exact for chunks, and the outputs, flattened in
//! order, are the transactions' outputs. Dependencies inside a chunk cost nothing; a
//! conflict with an earlier chunk re-executes the whole chunk.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use alloy_primitives::map::DefaultHashBuilder;
use indexmap::map::Entry;
use parex_core::{
    BlockOutcome, Execution, ReadError, ReadView, TxIndex, Vm, VmError, VmExecution, Write,
};

use crate::{EngineError, Metrics, VmOutcome};

/// Blocks smaller than this run one transaction per unit (in the engines that chunk):
/// their transactions tend to depend on near neighbours (nonce sequences, runs of calls
/// to one contract), which chunks turn into conflicts between chunks (measured on mainnet
/// block 17666333, 961 transactions: 1.1 re-executions per transaction in chunks of 7,
/// 0.1 without).
const CHUNK_FROM_TXS: usize = 4096;
/// A sequence run has at most this many transactions (see [`ChunkVm::sequence_runs`]).
const MAX_RUN: usize = 64;
/// Each worker should find at least this many chunks to draw from (load balance)...
const CHUNKS_PER_WORKER: usize = 64;
/// ...and a chunk has at most this many transactions (a conflict re-executes a chunk).
const MAX_CHUNK: usize = 16;

/// Transactions per chunk for `txs` transactions on `workers` workers: 1 (no chunks) on
/// slow storage, where every read in flight counts, and below `CHUNK_FROM_TXS`
/// transactions; otherwise as many as keeps `CHUNKS_PER_WORKER` chunks per worker, up to
/// `MAX_CHUNK`.
pub fn chunk_size(txs: usize, workers: usize, slow_storage: bool) -> usize {
    if slow_storage || txs < CHUNK_FROM_TXS {
        return 1;
    }
    (txs / (workers.max(1) * CHUNKS_PER_WORKER)).clamp(1, MAX_CHUNK)
}

/// Whether transaction `tx` continues the sequence run of the one before it (see
/// [`ChunkVm::sequence_runs`], which also ends a run at `MAX_RUN` transactions): both are
/// light ([`Vm::light_tx_equivalents_of`] 1) and share a [`Vm::sequence_key`] (a sender's
/// nonce sequence). Light transactions only: a run of heavy ones (contract calls that may
/// read what earlier transactions of the block write) is re-executed whole when one of
/// them conflicts (on 9069000, seven 400k-gas calls to one contract took 1.4x longer as
/// one unit than one by one).
pub(crate) fn continues_run<V: Vm>(vm: &V, tx: TxIndex) -> bool {
    let light = |tx| vm.light_tx_equivalents_of(tx) <= 1;
    tx > 0 && light(tx) && light(tx - 1) && {
        let key = vm.sequence_key(tx);
        key.is_some() && key == vm.sequence_key(tx - 1)
    }
}

/// A block's transactions in chunks: of one size, or its sequence runs.
pub struct ChunkVm<'a, V: Vm> {
    inner: &'a V,
    units: Units,
    /// Transactions executed beyond the first of each chunk execution so far (a chunk of
    /// one transaction never touches this shared counter: the engine counts its chunk
    /// executions, see [`run_chunked`]).
    extra_executions: AtomicU64,
    /// Overlay maps of finished chunk executions, emptied, for the next ones: a map made
    /// for each execution was allocated and grown anew every time (16 swaps read about
    /// 200 keys: three doublings per chunk, 0.9% of the swap block), a reused one has
    /// the room its largest chunk needed. At most one per worker executing at a time.
    spare_overlays: Mutex<Vec<LocalMap<V>>>,
}

/// How a [`ChunkVm`] cuts its block.
enum Units {
    /// Chunks of this many transactions (the last one may be shorter).
    Fixed(usize),
    /// Each chunk from its start up to the next one's (the last up to the block's end).
    Starts(Box<[TxIndex]>),
}

impl<'a, V: Vm> ChunkVm<'a, V> {
    /// Chunks of `size` transactions (at least 1) of `inner`'s block.
    pub fn new(inner: &'a V, size: usize) -> Self {
        Self {
            inner,
            units: Units::Fixed(size.max(1)),
            extra_executions: AtomicU64::new(0),
            spare_overlays: Mutex::default(),
        }
    }

    /// The block's *sequence runs* as chunks: each maximal run (up to `MAX_RUN`) of
    /// consecutive light transactions ([`Vm::light_tx_equivalents_of`] 1) with the same
    /// [`Vm::sequence_key`] (a sender's nonce sequence) is one chunk, every other
    /// transaction a chunk of its own; `None` if no run has two transactions or more.
    /// A run is a chain (each transaction reads the sender's account the one before
    /// it wrote), which no engine can run in parallel; as one chunk it costs one worker its
    /// transactions' executions alone, instead of the chain's scheduling, publishing and
    /// revalidation at each step. [`Vm::sequence_key`] of such a chunk is its run's key.
    pub fn sequence_runs(inner: &'a V) -> Option<Self> {
        let n = inner.tx_count();
        let mut starts = Vec::with_capacity(n);
        let mut length = 0;
        for tx in 0..n {
            if !continues_run(inner, tx) || length == MAX_RUN {
                starts.push(tx);
                length = 0;
            }
            length += 1;
        }
        (starts.len() < n).then(|| Self {
            inner,
            units: Units::Starts(starts.into_boxed_slice()),
            extra_executions: AtomicU64::new(0),
            spare_overlays: Mutex::default(),
        })
    }

    /// The emptied overlay maps kept for reuse.
    fn spare_overlays(&self) -> std::sync::MutexGuard<'_, Vec<LocalMap<V>>> {
        self.spare_overlays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The transactions of chunk `chunk`.
    pub fn txs(&self, chunk: TxIndex) -> Range<TxIndex> {
        let n = self.inner.tx_count();
        match &self.units {
            Units::Fixed(size) => {
                let start = chunk * size;
                start..(start + size).min(n)
            }
            Units::Starts(starts) => starts[chunk]..starts.get(chunk + 1).copied().unwrap_or(n),
        }
    }

    /// Chunks of more than one transaction.
    pub fn multi_tx_chunks(&self) -> u64 {
        (0..self.tx_count())
            .filter(|&chunk| self.txs(chunk).len() > 1)
            .count() as u64
    }

    /// Transactions executed by this VM when the engine executed `chunk_executions`
    /// chunks (re-executions included).
    pub fn tx_executions(&self, chunk_executions: u64) -> u64 {
        chunk_executions + self.extra_executions.load(Relaxed)
    }
}

/// A chunk's net writes.
type Writes<V> = Vec<(<V as Vm>::Key, Write<<V as Vm>::Value, <V as Vm>::Delta>)>;

/// What a chunk did to one key so far.
pub(crate) struct Local<V, D> {
    /// The key's current value as the chunk's next transaction sees it; `None` while the
    /// chunk has only sent deltas to a key it never read.
    pub(crate) value: Option<Option<V>>,
    /// The chunk's net write: `Some(None)` a full value (`value`), `Some(Some(d))` only
    /// deltas, merged; `None` if it only read the key.
    pub(crate) written: Option<Option<D>>,
    /// The chunk read the key's value from the outer view (its execution depends on it).
    pub(crate) read_outside: bool,
}

/// A chunk's keys, by key.
pub(crate) type LocalMap<V> = indexmap::IndexMap<
    <V as Vm>::Key,
    Local<<V as Vm>::Value, <V as Vm>::Delta>,
    DefaultHashBuilder,
>;

/// Applies one transaction's write to a chunk's keys (`local`): a full value replaces the
/// key's (keeping whether the chunk read it before: it depends on that), a delta applies to
/// the value if one is known and merges into the chunk's deltas otherwise. Reads nothing.
pub(crate) fn apply_write<V: Vm>(
    vm: &V,
    local: &mut LocalMap<V>,
    key: V::Key,
    write: Write<V::Value, V::Delta>,
) {
    match write {
        Write::Put(value) => match local.entry(key) {
            Entry::Occupied(mut e) => {
                let local = e.get_mut();
                local.value = Some(Some(value));
                local.written = Some(None);
            }
            Entry::Vacant(e) => {
                e.insert(Local {
                    value: Some(Some(value)),
                    written: Some(None),
                    read_outside: false,
                });
            }
        },
        Write::Delta(delta) => {
            let local = local.entry(key.clone()).or_insert(Local {
                value: None,
                written: None,
                read_outside: false,
            });
            if let Some(value) = local.value.take() {
                local.value = Some(vm.apply_delta(&key, value, &delta));
            }
            match &mut local.written {
                Some(Some(merged)) => vm.merge_deltas(merged, &delta),
                Some(None) => {}
                written @ None => *written = Some(Some(delta)),
            }
        }
    }
}

/// The engine's view of the state before the chunk, with the chunk's own effects on top.
pub(crate) struct Overlay<'v, V: Vm, R> {
    pub(crate) vm: &'v V,
    pub(crate) outer: &'v mut R,
    pub(crate) local: LocalMap<V>,
}

impl<V: Vm, R: ReadView<V::Key, V::Value>> ReadView<V::Key, V::Value> for Overlay<'_, V, R> {
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        match self.local.entry(key.clone()) {
            Entry::Occupied(mut e) => {
                let local = e.get_mut();
                if let Some(value) = &local.value {
                    return Ok(value.clone());
                }
                // Only deltas so far: read the base, then resolve them on top of it.
                let base = self.outer.read(key)?;
                local.read_outside = true;
                let Some(Some(delta)) = &local.written else {
                    unreachable!("a key with no known value has only deltas")
                };
                let value = self.vm.apply_delta(key, base, delta);
                local.value = Some(value.clone());
                Ok(value)
            }
            Entry::Vacant(e) => {
                let value = self.outer.read(key)?;
                e.insert(Local {
                    value: Some(value.clone()),
                    written: None,
                    read_outside: true,
                });
                Ok(value)
            }
        }
    }
}

impl<V: Vm, R: ReadView<V::Key, V::Value>> Overlay<'_, V, R> {
    /// Executes `txs` in order on the overlay, each on the state its predecessors left.
    /// On failure: the error and the transactions executed, the failed one included.
    /// (`expected`: about how many transactions `txs` yields.)
    pub(crate) fn run(
        &mut self,
        txs: impl Iterator<Item = TxIndex>,
        expected: usize,
    ) -> Result<Vec<V::Output>, (VmError, u64)> {
        let mut outputs = Vec::with_capacity(expected);
        for tx in txs {
            // A panic names its own transaction, not the chunk.
            let vm = self.vm;
            match crate::execute_caught(vm, tx, self) {
                Ok(execution) => {
                    for (key, write) in execution.writes {
                        apply_write(self.vm, &mut self.local, key, write);
                    }
                    outputs.push(execution.output);
                }
                Err(e) => return Err((e, outputs.len() as u64 + 1)),
            }
        }
        Ok(outputs)
    }

    /// The chunk's net writes (`first` names the chunk in an error), moved out of its
    /// keys, which are left empty.
    fn take_writes(&mut self, first: TxIndex) -> Result<Writes<V>, VmError> {
        let mut writes = Vec::with_capacity(self.local.len());
        for (key, local) in self.local.drain(..) {
            match local.written {
                None => {}
                Some(Some(delta)) => writes.push((key, Write::Delta(delta))),
                Some(None) => match local.value {
                    Some(Some(value)) => writes.push((key, Write::Put(value))),
                    // A delta resolved a written value to "absent": no write can say that.
                    _ => {
                        return Err(VmError::Internal {
                            tx: first,
                            message: format!(
                                "a delta left {key:?} absent after a full write in its chunk"
                            ),
                        });
                    }
                },
            }
        }
        Ok(writes)
    }
}

impl<V: Vm> Vm for ChunkVm<'_, V> {
    type Key = V::Key;
    type Value = V::Value;
    type Delta = V::Delta;
    /// The outputs of the chunk's transactions, in order.
    type Output = Vec<V::Output>;

    fn tx_count(&self) -> usize {
        match &self.units {
            Units::Fixed(size) => self.inner.tx_count().div_ceil(*size),
            Units::Starts(starts) => starts.len(),
        }
    }

    fn execute<R: ReadView<Self::Key, Self::Value>>(
        &self,
        chunk: TxIndex,
        view: &mut R,
    ) -> Result<VmExecution<Self>, VmError> {
        let txs = self.txs(chunk);
        if txs.len() == 1 {
            // A transaction alone needs no overlay: its writes are its chunk's.
            let tx = txs.start;
            let execution = crate::execute_caught(self.inner, tx, view)?;
            return Ok(Execution {
                writes: execution.writes,
                output: vec![execution.output],
            });
        }
        let spare = self.spare_overlays().pop();
        let mut overlay = Overlay {
            vm: self.inner,
            outer: view,
            local: spare.unwrap_or_else(|| {
                LocalMap::<V>::with_capacity_and_hasher(4 * txs.len(), Default::default())
            }),
        };
        // One update of the shared counter per chunk.
        let expected = txs.len();
        let first = txs.start;
        let result = match overlay.run(txs, expected) {
            Ok(outputs) => {
                self.extra_executions
                    .fetch_add(outputs.len() as u64 - 1, Relaxed);
                overlay.take_writes(first).map(|writes| Execution {
                    writes,
                    output: outputs,
                })
            }
            Err((e, executed)) => {
                self.extra_executions.fetch_add(executed - 1, Relaxed);
                overlay.local.clear();
                Err(e)
            }
        };
        self.spare_overlays().push(overlay.local);
        result
    }

    fn apply_delta(
        &self,
        key: &Self::Key,
        value: Option<Self::Value>,
        delta: &Self::Delta,
    ) -> Option<Self::Value> {
        self.inner.apply_delta(key, value, delta)
    }

    /// The transactions' sinks are the chunks' (a chunk merges its deltas to each).
    fn delta_sinks(&self) -> Vec<Self::Key> {
        self.inner.delta_sinks()
    }

    /// Its transactions' together.
    fn light_tx_equivalents_of(&self, chunk: TxIndex) -> usize {
        self.txs(chunk)
            .map(|tx| self.inner.light_tx_equivalents_of(tx))
            .sum()
    }

    /// A sequence run's key (every transaction of the chunk has it); none for fixed-size
    /// chunks, whose transactions may have different ones.
    fn sequence_key(&self, chunk: TxIndex) -> Option<Self::Key> {
        match self.units {
            Units::Fixed(_) => None,
            Units::Starts(_) => self.inner.sequence_key(self.txs(chunk).start),
        }
    }

    fn merge_deltas(&self, earlier: &mut Self::Delta, later: &Self::Delta) {
        self.inner.merge_deltas(earlier, later);
    }

    /// Outputs are finalized by the caller, once flattened (see [`flatten_outputs`]).
    fn finalize_outputs(&self, _outputs: &mut [Self::Output]) -> Result<(), VmError> {
        Ok(())
    }
}

/// The transactions' outputs in block order, finalized by the inner VM.
pub fn flatten_outputs<V: Vm>(
    inner: &V,
    chunks: Vec<Vec<V::Output>>,
) -> Result<Vec<V::Output>, VmError> {
    // Sized up front: collecting a flattening iterator grows the vector by doubling (it
    // cannot tell the total), copying the outputs again at each step.
    let mut outputs = Vec::with_capacity(chunks.iter().map(Vec::len).sum());
    for mut chunk in chunks {
        outputs.append(&mut chunk);
    }
    inner.finalize_outputs(&mut outputs)?;
    Ok(outputs)
}

/// What an engine returns for a [`ChunkVm`] over `V`.
pub type ChunkOutcome<V> = BlockOutcome<Vec<<V as Vm>::Output>, <V as Vm>::Key, <V as Vm>::Value>;

/// Runs `engine` over the block of `chunks` and turns its result back into
/// per-transaction terms: outputs flattened and finalized, `executions` (the engine's
/// count is of chunk executions) and `reexecutions` counted in transactions, `chunk_size`
/// (1 for sequence runs) and `sequence_runs` (chunks of a run, see
/// [`ChunkVm::sequence_runs`]) added to the extras.
pub fn run_chunked<V, F>(
    chunks: ChunkVm<'_, V>,
    engine: F,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    F: FnOnce(&ChunkVm<'_, V>) -> Result<(ChunkOutcome<V>, Metrics), EngineError>,
{
    let inner = chunks.inner;
    let (outcome, mut metrics) = engine(&chunks)?;
    let tx_outcomes = flatten_outputs(inner, outcome.tx_outcomes)?;
    metrics.executions = chunks.tx_executions(metrics.executions);
    metrics.reexecutions = metrics.executions.saturating_sub(inner.tx_count() as u64);
    let (size, runs) = match chunks.units {
        Units::Fixed(size) => (size, 0),
        Units::Starts(_) => (1, chunks.multi_tx_chunks()),
    };
    metrics.extra.push(("chunk_size", size as u64));
    metrics.extra.push(("sequence_runs", runs));
    Ok((
        BlockOutcome {
            tx_outcomes,
            state_diff: outcome.state_diff,
        },
        metrics,
    ))
}
