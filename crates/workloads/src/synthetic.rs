//! Seeded synthetic workloads on real contracts.
//!
//! A workload is a *setup block* of real transactions — OpenZeppelin ERC20 tokens and
//! Uniswap V2 (factory, router, pairs created and funded by `addLiquidity`) deployed
//! and funded — executed by the sequential engine on a genesis allocation, and then the
//! *workload block*, which runs on the resulting state. Timings cover the workload block
//! only.
//!
//! Contention: every transaction picks its accounts (and, for swaps, its pool) from a
//! population of which 10% is *hot*. A pick is a hot one (uniform among the hot) with
//! probability `hot_ratio`, otherwise a cold one never used before. So `hot_ratio` 0
//! means no two transactions share an account, a token balance or a pool — only the
//! beneficiary's fee credit, which is a delta.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use alloy_primitives::{Address, B256, Bytes, TxKind, U256, keccak256};
use alloy_sol_types::SolCall;
use parex_core::{AccountInfo, AccountValue, InMemoryStorage, StateKey, StateValue, TxStatus};
use parex_engine::EngineKind;
use parex_evm::{EvmBlock, EvmTx, EvmVm, MAINNET_CHAIN_ID};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use revm::context::{BlockEnv, TxEnv};
use revm::primitives::hardfork::SpecId;

use crate::contracts::{self, ParexToken, UniswapV2Router02};

/// The workload families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// Plain value transfers.
    Raw,
    /// ERC20 `transfer`s.
    Erc20,
    /// Uniswap V2 swaps through the router.
    Swap,
    /// 60% raw, 20% ERC20, 20% swaps.
    Mix,
    /// A fully dependent chain: each transaction is paid for by the previous one.
    Chain,
}

impl WorkloadKind {
    pub const ALL: &'static [WorkloadKind] = &[
        WorkloadKind::Raw,
        WorkloadKind::Erc20,
        WorkloadKind::Swap,
        WorkloadKind::Mix,
        WorkloadKind::Chain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Raw => "raw",
            WorkloadKind::Erc20 => "erc20",
            WorkloadKind::Swap => "swap",
            WorkloadKind::Mix => "mix",
            WorkloadKind::Chain => "chain",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Accounts one transaction picks (an upper bound).
    fn picks_per_tx(self) -> usize {
        match self {
            WorkloadKind::Swap => 1,
            WorkloadKind::Chain => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How big the workload block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Txs(usize),
    /// Total gas: the transaction count is calibrated on a sample so that the block
    /// uses about this much gas.
    Gas(u64),
}

/// A workload's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub size: Size,
    /// Size of the account population (and of the pool population for swaps);
    /// `None`: just enough for every cold pick to be fresh.
    pub accounts: Option<usize>,
    pub hot_ratio: f64,
    pub seed: u64,
}

impl WorkloadSpec {
    pub fn new(kind: WorkloadKind, size: Size) -> Self {
        Self {
            kind,
            size,
            accounts: None,
            hot_ratio: 0.0,
            seed: 1,
        }
    }
}

/// Bad workload parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error("hot ratio must be between 0 and 1, got {0}")]
    HotRatio(f64),
    #[error("the workload must have at least one transaction")]
    Empty,
    #[error(
        "--accounts {accounts} is too few: this block needs more than the {cold} cold (never reused) accounts it has; raise --accounts or leave it out"
    )]
    TooFewAccounts { accounts: usize, cold: usize },
    #[error("--accounts must be at least 2 for this workload, got {0}")]
    AccountsTooSmall(usize),
    #[error("gas target {0} is too small for even one transaction")]
    GasTooSmall(u64),
    #[error("setup transaction {index} failed ({status:?}); the workload cannot be built")]
    SetupFailed { index: usize, status: TxStatus },
    #[error("setup execution failed: {0}")]
    Setup(String),
}

/// A generated workload: the block and the state it runs on.
pub struct Workload {
    pub spec: WorkloadSpec,
    pub block: EvmBlock,
    pub pre_state: InMemoryStorage<StateKey, StateValue>,
    pub setup_txs: usize,
    /// Token contracts, in deployment order.
    pub tokens: Vec<Address>,
    /// Pools the block uses: (pair address, token a, token b), with the liquidity
    /// each side received in setup.
    pub pools: Vec<(Address, Address, Address)>,
    pub router: Option<Address>,
}

/// Liquidity per side of every pool, and token balances given to senders.
pub const POOL_LIQUIDITY: u128 = 1_000_000 * 10u128.pow(18);
pub const SENDER_TOKENS: u128 = 1_000_000 * 10u128.pow(18);
const GENESIS_ETH: u128 = 1_000 * 10u128.pow(18);
const BASE_FEE: u64 = 1_000_000_000;
const MAX_FEE: u128 = 2_000_000_000;
const PRIORITY_FEE: u128 = 1_000_000_000;
const BENEFICIARY: Address = Address::new([0xbe; 20]);

/// Generates the workload: plans the block, sets up what it needs by real transactions,
/// and returns the block with its pre-state.
pub fn generate(spec: &WorkloadSpec) -> Result<Workload, WorkloadError> {
    if !(0.0..=1.0).contains(&spec.hot_ratio) || spec.hot_ratio.is_nan() {
        return Err(WorkloadError::HotRatio(spec.hot_ratio));
    }
    let txs = match spec.size {
        Size::Txs(0) => return Err(WorkloadError::Empty),
        Size::Txs(n) => n,
        Size::Gas(gas) => calibrate(spec, gas)?,
    };
    build(spec, txs)
}

/// How many transactions make `gas` (measured on a 256-transaction sample).
fn calibrate(spec: &WorkloadSpec, gas: u64) -> Result<usize, WorkloadError> {
    let sample_txs = 256;
    let mut sample_spec = spec.clone();
    sample_spec.accounts = None;
    let sample = build(&sample_spec, sample_txs)?;
    let vm = EvmVm::new(&sample.block);
    let (outcome, _) = EngineKind::Sequential
        .execute(&vm, &sample.pre_state, 1)
        .map_err(|e| WorkloadError::Setup(e.to_string()))?;
    let per_tx = (outcome.gas_used() / sample_txs as u64).max(1);
    if gas < per_tx {
        return Err(WorkloadError::GasTooSmall(gas));
    }
    Ok(gas.div_ceil(per_tx) as usize)
}

/// What a transaction of the block does, before nonces and setup are known.
enum Intent {
    Raw {
        from: usize,
        to: usize,
        value: U256,
    },
    Erc20 {
        from: usize,
        to: usize,
        amount: U256,
    },
    Swap {
        trader: usize,
        pool: usize,
        a_to_b: bool,
        amount: U256,
    },
    Chain {
        from: usize,
        value: U256,
    },
}

/// Picks members of a population, 10% of which is hot.
struct Picker {
    hot: usize,
    next_cold: usize,
    total: usize,
    ratio: f64,
}

impl Picker {
    fn new(total: usize, ratio: f64) -> Self {
        let hot = (total / 10).max(1);
        Self {
            hot,
            next_cold: hot,
            total,
            ratio,
        }
    }
    fn pick(&mut self, rng: &mut SmallRng) -> Result<usize, WorkloadError> {
        if self.ratio > 0.0 && rng.random_bool(self.ratio) {
            return Ok(rng.random_range(0..self.hot));
        }
        if self.next_cold >= self.total {
            return Err(WorkloadError::TooFewAccounts {
                accounts: self.total,
                cold: self.total - self.hot,
            });
        }
        self.next_cold += 1;
        Ok(self.next_cold - 1)
    }
}

/// The i-th externally owned account of the population.
pub fn account_address(i: usize) -> Address {
    let mut seed = *b"parex-account-000000000000000000";
    seed[24..].copy_from_slice(&(i as u64).to_be_bytes());
    Address::from_slice(&keccak256(seed)[12..])
}

/// The deployer that creates and funds the contracts.
pub fn deployer() -> Address {
    Address::new([0xde; 20])
}

/// The tokens `(i, j)` of pool `k`: the k-th pair in the order (0,1), (0,2), (1,2), (0,3)...
fn pool_tokens(k: usize) -> (usize, usize) {
    let mut j = 1;
    while j * (j + 1) / 2 <= k {
        j += 1;
    }
    (k - j * (j - 1) / 2, j)
}

fn plan(spec: &WorkloadSpec, txs: usize, accounts: usize) -> Result<Vec<Intent>, WorkloadError> {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    if spec.kind == WorkloadKind::Chain {
        // Account 0 pays for everything; each next account is funded only by its
        // predecessor's transfer, so every transaction depends on the one before.
        let per_tx_cost = U256::from(21_000u128 * MAX_FEE);
        let mut balance = U256::from(GENESIS_ETH);
        return Ok((0..txs)
            .map(|i| {
                balance -= per_tx_cost;
                Intent::Chain {
                    from: i,
                    value: balance,
                }
            })
            .collect());
    }
    let mut people = Picker::new(accounts, spec.hot_ratio);
    let mut pools = Picker::new(accounts, spec.hot_ratio);
    let mut intents = Vec::with_capacity(txs);
    for _ in 0..txs {
        let kind = match spec.kind {
            WorkloadKind::Mix => match rng.random_range(0..10) {
                0..=5 => WorkloadKind::Raw,
                6 | 7 => WorkloadKind::Erc20,
                _ => WorkloadKind::Swap,
            },
            k => k,
        };
        intents.push(match kind {
            WorkloadKind::Raw => Intent::Raw {
                from: people.pick(&mut rng)?,
                to: people.pick(&mut rng)?,
                value: U256::from(rng.random_range(1u64..1_000_000_000_000)),
            },
            WorkloadKind::Erc20 => Intent::Erc20 {
                from: people.pick(&mut rng)?,
                to: people.pick(&mut rng)?,
                amount: U256::from(rng.random_range(1u64..1_000_000)) * U256::from(10u64.pow(12)),
            },
            _ => Intent::Swap {
                trader: people.pick(&mut rng)?,
                pool: pools.pick(&mut rng)?,
                a_to_b: rng.random_bool(0.5),
                amount: U256::from(rng.random_range(1u64..1_000_000)) * U256::from(10u64.pow(12)),
            },
        });
    }
    Ok(intents)
}

/// Transactions under construction, with nonces tracked per sender.
struct TxList {
    nonces: HashMap<Address, u64>,
    txs: Vec<TxEnv>,
}

impl TxList {
    fn push(&mut self, from: Address, to: TxKind, value: U256, data: Bytes, gas_limit: u64) -> u64 {
        let nonce = self.nonces.entry(from).or_insert(0);
        self.txs.push(TxEnv {
            tx_type: 2,
            caller: from,
            gas_limit,
            gas_price: MAX_FEE,
            gas_priority_fee: Some(PRIORITY_FEE),
            kind: to,
            value,
            data,
            nonce: *nonce,
            chain_id: Some(MAINNET_CHAIN_ID),
            ..TxEnv::default()
        });
        *nonce += 1;
        *nonce - 1
    }
    fn call(&mut self, from: Address, to: Address, data: Vec<u8>, gas_limit: u64) {
        self.push(from, TxKind::Call(to), U256::ZERO, data.into(), gas_limit);
    }
    fn create(&mut self, from: Address, init: Bytes) -> Address {
        let nonce = self.push(from, TxKind::Create, U256::ZERO, init, 12_000_000);
        from.create(nonce)
    }
}

fn block_env(gas_limit: u64) -> BlockEnv {
    let mut env = BlockEnv {
        number: U256::from(20_000_000u64),
        beneficiary: BENEFICIARY,
        timestamp: U256::from(1_720_000_000u64),
        gas_limit,
        basefee: BASE_FEE,
        difficulty: U256::ZERO,
        prevrandao: Some(B256::repeat_byte(0x11)),
        ..BlockEnv::default()
    };
    env.set_blob_excess_gas_and_price(
        0,
        revm::primitives::eip4844::BLOB_BASE_FEE_UPDATE_FRACTION_CANCUN,
    );
    env
}

fn evm_block(txs: Vec<TxEnv>) -> EvmBlock {
    let gas_limit = txs.iter().map(|t| t.gas_limit).sum::<u64>().max(30_000_000);
    EvmBlock {
        number: 20_000_000,
        spec: SpecId::CANCUN,
        chain_id: MAINNET_CHAIN_ID,
        env: block_env(gas_limit),
        txs: txs.into_iter().map(EvmTx::from).collect(),
        block_hashes: Arc::new(HashMap::new()),
    }
}

fn build(spec: &WorkloadSpec, txs: usize) -> Result<Workload, WorkloadError> {
    let needed = txs * spec.kind.picks_per_tx();
    let accounts = match spec.accounts {
        Some(a) if a < 2 => return Err(WorkloadError::AccountsTooSmall(a)),
        Some(a) => a,
        None => needed + needed.div_ceil(9) + 16,
    };
    let intents = plan(spec, txs, accounts)?;
    let addr = |i: usize| account_address(i);
    let d = deployer();

    // What the block needs: tokens, pools, token balances and router approvals.
    let uses_erc20 = intents.iter().any(|i| matches!(i, Intent::Erc20 { .. }));
    let used_pools: BTreeSet<usize> = intents
        .iter()
        .filter_map(|i| {
            if let Intent::Swap { pool, .. } = i {
                Some(*pool)
            } else {
                None
            }
        })
        .collect();
    let token_count = used_pools
        .iter()
        .map(|&k| pool_tokens(k).1 + 1)
        .max()
        .unwrap_or(0)
        .max(usize::from(uses_erc20));

    let mut setup = TxList {
        nonces: HashMap::new(),
        txs: Vec::new(),
    };
    let supply = U256::MAX >> 8;
    let tokens: Vec<Address> = (0..token_count)
        .map(|t| {
            setup.create(
                d,
                contracts::token_init(&format!("Parex Token {t}"), &format!("PX{t}"), supply),
            )
        })
        .collect();
    let mut router = None;
    let mut pools = Vec::new();
    let deadline = U256::from(u64::MAX);
    if !used_pools.is_empty() {
        let weth = setup.create(d, contracts::weth_init());
        let factory = setup.create(d, contracts::factory_init(d));
        let r = setup.create(d, contracts::router_init(factory, weth));
        router = Some(r);
        let pool_token_count = used_pools
            .iter()
            .map(|&k| pool_tokens(k).1 + 1)
            .max()
            .unwrap_or(0);
        for &t in &tokens[..pool_token_count] {
            setup.call(
                d,
                t,
                ParexToken::approveCall {
                    spender: r,
                    value: U256::MAX,
                }
                .abi_encode(),
                100_000,
            );
        }
        for &k in &used_pools {
            let (a, b) = pool_tokens(k);
            let (ta, tb) = (tokens[a], tokens[b]);
            let liquidity = U256::from(POOL_LIQUIDITY);
            let call = UniswapV2Router02::addLiquidityCall {
                tokenA: ta,
                tokenB: tb,
                amountADesired: liquidity,
                amountBDesired: liquidity,
                amountAMin: U256::ZERO,
                amountBMin: U256::ZERO,
                to: d,
                deadline,
            };
            setup.call(d, r, call.abi_encode(), 6_000_000);
            pools.push((contracts::pair_address(factory, ta, tb), ta, tb));
        }
    }
    let pool_of = |k: usize| {
        pools[used_pools
            .iter()
            .position(|&p| p == k)
            .expect("planned pool")]
    };
    // Token balances (and router approvals for swaps), once per holder and token.
    let mut funded: BTreeSet<(usize, Address)> = BTreeSet::new();
    let mut approved: BTreeSet<(usize, Address)> = BTreeSet::new();
    for intent in &intents {
        let (holder, token, approve) = match *intent {
            Intent::Erc20 { from, .. } => (from, tokens[0], false),
            Intent::Swap {
                trader,
                pool,
                a_to_b,
                ..
            } => {
                let (_, ta, tb) = pool_of(pool);
                (trader, if a_to_b { ta } else { tb }, true)
            }
            _ => continue,
        };
        if funded.insert((holder, token)) {
            let call = ParexToken::transferCall {
                to: addr(holder),
                value: U256::from(SENDER_TOKENS),
            };
            setup.call(d, token, call.abi_encode(), 100_000);
        }
        if approve && approved.insert((holder, token)) {
            let call = ParexToken::approveCall {
                spender: router.expect("swaps have a router"),
                value: U256::MAX,
            };
            setup.call(addr(holder), token, call.abi_encode(), 100_000);
        }
    }

    // The workload block, continuing each sender's nonces after setup.
    let mut block = TxList {
        nonces: setup.nonces.clone(),
        txs: Vec::with_capacity(txs),
    };
    for intent in &intents {
        match *intent {
            Intent::Raw { from, to, value } => {
                block.push(
                    addr(from),
                    TxKind::Call(addr(to)),
                    value,
                    Bytes::new(),
                    21_000,
                );
            }
            Intent::Chain { from, value } => {
                block.push(
                    addr(from),
                    TxKind::Call(addr(from + 1)),
                    value,
                    Bytes::new(),
                    21_000,
                );
            }
            Intent::Erc20 { from, to, amount } => {
                let call = ParexToken::transferCall {
                    to: addr(to),
                    value: amount,
                };
                block.call(addr(from), tokens[0], call.abi_encode(), 100_000);
            }
            Intent::Swap {
                trader,
                pool,
                a_to_b,
                amount,
            } => {
                let (_, ta, tb) = pool_of(pool);
                let path = if a_to_b { vec![ta, tb] } else { vec![tb, ta] };
                let call = UniswapV2Router02::swapExactTokensForTokensCall {
                    amountIn: amount,
                    amountOutMin: U256::ZERO,
                    path,
                    to: addr(trader),
                    deadline,
                };
                block.call(
                    addr(trader),
                    router.expect("swaps have a router"),
                    call.abi_encode(),
                    300_000,
                );
            }
        }
    }

    // Genesis: ETH for the deployer and the population (only account 0 in a chain).
    let mut genesis = InMemoryStorage::new();
    let fund = |g: &mut InMemoryStorage<StateKey, StateValue>, a: Address| {
        let info = AccountInfo::with_balance(U256::from(GENESIS_ETH), 0);
        g.insert(
            StateKey::Account(a),
            StateValue::Account(AccountValue {
                info: Some(info),
                ..AccountValue::default()
            }),
        );
    };
    fund(&mut genesis, d);
    let funded_accounts = if spec.kind == WorkloadKind::Chain {
        1
    } else {
        accounts
    };
    for i in 0..funded_accounts {
        fund(&mut genesis, addr(i));
    }

    let setup_txs = setup.txs.len();
    let mut pre_state = run_setup(genesis, setup.txs)?;
    let block = evm_block(block.txs);
    parex_evm::split_contract_balances(&mut pre_state, block.env.beneficiary);
    Ok(Workload {
        spec: WorkloadSpec {
            size: Size::Txs(txs),
            accounts: Some(accounts),
            ..spec.clone()
        },
        block,
        pre_state,
        setup_txs,
        tokens,
        pools,
        router,
    })
}

/// Executes the setup block sequentially and returns the state after it.
fn run_setup(
    genesis: InMemoryStorage<StateKey, StateValue>,
    txs: Vec<TxEnv>,
) -> Result<InMemoryStorage<StateKey, StateValue>, WorkloadError> {
    if txs.is_empty() {
        return Ok(genesis);
    }
    let block = evm_block(txs);
    let vm = EvmVm::new(&block);
    let (outcome, _) = EngineKind::Sequential
        .execute(&vm, &genesis, 1)
        .map_err(|e| WorkloadError::Setup(e.to_string()))?;
    if let Some((index, o)) = outcome
        .tx_outcomes
        .iter()
        .enumerate()
        .find(|(_, o)| !o.status.is_success())
    {
        return Err(WorkloadError::SetupFailed {
            index,
            status: o.status.clone(),
        });
    }
    let mut state = genesis;
    for (key, value) in outcome.state_diff {
        state.insert(key, value);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_token_pairs_are_distinct() {
        let pairs: Vec<_> = (0..10).map(pool_tokens).collect();
        assert_eq!(pairs[..4], [(0, 1), (0, 2), (1, 2), (0, 3)]);
        let set: BTreeSet<_> = pairs.iter().collect();
        assert_eq!(set.len(), 10);
        assert!(pairs.iter().all(|(a, b)| a < b));
    }
}
