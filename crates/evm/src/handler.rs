//! revm's mainnet handler, except that the beneficiary's fee is captured instead of
//! credited, so that the VM can emit it as a balance delta.

use std::cell::Cell;
use std::marker::PhantomData;

use alloy_primitives::U256;
use revm::context_interface::result::HaltReason;
use revm::context_interface::{Block, Cfg, ContextTr, JournalTr, Transaction};
use revm::handler::{EvmTr, EvmTrError, FrameResult, FrameTr, Handler};
use revm::interpreter::interpreter_action::FrameInit;
use revm::primitives::hardfork::SpecId;
use revm::state::EvmState;

pub struct FeeCapturingHandler<EVM, ERROR, FRAME> {
    /// The fee the beneficiary earns from the transaction (set in post-execution).
    pub fee: Cell<U256>,
    _marker: PhantomData<(EVM, ERROR, FRAME)>,
}

impl<EVM, ERROR, FRAME> Default for FeeCapturingHandler<EVM, ERROR, FRAME> {
    fn default() -> Self {
        Self {
            fee: Cell::new(U256::ZERO),
            _marker: PhantomData,
        }
    }
}

impl<EVM, ERROR, FRAME> Handler for FeeCapturingHandler<EVM, ERROR, FRAME>
where
    EVM: EvmTr<Context: ContextTr<Journal: JournalTr<State = EvmState>>, Frame = FRAME>,
    ERROR: EvmTrError<EVM>,
    FRAME: FrameTr<FrameResult = FrameResult, FrameInit = FrameInit>,
{
    type Evm = EVM;
    type Error = ERROR;
    type HaltReason = HaltReason;

    /// Same amount as revm's `reward_beneficiary`, recorded rather than credited.
    fn reward_beneficiary(
        &self,
        evm: &mut EVM,
        exec_result: &mut FrameResult,
    ) -> Result<(), ERROR> {
        let ctx = evm.ctx_ref();
        if ctx.cfg().is_fee_charge_disabled() {
            return Ok(());
        }
        let basefee = ctx.block().basefee() as u128;
        let price = ctx.tx().effective_gas_price(basefee);
        let coinbase_price = if ctx.cfg().spec().into().is_enabled_in(SpecId::LONDON) {
            price.saturating_sub(basefee)
        } else {
            price
        };
        let gas = exec_result.gas();
        let used = gas.used().saturating_sub(gas.reservoir());
        self.fee.set(U256::from(coinbase_price) * U256::from(used));
        Ok(())
    }
}
