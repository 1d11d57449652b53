//! `sequential`: the reference engine. Transactions run one after another, in block
//! order, on a cache over the pre-block storage; each transaction's writes are applied
//! before the next one starts. Every other engine must produce exactly its outcome.

use std::time::Instant;

use parex_core::{BlockOutcome, ReadError, ReadView, Storage, Vm, VmError, Write};

use crate::trace::{SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

/// A key's current value in a cache over storage, and whether the block wrote it.
pub(crate) struct Entry<V> {
    pub(crate) value: Option<V>,
    pub(crate) written: bool,
}

/// A cache over storage: the state as the next transaction sees it.
pub(crate) type Cache<K, V> =
    indexmap::IndexMap<K, Entry<V>, alloy_primitives::map::DefaultHashBuilder>;

/// The block's state diff from its cache: every written key whose value is not absent.
/// (Sized up front: growing the vector step by step cost a third more on a gigagas
/// block of transfers, 95k keys.)
pub(crate) fn into_state_diff<K, V>(cache: Cache<K, V>) -> Vec<(K, V)> {
    let mut diff = Vec::with_capacity(cache.len());
    diff.extend(cache.into_iter().filter_map(|(k, e)| match e {
        Entry {
            written: true,
            value: Some(v),
        } => Some((k, v)),
        _ => None,
    }));
    diff
}

/// The state as the next transaction sees it: the cache, falling back to storage
/// (whose answers are cached too, so each key costs at most one storage read).
struct CacheView<'a, K, V, S> {
    cache: &'a mut Cache<K, V>,
    storage: &'a S,
}

impl<K, V, S> CacheView<'_, K, V, S>
where
    K: Clone + Eq + std::hash::Hash,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    /// The cache entry of `key`, read from storage on first use (one hash lookup).
    fn entry(&mut self, key: &K) -> Result<&mut Entry<V>, ReadError> {
        Ok(match self.cache.entry(key.clone()) {
            indexmap::map::Entry::Occupied(e) => e.into_mut(),
            indexmap::map::Entry::Vacant(e) => e.insert(Entry {
                value: self.storage.read(key)?,
                written: false,
            }),
        })
    }
}

impl<K, V, S> ReadView<K, V> for CacheView<'_, K, V, S>
where
    K: Clone + Eq + std::hash::Hash,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    #[inline]
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError> {
        Ok(self.entry(key)?.value.clone())
    }
}

/// Transactions executed before the cache is sized for the whole block.
const SIZING_SAMPLE: usize = 64;

/// Executes the block serially (`options.threads` is ignored).
pub fn execute<V, S>(
    vm: &V,
    storage: &S,
    options: &RunOptions,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let tracer = Tracer::new(options.trace);
    let mut recorder = tracer.recorder(0);
    let started = Instant::now();
    let n = vm.tx_count();
    let mut cache = Cache::with_capacity_and_hasher(n.min(SIZING_SAMPLE) * 4, Default::default());
    let mut outputs = Vec::with_capacity(n);
    for tx in 0..n {
        let mut view = CacheView {
            cache: &mut cache,
            storage,
        };
        let span = recorder.start();
        // A panicking VM fails the block with an error naming the transaction, as in
        // every engine (the EVM drops its per-thread state while unwinding).
        let execution = crate::execute_caught(vm, tx, &mut view)?;
        for (key, write) in execution.writes {
            match write {
                // A full write needs no base value: nothing is read from storage.
                Write::Put(value) => {
                    view.cache.insert(
                        key,
                        Entry {
                            value: Some(value),
                            written: true,
                        },
                    );
                }
                Write::Delta(delta) => {
                    let entry = view.entry(&key).map_err(VmError::from)?;
                    entry.written = true;
                    entry.value = vm.apply_delta(&key, entry.value.take(), &delta);
                }
            }
        }
        outputs.push(execution.output);
        recorder.record(SpanKind::Execute, Some(tx), span);
        if tx + 1 == SIZING_SAMPLE && n > 2 * SIZING_SAMPLE {
            // Size the cache for the whole block from the keys per transaction seen so
            // far, once: growing it step by step (or guessing high) costs more.
            let per_tx = cache.len() as f64 / SIZING_SAMPLE as f64;
            let expected = (per_tx * 1.1 * n as f64) as usize;
            cache.reserve(expected.saturating_sub(cache.len()));
        }
    }
    let execution_time = started.elapsed();
    let finalize_started = Instant::now();
    let span = recorder.start();
    vm.finalize_outputs(&mut outputs)?;
    let state_diff = into_state_diff(cache);
    recorder.record(SpanKind::Finalize, None, span);
    tracer.submit(recorder);
    let metrics = Metrics {
        trace: tracer.finish(),
        executions: n as u64,
        execution_time,
        finalize_time: finalize_started.elapsed(),
        ..Metrics::default()
    };
    Ok((
        BlockOutcome {
            tx_outcomes: outputs,
            state_diff,
        },
        metrics,
    ))
}

/// The block run in order by [`execute`] on behalf of another engine that judged
/// speculation useless: its metrics say `sequential_fallback 1`, then `extra`.
pub(crate) fn in_order<V, S>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
    extra: &[(&'static str, u64)],
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let (outcome, mut metrics) = execute(vm, storage, run)?;
    metrics.extra = [("sequential_fallback", 1)]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    Ok((outcome, metrics))
}
