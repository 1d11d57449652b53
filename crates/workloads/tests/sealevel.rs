//! `sealevel` on real EVM blocks: declarations from the EVM are complete for plain
//! transfers, and deliberately wrong or missing declarations (an EVM wrapped so that it
//! declares too little, the wrong kinds, or nothing) still give exactly the outcome of
//! `sequential`.

mod common;

use alloy_primitives::Address;
use common::describe_difference;
use parex_core::{AccessKind, ReadView, StateKey, StateValue, TxIndex, Vm, VmError};
use parex_engine::sealevel::{self, Hints, Options};
use parex_engine::{EngineKind, Metrics, RunOptions};
use parex_evm::EvmVm;
use parex_evm::vm::EvmExecution;
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, synthetic};

/// How the wrapper distorts the EVM's declarations.
#[derive(Clone, Copy, Debug)]
enum Distort {
    /// Declares nothing.
    Empty,
    /// Declares every account as read only (its writes are undeclared).
    ReadOnly,
    /// Drops every other key and adds an unrelated account as written.
    DropAndAdd,
}

/// The EVM, with distorted declarations.
struct Wrapped<'b> {
    evm: EvmVm<'b>,
    distort: Distort,
}

impl Vm for Wrapped<'_> {
    type Key = StateKey;
    type Value = StateValue;
    type Delta = parex_core::BalanceDelta;
    type Output = parex_core::TxOutcome;

    fn tx_count(&self) -> usize {
        self.evm.tx_count()
    }

    fn execute<R: ReadView<StateKey, StateValue>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<EvmExecution, VmError> {
        self.evm.execute(tx, view)
    }

    fn apply_delta(
        &self,
        key: &StateKey,
        value: Option<StateValue>,
        delta: &Self::Delta,
    ) -> Option<StateValue> {
        self.evm.apply_delta(key, value, delta)
    }

    fn merge_deltas(&self, earlier: &mut Self::Delta, later: &Self::Delta) {
        self.evm.merge_deltas(earlier, later)
    }

    fn finalize_outputs(&self, outputs: &mut [Self::Output]) -> Result<(), VmError> {
        self.evm.finalize_outputs(outputs)
    }

    fn declared_access<R: ReadView<StateKey, StateValue>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(StateKey, AccessKind)> {
        let declared = self.evm.declared_access(tx, pre_block);
        match self.distort {
            Distort::Empty => Vec::new(),
            Distort::ReadOnly => declared
                .into_iter()
                .map(|(k, _)| (k, AccessKind::Read))
                .collect(),
            Distort::DropAndAdd => {
                let mut d: Vec<_> = declared.into_iter().step_by(2).collect();
                d.push((
                    StateKey::Account(Address::new([0x77; 20])),
                    AccessKind::Write,
                ));
                d
            }
        }
    }
}

fn workload(kind: WorkloadKind, txs: usize, hot_ratio: f64, seed: u64) -> synthetic::Workload {
    synthetic::generate(&WorkloadSpec {
        kind,
        size: Size::Txs(txs),
        accounts: None,
        hot_ratio,
        seed,
    })
    .expect("the workload generates")
}

fn run<V: Vm<Key = StateKey, Value = StateValue>>(
    vm: &V,
    w: &synthetic::Workload,
    threads: usize,
    hints: Hints,
) -> (parex_engine::VmOutcome<V>, Metrics) {
    sealevel::execute_with(
        vm,
        &w.pre_state,
        &RunOptions::stress(threads),
        Options {
            hints,
            adaptive: false,
        },
    )
    .expect("sealevel executes the block")
}

#[test]
fn transfers_are_fully_declared() {
    let w = workload(WorkloadKind::Raw, 400, 0.0, 7);
    let vm = EvmVm::new(&w.block);
    let (expected, _) = EngineKind::Sequential
        .execute(&vm, &w.pre_state, 1)
        .unwrap();
    for threads in [1, 2, 4] {
        let (outcome, m) = run(&vm, &w, threads, Hints::Declared);
        assert!(
            outcome == expected,
            "{}",
            describe_difference(&expected, &outcome)
        );
        assert_eq!(m.extra("declaration_coverage_pct"), Some(100), "{m:?}");
        assert_eq!(m.extra("undeclared_reruns"), Some(0), "{m:?}");
        assert_eq!(m.extra("lock_blocked"), Some(0), "{m:?}");
        assert_eq!(m.executions, 400);
        // Without declarations: the same outcome, serially, and no coverage.
        let empty = Wrapped {
            evm: EvmVm::new(&w.block),
            distort: Distort::Empty,
        };
        let (outcome, m) = run(&empty, &w, threads, Hints::Declared);
        assert!(
            outcome == expected,
            "{}",
            describe_difference(&expected, &outcome)
        );
        assert_eq!(m.extra("declaration_coverage_pct"), Some(0), "{m:?}");
        assert_eq!(m.extra("frontier_runs"), Some(400), "{m:?}");
    }
}

#[test]
fn contract_calls_are_fully_declared_by_preexecution() {
    let w = workload(WorkloadKind::Erc20, 300, 0.0, 8);
    let vm = EvmVm::new(&w.block);
    let (expected, _) = EngineKind::Sequential
        .execute(&vm, &w.pre_state, 1)
        .unwrap();
    let (outcome, declared) = run(&vm, &w, 2, Hints::Declared);
    assert!(
        outcome == expected,
        "{}",
        describe_difference(&expected, &outcome)
    );
    let (outcome, preexec) = run(&vm, &w, 2, Hints::Preexec);
    assert!(
        outcome == expected,
        "{}",
        describe_difference(&expected, &outcome)
    );
    assert_eq!(
        preexec.extra("declaration_coverage_pct"),
        Some(100),
        "{preexec:?}"
    );
    // Token balances are storage slots the transaction shape does not name.
    assert!(
        declared.extra("declaration_coverage_pct").unwrap() < 100,
        "{declared:?}"
    );
}

#[test]
fn wrong_declarations_stay_exact() {
    let mut seed = 20;
    for kind in [WorkloadKind::Mix, WorkloadKind::Swap, WorkloadKind::Chain] {
        for hot_ratio in [0.0, 0.5] {
            seed += 1;
            let w = workload(kind, 250, hot_ratio, seed);
            let vm = EvmVm::new(&w.block);
            let (expected, _) = EngineKind::Sequential
                .execute(&vm, &w.pre_state, 1)
                .unwrap();
            for distort in [Distort::Empty, Distort::ReadOnly, Distort::DropAndAdd] {
                let wrapped = Wrapped {
                    evm: EvmVm::new(&w.block),
                    distort,
                };
                for threads in [1, 2, 8] {
                    for hints in [Hints::Declared, Hints::Preexec] {
                        let (outcome, m) = run(&wrapped, &w, threads, hints);
                        assert!(
                            outcome == expected,
                            "{kind} hot {hot_ratio}, {distort:?}, {threads} threads, {hints:?}: {}\n{m:?}",
                            describe_difference(&expected, &outcome)
                        );
                        assert_eq!(outcome.state_diff_hash(), expected.state_diff_hash());
                    }
                }
            }
        }
    }
}

#[test]
fn a_declared_chain_runs_in_order_and_other_blocks_do_not() {
    for (kind, fallback) in [(WorkloadKind::Chain, 1), (WorkloadKind::Raw, 0)] {
        let w = workload(kind, 300, 0.0, 9);
        let vm = EvmVm::new(&w.block);
        let (expected, _) = EngineKind::Sequential
            .execute(&vm, &w.pre_state, 1)
            .unwrap();
        // block-stm and optimistic use the same up-front check of the declarations.
        for engine in [
            EngineKind::Sealevel,
            EngineKind::SealevelPreexec,
            EngineKind::BlockStm,
            EngineKind::Optimistic,
        ] {
            let (outcome, m) = engine.execute(&vm, &w.pre_state, 2).unwrap();
            assert!(
                outcome == expected,
                "{engine} on {kind}: {}",
                describe_difference(&expected, &outcome)
            );
            assert_eq!(
                m.extra("sequential_fallback"),
                Some(fallback),
                "{engine} on {kind}: {m:?}"
            );
        }
    }
}
