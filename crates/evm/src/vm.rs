//! [`EvmVm`]: one Ethereum transaction in revm, as a [`Vm`].
//!
//! Each thread keeps one revm EVM per block (built on first use, like a plain
//! `transact_commit` loop would), so a transaction pays only for its own execution; the
//! engine's read view is attached to the EVM's database for the duration of one call.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy_primitives::{Address, U256};
use parex_core::{
    AccessKind, AccountInfo, AccountValue, BalanceDelta, Execution, ReadView, StateKey, StateValue,
    TxIndex, TxOutcome, TxStatus, Vm, VmError, Write,
};
use revm::context::{BlockEnv, CfgEnv, Context, Journal, TxEnv};
use revm::context_interface::JournalTr;
use revm::context_interface::result::{EVMError, ExecutionResult};
use revm::handler::{EthFrame, Handler, MainBuilder, MainnetEvm};
use revm::interpreter::interpreter::EthInterpreter;
use revm::primitives::hardfork::SpecId;
use revm::state::{Account, EvmState};

use crate::block::EvmBlock;
use crate::db::{DbError, ViewDb};
use crate::handler::FeeCapturingHandler;

type ReusableEvm = MainnetEvm<Context<BlockEnv, TxEnv, CfgEnv, ViewDb, Journal<ViewDb>, ()>>;
type Write_ = Write<StateValue, BalanceDelta>;
pub type EvmExecution = Execution<StateKey, StateValue, BalanceDelta, TxOutcome>;

thread_local! {
    /// This thread's EVM and the id of the [`EvmVm`] it was built for.
    static EVM: RefCell<Option<Box<(u64, ReusableEvm)>>> = const { RefCell::new(None) };
}

/// Distinguishes [`EvmVm`]s (and so blocks), so that a thread's EVM is never reused for
/// another block's environment.
static NEXT_VM_ID: AtomicU64 = AtomicU64::new(0);

/// Executes the transactions of one block with revm.
pub struct EvmVm<'b> {
    block: &'b EvmBlock,
    cfg: CfgEnv,
    id: u64,
}

impl<'b> EvmVm<'b> {
    pub fn new(block: &'b EvmBlock) -> Self {
        let mut cfg = CfgEnv::new_with_spec(block.spec);
        cfg.chain_id = block.chain_id;
        Self {
            block,
            cfg,
            id: NEXT_VM_ID.fetch_add(1, Ordering::Relaxed),
        }
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
        let mut ctx: Context<BlockEnv, TxEnv, CfgEnv, ViewDb, Journal<ViewDb>, ()> =
            Context::new(db, self.block.spec);
        ctx.cfg = self.cfg.clone();
        ctx.block = self.block.env.clone();
        ctx.build_mainnet()
    }

    /// Executes the transaction set in `evm`, whose database has the view attached.
    fn run(&self, tx: TxIndex, evm: &mut ReusableEvm) -> Result<EvmExecution, VmError> {
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
        let writes = self.writes_from_state(state, &mut evm.ctx.journaled_state.database, fee)?;
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
        evm.ctx.tx = self.block.txs[tx].env.clone();
        // SAFETY: detached below, before the borrow of `view` ends; a panic in between
        // drops `slot` (see above).
        unsafe { evm.ctx.journaled_state.database.attach(view) };
        let outcome = self.run(tx, evm);
        evm.ctx.journaled_state.database.detach();
        EVM.with(|cell| *cell.borrow_mut() = Some(slot));
        outcome
    }

    fn apply_delta(
        &self,
        _key: &StateKey,
        value: Option<StateValue>,
        delta: &BalanceDelta,
    ) -> Option<StateValue> {
        let current = value.and_then(|v| v.as_account().copied());
        Some(StateValue::Account(delta.apply(current)))
    }

    fn merge_deltas(&self, earlier: &mut BalanceDelta, later: &BalanceDelta) {
        earlier.merge(later);
    }

    /// See [`crate::declared`].
    fn declared_access<R: ReadView<StateKey, StateValue>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(StateKey, AccessKind)> {
        crate::declared::declared_access(self.block, tx, pre_block)
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
    /// changed, and adding the beneficiary's fee as a delta.
    fn writes_from_state(
        &self,
        state: EvmState,
        db: &mut ViewDb,
        fee: U256,
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
            if after != before {
                writes.push((
                    StateKey::Account(address),
                    Write::Put(StateValue::Account(after)),
                ));
            }
        }
        if !beneficiary_written {
            writes.push((StateKey::Account(beneficiary), Write::Delta(fee_delta)));
        }
        Ok(writes)
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
    }
}
