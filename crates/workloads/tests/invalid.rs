//! Invalid transactions are reported as invalid, use no gas, change nothing, and do not
//! stop the block.

use alloy_primitives::{Address, TxKind, U256};
use parex_core::{AccountInfo, AccountValue, InMemoryStorage, StateKey, StateValue, TxStatus};
use parex_engine::EngineKind;
use parex_evm::{EvmBlock, EvmTx, EvmVm};
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, synthetic};
use revm::context::TxEnv;

fn transfer(from: Address, nonce: u64, gas_limit: u64, value: U256) -> EvmTx {
    EvmTx::from(TxEnv {
        caller: from,
        kind: TxKind::Call(Address::repeat_byte(0x55)),
        nonce,
        gas_limit,
        gas_price: 2_000_000_000,
        value,
        chain_id: Some(1),
        ..TxEnv::default()
    })
}

#[test]
fn bad_nonce_insufficient_funds_and_oversized_gas_are_invalid() {
    // Start from a generated block for its environment, then replace its transactions.
    let w = synthetic::generate(&WorkloadSpec::new(WorkloadKind::Raw, Size::Txs(1))).unwrap();
    let rich = Address::repeat_byte(0x11);
    let poor = Address::repeat_byte(0x22);
    let mut state = InMemoryStorage::new();
    let account = |balance: u64| {
        StateValue::Account(AccountValue {
            info: Some(AccountInfo::with_balance(
                U256::from(balance) * U256::from(10u64.pow(18)),
                0,
            )),
            ..AccountValue::default()
        })
    };
    state.insert(StateKey::Account(rich), account(10));
    state.insert(StateKey::Account(poor), account(0));
    let mut block: EvmBlock = w.block.clone();
    block.env.gas_limit = 1_000_000;
    block.txs = vec![
        transfer(rich, 5, 21_000, U256::from(1)), // nonce too high
        transfer(poor, 0, 21_000, U256::from(1)), // cannot pay for gas
        transfer(rich, 0, 2_000_000, U256::from(1)), // gas limit above the block's
        transfer(rich, 0, 21_000, U256::from(1)), // valid
        transfer(rich, 1, 21_000, U256::from(100) * U256::from(10u64.pow(18))), // value too high
    ];
    let vm = EvmVm::new(&block);
    let (outcome, _) = EngineKind::Sequential.execute(&vm, &state, 1).unwrap();
    let statuses: Vec<_> = outcome
        .tx_outcomes
        .iter()
        .map(|o| o.status.clone())
        .collect();
    for i in [0, 1, 2, 4] {
        assert!(statuses[i].is_invalid(), "tx {i}: {:?}", statuses[i]);
        assert_eq!(outcome.tx_outcomes[i].gas_used, 0);
    }
    let TxStatus::Invalid(reason) = &statuses[0] else {
        unreachable!()
    };
    assert!(reason.contains("nonce"), "{reason}");
    assert_eq!(statuses[3], TxStatus::Success);
    assert_eq!(outcome.gas_used(), 21_000);
    assert_eq!(outcome.invalid_count(), 4);
    // Only the valid transfer changed state: sender, recipient, fee credit.
    assert_eq!(outcome.state_diff.len(), 3);
    assert!(
        !outcome
            .state_diff
            .iter()
            .any(|(k, _)| *k == StateKey::Account(poor))
    );
}
