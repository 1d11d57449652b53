//! Contract balances kept apart from their accounts ([`StateKey::Balance`]).
//!
//! Calling a contract reads its account (its code hash, nonce and storage generation), and
//! so, in the plain account model, its balance: every transaction that calls WETH would
//! depend on every earlier deposit or withdrawal. Here a contract's balance lives under a
//! key of its own, so that a transaction depends on it only when it observes it.
//!
//! * The split is made in the pre-block state ([`split_contract_balances`]): an account
//!   with contract code (not an EIP-7702 delegation) that is not the block's beneficiary
//!   gets `balance_apart`, a zero balance, and its balance under `Balance(X)`. A
//!   contract is never empty (EIP-161 rules never look at its balance) and only its own
//!   SELFDESTRUCT (before Cancun) removes its code, so the split holds until then; the
//!   destruction ends it (the account is written whole again, `Balance(X)` zero).
//! * revm is served such an account with a zero balance. What can happen to the balance
//!   without being observed is a credit (value sent to it). The instructions that observe
//!   a balance — BALANCE of it, SELFBALANCE in it, CALL or CALLCODE with value from it,
//!   CREATE or CREATE2 with value from it, SELFDESTRUCT in it — are wrapped: before the
//!   original instruction, the real balance is read (`Balance(X)`, through the engine's
//!   view, so the read is tracked) and added to what revm holds for the account (all
//!   credits so far). Changes that revm journals relative to the balance (transfers,
//!   destruction) stay exact when their frames revert; the absolute entries (gas payment
//!   and refund) concern the sender, never a contract. BALANCE of an account not yet
//!   loaded has it loaded with its real balance, so warm and cold gas is what it would be.
//! * After the transaction ([`crate::vm`]): an account never observed had only credits,
//!   written as a [`BalanceDelta`](parex_core::BalanceDelta) on `Balance(X)`, which
//!   commutes with every other credit; an observed one writes its new balance; the account
//!   key is written only when its nonce, code or storage generation changed.
//!
//! Outcomes are those of the plain account model; [`merge_balances`] turns a state diff
//! back into it.

use alloy_primitives::map::{AddressMap, AddressSet};
use alloy_primitives::{Address, U256};
use parex_core::{AccountValue, InMemoryStorage, StateKey, StateValue, Storage};
use revm::bytecode::opcode;
use revm::context::{BlockEnv, CfgEnv, Context, Journal, TxEnv};
use revm::context_interface::context::ContextError;
use revm::handler::MainnetEvm;
use revm::interpreter::instructions::utility::IntoAddress;
use revm::interpreter::instructions::{contract, host};
use revm::interpreter::interpreter::EthInterpreter;
use revm::interpreter::interpreter_types::InputsTr;
use revm::interpreter::{
    Instruction, InstructionContext, InstructionExecResult, InstructionResult,
};
use std::sync::Arc;

use crate::db::ViewDb;

/// The reusable EVM's context.
pub(crate) type EvmContext = Context<BlockEnv, Arc<TxEnv>, CfgEnv, ViewDb, Journal<ViewDb>, ()>;
type Ictx<'a> = InstructionContext<'a, EvmContext, EthInterpreter>;

/// Keeps the balance of every contract in `state` apart from its account, except the
/// `beneficiary`'s (whose fee is credited to its account key) and EIP-7702 delegations
/// (whose accounts may be empty). Returns how many were split.
pub fn split_contract_balances(
    state: &mut InMemoryStorage<StateKey, StateValue>,
    beneficiary: Address,
) -> usize {
    let contracts: Vec<(Address, AccountValue)> = state
        .iter()
        .filter_map(|(key, value)| match (key, value) {
            (StateKey::Account(address), StateValue::Account(account))
                if *address != beneficiary && !account.balance_apart =>
            {
                let info = account.info?;
                let code = match state.get(&StateKey::Code(info.code_hash))? {
                    StateValue::Code(code) => code,
                    _ => return None,
                };
                (!code.is_empty() && !code.is_eip7702()).then_some((*address, *account))
            }
            _ => None,
        })
        .collect();
    for (address, mut account) in contracts.iter().copied() {
        let info = account.info.as_mut().expect("filtered on info");
        let balance = std::mem::take(&mut info.balance);
        account.balance_apart = true;
        state.insert(StateKey::Account(address), StateValue::Account(account));
        state.insert(StateKey::Balance(address), StateValue::Balance(balance));
    }
    contracts.len()
}

/// `diff` (a block's state diff, in any order) in the plain account model: each balance
/// kept apart back in its account (taken from `pre_block` where the diff does not write
/// the account), no `Balance` keys. In no particular order, as a state diff is.
pub fn merge_balances<S: Storage<Key = StateKey, Value = StateValue>>(
    diff: &[(StateKey, StateValue)],
    pre_block: &S,
) -> Result<Vec<(StateKey, StateValue)>, parex_core::StorageError> {
    let balances: AddressMap<U256> = diff
        .iter()
        .filter_map(|(key, value)| match (key, value) {
            (StateKey::Balance(address), StateValue::Balance(balance)) => {
                Some((*address, *balance))
            }
            _ => None,
        })
        .collect();
    let mut accounts = AddressSet::default();
    let mut merged = Vec::with_capacity(diff.len());
    for (key, value) in diff {
        match (key, value) {
            (StateKey::Balance(_), _) => {}
            (StateKey::Account(address), StateValue::Account(account)) => {
                accounts.insert(*address);
                let account = if account.balance_apart {
                    let balance = match balances.get(address) {
                        Some(balance) => *balance,
                        None => pre_block_balance(pre_block, *address)?,
                    };
                    whole(*account, balance)
                } else {
                    *account
                };
                merged.push((*key, StateValue::Account(account)));
            }
            _ => merged.push((*key, value.clone())),
        }
    }
    for (address, balance) in balances {
        if accounts.contains(&address) {
            continue;
        }
        let key = StateKey::Account(address);
        if let Some(StateValue::Account(account)) = pre_block.read(&key)?
            && account.balance_apart
        {
            merged.push((key, StateValue::Account(whole(account, balance))));
        }
    }
    Ok(merged)
}

fn pre_block_balance<S: Storage<Key = StateKey, Value = StateValue>>(
    pre_block: &S,
    address: Address,
) -> Result<U256, parex_core::StorageError> {
    Ok(pre_block
        .read(&StateKey::Balance(address))?
        .and_then(|v| v.as_balance())
        .unwrap_or_default())
}

/// `account` with `balance` in it.
fn whole(mut account: AccountValue, balance: U256) -> AccountValue {
    if let Some(info) = &mut account.info {
        info.balance = balance;
    }
    account.balance_apart = false;
    account
}

/// Wraps the instructions that observe a balance (see the module documentation).
pub(crate) fn install(evm: &mut MainnetEvm<EvmContext>) {
    let table = evm.instruction.instruction_table_mut();
    table[opcode::BALANCE as usize] = Instruction::new(balance);
    table[opcode::SELFBALANCE as usize] = Instruction::new(selfbalance);
    table[opcode::CALL as usize] = Instruction::new(call);
    table[opcode::CALLCODE as usize] = Instruction::new(callcode);
    table[opcode::CREATE as usize] = Instruction::new(create);
    table[opcode::CREATE2 as usize] = Instruction::new(create2);
    table[opcode::SELFDESTRUCT as usize] = Instruction::new(selfdestruct);
}

/// If `address` is loaded with its balance apart and not yet observed in this
/// transaction: reads its real balance and adds it to what revm holds.
fn observe(ctx: &mut Ictx<'_>, address: Address) -> InstructionExecResult {
    match ctx.host.journaled_state.database.observe(address) {
        Ok(None) => Ok(()),
        Ok(Some(balance)) => {
            let account = ctx
                .host
                .journaled_state
                .inner
                .state
                .get_mut(&address)
                .expect("an account served to revm is in its journal");
            account.info.balance = account.info.balance.saturating_add(balance);
            Ok(())
        }
        Err(e) => {
            // As revm's own host does with a failed load: the error ends the transaction.
            ctx.host.error = Err(ContextError::Db(e));
            Err(InstructionResult::FatalExternalError)
        }
    }
}

/// `observe` of the executing contract (SELFBALANCE, SELFDESTRUCT, and the sender of a
/// value-carrying CALL, CALLCODE, CREATE or CREATE2).
fn observe_self(ctx: &mut Ictx<'_>) -> InstructionExecResult {
    let address = ctx.interpreter.input.target_address();
    observe(ctx, address)
}

/// `observe_self` if the stack item `depth` below the top (the value operand of CALL,
/// CALLCODE, CREATE or CREATE2) is non-zero; a stack too short is left to the original
/// instruction to reject.
fn observe_self_if_paying(ctx: &mut Ictx<'_>, depth: usize) -> InstructionExecResult {
    let paying = ctx
        .interpreter
        .stack
        .peek(depth)
        .is_ok_and(|value| !value.is_zero());
    if paying { observe_self(ctx) } else { Ok(()) }
}

fn reborrow<'b>(ctx: &'b mut Ictx<'_>) -> Ictx<'b> {
    InstructionContext {
        interpreter: ctx.interpreter,
        host: ctx.host,
    }
}

fn balance(mut ctx: Ictx<'_>) -> InstructionExecResult {
    if let Ok(target) = ctx.interpreter.stack.peek(0) {
        let address = target.into_address();
        observe(&mut ctx, address)?;
    }
    // Not loaded yet: loaded now, with its real balance.
    ctx.host.journaled_state.database.observe_on_load(true);
    let result = host::balance(reborrow(&mut ctx));
    ctx.host.journaled_state.database.observe_on_load(false);
    result
}

fn selfbalance(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self(&mut ctx)?;
    host::selfbalance(ctx)
}

fn call(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self_if_paying(&mut ctx, 2)?;
    contract::call::<{ opcode::CALL }, _, _>(ctx)
}

fn callcode(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self_if_paying(&mut ctx, 2)?;
    contract::call::<{ opcode::CALLCODE }, _, _>(ctx)
}

fn create(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self_if_paying(&mut ctx, 0)?;
    contract::create::<false, _, _>(ctx)
}

fn create2(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self_if_paying(&mut ctx, 0)?;
    contract::create::<true, _, _>(ctx)
}

fn selfdestruct(mut ctx: Ictx<'_>) -> InstructionExecResult {
    observe_self(&mut ctx)?;
    host::selfdestruct(ctx)
}
