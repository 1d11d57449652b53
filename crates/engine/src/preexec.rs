//! Pre-execution: every transaction executed in parallel on the *pre-block* state,
//! ignoring the others, recording what it read (with the values seen) and wrote.
//!
//! This is the hint pass of the `dag` engine, `sealevel`'s `--hints preexec`, and the
//! first phase of `optimistic`. A pre-execution is exact for a transaction none of
//! whose reads was written earlier in the block; for the others it is a prediction.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parex_core::{ReadError, ReadView, Storage, TxIndex, Vm, VmError, VmExecution};

use crate::trace::{SpanKind, Tracer};

/// One transaction executed on the pre-block state.
pub struct PreExecution<V: Vm> {
    /// Keys read, in the order first read, each once, with the pre-block value seen.
    pub reads: Vec<(V::Key, Option<V::Value>)>,
    /// The execution (writes and output), or why it failed. A failure may be an artefact
    /// of the stale view (e.g. a nonce not yet bumped by an earlier transaction).
    pub result: Result<VmExecution<V>, VmError>,
}

impl<V: Vm> PreExecution<V> {
    /// The keys the execution wrote (none if it failed).
    pub fn written_keys(&self) -> impl Iterator<Item = &V::Key> {
        self.result
            .iter()
            .flat_map(|e| e.writes.iter().map(|(k, _)| k))
    }
}

/// Transactions a worker claims at once (fewer trips to the shared counter).
const CLAIM: usize = 4;

/// Pre-executes every transaction of `vm`'s block on `storage` with `threads` workers,
/// recording [`SpanKind::Hint`] spans into `tracer`. Results are in block order.
pub fn run<V, S>(vm: &V, storage: &S, threads: usize, tracer: &Tracer) -> Vec<PreExecution<V>>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let next = AtomicUsize::new(0);
    let per_worker = crate::workers::run(threads.clamp(1, n.max(1)), |id| {
        let mut trace = tracer.recorder(id);
        let mut done = Vec::new();
        loop {
            let first = next.fetch_add(CLAIM, Relaxed);
            if first >= n {
                break;
            }
            for tx in first..(first + CLAIM).min(n) {
                let span = trace.start();
                done.push((tx, preexecute(vm, storage, tx)));
                trace.record(SpanKind::Hint, Some(tx), span);
            }
        }
        tracer.submit(trace);
        done
    });
    let mut slots: Vec<Option<PreExecution<V>>> = (0..n).map(|_| None).collect();
    for (tx, pre) in per_worker.into_iter().flatten() {
        slots[tx] = Some(pre);
    }
    slots
        .into_iter()
        .map(|s| s.expect("every transaction is claimed by one worker"))
        .collect()
}

/// Executes `tx` alone on the pre-block state.
pub fn preexecute<V, S>(vm: &V, storage: &S, tx: TxIndex) -> PreExecution<V>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let mut view = RecordingView {
        storage,
        reads: Vec::new(),
    };
    let result = match catch_unwind(AssertUnwindSafe(|| vm.execute(tx, &mut view))) {
        Ok(result) => result,
        Err(panic) => Err(VmError::Internal {
            tx,
            message: crate::panic_message(&panic),
        }),
    };
    PreExecution {
        reads: view.reads,
        result,
    }
}

/// Reads the pre-block state, remembering each key read (once) and its value.
struct RecordingView<'a, K, V, S> {
    storage: &'a S,
    reads: Vec<(K, Option<V>)>,
}

impl<K, V, S> ReadView<K, V> for RecordingView<'_, K, V, S>
where
    K: Clone + Eq,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError> {
        // Executions read a few dozen keys at most: a scan beats hashing.
        if let Some((_, value)) = self.reads.iter().find(|(k, _)| k == key) {
            return Ok(value.clone());
        }
        let value = self.storage.read(key)?;
        self.reads.push((key.clone(), value.clone()));
        Ok(value)
    }
}
