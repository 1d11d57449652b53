//! Credit-only recipients: a plain value transfer to a used externally owned account
//! credits it as a balance *delta* and does not read it, so the many transfers a block
//! sends to one wallet (an exchange's deposit address, say) do not depend on each other.
//!
//! A transaction's recipient `to` is credit-only when, in the state *before the block*,
//! `to` is an account with a nonce above zero and no code, `to` is neither the sender
//! nor the block's beneficiary, and no transaction of the block carries EIP-7702
//! authorizations. Then, throughout the block, `to` stays an existing account without
//! code: a contract can only be created at an address whose nonce is zero (EIP-684), an
//! account with a nonce is never empty (EIP-161 removal) and cannot self-destruct, and
//! without authorizations no delegation can be set on it. So the transaction executes no
//! code at `to`, and all it does to `to` is add the value to its balance, whatever that
//! balance is; nothing else in the transaction sees it (the sender is another account,
//! gas does not depend on the recipient's balance). Serving revm the pre-block account
//! and writing the difference as a [`BalanceDelta`] is therefore exact. (revm would
//! reject a credit that overflows 256 bits; no balance can come near that, since all the
//! ether in existence is below 2^90 wei.)

use alloy_primitives::{Address, TxKind};
use parex_core::{AccountValue, ReadView, StateKey, StateValue};
use revm::primitives::KECCAK_EMPTY;

use crate::block::EvmBlock;

/// Whether any transaction of `block` carries EIP-7702 authorizations (then no
/// recipient is credit-only: an authorization can give an account code mid-block).
pub fn has_authorizations(block: &EvmBlock) -> bool {
    block
        .txs
        .iter()
        .any(|tx| !tx.env.authorization_list.is_empty())
}

/// The recipient of `block.txs[tx]` and its pre-block account, if the recipient is
/// credit-only (see the module documentation; `authorizations` is
/// [`has_authorizations`] of the block). Reads the recipient's account from `pre_block`.
pub fn credit_only_recipient<R: ReadView<StateKey, StateValue> + ?Sized>(
    block: &EvmBlock,
    authorizations: bool,
    tx: usize,
    pre_block: &mut R,
) -> Option<(Address, AccountValue)> {
    if authorizations {
        return None;
    }
    let env = &block.txs.get(tx)?.env;
    let TxKind::Call(to) = env.kind else {
        return None;
    };
    if to == env.caller || to == block.env.beneficiary {
        return None;
    }
    let Ok(Some(StateValue::Account(account))) = pre_block.read(&StateKey::Account(to)) else {
        return None;
    };
    let info = account.info?;
    let no_code = info.code_hash == KECCAK_EMPTY || info.code_hash.is_zero();
    (no_code && info.nonce > 0).then_some((to, account))
}
