//! Declared access of an Ethereum transaction, for lock-based engines (`sealevel`).
//!
//! What a transaction *declares*, from its EIP-2930 access list and its shape, read
//! against the pre-block state (nothing that earlier transactions of the block change is
//! known here):
//!
//! * the sender's account: `Write` (nonce, fee), and its code if it has any (EIP-7702
//!   delegated senders);
//! * a call's recipient: `Delta` when it is credit-only (with the pre-block state known
//!   to the VM, [`crate::credit`]); otherwise `Write` when value moves, when it has no
//!   code (a plain transfer touches it) or when it sends to itself; `Read` for a
//!   zero-value call of a contract (loading it for its code does not change it); for a
//!   contract whose balance is kept apart ([`crate::apart`]), `Read`, and its balance
//!   `Write` when value moves. Its code
//!   (`Read`), and for an EIP-7702 delegation the delegate's account and code (`Read`);
//! * a creation's new address (from the sender and nonce): `Write`;
//! * every access-list address: `Read`, with its code; every access-list storage key:
//!   `Write` (the list does not say which slots are written; reading them is allowed
//!   too). A slot key names the account's storage generation *before the block*: if an
//!   earlier transaction re-creates the account, the declaration names the old
//!   generation, the real access is undeclared and the engine re-runs the transaction
//!   in order (exact, just slower);
//! * the block beneficiary: `Delta` (the fee credit, which commutes), or `Write` when
//!   the transaction also uses the beneficiary's account in another way (then its fee is
//!   part of a full account write).
//!
//! Anything else a transaction touches (the storage a contract uses without an access
//! list, other contracts it calls, EIP-7702 authorities, the code it deploys) is
//! undeclared: hints from a pre-execution cover those (`sealevel-preexec`).

use alloy_primitives::{Address, TxKind, U256};
use parex_core::{AccessKind, AccountValue, ReadView, StateKey, StateValue};
use revm::primitives::KECCAK_EMPTY;

use crate::block::EvmBlock;

/// The declared accesses of `block.txs[tx]` (see the module documentation).
pub fn declared_access<R: ReadView<StateKey, StateValue>>(
    block: &EvmBlock,
    tx: usize,
    credits: Option<&crate::credit::Credits>,
    pre_block: &mut R,
) -> Vec<(StateKey, AccessKind)> {
    let credit_only = credits
        .and_then(|c| c.recipient(block, tx, pre_block))
        .map(|(to, _)| to);
    let Some(tx) = block.txs.get(tx) else {
        return Vec::new();
    };
    let env = &tx.env;
    let mut out = Declarations {
        keys: Vec::with_capacity(8),
        pre_block,
    };
    out.account(env.caller, AccessKind::Write);
    match env.kind {
        TxKind::Call(to) if credit_only == Some(to) => {
            out.add(StateKey::Account(to), AccessKind::Delta)
        }
        TxKind::Call(to) => {
            let recipient = out.pre_account(to);
            let has_code = out.code_in(to, recipient);
            let moves_value = env.value != U256::ZERO;
            let kind = if recipient.balance_apart && to != env.caller {
                // A contract whose balance is kept apart ([`crate::apart`]): calling it
                // reads its account; value sent to it changes only its balance (a credit,
                // or a write if the contract looks at it).
                if moves_value {
                    out.add(StateKey::Balance(to), AccessKind::Write);
                }
                AccessKind::Read
            } else if moves_value || !has_code || to == env.caller {
                AccessKind::Write
            } else {
                AccessKind::Read
            };
            out.add(StateKey::Account(to), kind);
        }
        TxKind::Create => out.add(
            StateKey::Account(env.caller.create(env.nonce)),
            AccessKind::Write,
        ),
    }
    // Legacy transactions have no access list (revm ignores one if set).
    if env.tx_type != 0 {
        for item in env.access_list.iter() {
            out.account(item.address, AccessKind::Read);
            if !item.storage_keys.is_empty() {
                let generation = out.pre_account(item.address).storage_generation;
                for slot in &item.storage_keys {
                    out.add(
                        StateKey::Slot(item.address, generation, U256::from_be_bytes(slot.0)),
                        AccessKind::Write,
                    );
                }
            }
        }
    }
    let beneficiary = StateKey::Account(block.env.beneficiary);
    if out.keys.iter().any(|(k, _)| *k == beneficiary) {
        out.add(beneficiary, AccessKind::Write);
    } else {
        out.add(beneficiary, AccessKind::Delta);
    }
    out.keys
}

struct Declarations<'r, R> {
    keys: Vec<(StateKey, AccessKind)>,
    pre_block: &'r mut R,
}

impl<R: ReadView<StateKey, StateValue>> Declarations<'_, R> {
    /// Adds `key`, joining kinds if it is already declared.
    fn add(&mut self, key: StateKey, kind: AccessKind) {
        match self.keys.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) => *existing = existing.join(kind),
            None => self.keys.push((key, kind)),
        }
    }

    /// The pre-block account (default if absent or unreadable: a declaration is a hint).
    fn pre_account(&mut self, address: Address) -> AccountValue {
        match self.pre_block.read(&StateKey::Account(address)) {
            Ok(Some(StateValue::Account(v))) => v,
            _ => AccountValue::default(),
        }
    }

    /// Adds the account with `kind` and its code (and a delegate's) for reading.
    fn account(&mut self, address: Address, kind: AccessKind) {
        self.add(StateKey::Account(address), kind);
        self.code_of(address);
    }

    /// Declares the pre-block code of `address` (and, for an EIP-7702 delegation, the
    /// delegate's account and code) for reading. Returns whether it has code.
    fn code_of(&mut self, address: Address) -> bool {
        let account = self.pre_account(address);
        self.code_in(address, account)
    }

    /// [`Declarations::code_of`] with the pre-block `account` of `address` already read.
    fn code_in(&mut self, address: Address, account: AccountValue) -> bool {
        let Some(info) = account.info else {
            return false;
        };
        if info.code_hash == KECCAK_EMPTY || info.code_hash.is_zero() {
            return false;
        }
        let key = StateKey::Code(info.code_hash);
        let delegate = match self.pre_block.read(&key) {
            Ok(Some(StateValue::Code(code))) => code.eip7702_address(),
            _ => None,
        };
        self.add(key, AccessKind::Read);
        if let Some(delegate) = delegate
            && delegate != address
        {
            self.add(StateKey::Account(delegate), AccessKind::Read);
            // One level: revm does not follow a delegate's own delegation.
            if let Some(info) = self.pre_account(delegate).info
                && info.code_hash != KECCAK_EMPTY
                && !info.code_hash.is_zero()
            {
                self.add(StateKey::Code(info.code_hash), AccessKind::Read);
            }
        }
        true
    }
}
