//! The Ethereum account model: state keys, values and balance deltas.
//!
//! Storage slots are keyed by `(address, generation, slot)`. An account's storage
//! generation starts at 0 (the pre-block storage) and goes up each time the account is
//! created or destroyed in the block; slots of a generation above 0 start out zero.
//! Wiping an account's storage is therefore one write to its account key, and a read
//! of any slot after the wipe is exact without enumerating the old slots.

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
}

/// Keys are hashed on every state access of every engine: feed the hasher one contiguous
/// buffer (one pass) instead of field by field. Equal keys give equal buffers.
impl std::hash::Hash for StateKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut buf = [0u8; 57];
        let len = match self {
            StateKey::Account(a) => {
                buf[..20].copy_from_slice(a.as_slice());
                20
            }
            StateKey::Slot(a, generation, slot) => {
                buf[..20].copy_from_slice(a.as_slice());
                buf[20..24].copy_from_slice(&generation.to_le_bytes());
                buf[24..56].copy_from_slice(&slot.to_le_bytes::<32>());
                56
            }
            StateKey::Code(h) => {
                buf[..32].copy_from_slice(h.as_slice());
                buf[32] = 0xc0;
                33
            }
        };
        state.write(&buf[..len]);
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
}

/// A value of the Ethereum state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateValue {
    Account(AccountValue),
    Slot(U256),
    /// Analyzed bytecode (cheap to clone: reference counted).
    Code(Bytecode),
}

impl StateValue {
    pub fn as_account(&self) -> Option<&AccountValue> {
        match self {
            StateValue::Account(a) => Some(a),
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
