//! Is `sequential` an honest baseline? It is compared with the plainest way to run a
//! block with revm — one EVM, `transact_commit` per transaction into a `CacheDB` — on
//! 1-gigagas raw-transfer and ERC20 blocks, in two settings:
//!
//! * `plain_revm_over_storage`: revm's `CacheDB` over the very same `Storage` (through a
//!   `DatabaseRef` adapter), starting cold exactly like `sequential` does — like for like;
//! * `plain_revm_preloaded`: a `CacheDB` holding the whole pre-state before the clock
//!   starts, so loading accounts costs it nothing — a lower bound no engine that reads
//!   through `Storage` can reach.

use alloy_primitives::{Address, B256, U256};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use parex_core::{InMemoryStorage, StateKey, StateValue, Storage};
use parex_engine::EngineKind;
use parex_evm::EvmVm;
use parex_workloads::{Size, Workload, WorkloadKind, WorkloadSpec, synthetic};
use revm::bytecode::Bytecode;
use revm::context::TxEnv;
use revm::database::{CacheDB, DatabaseRef, EmptyDB};
use revm::state::AccountInfo;
use revm::{Context, ExecuteCommitEvm, MainBuilder, MainContext};

/// The allocator of the `parex` binary, so that these numbers match its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// The workload's `Storage` as a revm `DatabaseRef`.
struct StorageRef<'a>(&'a InMemoryStorage<StateKey, StateValue>);

impl StorageRef<'_> {
    fn account(&self, address: Address) -> Option<parex_core::AccountValue> {
        self.0
            .read(&StateKey::Account(address))
            .unwrap()
            .and_then(|v| v.as_account().copied())
    }
}

impl DatabaseRef for StorageRef<'_> {
    type Error = std::convert::Infallible;
    fn basic_ref(&self, address: Address) -> Result<Option<AccountInfo>, Self::Error> {
        Ok(self.account(address).and_then(|v| v.info).map(|info| {
            let code = self.code_by_hash_ref(info.code_hash).unwrap();
            AccountInfo::new(info.balance, info.nonce, info.code_hash, code)
        }))
    }
    fn code_by_hash_ref(&self, code_hash: B256) -> Result<Bytecode, Self::Error> {
        Ok(match self.0.read(&StateKey::Code(code_hash)).unwrap() {
            Some(StateValue::Code(code)) => code,
            _ => Bytecode::default(),
        })
    }
    fn storage_ref(&self, address: Address, index: U256) -> Result<U256, Self::Error> {
        let generation = self.account(address).map_or(0, |v| v.storage_generation);
        let key = StateKey::Slot(address, generation, index);
        Ok(self
            .0
            .read(&key)
            .unwrap()
            .and_then(|v| v.as_slot())
            .unwrap_or_default())
    }
    fn block_hash_ref(&self, _number: u64) -> Result<B256, Self::Error> {
        Ok(B256::ZERO)
    }
}

fn plain_revm_loop<DB>(w: &Workload, db: DB) -> u64
where
    DB: revm::Database + revm::DatabaseCommit,
    DB::Error: std::fmt::Debug,
{
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
            .transact_commit(TxEnv::clone(&tx.env))
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
        assert_eq!(
            plain_revm_loop(&w, CacheDB::new(StorageRef(&w.pre_state))),
            outcome.gas_used()
        );
        group.bench_function(format!("{kind}/plain_revm_over_storage"), |b| {
            b.iter(|| plain_revm_loop(&w, CacheDB::new(StorageRef(&w.pre_state))))
        });
        group.bench_function(format!("{kind}/plain_revm_preloaded"), |b| {
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
