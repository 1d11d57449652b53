//! [`EvmVm`]: one Ethereum transaction in revm, as a [`Vm`].
//!
//! Each thread keeps one revm EVM per block (built on first use, like a plain
//! `transact_commit` loop would), so a transaction pays only for its own execution; the
//! engine's read view is attached to the EVM's database for the duration of one call.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy_primitives::{Address, U256};
use parex_core::{
    AccessKind, AccountInfo, AccountValue, BalanceDelta, Execution, PreBlockView, ReadView,
    StateKey, StateValue, Storage, TxIndex, TxOutcome, TxStatus, Vm, VmError, Write,
};
use revm::context::{CfgEnv, Context};
use revm::context_interface::JournalTr;
use revm::context_interface::result::{EVMError, ExecutionResult};
use revm::handler::{EthFrame, Handler, MainBuilder, MainnetEvm};
use revm::interpreter::interpreter::EthInterpreter;
use revm::primitives::hardfork::SpecId;
use revm::state::{Account, EvmState};

use crate::apart::EvmContext;
use crate::block::EvmBlock;
use crate::credit::Credits;
use crate::db::{DbError, ViewDb};
use crate::handler::FeeCapturingHandler;

type ReusableEvm = MainnetEvm<EvmContext>;
type Write_ = Write<StateValue, BalanceDelta>;
pub type EvmExecution = Execution<StateKey, StateValue, BalanceDelta, TxOutcome>;

thread_local! {
    /// This thread's EVM and the id of the [`EvmVm`] it was built for.
    static EVM: RefCell<Option<Box<(u64, ReusableEvm)>>> = const { RefCell::new(None) };
}

/// Distinguishes [`EvmVm`]s (and so blocks), so that a thread's EVM is never reused for
/// another block's environment.
static NEXT_VM_ID: AtomicU64 = AtomicU64::new(0);

/// The pre-block state, as the VM may read it directly (for [`crate::credit`]).
pub type PreBlockState<'b> = &'b dyn Storage<Key = StateKey, Value = StateValue>;

/// Gas limit that counts as one light transaction in [`Vm::light_tx_equivalents`]: about
/// three plain transfers' 21000 (limits run two to three times the gas used; on mainnet
/// block 116525, 83 transfers with 90000-gas limits take 0.3 ms and do not repay a
/// second worker, while blocks of 20 to 120 transactions with limits of 130k to 440k
/// each, 1 to 15 ms, ran 1.3 to 1.7x faster on two).
const LIGHT_TX_GAS: u64 = 60_000;

/// Executes the transactions of one block with revm.
pub struct EvmVm<'b> {
    block: &'b EvmBlock,
    cfg: CfgEnv,
    id: u64,
    /// Where credit-only recipients are looked up, and which may be
    /// ([`EvmVm::with_pre_block`]).
    credits: Option<(PreBlockState<'b>, Credits)>,
}

impl<'b> EvmVm<'b> {
    /// A VM for `block` in which every state access goes through the engine's view.
    pub fn new(block: &'b EvmBlock) -> Self {
        let mut cfg = CfgEnv::new_with_spec(block.spec);
        cfg.chain_id = block.chain_id;
        Self {
            block,
            cfg,
            id: NEXT_VM_ID.fetch_add(1, Ordering::Relaxed),
            credits: None,
        }
    }

    /// A VM for `block` that also knows the state before it, `pre_block` (the storage
    /// the engines run on): plain transfers to used externally owned accounts then
    /// credit them as deltas instead of reading them ([`crate::credit`]). Outcomes are
    /// the same as with [`EvmVm::new`]; fewer transactions depend on each other.
    pub fn with_pre_block(block: &'b EvmBlock, pre_block: PreBlockState<'b>) -> Self {
        Self {
            credits: Some((pre_block, Credits::new(block))),
            ..Self::new(block)
        }
    }

    /// The recipient of `tx` and its pre-block account, if it is credit-only.
    fn credit_only_recipient(&self, tx: TxIndex) -> Option<(Address, AccountValue)> {
        let (storage, credits) = self.credits.as_ref()?;
        credits.recipient(self.block, tx, &mut PreBlockView(*storage))
    }

    pub fn block(&self) -> &EvmBlock {
        self.block
    }

    /// Whether a zero-value touch creates an account (before Spurious Dragon, EIP-161).
    fn touch_creates(&self) -> bool {
        !self.block.spec.is_enabled_in(SpecId::SPURIOUS_DRAGON)
    }

    fn new_evm(&self) -> ReusableEvm {
        let db = ViewDb::new(self.block.block_hashes.clone());
        let mut ctx: EvmContext = Context::new(db, self.block.spec);
        ctx.cfg = self.cfg.clone();
        ctx.block = self.block.env.clone();
        let mut evm = ctx.build_mainnet();
        crate::apart::install(&mut evm);
        evm
    }

    /// Executes the transaction set in `evm`, whose database has the view attached
    /// (and serves `credited`, a credit-only recipient, without reading it).
    fn run(
        &self,
        tx: TxIndex,
        evm: &mut ReusableEvm,
        credited: Option<Address>,
    ) -> Result<EvmExecution, VmError> {
        let tx_type = evm.ctx.tx.tx_type;
        let mut handler =
            FeeCapturingHandler::<_, EVMError<DbError>, EthFrame<EthInterpreter>>::default();
        let result = handler.run(evm).map(|r| (r, handler.fee.get()));
        let (result, fee) = match result {
            Ok(ok) => ok,
            Err(EVMError::Transaction(invalid)) => {
                // Drop what the rejected transaction loaded: the EVM is reused.
                let _ = evm.ctx.journaled_state.finalize();
                return Ok(Execution {
                    writes: Vec::new(),
                    output: TxOutcome {
                        tx_type,
                        status: TxStatus::Invalid(invalid.to_string()),
                        gas_used: 0,
                        cumulative_gas_used: 0,
                        logs: Vec::new(),
                    },
                });
            }
            Err(e) => {
                let _ = evm.ctx.journaled_state.finalize();
                return Err(match e {
                    EVMError::Database(e) => e.into(),
                    EVMError::Header(e) => VmError::BadData(e.to_string()),
                    e => VmError::Internal {
                        tx,
                        message: e.to_string(),
                    },
                });
            }
        };
        let state = evm.ctx.journaled_state.finalize();
        let writes = self.writes_from_state(
            tx,
            state,
            &mut evm.ctx.journaled_state.database,
            fee,
            credited,
        )?;
        let (status, gas_used, logs) = match result {
            ExecutionResult::Success { gas, logs, .. } => {
                (TxStatus::Success, gas.tx_gas_used(), logs)
            }
            ExecutionResult::Revert { gas, logs, .. } => {
                (TxStatus::Revert, gas.tx_gas_used(), logs)
            }
            ExecutionResult::Halt { reason, gas, logs } => (
                TxStatus::Halt(format!("{reason:?}")),
                gas.tx_gas_used(),
                logs,
            ),
        };
        Ok(Execution {
            writes,
            output: TxOutcome {
                tx_type,
                status,
                gas_used,
                cumulative_gas_used: 0,
                logs,
            },
        })
    }
}

impl Vm for EvmVm<'_> {
    type Key = StateKey;
    type Value = StateValue;
    type Delta = BalanceDelta;
    type Output = TxOutcome;

    fn tx_count(&self) -> usize {
        self.block.txs.len()
    }

    fn execute<R: ReadView<StateKey, StateValue>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<EvmExecution, VmError> {
        // Take this thread's EVM out for the call (a boxed move): if the call panics it
        // is dropped while unwinding, with the view still attached, and never reused.
        let mut slot = EVM
            .with(|slot| slot.borrow_mut().take())
            .filter(|slot| slot.0 == self.id)
            .unwrap_or_else(|| Box::new((self.id, self.new_evm())));
        let evm = &mut slot.1;
        evm.ctx.tx = Arc::clone(&self.block.txs[tx].env);
        // SAFETY: detached below, before the borrow of `view` ends; a panic in between
        // drops `slot` (see above).
        unsafe { evm.ctx.journaled_state.database.attach(view) };
        let credited = self.credit_only_recipient(tx).map(|(to, account)| {
            evm.ctx.journaled_state.database.serve(to, account);
            to
        });
        let outcome = self.run(tx, evm, credited);
        evm.ctx.journaled_state.database.detach();
        EVM.with(|cell| *cell.borrow_mut() = Some(slot));
        outcome
    }

    fn apply_delta(
        &self,
        key: &StateKey,
        value: Option<StateValue>,
        delta: &BalanceDelta,
    ) -> Option<StateValue> {
        if let StateKey::Balance(_) = key {
            let current = value.and_then(|v| v.as_balance());
            return Some(StateValue::Balance(delta.apply_to_balance(current)));
        }
        let current = value.and_then(|v| v.as_account().copied());
        Some(StateValue::Account(delta.apply(current)))
    }

    fn merge_deltas(&self, earlier: &mut BalanceDelta, later: &BalanceDelta) {
        earlier.merge(later);
    }

    /// A transaction weighs its gas limit over `LIGHT_TX_GAS`, at least one.
    fn light_tx_equivalents_of(&self, tx: TxIndex) -> usize {
        self.block
            .txs
            .get(tx)
            .map_or(1, |t| (t.env.gas_limit / LIGHT_TX_GAS).max(1) as usize)
    }

    /// The beneficiary's account (every transaction credits it its fee, as a delta), then
    /// the recipients of the most plain transfers (credited as deltas when credit-only).
    fn delta_sinks(&self) -> Vec<StateKey> {
        let frequent = self.credits.as_ref().map_or(&[][..], |(_, c)| c.frequent());
        std::iter::once(self.block.env.beneficiary)
            .chain(frequent.iter().copied())
            .map(StateKey::Account)
            .collect()
    }

    /// The sender's account (its nonce orders its transactions).
    fn sequence_key(&self, tx: TxIndex) -> Option<StateKey> {
        self.block
            .txs
            .get(tx)
            .map(|t| StateKey::Account(t.env.caller))
    }

    /// The sender's account with the transaction's nonce (an absent account stays absent:
    /// an account funded earlier in the block cannot be guessed).
    fn in_sequence(&self, tx: TxIndex, value: Option<StateValue>) -> Option<StateValue> {
        match (value, self.block.txs.get(tx)) {
            (Some(StateValue::Account(mut account)), Some(t)) => {
                if let Some(info) = &mut account.info {
                    info.nonce = t.env.nonce;
                }
                Some(StateValue::Account(account))
            }
            (value, _) => value,
        }
    }

    /// See [`crate::declared`].
    fn declared_access<R: ReadView<StateKey, StateValue>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(StateKey, AccessKind)> {
        let credits = self.credits.as_ref().map(|(_, c)| c);
        crate::declared::declared_access(self.block, tx, credits, pre_block)
    }

    fn finalize_outputs(&self, outputs: &mut [TxOutcome]) -> Result<(), VmError> {
        let mut cumulative = 0u64;
        for (i, out) in outputs.iter_mut().enumerate() {
            cumulative += out.gas_used;
            out.cumulative_gas_used = cumulative;
            if cumulative > self.block.env.gas_limit {
                return Err(VmError::BadData(format!(
                    "transaction {i} brings the block's gas to {cumulative}, above its limit {}",
                    self.block.env.gas_limit
                )));
            }
        }
        Ok(())
    }
}

impl EvmVm<'_> {
    /// Turns revm's state changes into writes of the account model, mirroring how revm's
    /// own caches commit them (selfdestruct, creation, EIP-161 removal), writing only what
    /// changed, and adding the beneficiary's fee (and a credit-only recipient's value,
    /// `credited`) as a delta.
    fn writes_from_state(
        &self,
        tx: TxIndex,
        state: EvmState,
        db: &mut ViewDb,
        fee: U256,
        credited: Option<Address>,
    ) -> Result<Vec<(StateKey, Write_)>, VmError> {
        let mut writes = Vec::with_capacity(state.len() * 2);
        let beneficiary = self.block.env.beneficiary;
        let mut beneficiary_written = false;
        let fee_delta = BalanceDelta {
            credit: fee,
            create_if_absent: self.touch_creates(),
        };
        for (address, account) in state {
            if !account.is_touched() {
                continue;
            }
            let before = db.account(address)?;
            let mut after = account_after(&account, before, &mut writes, address);
            if address == beneficiary {
                beneficiary_written = true;
                after = fee_delta.apply(Some(after));
            }
            if before.balance_apart {
                let observed = db.observed_balance(address);
                apart_writes(tx, address, before, after, observed, &mut writes)?;
                continue;
            }
            if after == before {
                continue;
            }
            let write = if credited == Some(address) {
                Write::Delta(credit_of(tx, before, after, self.touch_creates())?)
            } else {
                Write::Put(StateValue::Account(after))
            };
            writes.push((StateKey::Account(address), write));
        }
        if !beneficiary_written {
            writes.push((StateKey::Account(beneficiary), Write::Delta(fee_delta)));
        }
        Ok(writes)
    }
}

/// The writes of an account whose balance is kept apart ([`crate::apart`]): served as
/// `before` (zero balance), left as `after` (revm's balance: the credits, plus the real
/// balance if it was `observed`, which then holds the balance before the transaction).
fn apart_writes(
    tx: TxIndex,
    address: Address,
    before: AccountValue,
    after: AccountValue,
    observed: Option<U256>,
    writes: &mut Vec<(StateKey, Write_)>,
) -> Result<(), VmError> {
    let balance = after.info.map_or(U256::ZERO, |info| info.balance);
    let key = StateKey::Balance(address);
    match observed {
        Some(earlier) if balance != earlier => {
            writes.push((key, Write::Put(StateValue::Balance(balance))));
        }
        Some(_) => {}
        // Destruction observes the balance (SELFDESTRUCT is wrapped): never here.
        None if after.info.is_none() => {
            return Err(VmError::Internal {
                tx,
                message: format!("{address} was destroyed without its balance observed"),
            });
        }
        None if balance.is_zero() => {}
        // Only credits happen to a balance no instruction observed.
        None => writes.push((
            key,
            Write::Delta(BalanceDelta {
                credit: balance,
                create_if_absent: false,
            }),
        )),
    }
    let mut account = after;
    match &mut account.info {
        Some(info) => {
            info.balance = U256::ZERO;
            account.balance_apart = true;
        }
        // Destroyed: the split ends (the `Balance` key is zero, written above).
        None => account.balance_apart = false,
    }
    if account != before {
        writes.push((
            StateKey::Account(address),
            Write::Put(StateValue::Account(account)),
        ));
    }
    Ok(())
}

/// What a transaction did to a credit-only recipient (served its pre-block account,
/// `before`), as a credit: only its balance can have grown ([`crate::credit`]).
fn credit_of(
    tx: TxIndex,
    before: AccountValue,
    after: AccountValue,
    create_if_absent: bool,
) -> Result<BalanceDelta, VmError> {
    match (before.info, after.info) {
        (Some(b), Some(a))
            if a.nonce == b.nonce
                && a.code_hash == b.code_hash
                && a.balance >= b.balance
                && after.storage_generation == before.storage_generation =>
        {
            Ok(BalanceDelta {
                credit: a.balance - b.balance,
                create_if_absent,
            })
        }
        _ => Err(VmError::Internal {
            tx,
            message: format!(
                "a credit-only recipient changed beyond its balance: {before:?} -> {after:?}"
            ),
        }),
    }
}

/// The account value after a transaction, pushing its slot and code writes.
fn account_after(
    account: &Account,
    before: AccountValue,
    writes: &mut Vec<(StateKey, Write_)>,
    address: Address,
) -> AccountValue {
    if account.is_selfdestructed() {
        return AccountValue {
            info: None,
            storage_generation: before.storage_generation + 1,
            balance_apart: false,
        };
    }
    let created = account.is_created();
    let generation = if created {
        before.storage_generation + 1
    } else {
        before.storage_generation
    };
    let info = &account.info;
    if created
        && let Some(code) = &info.code
        && !code.is_empty()
    {
        writes.push((
            StateKey::Code(info.code_hash),
            Write::Put(StateValue::Code(code.clone())),
        ));
    }
    for (slot, value) in &account.storage {
        let present = value.present_value();
        let changed = if created {
            !present.is_zero()
        } else {
            value.is_changed()
        };
        if changed {
            writes.push((
                StateKey::Slot(address, generation, *slot),
                Write::Put(StateValue::Slot(present)),
            ));
        }
    }
    let info = AccountInfo {
        balance: info.balance,
        nonce: info.nonce,
        code_hash: info.code_hash,
    };
    let exists = created || !info.is_empty();
    AccountValue {
        info: exists.then_some(info),
        storage_generation: generation,
        balance_apart: false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use parex_core::Vm;
    use revm::context::{BlockEnv, TxEnv};
    use revm::primitives::hardfork::SpecId;

    use super::{EvmVm, LIGHT_TX_GAS};
    use crate::block::{EvmBlock, EvmTx};

    #[test]
    fn heavy_transactions_weigh_their_gas_limit() {
        let tx = |gas_limit| {
            EvmTx::from(TxEnv {
                gas_limit,
                ..TxEnv::default()
            })
        };
        let block = EvmBlock {
            number: 1,
            spec: SpecId::CANCUN,
            chain_id: 1,
            env: BlockEnv::default(),
            // A transfer and a generous limit count once each; 5 and 16 light ones.
            txs: vec![
                tx(21_000),
                tx(LIGHT_TX_GAS + 1),
                tx(5 * LIGHT_TX_GAS),
                tx(16 * LIGHT_TX_GAS + 7),
            ],
            block_hashes: Arc::new(HashMap::new()),
        };
        assert_eq!(EvmVm::new(&block).light_tx_equivalents(), 1 + 1 + 5 + 16);
    }

    #[test]
    fn in_sequence_gives_the_sender_the_transaction_nonce_and_nothing_else() {
        use parex_core::{AccountInfo, AccountValue, StateValue};
        use revm::primitives::U256;
        let block = EvmBlock {
            number: 1,
            spec: SpecId::CANCUN,
            chain_id: 1,
            env: BlockEnv::default(),
            txs: vec![EvmTx::from(TxEnv {
                nonce: 7,
                ..TxEnv::default()
            })],
            block_hashes: Arc::new(HashMap::new()),
        };
        let vm = EvmVm::new(&block);
        let account = |nonce| {
            StateValue::Account(AccountValue {
                info: Some(AccountInfo::with_balance(U256::from(5), nonce)),
                storage_generation: 2,
                ..AccountValue::default()
            })
        };
        assert_eq!(vm.in_sequence(0, Some(account(3))), Some(account(7)));
        assert_eq!(vm.in_sequence(0, None), None);
        let destroyed = StateValue::Account(AccountValue {
            info: None,
            storage_generation: 1,
            ..AccountValue::default()
        });
        assert_eq!(vm.in_sequence(0, Some(destroyed.clone())), Some(destroyed));
    }
}
