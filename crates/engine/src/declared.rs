//! What a [`Vm`]'s declared accesses ([`Vm::declared_access`]) say about a block before
//! it runs: each transaction's declaration in normal form, and whether the block starts
//! as a chain (every parallel engine checks that first and runs a chain in order).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use alloy_primitives::map::DefaultHashBuilder;
use parex_core::{AccessKind, PreBlockView, Storage, Vm};

/// A transaction's declaration, sorted by key, each key once.
pub(crate) type Declaration<K> = Box<[(K, AccessKind)]>;

/// Transactions whose declarations are judged before anything else is done...
pub(crate) const CHAIN_SAMPLE: usize = 64;
/// ...and the share of them that must conflict with their predecessor's declaration for
/// the block to count as a chain.
const CHAIN_SHARE: f64 = 0.75;

/// Whether the block starts as a chain: most of its first `CHAIN_SAMPLE` transactions
/// declare ([`Vm::declared_access`]) a key that their immediate predecessor declares
/// incompatibly, so each would wait for the one before it. False for smaller blocks.
/// Costs `CHAIN_SAMPLE` sequence keys ([`Vm::sequence_key`]), and as many declarations
/// unless the keys alone show a chain (every parallel engine uses it, to run such blocks in
/// order from the start): on the calling thread, or on slow storage, whose reads they would
/// otherwise wait for one after another, on `workers` workers.
///
/// With `runs_are_units`, the engine executes a sender's run of light transactions
/// ([`crate::chunk::continues_run`]) as one unit on one worker: the pairs inside such a run
/// are no step of a chain but part of one unit's work, so only the pairs between units
/// are judged, and the sample is a chain if one run alone fills most of it (mainnet
/// 8889776 opens with 40 payouts of one exchange, then independent transfers: a chain by
/// transaction pairs, 1.5x faster than serial by units).
pub(crate) fn declared_chain<V, S>(
    vm: &V,
    storage: &S,
    workers: usize,
    runs_are_units: bool,
) -> bool
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    if vm.tx_count() < CHAIN_SAMPLE {
        return false;
    }
    // Pair `tx - 1, tx` for each `tx` of 1..CHAIN_SAMPLE: inside one unit?
    let inside_unit: Vec<bool> = (1..CHAIN_SAMPLE)
        .map(|tx| runs_are_units && crate::chunk::continues_run(vm, tx))
        .collect();
    let longest_run = inside_unit
        .split(|inside| !inside)
        .map(<[bool]>::len)
        .max()
        .unwrap_or(0);
    if longest_run as f64 >= CHAIN_SHARE * (CHAIN_SAMPLE - 1) as f64 {
        return true;
    }
    let judged = inside_unit.iter().filter(|inside| !**inside).count();
    let share = CHAIN_SHARE * judged as f64;
    // A transaction with its predecessor's sequence key (the same sender) declares that
    // key as its predecessor does, to write: when such pairs alone make the share, no
    // declaration is needed (it reads pre-block state: 64 of them cost 4% of 2179522).
    let sequence_keys: Vec<Option<V::Key>> =
        (0..CHAIN_SAMPLE).map(|tx| vm.sequence_key(tx)).collect();
    let in_sequence = sequence_keys
        .windows(2)
        .zip(&inside_unit)
        .filter(|(pair, inside)| !**inside && pair[0].is_some() && pair[0] == pair[1])
        .count();
    if in_sequence as f64 >= share {
        return true;
    }
    let declare = |tx| normalize(vm.declared_access(tx, &mut PreBlockView(storage)));
    let sample: Vec<Declaration<V::Key>> =
        if storage.read_latency() >= crate::workers::SLOW_READ && workers > 1 {
            let untraced = crate::trace::Tracer::new(false);
            crate::workers::map_claimed(
                workers,
                0..CHAIN_SAMPLE,
                1,
                &untraced,
                crate::trace::SpanKind::Hint,
                declare,
            )
            .0
        } else {
            (0..CHAIN_SAMPLE).map(declare).collect()
        };
    let chained = sample
        .windows(2)
        .zip(&inside_unit)
        .filter(|(pair, inside)| {
            !**inside
                && pair[1].iter().any(|(key, kind)| {
                    declared_kind(&pair[0], key).is_some_and(|other| !other.compatible(*kind))
                })
        })
        .count();
    chained as f64 >= share
}

/// Sorts by key and merges repeated keys into one, of the joined kind.
pub(crate) fn normalize<K: Ord>(mut keys: Vec<(K, AccessKind)>) -> Declaration<K> {
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(K, AccessKind)> = Vec::with_capacity(keys.len());
    for (key, kind) in keys {
        match out.last_mut() {
            Some((last, existing)) if *last == key => *existing = existing.join(kind),
            _ => out.push((key, kind)),
        }
    }
    out.into_boxed_slice()
}

/// Whether two of `declared` (a block's declarations, in normal form: each key once)
/// ask for one key in kinds that exclude each other ([`AccessKind::compatible`]: a write
/// and anything else, a read and a delta). A key's requests are all compatible exactly
/// when each is compatible with the first, so one kind per key is kept. `workers` workers
/// each take the keys of one share of the hash space, reading every declaration; all stop
/// soon after a conflict is found.
pub(crate) fn declarations_conflict<K>(declared: &[Declaration<K>], workers: usize) -> bool
where
    K: Eq + Hash + Sync,
{
    let workers = workers.max(1);
    let hasher = DefaultHashBuilder::default();
    let found = AtomicBool::new(false);
    let keys: usize = declared.iter().map(|d| d.len()).sum();
    crate::workers::run(workers, |id| {
        let mut first: HashMap<&K, AccessKind, DefaultHashBuilder> =
            HashMap::with_capacity_and_hasher(keys / workers + 1, hasher.clone());
        for (tx, declaration) in declared.iter().enumerate() {
            if tx % 256 == 0 && found.load(Relaxed) {
                return;
            }
            for (key, kind) in declaration.iter() {
                if (hasher.hash_one(key) >> 32) as usize % workers != id {
                    continue;
                }
                match first.entry(key) {
                    Entry::Vacant(entry) => {
                        entry.insert(*kind);
                    }
                    Entry::Occupied(entry) if !entry.get().compatible(*kind) => {
                        found.store(true, Relaxed);
                        return;
                    }
                    Entry::Occupied(_) => {}
                }
            }
        }
    });
    found.into_inner()
}

/// The kind `key` is declared with in `declaration`, if it is.
pub(crate) fn declared_kind<K: Ord>(
    declaration: &[(K, AccessKind)],
    key: &K,
) -> Option<AccessKind> {
    declaration
        .binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| declaration[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parex_core::{Execution, InMemoryStorage, ReadView, TxIndex, VmError, VmExecution};
    use std::sync::atomic::AtomicUsize;

    /// Transactions that declare a write of their sender's key (its sequence key), and
    /// count their declarations; those of senders from `HEAVY` up are heavy.
    struct Senders {
        senders: Vec<u32>,
        declared: AtomicUsize,
    }

    const HEAVY: u32 = 1000;

    impl Vm for Senders {
        type Key = u32;
        type Value = u64;
        type Delta = u64;
        type Output = ();

        fn tx_count(&self) -> usize {
            self.senders.len()
        }
        fn execute<R: ReadView<u32, u64>>(
            &self,
            _tx: TxIndex,
            _view: &mut R,
        ) -> Result<VmExecution<Self>, VmError> {
            Ok(Execution {
                writes: Vec::new(),
                output: (),
            })
        }
        fn apply_delta(&self, _key: &u32, value: Option<u64>, delta: &u64) -> Option<u64> {
            Some(value.unwrap_or(0) + delta)
        }
        fn merge_deltas(&self, earlier: &mut u64, later: &u64) {
            *earlier += later;
        }
        fn finalize_outputs(&self, _outputs: &mut [()]) -> Result<(), VmError> {
            Ok(())
        }
        fn sequence_key(&self, tx: TxIndex) -> Option<u32> {
            Some(self.senders[tx])
        }
        fn light_tx_equivalents_of(&self, tx: TxIndex) -> usize {
            if self.senders[tx] >= HEAVY { 5 } else { 1 }
        }
        fn declared_access<R: ReadView<u32, u64>>(
            &self,
            tx: TxIndex,
            _pre_block: &mut R,
        ) -> Vec<(u32, AccessKind)> {
            self.declared.fetch_add(1, Relaxed);
            vec![(self.senders[tx], AccessKind::Write)]
        }
    }

    /// A block that opens with one sender's run is a chain by its sequence keys alone, no
    /// declaration asked; one whose senders alternate needs the declarations, which show no
    /// chain; a smaller block is never one.
    #[test]
    fn a_run_of_one_sender_is_a_chain_without_declarations() {
        let storage = InMemoryStorage::<u32, u64>::from_iter([]);
        let block = |senders: Vec<u32>| Senders {
            senders,
            declared: AtomicUsize::new(0),
        };
        let run = block(vec![7; 100]);
        assert!(declared_chain(&run, &storage, 2, false));
        assert_eq!(run.declared.load(Relaxed), 0);
        let alternating = block((0..100).map(|tx| tx % 2).collect());
        assert!(!declared_chain(&alternating, &storage, 2, false));
        assert_eq!(alternating.declared.load(Relaxed), CHAIN_SAMPLE);
        let small = block(vec![7; CHAIN_SAMPLE - 1]);
        assert!(!declared_chain(&small, &storage, 2, false));
    }

    fn senders(senders: impl IntoIterator<Item = u32>) -> Senders {
        Senders {
            senders: senders.into_iter().collect(),
            declared: AtomicUsize::new(0),
        }
    }

    /// An engine that runs a sender's run of light transactions as one unit judges the
    /// pairs between its units: a block that opens with a run of 40 and goes on with
    /// pairs of one sender each (8889776's shape) is a chain by transaction pairs (39 + 12
    /// of 63 in sequence) but not by units; a run that fills most of the sample is a chain
    /// either way, without declarations; heavy transactions of one sender stay steps of a
    /// chain (they are units of their own: 40 light and 60 heavy ones of two senders are a
    /// chain of 24 units).
    #[test]
    fn runs_executed_as_units_are_judged_as_units() {
        let storage = InMemoryStorage::<u32, u64>::from_iter([]);
        let opening = |pair_senders: u32| {
            senders(std::iter::repeat_n(7, 40).chain((0..60).map(move |tx| pair_senders + tx / 2)))
        };
        let light = opening(10);
        assert!(declared_chain(&light, &storage, 2, false));
        assert!(!declared_chain(&light, &storage, 2, true));
        assert_eq!(light.declared.load(Relaxed), CHAIN_SAMPLE);
        let heavy = senders(std::iter::repeat_n(7, 40).chain(std::iter::repeat_n(HEAVY, 60)));
        assert!(declared_chain(&heavy, &storage, 2, true));
        for length in [49, CHAIN_SAMPLE, 100] {
            let run = senders(std::iter::repeat_n(7, length).chain(10..100));
            assert!(declared_chain(&run, &storage, 2, true), "run of {length}");
            assert_eq!(run.declared.load(Relaxed), 0);
        }
        let shorter = senders(std::iter::repeat_n(7, 48).chain(10..100));
        assert!(!declared_chain(&shorter, &storage, 2, true));
    }

    #[test]
    fn declarations_are_normalized() {
        use AccessKind::{Delta, Read, Write};
        let d = normalize(vec![
            (3, Read),
            (1, Delta),
            (3, Read),
            (1, Read),
            (2, Write),
        ]);
        assert_eq!(&*d, &[(1, Write), (2, Write), (3, Read)]);
        assert_eq!(declared_kind(&d, &2), Some(Write));
        assert_eq!(declared_kind(&d, &4), None);
    }

    /// Reads with reads and deltas with deltas are no conflict; a write with anything
    /// else, or a read with a delta, is, whichever share of the keys it falls in.
    #[test]
    fn conflicting_declarations_are_found() {
        use AccessKind::{Delta, Read, Write};
        let block = |txs: &[&[(u32, AccessKind)]]| -> Vec<Declaration<u32>> {
            txs.iter().map(|d| normalize(d.to_vec())).collect()
        };
        let free = block(&[
            &[(1, Write), (9, Delta), (5, Read)],
            &[(2, Write), (9, Delta), (5, Read)],
            &[(3, Delta), (9, Delta)],
        ]);
        for workers in 1..=4 {
            assert!(!declarations_conflict(&free, workers));
        }
        for pair in [
            [Write, Write],
            [Write, Read],
            [Read, Write],
            [Delta, Read],
            [Delta, Write],
        ] {
            let mut txs = free.clone();
            txs.push(normalize(vec![(100, pair[0])]));
            txs.push(normalize(vec![(7, Read)]));
            txs.push(normalize(vec![(100, pair[1])]));
            for workers in 1..=4 {
                assert!(
                    declarations_conflict(&txs, workers),
                    "{pair:?} on {workers}"
                );
            }
        }
        assert!(!declarations_conflict::<u32>(&[], 2));
    }
}
