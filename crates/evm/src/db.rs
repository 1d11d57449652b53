//! revm's `Database` over an engine's [`ReadView`]: every account, slot and code that
//! revm loads becomes a read of the account model, which the engine records.

use std::collections::HashMap;

use alloy_primitives::map::AddressMap;
use alloy_primitives::{Address, B256, U256};
use parex_core::{AccountValue, ReadError, ReadView, StateKey, StateValue};
use revm::bytecode::Bytecode;
use revm::database_interface::{DBErrorMarker, Database};
use revm::primitives::KECCAK_EMPTY;
use revm::state::AccountInfo as RevmAccountInfo;

/// Why the adapter could not answer revm.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the data set has no hash for block {0} (needed by BLOCKHASH)")]
    MissingBlockHash(u64),
    #[error("state value of the wrong kind under key {0:?}")]
    WrongKind(StateKey),
}

impl DBErrorMarker for DbError {}

pub struct ViewDb<'a, R> {
    view: &'a mut R,
    block_hashes: &'a HashMap<u64, B256>,
    /// The account values served to revm, so that writes can be computed relative to them.
    pub(crate) accounts: AddressMap<AccountValue>,
}

impl<'a, R: ReadView<StateKey, StateValue>> ViewDb<'a, R> {
    pub fn new(view: &'a mut R, block_hashes: &'a HashMap<u64, B256>) -> Self {
        Self { view, block_hashes, accounts: AddressMap::default() }
    }

    /// The account value of `address` as this execution saw it (read on first use).
    pub fn account(&mut self, address: Address) -> Result<AccountValue, DbError> {
        if let Some(v) = self.accounts.get(&address) {
            return Ok(*v);
        }
        let key = StateKey::Account(address);
        let value = match self.view.read(&key)? {
            None => AccountValue::default(),
            Some(StateValue::Account(v)) => v,
            Some(_) => return Err(DbError::WrongKind(key)),
        };
        self.accounts.insert(address, value);
        Ok(value)
    }

    fn code(&mut self, code_hash: B256) -> Result<Bytecode, DbError> {
        if code_hash == KECCAK_EMPTY || code_hash.is_zero() {
            return Ok(Bytecode::default());
        }
        let key = StateKey::Code(code_hash);
        match self.view.read(&key)? {
            Some(StateValue::Code(code)) => Ok(code),
            // Code that no one has: the account's code is unknown to the data set.
            None => Ok(Bytecode::default()),
            Some(_) => Err(DbError::WrongKind(key)),
        }
    }
}

impl<R: ReadView<StateKey, StateValue>> Database for ViewDb<'_, R> {
    type Error = DbError;

    fn basic(&mut self, address: Address) -> Result<Option<RevmAccountInfo>, DbError> {
        let Some(info) = self.account(address)?.info else {
            return Ok(None);
        };
        let code = self.code(info.code_hash)?;
        Ok(Some(RevmAccountInfo::new(info.balance, info.nonce, info.code_hash, code)))
    }

    fn code_by_hash(&mut self, code_hash: B256) -> Result<Bytecode, DbError> {
        self.code(code_hash)
    }

    fn storage(&mut self, address: Address, index: U256) -> Result<U256, DbError> {
        let generation = self.account(address)?.storage_generation;
        let key = StateKey::Slot(address, generation, index);
        match self.view.read(&key)? {
            None => Ok(U256::ZERO),
            Some(StateValue::Slot(v)) => Ok(v),
            Some(_) => Err(DbError::WrongKind(key)),
        }
    }

    fn block_hash(&mut self, number: u64) -> Result<B256, DbError> {
        self.block_hashes.get(&number).copied().ok_or(DbError::MissingBlockHash(number))
    }
}
