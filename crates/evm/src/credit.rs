//! Credit-only recipients: a plain value transfer to a used externally owned account
//! credits it as a balance *delta* and does not read it, so the many transfers a block
//! sends to one wallet (an exchange's deposit address, say) do not depend on each other.
//!
//! A transaction's recipient `to` is credit-only when the transaction carries no calldata
//! (a plain transfer), in the state *before the block* `to` is an account with a nonce
//! above zero and no code, `to` is neither the sender nor the block's beneficiary, and no
//! transaction of the block carries EIP-7702 authorizations. Then, throughout the block,
//! `to` stays an existing account without code: a contract can only be created at an
//! address whose nonce is zero (EIP-684), an account with a nonce is never empty (EIP-161
//! removal) and cannot self-destruct, and without authorizations no delegation can be set
//! on it. So the transaction executes no code at `to`, and all it does to `to` is add the
//! value to its balance, whatever that balance is; nothing else in the transaction sees it
//! (the sender is another account, gas does not depend on the recipient's balance).
//! Serving revm the pre-block account and writing the difference as a
//! [`BalanceDelta`](parex_core::BalanceDelta) is therefore exact. (revm would reject a
//! credit that overflows 256 bits; no balance can come near that, since all the ether in
//! existence is below 2^90 wei.)
//!
//! Only recipients of two plain transfers or more in the block are looked up: credits
//! commute with each other, not with a read, so a single credit gains nothing, and each
//! lookup is a pre-block read (on a gigagas block of transfers to fresh accounts, that
//! would add a twentieth to every engine's time for nothing). The candidates are
//! counted from the block's transactions alone, when the VM is built.

use alloy_primitives::map::{AddressMap, AddressSet};
use alloy_primitives::{Address, TxKind};
use parex_core::{AccountValue, ReadView, StateKey, StateValue};
use revm::context::TxEnv;
use revm::primitives::KECCAK_EMPTY;

use crate::block::EvmBlock;

/// Which recipients of a block may be credit-only (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct Credits {
    /// Recipients of two plain transfers or more (none if the block carries EIP-7702
    /// authorizations: an authorization can give an account code mid-block).
    candidates: AddressSet,
    /// The candidates of the most transfers, at least `FREQUENT_CREDITS` each, most first
    /// (at most `MAX_FREQUENT`): the wallets an engine's workers would all credit.
    frequent: Vec<Address>,
}

/// Plain transfers to one recipient that make it a frequent one...
const FREQUENT_CREDITS: u32 = 16;
/// ...and how many of those are kept.
const MAX_FREQUENT: usize = 8;

impl Credits {
    /// Counts the candidates of `block`.
    pub fn new(block: &EvmBlock) -> Self {
        let mut candidates = AddressSet::default();
        if block
            .txs
            .iter()
            .any(|tx| !tx.env.authorization_list.is_empty())
        {
            return Self::default();
        }
        let mut transfers: AddressMap<u32> = AddressMap::default();
        for to in block
            .txs
            .iter()
            .filter_map(|tx| plain_transfer_recipient(&tx.env, block))
        {
            let count = transfers.entry(to).or_insert(0);
            *count += 1;
            if *count == 2 {
                candidates.insert(to);
            }
        }
        let mut frequent: Vec<(u32, Address)> = transfers
            .into_iter()
            .filter(|&(_, count)| count >= FREQUENT_CREDITS)
            .map(|(to, count)| (count, to))
            .collect();
        frequent.sort_unstable_by(|a, b| b.cmp(a));
        frequent.truncate(MAX_FREQUENT);
        Self {
            candidates,
            frequent: frequent.into_iter().map(|(_, to)| to).collect(),
        }
    }

    /// The recipients of the most plain transfers (at least 16 each, at most 8 of them,
    /// most first; whether they are credit-only is known only when one is read).
    pub fn frequent(&self) -> &[Address] {
        &self.frequent
    }

    /// The recipient of `block.txs[tx]` and its pre-block account, read from
    /// `pre_block`, if the recipient is credit-only.
    pub fn recipient<R: ReadView<StateKey, StateValue> + ?Sized>(
        &self,
        block: &EvmBlock,
        tx: usize,
        pre_block: &mut R,
    ) -> Option<(Address, AccountValue)> {
        let to = plain_transfer_recipient(&block.txs.get(tx)?.env, block)?;
        if !self.candidates.contains(&to) {
            return None;
        }
        let Ok(Some(StateValue::Account(account))) = pre_block.read(&StateKey::Account(to)) else {
            return None;
        };
        let info = account.info?;
        let no_code = info.code_hash == KECCAK_EMPTY || info.code_hash.is_zero();
        (no_code && info.nonce > 0).then_some((to, account))
    }
}

/// The recipient of a call without calldata that is neither its sender nor the block's
/// beneficiary.
fn plain_transfer_recipient(env: &TxEnv, block: &EvmBlock) -> Option<Address> {
    match env.kind {
        TxKind::Call(to)
            if env.data.is_empty() && to != env.caller && to != block.env.beneficiary =>
        {
            Some(to)
        }
        _ => None,
    }
}
