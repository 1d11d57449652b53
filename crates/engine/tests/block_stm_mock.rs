//! Block-STM against the sequential engine on randomized blocks of a mock VM.
//!
//! Each mock transaction reads keys through the view, and what it writes (which keys,
//! full values or deltas, and their values) is a deterministic function of the values
//! it read, so the write set of a re-execution may differ from the previous one's.
//! Blocks range from conflict-free to heavily contended, chains and delta-heavy ones;
//! each is run with 1, 2, 4 and 8 threads, repeatedly, and must give exactly the
//! sequential outcome (or the same error).

use std::hint::black_box;

use parex_core::{Execution, InMemoryStorage, ReadView, TxIndex, Vm, VmError, Write};
use parex_engine::{EngineKind, RunOptions, block_stm, sequential};
use proptest::prelude::*;

type Key = u32;
type Value = u64;
type Delta = u64;

#[derive(Clone, Debug)]
struct MockTx {
    /// Keys read unconditionally, in order.
    reads: Vec<Key>,
    /// Read only when the first value read is odd.
    extra_read: Key,
    /// Candidate keys for full writes (each written or not depending on what was read).
    writes: Vec<Key>,
    /// Keys credited with a delta.
    deltas: Vec<Key>,
    /// Busy work, to vary execution times.
    work: u32,
}

#[derive(Clone, Debug, PartialEq)]
struct MockOutput {
    seen: u64,
    gas: u64,
    cumulative: u64,
}

struct MockVm {
    txs: Vec<MockTx>,
    /// Fail with `BadData` when the digest of the values read is 0 modulo this (0: never).
    fail_modulo: u64,
}

fn mix(mut h: u64, v: u64) -> u64 {
    h ^= v
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(h << 6)
        .wrapping_add(h >> 2);
    h.wrapping_mul(0xff51_afd7_ed55_8ccd)
}

impl Vm for MockVm {
    type Key = Key;
    type Value = Value;
    type Delta = Delta;
    type Output = MockOutput;

    fn tx_count(&self) -> usize {
        self.txs.len()
    }

    fn execute<R: ReadView<Key, Value>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<Execution<Key, Value, Delta, MockOutput>, VmError> {
        let t = &self.txs[tx];
        let mut h = tx as u64;
        let mut first = None;
        for key in &t.reads {
            let v = view.read(key)?;
            first.get_or_insert(v.unwrap_or(0));
            h = mix(h, v.map_or(u64::MAX, |v| v));
        }
        if first.is_some_and(|v| v % 2 == 1) {
            let v = view.read(&t.extra_read)?;
            h = mix(h, v.map_or(7, |v| v.wrapping_mul(3)));
        }
        let mut spin = h;
        for _ in 0..t.work {
            spin = black_box(mix(spin, 1));
        }
        if self.fail_modulo != 0 && h.is_multiple_of(self.fail_modulo) {
            return Err(VmError::BadData(format!("transaction {tx} saw digest {h}")));
        }
        let mut writes: Vec<(Key, Write<Value, Delta>)> = Vec::new();
        for (i, key) in t.writes.iter().enumerate() {
            // The write set depends on the values read: some keys are skipped.
            if (h >> (i % 48)) & 3 != 0 && !writes.iter().any(|(k, _)| k == key) {
                writes.push((*key, Write::Put(mix(h, *key as u64) % 1000)));
            }
        }
        for (i, key) in t.deltas.iter().enumerate() {
            if !writes.iter().any(|(k, _)| k == key) {
                writes.push((*key, Write::Delta((h >> (i % 32)) % 50)));
            }
        }
        Ok(Execution {
            writes,
            output: MockOutput {
                seen: h,
                gas: h % 100,
                cumulative: 0,
            },
        })
    }

    fn apply_delta(&self, _key: &Key, value: Option<Value>, delta: &Delta) -> Option<Value> {
        match value {
            Some(v) => Some(v.wrapping_add(*delta)),
            // A zero credit to an absent key leaves it absent.
            None if *delta == 0 => None,
            None => Some(*delta),
        }
    }

    fn merge_deltas(&self, earlier: &mut Delta, later: &Delta) {
        *earlier = earlier.wrapping_add(*later);
    }

    fn finalize_outputs(&self, outputs: &mut [MockOutput]) -> Result<(), VmError> {
        let mut cumulative = 0;
        for o in outputs {
            cumulative += o.gas;
            o.cumulative = cumulative;
        }
        Ok(())
    }
}

fn storage_for(keys: u32) -> InMemoryStorage<Key, Value> {
    // Two keys in three exist before the block.
    (0..keys)
        .filter(|k| k % 3 != 2)
        .map(|k| (k, (k as u64 * 37) % 101))
        .collect()
}

/// Runs block-stm with 1, 2, 4, 8 threads, one transaction or chunks of three per
/// scheduled unit, `repeat` times each, against sequential.
fn check(vm: &MockVm, keys: u32, repeat: usize) {
    let storage = storage_for(keys);
    let expected = sequential::execute(vm, &storage, &RunOptions::threads(1))
        .map(|(o, _)| o)
        .map_err(|e| e.to_string());
    for threads in [1, 2, 4, 8] {
        for _ in 0..repeat {
            for (adaptive, chunk) in [(false, 1), (true, 1), (false, 3), (true, 3)] {
                let options = block_stm::Options {
                    adaptive,
                    chunk_size: Some(chunk),
                };
                let got =
                    block_stm::execute_with(vm, &storage, &RunOptions::stress(threads), options)
                        .map(|(o, _)| o)
                        .map_err(|e| e.to_string());
                assert_eq!(
                    got, expected,
                    "threads {threads}, adaptive {adaptive}, chunk {chunk}"
                );
            }
        }
    }
}

fn tx_strategy(
    keys: u32,
    max_reads: usize,
    max_writes: usize,
    max_deltas: usize,
) -> impl Strategy<Value = MockTx> {
    (
        prop::collection::vec(0..keys, 0..=max_reads),
        0..keys,
        prop::collection::vec(0..keys, 0..=max_writes),
        prop::collection::vec(0..keys, 0..=max_deltas),
        0u32..3000,
    )
        .prop_map(|(reads, extra_read, writes, deltas, work)| MockTx {
            reads,
            extra_read,
            writes,
            deltas,
            work,
        })
}

fn block_strategy(keys: u32, txs: usize, max_deltas: usize) -> impl Strategy<Value = Vec<MockTx>> {
    prop::collection::vec(tx_strategy(keys, 4, 3, max_deltas), 0..=txs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Few keys: nearly every transaction conflicts with its neighbours.
    #[test]
    fn heavy_conflicts(txs in block_strategy(4, 120, 1)) {
        check(&MockVm { txs, fail_modulo: 0 }, 4, 3);
    }

    /// A moderate key space: some conflicts, many independent transactions.
    #[test]
    fn mixed_conflicts(txs in block_strategy(64, 200, 1)) {
        check(&MockVm { txs, fail_modulo: 0 }, 64, 2);
    }

    /// Many deltas on few keys, read now and then.
    #[test]
    fn delta_heavy(txs in prop::collection::vec(tx_strategy(6, 1, 1, 3), 0..=150)) {
        check(&MockVm { txs, fail_modulo: 0 }, 6, 3);
    }

    /// Speculative reads make some executions fail; only a failure that serial
    /// execution has may surface, and it must be the same one.
    #[test]
    fn spurious_and_real_errors(txs in block_strategy(8, 100, 1), fail_modulo in 40u64..400) {
        check(&MockVm { txs, fail_modulo }, 8, 3);
    }
}

/// Each transaction reads the key the previous one wrote: no parallelism at all.
#[test]
fn chain() {
    let txs = (0..300u32)
        .map(|i| MockTx {
            reads: vec![i],
            extra_read: i,
            writes: vec![i + 1; 8],
            deltas: vec![],
            work: 2000,
        })
        .collect();
    check(
        &MockVm {
            txs,
            fail_modulo: 0,
        },
        301,
        3,
    );
}

/// Disjoint keys, plus a delta on one shared key (the "beneficiary").
#[test]
fn no_conflicts_with_shared_delta() {
    let txs = (0..2000u32)
        .map(|i| MockTx {
            reads: vec![2 * i + 1, 2 * i + 2],
            extra_read: 2 * i + 2,
            writes: vec![2 * i + 1, 2 * i + 2, 2 * i + 1, 2 * i + 2],
            deltas: vec![0],
            work: 100,
        })
        .collect();
    check(
        &MockVm {
            txs,
            fail_modulo: 0,
        },
        4002,
        2,
    );
}

/// The engine is reachable by name, and an empty block works.
#[test]
fn dispatch_and_empty_block() {
    let kind = EngineKind::parse("block-stm").expect("block-stm is registered");
    assert!(EngineKind::ALL.contains(&kind));
    let vm = MockVm {
        txs: vec![],
        fail_modulo: 0,
    };
    let (outcome, _) = kind.execute(&vm, &storage_for(1), 4).unwrap();
    assert!(outcome.tx_outcomes.is_empty() && outcome.state_diff.is_empty());
}

/// A conflict-heavy block reports its re-executions and validations.
#[test]
fn metrics_are_filled() {
    let txs = (0..200u32)
        .map(|i| MockTx {
            reads: vec![i % 3],
            extra_read: 0,
            writes: vec![i % 3; 4],
            deltas: vec![],
            work: 20,
        })
        .collect();
    let vm = MockVm {
        txs,
        fail_modulo: 0,
    };
    let options = block_stm::Options {
        adaptive: false,
        chunk_size: Some(1),
    };
    let (_, m) =
        block_stm::execute_with(&vm, &storage_for(3), &RunOptions::threads(4), options).unwrap();
    assert!(m.executions >= 200);
    assert_eq!(m.reexecutions, m.executions - 200);
    assert!(m.validations >= 200);
}

/// A fully dependent chain comes out exact with the fallback on (it is usually handed to
/// `sequential`, unless one worker ran alone, which a loaded machine can cause; the rule
/// itself is unit-tested in block_stm.rs); a conflict-free block never falls back.
#[test]
fn dependent_blocks_fall_back_and_independent_ones_do_not() {
    let fallback = |m: &parex_engine::Metrics| {
        m.extra
            .iter()
            .find(|(name, _)| *name == "sequential_fallback")
            .map(|e| e.1)
    };
    let chain = MockVm {
        txs: (0..2000u32)
            .map(|_| MockTx {
                reads: vec![0],
                extra_read: 0,
                writes: vec![0],
                deltas: vec![],
                work: 200,
            })
            .collect(),
        fail_modulo: 0,
    };
    // Two workers must really run side by side (tests share rayon's global pool).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let storage = storage_for(1);
    let expected = sequential::execute(&chain, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    let (outcome, m) = pool
        .install(|| block_stm::execute(&chain, &storage, &RunOptions::threads(2)))
        .unwrap();
    assert_eq!(outcome, expected);
    assert!(matches!(fallback(&m), Some(0 | 1)), "{m:?}");
    let independent = MockVm {
        txs: (0..2000u32)
            .map(|i| MockTx {
                reads: vec![i],
                extra_read: 0,
                writes: vec![i],
                deltas: vec![],
                work: 200,
            })
            .collect(),
        fail_modulo: 0,
    };
    let storage = storage_for(2000);
    let (_, m) = block_stm::execute(&independent, &storage, &RunOptions::threads(2)).unwrap();
    assert_eq!(fallback(&m), Some(0), "{m:?}");
}
