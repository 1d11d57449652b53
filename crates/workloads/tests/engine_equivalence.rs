//! Every parallel engine gives exactly the outcome of `sequential`: on every synthetic
//! workload at every contention level, and on every built-in mainnet block (where it
//! must also match the header), at several thread counts and repeatedly, to catch races.
//!
//! The engines compared are `EngineKind::ALL` less `Sequential`, so an engine added
//! later is covered without touching this file.

mod common;

use common::describe_difference;
use parex_engine::{EngineKind, RunOptions, block_stm};
use parex_evm::EvmVm;
use parex_workloads::mainnet::{Source, builtin_dir};
use parex_workloads::verify::{check_block, check_block_on, check_block_with};
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, synthetic};

const THREADS: [usize; 3] = [1, 2, 8];

/// Runs of each workload per engine and thread count.
const WORKLOAD_REPEATS: usize = 2;
/// Runs of each mainnet block per engine and thread count.
const MAINNET_REPEATS: usize = 3;

fn parallel_engines() -> impl Iterator<Item = EngineKind> {
    EngineKind::ALL
        .iter()
        .copied()
        .filter(|&k| k != EngineKind::Sequential)
}

#[test]
fn every_engine_equals_sequential_on_every_workload() {
    let mut case = 0usize;
    for &kind in WorkloadKind::ALL {
        // A chain has no accounts to share: one contention level is all it has.
        let ratios: &[f64] = if kind == WorkloadKind::Chain {
            &[0.0]
        } else {
            &[0.0, 0.1, 0.5, 0.9]
        };
        for &hot_ratio in ratios {
            case += 1;
            // 300 to 600 transactions, a different size and seed per case.
            let txs = 300 + (case * 73) % 301;
            let spec = WorkloadSpec {
                kind,
                size: Size::Txs(txs),
                accounts: None,
                hot_ratio,
                seed: 100 + case as u64,
            };
            let w = synthetic::generate(&spec)
                .unwrap_or_else(|e| panic!("{kind} hot {hot_ratio}: generation failed: {e}"));
            let vm = EvmVm::new(&w.block);
            let (expected, _) = EngineKind::Sequential
                .execute(&vm, &w.pre_state, 1)
                .unwrap_or_else(|e| panic!("{kind} hot {hot_ratio}: sequential failed: {e}"));
            assert_eq!(expected.tx_outcomes.len(), txs);
            assert_eq!(
                expected.invalid_count(),
                0,
                "{kind} hot {hot_ratio}: the workload is valid"
            );
            for engine in parallel_engines() {
                for (threads, run) in THREADS
                    .into_iter()
                    .flat_map(|t| (0..WORKLOAD_REPEATS).map(move |r| (t, r)))
                {
                    let what = format!(
                        "{engine} on {threads} threads (run {run}), {kind} ({txs} txs, hot {hot_ratio}, seed {})",
                        spec.seed
                    );
                    let (actual, _) = engine
                        .run(&vm, &w.pre_state, &RunOptions::stress(threads))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(
                        actual == expected,
                        "{what} differs from sequential:\n{}",
                        describe_difference(&expected, &actual)
                    );
                    assert_eq!(
                        actual.state_diff_hash(),
                        expected.state_diff_hash(),
                        "{what}: state diff hash"
                    );
                }
            }
            // Block-STM over chunks of transactions (what it does on large blocks).
            for threads in [2, 8] {
                let options = block_stm::Options {
                    chunk_size: Some(5),
                    ..block_stm::Options::default()
                };
                let what = format!(
                    "block-stm in chunks of 5 on {threads} threads, {kind} hot {hot_ratio}"
                );
                let (actual, _) = block_stm::execute_with(
                    &vm,
                    &w.pre_state,
                    &RunOptions::stress(threads),
                    options,
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(
                    actual == expected,
                    "{what} differs from sequential:\n{}",
                    describe_difference(&expected, &actual)
                );
            }
        }
    }
}

/// Blocks large enough for block-stm to schedule chunks of transactions and for
/// optimistic to start in range rounds on their own (handing the rest of the block to its
/// per-transaction merger under contention).
#[test]
fn chunking_engines_run_large_blocks_exactly() {
    for (kind, hot_ratio) in [
        (WorkloadKind::Raw, 0.0),
        (WorkloadKind::Erc20, 0.0),
        (WorkloadKind::Mix, 0.5),
    ] {
        let spec = WorkloadSpec {
            kind,
            size: Size::Txs(6000),
            accounts: None,
            hot_ratio,
            seed: 7,
        };
        let w = synthetic::generate(&spec).expect("workload");
        let vm = EvmVm::new(&w.block);
        let (expected, _) = EngineKind::Sequential
            .execute(&vm, &w.pre_state, 1)
            .unwrap();
        for engine in [EngineKind::BlockStm, EngineKind::Optimistic] {
            let (actual, metrics) = engine
                .run(&vm, &w.pre_state, &RunOptions::threads(2))
                .unwrap();
            let large = match engine {
                EngineKind::BlockStm => metrics.extra("chunk_size").is_some_and(|c| c > 1),
                _ => metrics.extra("range_rounds").is_some_and(|r| r >= 1),
            };
            assert!(large, "{engine}, {kind}: {metrics:?}");
            if hot_ratio == 0.0 && engine == EngineKind::Optimistic {
                // Conflict-free: every range commits (the fee credits are deltas).
                assert_eq!(
                    metrics.extra("range_handoff"),
                    Some(0),
                    "{kind}: {metrics:?}"
                );
                assert_eq!(metrics.reexecutions, 0, "{kind}: {metrics:?}");
            }
            assert_eq!(metrics.executions, 6000 + metrics.reexecutions);
            assert!(
                actual == expected,
                "{engine}, {kind} hot {hot_ratio} differs from sequential:\n{}",
                describe_difference(&expected, &actual)
            );
        }
    }
}

#[test]
fn every_engine_equals_sequential_and_the_header_on_every_mainnet_block() {
    let source = Source::open(&builtin_dir()).expect("the built-in mainnet data opens");
    let blocks: Vec<_> = source
        .load_all()
        .into_iter()
        .map(|(n, b)| b.unwrap_or_else(|e| panic!("block {n}: {e}")))
        .collect();
    assert!(!blocks.is_empty(), "the built-in copy has blocks");
    let mut txs = 0;
    for block in &blocks {
        txs += block.block.txs.len();
        let n = block.number;
        let reference = check_block(block, EngineKind::Sequential, 1)
            .unwrap_or_else(|e| panic!("block {n}: sequential failed: {e}"));
        assert!(
            reference.passed(),
            "block {n}, sequential: {}",
            reference.mismatches(block)
        );
        for engine in parallel_engines() {
            for threads in THREADS {
                for run in 0..MAINNET_REPEATS {
                    let what = format!("block {n}, {engine} on {threads} threads, run {run}");
                    let check = check_block_with(block, engine, &RunOptions::stress(threads))
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(
                        check.passed(),
                        "{what}: header mismatch: {}",
                        check.mismatches(block)
                    );
                    assert!(
                        check.outcome == reference.outcome,
                        "{what} differs from sequential:\n{}",
                        describe_difference(&reference.outcome, &check.outcome)
                    );
                    assert_eq!(
                        check.state_diff_hash, reference.state_diff_hash,
                        "{what}: state diff hash"
                    );
                }
            }
        }
    }
    eprintln!(
        "{} mainnet blocks ({txs} transactions) equal on every engine",
        blocks.len()
    );
}

/// On slow storage the parallel engines take other paths (discovery, batched reads, the
/// chain check after discovery, block-stm's seeded memory): every mainnet block, read at
/// 5 us per key, must still equal `sequential` and its header.
#[test]
fn every_engine_equals_sequential_on_every_mainnet_block_on_slow_storage() {
    let source = Source::open(&builtin_dir()).expect("the built-in mainnet data opens");
    for (n, block) in source.load_all() {
        let block = block.unwrap_or_else(|e| panic!("block {n}: {e}"));
        let reference = check_block(&block, EngineKind::Sequential, 1)
            .unwrap_or_else(|e| panic!("block {n}: sequential failed: {e}"));
        let slow =
            parex_core::LatencyStorage::new(&block.pre_state, std::time::Duration::from_micros(5));
        for engine in parallel_engines() {
            let what = format!("block {n}, {engine} on slow storage");
            let check = check_block_on(&block, engine, &slow, &RunOptions::threads(2))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                check.passed(),
                "{what}: header mismatch: {}",
                check.mismatches(&block)
            );
            assert!(
                check.outcome == reference.outcome,
                "{what} differs from sequential:\n{}",
                describe_difference(&reference.outcome, &check.outcome)
            );
        }
    }
}
