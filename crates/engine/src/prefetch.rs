//! Prefetching pre-block state on slow storage, by discovery (`block-stm`, into its
//! multi-version memory; `optimistic`, into a [`PreBlockCache`] as its workers start; the
//! other parallel engines, into one in a pass before theirs: [`discovered_first`]).
//! `block-stm` and `optimistic` first judge whether the block is a chain from the
//! declarations of its first transactions, after discovering those transactions' keys
//! ([`chain_check`]), and run a chain in order over the cache.
//!
//! On storage whose reads block (a disk), an engine's workers spend their time waiting
//! for reads, one at a time per worker, and every wait costs its thread a sleep and a
//! wake-up. A transaction's keys are not known before it runs, but running it on the
//! pre-block values finds them, one at a time:
//!
//! * A worker claims a window of consecutive transactions and executes each on the
//!   pre-block values cached in the multi-version memory. The first read of a key not
//!   cached yet is recorded and ends that execution ([`ReadError::Aborted`]).
//! * The window's missing keys are then read together ([`MvMemory::preload`] through
//!   [`Storage::read_many`]: one wait for many keys), and the transactions that missed
//!   are executed again, until none misses or [`MAX_ROUNDS`] have run. An ERC20
//!   transfer takes four rounds: the sender's account, its balance, the recipient's
//!   balance, then none.
//! * Each round executes a transaction from its start again, so a heavy transaction's
//!   rounds cost more than the waits they save: a transaction leaves discovery once one
//!   of its rounds took longer than a storage read / [`ROUND_BUDGET_SHARE`] (a swap of
//!   about ten keys stops after its first few, cheap rounds), and finds its remaining
//!   keys when it executes for real. Not so for `sealevel`, whose in-order runs of the
//!   transactions its declarations miss would wait for each such key alone: its pass is
//!   [`Windows::exhaustive`] (swaps at 100 us per read: 1.4x to about 12x `sequential`).
//!
//! Exactness: nothing here is a result. Discovery executions are thrown away; they only
//! fill the cache of pre-block values, which never change, so loading them early
//! changes nothing that any transaction sees. A transaction whose keys depend on earlier
//! transactions of the block may be shown the wrong keys: the engine then reads the
//! right ones when it executes the transaction for real, as it would without this.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use parex_core::{ReadError, ReadView, Storage, StorageError, TxIndex, Vm};

use crate::mv_memory::MvMemory;
use crate::trace::{Recorder, SpanKind};

/// Discovery rounds per window, at most (a transaction that reads more pre-block keys
/// than this finds the rest when it executes for real).
pub const MAX_ROUNDS: usize = 8;

/// Discovery rounds per window at most when windows are [`Windows::exhaustive`] (a
/// Uniswap swap reads about a dozen pre-block keys, one more found per round).
pub const EXHAUSTIVE_ROUNDS: usize = 32;

/// A transaction stays in discovery while its rounds take less than one read divided by
/// this ([`Storage::read_latency`]): 6 us at 100 us per read. ERC20 transfers, 1000 at
/// 100 us per read on 2 threads, three alternating runs each: 4 gave 17.6-20.6x
/// `sequential`, 16 gave 21.6-24.2x; swaps 12.1-12.4x against 13.9-14.1x (without
/// discovery 13.2-14.9x: their later rounds cost more CPU than the waits they save).
pub const ROUND_BUDGET_SHARE: u32 = 16;

/// Workers per thread on slow storage with discovery: keys read in batches need fewer
/// workers to keep reads in flight, and fewer workers share the cores better (ERC20 and
/// raw transfers at 100 us per read on 2 threads: 8 per thread ran them in 26 and 10 ms,
/// 16 per thread in 32 and 13 ms).
pub const WORKERS_PER_THREAD: usize = 8;

/// The workers to run a block of `txs` transactions on `threads` threads with discovery.
pub fn workers(threads: usize, txs: usize) -> usize {
    (threads.max(1) * WORKERS_PER_THREAD)
        .min(512)
        .min(txs)
        .max(1)
}

/// Discovery windows over a block's first transactions (all of them, mostly), claimed by
/// the workers in block order.
pub struct Windows {
    next: AtomicUsize,
    size: usize,
    /// The transactions covered are `0..end`.
    end: usize,
    /// Every transaction stays in discovery until it misses no key (up to
    /// [`EXHAUSTIVE_ROUNDS`]), whatever its rounds cost ([`Windows::exhaustive`]).
    exhaustive: bool,
}

impl Windows {
    /// Windows over the first `txs` transactions for `workers` workers: about one window
    /// per worker and round, so that every worker has keys in flight, and no more than one
    /// storage batch of keys per round.
    pub fn new(txs: usize, workers: usize) -> Self {
        Self {
            next: AtomicUsize::new(0),
            size: txs.div_ceil(workers.max(1)).clamp(1, 64),
            end: txs,
            exhaustive: false,
        }
    }

    /// These windows with every transaction discovered in full: for an engine whose
    /// executions then run in block order, one at a time (`sealevel` on transactions its
    /// declarations do not cover), every key left to find costs a whole read's wait, so
    /// re-executing a transaction from its start for each key is the cheaper way.
    pub fn exhaustive(mut self) -> Self {
        self.exhaustive = true;
        self
    }

    /// Transactions per window.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// What a worker's discovery did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Keys it read from storage in batches.
    pub keys: u64,
    /// Batches it read them in.
    pub batches: u64,
    /// Discovery executions (thrown away).
    pub executions: u64,
}

impl Discovered {
    /// The counters as metrics extras: `prefetched`, `prefetch_batches`,
    /// `discovery_executions`.
    pub fn extras(&self) -> [(&'static str, u64); 3] {
        [
            ("prefetched", self.keys),
            ("prefetch_batches", self.batches),
            ("discovery_executions", self.executions),
        ]
    }

    /// The counters back from metrics extras written by [`Self::extras`] (zero if absent).
    pub fn from_metrics(metrics: &crate::Metrics) -> Self {
        let get = |name| metrics.extra(name).unwrap_or(0);
        Self {
            keys: get("prefetched"),
            batches: get("prefetch_batches"),
            executions: get("discovery_executions"),
        }
    }
}

impl std::ops::AddAssign for Discovered {
    fn add_assign(&mut self, other: Self) {
        self.keys += other.keys;
        self.batches += other.batches;
        self.executions += other.executions;
    }
}

/// Runs discovery on `windows` claimed in turn until the block's transactions are all
/// claimed or `stop` says so (see the module
/// documentation). Records a [`SpanKind::Hint`] span per discovery execution.
pub fn discover<V, S, D>(
    vm: &V,
    storage: &S,
    memory: &MvMemory<V::Key, V::Value, D>,
    windows: &Windows,
    stop: impl Fn() -> bool,
    trace: &mut Recorder,
) -> Discovered
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
    D: Clone + Send,
{
    let n = vm.tx_count().min(windows.end);
    let (budget, rounds) = if windows.exhaustive {
        (std::time::Duration::MAX, EXHAUSTIVE_ROUNDS)
    } else {
        (storage.read_latency() / ROUND_BUDGET_SHARE, MAX_ROUNDS)
    };
    let mut done = Discovered::default();
    let window = windows.size;
    let mut pending: Vec<TxIndex> = Vec::with_capacity(window);
    let mut missing: Vec<V::Key> = Vec::with_capacity(window);
    while !stop() {
        let first = windows.next.fetch_add(window, Relaxed);
        if first >= n {
            break;
        }
        pending.clear();
        pending.extend(first..(first + window).min(n));
        for _ in 0..rounds {
            missing.clear();
            pending.retain(|&tx| {
                let started = std::time::Instant::now();
                let span = trace.start();
                let mut view = CachedPreBlock {
                    memory,
                    missing: None,
                    vm,
                    tx,
                    sequence_key: vm.sequence_key(tx),
                };
                // A panic or an error is an artefact of running out of context, or the
                // transaction's own failure: the real execution meets and reports it.
                let _ = catch_unwind(AssertUnwindSafe(|| vm.execute(tx, &mut view)));
                trace.record(SpanKind::Hint, Some(tx), span);
                done.executions += 1;
                match view.missing {
                    Some(key) => {
                        missing.push(key);
                        started.elapsed() < budget
                    }
                    None => false,
                }
            });
            if missing.is_empty() {
                break;
            }
            dedup(&mut missing);
            let read = memory.preload(
                &missing,
                |keys| storage.read_many(keys),
                |k| storage.read(k),
            );
            if read > 0 {
                done.keys += read as u64;
                done.batches += 1;
            }
        }
    }
    done
}

/// Slow storage behind a cache of its pre-block values, for engines without a
/// multi-version memory of their own (`optimistic`, and every engine's in-order run of a
/// chain and pass before its own, [`discovered_first`] and [`chain_check`]): every key is read from storage at
/// most once, by whichever worker needs it first (others wait for it), and discovery
/// ([`Self::discover`]) fills the cache in batches. Reads report the storage's latency,
/// so engines keep treating it as slow.
pub struct PreBlockCache<'s, S: Storage> {
    storage: &'s S,
    memory: MvMemory<S::Key, S::Value, ()>,
}

impl<'s, S> PreBlockCache<'s, S>
where
    S: Storage,
    S::Key: Eq + std::hash::Hash + Clone + Send + Sync,
    S::Value: Clone + PartialEq + Send,
{
    /// An empty cache over `storage`, sized for about `keys` keys.
    pub fn new(storage: &'s S, keys: usize) -> Self {
        Self {
            storage,
            memory: MvMemory::new(keys, true),
        }
    }

    /// An empty cache for `vm`'s block, and how many workers discover into it on
    /// `threads` threads ([`workers`]).
    fn for_block<V: Vm>(storage: &'s S, vm: &V, threads: usize) -> (Self, usize) {
        let n = vm.tx_count();
        (Self::new(storage, 3 * n), workers(threads, n))
    }

    /// The pre-block values cached, each key once.
    pub fn into_cached(self) -> crate::mv_memory::CachedBases<S::Key, S::Value> {
        self.memory.into_cached_bases()
    }

    /// [`discover`] into this cache.
    pub fn discover<V>(
        &self,
        vm: &V,
        windows: &Windows,
        stop: impl Fn() -> bool,
        trace: &mut Recorder,
    ) -> Discovered
    where
        V: Vm<Key = S::Key, Value = S::Value>,
    {
        discover(vm, self.storage, &self.memory, windows, stop, trace)
    }
}

impl<S> Storage for PreBlockCache<'_, S>
where
    S: Storage,
    S::Key: Eq + std::hash::Hash + Clone + Send + Sync,
    S::Value: Clone + PartialEq + Send,
{
    type Key = S::Key;
    type Value = S::Value;
    fn read(&self, key: &S::Key) -> Result<Option<S::Value>, StorageError> {
        self.memory.pre_block(key, |k| self.storage.read(k))
    }
    fn read_latency(&self) -> std::time::Duration {
        self.storage.read_latency()
    }
}

/// Runs `engine` over a [`PreBlockCache`] of slow `storage` that discovery has filled
/// first, on [`workers`] workers for `threads` threads: for the engines without discovery
/// of their own (`dag`, `sealevel`, `sealevel-preexec`), whose passes and in-order re-runs
/// then find the keys cached instead of waiting for each. Adds the discovery's counters
/// to the engine's metrics and its time to their execution time.
pub fn discovered_first<V, S, R>(
    vm: &V,
    storage: &S,
    threads: usize,
    exhaustive: bool,
    engine: impl FnOnce(&PreBlockCache<'_, S>) -> Result<(R, crate::Metrics), crate::EngineError>,
) -> Result<(R, crate::Metrics), crate::EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let (cache, workers) = PreBlockCache::for_block(storage, vm, threads);
    let mut windows = Windows::new(vm.tx_count(), workers);
    if exhaustive {
        windows = windows.exhaustive();
    }
    let found = discover_in_pass(vm, &cache, workers, &windows);
    found.added_to(engine(&cache))
}

/// What a discovery pass did, and the time its workers spent (summed).
#[derive(Default)]
pub struct Pass {
    pub found: Discovered,
    pub time: std::time::Duration,
}

impl std::ops::AddAssign for Pass {
    fn add_assign(&mut self, other: Self) {
        self.found += other.found;
        self.time += other.time;
    }
}

impl Pass {
    /// `result`'s metrics with this pass's counters added, and its time as execution.
    pub fn added_to<R>(
        self,
        result: Result<(R, crate::Metrics), crate::EngineError>,
    ) -> Result<(R, crate::Metrics), crate::EngineError> {
        let (result, mut metrics) = result?;
        metrics.execution_time += self.time;
        for (name, value) in self.found.extras() {
            metrics.add_extra(name, value);
        }
        Ok((result, metrics))
    }
}

/// Discovery of `windows` into `cache` on `workers` workers, side by side.
fn discover_in_pass<V, S>(
    vm: &V,
    cache: &PreBlockCache<'_, S>,
    workers: usize,
    windows: &Windows,
) -> Pass
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let found = crate::workers::run(workers, |_| {
        let started = std::time::Instant::now();
        let found = cache.discover(vm, windows, || false, &mut Recorder::off());
        (found, started.elapsed())
    });
    let mut pass = Pass::default();
    for (found, time) in found {
        pass += Pass { found, time };
    }
    pass
}

/// What [`chain_check`] found on slow storage.
pub enum ChainCheck<'s, S: Storage, R> {
    /// The block starts as a chain: it ran in order over its discovered keys.
    Chain(Result<(R, crate::Metrics), crate::EngineError>),
    /// It does not: a cache holding the keys discovered for the whole block (the engine
    /// needs no discovery of its own), and what that discovery did.
    NotChain(PreBlockCache<'s, S>, Pass),
}

/// On slow storage, whether the block starts as a chain ([`crate::declared::declared_chain`]),
/// judged after a discovery of the whole block, so that the judged transactions'
/// declarations find their keys cached instead of waiting for each (64 declarations, one
/// read at a time per worker, cost about 12 reads' time); a chain then runs `in_order`
/// over the cache, any other block is handed the cache. One pass: discovering the judged
/// transactions first and the rest after cost a chain (and any other block, whose
/// engine discovered the rest) a second pass's rounds of waits.
pub fn chain_check<'s, V, S, R>(
    vm: &V,
    storage: &'s S,
    threads: usize,
    in_order: impl FnOnce(&PreBlockCache<'s, S>) -> Result<(R, crate::Metrics), crate::EngineError>,
) -> ChainCheck<'s, S, R>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let (cache, workers) = PreBlockCache::for_block(storage, vm, threads);
    let pass = discover_in_pass(vm, &cache, workers, &Windows::new(n, workers));
    if !crate::declared::declared_chain(vm, &cache, workers, false) {
        return ChainCheck::NotChain(cache, pass);
    }
    ChainCheck::Chain(pass.added_to(in_order(&cache)))
}

/// Removes repeated keys, keeping the first of each (transactions of a window often
/// miss the same key: the contract they all call).
fn dedup<K: PartialEq>(keys: &mut Vec<K>) {
    let mut i = 0;
    while i < keys.len() {
        if keys[..i].contains(&keys[i]) {
            keys.swap_remove(i);
        } else {
            i += 1;
        }
    }
}

/// The pre-block values the memory has cached; the first key it has not ends the
/// execution and is kept in `missing`. Transaction `tx` reads its sequence key in sequence
/// ([`Vm::in_sequence`]): a later transaction of a nonce sequence would otherwise fail
/// its nonce check on the pre-block state and discover none of its keys, and the real
/// execution would wait for each of them (the mix at hot ratio 0.3, 1000 transactions at
/// 100 us per read: 10-30% faster in the engines that discover).
struct CachedPreBlock<'m, 'v, V: Vm, D> {
    memory: &'m MvMemory<V::Key, V::Value, D>,
    missing: Option<V::Key>,
    vm: &'v V,
    tx: TxIndex,
    sequence_key: Option<V::Key>,
}

impl<V: Vm, D> ReadView<V::Key, V::Value> for CachedPreBlock<'_, '_, V, D>
where
    D: Clone + Send,
{
    fn read(&mut self, key: &V::Key) -> Result<Option<V::Value>, ReadError> {
        if self.missing.is_some() {
            // The VM went on after the abort (it may catch errors): it learns nothing more.
            return Err(ReadError::Aborted);
        }
        match self.memory.cached_base(key) {
            Some(Ok(value)) if self.sequence_key.as_ref() == Some(key) => {
                Ok(self.vm.in_sequence(self.tx, value))
            }
            Some(value) => value.map_err(ReadError::Storage),
            None => {
                self.missing = Some(key.clone());
                Err(ReadError::Aborted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_spread_the_block_over_the_workers_within_one_batch() {
        let size = |txs, workers| Windows::new(txs, workers).size();
        assert_eq!(size(1000, 32), 32);
        assert_eq!(size(100, 32), 4);
        assert_eq!(size(10, 32), 1);
        assert_eq!(size(0, 32), 1);
        assert_eq!(size(100_000, 32), 64);
        assert_eq!(size(5, 0), 5);
        assert_eq!(Windows::new(64, 16).end, 64);
    }

    #[test]
    fn workers_per_thread_within_the_block() {
        assert_eq!(workers(2, 1000), 2 * WORKERS_PER_THREAD);
        assert_eq!(workers(0, 1000), WORKERS_PER_THREAD);
        assert_eq!(workers(2, 5), 5);
        assert_eq!(workers(2, 0), 1);
        assert_eq!(workers(1000, 100_000), 512);
    }

    #[test]
    fn dedup_keeps_one_of_each() {
        let mut keys = vec![3, 1, 3, 2, 1, 3];
        dedup(&mut keys);
        keys.sort_unstable();
        assert_eq!(keys, vec![1, 2, 3]);
    }
}
