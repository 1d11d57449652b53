//! revm's `Database` over an engine's [`ReadView`]: every account, slot and code that
//! revm loads becomes a read of the account model, which the engine records.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;

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

impl From<DbError> for parex_core::VmError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Read(read) => parex_core::VmError::Read(read),
            other => parex_core::VmError::BadData(other.to_string()),
        }
    }
}

/// A copy of `code` with a reference count of its own, sharing its bytes.
///
/// revm clones an account's code (a reference count) each time it loads the account and
/// drops it after the transaction: with one shared count, every worker thread of a
/// block would bump the same cache line for every account touched (the empty code of
/// each externally owned account, the code of a popular contract), and the line would
/// bounce between cores. Each thread's EVM serves private copies instead.
fn private_copy(code: &Bytecode) -> Bytecode {
    let Some(jump_table) = code.legacy_jump_table() else {
        // Not analyzed legacy code (an EIP-7702 delegation): rare, shared as is.
        return code.clone();
    };
    // SAFETY: `new_analyzed` requires bytes padded so that execution never reads past
    // them, an original length within them and a jump table covering it. All three are
    // taken unchanged from `code`, which revm analyzed and padded itself (a legacy
    // analyzed bytecode holds exactly such parts); the copy differs only in owning
    // another reference count to them. Tested in `private_copies_equal_their_source`.
    unsafe { Bytecode::new_analyzed(code.bytecode().clone(), code.len(), jump_table.clone()) }
}

/// The engine's read view, with its lifetime erased (see [`ViewDb::attach`]).
type ErasedView = NonNull<dyn ReadView<StateKey, StateValue> + 'static>;

/// revm's database for one thread's reusable EVM: the read view of the transaction being
/// executed is attached for the duration of one execution.
pub struct ViewDb {
    view: Option<ErasedView>,
    block_hashes: Arc<HashMap<u64, B256>>,
    /// The account values served to revm in this execution, so that writes can be
    /// computed relative to them.
    accounts: AccountMemo,
    /// Code found so far in this block, by hash. Code is content-addressed — the bytes of
    /// a hash never change — so a hit needs no read through the view: the account read that
    /// named the hash is what the engine tracks and validates. Misses go through the view
    /// (code another transaction is still writing must be seen, and validated, there).
    codes: alloy_primitives::map::B256Map<Bytecode>,
    /// The code of every account without code ([`private_copy`] of revm's default).
    empty_code: Bytecode,
    /// The accounts served in this execution whose balance is kept apart
    /// ([`crate::apart`]), each with its real balance before the transaction once observed.
    apart: Vec<(Address, Option<U256>)>,
    /// Serve accounts loaded from now on with their real balance (BALANCE of one not yet
    /// loaded).
    observe_on_load: bool,
}

/// The accounts one execution has read: a short list (most transactions touch a handful),
/// indexed by a map once it grows.
#[derive(Default)]
struct AccountMemo {
    list: Vec<(Address, AccountValue)>,
    index: AddressMap<usize>,
}

impl AccountMemo {
    const INDEX_FROM: usize = 16;

    fn get(&self, address: &Address) -> Option<AccountValue> {
        if self.list.len() < Self::INDEX_FROM {
            self.list
                .iter()
                .find(|(a, _)| a == address)
                .map(|(_, v)| *v)
        } else {
            self.index.get(address).map(|&i| self.list[i].1)
        }
    }

    fn insert(&mut self, address: Address, value: AccountValue) {
        self.list.push((address, value));
        if self.list.len() == Self::INDEX_FROM {
            self.index
                .extend(self.list.iter().enumerate().map(|(i, (a, _))| (*a, i)));
        } else if self.list.len() > Self::INDEX_FROM {
            self.index.insert(address, self.list.len() - 1);
        }
    }

    fn clear(&mut self) {
        self.list.clear();
        self.index.clear();
    }
}

impl ViewDb {
    pub fn new(block_hashes: Arc<HashMap<u64, B256>>) -> Self {
        Self {
            view: None,
            block_hashes,
            accounts: AccountMemo::default(),
            codes: Default::default(),
            empty_code: private_copy(&Bytecode::default()),
            apart: Vec::new(),
            observe_on_load: false,
        }
    }

    /// Makes `view` the source of every read, until [`ViewDb::detach`].
    ///
    /// The view lives shorter than the reusable EVM holding this database, so its lifetime
    /// is erased here.
    ///
    /// # Safety
    /// The caller must call [`ViewDb::detach`] before the borrow of `view` ends, or else
    /// never use this database again (e.g. drop it while unwinding from a panic).
    pub unsafe fn attach<'v>(&mut self, view: &'v mut (dyn ReadView<StateKey, StateValue> + 'v)) {
        let ptr: NonNull<dyn ReadView<StateKey, StateValue> + 'v> = NonNull::from(view);
        // SAFETY: only the trait object's lifetime bound changes (identical layout); the
        // caller guarantees the pointer is not used after the borrow ends (see above).
        let erased: ErasedView = unsafe { std::mem::transmute(ptr) };
        self.view = Some(erased);
        self.accounts.clear();
        self.apart.clear();
        self.observe_on_load = false;
    }

    /// Serves `value` as the account of `address` in this execution, without a read
    /// through the view (a credit-only recipient, [`crate::credit`]).
    pub fn serve(&mut self, address: Address, value: AccountValue) {
        self.accounts.insert(address, value);
    }

    /// Forgets the attached view.
    pub fn detach(&mut self) {
        self.view = None;
    }

    fn view(&mut self) -> Result<&mut (dyn ReadView<StateKey, StateValue> + 'static), ReadError> {
        let mut ptr = self.view.ok_or(ReadError::Aborted)?;
        // SAFETY: `view` is `Some` only between `attach` and `detach`, while the view it
        // points to is exclusively borrowed by the caller of `attach` (its contract);
        // `&mut self` makes this the only reference derived from it at a time.
        Ok(unsafe { ptr.as_mut() })
    }

    /// The account value of `address` as this execution saw it (read on first use).
    pub fn account(&mut self, address: Address) -> Result<AccountValue, DbError> {
        if let Some(v) = self.accounts.get(&address) {
            return Ok(v);
        }
        let key = StateKey::Account(address);
        let value = match self.view()?.read(&key)? {
            None => AccountValue::default(),
            Some(StateValue::Account(v)) => v,
            Some(_) => return Err(DbError::WrongKind(key)),
        };
        self.accounts.insert(address, value);
        Ok(value)
    }

    /// If `address` was served with its balance apart and that balance has not been
    /// observed in this execution: reads it (a tracked read) and returns it.
    pub fn observe(&mut self, address: Address) -> Result<Option<U256>, DbError> {
        let Some(i) = self.apart.iter().position(|(a, _)| *a == address) else {
            return Ok(None);
        };
        if self.apart[i].1.is_some() {
            return Ok(None);
        }
        let balance = self.balance_apart(address)?;
        self.apart[i].1 = Some(balance);
        Ok(Some(balance))
    }

    /// Whether accounts loaded from now on are served with their real balance.
    pub fn observe_on_load(&mut self, on: bool) {
        self.observe_on_load = on;
    }

    /// The balance before the transaction of an account served with its balance apart,
    /// if this execution observed it.
    pub fn observed_balance(&self, address: Address) -> Option<U256> {
        self.apart
            .iter()
            .find(|(a, _)| *a == address)
            .and_then(|(_, observed)| *observed)
    }

    fn balance_apart(&mut self, address: Address) -> Result<U256, DbError> {
        let key = StateKey::Balance(address);
        match self.view()?.read(&key)? {
            None => Ok(U256::ZERO),
            Some(StateValue::Balance(v)) => Ok(v),
            Some(_) => Err(DbError::WrongKind(key)),
        }
    }

    fn code(&mut self, code_hash: B256) -> Result<Bytecode, DbError> {
        if code_hash == KECCAK_EMPTY || code_hash.is_zero() {
            return Ok(self.empty_code.clone());
        }
        if let Some(code) = self.codes.get(&code_hash) {
            return Ok(code.clone());
        }
        let key = StateKey::Code(code_hash);
        match self.view()?.read(&key)? {
            Some(StateValue::Code(code)) => {
                let code = private_copy(&code);
                self.codes.insert(code_hash, code.clone());
                Ok(code)
            }
            // Code that no one has: the account's code is unknown to the data set.
            None => Ok(self.empty_code.clone()),
            Some(_) => Err(DbError::WrongKind(key)),
        }
    }
}

impl Database for ViewDb {
    type Error = DbError;

    #[inline]
    fn basic(&mut self, address: Address) -> Result<Option<RevmAccountInfo>, DbError> {
        let account = self.account(address)?;
        let Some(mut info) = account.info else {
            return Ok(None);
        };
        if account.balance_apart {
            let observed = if self.observe_on_load {
                let balance = self.balance_apart(address)?;
                info.balance = balance;
                Some(balance)
            } else {
                None
            };
            self.apart.push((address, observed));
        }
        let code = self.code(info.code_hash)?;
        Ok(Some(RevmAccountInfo::new(
            info.balance,
            info.nonce,
            info.code_hash,
            code,
        )))
    }

    fn code_by_hash(&mut self, code_hash: B256) -> Result<Bytecode, DbError> {
        self.code(code_hash)
    }

    fn storage(&mut self, address: Address, index: U256) -> Result<U256, DbError> {
        let generation = self.account(address)?.storage_generation;
        let key = StateKey::Slot(address, generation, index);
        match self.view()?.read(&key)? {
            None => Ok(U256::ZERO),
            Some(StateValue::Slot(v)) => Ok(v),
            Some(_) => Err(DbError::WrongKind(key)),
        }
    }

    fn block_hash(&mut self, number: u64) -> Result<B256, DbError> {
        self.block_hashes
            .get(&number)
            .copied()
            .ok_or(DbError::MissingBlockHash(number))
    }
}

#[cfg(test)]
mod tests {
    use alloy_primitives::{Bytes, address};
    use revm::bytecode::Bytecode;

    use super::private_copy;

    #[test]
    fn private_copies_equal_their_source() {
        // PUSH1 4, JUMP, INVALID, JUMPDEST, STOP: one valid jump destination.
        let contract = Bytecode::new_raw(Bytes::from_static(&[0x60, 0x04, 0x56, 0xfe, 0x5b, 0x00]));
        for code in [
            Bytecode::default(),
            contract,
            Bytecode::new_eip7702(address!("0x00000000000000000000000000000000000000aa")),
        ] {
            let copy = private_copy(&code);
            assert_eq!(copy, code);
            assert_eq!(copy.kind(), code.kind());
            assert_eq!(copy.len(), code.len());
            assert_eq!(copy.bytecode(), code.bytecode());
            assert_eq!(copy.original_bytes(), code.original_bytes());
            assert_eq!(copy.hash_slow(), code.hash_slow());
            assert_eq!(copy.legacy_jump_table(), code.legacy_jump_table());
            if let (Some(a), Some(b)) = (copy.legacy_jump_table(), code.legacy_jump_table()) {
                // Its own analysis record (and so its own reference count).
                assert!(!std::ptr::eq(a, b));
                for pc in 0..code.len() {
                    assert_eq!(a.is_valid(pc), b.is_valid(pc), "jump destination {pc}");
                }
            }
        }
        assert!(!private_copy(&Bytecode::default()).is_default());
    }
}
