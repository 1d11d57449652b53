//! parex-evm: the revm-backed [`Vm`](parex_core::Vm).
//!
//! A transaction runs in revm against a [`parex_core::ReadView`] supplied by the engine
//! (through a `revm::Database` adapter), and its state changes come back as writes of
//! the account model ([`parex_core::StateKey`]). The beneficiary's fee is not credited
//! inside revm: a custom handler captures it, and it leaves as a balance *delta*, so
//! transactions do not depend on each other through the coinbase. Given the pre-block
//! state ([`EvmVm::with_pre_block`]), a plain transfer to a used externally owned
//! account credits it as a delta too ([`credit`]). A contract's balance can be kept apart
//! from its account ([`apart`]), so that calling a contract does not depend on every
//! earlier change of its balance.

pub mod apart;
pub mod block;
pub mod credit;
mod db;
pub mod declared;
mod handler;
pub mod receipts;
pub mod spec;
pub mod vm;

pub use apart::{merge_balances, split_contract_balances};
pub use block::{EvmBlock, EvmTx};
pub use receipts::{logs_bloom, receipts_root};
pub use spec::spec_for_block;
pub use vm::EvmVm;

/// The Ethereum mainnet chain id.
pub const MAINNET_CHAIN_ID: u64 = 1;
