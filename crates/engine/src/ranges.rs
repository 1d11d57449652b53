//! Range rounds: how `optimistic` starts a large block. Each round gives every worker one
//! range of consecutive transactions, which it executes in order, as `sequential` does,
//! on a private overlay over the *committed* state (the serial state after the rounds
//! before); then the ranges are validated in parallel and the valid ones are committed.
//! While transactions execute no shared structure is written: a transaction costs what it
//! costs in `sequential`, plus its share of a filter check per key read from outside its
//! range and one validation lookup per such key and earlier range.
//!
//! Range `w` of a round is valid when no earlier range of the same round wrote (a full
//! value or a delta) a key whose value range `w` read from the committed state. Then
//! every value it read is the serial one (the ranges before it commit with it), and as
//! an execution is a pure function of the values it reads, its writes and outputs are
//! the serial ones. Keys a range only sent deltas to (a fee credit) are no conflict:
//! they are resolved in range order. A round commits its ranges up to the first invalid
//! one (the first range is always valid, so every round makes progress) and the next
//! round starts there; a failed execution in a committed position fails the block with
//! the serial error.
//!
//! Committing copies nothing: a committed range's overlay becomes a *layer* of the
//! committed state, and a filter of key-hash buckets knows which keys the layers wrote
//! (and which more than once), so a read of a key no layer wrote goes straight to
//! storage. The worker that ran a range marks its writes in the filter as soon as it
//! ends (an invalid range's marks are only false "written" answers). The block's state
//! diff is assembled once, at the end: every layer is walked in parallel, each walk moving
//! its keys written once straight into its own block of the diff's spare capacity (the
//! blocks are then closed up); the keys written more than once are resolved after, in
//! block order.
//!
//! Balance: a worker that finishes its range takes the second half of the longest range
//! still running (`range_splits`); the part it takes is a range of its own, in block
//! order. Adapting: a round that commits all its ranges doubles the range length (up to
//! `MAX_SPAN`), one that does not halves it (down to `MIN_SPAN`); once more than
//! `HANDOFF_WASTE` of the executions were thrown away (contention), the rest of the block
//! goes to a per-transaction engine over the committed state (`range_handoff`).
//!
//! Invariants: (1) the layers, in order, are the writes of the committed transactions,
//! and nobody changes them while ranges execute or validate; (2) the filter never says
//! "not written" of a written key (false "written" answers only cost a look at the
//! layers). Traces show one span per range.

use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use alloy_primitives::map::DefaultHashBuilder;
use crossbeam::utils::CachePadded;
use parex_core::{
    BlockOutcome, PreBlockView, ReadError, ReadView, Storage, StorageError, TxIndex, Vm, VmError,
    VmExecution,
};

use crate::chunk::{LocalMap, Overlay};
use crate::gather::gather_into;
use crate::sequential::Cache;
use crate::trace::{SpanKind, Tracer};
use crate::{EngineError, Metrics, RunOptions, VmOutcome};

/// Blocks of at least this many transactions start in range rounds (on fast storage).
const RANGES_FROM_TXS: usize = 4096;
/// Transactions per range in the first round (a probe: contention shows early)...
const FIRST_SPAN: usize = 256;
/// ...and the bounds of the range length as it adapts.
const MAX_SPAN: usize = 8192;
const MIN_SPAN: usize = 32;
/// Share of executions thrown away (invalid ranges) past which the rest of the block is
/// handed to the per-transaction engine; judged from the second round on.
const HANDOFF_WASTE: f64 = 0.2;

/// Whether a block of `txs` transactions on `workers` workers starts in range rounds:
/// not on slow storage, where many small units in flight hide the latency.
/// (`RunOptions::spread_small_blocks`: on blocks of any size, to test them.)
pub(crate) fn applies(txs: usize, workers: usize, slow_storage: bool, run: &RunOptions) -> bool {
    workers > 1 && !slow_storage && (txs >= RANGES_FROM_TXS || run.spread_small_blocks)
}

/// The committed state over the pre-block storage: the overlays of the committed
/// ranges, in block order ("layers"; nothing is copied out of them), and a filter that
/// tells, per bucket of key hashes, whether any layer wrote a key of the bucket and
/// whether more than one write did. A key's committed value is its latest layer's write
/// (with the deltas of later layers applied), or its pre-block value when no layer wrote
/// it, which the filter usually says without looking at a single layer.
pub(crate) struct Committed<'s, V: Vm, S> {
    vm: &'s V,
    layers: Vec<LocalMap<V>>,
    /// The thread that executed each layer (whose caches still hold it).
    layer_threads: Vec<ThreadId>,
    written: Box<[AtomicU64]>,
    rewritten: Box<[AtomicU64]>,
    /// One bit per word of `rewritten`: whether any of its buckets is set. Few keys are
    /// written more than once (the beneficiary; hot keys), so the state diff, which asks
    /// for every written key, mostly finds the answer in this small summary (4 KiB on a
    /// gigagas block, in L1) instead of missing the cache on `rewritten` for each (0.5 of
    /// its 3.5 ms on the raw-transfer gigagas block).
    rewritten_words: Box<[AtomicU64]>,
    /// log2 of the number of buckets.
    bucket_bits: u32,
    hasher: DefaultHashBuilder,
    storage: &'s S,
}

impl<'s, V: Vm, S: Storage<Key = V::Key, Value = V::Value>> Committed<'s, V, S> {
    /// An empty committed state for a block of `txs` transactions: about 128 buckets per
    /// transaction (a few keys each). With 32, 4.4% of the keys written once looked
    /// rewritten (their bucket shared), and the state diff resolved them one by one, apart:
    /// 1.4 of its 4.5 ms on the raw-transfer gigagas block (2 MiB of filter, 2 bits a
    /// bucket, instead of 0.5 MiB: the reads' filter checks took no longer).
    fn new(vm: &'s V, storage: &'s S, txs: usize) -> Self {
        let buckets = (txs * 128).next_power_of_two().clamp(1 << 16, 1 << 27);
        let words = || (0..buckets / 64).map(|_| AtomicU64::new(0)).collect();
        Self {
            vm,
            layers: Vec::new(),
            layer_threads: Vec::new(),
            written: words(),
            rewritten: words(),
            rewritten_words: (0..buckets.div_ceil(64 * 64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            bucket_bits: buckets.trailing_zeros(),
            hasher: DefaultHashBuilder::default(),
            storage,
        }
    }

    /// The word and bit of `key`'s bucket (from the top bits of its hash).
    fn bucket(&self, key: &V::Key) -> (usize, u64) {
        let bucket = (self.hasher.hash_one(key) >> (64 - self.bucket_bits)) as usize;
        (bucket / 64, 1 << (bucket % 64))
    }

    /// Records in the filter that `key` was written once more.
    fn mark(&self, key: &V::Key) {
        self.mark_bucket(self.bucket(key));
    }

    /// Records in the filter that a key of bucket `(word, bit)` ([`Self::bucket`]) was
    /// written once more.
    fn mark_bucket(&self, (word, bit): (usize, u64)) {
        if self.written[word].fetch_or(bit, Relaxed) & bit != 0 {
            self.rewritten[word].fetch_or(bit, Relaxed);
            self.rewritten_words[word / 64].fetch_or(1 << (word % 64), Relaxed);
        }
    }

    /// [`Self::mark`] for each key that `local` (a range's or a run's keys) wrote, with the
    /// filter's words fetched for writing `MARK_AHEAD` keys before they are marked: a
    /// mark's atomic update waits for its word's line (the filter is megabytes, its words
    /// random), so one after another the misses added up, and fetched ahead they overlap.
    fn mark_written(&self, local: &LocalMap<V>) {
        let buckets: Vec<(usize, u64)> = local
            .iter()
            .filter(|(_, entry)| entry.written.is_some())
            .map(|(key, _)| self.bucket(key))
            .collect();
        for (i, &bucket) in buckets.iter().enumerate() {
            if let Some(&(word, _)) = buckets.get(i + MARK_AHEAD) {
                fetch_for_writing(&self.written[word]);
            }
            self.mark_bucket(bucket);
        }
    }

    fn is(filter: &[AtomicU64], (word, bit): (usize, u64)) -> bool {
        filter[word].load(Relaxed) & bit != 0
    }

    /// Whether `key` may have been written more than once.
    fn is_rewritten(&self, key: &V::Key) -> bool {
        let (word, bit) = self.bucket(key);
        Self::is(&self.rewritten_words, (word / 64, 1 << (word % 64)))
            && Self::is(&self.rewritten, (word, bit))
    }

    /// `key`'s value after the first `layers` layers.
    fn value_after(&self, key: &V::Key, layers: usize) -> Result<Option<V::Value>, StorageError> {
        let mut deltas = Vec::new();
        let mut base = None;
        for layer in self.layers[..layers].iter().rev() {
            match layer.get(key).and_then(|local| local.written.as_ref()) {
                None => {}
                Some(None) => {
                    let local = &layer[key];
                    base = Some(local.value.clone().expect("a full write has a value"));
                    break;
                }
                Some(Some(delta)) => deltas.push(delta),
            }
        }
        let mut value = match base {
            Some(value) => value,
            None => self.storage.read(key)?,
        };
        for delta in deltas.into_iter().rev() {
            value = self.vm.apply_delta(key, value, delta);
        }
        Ok(value)
    }
}

impl<V, S> Storage for Committed<'_, V, S>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    type Key = V::Key;
    type Value = V::Value;

    fn read(&self, key: &V::Key) -> Result<Option<V::Value>, StorageError> {
        if !Self::is(&self.written, self.bucket(key)) {
            return self.storage.read(key);
        }
        self.value_after(key, self.layers.len())
    }

    fn read_latency(&self) -> Duration {
        self.storage.read_latency()
    }
}

/// What the per-transaction engine returns for the rest of the block: its state (every
/// key it wrote, marked written, absent values included), its outputs (not finalized)
/// and its metrics.
pub(crate) type Rest<V> = (
    Cache<<V as Vm>::Key, <V as Vm>::Value>,
    Vec<<V as Vm>::Output>,
    Metrics,
);

/// A block's state diff, as [`BlockOutcome`] holds it.
type StateDiff<V> = Vec<(<V as Vm>::Key, <V as Vm>::Value)>;

/// One range's execution.
struct RangeRun<V: Vm> {
    txs: Range<TxIndex>,
    local: LocalMap<V>,
    /// The thread that executed it.
    thread: ThreadId,
    /// The outputs, or the error and the transactions executed up to it.
    result: Result<Vec<V::Output>, (VmError, u64)>,
    time: Duration,
}

impl<V: Vm> RangeRun<V> {
    fn executed(&self) -> u64 {
        match &self.result {
            Ok(outputs) => outputs.len() as u64,
            Err((_, executed)) => *executed,
        }
    }
}

/// Executes `vm`'s block in range rounds on `workers` workers, handing the rest of the
/// block to `rest` (over the transactions from the hand-off on, and the committed state)
/// if contention makes rounds wasteful.
pub(crate) fn execute<V, S, F>(
    vm: &V,
    storage: &S,
    run: &RunOptions,
    workers: usize,
    rest: F,
) -> Result<(VmOutcome<V>, Metrics), EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
    F: FnOnce(&Suffix<'_, V>, &Committed<'_, V, S>) -> Result<Rest<V>, EngineError>,
{
    let n = vm.tx_count();
    let tracer = Tracer::new(run.trace);
    let mut committed = Committed::new(vm, storage, n);
    let mut outputs = Vec::with_capacity(n);
    let mut metrics = Metrics::default();
    let (mut start, mut span) = (0, FIRST_SPAN);
    let (mut rounds, mut executed, mut wasted, mut splits) = (0u64, 0u64, 0u64, 0u64);
    let mut handoff = None;
    // Keys per transaction, to size the overlays (measured after the first round).
    let mut keys_per_tx = 4.0;
    while start < n {
        if rounds >= 2 && wasted as f64 > HANDOFF_WASTE * executed as f64 {
            handoff = Some(start);
            break;
        }
        rounds += 1;
        let ranges = round(start, n, workers, span);

        // Execute: every range on its own overlay over the committed state. A worker
        // that runs out of work takes the second half of the longest range still
        // running (its own overlay, a range of its own in block order).
        let segments: Vec<Segment> = (0..ranges.len() * MAX_SEGMENTS_PER_WORKER)
            .map(|s| Segment::new(ranges.get(s).cloned().unwrap_or(0..0)))
            .collect();
        let registered = AtomicUsize::new(ranges.len());
        let per_worker: Vec<Vec<RangeRun<V>>> = crate::workers::run(ranges.len(), |w| {
            let mut trace = tracer.recorder(w);
            let mut runs = Vec::new();
            let mut segment = w;
            loop {
                let span = trace.start();
                let started = Instant::now();
                let txs = segments[segment].get();
                let (first, len) = (txs.start, txs.len());
                let local = LocalMap::<V>::with_capacity_and_hasher(
                    (keys_per_tx * len as f64) as usize,
                    Default::default(),
                );
                let mut outer = PreBlockView(&committed);
                let mut overlay = Overlay {
                    vm,
                    outer: &mut outer,
                    local,
                };
                let mut claimed = 0..0;
                let next = std::iter::from_fn(|| {
                    if claimed.is_empty() {
                        claimed = segments[segment].claim()?;
                    }
                    claimed.next()
                });
                let result = overlay.run(next, len);
                let executed = match &result {
                    Ok(outputs) => outputs.len(),
                    Err((_, executed)) => {
                        // The failed transaction's claimed successors go back.
                        segments[segment].return_from(first + *executed as usize);
                        *executed as usize
                    }
                };
                trace.record(SpanKind::Execute, Some(first), span);
                let span = trace.start();
                let mut local = overlay.local;
                settle(&committed, &mut local);
                trace.record(SpanKind::Merge, Some(first), span);
                runs.push(RangeRun {
                    txs: first..first + executed,
                    local,
                    thread: std::thread::current().id(),
                    result,
                    time: started.elapsed(),
                });
                // The rest of a segment that failed is a segment of its own.
                if !segments[segment].get().is_empty() {
                    continue;
                }
                match steal(&segments, &registered) {
                    Some(stolen) => segment = stolen,
                    None => break,
                }
            }
            tracer.submit(trace);
            runs
        });
        let mut runs: Vec<RangeRun<V>> = per_worker.into_iter().flatten().collect();
        splits += (runs.len() - ranges.len()) as u64;
        runs.sort_unstable_by_key(|run| run.txs.start);
        debug_assert!(
            runs.windows(2)
                .all(|pair| pair[0].txs.end == pair[1].txs.start)
        );

        // Validate: range `w` against the writes of the ranges before it (the first range
        // is valid), in pieces of its keys, each preferably by the thread that executed it:
        // the last round's second range alone is half the block's keys.
        let pieces: Vec<(usize, Range<usize>)> = (1..runs.len())
            .flat_map(|w| pieces_of(runs[w].local.len()).map(move |keys| (w, keys)))
            .collect();
        let threads: Vec<ThreadId> = pieces.iter().map(|(w, _)| runs[*w].thread).collect();
        let validated = by_thread(ranges.len(), &threads, |id, p| {
            let (w, keys) = &pieces[p];
            let mut trace = tracer.recorder(id);
            let span = trace.start();
            let started = Instant::now();
            let earlier = &runs[..*w];
            let valid = runs[*w]
                .local
                .get_range(keys.clone())
                .expect("pieces lie within their range's keys")
                .iter()
                .filter(|(_, local)| local.read_outside)
                .all(|(key, _)| {
                    earlier.iter().all(|run| {
                        run.local
                            .get(key)
                            .is_none_or(|local| local.written.is_none())
                    })
                });
            trace.record(SpanKind::Validate, Some(runs[*w].txs.start), span);
            tracer.submit(trace);
            (*w, valid, started.elapsed())
        });
        let mut valid = vec![true; runs.len()];
        for (w, ok, time) in validated {
            valid[w] &= ok;
            metrics.validation_time += time;
        }
        metrics.validations += runs.len() as u64 - 1;
        let mut commit = 0;
        for (run, valid) in runs.iter().zip(&valid) {
            if !valid {
                break;
            }
            if let Err((error, _)) = &run.result {
                // Every value the failed transaction read was the serial one.
                return Err(error.clone().into());
            }
            commit += 1;
        }
        metrics.validation_failures += (runs.len() - commit) as u64;

        // Commit: the valid ranges become layers (the filter learned their writes when
        // they ended).
        let (keys, txs) = runs.iter().fold((0, 0), |(keys, txs), run| {
            (keys + run.local.len(), txs + run.executed() as usize)
        });
        keys_per_tx = (keys as f64 / txs.max(1) as f64 * 1.15).max(0.5);
        start = runs[commit - 1].txs.end;
        span = if commit == runs.len() {
            (span * 2).min(MAX_SPAN)
        } else {
            (span / 2).max(MIN_SPAN)
        };
        for (w, run) in runs.into_iter().enumerate() {
            executed += run.executed();
            metrics.execution_time += run.time;
            if w < commit {
                let Ok(committed_outputs) = run.result else {
                    unreachable!("a failed range at a committed position fails the block")
                };
                outputs.extend(committed_outputs);
                committed.layers.push(run.local);
                committed.layer_threads.push(run.thread);
            } else {
                wasted += run.executed();
            }
        }
    }

    let mut extra = vec![
        ("range_rounds", rounds),
        ("range_handoff", u64::from(handoff.is_some())),
        ("range_splits", splits),
        ("sequential_fallback", 0),
        ("workers", workers as u64),
    ];
    metrics.executions = executed;
    let mut rest_state = None;
    if let Some(offset) = handoff {
        let suffix = Suffix { inner: vm, offset };
        let handoff_started = tracer.enabled().then(Instant::now);
        let (state, rest_outputs, rest) = rest(&suffix, &committed)?;
        outputs.extend(rest_outputs);
        rest_state = Some(state);
        metrics.add_counts(&rest);
        for (name, value) in rest.extra {
            if !extra.iter().any(|(known, _)| *known == name) {
                extra.push((name, value));
            }
        }
        if let (Some(at), Some(trace)) = (handoff_started, rest.trace) {
            tracer.append(trace, at);
        }
    }
    metrics.reexecutions = metrics.executions.saturating_sub(n as u64);
    metrics.extra = extra;

    crate::finish(
        vm,
        outputs,
        || state_diff(committed, rest_state, workers),
        tracer,
        metrics,
    )
}

/// A run of consecutive transactions executed by one thread: their outputs, the keys
/// they wrote (applied in order with [`crate::chunk::apply_write`]) and the thread.
pub(crate) type ExecutedRun<V> = (Vec<<V as Vm>::Output>, LocalMap<V>, ThreadId);

/// The outcome of a block from `runs` of its transactions (in block order), when no
/// transaction read a key that a transaction of an earlier run wrote, so that the writes
/// alone give the final state (as for committed ranges; `dag` uses it when its DAG has no
/// edge, `sealevel` when no declarations conflict). The runs' written keys are marked in
/// the filter in parallel, each run preferably by its own thread; then the diff is
/// assembled as for range rounds, and the outputs are finalized in block order.
pub(crate) fn outcome_of_runs<V, S>(
    vm: &V,
    storage: &S,
    runs: Vec<ExecutedRun<V>>,
    workers: usize,
) -> Result<VmOutcome<V>, VmError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let txs = runs.iter().map(|(outputs, _, _)| outputs.len()).sum();
    let mut outputs = Vec::with_capacity(txs);
    let mut layers = Vec::with_capacity(runs.len());
    let mut threads = Vec::with_capacity(runs.len());
    for (mut part, layer, thread) in runs {
        outputs.append(&mut part);
        layers.push(layer);
        threads.push(thread);
    }
    let mut committed = Committed::new(vm, storage, txs);
    by_thread(workers, &threads, |_, i| {
        committed.mark_written(&layers[i]);
    });
    committed.layers = layers;
    committed.layer_threads = threads;
    let state_diff = state_diff(committed, None, workers)?;
    vm.finalize_outputs(&mut outputs)?;
    Ok(BlockOutcome {
        tx_outcomes: outputs,
        state_diff,
    })
}

/// Transactions of a round not yet taken by the worker executing them, `next..end`,
/// packed in one word (`next` in the low half): the owner's claim of its next transaction
/// and a thief's split are one compare-and-swap each. Each segment has a cache line of its
/// own: packed next to another worker's segment, the line would move between the cores at
/// every claim.
struct Segment(CachePadded<AtomicU64>);

impl Segment {
    fn pack(txs: Range<TxIndex>) -> u64 {
        let index = |tx: TxIndex| u64::from(u32::try_from(tx).expect("a block has < 2^32 txs"));
        index(txs.start) | (index(txs.end) << 32)
    }

    fn unpack(word: u64) -> Range<TxIndex> {
        (word & u64::from(u32::MAX)) as TxIndex..(word >> 32) as TxIndex
    }

    fn new(txs: Range<TxIndex>) -> Self {
        Self(CachePadded::new(AtomicU64::new(Self::pack(txs))))
    }

    /// The transactions not yet taken.
    fn get(&self) -> Range<TxIndex> {
        Self::unpack(self.0.load(Acquire))
    }

    /// Replaces `change`'s answer for the untaken transactions, if it has one.
    fn update<T>(
        &self,
        change: impl Fn(Range<TxIndex>) -> Option<(Range<TxIndex>, T)>,
    ) -> Option<T> {
        let mut word = self.0.load(Acquire);
        loop {
            let (left, taken) = change(Self::unpack(word))?;
            match self
                .0
                .compare_exchange_weak(word, Self::pack(left), AcqRel, Acquire)
            {
                Ok(_) => return Some(taken),
                Err(now) => word = now,
            }
        }
    }

    /// The next few transactions, taken (by the segment's worker): up to `CLAIM_BATCH`,
    /// fewer as the segment runs out, so that a thief still finds work to split. One
    /// claim per transaction cost more than the claim itself: a compare-and-swap waits
    /// until every store before it has left the core, and the stores of a transaction's
    /// execution (to memory the block has not touched yet) then stalled the worker
    /// instead of draining while the next transaction ran (the claims were 5% of the
    /// raw-transfer gigagas block's profile samples).
    fn claim(&self) -> Option<Range<TxIndex>> {
        self.update(|txs| {
            let take = (txs.len() / CLAIM_BATCH).clamp(1, CLAIM_BATCH);
            (!txs.is_empty()).then(|| (txs.start + take..txs.end, txs.start..txs.start + take))
        })
    }

    /// Gives the transactions from `from` on back to the segment (its worker, after a
    /// failed transaction at `from - 1`; only the worker moves the start, so `from..`
    /// is what it claimed and did not execute, followed by what it had not claimed).
    fn return_from(&self, from: TxIndex) {
        self.update(|txs| Some((from..txs.end, ())));
    }

    /// The second half of the untaken transactions, taken, if there are `MIN_STEAL`.
    fn split(&self) -> Option<Range<TxIndex>> {
        self.update(|txs| {
            let middle = txs.start + txs.len() / 2;
            (txs.len() >= MIN_STEAL).then_some((txs.start..middle, middle..txs.end))
        })
    }
}

/// Segments a round may have, per worker (each steal makes one).
const MAX_SEGMENTS_PER_WORKER: usize = 16;
/// A segment is split only when it has at least this many transactions left.
const MIN_STEAL: usize = 32;
/// Transactions a worker claims at once from its segment (at most; see
/// [`Segment::claim`]).
const CLAIM_BATCH: usize = 8;

/// Takes the second half of the registered segment with the most transactions left, as
/// a new segment; `None` if none has `MIN_STEAL` left or no segment slot is free.
fn steal(segments: &[Segment], registered: &AtomicUsize) -> Option<usize> {
    loop {
        let count = registered.load(SeqCst).min(segments.len());
        let victim = (0..count).max_by_key(|&s| segments[s].get().len())?;
        if segments[victim].get().len() < MIN_STEAL {
            return None;
        }
        // The slot first: a split must not leave transactions without a segment.
        let slot = registered.fetch_add(1, SeqCst);
        if slot >= segments.len() {
            return None;
        }
        // Shortened meanwhile: the claimed slot stays empty (0..0); look again.
        if let Some(stolen) = segments[victim].split() {
            segments[slot].0.store(Segment::pack(stolen), Release);
            return Some(slot);
        }
    }
}

/// The ranges of a round from `start`: `workers` ranges of `span` transactions, or the
/// rest of the block in equal parts when it is not much more than that.
fn round(start: TxIndex, n: usize, workers: usize, span: usize) -> Vec<Range<TxIndex>> {
    let remaining = n - start;
    if remaining >= 2 * workers * span {
        return (0..workers)
            .map(|w| start + w * span..start + (w + 1) * span)
            .collect();
    }
    let parts = workers.min(remaining).max(1);
    let (each, longer) = (remaining / parts, remaining % parts);
    let mut ranges = Vec::with_capacity(parts);
    let mut from = start;
    for part in 0..parts {
        let len = each + usize::from(part < longer);
        ranges.push(from..from + len);
        from += len;
    }
    ranges
}

/// What a worker does with a range's overlay as soon as the range has ended, while its
/// caches hold it: marks the keys it wrote in the filter, and gives each key it only sent
/// deltas to without reading it (a transfer's recipient) the value the overlay gives a key
/// it read: the committed value with the range's deltas applied, for the state diff.
///
/// Marking before validation is safe: the filter may say "written" of a key no layer
/// wrote (a range that turns out invalid), which only costs a look at the layers; such a
/// key, written again when its range is re-executed, looks rewritten, and the state diff
/// then resolves it through the layers. A delta-only key's value is used only if the key
/// ends up written once in the whole block: then no other layer wrote it, the value it was
/// based on is the pre-block value, and it is the key's final value.
fn settle<V, S>(committed: &Committed<'_, V, S>, local: &mut LocalMap<V>)
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    committed.mark_written(local);
    for (key, entry) in local.iter_mut() {
        let Some(write) = &entry.written else {
            continue;
        };
        if let (Some(delta), None) = (write, &entry.value) {
            // A storage error is reported by the state diff, which reads again.
            if let Ok(base) = committed.read(key) {
                entry.value = Some(committed.vm.apply_delta(key, base, delta));
            }
        }
    }
}

/// How many keys ahead of its mark a filter word is fetched ([`Committed::mark_written`]).
const MARK_AHEAD: usize = 16;

/// Asks the CPU to bring `word`'s cache line in, ready to be written.
#[inline]
fn fetch_for_writing(word: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
        // SAFETY: a prefetch is only a hint: it reads nothing the program can observe and
        // never faults, whatever the address (here that of a live atomic the caller
        // borrows). `sse`, which `_mm_prefetch` needs, is part of every x86_64 target.
        // Exercised by every test of a block that starts in range rounds.
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(std::ptr::from_ref(word).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = word;
}

/// Keys per piece of work when a range's keys are validated.
const PIECE_KEYS: usize = 4096;

/// The pieces of `keys` keys (by position in a range's overlay), `PIECE_KEYS` each.
fn pieces_of(keys: usize) -> impl Iterator<Item = Range<usize>> {
    (0..keys)
        .step_by(PIECE_KEYS)
        .map(move |start| start..(start + PIECE_KEYS).min(keys))
}

/// Runs `work(worker, item)` for every item `0..threads.len()` on up to `workers` workers
/// and returns the results in item order. Each worker first takes the items its own thread
/// produced (`threads[item]`: their data are likely still in its core's caches), then any
/// left, so a worker that starts late or ends early does not leave the others waiting.
fn by_thread<R: Send>(
    workers: usize,
    threads: &[ThreadId],
    work: impl Fn(usize, usize) -> R + Sync,
) -> Vec<R> {
    let taken: Vec<AtomicBool> = threads.iter().map(|_| AtomicBool::new(false)).collect();
    let per_worker = crate::workers::run(workers.min(threads.len()), |id| {
        let me = std::thread::current().id();
        let mut done = Vec::new();
        for own in [true, false] {
            for (item, thread) in threads.iter().enumerate() {
                // The swap gives each item to exactly one worker.
                if (*thread == me) == own && !taken[item].swap(true, Relaxed) {
                    done.push((item, work(id, item)));
                }
            }
        }
        done
    });
    let mut all: Vec<(usize, R)> = per_worker.into_iter().flatten().collect();
    all.sort_unstable_by_key(|(item, _)| *item);
    all.into_iter().map(|(_, r)| r).collect()
}

/// The block's state diff: every key written by a layer or by the rest of the block
/// (`rest`, the handed-off engine's state), with its final value, if not absent.
///
/// A key the filter says only one write touched is final as that write left it (a delta
/// on the pre-block value): the layers are walked for those in parallel, each preferably
/// by the thread that executed it, moving values straight into the diff (each layer
/// fills a block of the diff's spare capacity, [`crate::gather`]). The other keys (the
/// filter's "more than once", false answers included) are resolved after, in block order:
/// the layers' writes one after the other, a delta on the value before it; the rest's
/// write, final, replaces them all.
fn state_diff<V, S>(
    mut committed: Committed<'_, V, S>,
    rest: Option<Cache<V::Key, V::Value>>,
    workers: usize,
) -> Result<StateDiff<V>, VmError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let writes: usize = committed.layers.iter().map(|layer| layer.len()).sum();
    let rest_writes = rest.as_ref().map_or(0, |rest| rest.len());
    let mut diff = Vec::with_capacity(writes + rest_writes);
    // Keys the rest wrote that a layer may also have written: the rest's value is final.
    let mut final_in_rest = std::collections::HashSet::<V::Key, DefaultHashBuilder>::default();
    if let Some(rest) = rest {
        for (key, entry) in &rest {
            if entry.written {
                committed.mark(key);
            }
        }
        for (key, entry) in rest {
            if !entry.written {
                continue;
            }
            if committed.is_rewritten(&key) {
                final_in_rest.insert(key.clone());
            }
            if let Some(value) = entry.value {
                diff.push((key, value));
            }
        }
    }

    // Keys written once, in parallel, each layer into a block of the spare capacity.
    let layers: Vec<Mutex<Option<LocalMap<V>>>> = std::mem::take(&mut committed.layers)
        .into_iter()
        .map(|layer| Mutex::new(Some(layer)))
        .collect();
    let threads = std::mem::take(&mut committed.layer_threads);
    let shared = &committed;
    let walked = gather_into(&mut diff, writes, |out| {
        by_thread(workers, &threads, |_, i| {
            let layer = layers[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .expect("each layer is walked once");
            let mut block = out.block(layer.len()).expect("room for every layer's keys");
            let mut kept = Vec::new();
            for (key, local) in layer {
                let Some(write) = &local.written else {
                    continue;
                };
                if shared.is_rewritten(&key) {
                    kept.push((key, local));
                    continue;
                }
                let value = match (write, local.value) {
                    (None, value) => value.expect("a full write has a value"),
                    // Deltas on the pre-block value, as the range's last transaction left
                    // it (or as `settle` computed it).
                    (Some(_), Some(value)) => value,
                    (Some(delta), None) => {
                        let base = shared.storage.read(&key).map_err(ReadError::from)?;
                        shared.vm.apply_delta(&key, base, delta)
                    }
                };
                if let Some(value) = value
                    && block.push((key, value)).is_err()
                {
                    unreachable!("a layer's block has a slot for each of its keys");
                }
            }
            Ok::<_, VmError>(kept)
        })
    });
    let walked = walked.into_iter().collect::<Result<Vec<_>, _>>()?;

    // Keys written more than once (or that the filter could not tell), in block order.
    let kept: Vec<_> = walked.into_iter().flatten().collect();
    let mut values =
        alloy_primitives::map::HashMap::<V::Key, Option<V::Value>>::with_capacity_and_hasher(
            kept.len(),
            DefaultHashBuilder::default(),
        );
    for (key, local) in kept {
        let value = match local.written.expect("only writes are kept") {
            None => local.value.expect("a full write has a value"),
            Some(delta) => match (values.get(&key), local.value) {
                (Some(before), _) => committed.vm.apply_delta(&key, before.clone(), &delta),
                // No layer before wrote the key: its value as the range left it (or as
                // `settle` computed it) is the pre-block value with the deltas applied.
                (None, Some(value)) => value,
                (None, None) => {
                    let base = committed.storage.read(&key).map_err(ReadError::from)?;
                    committed.vm.apply_delta(&key, base, &delta)
                }
            },
        };
        values.insert(key, value);
    }
    for (key, value) in values {
        if let (false, Some(value)) = (final_in_rest.contains(&key), value) {
            diff.push((key, value));
        }
    }
    Ok(diff)
}

/// The transactions of a block from `offset` on, as a block of their own (the part of a
/// block handed to another engine). Outputs are finalized by the caller, with the rest.
pub(crate) struct Suffix<'a, V> {
    inner: &'a V,
    offset: TxIndex,
}

impl<V: Vm> Vm for Suffix<'_, V> {
    type Key = V::Key;
    type Value = V::Value;
    type Delta = V::Delta;
    type Output = V::Output;

    fn tx_count(&self) -> usize {
        self.inner.tx_count() - self.offset
    }

    fn execute<R: ReadView<Self::Key, Self::Value>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<VmExecution<Self>, VmError> {
        let tx = tx + self.offset;
        // A panic is turned into an error here, where the block's index is known.
        crate::execute_caught(self.inner, tx, view)
    }

    fn apply_delta(
        &self,
        key: &Self::Key,
        value: Option<Self::Value>,
        delta: &Self::Delta,
    ) -> Option<Self::Value> {
        self.inner.apply_delta(key, value, delta)
    }

    fn merge_deltas(&self, earlier: &mut Self::Delta, later: &Self::Delta) {
        self.inner.merge_deltas(earlier, later);
    }

    fn finalize_outputs(&self, _outputs: &mut [Self::Output]) -> Result<(), VmError> {
        Ok(())
    }

    fn light_tx_equivalents_of(&self, tx: TxIndex) -> usize {
        self.inner.light_tx_equivalents_of(self.offset + tx)
    }

    fn sequence_key(&self, tx: TxIndex) -> Option<Self::Key> {
        self.inner.sequence_key(tx + self.offset)
    }

    fn in_sequence(&self, tx: TxIndex, value: Option<Self::Value>) -> Option<Self::Value> {
        self.inner.in_sequence(tx + self.offset, value)
    }

    fn declared_access<R: ReadView<Self::Key, Self::Value>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(Self::Key, parex_core::AccessKind)> {
        self.inner.declared_access(tx + self.offset, pre_block)
    }
}

#[cfg(test)]
mod tests {
    use super::{MIN_STEAL, Segment, round};

    #[test]
    fn segments_claim_in_order_and_split_their_second_half() {
        let segment = Segment::new(10..110);
        // 100 left: a full batch; then 92 left: another.
        assert_eq!(segment.claim(), Some(10..18));
        assert_eq!(segment.claim(), Some(18..26));
        assert_eq!(segment.split(), Some(68..110));
        assert_eq!(segment.get(), 26..68);
        // A failure at 20: 21.. goes back to the segment.
        segment.return_from(21);
        assert_eq!(segment.get(), 21..68);
        let short = Segment::new(0..MIN_STEAL - 1);
        assert_eq!(short.split(), None);
        assert_eq!(short.get(), 0..MIN_STEAL - 1);
        // Batches shrink as a segment runs out, down to one transaction.
        let tail = Segment::new(0..20);
        assert_eq!(tail.claim(), Some(0..2));
        assert_eq!(tail.claim(), Some(2..4));
        let last = Segment::new(5..6);
        assert_eq!((last.claim(), last.claim()), (Some(5..6), None));
        assert!(last.get().is_empty());
    }

    #[test]
    fn rounds_cover_the_rest_without_gaps() {
        assert_eq!(round(0, 100, 2, 20), vec![0..20, 20..40]);
        assert_eq!(round(40, 100, 2, 20), vec![40..70, 70..100]);
        assert_eq!(round(98, 100, 4, 20), vec![98..99, 99..100]);
        assert_eq!(round(0, 7, 3, 256), vec![0..3, 3..5, 5..7]);
    }
}
