//! Is `sequential` an honest baseline? It is compared with the plainest way to run a
//! block with revm — one EVM, `transact_commit` per transaction into a `CacheDB` holding
//! the same pre-state — on 1-gigagas raw-transfer and ERC20 blocks.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use parex_core::{StateKey, StateValue};
use parex_engine::EngineKind;
use parex_evm::EvmVm;
use parex_workloads::{Size, Workload, WorkloadKind, WorkloadSpec, synthetic};
use revm::database::{CacheDB, EmptyDB};
use revm::state::AccountInfo;
use revm::{Context, ExecuteCommitEvm, MainBuilder, MainContext};

/// The workload's pre-state as a revm `CacheDB` (slots of each account's current
/// storage generation only, which is all the block can see).
fn cache_db(w: &Workload) -> CacheDB<EmptyDB> {
    let mut db = CacheDB::new(EmptyDB::default());
    let mut generations = std::collections::HashMap::new();
    for (key, value) in w.pre_state.iter() {
        if let (StateKey::Account(a), StateValue::Account(v)) = (key, value) {
            generations.insert(*a, v.storage_generation);
            if let Some(info) = v.info {
                let code = match w.pre_state.get(&StateKey::Code(info.code_hash)) {
                    Some(StateValue::Code(c)) => c.clone(),
                    _ => Default::default(),
                };
                db.insert_account_info(
                    *a,
                    AccountInfo::new(info.balance, info.nonce, info.code_hash, code),
                );
            }
        }
    }
    for (key, value) in w.pre_state.iter() {
        if let (StateKey::Slot(a, g, s), StateValue::Slot(v)) = (key, value)
            && generations.get(a) == Some(g)
        {
            db.insert_account_storage(*a, *s, *v)
                .expect("account inserted above");
        }
    }
    db
}

fn plain_revm_loop(w: &Workload, db: CacheDB<EmptyDB>) -> u64 {
    let block = &w.block;
    let mut evm = Context::mainnet()
        .with_db(db)
        .with_block(block.env.clone())
        .modify_cfg_chained(|cfg| {
            cfg.spec = block.spec;
            cfg.chain_id = block.chain_id;
        })
        .build_mainnet();
    let mut gas = 0;
    for tx in &block.txs {
        let result = evm
            .transact_commit(tx.env.clone())
            .expect("valid transaction");
        gas += result.tx_gas_used();
    }
    gas
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequential_vs_plain_revm");
    group.sample_size(10);
    for kind in [WorkloadKind::Raw, WorkloadKind::Erc20] {
        let w = synthetic::generate(&WorkloadSpec::new(kind, Size::Gas(1_000_000_000))).unwrap();
        let vm = EvmVm::new(&w.block);
        let (outcome, _) = EngineKind::Sequential
            .execute(&vm, &w.pre_state, 1)
            .unwrap();
        assert_eq!(
            plain_revm_loop(&w, cache_db(&w)),
            outcome.gas_used(),
            "same gas both ways"
        );
        group.bench_function(format!("{kind}/plain_revm"), |b| {
            b.iter_batched(
                || cache_db(&w),
                |db| plain_revm_loop(&w, db),
                BatchSize::LargeInput,
            )
        });
        group.bench_function(format!("{kind}/sequential"), |b| {
            b.iter(|| {
                EngineKind::Sequential
                    .execute(&vm, &w.pre_state, 1)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
