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
//! * The pre-block value of a key is read from storage once, by the first reader that
//!   needs it and outside the shard lock (storage may be slow); concurrent readers of
//!   the same key wait for it; it is then cached in the key's state.
//! * Keys are spread over cache-padded shards, each a mutex over a hash table; the hash
//!   is computed once per operation. Nothing is allocated on a read of a known key.

use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use alloy_primitives::map::DefaultHashBuilder;
use crossbeam::utils::{Backoff, CachePadded};
use hashbrown::HashTable;
use parex_core::{StorageError, TxIndex};
use smallvec::SmallVec;

/// Re-executions of one transaction are numbered from 0.
pub type Incarnation = u32;

/// The pre-block value of a key, loaded from storage at most once.
enum Base<V> {
    Unloaded,
    /// A reader is loading it (outside the lock); others wait for it.
    Loading,
    Loaded(Result<Option<V>, StorageError>),
}

/// What transaction `tx` left under a key.
#[derive(Clone, Debug)]
pub enum Entry<V, D> {
    Write(Incarnation, V),
    Delta(D),
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

struct KeyState<K, V, D> {
    key: K,
    /// The key's hash (tables grow without hashing keys again).
    hash: u64,
    /// Sorted by transaction index, at most one entry per transaction; most keys have
    /// a single writer, whose entry is kept inline.
    versions: SmallVec<[(TxIndex, Entry<V, D>); 1]>,
    base: Base<V>,
}

type Shard<K, V, D> = CachePadded<Mutex<HashTable<KeyState<K, V, D>>>>;

pub struct MvMemory<K, V, D> {
    shards: Box<[Shard<K, V, D>]>,
    hasher: DefaultHashBuilder,
    /// Load pre-block values while holding the shard lock (storage is fast: a second
    /// trip to the shard would cost more than the read).
    load_under_lock: bool,
}

/// Most shards a memory has; small blocks get fewer (creating shards is not free).
const MAX_SHARDS: usize = 256;

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
            Entry::Delta(_) => first_delta = i,
            Entry::Estimate => return (Bottom::Blocked(versions[i].0), first_delta),
        }
    }
    (Bottom::Storage, first_delta)
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
            Entry::Delta(d) => value = apply(key, value, d),
            _ => unreachable!("only deltas lie above the base"),
        }
    }
    value
}

impl<K, V, D> MvMemory<K, V, D>
where
    K: Eq + Hash + Clone + Send,
    V: Clone + PartialEq + Send,
    D: Clone + Send,
{
    /// An empty memory, sized for about `keys` keys, over storage whose reads are slow
    /// (`slow_storage`: loaded outside the shard locks) or fast.
    pub fn new(keys: usize, slow_storage: bool) -> Self {
        let shards = (keys / 16).next_power_of_two().clamp(1, MAX_SHARDS);
        let per_shard = keys.div_ceil(shards);
        Self {
            shards: (0..shards)
                .map(|_| CachePadded::new(Mutex::new(HashTable::with_capacity(per_shard))))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            load_under_lock: !slow_storage,
        }
    }

    #[inline]
    fn shard(&self, hash: u64) -> MutexGuard<'_, HashTable<KeyState<K, V, D>>> {
        // The table takes bucket positions from the low bits of the hash and tags from
        // the top 7: pick the shard with bits in between, so as to skew neither.
        let shard = &self.shards[(hash >> 40) as usize & (self.shards.len() - 1)];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    fn state_mut<'t>(
        &self,
        table: &'t mut HashTable<KeyState<K, V, D>>,
        hash: u64,
        key: &K,
    ) -> &'t mut KeyState<K, V, D> {
        table
            .entry(hash, |s| s.key == *key, |s| s.hash)
            .or_insert_with(|| KeyState {
                key: key.clone(),
                hash,
                versions: SmallVec::new(),
                base: Base::Unloaded,
            })
            .into_mut()
    }

    /// The value of `key` as transaction `tx` sees it. `load` reads the pre-block value
    /// (called at most once per key, without holding a lock), `apply` applies a delta.
    pub fn read(
        &self,
        key: &K,
        tx: TxIndex,
        load: impl Fn(&K) -> Result<Option<V>, StorageError>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> Read<V> {
        let hash = self.hasher.hash_one(key);
        let mut loaded = None;
        let backoff = Backoff::new();
        loop {
            let must_load = {
                let mut table = self.shard(hash);
                let state = self.state_mut(&mut table, hash, key);
                if let Some(value) = loaded.take() {
                    state.base = Base::Loaded(value);
                }
                let versions = &state.versions;
                let end = versions.partition_point(|(t, _)| *t < tx);
                let (bottom, first_delta) = walk(versions, end);
                let resolved = first_delta != end;
                if self.load_under_lock
                    && matches!(bottom, Bottom::Storage)
                    && matches!(state.base, Base::Unloaded)
                {
                    state.base = Base::Loaded(load(key));
                }
                match bottom {
                    Bottom::Blocked(t) => return Read::Blocked(t),
                    Bottom::Write(i) => {
                        let Entry::Write(incarnation, value) = &versions[i].1 else {
                            unreachable!()
                        };
                        if !resolved {
                            let origin = Origin::Version(versions[i].0, *incarnation);
                            return Read::Value(Ok(Some(value.clone())), origin);
                        }
                        let v = apply_deltas(
                            key,
                            versions,
                            first_delta,
                            end,
                            Some(value.clone()),
                            &apply,
                        );
                        return Read::Value(Ok(v.clone()), Origin::Resolved(Box::new(v)));
                    }
                    Bottom::Storage => match &state.base {
                        Base::Loaded(Err(e)) => {
                            let origin = if resolved {
                                Origin::Failed
                            } else {
                                Origin::Storage
                            };
                            return Read::Value(Err(e.clone()), origin);
                        }
                        Base::Loaded(Ok(v)) if !resolved => {
                            return Read::Value(Ok(v.clone()), Origin::Storage);
                        }
                        Base::Loaded(Ok(v)) => {
                            let v =
                                apply_deltas(key, versions, first_delta, end, v.clone(), &apply);
                            return Read::Value(Ok(v.clone()), Origin::Resolved(Box::new(v)));
                        }
                        Base::Loading => false,
                        Base::Unloaded => {
                            state.base = Base::Loading;
                            true
                        }
                    },
                }
            };
            // Outside the lock: load the value (we marked it loading), or wait for the
            // reader that is loading it, then resolve again.
            if must_load {
                loaded = Some(load(key));
            } else if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(2));
            } else {
                backoff.snooze();
            }
        }
    }

    /// Whether a read of `key` by `tx` would still get what `origin` records.
    pub fn validate(
        &self,
        key: &K,
        tx: TxIndex,
        origin: &Origin<V>,
        apply: impl Fn(&K, Option<V>, &D) -> Option<V>,
    ) -> bool {
        let hash = self.hasher.hash_one(key);
        let table = self.shard(hash);
        let Some(state) = table.find(hash, |s| s.key == *key) else {
            return false; // Every read leaves its key in the table.
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
            (Bottom::Storage, Origin::Resolved(seen)) if resolved => match &state.base {
                Base::Loaded(Ok(v)) => {
                    apply_deltas(key, versions, first_delta, end, v.clone(), &apply) == **seen
                }
                // Not loaded: the recorded read resolved over a write since removed.
                _ => false,
            },
            (Bottom::Storage, Origin::Failed) => {
                resolved && matches!(state.base, Base::Loaded(Err(_)))
            }
            _ => false,
        }
    }

    /// Records the write of `tx` (incarnation of a `Write`) under `key`, replacing the
    /// entry of its previous incarnation.
    pub fn write(&self, key: K, tx: TxIndex, entry: Entry<V, D>) {
        let hash = self.hasher.hash_one(&key);
        let mut table = self.shard(hash);
        let state = self.state_mut(&mut table, hash, &key);
        let versions = &mut state.versions;
        // Writers come in roughly block order: look from the end first.
        match versions.last() {
            Some((t, _)) if *t >= tx => match versions.binary_search_by_key(&tx, |(t, _)| *t) {
                Ok(i) => versions[i].1 = entry,
                Err(i) => versions.insert(i, (tx, entry)),
            },
            _ => versions.push((tx, entry)),
        }
    }

    /// Removes the entry of `tx` under `key` (its new incarnation no longer writes it).
    pub fn remove(&self, key: &K, tx: TxIndex) {
        let hash = self.hasher.hash_one(key);
        let mut table = self.shard(hash);
        if let Some(state) = table.find_mut(hash, |s| s.key == *key)
            && let Ok(i) = state.versions.binary_search_by_key(&tx, |(t, _)| *t)
        {
            state.versions.remove(i);
        }
    }

    /// Turns the entry of `tx` under `key` into an estimate (its incarnation aborted).
    pub fn mark_estimate(&self, key: &K, tx: TxIndex) {
        let hash = self.hasher.hash_one(key);
        let mut table = self.shard(hash);
        if let Some(state) = table.find_mut(hash, |s| s.key == *key)
            && let Ok(i) = state.versions.binary_search_by_key(&tx, |(t, _)| *t)
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
    ) -> Result<Vec<(K, V)>, StorageError> {
        let threads = threads.clamp(1, self.shards.len());
        let mut groups: Vec<Vec<Shard<K, V, D>>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, shard) in self.shards.into_vec().into_iter().enumerate() {
            groups[i % threads].push(shard);
        }
        let resolve_group = |group: Vec<Shard<K, V, D>>| -> Result<Vec<(K, V)>, StorageError> {
            let mut out = Vec::new();
            for shard in group {
                let table = shard
                    .into_inner()
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner());
                out.reserve(table.len());
                for state in table {
                    let versions = &state.versions;
                    if versions.is_empty() {
                        continue;
                    }
                    let end = versions.len();
                    let (bottom, first_delta) = walk(versions, end);
                    let base = match bottom {
                        Bottom::Write(i) => match &versions[i].1 {
                            Entry::Write(_, v) => Some(v.clone()),
                            _ => unreachable!(),
                        },
                        Bottom::Storage => match state.base {
                            Base::Loaded(loaded) => loaded?,
                            _ => load(&state.key)?,
                        },
                        Bottom::Blocked(t) => {
                            unreachable!("estimate of transaction {t} left at the end")
                        }
                    };
                    if let Some(v) =
                        apply_deltas(&state.key, versions, first_delta, end, base, &apply)
                    {
                        out.push((state.key, v));
                    }
                }
            }
            Ok(out)
        };
        let mut parts = std::thread::scope(|scope| {
            let resolve_group = &resolve_group;
            let mut groups = groups.into_iter();
            let first = groups.next().expect("at least one group");
            let handles: Vec<_> = groups
                .map(|g| scope.spawn(move || resolve_group(g)))
                .collect();
            let mut parts = vec![resolve_group(first)];
            parts.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            );
            parts
        })
        .into_iter();
        let mut out = parts.next().expect("at least one group")?;
        for part in parts {
            out.append(&mut part?);
        }
        Ok(out)
    }
}
