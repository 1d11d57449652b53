//! Checking a block's execution against its header.

use std::time::{Duration, Instant};

use alloy_primitives::B256;
use parex_core::outcome::EvmBlockOutcome;
use parex_core::{StateKey, StateValue, Storage};
use parex_engine::{EngineError, EngineKind, Metrics, RunOptions};
use parex_evm::{EvmVm, logs_bloom, receipts_root};

use crate::mainnet::MainnetBlock;

/// The result of executing one mainnet block and comparing it with its header.
#[derive(Debug)]
pub struct BlockCheck {
    pub number: u64,
    pub txs: usize,
    pub gas_used: u64,
    pub gas_matches: bool,
    pub bloom_matches: bool,
    /// `None`: the fork's receipts cannot be rebuilt from execution (pre-Byzantium).
    pub receipts_root_matches: Option<bool>,
    pub state_diff_hash: B256,
    pub elapsed: Duration,
    pub metrics: Metrics,
    pub outcome: EvmBlockOutcome,
}

impl BlockCheck {
    pub fn passed(&self) -> bool {
        self.gas_matches && self.bloom_matches && self.receipts_root_matches != Some(false)
    }

    /// A one-line description of what did not match (empty when all did).
    pub fn mismatches(&self, block: &MainnetBlock) -> String {
        let mut parts = Vec::new();
        if !self.gas_matches {
            parts.push(format!(
                "gas used {} != header {}",
                self.gas_used, block.expected.gas_used
            ));
        }
        if !self.bloom_matches {
            parts.push("logs bloom differs".to_string());
        }
        if self.receipts_root_matches == Some(false) {
            parts.push("receipts root differs".to_string());
        }
        let invalid = self.outcome.invalid_count();
        if invalid > 0 {
            let first = self
                .outcome
                .tx_outcomes
                .iter()
                .position(|o| o.status.is_invalid())
                .unwrap_or(0);
            parts.push(format!(
                "{invalid} invalid transactions (first: #{first} {:?})",
                self.outcome.tx_outcomes[first].status
            ));
        }
        parts.join("; ")
    }
}

/// Executes `block` with `engine` on its own pre-state and checks it against the header.
pub fn check_block(
    block: &MainnetBlock,
    engine: EngineKind,
    threads: usize,
) -> Result<BlockCheck, EngineError> {
    check_block_with(block, engine, &RunOptions::threads(threads))
}

/// [`check_block`] with explicit run options (e.g. [`RunOptions::stress`] in tests).
pub fn check_block_with(
    block: &MainnetBlock,
    engine: EngineKind,
    options: &RunOptions,
) -> Result<BlockCheck, EngineError> {
    check_block_on(block, engine, &block.pre_state, options)
}

/// [`check_block_with`] reading the pre-state through `storage` (the block's own pre-state
/// behind a wrapper: [`parex_core::LatencyStorage`], say).
pub fn check_block_on<S>(
    block: &MainnetBlock,
    engine: EngineKind,
    storage: &S,
    options: &RunOptions,
) -> Result<BlockCheck, EngineError>
where
    S: Storage<Key = StateKey, Value = StateValue>,
{
    let vm = EvmVm::with_pre_block(&block.block, &block.pre_state);
    let started = Instant::now();
    let (outcome, metrics) = engine.run(&vm, storage, options)?;
    let elapsed = started.elapsed();
    let root = receipts_root(block.spec(), &outcome.tx_outcomes);
    Ok(BlockCheck {
        number: block.number,
        txs: outcome.tx_outcomes.len(),
        gas_used: outcome.gas_used(),
        gas_matches: outcome.gas_used() == block.expected.gas_used,
        bloom_matches: logs_bloom(&outcome.tx_outcomes) == block.expected.logs_bloom,
        receipts_root_matches: root.map(|r| r == block.expected.receipts_root),
        state_diff_hash: outcome.state_diff_hash(),
        elapsed,
        metrics,
        outcome,
    })
}
