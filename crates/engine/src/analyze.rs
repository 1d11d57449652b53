//! What parallelism a block really allows, measured from a serial run's read and write
//! sets (`parex analyze`).
//!
//! [`analyze`] executes the block once, in order, like [`crate::sequential`], and records
//! for every transaction the keys it read and which earlier transactions wrote the value
//! it saw. A full write ([`Write::Put`]) replaces the value, so a later read depends on
//! the last full writer and on every delta written after it; a [`Write::Delta`] (the
//! beneficiary's fee credit) is commutative, so the *writer* of a delta depends on
//! nothing, but a later *read* of the key depends on it. Writes without a read (blind
//! writes) create no dependency: only read-after-write is a true dependency.
//!
//! The result is a [`DependencyGraph`]: transactions weighted by gas, each with its
//! direct predecessors. From it: the critical path (longest chain, in transactions and
//! in gas), the ideal speedup bound (total gas / critical-path gas: what infinitely
//! many threads could reach if time were proportional to gas), the bound at a given
//! thread count by greedy list scheduling, and the histogram of dependency distances.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use parex_core::{ReadError, ReadView, Storage, TxIndex, Vm, VmError, Write};

use crate::EngineError;

/// Transactions weighted by gas, each with the earlier transactions it read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DependencyGraph {
    /// Gas of each transaction (the weight used for critical path and scheduling).
    pub gas: Vec<u64>,
    /// For each transaction, its direct predecessors: sorted, distinct, all below it.
    pub preds: Vec<Vec<TxIndex>>,
}

/// One bucket of the dependency-distance histogram: dependencies `(i, j)` with
/// `min <= j - i <= max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistanceBucket {
    pub min: usize,
    pub max: usize,
    pub count: usize,
}

impl DependencyGraph {
    /// A graph from per-transaction gas and predecessor lists (sorted and deduplicated
    /// here). Panics if a predecessor is not an earlier transaction.
    pub fn new(gas: Vec<u64>, preds: Vec<Vec<TxIndex>>) -> Self {
        assert_eq!(gas.len(), preds.len(), "one gas value per transaction");
        let preds = preds
            .into_iter()
            .enumerate()
            .map(|(j, mut p)| {
                p.sort_unstable();
                p.dedup();
                assert!(
                    p.iter().all(|&i| i < j),
                    "tx {j}: predecessors must be earlier"
                );
                p
            })
            .collect();
        Self { gas, preds }
    }

    pub fn txs(&self) -> usize {
        self.gas.len()
    }

    pub fn total_gas(&self) -> u64 {
        self.gas.iter().sum()
    }

    /// Transactions that depend on at least one earlier transaction.
    pub fn dependent_txs(&self) -> usize {
        self.preds.iter().filter(|p| !p.is_empty()).count()
    }

    /// `dependent_txs / txs` (0 for an empty block).
    pub fn dependent_ratio(&self) -> f64 {
        if self.txs() == 0 {
            0.0
        } else {
            self.dependent_txs() as f64 / self.txs() as f64
        }
    }

    /// Direct dependencies (distinct predecessor/successor pairs).
    pub fn dependencies(&self) -> usize {
        self.preds.iter().map(Vec::len).sum()
    }

    /// Longest chain of dependent transactions, counted in transactions.
    pub fn critical_path_txs(&self) -> usize {
        self.longest_path(|_| 1) as usize
    }

    /// Longest chain of dependent transactions, weighted by gas.
    pub fn critical_path_gas(&self) -> u64 {
        self.longest_path(|j| self.gas[j])
    }

    /// Total gas / critical-path gas: the speedup no number of threads can beat when
    /// execution time is proportional to gas. 1.0 for a block without gas.
    pub fn ideal_speedup(&self) -> f64 {
        ratio(self.total_gas(), self.critical_path_gas())
    }

    /// Total gas / makespan of a greedy list schedule on `threads` threads: a
    /// transaction becomes ready when all its predecessors have finished; whenever a
    /// thread is free it takes the ready transaction with the lowest index. 1.0 for a
    /// block without gas.
    pub fn speedup_bound(&self, threads: usize) -> f64 {
        ratio(self.total_gas(), self.list_schedule_makespan(threads))
    }

    /// Makespan (in gas) of the greedy list schedule described at [`Self::speedup_bound`].
    pub fn list_schedule_makespan(&self, threads: usize) -> u64 {
        let n = self.txs();
        let threads = threads.max(1);
        let mut succs: Vec<Vec<TxIndex>> = vec![Vec::new(); n];
        let mut waiting: Vec<usize> = vec![0; n];
        for (j, preds) in self.preds.iter().enumerate() {
            waiting[j] = preds.len();
            for &i in preds {
                succs[i].push(j);
            }
        }
        let mut ready: BTreeSet<TxIndex> = (0..n).filter(|&j| waiting[j] == 0).collect();
        // (finish time, tx), earliest first.
        let mut running: BinaryHeap<Reverse<(u64, TxIndex)>> = BinaryHeap::new();
        let mut now = 0u64;
        let mut done = 0usize;
        loop {
            while running.len() < threads
                && let Some(tx) = ready.pop_first()
            {
                running.push(Reverse((now + self.gas[tx], tx)));
            }
            let Some(Reverse((finish, _))) = running.peek().copied() else {
                break;
            };
            now = finish;
            while let Some(&Reverse((t, tx))) = running.peek() {
                if t != now {
                    break;
                }
                running.pop();
                done += 1;
                for &s in &succs[tx] {
                    waiting[s] -= 1;
                    if waiting[s] == 0 {
                        ready.insert(s);
                    }
                }
            }
        }
        debug_assert_eq!(
            done, n,
            "every transaction is scheduled (the graph is acyclic)"
        );
        now
    }

    /// Histogram of dependency distances `j - i` over all direct dependencies, in
    /// buckets 1, 2, 3–4, 5–8, 9–16, ... up to the bucket holding the largest possible
    /// distance (`txs - 1`), so that blocks of the same size have the same buckets.
    pub fn distance_histogram(&self) -> Vec<DistanceBucket> {
        let n = self.txs();
        if n < 2 {
            return Vec::new();
        }
        let mut buckets: Vec<DistanceBucket> = (0..=bucket_of(n - 1))
            .map(|b| {
                let (min, max) = bucket_range(b);
                DistanceBucket { min, max, count: 0 }
            })
            .collect();
        for (j, preds) in self.preds.iter().enumerate() {
            for &i in preds {
                buckets[bucket_of(j - i)].count += 1;
            }
        }
        buckets
    }

    fn longest_path(&self, weight: impl Fn(TxIndex) -> u64) -> u64 {
        // Predecessors are earlier, so block order is a topological order.
        let mut longest: Vec<u64> = Vec::with_capacity(self.txs());
        let mut best = 0u64;
        for (j, preds) in self.preds.iter().enumerate() {
            let before = preds.iter().map(|&i| longest[i]).max().unwrap_or(0);
            let here = before + weight(j);
            best = best.max(here);
            longest.push(here);
        }
        best
    }
}

fn ratio(total: u64, part: u64) -> f64 {
    if part == 0 {
        1.0
    } else {
        total as f64 / part as f64
    }
}

/// Bucket of a distance `d >= 1`: 0 for 1, 1 for 2, 2 for 3–4, 3 for 5–8, ...
fn bucket_of(d: usize) -> usize {
    debug_assert!(d >= 1);
    if d == 1 {
        0
    } else {
        (usize::BITS - (d - 1).leading_zeros()) as usize
    }
}

fn bucket_range(b: usize) -> (usize, usize) {
    if b == 0 {
        (1, 1)
    } else {
        ((1 << (b - 1)) + 1, 1 << b)
    }
}

/// A key through which transactions depend on each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotKey<K> {
    pub key: K,
    /// Transactions that wrote the key (full writes and deltas).
    pub writers: usize,
    /// Reads of the key by a transaction after some earlier transaction wrote it.
    pub dependent_reads: usize,
}

/// The dependency structure of a block.
#[derive(Clone, Debug)]
pub struct BlockAnalysis<K> {
    pub graph: DependencyGraph,
    /// Keys with a dependent read or more than one writer, most dependent reads first
    /// (then most writers), at most the number asked for.
    pub hot_keys: Vec<HotKey<K>>,
}

/// What the serial run knows about one key.
struct KeyState<V> {
    value: Option<V>,
    /// Last transaction that wrote a full value.
    last_put: Option<TxIndex>,
    /// Transactions that wrote a delta since `last_put`.
    deltas: Vec<TxIndex>,
    writers: usize,
    dependent_reads: usize,
    /// Last transaction that read the key (each transaction's reads count once).
    last_reader: Option<TxIndex>,
}

struct RecordingView<'a, K, V, S> {
    tx: TxIndex,
    keys: &'a mut HashMap<K, KeyState<V>, alloy_primitives::map::DefaultHashBuilder>,
    preds: &'a mut Vec<TxIndex>,
    storage: &'a S,
}

impl<K, V, S> RecordingView<'_, K, V, S>
where
    K: Clone + Eq + std::hash::Hash,
    S: Storage<Key = K, Value = V>,
{
    fn state(&mut self, key: &K) -> Result<&mut KeyState<V>, ReadError> {
        Ok(match self.keys.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(KeyState {
                value: self.storage.read(key)?,
                last_put: None,
                deltas: Vec::new(),
                writers: 0,
                dependent_reads: 0,
                last_reader: None,
            }),
        })
    }
}

impl<K, V, S> ReadView<K, V> for RecordingView<'_, K, V, S>
where
    K: Clone + Eq + std::hash::Hash,
    V: Clone,
    S: Storage<Key = K, Value = V>,
{
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError> {
        let tx = self.tx;
        let mut preds = std::mem::take(self.preds);
        let state = self.state(key)?;
        if state.last_reader != Some(tx) {
            state.last_reader = Some(tx);
            let before = preds.len();
            preds.extend(state.last_put);
            preds.extend_from_slice(&state.deltas);
            if preds.len() > before {
                state.dependent_reads += 1;
            }
        }
        let value = state.value.clone();
        *self.preds = preds;
        Ok(value)
    }
}

/// Executes `vm`'s block serially on `storage`, recording read and write sets, and
/// returns its dependency graph (weights from `gas`, e.g. `|o: &TxOutcome| o.gas_used`)
/// and its `hot_keys` hottest keys.
pub fn analyze<V, S>(
    vm: &V,
    storage: &S,
    gas: impl Fn(&V::Output) -> u64,
    hot_keys: usize,
) -> Result<BlockAnalysis<V::Key>, EngineError>
where
    V: Vm,
    S: Storage<Key = V::Key, Value = V::Value>,
{
    let n = vm.tx_count();
    let mut keys = HashMap::default();
    let mut all_preds = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    for tx in 0..n {
        let mut preds = Vec::new();
        let mut view = RecordingView {
            tx,
            keys: &mut keys,
            preds: &mut preds,
            storage,
        };
        let execution = vm.execute(tx, &mut view)?;
        for (key, write) in execution.writes {
            let state = view.state(&key).map_err(VmError::from)?;
            state.writers += 1;
            match write {
                Write::Put(value) => {
                    state.value = Some(value);
                    state.last_put = Some(tx);
                    state.deltas.clear();
                }
                Write::Delta(delta) => {
                    state.value = vm.apply_delta(&key, state.value.take(), &delta);
                    state.deltas.push(tx);
                }
            }
        }
        all_preds.push(preds);
        outputs.push(execution.output);
    }
    vm.finalize_outputs(&mut outputs)?;
    let graph = DependencyGraph::new(outputs.iter().map(gas).collect(), all_preds);
    let mut hot: Vec<HotKey<V::Key>> = keys
        .into_iter()
        .filter(|(_, s)| s.dependent_reads > 0 || s.writers > 1)
        .map(|(key, s)| HotKey {
            key,
            writers: s.writers,
            dependent_reads: s.dependent_reads,
        })
        .collect();
    hot.sort_unstable_by(|a, b| {
        (b.dependent_reads, b.writers)
            .cmp(&(a.dependent_reads, a.writers))
            .then_with(|| a.key.cmp(&b.key))
    });
    hot.truncate(hot_keys);
    Ok(BlockAnalysis {
        graph,
        hot_keys: hot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parex_core::{Execution, InMemoryStorage};

    /// A transaction of the mock block: keys read, keys written (full), keys credited.
    #[derive(Clone, Default)]
    struct Tx {
        reads: Vec<u32>,
        puts: Vec<u32>,
        deltas: Vec<u32>,
        gas: u64,
    }

    struct MockVm(Vec<Tx>);

    impl Vm for MockVm {
        type Key = u32;
        type Value = u64;
        type Delta = u64;
        type Output = u64;
        fn tx_count(&self) -> usize {
            self.0.len()
        }
        fn execute<R: ReadView<u32, u64>>(
            &self,
            tx: TxIndex,
            view: &mut R,
        ) -> Result<Execution<u32, u64, u64, u64>, VmError> {
            let t = &self.0[tx];
            let mut sum = 0;
            for k in &t.reads {
                sum += view.read(k)?.unwrap_or(0);
            }
            let mut writes: Vec<_> = t.puts.iter().map(|k| (*k, Write::Put(sum + 1))).collect();
            writes.extend(t.deltas.iter().map(|k| (*k, Write::Delta(1))));
            Ok(Execution {
                writes,
                output: t.gas,
            })
        }
        fn apply_delta(&self, _: &u32, value: Option<u64>, delta: &u64) -> Option<u64> {
            Some(value.unwrap_or(0) + delta)
        }
        fn merge_deltas(&self, earlier: &mut u64, later: &u64) {
            *earlier += later;
        }
        fn finalize_outputs(&self, _: &mut [u64]) -> Result<(), VmError> {
            Ok(())
        }
    }

    fn run(txs: Vec<Tx>) -> BlockAnalysis<u32> {
        let storage: InMemoryStorage<u32, u64> = (0..100).map(|k| (k, 5)).collect();
        analyze(&MockVm(txs), &storage, |g| *g, 10).unwrap()
    }

    fn tx(reads: &[u32], puts: &[u32], gas: u64) -> Tx {
        Tx {
            reads: reads.to_vec(),
            puts: puts.to_vec(),
            deltas: Vec::new(),
            gas,
        }
    }

    #[test]
    fn a_chain_has_no_parallelism() {
        // Each transaction reads key 0 and writes it.
        let a = run((0..6).map(|_| tx(&[0], &[0], 100)).collect());
        let g = &a.graph;
        assert_eq!(g.preds[0], Vec::<usize>::new());
        for j in 1..6 {
            assert_eq!(g.preds[j], vec![j - 1]);
        }
        assert_eq!(g.dependent_txs(), 5);
        assert_eq!(g.critical_path_txs(), 6);
        assert_eq!(g.critical_path_gas(), 600);
        assert_eq!(g.ideal_speedup(), 1.0);
        for threads in [1, 2, 8, 32] {
            assert_eq!(g.speedup_bound(threads), 1.0);
        }
        let h = g.distance_histogram();
        assert_eq!(
            h[0],
            DistanceBucket {
                min: 1,
                max: 1,
                count: 5
            }
        );
        assert!(h[1..].iter().all(|b| b.count == 0));
        assert_eq!(
            a.hot_keys,
            vec![HotKey {
                key: 0,
                writers: 6,
                dependent_reads: 5
            }]
        );
    }

    #[test]
    fn independent_transactions_scale_with_threads() {
        let n = 10;
        let a = run((0..n).map(|i| tx(&[i], &[i], 50)).collect());
        let g = &a.graph;
        assert_eq!(g.dependent_txs(), 0);
        assert_eq!(g.dependent_ratio(), 0.0);
        assert_eq!(g.critical_path_txs(), 1);
        assert_eq!(g.ideal_speedup(), n as f64);
        assert_eq!(g.speedup_bound(1), 1.0);
        assert_eq!(g.speedup_bound(2), 2.0);
        // 10 equal transactions on 8 threads take two rounds.
        assert_eq!(g.speedup_bound(8), 5.0);
        assert_eq!(g.speedup_bound(32), n as f64);
        assert!(g.distance_histogram().iter().all(|b| b.count == 0));
        assert!(a.hot_keys.is_empty());
    }

    #[test]
    fn a_diamond() {
        // 0 writes a and b; 1 reads a, writes c; 2 reads b, writes d; 3 reads c and d.
        let a = run(vec![
            tx(&[], &[1, 2], 10),
            tx(&[1], &[3], 40),
            tx(&[2], &[4], 20),
            tx(&[3, 4], &[], 30),
        ]);
        let g = &a.graph;
        assert_eq!(g.preds, vec![vec![], vec![0], vec![0], vec![1, 2]]);
        assert_eq!(g.dependent_txs(), 3);
        assert_eq!(g.dependent_ratio(), 0.75);
        assert_eq!(g.critical_path_txs(), 3);
        assert_eq!(g.critical_path_gas(), 80);
        assert_eq!(g.total_gas(), 100);
        assert_eq!(g.ideal_speedup(), 100.0 / 80.0);
        assert_eq!(g.list_schedule_makespan(1), 100);
        assert_eq!(g.list_schedule_makespan(2), 80);
        let h = g.distance_histogram();
        assert_eq!(
            h,
            vec![
                DistanceBucket {
                    min: 1,
                    max: 1,
                    count: 2
                },
                DistanceBucket {
                    min: 2,
                    max: 2,
                    count: 2
                },
                DistanceBucket {
                    min: 3,
                    max: 4,
                    count: 0
                },
            ]
        );
    }

    #[test]
    fn deltas_commute_but_reads_depend_on_them() {
        // 0..3 credit key 9 (like the fee credit): independent. 4 reads key 9: it
        // depends on all of them. 5 writes key 9 blindly (no dependency); 6 reads it
        // and depends on 5 only.
        let credit = Tx {
            deltas: vec![9],
            gas: 10,
            ..Tx::default()
        };
        let a = run(vec![
            credit.clone(),
            credit.clone(),
            credit.clone(),
            credit,
            tx(&[9], &[], 10),
            tx(&[], &[9], 10),
            tx(&[9], &[], 10),
        ]);
        let g = &a.graph;
        assert_eq!(
            g.preds,
            vec![
                vec![],
                vec![],
                vec![],
                vec![],
                vec![0, 1, 2, 3],
                vec![],
                vec![5]
            ]
        );
        assert_eq!(g.critical_path_txs(), 2);
        assert_eq!(
            a.hot_keys,
            vec![HotKey {
                key: 9,
                writers: 5,
                dependent_reads: 2
            }]
        );
        // Distances 4, 3, 2, 1 and 1.
        let counts: Vec<usize> = g.distance_histogram().iter().map(|b| b.count).collect();
        assert_eq!(counts, vec![2, 1, 2, 0]);
    }

    #[test]
    fn greedy_schedule_takes_the_lowest_ready_index() {
        // 0 (gas 10) -> 2 (gas 10); 1 (gas 30) independent. On 2 threads: 0 and 1 start,
        // 2 starts at 10 and ends at 20, 1 ends at 30.
        let g = DependencyGraph::new(vec![10, 30, 10], vec![vec![], vec![], vec![0]]);
        assert_eq!(g.list_schedule_makespan(2), 30);
        assert_eq!(g.list_schedule_makespan(1), 50);
        assert_eq!(g.critical_path_gas(), 30);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(4), 2);
        assert_eq!(bucket_of(5), 3);
        assert_eq!(bucket_of(16), 4);
        assert_eq!(bucket_of(17), 5);
        assert_eq!(bucket_range(4), (9, 16));
    }

    #[test]
    fn empty_and_gasless_blocks() {
        let g = DependencyGraph::default();
        assert_eq!(g.ideal_speedup(), 1.0);
        assert_eq!(g.speedup_bound(2), 1.0);
        assert!(g.distance_histogram().is_empty());
        let g = DependencyGraph::new(vec![0, 0], vec![vec![], vec![0]]);
        assert_eq!(g.ideal_speedup(), 1.0);
        assert_eq!(g.critical_path_txs(), 2);
    }
}
