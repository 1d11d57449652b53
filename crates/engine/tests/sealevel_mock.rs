//! `sealevel` against the sequential engine on randomized blocks of a mock VM whose
//! declarations are exact, partial, too weak, unrelated or missing.
//!
//! Each mock transaction reads keys through the view (one only when the first value read
//! is odd), writes a subset of its candidate keys that depends on what it read, and
//! credits deltas. Its declaration is generated independently of what it really does,
//! so undeclared reads, undeclared writes and writes declared as reads all occur; the
//! outcome must still be exactly the sequential one (or the same error), with 1, 2, 4
//! and 8 threads, with declared and with pre-execution hints.

use parex_core::AccessKind;
use parex_engine::sealevel::{self, Hints, Options};
use parex_engine::{EngineKind, Metrics, RunOptions, sequential};
use proptest::prelude::*;

mod mock;

use mock::*;

/// How a generated transaction declares its accesses.
#[derive(Clone, Copy, Debug)]
enum Declare {
    /// Everything it may access, with the right kinds.
    Exact,
    /// Exact, but each entry dropped when its bit in the mask is clear.
    Partial(u32),
    /// Exact, but writes declared as reads or deltas (and deltas as reads).
    TooWeak,
    /// Random keys with random kinds.
    Unrelated,
    Empty,
}

/// Everything `tx` may access, with the kinds it needs.
fn exact(tx: &MockTx) -> Vec<(Key, AccessKind)> {
    let mut d: Vec<(Key, AccessKind)> = Vec::new();
    let mut add = |key: Key, kind: AccessKind| match d.iter_mut().find(|(k, _)| *k == key) {
        Some((_, existing)) => *existing = existing.join(kind),
        None => d.push((key, kind)),
    };
    for &k in &tx.reads {
        add(k, AccessKind::Read);
    }
    if !tx.reads.is_empty() {
        add(tx.extra_read, AccessKind::Read);
    }
    for &k in &tx.writes {
        add(k, AccessKind::Write);
    }
    for &k in &tx.deltas {
        add(k, AccessKind::Delta);
    }
    d
}

fn declare(tx: &mut MockTx, how: Declare, unrelated: &[(Key, u8)]) {
    tx.declared = match how {
        Declare::Exact => exact(tx),
        Declare::Partial(mask) => exact(tx)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask >> (i % 32) & 1 == 1)
            .map(|(_, d)| d)
            .collect(),
        Declare::TooWeak => exact(tx)
            .into_iter()
            .map(|(k, kind)| {
                let weaker = match kind {
                    AccessKind::Write if k % 2 == 0 => AccessKind::Read,
                    AccessKind::Write => AccessKind::Delta,
                    _ => AccessKind::Read,
                };
                (k, weaker)
            })
            .collect(),
        Declare::Unrelated => unrelated
            .iter()
            .map(|&(k, kind)| {
                let kind = match kind % 3 {
                    0 => AccessKind::Read,
                    1 => AccessKind::Delta,
                    _ => AccessKind::Write,
                };
                (k, kind)
            })
            .collect(),
        Declare::Empty => Vec::new(),
    };
}

/// Outputs, sorted state diff and metrics of one run.
type Ran = (Vec<MockOutput>, Vec<(Key, Value)>, Metrics);

fn run(vm: &MockVm, keys: u32, threads: usize, hints: Hints) -> Result<Ran, String> {
    run_with(
        vm,
        keys,
        threads,
        Options {
            hints,
            adaptive: false,
        },
    )
}

fn run_with(vm: &MockVm, keys: u32, threads: usize, options: Options) -> Result<Ran, String> {
    let storage = storage_for(keys);
    sealevel::execute_with(vm, &storage, &RunOptions::stress(threads), options)
        .map(|(mut o, m)| {
            o.state_diff.sort();
            (o.tx_outcomes, o.state_diff, m)
        })
        .map_err(|e| e.to_string())
}

/// Runs sealevel (both hint sources) with 1, 2, 4, 8 threads, `repeat` times each,
/// against sequential.
fn check(vm: &MockVm, keys: u32, repeat: usize) {
    let storage = storage_for(keys);
    let expected = sequential::execute(vm, &storage, &RunOptions::threads(1))
        .map(|(mut o, _)| {
            o.state_diff.sort();
            (o.tx_outcomes, o.state_diff)
        })
        .map_err(|e| e.to_string());
    for threads in [1, 2, 4, 8] {
        for _ in 0..repeat {
            for (hints, adaptive) in [
                (Hints::Declared, false),
                (Hints::Preexec, false),
                (Hints::Declared, true),
                (Hints::Preexec, true),
            ] {
                let options = Options { hints, adaptive };
                let got = run_with(vm, keys, threads, options).map(|(o, d, m)| {
                    assert_eq!(m.reexecutions, m.executions - vm.txs.len() as u64);
                    (o, d)
                });
                assert_eq!(got, expected, "threads {threads}, {options:?}");
            }
        }
    }
}

fn declare_strategy() -> impl Strategy<Value = Declare> {
    prop_oneof![
        4 => Just(Declare::Exact),
        3 => any::<u32>().prop_map(Declare::Partial),
        1 => Just(Declare::TooWeak),
        1 => Just(Declare::Unrelated),
        1 => Just(Declare::Empty),
    ]
}

fn tx_strategy(keys: u32, max_deltas: usize) -> impl Strategy<Value = MockTx> {
    (
        prop::collection::vec(0..keys, 0..=4),
        0..keys,
        prop::collection::vec(0..keys, 0..=3),
        prop::collection::vec(0..keys, 0..=max_deltas),
        0u32..2000,
        declare_strategy(),
        prop::collection::vec((0..keys, any::<u8>()), 0..4),
    )
        .prop_map(
            |(reads, extra_read, writes, deltas, work, how, unrelated)| {
                let mut tx = MockTx {
                    reads,
                    extra_read,
                    writes,
                    deltas,
                    work,
                    declared: Vec::new(),
                    sequence: None,
                };
                declare(&mut tx, how, &unrelated);
                tx
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Few keys: nearly every transaction conflicts with its neighbours.
    #[test]
    fn heavy_conflicts(txs in prop::collection::vec(tx_strategy(4, 1), 0..=100)) {
        check(&vm(txs), 4, 2);
    }

    /// A moderate key space: some conflicts, many independent transactions.
    #[test]
    fn mixed_conflicts(txs in prop::collection::vec(tx_strategy(64, 1), 0..=200)) {
        check(&vm(txs), 64, 2);
    }

    /// Many deltas on few keys, read now and then.
    #[test]
    fn delta_heavy(txs in prop::collection::vec(tx_strategy(6, 3), 0..=150)) {
        check(&vm(txs), 6, 2);
    }

    /// Failures: only the one serial execution has may surface.
    #[test]
    fn errors(txs in prop::collection::vec(tx_strategy(8, 1), 0..=100), fail_modulo in 40u64..400) {
        check(&MockVm { txs, fail_modulo, ..MockVm::default() }, 8, 2);
    }
}

/// A block whose transactions each use keys of their own (eight each, after the shared
/// delta key 0), declared exactly or mostly so: the declarations conflict nowhere, so
/// adaptive runs take step 0, and fall back when a declaration misses something or a
/// transaction fails.
fn disjoint_block(max_txs: usize) -> impl Strategy<Value = Vec<MockTx>> {
    let own = (
        prop::collection::vec(0..8u32, 0..=4),
        0..8u32,
        prop::collection::vec(0..8u32, 0..=3),
        0usize..=1,
        0u32..500,
        prop_oneof![
            8 => Just(Declare::Exact),
            1 => any::<u32>().prop_map(Declare::Partial),
            1 => Just(Declare::TooWeak),
        ],
    );
    // Half the blocks declare everything exactly (step 0 commits them), half mostly.
    (prop::collection::vec(own, 0..=max_txs), any::<bool>()).prop_map(|(txs, exact)| {
        txs.into_iter()
            .enumerate()
            .map(|(i, (reads, extra_read, writes, deltas, work, how))| {
                let how = if exact { Declare::Exact } else { how };
                let key = |k: u32| 1 + 8 * i as u32 + k;
                let mut tx = MockTx {
                    reads: reads.into_iter().map(key).collect(),
                    extra_read: key(extra_read),
                    writes: writes.into_iter().map(key).collect(),
                    deltas: vec![0; deltas],
                    work,
                    declared: Vec::new(),
                    sequence: None,
                };
                declare(&mut tx, how, &[]);
                tx
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Blocks for step 0, exact or not, failing or not.
    #[test]
    fn conflict_free_declarations(
        txs in disjoint_block(150),
        fail_modulo in prop_oneof![3 => Just(0u64), 1 => 40u64..400],
    ) {
        check(&MockVm { txs, fail_modulo, ..MockVm::default() }, 1 + 8 * 150, 2);
    }
}

/// Disjoint keys plus a delta on a shared key (the "beneficiary"): `how` for every
/// transaction.
fn independent(how: Declare) -> MockVm {
    independent_with_work(how, 100)
}

fn independent_with_work(how: Declare, work: u32) -> MockVm {
    let txs = (0..1000u32)
        .map(|i| {
            let mut tx = MockTx {
                reads: vec![2 * i + 1, 2 * i + 2],
                extra_read: 2 * i + 2,
                writes: vec![2 * i + 1, 2 * i + 2],
                deltas: vec![0],
                work,
                declared: Vec::new(),
                sequence: None,
            };
            declare(&mut tx, how, &[]);
            tx
        })
        .collect();
    MockVm {
        txs,
        ..MockVm::default()
    }
}

#[test]
fn coverage_is_full_with_exact_declarations_and_lower_without() {
    for threads in [1, 2, 4] {
        let (_, _, m) = run(&independent(Declare::Exact), 2001, threads, Hints::Declared).unwrap();
        assert_eq!(m.extra("declaration_coverage_pct"), Some(100), "{m:?}");
        assert_eq!(m.extra("undeclared_reruns"), Some(0));
        assert_eq!(m.extra("lock_blocked"), Some(0));
        assert_eq!(m.executions, 1000);
        let (_, _, m) = run(&independent(Declare::Empty), 2001, threads, Hints::Declared).unwrap();
        assert_eq!(m.extra("declaration_coverage_pct"), Some(0), "{m:?}");
        assert_eq!(m.extra("frontier_runs"), Some(1000));
        // A pre-execution finds every access of an independent transaction.
        let (_, _, m) = run(&independent(Declare::Empty), 2001, threads, Hints::Preexec).unwrap();
        assert_eq!(m.extra("declaration_coverage_pct"), Some(100), "{m:?}");
        let (_, _, m) = run(
            &independent(Declare::Partial(0b101)),
            2001,
            threads,
            Hints::Declared,
        )
        .unwrap();
        let coverage = m.extra("declaration_coverage_pct").unwrap();
        assert!(coverage < 100, "{m:?}");
    }
    check(&independent(Declare::Partial(0b101)), 2001, 1);
}

/// A block whose declarations conflict nowhere (disjoint keys, deltas to one shared key)
/// runs without the lock table when adaptive (`conflict_free`), from declarations or
/// from pre-executions; one whose declarations miss an access, or in which a transaction
/// fails, starts so and is finished the usual way, with the same outcome as serial.
#[test]
fn conflict_free_blocks_run_without_locks() {
    let adaptive = |hints| Options {
        hints,
        adaptive: true,
    };
    let expected = |vm: &MockVm, keys| {
        sequential::execute(vm, &storage_for(keys), &RunOptions::threads(1))
            .map(|(mut o, _)| {
                o.state_diff.sort();
                (o.tx_outcomes, o.state_diff)
            })
            .map_err(|e| e.to_string())
    };
    let exact = independent(Declare::Exact);
    let from_pre = independent(Declare::Empty);
    let partial = independent(Declare::Partial(0b101));
    let mut failing = independent(Declare::Exact);
    failing.fail_modulo = 101;
    for threads in [1, 2, 4] {
        let (o, d, m) = run_with(&exact, 2001, threads, adaptive(Hints::Declared)).unwrap();
        assert_eq!(Ok((o, d)), expected(&exact, 2001));
        assert_eq!(m.extra("conflict_free"), Some(1), "{m:?}");
        assert_eq!(m.extra("lock_acquisitions"), Some(0));
        assert_eq!(m.extra("declaration_coverage_pct"), Some(100));
        assert_eq!((m.executions, m.reexecutions), (1000, 0));

        let (o, d, m) = run_with(&from_pre, 2001, threads, adaptive(Hints::Preexec)).unwrap();
        assert_eq!(Ok((o, d)), expected(&from_pre, 2001));
        assert_eq!(m.extra("conflict_free"), Some(1), "{m:?}");
        assert_eq!(m.extra("preexec_reused"), Some(1000));
        assert_eq!(m.executions, 1000, "pre-executions only");

        let (o, d, m) = run_with(&partial, 2001, threads, adaptive(Hints::Declared)).unwrap();
        assert_eq!(Ok((o, d)), expected(&partial, 2001));
        assert_eq!(m.extra("conflict_free"), Some(0), "{m:?}");
        assert!(m.executions > 1000, "the void runs count: {m:?}");

        let got =
            run_with(&failing, 2001, threads, adaptive(Hints::Declared)).map(|(o, d, _)| (o, d));
        assert_eq!(got, expected(&failing, 2001));
        assert!(got.is_err(), "a transaction fails");
    }
}

/// Each transaction reads the key the previous one wrote; declared exactly, the locks
/// order them all (every one but the first waits).
#[test]
fn chain_waits_for_locks() {
    let txs: Vec<MockTx> = (0..300u32)
        .map(|i| {
            let mut tx = MockTx {
                reads: vec![i],
                extra_read: i,
                writes: vec![i + 1; 4],
                deltas: vec![],
                work: 500,
                declared: Vec::new(),
                sequence: None,
            };
            declare(&mut tx, Declare::Exact, &[]);
            tx
        })
        .collect();
    let vm = MockVm {
        txs,
        ..MockVm::default()
    };
    check(&vm, 301, 2);
    let (_, _, m) = run(&vm, 301, 4, Hints::Declared).unwrap();
    assert_eq!(m.extra("lock_blocked"), Some(299), "{m:?}");
    assert_eq!(m.dependency_waits, 299);
    assert_eq!(m.extra("declaration_coverage_pct"), Some(100));
}

/// Both engine names are registered; an empty block works; tracing records spans.
#[test]
fn dispatch_empty_block_and_trace() {
    for name in ["sealevel", "sealevel-preexec"] {
        let kind = EngineKind::parse(name).expect("registered");
        assert!(EngineKind::ALL.contains(&kind));
        let vm = MockVm {
            txs: vec![],
            ..MockVm::default()
        };
        let (outcome, m) = kind
            .run(&vm, &storage_for(1), &RunOptions::stress(4))
            .unwrap();
        assert!(outcome.tx_outcomes.is_empty() && outcome.state_diff.is_empty());
        assert_eq!(m.extra("declaration_coverage_pct"), Some(100));
        // Without the stress setting, a block too small for two workers runs in order.
        let (outcome, m) = kind.execute(&vm, &storage_for(1), 4).unwrap();
        assert!(outcome.tx_outcomes.is_empty());
        assert_eq!(m.extra("sequential_fallback"), Some(1), "{m:?}");
    }
    let vm = independent(Declare::Partial(0b11));
    let options = RunOptions {
        trace: true,
        ..RunOptions::stress(2)
    };
    let (_, m) = EngineKind::Sealevel
        .run(&vm, &storage_for(2001), &options)
        .unwrap();
    let trace = m.trace.expect("traced");
    assert!(
        trace
            .spans
            .iter()
            .any(|s| s.kind == parex_engine::trace::SpanKind::Execute)
    );
    assert!(
        trace
            .spans
            .iter()
            .any(|s| s.kind == parex_engine::trace::SpanKind::Hint)
    );
    let (_, m) = EngineKind::Sealevel
        .run(&vm, &storage_for(2001), &RunOptions::threads(2))
        .unwrap();
    assert!(m.trace.is_none());
}

/// Transaction 0 runs long as the frontier and writes a key it never declared, which
/// transaction 1 declared and read meanwhile: 1's result must be discarded and re-run
/// after 0 commits (an in-order run invalidates what read its undeclared writes).
#[test]
fn undeclared_writes_of_the_frontier_invalidate_later_readers() {
    let txs = vec![
        MockTx {
            reads: vec![2],
            extra_read: 2,
            writes: vec![1, 1, 1, 1],
            deltas: vec![],
            work: 3_000_000,
            declared: vec![(2, AccessKind::Read)],
            sequence: None,
        },
        MockTx {
            reads: vec![1],
            extra_read: 1,
            writes: vec![],
            deltas: vec![3],
            work: 0,
            declared: vec![(1, AccessKind::Read), (3, AccessKind::Delta)],
            sequence: None,
        },
    ];
    let vm = MockVm {
        txs,
        ..MockVm::default()
    };
    check(&vm, 4, 2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut invalidated = 0;
    for _ in 0..10 {
        let (_, _, m) = pool.install(|| run(&vm, 4, 2, Hints::Declared)).unwrap();
        invalidated += m.extra("invalidated").unwrap();
    }
    assert!(
        invalidated > 0,
        "transaction 1 never ran before 0 committed"
    );
}

/// Declarations that miss what every transaction reads: with the adaptive rule, runs
/// ahead of the frontier stop after a few dozen voided ones; without it, they go on.
/// The outcome is the same.
#[test]
fn adaptive_rule_stops_wasted_runs() {
    // Long enough transactions that the second worker gets to run some.
    let vm = independent_with_work(Declare::Partial(0b101), 20_000);
    let storage = 2001;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let off = Options {
        hints: Hints::Declared,
        adaptive: false,
    };
    let (o1, d1, off) = pool.install(|| run_with(&vm, storage, 2, off)).unwrap();
    let (o2, d2, on) = pool
        .install(|| run_with(&vm, storage, 2, Options::default()))
        .unwrap();
    assert_eq!((o1, d1), (o2, d2));
    assert_eq!(off.extra("frontier_only"), Some(0), "{off:?}");
    // Every run ahead of the frontier is voided here: the rule engages at the 32nd, and
    // then at most one more per worker is still under way. (How many the second worker
    // gets to run at all depends on the machine's load.)
    let voided = on.extra("undeclared_reruns").unwrap();
    assert_eq!(
        on.extra("frontier_only"),
        Some(u64::from(voided >= 32)),
        "{on:?}"
    );
    assert!(voided <= 34, "{on:?}");
}
