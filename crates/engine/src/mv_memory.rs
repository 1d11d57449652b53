//! Multi-version memory: per state key, the values written by each transaction of the
//! block (the latest incarnation of each), so that transaction `j` reads the state as
//! of just before `j` while later transactions keep writing.
//!
//! * Per key, entries are kept in a vector sorted by transaction index (most keys have
//!   one or two writers; hot keys are appended to in roughly block order):
//!   [`Entry::Write`] (a full value and the writer's incarnation), [`Entry::Delta`] (a
//!   commutative update, resolved only when read) and [`Entry::Estimate`] (a write the
//!   writer's aborted incarnation made and its next incarnation will probably redo).
//! * A read by `j` walks down from the highest entry below `j`: a write ends the walk,
//!   deltas are collected, an estimate blocks the reader on its writer, and reaching the
//!   bottom uses the pre-block value; the collected deltas are then applied in block
//!   order on top of the base, one by one, exactly as serial execution applies them.
//! * Pre-block values: on slow storage, a key's value is read once, by the first reader
//!   that needs it and outside the shard lock; concurrent readers of the same key wait
//!   for it; it is then cached in the key's state, which also keeps the highest reader
//!   (a write then tells whether a later transaction may have read past it). On fast
//!   storage (memory) nothing is cached: a read that no entry answers goes to storage
//!   and inserts nothing, so the memory holds only written keys (a copy of every value
//!   read would cost more to build, touch and tear down than reading storage again).
//! * Keys are spread over cache-padded shards, each a mutex over a table: the keys'
//!   states side by side in arrival order, found through a hash table of positions (so
//!   a new key touches the next free state, not a random place in memory sized for the
//!   whole block). The hash is computed once per operation. Nothing is allocated on a
//!   read of a known key. A new key's state is pushed complete, into lines the CPU was
//!   asked to fetch for writing when the shard's previous new key arrived (fresh memory
//!   was a third of block-stm's extra time over `sequential` on light transactions).
//! * Who wrote each key, roughly (fast storage): a cell per bucket of keys holds the one
//!   transaction that wrote keys of the bucket, or "many" once another did
//!   ([`Writers`]). A read or a validation of a pre-block value by a transaction that is
//!   the bucket's only writer, or finds it unwritten, needs no shard: no other
//!   transaction has an entry under the key (its own are never below it). Exact as any
//!   read racing a write: a writer marks the cell before its entry goes in, and the
//!   engine validates every transaction above a new write again after it.
//! * Owner lists (fast storage, when the engine publishes whole incarnations:
//!   [`MvMemory::with_owners`], [`MvMemory::publish`]): a transaction's writes under keys
//!   of buckets that no other transaction wrote stay in the list its execution returned,
//!   not in the shards; the bucket's writer cell names the list, and a second writer of
//!   the bucket first moves the owner's entries of the bucket to the shards (module
//!   `owned`). `block-stm` keeps them for chunks of transactions.
//! * The delta sinks ([`parex_core::Vm::delta_sinks`]: the EVM's beneficiary, which every
//!   transaction credits, and wallets credited by many transfers) are not in a shard: each
//!   worker writes a lane of its own per sink, and a read merges the lanes (module
//!   `sink`; on fast storage).

mod owned;
mod sink;

use std::hash::{BuildHasher, Hash};
use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::atomic::{
    AtomicU32, AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
    Ordering::Release,
};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use alloy_primitives::map::DefaultHashBuilder;
use crossbeam::utils::{Backoff, CachePadded};
use hashbrown::HashTable;
use parex_core::{StorageError, TxIndex, Write};
use smallvec::SmallVec;

use self::owned::{Found, Owned};
use self::sink::Sink;
use crate::gather::{Block, Gather, gather_into};

/// The final values gathered from a memory's drains ([`MvMemory::drain_final_values`])
/// followed by those they kept apart for want of room, or the first failure.
pub fn append_parts<K, V>(
    mut values: Vec<(K, V)>,
    apart: Vec<Result<Vec<(K, V)>, StorageError>>,
) -> Result<Vec<(K, V)>, StorageError> {
    for part in apart {
        values.append(&mut part?);
    }
    Ok(values)
}

/// Pre-block values read from storage (or the failures to read them), each key once.
pub type CachedBases<K, V> = Vec<(K, Result<Option<V>, StorageError>)>;

/// Re-executions of one transaction are numbered from 0.
pub type Incarnation = u32;

/// Where a key's pre-block value stands (slow storage loads it at most once; fast
/// storage never caches it): a view of [`KeyState`]'s `base` and `loading`.
enum Base<'a, V> {
    Unloaded,
    /// A reader is loading it (outside the lock); others wait for it.
    Loading,
    Loaded(&'a Result<Option<V>, StorageError>),
}

/// What transaction `tx` left under a key.
#[derive(Clone, Debug)]
pub enum Entry<V, D> {
    Write(Incarnation, V),
    Delta(Incarnation, D),
    /// The writer was aborted; its next incarnation will likely write here again.
    Estimate,
}

/// Where a read got its value: what validation compares.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin<V> {
    /// The pre-block value (or the failure to load it), with no delta on top.
    Storage,
    /// The write of this transaction incarnation, with no delta on top.
    Version(TxIndex, Incarnation),
    /// A value resolved from deltas over a base: validated by resolving again (boxed to
    /// keep read sets small; deltas are rarely read).
    Resolved(Box<Option<V>>),
    /// Resolving deltas failed because the pre-block value could not be loaded.
    Failed,
}

/// The answer to a read.
pub enum Read<V> {
    /// The value (or the storage failure), and where it came from.
    Value(Result<Option<V>, StorageError>, Origin<V>),
    /// An estimate of transaction `blocking_tx` lies in the way.
    Blocked(TxIndex),
}

/// Outside the shard lock: loads `key`'s pre-block value if this caller claimed the
/// load, or else waits a little for the caller that did (`None`: look again).
fn load_or_wait<K, V>(
    must_load: bool,
    key: &K,
    load: &impl Fn(&K) -> Result<Option<V>, StorageError>,
    backoff: &Backoff,
) -> Option<Result<Option<V>, StorageError>> {
    if must_load {
        return Some(load(key));
    }
    if backoff.is_completed() {
        std::thread::sleep(Duration::from_micros(2));
    } else {
        backoff.snooze();
    }
    None
}

/// Cache-line aligned, and three lines for the EVM's types (189 bytes become 192): a
/// shard's states lie side by side and the next one is pushed by whichever worker writes
/// a new key, so an unaligned state shared its first and last lines with the states
/// around it, and two workers writing neighbouring states moved those lines between their
/// cores (ERC20 gigagas block on 2 threads, three batches of 6-8 alternating runs of each
/// binary: medians -3 to -8%). Every written key's state is memory touched for the first
/// time, so each line counts: the key's hash is not kept (a table that grows hashes its
/// keys again) and the pre-block value's state is a pointer and a flag, not an enum
/// (whose tag took a word of its own): 256 bytes became 192. In declared order (`C`):
/// Rust's own order put the flag after the last word.
#[repr(C, align(64))]
struct KeyState<K, V, D> {
    key: K,
    /// Sorted by transaction index, at most one entry per transaction; most keys have
    /// a single writer, whose entry is kept inline.
    versions: SmallVec<[(TxIndex, Entry<V, D>); 1]>,
    /// The pre-block value, once loaded (slow storage only; boxed: on fast storage it is
    /// never loaded, and the state stays small).
    base: Option<Box<Result<Option<V>, StorageError>>>,
    /// The highest transaction that read the key (kept on slow storage only, where every
    /// read finds or creates the key's state; see [`MvMemory::write`]). Four bytes, so
    /// that the state fits three lines; saturated at `u32::MAX`, read as "any transaction"
    /// (in blocks of four billion transactions, a write then re-validates more than it
    /// needs to).
    max_reader: u32,
    /// A reader is loading the pre-block value (outside the lock; see [`Base::Loading`]).
    loading: bool,
}

impl<K, V, D> KeyState<K, V, D> {
    /// A new key's state: no pre-block value, no reader yet.
    #[inline]
    fn new(key: K, versions: SmallVec<[(TxIndex, Entry<V, D>); 1]>) -> Self {
        Self {
            key,
            versions,
            base: None,
            max_reader: 0,
            loading: false,
        }
    }

    fn base(&self) -> Base<'_, V> {
        match &self.base {
            Some(base) => Base::Loaded(base),
            None if self.loading => Base::Loading,
            None => Base::Unloaded,
        }
    }

    fn set_base(&mut self, value: Result<Option<V>, StorageError>) {
        self.base = Some(Box::new(value));
        self.loading = false;
    }

    /// Whether this caller is to load the pre-block value (nobody is loading it yet: it
    /// is marked loading) or is to wait for the caller loading it.
    fn claim_load(&mut self) -> bool {
        match self.base() {
            Base::Unloaded => {
                self.loading = true;
                true
            }
            _ => false,
        }
    }
}

/// Versions of a key the search for a transaction's entry scans from the end before it
/// halves the rest.
const NEAR_END: usize = 32;

/// Where `tx`'s entry is in `versions` (sorted by transaction), or where it would go, as
/// [`slice::binary_search`] says. Entries come in roughly block order, so the place is
/// usually among the last few: they are scanned first. (A key written by every
/// transaction, the beneficiary's fee under `dag`, has tens of thousands of versions, and
/// halving them missed the cache at every step: `dag` on the raw-transfer gigagas block,
/// 2 threads, 106-110 ms before, 99-102 ms after.)
fn position<E>(versions: &[(TxIndex, E)], tx: TxIndex) -> Result<usize, usize> {
    let near = versions.len().saturating_sub(NEAR_END);
    match versions[near..].iter().rposition(|(t, _)| *t <= tx) {
        Some(i) if versions[near + i].0 == tx => Ok(near + i),
        Some(i) => Err(near + i + 1),
        None => versions[..near].binary_search_by_key(&tx, |(t, _)| *t),
    }
}

/// A shard's keys: their states side by side in insertion order, found through a hash
/// table of positions. The states are touched only as keys arrive (a table of the
/// states themselves, sized for the block, spread each insert over memory never used
/// before: faulting and zeroing it cost as much as the inserts), and the final values are
/// read from them in one pass.
struct Table<K, V, D> {
    positions: HashTable<u32>,
    states: Vec<KeyState<K, V, D>>,
    /// Hashes the keys again when the table of positions grows.
    hasher: DefaultHashBuilder,
}

impl<K: Eq + Hash + Clone, V, D> Table<K, V, D> {
    /// A table for about `keys` keys. The states get the capacity that the table of
    /// positions rounds `keys` up to (it keeps a power of two of buckets, a fifth or more
    /// of them spare): with a block's keys spread at random over the shards, sizing the
    /// states exactly made half of the shards grow, each copying its states once (ERC20
    /// gigagas block: 129 of 256 shards, 1% of the block's instructions). Capacity that
    /// is never written costs no memory.
    fn with_capacity(keys: usize, hasher: DefaultHashBuilder) -> Self {
        let positions = HashTable::with_capacity(keys);
        Self {
            states: Vec::with_capacity(positions.capacity()),
            positions,
            hasher,
        }
    }

    /// Where the state of `key` is, if the key is known.
    #[inline]
    fn position(&self, hash: u64, key: &K) -> Option<usize> {
        let states = &self.states;
        self.positions
            .find(hash, |&i| states[i as usize].key == *key)
            .map(|&i| i as usize)
    }

    #[inline]
    fn find(&self, hash: u64, key: &K) -> Option<&KeyState<K, V, D>> {
        self.position(hash, key).map(|i| &self.states[i])
    }

    #[inline]
    fn find_mut(&mut self, hash: u64, key: &K) -> Option<&mut KeyState<K, V, D>> {
        self.position(hash, key).map(|i| &mut self.states[i])
    }

    /// The state of `key`, created (with no versions) if the key is new.
    #[inline]
    fn state_mut(&mut self, hash: u64, key: &K) -> &mut KeyState<K, V, D> {
        let i = match self.position_or_vacant(hash, key) {
            Ok(i) => i,
            Err(next) => {
                self.states
                    .push(KeyState::new(key.clone(), SmallVec::new()));
                next
            }
        };
        &mut self.states[i]
    }

    /// Records `entry` of `tx` under `key` (replacing an entry of `tx`); returns the
    /// key's highest reader before the write (none, 0, for a new key). A new key's state
    /// is pushed complete and not read back: its lines are usually memory the block has
    /// not touched yet, and reading them back right after the copy waited for the copy to
    /// reach them (a third of the writes' time on the raw-transfer gigagas block).
    #[inline]
    fn write(&mut self, hash: u64, key: K, tx: TxIndex, entry: Entry<V, D>) -> u32 {
        match self.position_or_vacant(hash, &key) {
            Ok(i) => {
                let state = &mut self.states[i];
                let versions = &mut state.versions;
                // Writers come in roughly block order: look from the end first.
                match versions.last() {
                    Some((t, _)) if *t >= tx => match position(versions, tx) {
                        Ok(i) => versions[i].1 = entry,
                        Err(i) => versions.insert(i, (tx, entry)),
                    },
                    _ => versions.push((tx, entry)),
                }
                state.max_reader
            }
            Err(_) => {
                let versions = SmallVec::from_buf([(tx, entry)]);
                self.states.push(KeyState::new(key, versions));
                self.prefetch_next_state();
                0
            }
        }
    }

    /// Asks the CPU to fetch, for writing, the lines of the next state this table will
    /// push: the shard's next new key usually comes hundreds of writes later (keys land
    /// on shards at random), long enough for the lines to arrive, so that the push writes
    /// to cache instead of waiting for memory the block has not touched yet.
    #[inline]
    fn prefetch_next_state(&self) {
        #[cfg(target_arch = "x86_64")]
        if self.states.len() < self.states.capacity() {
            use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
            let next = self
                .states
                .as_ptr()
                .wrapping_add(self.states.len())
                .cast::<i8>();
            for line in (0..size_of::<KeyState<K, V, D>>()).step_by(64) {
                // SAFETY: a prefetch is only a hint: it reads nothing the program can
                // observe and never faults, whatever the address (here: the spare capacity
                // of `states`, inside its allocation). `sse`, which `_mm_prefetch` needs, is
                // part of every x86_64 target. Exercised by every test that writes a key
                // (`tables_grow_past_their_sizing_and_keep_every_key`: up to and past the
                // capacity).
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(next.wrapping_add(line)) };
            }
        }
    }

    /// The position of `key`'s state, or else (`Err`) the position its state is to be
    /// pushed at, already recorded in the table of positions.
    #[inline]
    fn position_or_vacant(&mut self, hash: u64, key: &K) -> Result<usize, usize> {
        let states = &self.states;
        let hasher = &self.hasher;
        let next = states.len();
        let position = self.positions.entry(
            hash,
            |&i| states[i as usize].key == *key,
            |&i| hasher.hash_one(&states[i as usize].key),
        );
        match position {
            hashbrown::hash_table::Entry::Occupied(e) => Ok(*e.get() as usize),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(u32::try_from(next).expect("fewer than 2^32 keys per shard"));
                Err(next)
            }
        }
    }

    fn len(&self) -> usize {
        self.states.len()
    }
}

type Shard<K, V, D> = CachePadded<Mutex<Table<K, V, D>>>;

/// A transaction's owner list (module `owned`), behind its lock.
type OwnerList<K, V, D> = Mutex<Owned<K, V, D>>;

/// The writers of a memory's keys by bucket (fast storage): a cell per bucket, `NONE`
/// until a transaction writes a key of the bucket, then that transaction (`tx + 1`),
/// then `MANY` once another one does. Cells only move forward (none, one, many), so a
/// cell that names `tx` or none after `tx` wrote proves that no other transaction has
/// an entry under any key of the bucket. Keys share a bucket by their hash's low bits:
/// a shared bucket only sends its keys down the shard path.
struct Writers {
    cells: Box<[AtomicU32]>,
}

impl Writers {
    const NONE: u32 = 0;
    const MANY: u32 = u32::MAX;
    /// With owner lists: another writer is moving the owner's entries of the bucket to
    /// the shards (module `owned`); the cell then says `MANY`.
    const MIGRATING: u32 = u32::MAX - 1;

    /// Cells for about `keys` keys: four per key (a written key shares its cell with
    /// another written one about one time in ten on the gigagas blocks), at least 1024,
    /// at most 2^20 (4 MiB).
    fn new(keys: usize) -> Self {
        let cells = (keys * 4).next_power_of_two().clamp(1 << 10, 1 << 20);
        Self {
            cells: (0..cells).map(|_| AtomicU32::new(Self::NONE)).collect(),
        }
    }

    /// The cell's value that stands for `tx` alone (`MANY` for the last two indices a
    /// `u32` can hold, which then never take the fast path).
    fn id(tx: TxIndex) -> u32 {
        u32::try_from(tx + 1)
            .ok()
            .filter(|&id| id < Self::MIGRATING)
            .unwrap_or(Self::MANY)
    }

    fn cell(&self, hash: u64) -> &AtomicU32 {
        &self.cells[self.bucket(hash)]
    }

    /// The bucket of keys of hash `hash`.
    fn bucket(&self, hash: u64) -> usize {
        hash as usize & (self.cells.len() - 1)
    }

    /// The cell of `hash`'s bucket once no writer is moving its entries (module `owned`).
    fn settled(&self, hash: u64) -> u32 {
        let cell = self.cell(hash);
        let backoff = Backoff::new();
        loop {
            match cell.load(Acquire) {
                Self::MIGRATING => backoff.snooze(),
                seen => return seen,
            }
        }
    }

    /// Records that `tx` writes a key of `hash`'s bucket (before its entry goes in).
    #[inline]
    fn mark(&self, hash: u64, tx: TxIndex) {
        let cell = self.cell(hash);
        let id = Self::id(tx);
        let seen = match cell.load(Acquire) {
            Self::NONE => match cell.compare_exchange(Self::NONE, id, AcqRel, Acquire) {
                Ok(_) => return,
                Err(seen) => seen,
            },
            seen => seen,
        };
        if seen != id && seen != Self::MANY {
            cell.store(Self::MANY, Release);
        }
    }

    /// Whether no transaction but `tx` has written a key of `hash`'s bucket.
    #[inline]
    fn none_but(&self, hash: u64, tx: TxIndex) -> bool {
        let id = Self::id(tx);
        match self.cell(hash).load(Acquire) {
            Self::NONE => true,
            seen => seen == id && id != Self::MANY,
        }
    }
}

pub struct MvMemory<K, V, D> {
    shards: Box<[Shard<K, V, D>]>,
    hasher: DefaultHashBuilder,
    /// Cache pre-block values in the keys' states (storage is slow); otherwise read them
    /// from storage whenever needed.
    cache_base: bool,
    /// The delta sinks, in lanes of their own (fast storage only; module `sink`).
    sinks: Vec<Sink<K, V, D>>,
    /// Who wrote the keys, by bucket (fast storage only; none on slow storage, where
    /// every read goes through the key's state to record its reader).
    writers: Option<Writers>,
    /// Per transaction, its writes under keys of buckets it alone wrote (module `owned`;
    /// fast storage, when the engine publishes whole incarnations: [`Self::with_owners`]).
    owners: Option<Box<[OwnerList<K, V, D>]>>,
}

/// Most delta sinks a memory keeps in lanes (each is looked for at every operation).
const MAX_SINKS: usize = 16;

/// Most shards a memory has; small blocks get fewer (creating shards is not free).
const MAX_SHARDS: usize = 256;

/// What a bucket's writer cell tells a read of a key ([`MvMemory::listed`]).
enum Listed<R> {
    /// No other transaction has an entry under the key below the reader.
    Unwritten,
    /// What the caller made of the entry in the owner's list.
    Entry(R),
    /// The shards hold the key's entries, if any.
    InShards,
}

/// Where the walk down from a read position stopped.
enum Bottom {
    /// A write at this position of `versions`.
    Write(usize),
    /// The pre-block value.
    Storage,
    Blocked(TxIndex),
}

/// Walks down from the entries below position `end` of `versions`; returns where it
/// stopped and the position of the lowest delta that lies above that (`end` if none).
fn walk<V, D>(versions: &[(TxIndex, Entry<V, D>)], end: usize) -> (Bottom, usize) {
    let mut first_delta = end;
    for i in (0..end).rev() {
        match &versions[i].1 {
            Entry::Write(..) => return (Bottom::Write(i), first_delta),
            Entry::Delta(..) => first_delta = i,
            Entry::Estimate => return (Bottom::Blocked(versions[i].0), first_delta),
        }
    }
    (Bottom::Storage, first_delta)
}

/// The answer to a read that reached the write `versions[i]` (the deltas
/// `versions[first_delta..end]` above it applied, if any).
fn resolve_over_write<K, V: Clone, D>(
    key: &K,
    versions: &[(TxIndex, Entry<V, D>)],
    i: usize,
    first_delta: usize,
    end: usize,
    apply: &impl Fn(&K, Option<V>, &D) -> Option<V>,
) -> Read<V> {
    let Entry::Write(incarnation, value) = &versions[i].1 else {
        unreachable!("the walk stops at writes")
    };
    if first_delta == end {
        let origin = Origin::Version(versions[i].0, *incarnation);
        return Read::Value(Ok(Some(value.clone())), origin);
    }
    let v = apply_deltas(key, versions, first_delta, end, Some(value.clone()), apply);
    Read::Value(Ok(v.clone()), Origin::Resolved(Box::new(v)))
}

/// The answer to a read that reached the pre-block value `base` (the deltas
/// `versions[first_delta..end]` above it applied, if any).
fn resolve_over_storage<K, V: Clone, D>(
    key: &K,
    versions: &[(TxIndex, Entry<V, D>)],
    first_delta: usize,
    end: usize,
    base: Result<Option<V>, StorageError>,
    apply: &impl Fn(&K, Option<V>, &D) -> Option<V>,
) -> Read<V> {
    let resolved = first_delta != end;
    match base {
        Err(e) if resolved => Read::Value(Err(e), Origin::Failed),
        Err(e) => Read::Value(Err(e), Origin::Storage),
        Ok(v) if !resolved => Read::Value(Ok(v), Origin::Storage),
        Ok(v) => {
            let v = apply_deltas(key, versions, first_delta, end, v, apply);
            Read::Value(Ok(v.clone()), Origin::Resolved(Box::new(v)))
        }
    }
}

/// `deltas` merged into one (`merge`: applying the result equals applying them in
/// turn), or `None` if there are none. A final value with many deltas (a block's fee
/// credits to its beneficiary) is then one application instead of one per delta: each
/// moves the whole value in and out, and 1346 of them took a third of 14396881's drains.
pub(crate) fn merged<'d, D: Clone + 'd>(
    deltas: impl IntoIterator<Item = &'d D>,
    merge: &impl Fn(&mut D, &D),
) -> Option<D> {
    let mut deltas = deltas.into_iter();
    let mut sum = deltas.next()?.clone();
    for delta in deltas {
        merge(&mut sum, delta);
    }
    Some(sum)
}

/// Applies the deltas `versions[from..end]` in order on top of `value`.
fn apply_deltas<K, V, D>(
    key: &K,
    versions: &[(TxIndex, Entry<V, D>)],
    from: usize,
    end: usize,
    mut value: Option<V>,
    apply: &impl Fn(&K, Option<V>, &D) -> Option<V>,
) -> Option<V> {
    for (_, entry) in &versions[from..end] {
        match entry {
            Entry::Delta(_, d) => value = apply(key, value, d),
            _ => unreachable!("only deltas lie above the base"),
        }
    }
    value
}

impl<K, V, D> MvMemory<K, V, D>
where
    K: Eq + Hash + Clone + Send + Sync,
    V: Clone + PartialEq + Send,
    D: Clone + Send,
{
    /// An empty memory, sized for about `keys` keys, over storage whose reads are slow
    /// (`slow_storage`: loaded outside the shard locks) or fast. A shard per 64 expected
    /// keys (a power of two, up to `MAX_SHARDS`): each costs two allocations up front,
    /// and with one per 16 a block of 1346 transactions spent 31 us creating 256 of them
    /// (1.5% of its time), before any worker started.
    pub fn new(keys: usize, slow_storage: bool) -> Self {
        let shards = (keys / 64).next_power_of_two().clamp(1, MAX_SHARDS);
        let per_shard = keys.div_ceil(shards);
        let hasher = DefaultHashBuilder::default();
        Self {
            shards: (0..shards)
                .map(|_| {
                    let table = Table::with_capacity(per_shard, hasher.clone());
                    CachePadded::new(Mutex::new(table))
                })
                .collect(),
            hasher,
            cache_base: slow_storage,
            sinks: Vec::new(),
            writers: (!slow_storage).then(|| Writers::new(keys)),
            owners: None,
        }
    }

    /// Keeps the writes of each of `txs` transactions under keys of buckets it alone
    /// wrote in a list of its own instead of the shards (module `owned`), on fast storage;
    /// the engine then publishes each incarnation's writes with [`Self::publish`]
    /// (per-key [`Self::write`] still files its entry in the shards). Otherwise the
    /// memory is unchanged.
    pub fn with_owners(mut self, txs: usize) -> Self {
        if self.writers.is_some() {
            self.owners = Some((0..txs).map(|_| Mutex::default()).collect());
        }
        self
    }

    /// The memory with `cells` writer cells (a power of two) instead of its sizing's, so
    /// that tests can make keys share buckets.
    #[cfg(test)]
    fn with_writer_cells(mut self, cells: usize) -> Self {
        if self.writers.is_some() {
            self.writers = Some(Writers {
                cells: (0..cells).map(|_| AtomicU32::new(Writers::NONE)).collect(),
            });
        }
        self
    }

    /// Whether writes are published whole ([`Self::with_owners`] on fast storage).
    pub fn owns_writes(&self) -> bool {
        self.owners.is_some()
    }

    /// Makes `hash`'s bucket `tx`'s own if nobody else wrote it (module `owned`); returns
    /// whether it is `tx`'s alone. A bucket another transaction owns is shared: its
    /// entries move to the shards ([`Self::share_bucket`]).
    fn claim_bucket(
        &self,
        writers: &Writers,
        owners: &[OwnerList<K, V, D>],
        hash: u64,
        tx: TxIndex,
    ) -> bool {
        let id = Writers::id(tx);
        let cell = writers.cell(hash);
        let backoff = Backoff::new();
        loop {
            match cell.load(Acquire) {
                seen if seen == id && id != Writers::MANY => return true,
                Writers::NONE if id != Writers::MANY => {
                    if cell
                        .compare_exchange(Writers::NONE, id, AcqRel, Acquire)
                        .is_ok()
                    {
                        return true;
                    }
                }
                Writers::MANY => return false,
                Writers::MIGRATING => backoff.snooze(),
                _ => {
                    self.share_bucket(writers, owners, hash);
                    return false;
                }
            }
        }
    }

    /// Makes `hash`'s bucket one of many writers: the entries its owner, if any, keeps in
    /// its list are moved to the shards first (the cell says `MIGRATING` meanwhile).
    fn share_bucket(&self, writers: &Writers, owners: &[OwnerList<K, V, D>], hash: u64) {
        let cell = writers.cell(hash);
        let backoff = Backoff::new();
        loop {
            match cell.load(Acquire) {
                Writers::MANY => return,
                Writers::MIGRATING => backoff.snooze(),
                Writers::NONE => {
                    if cell
                        .compare_exchange(Writers::NONE, Writers::MANY, AcqRel, Acquire)
                        .is_ok()
                    {
                        return;
                    }
                }
                owner => {
                    if cell
                        .compare_exchange(owner, Writers::MIGRATING, AcqRel, Acquire)
                        .is_ok()
                    {
                        self.migrate(writers, owners, hash, owner as TxIndex - 1);
                        cell.store(Writers::MANY, Release);
                        return;
                    }
                }
            }
        }
    }

    /// Files in the shards the entries that `owner` keeps in its list under keys of
    /// `hash`'s bucket (whose cell the caller marked migrating).
    fn migrate(&self, writers: &Writers, owners: &[OwnerList<K, V, D>], hash: u64, owner: TxIndex) {
        let bucket = writers.bucket(hash);
        let mut list = lock_list(owners, owner);
        for i in 0..list.writes.len() {
            let hash = list.hashes[i];
            if list.elsewhere[i] || writers.bucket(hash) != bucket {
                continue;
            }
            self.file_in_shards(&mut list, i, owner);
        }
    }

    /// Files write `i` of `list`, transaction `tx`'s, in the shards, and flags it in the
    /// list as filed elsewhere.
    fn file_in_shards(&self, list: &mut Owned<K, V, D>, i: usize, tx: TxIndex) {
        list.elsewhere[i] = true;
        let hash = list.hashes[i];
        let key = list.writes[i].0.clone();
        self.shard(hash).write(hash, key, tx, list.entry(i));
    }

    /// Publishes the writes of `tx`'s `incarnation` whole (with [`Self::with_owners`]):
    /// a delta sink's goes to its lanes (`writer`: the writing worker), the others stay in
    /// `tx`'s list, which replaces the previous incarnation's; those under keys of buckets
    /// that are not `tx`'s alone are also filed in the shards. The caller removes the
    /// entries of keys the previous incarnation wrote and this one does not
    /// ([`Self::remove`]).
    pub fn publish(
        &self,
        tx: TxIndex,
        incarnation: Incarnation,
        writes: Vec<(K, Write<V, D>)>,
        writer: usize,
    ) {
        let (Some(writers), Some(owners)) = (&self.writers, &self.owners) else {
            unreachable!("publishing needs owner lists");
        };
        let mut hashes = Vec::with_capacity(writes.len());
        let mut elsewhere = Vec::with_capacity(writes.len());
        for (key, write) in &writes {
            let hash = self.hasher.hash_one(key);
            hashes.push(hash);
            if let Some(sink) = self.sink_of(hash, key) {
                sink.write(writer, tx, owned::entry_of(incarnation, false, write));
                elsewhere.push(true);
            } else {
                self.claim_bucket(writers, owners, hash, tx);
                elsewhere.push(false);
            }
        }
        let id = Writers::id(tx);
        let mut list = lock_list(owners, tx);
        let previous = std::mem::replace(
            &mut *list,
            Owned {
                incarnation,
                aborted: false,
                writes,
                hashes,
                elsewhere,
            },
        );
        // A bucket shared since it was claimed (or never this transaction's): its owner's
        // entries are in the shards, so must this one be. (A migration that waits for
        // this list finds these flagged and moves the rest.)
        for i in 0..list.writes.len() {
            let hash = list.hashes[i];
            if list.elsewhere[i] || (id != Writers::MANY && writers.cell(hash).load(Acquire) == id)
            {
                continue;
            }
            self.file_in_shards(&mut list, i, tx);
        }
        drop(list);
        drop(previous);
    }

    /// Keeps the entries of each of `sinks` ([`parex_core::Vm::delta_sinks`], keys many
    /// transactions send a delta to; the first `MAX_SINKS`) in one lane per writer,
    /// `writers` of them, instead of a shard (module `sink`); a lane, once written, has
    /// room for its share of the block's `units` (transactions, or the chunks that
    /// execute them). Only on fast storage (slow storage caches pre-block values in the
    /// shards' key states); otherwise, and with no sinks, the memory is unchanged.
    pub fn with_sinks(mut self, sinks: Vec<K>, writers: usize, units: usize) -> Self {
        if !self.cache_base {
            for key in sinks.into_iter().take(MAX_SINKS) {
                let hash = self.hasher.hash_one(&key);
                if self.sink_of(hash, &key).is_none() {
                    self.sinks.push(Sink::new(key, hash, writers, units));
                }
            }
        }
        self
    }

    /// The sink, if `key` (of hash `hash`) is it.
    #[inline]
    fn sink_of(&self, hash: u64, key: &K) -> Option<&Sink<K, V, D>> {
        self.sinks
            .iter()
            .find(|sink| sink.hash == hash && sink.key == *key)
    }

    #[inline]
    fn shard(&self, hash: u64) -> MutexGuard<'_, Table<K, V, D>> {
        // The table takes bucket positions from the low bits of the hash and tags from
        // the top 7: pick the shard with bits in between, so as to skew neither.
        let shard = &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether no transaction but `tx` has written a key of `hash`'s bucket, as the writer
    /// cells tell ([`Writers`]; never on slow storage, which keeps none).
    #[inline]
    fn only_writer(&self, hash: u64, tx: TxIndex) -> bool {
        self.writers
            .as_ref()
            .is_some_and(|writers| writers.none_but(hash, tx))
    }

    /// The hash this memory files `key` under (for [`Self::read_hashed`] and
    /// [`Self::validate_hashed`], so that a read set kept with its hashes is validated
    /// without hashing its keys again).
    #[inline]
    pub fn hash(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The value of `key` as transaction `tx` sees it. `load` reads the pre-block value
    /// (on slow storage at most once per key, without holding a lock), `apply` applies a
    /// delta.
    pub fn read(
        &self,
        key: &K,
        tx: TxIndex,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> Read<V> {
        self.read_hashed(key, self.hash(key), tx, load, apply)
    }

    /// [`Self::read`] of `key` whose [`Self::hash`] is `hash`.
    pub fn read_hashed(
        &self,
        key: &K,
        hash: u64,
        tx: TxIndex,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> Read<V> {
        if let Some(sink) = self.sink_of(hash, key) {
            return sink.read(tx, || load(key), |v, d| apply(key, v, d));
        }
        if !self.cache_base {
            return self.read_uncached(key, hash, tx, load, apply);
        }
        self.with_base(key, hash, load, |state| {
            let reader = u32::try_from(tx).unwrap_or(u32::MAX);
            state.max_reader = state.max_reader.max(reader);
            let versions = &state.versions;
            let end = versions.partition_point(|(t, _)| *t < tx);
            let (bottom, first_delta) = walk(versions, end);
            match bottom {
                Bottom::Blocked(t) => Break(Read::Blocked(t)),
                Bottom::Write(i) => Break(resolve_over_write(
                    key,
                    versions,
                    i,
                    first_delta,
                    end,
                    &apply,
                )),
                Bottom::Storage => match state.base() {
                    Base::Loaded(base) => Break(resolve_over_storage(
                        key,
                        versions,
                        first_delta,
                        end,
                        base.clone(),
                        &apply,
                    )),
                    Base::Loading | Base::Unloaded => Continue(state.claim_load()),
                },
            }
        })
    }

    /// Runs `step` on `key`'s state under its shard lock (slow storage) until it answers
    /// (`Break`); `Continue(true)` means it claimed the pre-block value's load, which is
    /// then done outside the lock, `Continue(false)` that another caller is loading it,
    /// which is then waited for a little; either way `step` runs again.
    fn with_base<R>(
        &self,
        key: &K,
        hash: u64,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        mut step: impl FnMut(&mut KeyState<K, V, D>) -> ControlFlow<R, bool>,
    ) -> R {
        let mut loaded = None;
        let backoff = Backoff::new();
        loop {
            let must_load = {
                let mut table = self.shard(hash);
                let state = table.state_mut(hash, key);
                // The pre-block value this caller just loaded, stored under the lock.
                if let Some(value) = loaded.take() {
                    state.set_base(value);
                }
                match step(state) {
                    Break(answer) => return answer,
                    Continue(must_load) => must_load,
                }
            };
            loaded = load_or_wait(must_load, key, &load, &backoff);
        }
    }

    /// The pre-block value of `key`: on slow storage through the key's cached base (loaded
    /// at most once, outside the lock; a load in progress is waited for), on fast storage
    /// straight from `load`. No transaction read the key, so no reader is recorded:
    /// loading ahead of the transactions that will read a key changes nothing they see.
    pub fn pre_block(
        &self,
        key: &K,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
    ) -> Result<Option<V>, StorageError> {
        if !self.cache_base {
            return load(key);
        }
        let hash = self.hasher.hash_one(key);
        self.with_base(key, hash, load, |state| match state.base() {
            Base::Loaded(base) => Break(base.clone()),
            Base::Loading | Base::Unloaded => Continue(state.claim_load()),
        })
    }

    /// The cached pre-block value of `key`, if it is loaded (slow storage); `None` if it
    /// is not (or is being loaded), without waiting or loading. Records no reader.
    pub fn cached_base(&self, key: &K) -> Option<Result<Option<V>, StorageError>> {
        if !self.cache_base {
            return None;
        }
        let hash = self.hasher.hash_one(key);
        match self.shard(hash).find(hash, key)?.base() {
            Base::Loaded(base) => Some(base.clone()),
            Base::Loading | Base::Unloaded => None,
        }
    }

    /// Caches the pre-block values of `keys` (slow storage; distinct keys): those that
    /// nobody has loaded or is loading are claimed and read together, outside the locks,
    /// by one call of `read_many` (which returns their values in order); loads by others
    /// are then waited for. Returns how many keys this call read. Like [`Self::pre_block`],
    /// it records no reader: pre-block values never change, so loading them early
    /// changes nothing any transaction sees.
    pub fn preload(
        &self,
        keys: &[K],
        read_many: impl FnOnce(&[K]) -> Vec<Result<Option<V>, StorageError>>,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
    ) -> usize {
        if !self.cache_base {
            return 0;
        }
        let mut claimed = Vec::new();
        let mut claimed_hashes = Vec::new();
        let mut others = Vec::new();
        for key in keys {
            let hash = self.hasher.hash_one(key);
            let mut table = self.shard(hash);
            let state = table.state_mut(hash, key);
            match state.base() {
                Base::Loaded(_) => {}
                Base::Loading => others.push((key, hash)),
                Base::Unloaded => {
                    state.claim_load();
                    claimed.push(key.clone());
                    claimed_hashes.push(hash);
                }
            }
        }
        if !claimed.is_empty() {
            let values = read_many(&claimed);
            assert_eq!(values.len(), claimed.len(), "one value per key read");
            for ((key, hash), value) in claimed.iter().zip(claimed_hashes).zip(values) {
                self.shard(hash).state_mut(hash, key).set_base(value);
            }
        }
        for (key, hash) in others {
            self.with_base(key, hash, &load, |state| match state.base() {
                Base::Loaded(_) => Break(()),
                Base::Loading | Base::Unloaded => Continue(state.claim_load()),
            });
        }
        claimed.len()
    }

    /// The shards' tables, out of their locks.
    fn into_tables(self) -> impl Iterator<Item = Table<K, V, D>> {
        self.shards.into_vec().into_iter().map(|shard| {
            shard
                .into_inner()
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
        })
    }

    /// The pre-block values this memory has cached (slow storage), each key once.
    pub fn into_cached_bases(self) -> CachedBases<K, V> {
        self.into_tables()
            .flat_map(|table| table.states)
            .filter_map(|state| Some((state.key, *state.base?)))
            .collect()
    }

    /// Caches `bases` as the pre-block values of their keys (slow storage): values read
    /// before this memory existed (by a discovery pass), so that nobody reads them again.
    pub fn seed_bases(&self, bases: CachedBases<K, V>) {
        if !self.cache_base {
            return;
        }
        for (key, value) in bases {
            let hash = self.hasher.hash_one(&key);
            let mut table = self.shard(hash);
            let state = table.state_mut(hash, &key);
            if let Base::Unloaded = state.base() {
                state.set_base(value);
            }
        }
    }

    /// What the writer cell of `key`'s bucket (of hash `hash`) tells a read or validation
    /// by `tx` on fast storage: that no other transaction has an entry under the key below
    /// `tx`, or the answer of `entry` to the entry in its owner's list (owner, incarnation,
    /// aborted, write; called under the list's lock), or that the shards must be asked.
    fn listed<R>(
        &self,
        key: &K,
        hash: u64,
        tx: TxIndex,
        entry: impl FnOnce(TxIndex, Incarnation, bool, &Write<V, D>) -> R,
    ) -> Listed<R> {
        let (Some(writers), Some(owners)) = (&self.writers, &self.owners) else {
            return if self.only_writer(hash, tx) {
                Listed::Unwritten
            } else {
                Listed::InShards
            };
        };
        loop {
            let owner = match writers.settled(hash) {
                Writers::NONE => return Listed::Unwritten,
                Writers::MANY => return Listed::InShards,
                owner => owner as TxIndex - 1,
            };
            if owner >= tx {
                return Listed::Unwritten;
            }
            let list = lock_list(owners, owner);
            return match list.find(key, hash) {
                Found::Nothing => Listed::Unwritten,
                // Moved to the shards since the cell was read: it now says so.
                Found::Moved => continue,
                Found::Entry(incarnation, aborted, write) => {
                    Listed::Entry(entry(owner, incarnation, aborted, write))
                }
            };
        }
    }

    /// A read on fast storage: [`Self::read`] with nothing cached or inserted.
    fn read_uncached(
        &self,
        key: &K,
        hash: u64,
        tx: TxIndex,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> Read<V> {
        let listed = self.listed(
            key,
            hash,
            tx,
            |owner, incarnation, aborted, write| match write {
                _ if aborted => Read::Blocked(owner),
                Write::Put(value) => {
                    Read::Value(Ok(Some(value.clone())), Origin::Version(owner, incarnation))
                }
                Write::Delta(delta) => match load(key) {
                    Err(e) => Read::Value(Err(e), Origin::Failed),
                    Ok(base) => {
                        let v = apply(key, base, delta);
                        Read::Value(Ok(v.clone()), Origin::Resolved(Box::new(v)))
                    }
                },
            },
        );
        match listed {
            Listed::Unwritten => return Read::Value(load(key), Origin::Storage),
            Listed::Entry(read) => return read,
            Listed::InShards => {}
        }
        let table = self.shard(hash);
        let Some(state) = table.find(hash, key) else {
            drop(table);
            return Read::Value(load(key), Origin::Storage);
        };
        let versions = &state.versions;
        let end = versions.partition_point(|(t, _)| *t < tx);
        let (bottom, first_delta) = walk(versions, end);
        let resolved = first_delta != end;
        match bottom {
            Bottom::Blocked(t) => Read::Blocked(t),
            Bottom::Write(i) => resolve_over_write(key, versions, i, first_delta, end, &apply),
            Bottom::Storage if !resolved => {
                drop(table);
                Read::Value(load(key), Origin::Storage)
            }
            Bottom::Storage => {
                resolve_over_storage(key, versions, first_delta, end, load(key), &apply)
            }
        }
    }

    /// The pre-block value of a key whose read validation must resolve again: the
    /// cached one on slow storage (`None` if there is none: the recorded read resolved
    /// over a write since removed), loaded again on fast storage.
    fn base_for_validation(
        &self,
        state: &KeyState<K, V, D>,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
    ) -> Option<Result<Option<V>, StorageError>> {
        if !self.cache_base {
            return Some(load(&state.key));
        }
        state.base.as_deref().cloned()
    }

    /// Whether a read of `key` by `tx` would still get what `origin` records. `load`
    /// reads the pre-block value (on fast storage, where it is not cached).
    pub fn validate(
        &self,
        key: &K,
        tx: TxIndex,
        origin: &Origin<V>,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> bool {
        self.validate_hashed(key, self.hash(key), tx, origin, load, apply)
    }

    /// [`Self::validate`] of `key` whose [`Self::hash`] is `hash`.
    pub fn validate_hashed(
        &self,
        key: &K,
        hash: u64,
        tx: TxIndex,
        origin: &Origin<V>,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> bool {
        if let Some(sink) = self.sink_of(hash, key) {
            return sink.validate(tx, origin, || load(key), |v, d| apply(key, v, d));
        }
        let listed = self.listed(
            key,
            hash,
            tx,
            |owner, incarnation, aborted, write| match write {
                _ if aborted => false,
                Write::Put(_) => *origin == Origin::Version(owner, incarnation),
                Write::Delta(delta) => match (origin, load(key)) {
                    (Origin::Resolved(seen), Ok(base)) => apply(key, base, delta) == **seen,
                    (Origin::Failed, Err(_)) => true,
                    _ => false,
                },
            },
        );
        match listed {
            // No other transaction's entry under the key: the pre-block value, as read.
            Listed::Unwritten => return matches!(origin, Origin::Storage),
            Listed::Entry(valid) => return valid,
            Listed::InShards => {}
        }
        let table = self.shard(hash);
        let Some(state) = table.find(hash, key) else {
            // Nothing was ever written: the pre-block value.
            return matches!(origin, Origin::Storage);
        };
        let versions = &state.versions;
        let end = versions.partition_point(|(t, _)| *t < tx);
        let (bottom, first_delta) = walk(versions, end);
        let resolved = first_delta != end;
        match (bottom, origin) {
            (Bottom::Blocked(_), _) => false,
            (Bottom::Write(i), Origin::Version(t, inc)) if !resolved => {
                matches!(&versions[i], (wt, Entry::Write(wi, _)) if wt == t && wi == inc)
            }
            (Bottom::Storage, Origin::Storage) => !resolved,
            (Bottom::Write(i), Origin::Resolved(seen)) if resolved => {
                let Entry::Write(_, value) = &versions[i].1 else {
                    unreachable!()
                };
                apply_deltas(key, versions, first_delta, end, Some(value.clone()), &apply) == **seen
            }
            (Bottom::Storage, Origin::Resolved(seen)) if resolved => {
                match self.base_for_validation(state, load) {
                    Some(Ok(v)) => {
                        apply_deltas(key, versions, first_delta, end, v, &apply) == **seen
                    }
                    _ => false,
                }
            }
            (Bottom::Storage, Origin::Failed) => {
                resolved && matches!(self.base_for_validation(state, load), Some(Err(_)))
            }
            _ => false,
        }
    }

    /// Records the write of `tx` (incarnation of a `Write`) under `key`, replacing the
    /// entry of its previous incarnation. Returns whether a later transaction may already
    /// have read the key (and so read past this write): on slow storage, whether one has
    /// (reads and writes of a key are ordered by its shard lock, so a reader not seen
    /// here reads after the write and sees it); on fast storage, where reads of unwritten
    /// keys leave no trace, always.
    /// `writer` is the writing worker's index (the sink keeps a lane per worker).
    pub fn write(&self, key: K, tx: TxIndex, entry: Entry<V, D>, writer: usize) -> bool {
        let hash = self.hasher.hash_one(&key);
        if let Some(sink) = self.sink_of(hash, &key) {
            sink.write(writer, tx, entry);
            return true;
        }
        match (&self.writers, &self.owners) {
            (Some(writers), Some(owners)) => self.share_bucket(writers, owners, hash),
            (Some(writers), None) => writers.mark(hash, tx),
            _ => {}
        }
        let max_reader = self.shard(hash).write(hash, key, tx, entry);
        !self.cache_base || (max_reader == u32::MAX || max_reader as TxIndex > tx)
    }

    /// Removes the entry of `tx` under `key` (its new incarnation no longer writes it).
    pub fn remove(&self, key: &K, tx: TxIndex) {
        let hash = self.hasher.hash_one(key);
        if let Some(sink) = self.sink_of(hash, key) {
            return sink.remove(tx);
        }
        let mut table = self.shard(hash);
        if let Some(state) = table.find_mut(hash, key)
            && let Ok(i) = position(&state.versions, tx)
        {
            state.versions.remove(i);
        }
    }

    /// Turns the entry of `tx` under `key` into an estimate (its incarnation aborted).
    pub fn mark_estimate(&self, key: &K, tx: TxIndex) {
        let hash = self.hasher.hash_one(key);
        if let Some(sink) = self.sink_of(hash, key) {
            return sink.mark_estimate(tx);
        }
        if let Some(owners) = &self.owners {
            lock_list(owners, tx).aborted = true;
        }
        let mut table = self.shard(hash);
        if let Some(state) = table.find_mut(hash, key)
            && let Ok(i) = position(&state.versions, tx)
        {
            state.versions[i].1 = Entry::Estimate;
        }
    }

    /// The final value of every key some transaction wrote, in no particular order: the
    /// last write with the deltas above it applied, or the pre-block value with all the
    /// deltas applied. Keys whose final value is "absent" are left out, as serial
    /// execution does. Shards are resolved (and freed) on `threads` threads.
    pub fn into_final_values(
        self,
        threads: usize,
        load: impl Fn(&K) -> Result<Option<V>, StorageError> + Sync,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V> + Sync,
        merge: impl Fn(&mut D, &D) + Sync,
    ) -> Result<Vec<(K, V)>, StorageError> {
        let threads = threads.clamp(1, self.shards.len());
        let next = AtomicUsize::new(0);
        let mut values = Vec::new();
        let room = self.keys();
        let apart = gather_into(&mut values, room, |out| {
            std::thread::scope(|scope| {
                let drain = || self.drain_final_values(&next, out, &load, &apply, &merge);
                let handles: Vec<_> = (1..threads).map(|_| scope.spawn(drain)).collect();
                let mut apart = vec![drain()];
                apart.extend(
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                );
                apart
            })
        });
        append_parts(values, apart)
    }

    /// How many keys the memory holds (an upper bound of its final values), counted under
    /// each shard's lock in turn (and each owner list's).
    pub fn keys(&self) -> usize {
        let in_shards: usize = self
            .shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum();
        let in_lists: usize = self.owners.as_deref().map_or(0, |owners| {
            (0..owners.len())
                .map(|tx| {
                    lock_list(owners, tx)
                        .elsewhere
                        .iter()
                        .filter(|e| !**e)
                        .count()
                })
                .sum()
        });
        in_shards + self.sinks.len() + in_lists
    }

    /// The final values of the keys that the owner lists of drain claim `claim` keep (a
    /// transaction's list holds the only writes under them: the last write, or a delta
    /// over the pre-block value), moved into a block of `out` (or `apart`).
    fn drain_lists(
        &self,
        owners: &[OwnerList<K, V, D>],
        claim: usize,
        out: &Gather<'_, (K, V)>,
        apart: &mut Vec<(K, V)>,
        load: &impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: &impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> Result<(), StorageError> {
        let lists: Vec<Owned<K, V, D>> = owned::claimed(claim, owners.len())
            .map(|tx| std::mem::take(&mut *lock_list(owners, tx)))
            .collect();
        let room = lists
            .iter()
            .map(|list| list.elsewhere.iter().filter(|e| !**e).count())
            .sum();
        let mut block = out.block(room);
        for list in lists {
            debug_assert!(!list.aborted, "an aborted incarnation left at the end");
            for ((key, write), elsewhere) in list.writes.into_iter().zip(list.elsewhere) {
                if elsewhere {
                    continue;
                }
                let value = match write {
                    Write::Put(value) => Some(value),
                    Write::Delta(delta) => apply(&key, load(&key)?, &delta),
                };
                if let Some(value) = value {
                    push_or_keep_apart(&mut block, apart, (key, value));
                }
            }
        }
        Ok(())
    }

    /// [`Self::into_final_values`] shared by any number of callers, once no transaction
    /// runs any more: each takes shards (`SHARDS_PER_CLAIM` at a time) and the sinks
    /// through `next` (a counter from 0, the same for all of them) until none is left, and
    /// moves the final values of the keys of those it took into blocks of `out` (one per
    /// claim), freeing their tables.
    /// Returns the values that found no room in `out`. (Workers that finish a block
    /// resolve it side by side, on threads that are already running.)
    pub fn drain_final_values(
        &self,
        next: &AtomicUsize,
        out: &Gather<'_, (K, V)>,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
        merge: impl Fn(&mut D, &D),
    ) -> Result<Vec<(K, V)>, StorageError> {
        let mut apart = Vec::new();
        let batches = self.shards.len().div_ceil(SHARDS_PER_CLAIM);
        loop {
            let claim = next.fetch_add(1, Relaxed);
            if claim >= batches + self.sinks.len() {
                let Some(owners) = &self.owners else {
                    return Ok(apart);
                };
                let lists = claim - batches - self.sinks.len();
                if lists >= owned::claims(owners.len()) {
                    return Ok(apart);
                }
                self.drain_lists(owners, lists, out, &mut apart, &load, &apply)?;
                continue;
            }
            if claim >= batches {
                let sink = &self.sinks[claim - batches];
                let key = &sink.key;
                if let Some(Some(value)) =
                    sink.final_value(|| load(key), |v, d| apply(key, v, d), &merge)?
                {
                    push_or_keep_apart(&mut out.block(1), &mut apart, (key.clone(), value));
                }
                continue;
            }
            let first = claim * SHARDS_PER_CLAIM;
            let shards = &self.shards[first..(first + SHARDS_PER_CLAIM).min(self.shards.len())];
            let tables: SmallVec<[Table<K, V, D>; SHARDS_PER_CLAIM]> = shards
                .iter()
                .map(|shard| {
                    let mut table = shard.lock().unwrap_or_else(|e| e.into_inner());
                    let empty = Table::with_capacity(0, self.hasher.clone());
                    std::mem::replace(&mut *table, empty)
                })
                .collect();
            let mut block = out.block(tables.iter().map(Table::len).sum());
            for table in tables {
                for state in table.states {
                    let KeyState {
                        key,
                        mut versions,
                        base,
                        ..
                    } = state;
                    if versions.is_empty() {
                        continue;
                    }
                    let end = versions.len();
                    let (bottom, first_delta) = walk(&versions, end);
                    let base = match bottom {
                        // Moved out: the entry is not read again.
                        Bottom::Write(i) => {
                            match std::mem::replace(&mut versions[i].1, Entry::Estimate) {
                                Entry::Write(_, v) => Some(v),
                                _ => unreachable!(),
                            }
                        }
                        Bottom::Storage => match base {
                            Some(loaded) => (*loaded)?,
                            None => load(&key)?,
                        },
                        Bottom::Blocked(t) => {
                            unreachable!("estimate of transaction {t} left at the end")
                        }
                    };
                    let deltas = versions[first_delta..end]
                        .iter()
                        .map(|(_, entry)| match entry {
                            Entry::Delta(_, d) => d,
                            _ => unreachable!("only deltas lie above the base"),
                        });
                    let value = match merged(deltas, &merge) {
                        Some(delta) => apply(&key, base, &delta),
                        None => base,
                    };
                    if let Some(v) = value {
                        push_or_keep_apart(&mut block, &mut apart, (key, v));
                    }
                }
            }
        }
    }
}

/// Shards a drain takes at a time ([`MvMemory::drain_final_values`]), with one block of
/// the gathered vector for their keys: a block per shard, on a block of 1346 light
/// transactions (256 shards), spent a quarter of the drains' time on the two workers'
/// turns at the gather's locks.
const SHARDS_PER_CLAIM: usize = 8;

/// The owner list of `tx` (module `owned`), locked.
fn lock_list<K, V, D>(
    owners: &[OwnerList<K, V, D>],
    tx: TxIndex,
) -> MutexGuard<'_, Owned<K, V, D>> {
    owners[tx].lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves `value` into `block`, or into `apart` if there is no block (no room was left).
#[inline]
fn push_or_keep_apart<T>(block: &mut Option<Block<'_, '_, T>>, apart: &mut Vec<T>, value: T) {
    let value = match block {
        Some(block) => match block.push(value) {
            Ok(()) => return,
            Err(value) => value,
        },
        None => value,
    };
    apart.push(value);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The search from the end answers as a binary search does, near the end or not.
        #[test]
        fn position_is_a_binary_search(
            txs in prop::collection::btree_set(0usize..400, 0..120),
            tx in 0usize..420,
        ) {
            let versions: Vec<(TxIndex, ())> = txs.into_iter().map(|t| (t, ())).collect();
            prop_assert_eq!(
                position(&versions, tx),
                versions.binary_search_by_key(&tx, |(t, _)| *t)
            );
        }
    }

    /// Pre-block state: key `k` holds `10 * k`, except key 9, which cannot be read.
    fn load(k: &u32) -> Result<Option<i64>, StorageError> {
        if *k == 9 {
            Err(StorageError("disk gone".into()))
        } else {
            Ok(Some(i64::from(*k) * 10))
        }
    }

    fn add(_: &u32, v: Option<i64>, d: &i64) -> Option<i64> {
        Some(v.unwrap_or(0) + d)
    }

    fn merge(earlier: &mut i64, later: &i64) {
        *earlier += later;
    }

    fn value(read: Read<i64>) -> (Result<Option<i64>, StorageError>, Origin<i64>) {
        match read {
            Read::Value(value, origin) => (value, origin),
            Read::Blocked(tx) => panic!("blocked on {tx}"),
        }
    }

    /// Both ways of holding pre-block values: cached (slow storage) and read again (fast).
    fn memories() -> [MvMemory<u32, i64, i64>; 2] {
        [MvMemory::new(64, true), MvMemory::new(64, false)]
    }

    #[test]
    fn reads_see_the_highest_write_below_or_storage() {
        for m in memories() {
            m.write(1, 2, Entry::Write(0, 100), 0);
            assert_eq!(
                value(m.read(&1, 1, load, add)),
                (Ok(Some(10)), Origin::Storage)
            );
            assert_eq!(
                value(m.read(&1, 2, load, add)),
                (Ok(Some(10)), Origin::Storage)
            );
            assert_eq!(
                value(m.read(&1, 3, load, add)),
                (Ok(Some(100)), Origin::Version(2, 0))
            );
            // A key nobody wrote.
            assert_eq!(
                value(m.read(&4, 7, load, add)),
                (Ok(Some(40)), Origin::Storage)
            );
            assert!(m.validate(&4, 7, &Origin::Storage, load, add));
            assert!(m.validate(&1, 3, &Origin::Version(2, 0), load, add));
            assert!(m.validate(&1, 1, &Origin::Storage, load, add));
            // A new write below the reader invalidates its storage read...
            m.write(1, 0, Entry::Write(0, 5), 0);
            assert!(!m.validate(&1, 1, &Origin::Storage, load, add));
            // ...and a re-execution's write its version read.
            m.write(1, 2, Entry::Write(1, 100), 0);
            assert!(!m.validate(&1, 3, &Origin::Version(2, 0), load, add));
            // An estimate blocks readers above it and fails validation.
            m.mark_estimate(&1, 2);
            assert!(matches!(m.read(&1, 3, load, add), Read::Blocked(2)));
            assert!(!m.validate(&1, 3, &Origin::Version(2, 1), load, add));
            m.remove(&1, 2);
            let mut finals = m.into_final_values(2, load, add, merge).unwrap();
            finals.sort();
            assert_eq!(finals, vec![(1, 5)]);
        }
    }

    #[test]
    fn deltas_resolve_over_storage_and_writes() {
        for m in memories() {
            m.write(5, 1, Entry::Delta(0, 1), 0);
            m.write(5, 3, Entry::Delta(0, 2), 0);
            let (got, origin) = value(m.read(&5, 4, load, add));
            assert_eq!(got, Ok(Some(53)));
            assert_eq!(origin, Origin::Resolved(Box::new(Some(53))));
            assert!(m.validate(&5, 4, &origin, load, add));
            assert_eq!(value(m.read(&5, 2, load, add)).0, Ok(Some(51)));
            // A write below every delta changes what they resolve over.
            m.write(5, 0, Entry::Write(0, 7), 0);
            assert!(!m.validate(&5, 4, &origin, load, add));
            assert_eq!(value(m.read(&5, 4, load, add)).0, Ok(Some(10)));
            // A key that only received deltas ends on its pre-block value plus them.
            m.write(6, 8, Entry::Delta(0, 4), 0);
            let mut finals = m.into_final_values(1, load, add, merge).unwrap();
            finals.sort();
            assert_eq!(finals, vec![(5, 10), (6, 64)]);
        }
    }

    #[test]
    fn storage_failures_are_read_and_validated_like_values() {
        for m in memories() {
            let (got, origin) = value(m.read(&9, 0, load, add));
            assert!(got.is_err());
            assert_eq!(origin, Origin::Storage);
            assert!(m.validate(&9, 0, &origin, load, add));
            m.write(9, 1, Entry::Delta(0, 3), 0);
            let (got, origin) = value(m.read(&9, 2, load, add));
            assert!(got.is_err());
            assert_eq!(origin, Origin::Failed);
            assert!(m.validate(&9, 2, &origin, load, add));
            assert!(m.into_final_values(1, load, add, merge).is_err());
        }
    }

    /// A bucket is a transaction's own (reads and validations of its keys skip the
    /// shard) until another transaction writes there; then it is nobody's, for good.
    #[test]
    fn a_bucket_is_a_transactions_own_until_another_writes_it() {
        let writers = Writers::new(64);
        assert_eq!(writers.cells.len(), 1024);
        let hash = 5;
        assert!(writers.none_but(hash, 3) && writers.none_but(hash, 0));
        writers.mark(hash, 3);
        writers.mark(hash, 3);
        assert!(writers.none_but(hash, 3));
        assert!(!writers.none_but(hash, 2) && !writers.none_but(hash, 4));
        writers.mark(hash + 1024, 7);
        assert!(!writers.none_but(hash, 3) && !writers.none_but(hash, 7));
        writers.mark(hash, 3);
        assert!(!writers.none_but(hash, 3), "many stays many");
        assert!(writers.none_but(hash + 1, 9), "other buckets untouched");
        // An index whose cell value would be `MANY` never owns a bucket.
        let top = u32::MAX as TxIndex - 1;
        writers.mark(9, top);
        assert!(!writers.none_but(9, top));
        // Through the memory: the reader's own write leaves its read of storage valid,
        // another transaction's write below it does not.
        let m = MvMemory::<u32, i64, i64>::new(64, false);
        assert_eq!(
            value(m.read(&1, 4, load, add)),
            (Ok(Some(10)), Origin::Storage)
        );
        m.write(1, 4, Entry::Write(0, 11), 0);
        assert!(m.validate(&1, 4, &Origin::Storage, load, add));
        m.write(1, 6, Entry::Write(0, 12), 0);
        assert!(
            m.validate(&1, 4, &Origin::Storage, load, add),
            "a write above"
        );
        m.write(1, 2, Entry::Write(0, 13), 0);
        assert!(!m.validate(&1, 4, &Origin::Storage, load, add));
        assert_eq!(
            value(m.read(&1, 4, load, add)),
            (Ok(Some(13)), Origin::Version(2, 0))
        );
    }

    #[test]
    fn writes_tell_whether_a_later_transaction_read_the_key() {
        let [slow, fast] = memories();
        // Slow storage: known exactly, from the reads seen under the key's lock.
        assert!(!slow.write(1, 5, Entry::Write(0, 1), 0));
        assert_eq!(value(slow.read(&2, 3, load, add)).0, Ok(Some(20)));
        assert!(!slow.write(2, 3, Entry::Write(0, 1), 0), "its own read");
        assert!(
            slow.write(2, 1, Entry::Delta(0, 4), 0),
            "read by 3 before this write"
        );
        assert_eq!(value(slow.read(&1, 9, load, add)).0, Ok(Some(1)));
        assert!(slow.write(1, 5, Entry::Write(1, 2), 0));
        assert!(!slow.write(1, 9, Entry::Write(0, 3), 0));
        // Fast storage keeps no trace of reads of unwritten keys: always maybe.
        assert!(fast.write(1, 5, Entry::Write(0, 1), 0));
    }

    #[test]
    fn pre_block_values_load_once_on_slow_storage_and_leave_no_reader() {
        let [slow, fast] = memories();
        let loads = std::sync::atomic::AtomicU64::new(0);
        let counted = |k: &u32| {
            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            load(k)
        };
        // Slow storage: loaded once, side by side from several threads, then cached for
        // the transactions that read the key.
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| assert_eq!(slow.pre_block(&3, counted), Ok(Some(30))));
            }
        });
        assert_eq!(
            slow.pre_block(&9, counted),
            Err(StorageError("disk gone".into()))
        );
        assert_eq!(loads.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(
            value(slow.read(&3, 5, counted, add)),
            (Ok(Some(30)), Origin::Storage)
        );
        assert_eq!(loads.load(std::sync::atomic::Ordering::Relaxed), 2);
        // No transaction read the key by loading it: a write finds no reader above it.
        assert!(!slow.write(9, 0, Entry::Write(0, 1), 0));
        // Fast storage caches nothing.
        assert_eq!(fast.pre_block(&3, counted), Ok(Some(30)));
        assert_eq!(fast.pre_block(&3, counted), Ok(Some(30)));
        assert_eq!(loads.load(std::sync::atomic::Ordering::Relaxed), 4);
    }

    #[test]
    fn preloading_reads_unclaimed_keys_together_and_waits_for_the_others() {
        let [slow, fast] = memories();
        let batches = std::sync::Mutex::new(Vec::new());
        let read_many = |keys: &[u32]| {
            batches.lock().unwrap().push(keys.to_vec());
            keys.iter().map(load).collect()
        };
        let unused = |_: &u32| -> Result<Option<i64>, StorageError> { unreachable!() };
        assert_eq!(slow.cached_base(&3), None);
        // 3 is loaded already and 4 is being loaded by a reader: only 5 and 9 are read
        // here (together), and the call returns once 4 is loaded too.
        assert_eq!(slow.pre_block(&3, load), Ok(Some(30)));
        let reader_has_claimed_4 = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                slow.pre_block(&4, |k| {
                    reader_has_claimed_4.wait();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    load(k)
                })
            });
            reader_has_claimed_4.wait();
            assert_eq!(slow.preload(&[3, 4, 5, 9], read_many, unused), 2);
            assert_eq!(slow.cached_base(&4), Some(Ok(Some(40))));
        });
        assert_eq!(*batches.lock().unwrap(), vec![vec![5, 9]]);
        assert_eq!(slow.cached_base(&5), Some(Ok(Some(50))));
        assert_eq!(
            slow.cached_base(&9),
            Some(Err(StorageError("disk gone".into())))
        );
        // Cached values serve reads without loading, and preloading records no reader.
        assert_eq!(
            value(slow.read(&5, 2, unused, add)),
            (Ok(Some(50)), Origin::Storage)
        );
        assert!(!slow.write(9, 0, Entry::Write(0, 1), 0));
        assert_eq!(slow.preload(&[5, 9], read_many, unused), 0);
        assert_eq!(batches.lock().unwrap().len(), 1);
        // Fast storage caches nothing, so there is nothing to preload.
        assert_eq!(fast.preload(&[1, 2], read_many, unused), 0);
        assert_eq!(fast.cached_base(&1), None);
        assert_eq!(batches.lock().unwrap().len(), 1);
    }

    #[test]
    fn cached_values_move_to_a_new_memory_and_are_not_loaded_again() {
        let [first, _] = memories();
        let unused = |_: &u32| -> Result<Option<i64>, StorageError> { unreachable!() };
        assert_eq!(first.pre_block(&3, load), Ok(Some(30)));
        assert_eq!(
            first.pre_block(&9, load),
            Err(StorageError("disk gone".into()))
        );
        first.write(4, 1, Entry::Write(0, 7), 0);
        // Only loaded values move: 4 was written, never loaded.
        let mut cached = first.into_cached_bases();
        cached.sort_by_key(|(k, _)| *k);
        assert_eq!(
            cached,
            vec![
                (3, Ok(Some(30))),
                (9, Err(StorageError("disk gone".into())))
            ]
        );
        let [second, fast] = memories();
        second.seed_bases(cached.clone());
        assert_eq!(
            value(second.read(&3, 0, unused, add)),
            (Ok(Some(30)), Origin::Storage)
        );
        assert_eq!(
            second.pre_block(&9, unused),
            Err(StorageError("disk gone".into()))
        );
        // A memory over fast storage caches nothing.
        fast.seed_bases(cached);
        assert_eq!(fast.cached_base(&3), None);
    }

    #[test]
    fn a_key_state_is_three_cache_lines_for_the_evm_types() {
        use parex_core::{BalanceDelta, StateKey, StateValue};
        assert_eq!(
            size_of::<KeyState<StateKey, StateValue, BalanceDelta>>(),
            192
        );
    }

    #[test]
    fn tables_grow_past_their_sizing_and_keep_every_key() {
        for m in [MvMemory::new(4, true), MvMemory::new(4, false)] {
            // Far more keys than the memory was sized for: positions rehash from the
            // keys, states move as their vectors grow, and each new state's push first
            // prefetches the next one (inside the capacity, or not at all at its end).
            for k in 0..2000u32 {
                m.write(k, (k % 7) as TxIndex, Entry::Write(0, -i64::from(k)), 0);
            }
            for k in (0..2000u32).step_by(13) {
                let tx = (k % 7) as TxIndex;
                assert_eq!(
                    value(m.read(&k, tx + 1, load, add)),
                    (Ok(Some(-i64::from(k))), Origin::Version(tx, 0))
                );
                // Below the writer: the pre-block value (key 9 cannot be read).
                if k != 9 {
                    assert_eq!(
                        value(m.read(&k, tx, load, add)).0,
                        Ok(Some(10 * i64::from(k)))
                    );
                }
            }
            let mut finals = m.into_final_values(2, load, add, merge).unwrap();
            finals.sort();
            let expected: Vec<(u32, i64)> = (0..2000u32).map(|k| (k, -i64::from(k))).collect();
            assert_eq!(finals, expected);
        }
    }

    #[test]
    fn drains_keep_apart_what_finds_no_room_and_lose_nothing() {
        // Two drains share 300 keys in 16 shards and a sink, with room for a few shards'
        // keys only (block-stm reserves room from an estimate): the shards that find no
        // room come back apart, and together they are every final value once.
        for room in [0, 1, 40, 150, 301, 1000] {
            let m = MvMemory::<u32, i64, i64>::new(300, false).with_sinks(vec![7], 2, 300);
            for k in (0..300u32).filter(|&k| k != 7) {
                m.write(k, k as TxIndex, Entry::Write(0, i64::from(k)), 0);
            }
            // The sink only receives a delta, over its pre-block value (70).
            m.write(7, 7, Entry::Delta(0, 5), 1);
            let next = AtomicUsize::new(0);
            let mut finals = Vec::new();
            let apart = gather_into(&mut finals, room, |out| {
                std::thread::scope(|scope| {
                    let drain = || m.drain_final_values(&next, out, load, add, merge);
                    let other = scope.spawn(drain);
                    vec![drain(), other.join().unwrap()]
                })
            });
            assert!(finals.len() <= room, "room {room}");
            let mut finals = append_parts(finals, apart).unwrap();
            finals.sort();
            let expected: Vec<(u32, i64)> = (0..300u32)
                .map(|k| (k, if k == 7 { 75 } else { i64::from(k) }))
                .collect();
            assert_eq!(finals, expected, "room {room}");
        }
    }

    #[test]
    fn slow_storage_is_read_once_per_key_and_fast_storage_whenever_needed() {
        for (slow, expected) in [(true, 1), (false, 3)] {
            let m = MvMemory::<u32, i64, i64>::new(64, slow);
            let loads = AtomicUsize::new(0);
            let counting = |k: &u32| {
                loads.fetch_add(1, Relaxed);
                load(k)
            };
            for tx in 0..3 {
                assert_eq!(value(m.read(&2, tx, counting, add)).0, Ok(Some(20)));
            }
            assert_eq!(loads.load(Relaxed), expected, "slow storage: {slow}");
        }
    }

    /// What a read answered, comparable (storage failures by message), or the
    /// transaction it is blocked on.
    type Answer = Result<(Result<Option<i64>, String>, Origin<i64>), TxIndex>;

    fn answer(read: Read<i64>) -> Answer {
        match read {
            Read::Value(value, origin) => Ok((value.map_err(|e| e.to_string()), origin)),
            Read::Blocked(tx) => Err(tx),
        }
    }

    /// What an engine does to the memory (the protocol block-stm and dag follow).
    #[derive(Clone, Debug)]
    enum Op {
        /// Transaction `tx` runs its next incarnation on worker `lane`: it writes
        /// `writes` (key, full value or delta), and its previous incarnation's other
        /// keys are removed.
        Execute {
            tx: TxIndex,
            lane: usize,
            writes: Vec<(u32, bool, i64)>,
        },
        /// Its latest incarnation aborts: its entries become estimates.
        Abort { tx: TxIndex },
        /// Before any execution, an estimate of `tx` under `key` orders a sequence.
        Seed { tx: TxIndex, key: u32 },
        /// Transaction `tx` reads `key`.
        Read { tx: TxIndex, key: u32 },
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let key = 0u32..4;
        prop_oneof![
            4 => (0usize..12, 0usize..3, prop::collection::vec((key.clone(), any::<bool>(), -50i64..50), 0..4))
                .prop_map(|(tx, lane, writes)| Op::Execute { tx, lane, writes }),
            1 => (0usize..12).prop_map(|tx| Op::Abort { tx }),
            1 => (0usize..12, key.clone()).prop_map(|(tx, key)| Op::Seed { tx, key }),
            4 => (0usize..13, key).prop_map(|(tx, key)| Op::Read { tx, key }),
        ]
    }

    /// Per transaction: incarnations run so far, and the keys the latest one wrote.
    #[derive(Default, Clone)]
    struct TxState {
        runs: Incarnation,
        written: Vec<u32>,
    }

    /// Applies `op` to every memory as an engine would (one that keeps owner lists gets
    /// each incarnation's writes whole, [`MvMemory::publish`]); for a read, checks that
    /// all answer alike and accept each other's answer on validation.
    fn apply_op(memories: &[&MvMemory<u32, i64, i64>], txs: &mut [TxState], op: &Op) {
        match op {
            Op::Execute { tx, lane, writes } => {
                let state = &mut txs[*tx];
                let incarnation = state.runs;
                state.runs += 1;
                let mut keys = Vec::new();
                let mut whole = Vec::new();
                for &(key, full, v) in writes {
                    if keys.contains(&key) {
                        continue;
                    }
                    keys.push(key);
                    whole.push((key, if full { Write::Put(v) } else { Write::Delta(v) }));
                }
                for memory in memories {
                    if memory.owns_writes() {
                        memory.publish(*tx, incarnation, whole.clone(), *lane);
                        continue;
                    }
                    for (key, write) in &whole {
                        let entry = owned::entry_of(incarnation, false, write);
                        memory.write(*key, *tx, entry, *lane);
                    }
                }
                for key in std::mem::replace(&mut state.written, keys.clone()) {
                    if !keys.contains(&key) {
                        for memory in memories {
                            memory.remove(&key, *tx);
                        }
                    }
                }
            }
            Op::Abort { tx } => {
                for key in &txs[*tx].written {
                    for memory in memories {
                        memory.mark_estimate(key, *tx);
                    }
                }
            }
            Op::Seed { tx, key } => {
                let state = &mut txs[*tx];
                if state.runs == 0 && !state.written.contains(key) {
                    state.written.push(*key);
                    for memory in memories {
                        memory.write(*key, *tx, Entry::Estimate, 0);
                    }
                }
            }
            Op::Read { tx, key } => {
                let answers: Vec<Answer> = memories
                    .iter()
                    .map(|memory| answer(memory.read(key, *tx, load, add)))
                    .collect();
                for other in &answers[1..] {
                    assert_eq!(&answers[0], other, "read of {key} by {tx}");
                }
                if let Ok((_, origin)) = &answers[0] {
                    for memory in memories {
                        assert!(memory.validate(key, *tx, origin, load, add));
                    }
                }
            }
        }
    }

    /// Runs `ops` on every memory, then runs every transaction once more (the block ends
    /// with no estimate) and checks that all end with the same final values.
    fn run_ops(memories: Vec<MvMemory<u32, i64, i64>>, ops: &[Op]) -> Result<(), TestCaseError> {
        let refs: Vec<&MvMemory<u32, i64, i64>> = memories.iter().collect();
        let mut txs = vec![TxState::default(); 12];
        for op in ops {
            apply_op(&refs, &mut txs, op);
        }
        for tx in 0..txs.len() {
            let writes = txs[tx].written.iter().map(|&k| (k, false, 1)).collect();
            apply_op(
                &refs,
                &mut txs,
                &Op::Execute {
                    tx,
                    lane: tx % 3,
                    writes,
                },
            );
        }
        let finals: Vec<_> = memories
            .into_iter()
            .map(|m| {
                m.into_final_values(2, load, add, merge)
                    .map(|mut f| {
                        f.sort();
                        f
                    })
                    .map_err(|e| e.to_string())
            })
            .collect();
        for other in &finals[1..] {
            prop_assert_eq!(&finals[0], other);
        }
        Ok(())
    }

    proptest! {
        /// The sink's lanes answer every read, validation and final value exactly as a
        /// shard does, whatever the workers and incarnations that wrote the entries (key
        /// 9's pre-block value cannot be read: failures too).
        #[test]
        fn the_sink_in_lanes_answers_as_a_shard(
            sink_key in prop_oneof![Just(0u32), Just(9u32)],
            ops in prop::collection::vec(op_strategy(), 0..60),
        ) {
            let ops: Vec<Op> = ops
                .into_iter()
                .map(|op| match op {
                    Op::Execute { tx, lane, writes } => Op::Execute {
                        tx,
                        lane,
                        writes: writes.into_iter().map(|(k, f, v)| (if k == 0 { sink_key } else { k }, f, v)).collect(),
                    },
                    Op::Seed { tx, key: 0 } => Op::Seed { tx, key: sink_key },
                    Op::Read { tx, key: 0 } => Op::Read { tx, key: sink_key },
                    op => op,
                })
                .collect();
            let plain = MvMemory::new(16, false);
            let sink = MvMemory::new(16, false).with_sinks(vec![sink_key, 2], 3, 16);
            run_ops(vec![plain, sink], &ops)?;
        }

        /// Owner lists answer every read, validation and final value exactly as the
        /// shards do: with a cell per key, and with two cells for all keys, so that
        /// buckets are shared and their owners' entries move to the shards at every turn
        /// (and with a delta sink beside them).
        #[test]
        fn owner_lists_answer_as_the_shards(
            cells in prop_oneof![Just(2usize), Just(1024)],
            ops in prop::collection::vec(op_strategy(), 0..60),
        ) {
            let plain = MvMemory::new(16, false);
            let owned = MvMemory::new(16, false).with_owners(12).with_writer_cells(cells);
            let both = MvMemory::new(16, false)
                .with_sinks(vec![2], 3, 16)
                .with_owners(12)
                .with_writer_cells(cells);
            run_ops(vec![plain, owned, both], &ops)?;
        }
    }

    /// Keys `a` and `b` share a bucket in a memory with two writer cells, `c` is alone in
    /// the other. Transaction 1 owns the bucket, then 4 writes there too: 1's entries move
    /// to the shards, and every read, validation and abort sees them there; 2's key stays
    /// in its list throughout.
    #[test]
    fn a_second_writer_moves_the_owners_entries_to_the_shards() {
        let memory = MvMemory::<u32, i64, i64>::new(16, false)
            .with_owners(6)
            .with_writer_cells(2);
        let bucket = |k: &u32| memory.hash(k) & 1;
        let a = 0u32;
        // (Key 9's pre-block value cannot be read.)
        let b = (1..).find(|k| *k != 9 && bucket(k) == bucket(&a)).unwrap();
        let c = (1..).find(|k| *k != 9 && bucket(k) != bucket(&a)).unwrap();
        let read = |k: &u32, tx| answer(memory.read(k, tx, load, add));
        memory.publish(1, 0, vec![(a, Write::Put(10))], 0);
        memory.publish(2, 0, vec![(c, Write::Delta(5))], 0);
        assert_eq!(read(&a, 3), Ok((Ok(Some(10)), Origin::Version(1, 0))));
        assert_eq!(read(&a, 1), Ok((Ok(Some(0)), Origin::Storage)));
        // Key c's pre-block value is ten times its number; the delta resolves over it.
        let resolved = Some(i64::from(c) * 10 + 5);
        assert_eq!(
            read(&c, 3),
            Ok((Ok(resolved), Origin::Resolved(Box::new(resolved))))
        );
        memory.publish(4, 0, vec![(b, Write::Put(7))], 1);
        let writers = memory.writers.as_ref().unwrap();
        assert_eq!(writers.cell(memory.hash(&a)).load(Relaxed), Writers::MANY);
        assert_eq!(writers.cell(memory.hash(&c)).load(Relaxed), Writers::id(2));
        assert_eq!(read(&a, 3), Ok((Ok(Some(10)), Origin::Version(1, 0))));
        assert_eq!(read(&b, 5), Ok((Ok(Some(7)), Origin::Version(4, 0))));
        assert!(memory.validate(&a, 5, &Origin::Version(1, 0), load, add));
        memory.mark_estimate(&a, 1);
        memory.mark_estimate(&c, 2);
        assert_eq!(read(&a, 3), Err(1));
        assert_eq!(read(&c, 3), Err(2));
        assert!(!memory.validate(&a, 5, &Origin::Version(1, 0), load, add));
        memory.publish(1, 1, vec![(a, Write::Put(11))], 0);
        memory.publish(2, 1, vec![(c, Write::Put(6))], 0);
        assert_eq!(read(&a, 3), Ok((Ok(Some(11)), Origin::Version(1, 1))));
        assert_eq!(read(&c, 3), Ok((Ok(Some(6)), Origin::Version(2, 1))));
        let mut finals = memory.into_final_values(2, load, add, merge).unwrap();
        finals.sort();
        let mut expected = vec![(a, 11), (b, 7), (c, 6)];
        expected.sort();
        assert_eq!(finals, expected);
    }
}
