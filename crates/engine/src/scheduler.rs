//! The collaborative scheduler of Block-STM (Gelashvili et al., 2022, algorithms 4-5).
//!
//! Two shared indices hand out tasks in block order: `execution_idx` (the next
//! transaction to execute) and `validation_idx` (the next to validate); a worker takes
//! a validation task whenever validation lags behind execution. Both live in one atomic
//! word (`indices`, execution in the low half): a worker choosing its next task reads
//! both at every task, and the two counters on two cache lines, each moved by the other
//! worker at its last task, cost two transfers between the cores where one does (one
//! reading of both is also a consistent pair, which two loads were not). Aborts and resumed
//! dependencies move the indices back down; `decrease_cnt` counts such moves so that
//! [`Scheduler::check_done`] can tell a stable "everything executed and validated"
//! state from a transient one, and each worker counts its own tasks in flight (`active`,
//! one counter per worker on a line of its own: a shared counter, changed at every
//! task's start and end, moved between the cores several times per transaction).
//! `check_done` sums them: a worker's count changes only by that worker's own steps, and
//! the paper's argument (a task in flight when the indices were read is still counted,
//! or it has ended and any index it moved back shows in `decrease_cnt`) holds worker by
//! worker.
//!
//! Each transaction has a status `(incarnation, ReadyToExecute | Executing | Executed |
//! Aborting)`, packed in one atomic word, and a list of transactions waiting for its
//! current incarnation to finish (they read one of its estimates). When it finishes, the
//! lowest of them is claimed for the worker that finished it (one departure from the
//! paper, where every resumed transaction goes back to `execution_idx`); claiming is the
//! same compare-and-swap as any execution task's, so each incarnation still runs once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};

use crossbeam::utils::CachePadded;
use parex_core::TxIndex;

use crate::mv_memory::Incarnation;

/// A unit of work handed to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Execute(TxIndex, Incarnation),
    Validate(TxIndex, Incarnation),
}

const READY_TO_EXECUTE: u64 = 0;
const EXECUTING: u64 = 1;
const EXECUTED: u64 = 2;
const ABORTING: u64 = 3;

#[inline]
fn pack(incarnation: Incarnation, status: u64) -> u64 {
    (u64::from(incarnation) << 2) | status
}

#[inline]
fn unpack(word: u64) -> (Incarnation, u64) {
    ((word >> 2) as Incarnation, word & 3)
}

struct TxState {
    status: AtomicU64,
    /// Transactions suspended until this one's current incarnation finishes executing.
    dependents: Mutex<Vec<TxIndex>>,
}

/// Where each index sits in the word of [`Scheduler::indices`].
const EXECUTION_SHIFT: u32 = 0;
const VALIDATION_SHIFT: u32 = 32;
const HALF: u64 = u32::MAX as u64;

pub struct Scheduler {
    n: usize,
    /// `execution_idx` (low 32 bits) and `validation_idx` (high 32 bits). Each only grows
    /// by one per task handed out (at most a few per worker past `n`) and is moved back to
    /// a transaction index, so neither half overflows into the other (blocks have fewer
    /// than 2^31 transactions: [`Scheduler::new`]).
    indices: CachePadded<AtomicU64>,
    decrease_cnt: CachePadded<AtomicUsize>,
    /// Per worker, its tasks in flight.
    active: Box<[CachePadded<AtomicUsize>]>,
    done_marker: CachePadded<AtomicBool>,
    /// Stopped by [`Scheduler::halt`], not done.
    halted: AtomicBool,
    txs: Box<[CachePadded<TxState>]>,
}

impl Scheduler {
    /// A scheduler for `n` transactions and `workers` workers (numbered from 0).
    pub fn new(n: usize, workers: usize) -> Self {
        assert!(
            n < 1 << 31,
            "a block of {n} transactions is beyond the scheduler's indices"
        );
        Self {
            n,
            indices: CachePadded::new(AtomicU64::new(0)),
            decrease_cnt: CachePadded::new(AtomicUsize::new(0)),
            active: (0..workers.max(1))
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
            done_marker: CachePadded::new(AtomicBool::new(n == 0)),
            halted: AtomicBool::new(false),
            txs: (0..n)
                .map(|_| {
                    CachePadded::new(TxState {
                        status: AtomicU64::new(pack(0, READY_TO_EXECUTE)),
                        dependents: Mutex::new(Vec::new()),
                    })
                })
                .collect(),
        }
    }

    #[inline]
    pub fn done(&self) -> bool {
        self.done_marker.load(SeqCst)
    }

    /// Whether the block is done and was not halted: every transaction's latest
    /// incarnation executed and validated.
    pub fn completed(&self) -> bool {
        self.done() && !self.halted.load(SeqCst)
    }

    /// Stops every worker (used when one fails).
    pub fn halt(&self) {
        self.halted.store(true, SeqCst);
        self.done_marker.store(true, SeqCst);
    }

    /// `(execution_idx, validation_idx)`, read together.
    #[inline]
    fn indices(&self) -> (usize, usize) {
        let word = self.indices.load(SeqCst);
        (
            ((word >> EXECUTION_SHIFT) & HALF) as usize,
            ((word >> VALIDATION_SHIFT) & HALF) as usize,
        )
    }

    /// Moves the index at `shift` forward by one; returns its value before.
    #[inline]
    fn take_index(&self, shift: u32) -> usize {
        ((self.indices.fetch_add(1 << shift, SeqCst) >> shift) & HALF) as usize
    }

    /// Moves the index at `shift` back to `target` if it is beyond it (the other index
    /// is left as it is: a failed exchange means either moved, and the minimum is taken
    /// again). Counts the move in `decrease_cnt` only if the index moved: the paper counts
    /// every call, but an index that did not move changed nothing for `check_done`, and
    /// the shared counter's cache line is spared most of the time.
    fn decrease_index(&self, shift: u32, target: TxIndex) {
        let target = target as u64;
        let mut word = self.indices.load(SeqCst);
        loop {
            if (word >> shift) & HALF <= target {
                return;
            }
            let lowered = (word & !(HALF << shift)) | (target << shift);
            match self
                .indices
                .compare_exchange_weak(word, lowered, SeqCst, SeqCst)
            {
                Ok(_) => {
                    self.decrease_cnt.fetch_add(1, SeqCst);
                    return;
                }
                Err(now) => word = now,
            }
        }
    }

    fn decrease_execution_idx(&self, target: TxIndex) {
        self.decrease_index(EXECUTION_SHIFT, target);
    }

    fn decrease_validation_idx(&self, target: TxIndex) {
        self.decrease_index(VALIDATION_SHIFT, target);
    }

    fn check_done(&self) {
        let observed = self.decrease_cnt.load(SeqCst);
        let (execution, validation) = self.indices();
        if execution.min(validation) >= self.n
            && self.active.iter().all(|a| a.load(SeqCst) == 0)
            && observed == self.decrease_cnt.load(SeqCst)
        {
            self.done_marker.store(true, SeqCst);
        }
    }

    /// Claims `tx`'s execution for `worker` out of turn (a heavy transaction started
    /// first, see `block_stm`); when `execution_idx` reaches it, it is passed over as any
    /// claimed transaction is. `None` if it is not ready to execute (already claimed).
    /// Block order is only the order tasks are offered in: an execution reads the memory as
    /// of its position whenever it runs, and its validation still waits for
    /// `validation_idx`, which comes back below it whenever an earlier execution writes.
    pub fn claim_out_of_turn(&self, tx: TxIndex, worker: usize) -> Option<Task> {
        self.active[worker].fetch_add(1, SeqCst);
        self.try_incarnate(tx, worker)
    }

    /// Claims `tx` for execution if it is ready; otherwise gives up the active task.
    fn try_incarnate(&self, tx: TxIndex, worker: usize) -> Option<Task> {
        if tx < self.n {
            let status = &self.txs[tx].status;
            let word = status.load(SeqCst);
            let (incarnation, s) = unpack(word);
            if s == READY_TO_EXECUTE
                && status
                    .compare_exchange(word, pack(incarnation, EXECUTING), SeqCst, SeqCst)
                    .is_ok()
            {
                return Some(Task::Execute(tx, incarnation));
            }
        }
        self.active[worker].fetch_sub(1, SeqCst);
        None
    }

    /// (`execution` is the index as the caller last read it.)
    fn next_version_to_execute(&self, execution: usize, worker: usize) -> Option<Task> {
        if execution >= self.n {
            self.check_done();
            return None;
        }
        self.active[worker].fetch_add(1, SeqCst);
        let tx = self.take_index(EXECUTION_SHIFT);
        self.try_incarnate(tx, worker)
    }

    /// (`validation` is the index as the caller last read it.)
    fn next_version_to_validate(&self, validation: usize, worker: usize) -> Option<Task> {
        if validation >= self.n {
            self.check_done();
            return None;
        }
        self.active[worker].fetch_add(1, SeqCst);
        let tx = self.take_index(VALIDATION_SHIFT);
        if tx < self.n {
            let (incarnation, s) = unpack(self.txs[tx].status.load(SeqCst));
            if s == EXECUTED {
                return Some(Task::Validate(tx, incarnation));
            }
        }
        self.active[worker].fetch_sub(1, SeqCst);
        None
    }

    /// The next task, validation first when it lags behind execution. An index that
    /// yields no task (a transaction still executing, or not ready) is passed over and
    /// the next one tried at once: `None` means both indices are past the block, so the
    /// caller has nothing to do until some task moves one back. (Each try advances an
    /// index, so the loop ends unless other workers keep moving them back, which they
    /// only do as they finish tasks.)
    /// `worker` is the caller's number (as for every call that starts or ends a task).
    pub fn next_task(&self, worker: usize) -> Option<Task> {
        loop {
            let (execution, validation) = self.indices();
            if validation >= self.n && execution >= self.n {
                self.check_done();
                return None;
            }
            let task = if validation < execution {
                self.next_version_to_validate(validation, worker)
            } else {
                self.next_version_to_execute(execution, worker)
            };
            if task.is_some() {
                return task;
            }
        }
    }

    /// Whether `tx`'s current incarnation has executed (a hint: it may be aborted next).
    #[inline]
    pub fn executed(&self, tx: TxIndex) -> bool {
        unpack(self.txs[tx].status.load(SeqCst)).1 == EXECUTED
    }

    /// Suspends `tx` (executing) until `blocking_tx` finishes its current execution.
    /// Returns false if it already has, in which case `tx` should simply retry.
    pub fn add_dependency(&self, tx: TxIndex, blocking_tx: TxIndex, worker: usize) -> bool {
        let blocking = &self.txs[blocking_tx];
        let mut dependents = blocking
            .dependents
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if unpack(blocking.status.load(SeqCst)).1 == EXECUTED {
            return false;
        }
        let (incarnation, s) = unpack(self.txs[tx].status.load(SeqCst));
        debug_assert_eq!(s, EXECUTING);
        self.txs[tx]
            .status
            .store(pack(incarnation, ABORTING), SeqCst);
        dependents.push(tx);
        drop(dependents);
        self.active[worker].fetch_sub(1, SeqCst);
        true
    }

    /// Moves an aborting transaction to the next incarnation, ready to execute.
    fn set_ready_status(&self, tx: TxIndex) {
        let status = &self.txs[tx].status;
        let (incarnation, s) = unpack(status.load(SeqCst));
        debug_assert_eq!(s, ABORTING);
        status.store(pack(incarnation + 1, READY_TO_EXECUTE), SeqCst);
    }

    /// Marks `tx`'s incarnation executed and resumes its dependents. Returns a validation
    /// task for `tx` when validation has already gone past it (if its writes went to a new
    /// key, validation also restarts just above it: the paper restarts it from `tx`, but
    /// `tx`'s own validation is better run by the caller, whose cache holds what `tx` read,
    /// than by whichever worker draws it: on 4330482 the other worker validated each step
    /// of the miner's nonce chain at five times the cost), and the lowest dependent's next
    /// incarnation, claimed for the caller: it waited to read what `tx` just wrote, which
    /// is in the caller's cache, and a nonce sequence or other chain then stays on one
    /// worker instead of moving to another core at every step. The caller runs both.
    pub fn finish_execution(
        &self,
        tx: TxIndex,
        incarnation: Incarnation,
        wrote_new_path: bool,
        worker: usize,
    ) -> (Option<Task>, Option<Task>) {
        let state = &self.txs[tx];
        state.status.store(pack(incarnation, EXECUTED), SeqCst);
        let dependents =
            std::mem::take(&mut *state.dependents.lock().unwrap_or_else(|e| e.into_inner()));
        let mut resumed = None;
        if let Some(&lowest) = dependents.iter().min() {
            for &dep in &dependents {
                self.set_ready_status(dep);
            }
            // Claimed like any task (counted active first); if another worker got there
            // first, it runs it.
            self.active[worker].fetch_add(1, SeqCst);
            resumed = self.try_incarnate(lowest, worker);
            let others = dependents
                .iter()
                .copied()
                .filter(|&dep| dep != lowest)
                .min();
            if let Some(next) = others {
                self.decrease_execution_idx(next);
            }
        }
        if self.indices().1 > tx {
            if wrote_new_path {
                self.decrease_validation_idx(tx + 1);
            }
            return (Some(Task::Validate(tx, incarnation)), resumed);
        }
        self.active[worker].fetch_sub(1, SeqCst);
        (None, resumed)
    }

    /// Claims the abort of `tx`'s `incarnation` after a failed validation; false if that
    /// incarnation is no longer the executed one (someone else aborted it already).
    pub fn try_validation_abort(&self, tx: TxIndex, incarnation: Incarnation) -> bool {
        self.txs[tx]
            .status
            .compare_exchange(
                pack(incarnation, EXECUTED),
                pack(incarnation, ABORTING),
                SeqCst,
                SeqCst,
            )
            .is_ok()
    }

    /// Ends a validation task; after an abort, schedules the re-execution (returned
    /// directly when execution has already passed `tx`) and revalidation above `tx`.
    pub fn finish_validation(&self, tx: TxIndex, aborted: bool, worker: usize) -> Option<Task> {
        if aborted {
            self.set_ready_status(tx);
            self.decrease_validation_idx(tx + 1);
            if self.indices().0 > tx {
                return self.try_incarnate(tx, worker);
            }
        }
        self.active[worker].fetch_sub(1, SeqCst);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished execution hands its lowest dependent to the caller (no other worker
    /// can take it), puts the others back in the shared order, and the block is done
    /// only once the handed task has run and been validated.
    #[test]
    fn finishing_an_execution_claims_its_lowest_dependent() {
        let s = Scheduler::new(3, 1);
        assert_eq!(s.next_task(0), Some(Task::Execute(0, 0)));
        assert_eq!(s.next_task(0), Some(Task::Execute(1, 0)));
        assert_eq!(s.next_task(0), Some(Task::Execute(2, 0)));
        // 1 and 2 read estimates of 0.
        assert!(s.add_dependency(2, 0, 0));
        assert!(s.add_dependency(1, 0, 0));
        let (validate, resumed) = s.finish_execution(0, 0, false, 0);
        // Validation went past 0 (it found it executing), so 0's validation comes back.
        assert_eq!(validate, Some(Task::Validate(0, 0)));
        assert_eq!(resumed, Some(Task::Execute(1, 1)));
        assert_eq!(s.finish_validation(0, false, 0), None);
        // The shared order offers 2, never the claimed 1.
        assert_eq!(s.next_task(0), Some(Task::Execute(2, 1)));
        assert_eq!(s.finish_execution(2, 1, false, 0), (None, None));
        assert_eq!(s.next_task(0), Some(Task::Validate(2, 1)));
        assert_eq!(s.finish_validation(2, false, 0), None);
        // Nothing is left to hand out, but the claimed task is still in flight.
        assert_eq!(s.next_task(0), None);
        assert!(!s.done());
        assert_eq!(
            s.finish_execution(1, 1, false, 0),
            (Some(Task::Validate(1, 1)), None)
        );
        assert_eq!(s.finish_validation(1, false, 0), None);
        assert_eq!(s.next_task(0), None);
        assert!(s.done());
    }

    /// An execution that wrote a new key after validation had passed it validates itself
    /// (returned to the caller) and sends validation back to just above it.
    #[test]
    fn an_execution_behind_validation_validates_itself() {
        let s = Scheduler::new(3, 2);
        assert_eq!(s.next_task(0), Some(Task::Execute(0, 0)));
        assert_eq!(s.next_task(1), Some(Task::Execute(1, 0)));
        assert_eq!(s.finish_execution(1, 0, true, 1), (None, None));
        // Validation passes 0 (executing) and validates 1.
        assert_eq!(s.next_task(1), Some(Task::Validate(1, 0)));
        assert_eq!(s.finish_validation(1, false, 1), None);
        // 0 writes a new key: it validates itself, and 1 is validated again.
        assert_eq!(
            s.finish_execution(0, 0, true, 0),
            (Some(Task::Validate(0, 0)), None)
        );
        assert_eq!(s.indices().1, 1);
        assert_eq!(s.next_task(1), Some(Task::Validate(1, 0)));
        assert_eq!(s.finish_validation(1, false, 1), None);
        assert_eq!(s.finish_validation(0, false, 0), None);
        assert_eq!(s.next_task(0), Some(Task::Execute(2, 0)));
        assert!(!s.done());
    }

    /// A transaction claimed out of turn is passed over when the shared order reaches it,
    /// and validated once it has executed; the block is done when every transaction
    /// executed once and was validated.
    #[test]
    fn a_transaction_claimed_out_of_turn_runs_once() {
        let s = Scheduler::new(4, 2);
        assert_eq!(s.claim_out_of_turn(2, 1), Some(Task::Execute(2, 0)));
        assert_eq!(s.claim_out_of_turn(2, 0), None);
        // Runs a worker's tasks (every execution writes a new key, every validation
        // passes) until the scheduler has none for it; counts the executions.
        let drain = |executed: &mut [u32; 4], worker: usize, mut task: Option<Task>| loop {
            task = match task.or_else(|| s.next_task(worker)) {
                Some(Task::Execute(tx, incarnation)) => {
                    executed[tx] += 1;
                    let (validate, resumed) = s.finish_execution(tx, incarnation, true, worker);
                    assert_eq!(resumed, None);
                    validate
                }
                Some(Task::Validate(tx, _)) => s.finish_validation(tx, false, worker),
                None => return,
            };
        };
        let mut executed = [0; 4];
        // Worker 0 runs everything else while 2 executes.
        drain(&mut executed, 0, None);
        assert_eq!(executed, [1, 1, 0, 1]);
        assert!(!s.done());
        executed[2] += 1;
        let (validate, _) = s.finish_execution(2, 0, true, 1);
        drain(&mut executed, 1, validate);
        assert_eq!(executed, [1, 1, 1, 1]);
        assert_eq!(s.next_task(0), None);
        assert!(s.done());
    }

    /// Each worker counts its own tasks in flight: the block is done only when no worker
    /// holds one, whichever worker looks.
    #[test]
    fn done_waits_for_every_worker_in_flight() {
        let s = Scheduler::new(2, 2);
        assert_eq!(s.next_task(0), Some(Task::Execute(0, 0)));
        // Validation lags, but 0 is executing: passed over.
        assert_eq!(s.next_task(1), Some(Task::Execute(1, 0)));
        assert_eq!(
            s.finish_execution(0, 0, false, 0),
            (Some(Task::Validate(0, 0)), None)
        );
        assert_eq!(s.finish_execution(1, 0, false, 1), (None, None));
        assert_eq!(s.next_task(1), Some(Task::Validate(1, 0)));
        assert_eq!(s.finish_validation(0, false, 0), None);
        // Worker 0 has nothing left, but worker 1 still validates.
        assert_eq!(s.next_task(0), None);
        assert!(!s.done());
        assert_eq!(s.finish_validation(1, false, 1), None);
        assert_eq!(s.next_task(0), None);
        assert!(s.done());
    }
}
