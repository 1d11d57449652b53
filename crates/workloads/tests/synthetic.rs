//! Workload generators: deterministic, valid, conflict-free when asked, really set up.

use std::collections::{HashMap, HashSet};

use alloy_primitives::{Address, U256};
use parex_core::{ReadError, ReadView, StateKey, StateValue, Storage, TxStatus, Vm, Write};
use parex_engine::EngineKind;
use parex_evm::EvmVm;
use parex_workloads::contracts::layout;
use parex_workloads::synthetic::{self, POOL_LIQUIDITY, SENDER_TOKENS, account_address};
use parex_workloads::{Size, Workload, WorkloadError, WorkloadKind, WorkloadSpec};

fn spec(kind: WorkloadKind, txs: usize, hot_ratio: f64, seed: u64) -> WorkloadSpec {
    WorkloadSpec {
        kind,
        size: Size::Txs(txs),
        accounts: None,
        hot_ratio,
        seed,
    }
}

fn run(w: &Workload) -> parex_core::outcome::EvmBlockOutcome {
    EngineKind::Sequential
        .execute(&EvmVm::new(&w.block), &w.pre_state, 1)
        .unwrap()
        .0
}

#[test]
fn every_workload_is_deterministic_per_seed_and_fully_valid() {
    for &kind in WorkloadKind::ALL {
        for hot in [0.0, 0.5] {
            let a = synthetic::generate(&spec(kind, 300, hot, 7)).unwrap();
            let b = synthetic::generate(&spec(kind, 300, hot, 7)).unwrap();
            let c = synthetic::generate(&spec(kind, 300, hot, 8)).unwrap();
            let envs = |w: &Workload| {
                w.block
                    .txs
                    .iter()
                    .map(|t| t.env.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                envs(&a),
                envs(&b),
                "{kind} hot {hot}: same seed, same block"
            );
            let (oa, ob) = (run(&a), run(&b));
            assert_eq!(
                oa.state_diff_hash(),
                ob.state_diff_hash(),
                "{kind}: same seed, same result"
            );
            if kind != WorkloadKind::Chain {
                assert_ne!(
                    envs(&a),
                    envs(&c),
                    "{kind} hot {hot}: another seed, another block"
                );
            }
            assert_eq!(oa.tx_outcomes.len(), 300);
            for (i, o) in oa.tx_outcomes.iter().enumerate() {
                assert_eq!(
                    o.status,
                    TxStatus::Success,
                    "{kind} hot {hot}: transaction {i}"
                );
            }
        }
    }
}

/// A view of the pre-block state that records the keys read.
struct Recording<'a, S> {
    storage: &'a S,
    reads: HashSet<StateKey>,
}

impl<S: Storage<Key = StateKey, Value = StateValue>> ReadView<StateKey, StateValue>
    for Recording<'_, S>
{
    fn read(&mut self, key: &StateKey) -> Result<Option<StateValue>, ReadError> {
        self.reads.insert(*key);
        Ok(self.storage.read(key)?)
    }
}

#[test]
fn hot_ratio_zero_means_no_shared_state_but_the_fee_credit() {
    for kind in [
        WorkloadKind::Raw,
        WorkloadKind::Erc20,
        WorkloadKind::Swap,
        WorkloadKind::Mix,
    ] {
        let w = synthetic::generate(&spec(kind, 400, 0.0, 3)).unwrap();
        let vm = EvmVm::new(&w.block);
        let beneficiary = StateKey::Account(w.block.env.beneficiary);
        let mut writers: HashMap<StateKey, usize> = HashMap::new();
        let mut readers: Vec<HashSet<StateKey>> = Vec::new();
        for tx in 0..vm.tx_count() {
            let mut view = Recording {
                storage: &w.pre_state,
                reads: HashSet::new(),
            };
            let exec = vm.execute(tx, &mut view).unwrap();
            assert_eq!(exec.output.status, TxStatus::Success, "{kind} tx {tx}");
            for (key, write) in &exec.writes {
                if *key == beneficiary {
                    assert!(
                        matches!(write, Write::Delta(_)),
                        "the fee credit is a delta"
                    );
                    continue;
                }
                if let Some(other) = writers.insert(*key, tx) {
                    panic!("{kind}: transactions {other} and {tx} both write {key:?}");
                }
            }
            readers.push(view.reads);
        }
        for (tx, reads) in readers.iter().enumerate() {
            for key in reads {
                if let Some(&w) = writers.get(key) {
                    assert_eq!(
                        w, tx,
                        "{kind}: transaction {tx} reads {key:?}, written by {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn hot_ratio_makes_transactions_share_accounts() {
    let w = synthetic::generate(&spec(WorkloadKind::Raw, 400, 0.9, 3)).unwrap();
    let senders: HashSet<Address> = w.block.txs.iter().map(|t| t.env.caller).collect();
    assert!(
        senders.len() < 200,
        "at hot ratio 0.9 most senders repeat ({} distinct)",
        senders.len()
    );
}

#[test]
fn chain_transactions_each_depend_on_the_previous_one() {
    let w = synthetic::generate(&spec(WorkloadKind::Chain, 50, 0.0, 1)).unwrap();
    let vm = EvmVm::new(&w.block);
    for tx in 1..3 {
        let mut view = Recording {
            storage: &w.pre_state,
            reads: HashSet::new(),
        };
        let alone = vm.execute(tx, &mut view).unwrap();
        assert!(
            alone.output.status.is_invalid(),
            "tx {tx} cannot pay without its predecessor"
        );
    }
    assert_eq!(run(&w).invalid_count(), 0);
}

fn account_generation(w: &Workload, a: Address) -> u32 {
    match w.pre_state.read(&StateKey::Account(a)).unwrap() {
        Some(StateValue::Account(v)) => v.storage_generation,
        other => panic!("{a} is not an account: {other:?}"),
    }
}

fn slot(w: &Workload, a: Address, s: U256) -> U256 {
    let generation = account_generation(w, a);
    w.pre_state
        .read(&StateKey::Slot(a, generation, s))
        .unwrap()
        .and_then(|v| v.as_slot())
        .unwrap_or_default()
}

#[test]
fn setup_gives_senders_tokens_and_pools_their_reserves() {
    let w = synthetic::generate(&spec(WorkloadKind::Erc20, 100, 0.0, 5)).unwrap();
    let token = w.tokens[0];
    for tx in &w.block.txs {
        let balance = slot(
            &w,
            token,
            layout::mapping_slot(tx.env.caller, layout::ERC20_BALANCES_SLOT),
        );
        assert_eq!(
            balance,
            U256::from(SENDER_TOKENS),
            "sender {}",
            tx.env.caller
        );
    }
    assert_eq!(
        slot(
            &w,
            token,
            layout::mapping_slot(account_address(1_000_000), 0)
        ),
        U256::ZERO
    );

    let w = synthetic::generate(&spec(WorkloadKind::Swap, 60, 0.0, 5)).unwrap();
    assert_eq!(w.pools.len(), 60, "one pool per swap at hot ratio 0");
    for &(pair, _, _) in &w.pools {
        let (r0, r1) =
            layout::unpack_reserves(slot(&w, pair, U256::from(layout::PAIR_RESERVES_SLOT)));
        assert_eq!(
            (r0, r1),
            (U256::from(POOL_LIQUIDITY), U256::from(POOL_LIQUIDITY)),
            "pair {pair}"
        );
    }
    // After the swaps, every pool moved and its constant product did not shrink.
    let outcome = run(&w);
    let after: HashMap<StateKey, StateValue> = outcome.state_diff.into_iter().collect();
    for &(pair, _, _) in &w.pools {
        let key = StateKey::Slot(
            pair,
            account_generation(&w, pair),
            U256::from(layout::PAIR_RESERVES_SLOT),
        );
        let (r0, r1) = layout::unpack_reserves(after[&key].as_slot().unwrap());
        assert_ne!(
            (r0, r1),
            (U256::from(POOL_LIQUIDITY), U256::from(POOL_LIQUIDITY))
        );
        assert!(r0 * r1 >= U256::from(POOL_LIQUIDITY) * U256::from(POOL_LIQUIDITY));
    }
}

#[test]
fn gas_sized_blocks_reach_their_target() {
    for (kind, target) in [
        (WorkloadKind::Raw, 21_000_000u64),
        (WorkloadKind::Erc20, 20_000_000),
    ] {
        let mut s = spec(kind, 1, 0.0, 1);
        s.size = Size::Gas(target);
        let w = synthetic::generate(&s).unwrap();
        let gas = run(&w).gas_used() as f64;
        assert!(
            (gas / target as f64 - 1.0).abs() < 0.03,
            "{kind}: {gas} gas for a {target} target"
        );
    }
}

#[test]
fn bad_parameters_are_errors() {
    assert_eq!(
        synthetic::generate(&spec(WorkloadKind::Raw, 10, 1.5, 1)).err(),
        Some(WorkloadError::HotRatio(1.5))
    );
    assert_eq!(
        synthetic::generate(&spec(WorkloadKind::Raw, 0, 0.0, 1)).err(),
        Some(WorkloadError::Empty)
    );
    let mut s = spec(WorkloadKind::Raw, 1000, 0.0, 1);
    s.accounts = Some(100);
    assert!(matches!(
        synthetic::generate(&s),
        Err(WorkloadError::TooFewAccounts { .. })
    ));
    s.size = Size::Gas(100);
    assert!(matches!(
        synthetic::generate(&s),
        Err(WorkloadError::GasTooSmall(100))
    ));
}

/// The delta sinks a block declares: the beneficiary first, then the recipients of at
/// least 16 plain transfers, most first; a conflict-free block has no other.
#[test]
fn delta_sinks_are_the_beneficiary_and_the_most_credited_wallets() {
    let beneficiary = |w: &Workload| StateKey::Account(w.block.env.beneficiary);
    let free = synthetic::generate(&spec(WorkloadKind::Raw, 400, 0.0, 3)).unwrap();
    let vm = EvmVm::with_pre_block(&free.block, &free.pre_state);
    assert_eq!(vm.delta_sinks(), vec![beneficiary(&free)]);
    let hot = synthetic::generate(&WorkloadSpec {
        accounts: Some(500),
        ..spec(WorkloadKind::Raw, 2000, 0.9, 3)
    })
    .unwrap();
    let vm = EvmVm::with_pre_block(&hot.block, &hot.pre_state);
    let sinks = vm.delta_sinks();
    assert_eq!(sinks[0], beneficiary(&hot));
    assert!(
        sinks.len() > 1,
        "hot recipients of many transfers: {sinks:?}"
    );
    let mut transfers: HashMap<StateKey, usize> = HashMap::new();
    for tx in &hot.block.txs {
        // Plain transfers to another account than the sender.
        if let alloy_primitives::TxKind::Call(to) = tx.env.kind
            && tx.env.data.is_empty()
            && to != tx.env.caller
        {
            *transfers.entry(StateKey::Account(to)).or_default() += 1;
        }
    }
    let counts: Vec<usize> = sinks[1..].iter().map(|k| transfers[k]).collect();
    assert!(counts.iter().all(|&c| c >= 16), "{counts:?}");
    assert!(
        counts.windows(2).all(|w| w[0] >= w[1]),
        "most first: {counts:?}"
    );
}
