//! Results of executing transactions and blocks.

use alloy_primitives::{B256, Log, keccak256};

use crate::state::{StateKey, StateValue};

/// How a transaction ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// Executed and succeeded (receipt status 1).
    Success,
    /// Executed, reverted by REVERT (receipt status 0; gas is charged).
    Revert,
    /// Executed, halted by an exceptional condition such as out-of-gas (status 0).
    Halt(String),
    /// Not executable at all (bad nonce, insufficient funds, gas limit above the
    /// block's...): it uses no gas and changes no state.
    Invalid(String),
}

impl TxStatus {
    pub fn is_success(&self) -> bool {
        matches!(self, TxStatus::Success)
    }
    pub fn is_invalid(&self) -> bool {
        matches!(self, TxStatus::Invalid(_))
    }
}

/// The outcome of one EVM transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    /// EIP-2718 transaction type (0 legacy, 1 access list, 2 dynamic fee, 3 blob, 4 set code).
    pub tx_type: u8,
    pub status: TxStatus,
    pub gas_used: u64,
    /// Gas used by this and all earlier transactions of the block (set by
    /// [`crate::Vm::finalize_outputs`]).
    pub cumulative_gas_used: u64,
    pub logs: Vec<Log>,
}

/// The outcome of a block: one output per transaction, in block order, and the final
/// value of every key that some transaction wrote, each key once, in no particular order
/// (ordering is canonicalization, not execution: equality and digests sort).
#[derive(Clone, Debug)]
pub struct BlockOutcome<O, K, V> {
    pub tx_outcomes: Vec<O>,
    pub state_diff: Vec<(K, V)>,
}

impl<O, K: Ord, V> BlockOutcome<O, K, V> {
    /// The state diff sorted by key.
    pub fn sorted_diff(&self) -> Vec<&(K, V)> {
        let mut diff: Vec<&(K, V)> = self.state_diff.iter().collect();
        diff.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        diff
    }
}

/// Equal outcomes: the same outputs in the same order, and the same final value for the
/// same set of keys (in whatever order the engines listed them).
impl<O: PartialEq, K: Ord, V: PartialEq> PartialEq for BlockOutcome<O, K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.tx_outcomes == other.tx_outcomes
            && self.state_diff.len() == other.state_diff.len()
            && self.sorted_diff() == other.sorted_diff()
    }
}

/// The block outcome of the EVM.
pub type EvmBlockOutcome = BlockOutcome<TxOutcome, StateKey, StateValue>;

impl EvmBlockOutcome {
    /// Total gas used by the block.
    pub fn gas_used(&self) -> u64 {
        self.tx_outcomes.last().map_or(0, |o| o.cumulative_gas_used)
    }
    /// Number of invalid transactions.
    pub fn invalid_count(&self) -> usize {
        self.tx_outcomes
            .iter()
            .filter(|o| o.status.is_invalid())
            .count()
    }
    /// keccak256 over a canonical encoding of the state diff sorted by key: equal digests
    /// mean equal final states, whichever engine or run produced them.
    pub fn state_diff_hash(&self) -> B256 {
        state_diff_hash(self.sorted_diff())
    }
}

/// See [`EvmBlockOutcome::state_diff_hash`]. `diff` must be sorted by key.
pub fn state_diff_hash<'a>(diff: impl IntoIterator<Item = &'a (StateKey, StateValue)>) -> B256 {
    let mut buf = Vec::new();
    for (key, value) in diff {
        match key {
            StateKey::Account(a) => {
                buf.push(0);
                buf.extend_from_slice(a.as_slice());
            }
            StateKey::Slot(a, generation, slot) => {
                buf.push(1);
                buf.extend_from_slice(a.as_slice());
                buf.extend_from_slice(&generation.to_be_bytes());
                buf.extend_from_slice(&slot.to_be_bytes::<32>());
            }
            StateKey::Code(h) => {
                buf.push(2);
                buf.extend_from_slice(h.as_slice());
            }
            StateKey::Balance(a) => {
                buf.push(3);
                buf.extend_from_slice(a.as_slice());
            }
        }
        match value {
            StateValue::Account(v) => {
                buf.extend_from_slice(&v.storage_generation.to_be_bytes());
                buf.push(u8::from(v.balance_apart));
                match &v.info {
                    None => buf.push(0),
                    Some(info) => {
                        buf.push(1);
                        buf.extend_from_slice(&info.balance.to_be_bytes::<32>());
                        buf.extend_from_slice(&info.nonce.to_be_bytes());
                        buf.extend_from_slice(info.code_hash.as_slice());
                    }
                }
            }
            StateValue::Slot(v) | StateValue::Balance(v) => {
                buf.extend_from_slice(&v.to_be_bytes::<32>())
            }
            StateValue::Code(code) => {
                let bytes = code.original_byte_slice();
                buf.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
                buf.extend_from_slice(bytes);
            }
        }
    }
    keccak256(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AccountInfo, AccountValue};
    use alloy_primitives::{Address, U256};

    #[test]
    fn digest_distinguishes_values_and_keys() {
        let a = Address::repeat_byte(1);
        let acct = |bal: u64| {
            StateValue::Account(AccountValue {
                info: Some(AccountInfo::with_balance(U256::from(bal), 0)),
                ..AccountValue::default()
            })
        };
        let d1 = vec![(StateKey::Account(a), acct(1))];
        let d2 = vec![(StateKey::Account(a), acct(2))];
        let d3 = vec![(
            StateKey::Slot(a, 0, U256::from(1)),
            StateValue::Slot(U256::from(1)),
        )];
        assert_ne!(state_diff_hash(&d1), state_diff_hash(&d2));
        assert_ne!(state_diff_hash(&d1), state_diff_hash(&d3));
        assert_eq!(state_diff_hash(&d1), state_diff_hash(&d1.clone()));
    }
}
