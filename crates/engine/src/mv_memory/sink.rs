//! A delta sink: a key that many transactions send a delta to (the EVM's block
//! beneficiary, credited each fee, or a wallet that many transfers credit;
//! [`parex_core::Vm::delta_sinks`]), kept apart from the shards.
//!
//! In a shard, the sink's versions were one vector behind one lock that every worker
//! wrote at every transaction: the lock word, the vector's header and its last entries
//! moved between the cores at each write (on 2 threads, mainnet block 14396881, 1346
//! light transactions: a sixth of block-stm's time). Here each worker writes a *lane* of
//! its own (a vector sorted by transaction, behind a lock only it takes, except readers
//! of the sink, which are rare, and the removals and aborts of re-executions).
//!
//! A transaction re-executed by another worker can leave entries in two lanes: every
//! entry records its incarnation, and the latest wins (on a tie, which only the ordering
//! estimate of a sequence and the first execution can make, the one that is not an
//! estimate). An abort marks the transaction's entries in every lane, a removal removes
//! them from every lane. A read locks every lane in order and merges them downward from
//! the reader, exactly as the shards' walk goes down one vector: an estimate blocks, a
//! write is the bottom, deltas are collected and applied in block order over the bottom.

use std::sync::{Mutex, MutexGuard};

use crossbeam::utils::CachePadded;
use parex_core::{StorageError, TxIndex};
use smallvec::SmallVec;

use super::{Entry, Incarnation, Origin, Read, position};

/// A transaction's entry in a lane, with the incarnation that wrote it (kept when an
/// abort turns it into an estimate).
type Versioned<V, D> = (TxIndex, (Incarnation, Entry<V, D>));
/// One worker's entries of the sink, sorted by transaction: per transaction at most one.
type Entries<V, D> = Vec<Versioned<V, D>>;
type Lane<V, D> = CachePadded<Mutex<Entries<V, D>>>;

pub(super) struct Sink<K, V, D> {
    pub(super) key: K,
    pub(super) hash: u64,
    lanes: Box<[Lane<V, D>]>,
    /// Entries a lane gets room for at its first write: its share of the units that
    /// may write the sink, so that a lane written by every unit is allocated once
    /// instead of doubling from nothing, each doubling copying it.
    lane_capacity: usize,
}

/// What lies below a position of the sink: an estimate in the way, or the bottom (the
/// latest full write, or none: the pre-block value) and the deltas above it.
enum Below<'a, V, D> {
    Blocked(TxIndex),
    Over {
        write: Option<(TxIndex, Incarnation, &'a V)>,
        /// In block order.
        deltas: Vec<&'a D>,
    },
}

/// `deltas` applied in block order over the write's value, or over the pre-block value
/// (`load`) when there is no write below them.
fn resolve<'d, V: Clone, D: 'd>(
    write: Option<(TxIndex, Incarnation, &V)>,
    deltas: impl IntoIterator<Item = &'d D>,
    load: impl FnOnce() -> Result<Option<V>, StorageError>,
    apply: impl Fn(Option<V>, &D) -> Option<V>,
) -> Result<Option<V>, StorageError> {
    let base = match write {
        Some((_, _, value)) => Some(value.clone()),
        None => load()?,
    };
    Ok(deltas.into_iter().fold(base, apply))
}

/// The incarnation an entry records.
fn incarnation<V, D>(entry: &Entry<V, D>) -> Incarnation {
    match entry {
        Entry::Write(incarnation, _) | Entry::Delta(incarnation, _) => *incarnation,
        // An estimate written as such orders a sequence before any execution.
        Entry::Estimate => 0,
    }
}

impl<K, V: Clone + PartialEq, D> Sink<K, V, D> {
    /// A sink of `lanes` lanes, for `units` units that may write it.
    pub(super) fn new(key: K, hash: u64, lanes: usize, units: usize) -> Self {
        let lanes = lanes.max(1);
        Self {
            key,
            hash,
            lanes: (0..lanes)
                .map(|_| CachePadded::new(Mutex::new(Vec::new())))
                .collect(),
            lane_capacity: units.div_ceil(lanes),
        }
    }

    fn lock(lane: &Lane<V, D>) -> MutexGuard<'_, Entries<V, D>> {
        lane.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `tx`'s entry in the lane of worker `writer`.
    pub(super) fn write(&self, writer: usize, tx: TxIndex, entry: Entry<V, D>) {
        let mut lane = Self::lock(&self.lanes[writer % self.lanes.len()]);
        if lane.capacity() == 0 {
            lane.reserve(self.lane_capacity);
        }
        let versioned = (incarnation(&entry), entry);
        match position(&lane, tx) {
            Ok(i) => lane[i].1 = versioned,
            Err(i) if i == lane.len() => lane.push((tx, versioned)),
            Err(i) => lane.insert(i, (tx, versioned)),
        }
    }

    /// Removes `tx`'s entries (its new incarnation does not write the sink).
    pub(super) fn remove(&self, tx: TxIndex) {
        for lane in &self.lanes {
            let mut lane = Self::lock(lane);
            if let Ok(i) = position(&lane, tx) {
                lane.remove(i);
            }
        }
    }

    /// Turns `tx`'s entries into estimates (its incarnation aborted).
    pub(super) fn mark_estimate(&self, tx: TxIndex) {
        for lane in &self.lanes {
            let mut lane = Self::lock(lane);
            if let Ok(i) = position(&lane, tx) {
                lane[i].1.1 = Entry::Estimate;
            }
        }
    }

    /// Runs `f` on what lies below position `tx` (`TxIndex::MAX`: the final value), with
    /// every lane locked.
    fn below<R>(&self, tx: TxIndex, f: impl FnOnce(Below<'_, V, D>) -> R) -> R {
        let lanes: SmallVec<[_; 16]> = self.lanes.iter().map(|l| Self::lock(l)).collect();
        // Per lane, the entries not yet merged (those below `tx` at first), taken from
        // the top. Slices of the locked lanes: each step reads a lane's last entry and
        // shortens it, with no lookup through the lock guard or index checks (the final
        // value walks every entry: a sink credited by every transaction has one each).
        let mut unmerged: SmallVec<[&[Versioned<V, D>]; 16]> = lanes
            .iter()
            .map(|lane| &lane[..lane.partition_point(|(t, _)| *t < tx)])
            .collect();
        let mut deltas = Vec::new();
        let write = loop {
            let Some(top) = unmerged
                .iter()
                .filter_map(|lane| lane.last().map(|(t, _)| *t))
                .max()
            else {
                break None;
            };
            // The latest of `top`'s entries (one per lane at most).
            let mut latest: Option<&(Incarnation, Entry<V, D>)> = None;
            for lane in unmerged.iter_mut() {
                let Some(((t, candidate), below)) = lane.split_last() else {
                    continue;
                };
                if *t != top {
                    continue;
                }
                *lane = below;
                let newer = latest.is_none_or(|(inc, entry)| {
                    candidate.0 > *inc
                        || (candidate.0 == *inc
                            && matches!(entry, Entry::Estimate)
                            && !matches!(candidate.1, Entry::Estimate))
                });
                if newer {
                    latest = Some(candidate);
                }
            }
            match latest.expect("a lane's top entry is top's") {
                (_, Entry::Estimate) => return f(Below::Blocked(top)),
                (inc, Entry::Write(_, value)) => break Some((top, *inc, value)),
                (_, Entry::Delta(_, delta)) => deltas.push(delta),
            }
        };
        deltas.reverse();
        f(Below::Over { write, deltas })
    }

    /// The sink as transaction `tx` sees it: as [`super::MvMemory::read`] answers.
    pub(super) fn read(
        &self,
        tx: TxIndex,
        load: impl FnOnce() -> Result<Option<V>, StorageError>,
        apply: impl Fn(Option<V>, &D) -> Option<V>,
    ) -> Read<V> {
        self.below(tx, |below| match below {
            Below::Blocked(t) => Read::Blocked(t),
            Below::Over { write, deltas } if deltas.is_empty() => match write {
                Some((t, inc, value)) => {
                    Read::Value(Ok(Some(value.clone())), Origin::Version(t, inc))
                }
                None => Read::Value(load(), Origin::Storage),
            },
            Below::Over { write, deltas } => match resolve(write, deltas, load, apply) {
                Ok(value) => Read::Value(Ok(value.clone()), Origin::Resolved(Box::new(value))),
                Err(e) => Read::Value(Err(e), Origin::Failed),
            },
        })
    }

    /// Whether a read of the sink by `tx` would still get what `origin` records.
    pub(super) fn validate(
        &self,
        tx: TxIndex,
        origin: &Origin<V>,
        load: impl FnOnce() -> Result<Option<V>, StorageError>,
        apply: impl Fn(Option<V>, &D) -> Option<V>,
    ) -> bool {
        self.below(tx, |below| {
            let Below::Over { write, deltas } = below else {
                return false;
            };
            match (write, origin) {
                (None, Origin::Storage) => deltas.is_empty(),
                (None, Origin::Failed) => !deltas.is_empty() && load().is_err(),
                (Some((t, inc, _)), Origin::Version(vt, vi)) => {
                    deltas.is_empty() && t == *vt && inc == *vi
                }
                (_, Origin::Resolved(seen)) if !deltas.is_empty() => {
                    resolve(write, deltas, load, apply).is_ok_and(|value| value == **seen)
                }
                _ => false,
            }
        })
    }

    /// The sink's final value: its last write with the later deltas applied, or the
    /// pre-block value with all of them applied; `Ok(None)` if nothing was written.
    /// (The deltas are merged first, `merge`, and applied once: [`super::merged`].)
    pub(super) fn final_value(
        &self,
        load: impl FnOnce() -> Result<Option<V>, StorageError>,
        apply: impl Fn(Option<V>, &D) -> Option<V>,
        merge: &impl Fn(&mut D, &D),
    ) -> Result<Option<Option<V>>, StorageError>
    where
        D: Clone,
    {
        self.below(TxIndex::MAX, |below| match below {
            Below::Blocked(t) => unreachable!("estimate of transaction {t} left at the end"),
            Below::Over {
                write: None,
                deltas,
            } if deltas.is_empty() => Ok(None),
            Below::Over { write, deltas } => {
                let delta = super::merged(deltas, merge);
                resolve(write, delta.as_ref(), load, apply).map(Some)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Entry, Sink};

    #[test]
    fn a_lane_gets_room_for_its_share_at_its_first_write() {
        let sink = Sink::<u32, i64, i64>::new(7, 0, 3, 100);
        let capacity = |lane: usize| Sink::<u32, i64, i64>::lock(&sink.lanes[lane]).capacity();
        assert_eq!((0..3).map(capacity).sum::<usize>(), 0);
        sink.write(1, 5, Entry::Delta(0, 1));
        assert!(capacity(1) >= 34, "{}", capacity(1));
        assert_eq!(
            capacity(0) + capacity(2),
            0,
            "lanes never written allocate nothing"
        );
        // Past its share a lane grows as any vector does, its entries still in order.
        for tx in (0..50).rev() {
            sink.write(1, tx, Entry::Delta(0, 1));
        }
        let lane = Sink::<u32, i64, i64>::lock(&sink.lanes[1]);
        assert_eq!(lane.len(), 50);
        assert!(lane.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
