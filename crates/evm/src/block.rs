//! A block ready for execution: revm's block environment, the hardfork, the
//! transactions as revm `TxEnv`s, and the ancestor hashes BLOCKHASH may ask for.

use std::collections::HashMap;
use std::sync::Arc;

use alloy_consensus::{Transaction, TxEnvelope, Typed2718};
use alloy_primitives::{Address, B256};
use revm::context::{BlockEnv, TxEnv};
use revm::context_interface::either::Either;
use revm::primitives::hardfork::SpecId;

/// One transaction of a block.
#[derive(Clone, Debug)]
pub struct EvmTx {
    /// Shared: each execution hands revm the transaction by reference count instead of a
    /// deep copy (access list and authorizations included) every time it runs it.
    pub env: Arc<TxEnv>,
    /// The transaction hash, when the source provides one.
    pub hash: Option<B256>,
}

/// A transaction without a known hash (generated workloads, tests).
impl From<TxEnv> for EvmTx {
    fn from(env: TxEnv) -> Self {
        Self {
            env: Arc::new(env),
            hash: None,
        }
    }
}

/// A block ready for execution.
#[derive(Clone, Debug)]
pub struct EvmBlock {
    pub number: u64,
    pub spec: SpecId,
    pub chain_id: u64,
    pub env: BlockEnv,
    pub txs: Vec<EvmTx>,
    /// Hashes of ancestor blocks by number (for BLOCKHASH).
    pub block_hashes: Arc<HashMap<u64, B256>>,
}

/// Converts a signed transaction and its sender into revm's transaction environment.
pub fn tx_env_from_envelope(tx: &TxEnvelope, caller: Address) -> TxEnv {
    let gas_price = match tx.gas_price() {
        Some(price) => price,
        None => tx.max_fee_per_gas(),
    };
    let authorization_list = tx
        .authorization_list()
        .map(|list| list.iter().cloned().map(Either::Left).collect())
        .unwrap_or_default();
    TxEnv {
        tx_type: tx.ty(),
        caller,
        gas_limit: tx.gas_limit(),
        gas_price,
        kind: tx.kind(),
        value: tx.value(),
        data: tx.input().clone(),
        nonce: tx.nonce(),
        chain_id: tx.chain_id(),
        access_list: tx.access_list().cloned().unwrap_or_default(),
        gas_priority_fee: tx.max_priority_fee_per_gas(),
        blob_hashes: tx
            .blob_versioned_hashes()
            .map(<[B256]>::to_vec)
            .unwrap_or_default(),
        max_fee_per_blob_gas: tx.max_fee_per_blob_gas().unwrap_or(0),
        authorization_list,
    }
}
