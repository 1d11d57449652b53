//! The Ethereum account model: state keys, values and balance deltas.
//!
//! Storage slots are keyed by `(address, generation, slot)`. An account's storage
//! generation starts at 0 (the pre-block storage) and goes up each time the account is
//! created or destroyed in the block; slots of a generation above 0 start out zero.
//! Wiping an account's storage is therefore one write to its account key, and a read
//! of any slot after the wipe is exact without enumerating the old slots.
//!
//! A contract's balance may be kept *apart* from its account, under its own key
//! [`StateKey::Balance`] ([`AccountValue::balance_apart`]; the account then holds a zero
//! balance): the many transactions that only call a contract, or only send it value,
//! then do not depend on each other through its balance. Whether an account's balance is
//! apart is fixed in the pre-block state (`parex_evm::split_contract_balances`) and
//! only ever ends with the account's destruction.

use alloy_primitives::{Address, B256, U256};
use revm::bytecode::Bytecode;

/// A key of the Ethereum state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    /// Balance, nonce, code hash and storage generation of an account.
    Account(Address),
    /// A storage slot of an account, in one storage generation.
    Slot(Address, u32, U256),
    /// Contract code by its keccak hash (immutable once written).
    Code(B256),
    /// The balance of an account whose balance is kept apart
    /// ([`AccountValue::balance_apart`]); absent means zero.
    Balance(Address),
}

/// Keys are hashed on every state access of every engine: feed the hasher whole words
/// (one multiply each in the usual hashers) rather than a byte buffer. Equal keys feed
/// equal words; the variants feed different word counts and tags.
impl std::hash::Hash for StateKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        #[inline(always)]
        fn address<H: std::hash::Hasher>(a: &Address, tag: u32, state: &mut H) {
            let bytes: &[u8; 20] = a.as_ref();
            let (head, tail) = bytes.split_at(16);
            state.write_u128(u128::from_le_bytes(head.try_into().expect("16 bytes")));
            let tail = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
            state.write_u64(u64::from(tail) | (u64::from(tag) << 32));
        }
        #[inline(always)]
        fn word<H: std::hash::Hasher>(limbs: &[u64; 4], state: &mut H) {
            state.write_u128(u128::from(limbs[0]) | (u128::from(limbs[1]) << 64));
            state.write_u128(u128::from(limbs[2]) | (u128::from(limbs[3]) << 64));
        }
        match self {
            StateKey::Account(a) => address(a, 0, state),
            StateKey::Slot(a, generation, slot) => {
                // Generations are small: the tag keeps them apart from `Account`'s 0.
                address(a, generation.wrapping_add(1), state);
                word(slot.as_limbs(), state);
            }
            // Tag `u32::MAX`: no generation reaches it, so no `Slot` feeds the same words.
            StateKey::Balance(a) => address(a, u32::MAX, state),
            StateKey::Code(h) => {
                let limbs = std::array::from_fn(|i| {
                    u64::from_le_bytes(h.0[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                });
                word(&limbs, state);
            }
        }
    }
}

/// Balance, nonce and code hash of an existing account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AccountInfo {
    pub balance: U256,
    pub nonce: u64,
    pub code_hash: B256,
}

impl AccountInfo {
    /// An account with no code.
    pub fn with_balance(balance: U256, nonce: u64) -> Self {
        Self {
            balance,
            nonce,
            code_hash: revm::primitives::KECCAK_EMPTY,
        }
    }
    /// EIP-161 emptiness: no code, zero nonce, zero balance.
    pub fn is_empty(&self) -> bool {
        self.balance.is_zero()
            && self.nonce == 0
            && (self.code_hash == revm::primitives::KECCAK_EMPTY || self.code_hash.is_zero())
    }
}

/// The value of an account key: the account if it exists, and its storage generation
/// (which survives the account's destruction, so that its old slots stay invisible).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AccountValue {
    pub info: Option<AccountInfo>,
    pub storage_generation: u32,
    /// The balance is kept under [`StateKey::Balance`]; `info`'s balance is zero.
    pub balance_apart: bool,
}

/// A value of the Ethereum state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateValue {
    Account(AccountValue),
    Slot(U256),
    /// Analyzed bytecode (cheap to clone: reference counted).
    Code(Bytecode),
    /// A balance kept apart from its account.
    Balance(U256),
}

impl StateValue {
    pub fn as_account(&self) -> Option<&AccountValue> {
        match self {
            StateValue::Account(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_balance(&self) -> Option<U256> {
        match self {
            StateValue::Balance(v) => Some(*v),
            _ => None,
        }
    }
    pub fn as_slot(&self) -> Option<U256> {
        match self {
            StateValue::Slot(v) => Some(*v),
            _ => None,
        }
    }
}

/// A commutative credit to an account's balance (the block beneficiary's fee, a value
/// transfer's recipient). It is also a *touch* of the account: `create_if_absent` selects
/// the rules before Spurious Dragon (a touch creates a missing account, even with a zero
/// credit) or after it (EIP-161: an account a touch leaves empty does not exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceDelta {
    pub credit: U256,
    pub create_if_absent: bool,
}

impl BalanceDelta {
    /// Applies the credit (and touch) to an account value.
    pub fn apply(&self, value: Option<AccountValue>) -> AccountValue {
        let mut value = value.unwrap_or_default();
        match &mut value.info {
            Some(info) => info.balance = info.balance.saturating_add(self.credit),
            None => value.info = Some(AccountInfo::with_balance(self.credit, 0)),
        }
        if !self.create_if_absent && value.info.is_some_and(|info| info.is_empty()) {
            value.info = None;
        }
        value
    }
    /// Applies the credit to a balance kept apart (an absent one is zero).
    pub fn apply_to_balance(&self, value: Option<U256>) -> U256 {
        value.unwrap_or_default().saturating_add(self.credit)
    }
    /// Folds a later credit into this one.
    pub fn merge(&mut self, later: &BalanceDelta) {
        self.credit = self.credit.saturating_add(later.credit);
        self.create_if_absent |= later.create_if_absent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_credit_existing_and_create_when_asked() {
        let d = BalanceDelta {
            credit: U256::from(5),
            create_if_absent: false,
        };
        let existing = AccountValue {
            info: Some(AccountInfo::with_balance(U256::from(1), 3)),
            storage_generation: 2,
            ..AccountValue::default()
        };
        let after = d.apply(Some(existing));
        assert_eq!(after.info.unwrap().balance, U256::from(6));
        assert_eq!(after.info.unwrap().nonce, 3);
        assert_eq!(after.storage_generation, 2);
        assert_eq!(d.apply(None).info.unwrap().balance, U256::from(5));
        let zero = BalanceDelta {
            credit: U256::ZERO,
            create_if_absent: false,
        };
        assert_eq!(zero.apply(None).info, None);
        let touch = BalanceDelta {
            credit: U256::ZERO,
            create_if_absent: true,
        };
        assert!(touch.apply(None).info.unwrap().is_empty());
        let mut m = d;
        m.merge(&touch);
        assert_eq!(
            m,
            BalanceDelta {
                credit: U256::from(5),
                create_if_absent: true
            }
        );
    }
}
