//! Every parallel engine (`EngineKind::ALL` less `sequential`) against the sequential
//! engine on randomized blocks of a mock VM: conflicts, deltas, chains, write sets that
//! change with the values read, and VM errors and panics that speculative executions hit
//! spuriously (stale reads) or that serial execution hits too. Only the serial failure
//! may surface, and it must be the same one (a panic becomes `VmError::Internal`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use parex_core::{InMemoryStorage, Storage, TxIndex, VmError};
use parex_engine::{
    EngineKind, Metrics, RunOptions, VmOutcome, block_stm, dag, optimistic, sequential,
};
use proptest::prelude::*;

mod mock;

use mock::*;

/// Silences the mock's own (expected) panics; other panics print as usual.
fn quiet_mock_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mock = info
                .payload()
                .downcast_ref::<String>()
                .is_some_and(|m| m.starts_with(PANIC_PREFIX));
            if !mock {
                default(info);
            }
        }));
    });
}

/// What serial execution gives: the outcome, or the error (a panic at transaction `t`
/// as the `VmError::Internal` the parallel engines report for it).
fn serial(vm: &MockVm, storage: &InMemoryStorage<Key, Value>) -> Result<VmOutcome<MockVm>, String> {
    quiet_mock_panics();
    match catch_unwind(AssertUnwindSafe(|| {
        sequential::execute(vm, storage, &RunOptions::threads(1))
    })) {
        Ok(result) => result.map(|(o, _)| o).map_err(|e| e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .expect("only the mock panics")
                .clone();
            let tx: TxIndex = message[PANIC_PREFIX.len()..].parse().unwrap();
            Err(VmError::Internal {
                tx,
                message: format!("panicked during execution: {message}"),
            }
            .to_string())
        }
    }
}

fn parallel_engines() -> impl Iterator<Item = EngineKind> {
    EngineKind::ALL
        .iter()
        .copied()
        .filter(|&k| k != EngineKind::Sequential)
}

/// Runs every parallel engine with 1, 2, 4, 8 threads, `repeat` times each.
fn check(vm: &MockVm, keys: u32, repeat: usize) {
    check_engines(vm, keys, repeat, parallel_engines());
}

fn check_engines(vm: &MockVm, keys: u32, repeat: usize, engines: impl Iterator<Item = EngineKind>) {
    let storage = storage_for(keys);
    let expected = serial(vm, &storage);
    for engine in engines {
        for threads in [1, 2, 4, 8] {
            for _ in 0..repeat {
                let got = catch_unwind(AssertUnwindSafe(|| {
                    engine.run(vm, &storage, &RunOptions::stress(threads))
                }))
                .unwrap_or_else(|_| panic!("{engine} on {threads} threads panicked"))
                .map(|(o, _)| o)
                .map_err(|e| e.to_string());
                assert_eq!(got, expected, "{engine} on {threads} threads");
            }
        }
        if engine == EngineKind::BlockStm {
            // Chunks of transactions as scheduled units: a panic or error in a chunk
            // must still name its own transaction.
            for threads in [1, 2, 4] {
                let options = block_stm::Options {
                    adaptive: false,
                    chunk_size: Some(4),
                };
                let got = catch_unwind(AssertUnwindSafe(|| {
                    block_stm::execute_with(vm, &storage, &RunOptions::stress(threads), options)
                }))
                .unwrap_or_else(|_| panic!("chunked block-stm on {threads} threads panicked"))
                .map(|(o, _)| o)
                .map_err(|e| e.to_string());
                assert_eq!(got, expected, "chunked block-stm on {threads} threads");
            }
        }
        if engine == EngineKind::Dag {
            // The DAG itself, on blocks it would hand to another engine.
            for threads in [1, 2, 4] {
                let options = dag::Options { adaptive: false };
                let got = dag::execute_with(vm, &storage, &RunOptions::stress(threads), options)
                    .map(|(o, _)| o)
                    .map_err(|e| e.to_string());
                assert_eq!(got, expected, "non-adaptive dag on {threads} threads");
            }
        }
    }
}

/// A block where transaction `i` reads what `i - 1` wrote for runs of `run` transactions
/// (chains of adjacent dependencies), the runs independent of each other.
fn chains(txs: u32, run: u32) -> Vec<MockTx> {
    (0..txs)
        .map(|i| {
            let chain = i / run;
            let key = 1000 + chain * (run + 1) + i % run;
            MockTx {
                reads: vec![key],
                extra_read: key,
                writes: vec![key + 1; 8],
                deltas: vec![0],
                work: 300,
                declared: Vec::new(),
                sequence: None,
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Few keys: nearly every transaction conflicts with its neighbours.
    #[test]
    fn heavy_conflicts(txs in block_strategy(4, 100, 1)) {
        check(&vm(txs), 4, 2);
    }

    /// A moderate key space: some conflicts, many independent transactions.
    #[test]
    fn mixed_conflicts(txs in block_strategy(64, 160, 1)) {
        check(&vm(txs), 64, 2);
    }

    /// Many deltas on few keys, read now and then.
    #[test]
    fn delta_heavy(txs in prop::collection::vec(tx_strategy(6, 1, 1, 3), 0..=120)) {
        check(&vm(txs), 6, 2);
    }

    /// Speculative reads make some executions fail or panic; only a failure that
    /// serial execution has may surface, and it must be the same one.
    #[test]
    fn spurious_and_real_errors_and_panics(
        txs in block_strategy(8, 100, 1),
        fail_modulo in prop_oneof![Just(0u64), 40u64..400],
        panic_modulo in prop_oneof![Just(0u64), 40u64..400],
    ) {
        let vm = MockVm { txs, fail_modulo, panic_modulo, sequence_gate: None, sinks: vec![0] };
        check(&vm, 8, 2);
    }

    /// Independent chains of adjacent dependencies, with random breaks and extra reads.
    #[test]
    fn chains_with_noise(run in 1u32..40, noise in prop::collection::vec((0usize..200, 0u32..3000), 0..10)) {
        let mut txs = chains(200, run);
        for (i, key) in noise {
            txs[i].reads.push(1000 + key);
        }
        check(&vm(txs), 1, 2);
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
            deltas: vec![0],
            work: 1000,
            declared: Vec::new(),
            sequence: None,
        })
        .collect();
    check(&vm(txs), 301, 2);
}

/// Disjoint keys, plus a delta on one shared key (the "beneficiary"), read by a few.
#[test]
fn no_conflicts_with_shared_delta() {
    let txs = (0..2000u32)
        .map(|i| MockTx {
            reads: if i % 500 == 7 {
                vec![2 * i + 1, 0]
            } else {
                vec![2 * i + 1, 2 * i + 2]
            },
            extra_read: 2 * i + 2,
            writes: vec![2 * i + 1, 2 * i + 2, 2 * i + 1, 2 * i + 2],
            deltas: vec![0],
            work: 100,
            declared: Vec::new(),
            sequence: None,
        })
        .collect();
    check(&vm(txs), 4002, 2);
}

/// A block whose hinted DAG has no edge is its hints (`dag` commits them without
/// scheduling: `hints_committed`), deltas to a key nobody reads and blind writes of one
/// key by several transactions included (applied in block order); one read of the delta
/// key adds edges, and the DAG runs as usual. Both equal serial execution.
#[test]
fn dag_commits_hints_of_a_block_without_edges() {
    let block = |read_sink: bool| {
        vm((0..600u32)
            .map(|i| MockTx {
                reads: if read_sink && i == 300 {
                    vec![2 * i + 1, 0]
                } else {
                    vec![2 * i + 1]
                },
                extra_read: 2 * i + 1,
                // Key 5000 is written, never read, by every transaction that writes.
                writes: vec![2 * i + 2, 5000],
                deltas: vec![0, 5001],
                work: 100,
                declared: Vec::new(),
                sequence: None,
            })
            .collect())
    };
    let storage = storage_for(5002);
    for (read_sink, committed) in [(false, 1), (true, 0)] {
        let vm = block(read_sink);
        let expected = sequential::execute(&vm, &storage, &RunOptions::threads(1))
            .unwrap()
            .0;
        for threads in [1, 2, 4] {
            let (outcome, m) = EngineKind::Dag
                .run(&vm, &storage, &RunOptions::stress(threads))
                .unwrap();
            assert_eq!(
                outcome, expected,
                "reads the sink: {read_sink}, {threads} threads"
            );
            assert_eq!(extra(&m, "hints_committed"), committed, "{m:?}");
        }
    }
}

/// The engines are reachable by name, and an empty block works.
#[test]
fn dispatch_and_empty_block() {
    for name in ["optimistic", "dag"] {
        let kind = EngineKind::parse(name).expect("registered");
        assert!(EngineKind::ALL.contains(&kind));
        let (outcome, _) = kind.execute(&vm(vec![]), &storage_for(1), 4).unwrap();
        assert!(outcome.tx_outcomes.is_empty() && outcome.state_diff.is_empty());
    }
}

/// A chain is recognized from its declarations on slow storage too (where the sample's
/// declarations are taken in parallel): every parallel engine runs it in order, over the
/// pre-block values that a discovery pass read in batches first.
#[test]
fn chains_on_slow_storage_run_in_order() {
    let chain = vm((0..200u32)
        .map(|_| MockTx {
            reads: vec![0],
            extra_read: 0,
            writes: vec![0],
            deltas: vec![],
            work: 50,
            declared: vec![(0, parex_core::AccessKind::Write)],
            sequence: None,
        })
        .collect());
    let inner = storage_for(1);
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_micros(20));
    let expected = sequential::execute(&chain, &inner, &RunOptions::threads(1))
        .unwrap()
        .0;
    for &kind in EngineKind::ALL {
        if kind == EngineKind::Sequential {
            continue;
        }
        let waits_before = slow.waits();
        let (outcome, m) = kind.run(&chain, &slow, &RunOptions::threads(2)).unwrap();
        assert_eq!(outcome, expected, "{kind}");
        // The declarations say chain: every engine runs it in order, after a discovery
        // pass that read its keys in batches.
        assert_eq!(extra(&m, "sequential_fallback"), 1, "{kind}: {m:?}");
        assert_eq!(m.executions, 200, "{kind}: {m:?}");
        assert!(extra(&m, "discovery_executions") > 0, "{kind}: {m:?}");
        // Its one key is read once, by discovery, before anything else: the declarations
        // (which read it) and the run in order find it cached.
        assert_eq!(slow.waits() - waits_before, 1, "{kind}: {m:?}");
        assert_eq!(extra(&m, "prefetched"), 1, "{kind}: {m:?}");
    }
}

#[test]
fn a_lone_worker_on_slow_storage_finds_the_rest_of_the_block_loaded() {
    // A chain through key 0, each transaction also reading a key of its own, which it
    // declares, when the value it read from key 0 is odd: discovery (on the pre-block
    // value, even) does not find those keys, so executions wait for them; once a worker
    // goes on alone, the stopped ones load them ahead of it. Key 0 is not declared, so
    // the declarations do not show the chain up front.
    let n = 1000u32;
    let chain = vm((0..n)
        .map(|i| MockTx {
            reads: vec![0],
            extra_read: 1 + i,
            writes: vec![0],
            deltas: vec![],
            work: 10,
            declared: vec![(1 + i, parex_core::AccessKind::Read)],
            sequence: None,
        })
        .collect());
    let inner = storage_for(n + 1);
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_micros(20));
    let expected = sequential::execute(&chain, &inner, &RunOptions::threads(1))
        .unwrap()
        .0;
    let mut gave_up = 0;
    for _ in 0..3 {
        let (outcome, m) = EngineKind::BlockStm
            .run(&chain, &slow, &RunOptions::threads(2))
            .unwrap();
        assert_eq!(outcome, expected);
        if extra(&m, "finished_alone") == 1 {
            gave_up += 1;
            // Loaded ahead of the lone worker by the stopped workers (discovery found
            // only key 0).
            assert!(extra(&m, "preloaded") > 0, "{m:?}");
            assert_eq!(extra(&m, "prefetched"), 1, "{m:?}");
            assert!(
                extra(&m, "preloaded") <= extra(&m, "storage_reads"),
                "{m:?}"
            );
        } else {
            assert_eq!(extra(&m, "preloaded"), 0, "{m:?}");
        }
    }
    // Speculating on a chain is mostly waste: block-stm gives up on it (every time, here).
    assert!(gave_up > 0, "block-stm never went on alone");
}

/// Every parallel engine on slow storage discovers the keys its transactions read and
/// loads them in batches ahead of its executions (`block-stm` and `optimistic` as they
/// start, the others in a pass before theirs): every key is still read from storage once,
/// with fewer waits than keys, and the outcome is exact.
#[test]
fn slow_storage_keys_are_prefetched_in_batches() {
    // Each transaction reads three keys of its own, one after another (the second and
    // third are found only once the first is loaded), and writes the last.
    let n = 96u32;
    let block = vm((0..n)
        .map(|i| MockTx {
            reads: vec![3 * i, 3 * i + 1, 3 * i + 2],
            extra_read: 3 * i,
            writes: vec![3 * i + 2],
            deltas: vec![],
            work: 5,
            declared: vec![],
            sequence: None,
        })
        .collect());
    let inner = storage_for(3 * n);
    // Slow enough that every discovery round of these light transactions is within its
    // budget (a share of one read).
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_millis(2));
    let expected = sequential::execute(&block, &inner, &RunOptions::threads(1))
        .unwrap()
        .0;
    let keys = u64::from(3 * n);
    for &kind in &EngineKind::ALL[1..] {
        let (mut prefetched, mut batches) = (0, 0);
        for _ in 0..2 {
            let waits_before = slow.waits();
            let (outcome, m) = kind.run(&block, &slow, &RunOptions::threads(2)).unwrap();
            assert_eq!(outcome, expected, "{kind}");
            if kind == EngineKind::BlockStm {
                assert_eq!(extra(&m, "storage_reads"), keys, "{m:?}");
            }
            assert!(extra(&m, "prefetched") <= keys, "{kind}: {m:?}");
            assert!(extra(&m, "discovery_executions") >= extra(&m, "prefetch_batches"));
            // Every key is read once (by discovery in a batch, or alone by an execution),
            // never twice: keys read alone wait once each, batches once per batch.
            assert_eq!(
                slow.waits() - waits_before,
                keys - extra(&m, "prefetched") + extra(&m, "prefetch_batches"),
                "{kind}: {m:?}"
            );
            prefetched += extra(&m, "prefetched");
            batches += extra(&m, "prefetch_batches");
        }
        assert!(prefetched > 0, "{kind}: nothing prefetched");
        assert!(
            batches < prefetched,
            "{kind}: {batches} batches for {prefetched} keys"
        );
    }
}

/// `sealevel` runs the transactions its declarations miss in block order, one at a time,
/// so on slow storage its discovery pass finds every key, however costly the rounds: each
/// key left over would cost the in-order run a whole read's wait.
#[test]
fn sealevel_discovers_every_key_on_slow_storage() {
    // Each transaction reads twelve keys of its own, one after another, and declares none:
    // discovery finds one more per round, more rounds than the other engines' discovery
    // runs (`prefetch::MAX_ROUNDS`).
    const KEYS: u32 = 12;
    let n = 24u32;
    let block = vm((0..n)
        .map(|i| MockTx {
            reads: (KEYS * i..KEYS * (i + 1)).collect(),
            extra_read: KEYS * i,
            writes: vec![KEYS * i + 2],
            deltas: vec![],
            work: 5,
            declared: vec![],
            sequence: None,
        })
        .collect());
    let inner = storage_for(KEYS * n);
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_micros(500));
    let expected = sequential::execute(&block, &inner, &RunOptions::threads(1))
        .unwrap()
        .0;
    let waits_before = slow.waits();
    let (outcome, m) = EngineKind::Sealevel
        .run(&block, &slow, &RunOptions::threads(2))
        .unwrap();
    assert_eq!(outcome, expected);
    // Every key found by discovery and read in its batches: no read alone.
    assert_eq!(extra(&m, "prefetched"), u64::from(KEYS * n), "{m:?}");
    assert_eq!(
        slow.waits() - waits_before,
        extra(&m, "prefetch_batches"),
        "{m:?}"
    );
}

/// Discovery runs a nonce sequence's later transactions in sequence ([`Vm::in_sequence`]):
/// on the pre-block state they would fail their sequence check and discover none of the
/// keys they go on to read.
#[test]
fn discovery_runs_sequences_in_sequence() {
    // Every transaction reads the shared sequence key 0 first (pre-block value 0: even,
    // the gate is closed), then three keys of its own, one after another, and writes the
    // sequence key and its last key. (Its real executions all stop at the gate, which no
    // one opens: only discovery, in sequence, goes past it.)
    let n = 96u32;
    let txs: Vec<MockTx> = (1..=n)
        .map(|i| MockTx {
            reads: vec![0, 3 * i, 3 * i + 1, 3 * i + 2],
            extra_read: 3 * i,
            writes: vec![0, 3 * i + 2],
            deltas: vec![],
            work: 5,
            declared: vec![],
            sequence: Some(0),
        })
        .collect();
    let inner = storage_for(3 * n + 3);
    assert_eq!(inner.read(&0).unwrap(), Some(0));
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_millis(2));
    for hint in [false, true] {
        let block = MockVm {
            txs: txs.clone(),
            sequence_gate: Some(hint),
            ..MockVm::default()
        };
        let expected = sequential::execute(&block, &inner, &RunOptions::threads(1))
            .unwrap()
            .0;
        for &kind in &EngineKind::ALL[1..] {
            let (outcome, m) = kind.run(&block, &slow, &RunOptions::threads(2)).unwrap();
            assert_eq!(outcome, expected, "{kind}, hint {hint}");
            let prefetched = extra(&m, "prefetched");
            if hint {
                // All keys but a few that executions might load first, racing discovery.
                assert!(prefetched > 2 * u64::from(n), "{kind}: {m:?}");
            } else {
                // Only the sequence key (once per discovery pass): every discovery stops
                // at the closed gate.
                assert_eq!(prefetched, extra(&m, "prefetch_batches"), "{kind}: {m:?}");
                assert!(prefetched <= 2, "{kind}: {m:?}");
            }
        }
    }
}

fn extra(m: &Metrics, name: &str) -> u64 {
    m.extra(name)
        .unwrap_or_else(|| panic!("metric {name} missing: {m:?}"))
}

/// Two workers that really run side by side (tests running at the same time share the
/// engines' helper pools).
fn two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(f)
}

/// Optimistic: a conflict-free block merges pre-executions as they are; a chain fails
/// its merge checks and is switched to serial execution; counters add up.
#[test]
fn optimistic_metrics() {
    let independent = vm((0..1000u32)
        .map(|i| MockTx {
            reads: vec![i],
            extra_read: i,
            writes: vec![i],
            deltas: vec![1000],
            work: 300,
            declared: Vec::new(),
            sequence: None,
        })
        .collect());
    let storage = storage_for(1001);
    let (_, m) = two_threads(|| {
        optimistic::execute(&independent, &storage, &RunOptions::threads(2)).unwrap()
    });
    assert_eq!(m.validation_failures, 0, "{m:?}");
    assert_eq!(extra(&m, "merge_reexecutions"), 0);
    assert_eq!(extra(&m, "serial_switch"), 0);
    assert_eq!(m.executions, 1000);

    let chain = vm((0..1000u32)
        .map(|_| MockTx {
            reads: vec![0],
            extra_read: 0,
            writes: vec![0; 4],
            deltas: vec![],
            work: 300,
            declared: Vec::new(),
            sequence: None,
        })
        .collect());
    let storage = storage_for(1);
    let expected = sequential::execute(&chain, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    let (outcome, m) =
        two_threads(|| optimistic::execute(&chain, &storage, &RunOptions::threads(2)).unwrap());
    assert_eq!(outcome, expected);
    assert_eq!(m.reexecutions, m.executions - 1000);
    assert!(m.validations <= 1000);
    // Unless the merger ran (nearly) alone on a loaded machine, merging most transactions
    // itself in order, and checked fewer pre-executions than the engine judges on (32),
    // the chain is detected. (A CI run had the other worker pre-execute 28.)
    assert!(
        extra(&m, "serial_switch") == 1 || m.validations < 32,
        "{m:?}"
    );
}

/// Optimistic guards the pre-executions of heavy transactions: one that reads what an
/// earlier transaction writes may be stopped early as out of date (its read fails), and
/// the merger executes it on the merged state; results stay exactly the serial ones.
#[test]
fn optimistic_stops_stale_heavy_pre_executions_exactly() {
    let block = vm((0..300u32)
        .map(|i| {
            let heavy = i % 10 == 9;
            MockTx {
                // A heavy transaction reads the keys of the light ones before it, the
                // last of them first.
                reads: if heavy {
                    (i - 9..i).rev().collect()
                } else {
                    vec![i]
                },
                extra_read: i,
                writes: vec![i],
                deltas: vec![1000],
                work: if heavy { 12 * LIGHT_WORK } else { 200 },
                declared: Vec::new(),
                sequence: None,
            }
        })
        .collect());
    optimistic_runs_exactly(&block, 1001, |m| {
        // Stopped or not (that depends on timing), each is re-executed by the merger.
        assert!(
            extra(m, "stopped_stale") <= extra(m, "merge_reexecutions"),
            "{m:?}"
        );
    });
}

/// `optimistic` on `block` (over `keys` keys) equals `sequential`, checked as every engine
/// is and then five times more on two threads (not `stress`, which would start a small
/// block in range rounds), each run's metrics passed to `check`.
fn optimistic_runs_exactly(block: &MockVm, keys: u32, check: impl Fn(&Metrics)) {
    check_engines(block, keys, 3, [EngineKind::Optimistic].into_iter());
    let storage = storage_for(keys);
    let expected = sequential::execute(block, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    for _ in 0..5 {
        let (outcome, m) =
            two_threads(|| optimistic::execute(block, &storage, &RunOptions::threads(2)).unwrap());
        assert_eq!(outcome, expected);
        check(&m);
    }
}

/// Optimistic's last pre-executor starts with the heavy transactions (a large share of the
/// block, here 6 and 30), out of turn: results stay exactly the serial ones whether such
/// a pre-execution read what an earlier transaction writes (30 reads 2's key: stale, so
/// the merger executes it again) or not (6).
#[test]
fn optimistic_executes_heavy_transactions_first_exactly() {
    let block = vm((0..40u32)
        .map(|i| MockTx {
            reads: if i == 30 {
                vec![2, 30 + i]
            } else {
                vec![30 + i]
            },
            extra_read: 0,
            writes: if i == 2 {
                vec![2, 30 + i]
            } else {
                vec![30 + i]
            },
            deltas: vec![0],
            // (Heavy enough to earn this small block its second worker.)
            work: if i == 6 || i == 30 {
                50 * LIGHT_WORK
            } else {
                LIGHT_WORK / 2
            },
            declared: Vec::new(),
            sequence: None,
        })
        .collect());
    optimistic_runs_exactly(&block, 128, |m| {
        assert_eq!(extra(m, "workers"), 2, "{m:?}");
        assert_eq!(extra(m, "heavy_first"), 2, "{m:?}");
    });
}

/// Optimistic on a large block starts in range rounds: without conflicts every range
/// commits (no hand-off, no re-execution), also when the work is lopsided and idle
/// workers split busy ones' ranges; a chain wastes the rounds and is handed to the
/// per-transaction merger over the committed state. Every outcome equals sequential's.
#[test]
fn optimistic_range_rounds() {
    let independent = |work: fn(u32) -> u32| {
        vm((0..5000u32)
            .map(|i| MockTx {
                reads: vec![i],
                extra_read: i,
                writes: vec![i],
                deltas: vec![5000],
                work: work(i),
                declared: Vec::new(),
                sequence: None,
            })
            .collect())
    };
    let storage = storage_for(5001);
    for block in [
        independent(|_| 50),
        independent(|i| if i < 1500 { 400 } else { 10 }),
    ] {
        let expected = sequential::execute(&block, &storage, &RunOptions::threads(1))
            .unwrap()
            .0;
        let (outcome, m) =
            two_threads(|| optimistic::execute(&block, &storage, &RunOptions::threads(2)).unwrap());
        assert_eq!(outcome, expected);
        assert!(extra(&m, "range_rounds") >= 3, "{m:?}");
        assert_eq!(extra(&m, "range_handoff"), 0, "{m:?}");
        assert_eq!(m.validation_failures, 0, "{m:?}");
        assert_eq!((m.executions, m.reexecutions), (5000, 0), "{m:?}");
    }

    let chain = vm((0..5000u32)
        .map(|i| MockTx {
            reads: vec![0],
            extra_read: i % 7,
            writes: vec![0, 1 + i % 5],
            deltas: vec![9],
            work: 20,
            declared: Vec::new(),
            sequence: None,
        })
        .collect());
    let storage = storage_for(10);
    let expected = sequential::execute(&chain, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    let (outcome, m) =
        two_threads(|| optimistic::execute(&chain, &storage, &RunOptions::threads(2)).unwrap());
    assert_eq!(outcome, expected);
    assert_eq!(extra(&m, "range_handoff"), 1, "{m:?}");
    assert!(m.validation_failures >= 1, "{m:?}");
    assert_eq!(m.reexecutions, m.executions - 5000, "{m:?}");
}

/// Dag: edges, groups and mispredictions are counted; a chain is one group or handed to
/// sequential.
#[test]
fn dag_metrics() {
    let txs = chains(300, 10);
    let storage = storage_for(1);
    let (_, m) = dag::execute(&vm(txs), &storage, &RunOptions::threads(2)).unwrap();
    assert_eq!(extra(&m, "sequential_fallback"), 0, "{m:?}");
    assert_eq!(extra(&m, "dag_edges"), 270, "{m:?}");
    assert_eq!(extra(&m, "groups"), 30, "{m:?}");
    assert_eq!(extra(&m, "max_group_size"), 9, "{m:?}");
    assert_eq!(extra(&m, "mispredictions"), 0, "{m:?}");

    // Write sets that change with the values read make hints miss dependencies: some
    // small contended block has mispredictions, and they are repaired.
    let mut found = false;
    for seed in 0..200u32 {
        let txs: Vec<MockTx> = (0..40u32)
            .map(|i| {
                let r = seed.wrapping_mul(7919).wrapping_add(i * 104_729);
                MockTx {
                    reads: vec![r % 5],
                    extra_read: (r / 5) % 5,
                    writes: vec![(r / 25) % 5, (r / 125) % 5],
                    deltas: vec![],
                    work: 0,
                    declared: Vec::new(),
                    sequence: None,
                }
            })
            .collect();
        let block = vm(txs);
        let storage = storage_for(5);
        let expected = sequential::execute(&block, &storage, &RunOptions::threads(1))
            .unwrap()
            .0;
        let (outcome, m) = dag::execute(&block, &storage, &RunOptions::threads(2)).unwrap();
        assert_eq!(outcome, expected, "seed {seed}");
        assert_eq!(extra(&m, "mispredictions"), m.validation_failures);
        if extra(&m, "mispredictions") > 0 {
            found = true;
            break;
        }
    }
    assert!(found, "no block had a misprediction");

    let chain = vm((0..400u32)
        .map(|_| MockTx {
            reads: vec![0],
            extra_read: 0,
            writes: vec![0],
            deltas: vec![],
            work: 300,
            declared: Vec::new(),
            sequence: None,
        })
        .collect());
    let storage = storage_for(1);
    let expected = sequential::execute(&chain, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    let (outcome, m) = dag::execute(&chain, &storage, &RunOptions::threads(2)).unwrap();
    assert_eq!(outcome, expected);
    assert_eq!(extra(&m, "sequential_fallback"), 1, "{m:?}");
}

/// Storage whose reads of one key fail.
struct FailingStorage {
    inner: InMemoryStorage<Key, Value>,
    bad: Key,
}

impl parex_core::Storage for FailingStorage {
    type Key = Key;
    type Value = Value;
    fn read(&self, key: &Key) -> Result<Option<Value>, parex_core::StorageError> {
        if *key == self.bad {
            return Err(parex_core::StorageError(format!("key {key} is unreadable")));
        }
        self.inner.read(key)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A storage failure is the block's error, as in serial execution, whether a
    /// transaction reads the key or only credits it (a delta resolved at the end).
    /// (Nothing overwrites the key: `sequential` reads a key before a full write to it,
    /// so it fails there too, where engines that need no pre-block value do not.)
    #[test]
    fn storage_errors_propagate(mut txs in block_strategy(8, 80, 2), bad in 0u32..8) {
        for tx in &mut txs {
            tx.writes.retain(|&k| k != bad);
        }
        let vm = vm(txs);
        let storage = FailingStorage { inner: storage_for(8), bad };
        let expected = sequential::execute(&vm, &storage, &RunOptions::threads(1))
            .map(|(o, _)| o)
            .map_err(|e| e.to_string());
        for engine in parallel_engines() {
            for threads in [1, 2, 4] {
                let got = engine
                    .run(&vm, &storage, &RunOptions::stress(threads))
                    .map(|(o, _)| o)
                    .map_err(|e| e.to_string());
                prop_assert_eq!(&got, &expected, "{} on {} threads", engine, threads);
            }
        }
    }
}

/// With tracing on, each engine records its phases (and the outcome is the same).
#[test]
fn traces_record_the_phases() {
    use parex_engine::trace::SpanKind;
    let block = vm(chains(400, 4));
    let storage = storage_for(1);
    let expected = sequential::execute(&block, &storage, &RunOptions::threads(1))
        .unwrap()
        .0;
    let run = RunOptions {
        trace: true,
        ..RunOptions::stress(2)
    };
    let expect_kinds: [(EngineKind, &[SpanKind]); 2] = [
        (
            EngineKind::Optimistic,
            &[SpanKind::Execute, SpanKind::Merge, SpanKind::Finalize],
        ),
        (
            EngineKind::Dag,
            &[
                SpanKind::Hint,
                SpanKind::Execute,
                SpanKind::Validate,
                SpanKind::Finalize,
            ],
        ),
    ];
    for (engine, kinds) in expect_kinds {
        let (outcome, m) = two_threads(|| engine.run(&block, &storage, &run)).unwrap();
        assert_eq!(outcome, expected, "{engine}");
        let trace = m.trace.expect("traced");
        assert!(trace.workers >= 1 && trace.wall_ns > 0, "{engine}");
        for kind in kinds {
            assert!(
                trace.spans.iter().any(|s| s.kind == *kind),
                "{engine}: no {kind:?} span"
            );
        }
        assert!(trace.spans.iter().all(|s| s.start_ns <= s.end_ns));
    }
    // Off: nothing recorded.
    let (_, m) = dag::execute(&block, &storage, &RunOptions::threads(2)).unwrap();
    assert!(m.trace.is_none());
}

/// `optimistic` pre-executes a transaction whose sequence key an earlier one shares with
/// that key's value as the earlier pre-execution left it (a prediction, kept apart from the
/// reads of pre-block values): interleaved sequences of three senders, where each
/// transaction reads and (mostly) rewrites its sender's key, on fast and slow storage and
/// on several thread counts, must still give exactly the serial outcome.
#[test]
fn predicted_sequence_keys_keep_optimistic_exact() {
    let n = 300u32;
    let txs: Vec<MockTx> = (0..n)
        .map(|i| {
            let sender = i % 3;
            MockTx {
                reads: vec![sender, 10 + i],
                extra_read: 5,
                writes: vec![sender, 10 + i],
                deltas: vec![4],
                work: 20,
                declared: vec![],
                sequence: Some(sender),
            }
        })
        .collect();
    let inner = storage_for(10 + n);
    let slow = parex_core::LatencyStorage::new(&inner, std::time::Duration::from_micros(5));
    // Predictions from earlier pre-executions only, and also from the pre-block value in
    // sequence (when the sequence key gates, `Vm::in_sequence` changes the value).
    for sequence_gate in [None, Some(true)] {
        let block = MockVm {
            txs: txs.clone(),
            sequence_gate,
            ..MockVm::default()
        };
        let expected = sequential::execute(&block, &inner, &RunOptions::threads(1))
            .unwrap()
            .0;
        for threads in [2, 8] {
            for run in 0..3 {
                let (fast, _) = EngineKind::Optimistic
                    .run(&block, &inner, &RunOptions::threads(threads))
                    .unwrap();
                assert_eq!(fast, expected, "{threads} threads, run {run}");
                let (slowly, _) = EngineKind::Optimistic
                    .run(&block, &slow, &RunOptions::threads(threads))
                    .unwrap();
                assert_eq!(
                    slowly, expected,
                    "slow storage, gate {sequence_gate:?}, {threads} threads, run {run}"
                );
            }
        }
    }
}
