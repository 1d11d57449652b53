//! What an engine did while executing a block.

use std::time::Duration;

/// Counters and phase times of one block execution. Fields an engine has no use for stay
/// zero; engine-specific counters go to `extra`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Transaction executions, first ones and re-executions together.
    pub executions: u64,
    /// Executions beyond the first of each transaction.
    pub reexecutions: u64,
    pub validations: u64,
    pub validation_failures: u64,
    /// Times an execution stopped to wait for another transaction.
    pub dependency_waits: u64,
    /// Summed over workers.
    pub execution_time: Duration,
    pub validation_time: Duration,
    pub scheduling_time: Duration,
    /// Building the outcome (state diff, outputs) after execution.
    pub finalize_time: Duration,
    /// Engine-specific counters, by name.
    pub extra: Vec<(&'static str, u64)>,
    /// Every worker's timeline, when the run was traced ([`crate::RunOptions::trace`]).
    pub trace: Option<crate::trace::Trace>,
}

impl Metrics {
    /// Adds `other`'s counters and phase times to these (not its extras or trace): the
    /// metrics of a part of the block run by another engine.
    pub fn add_counts(&mut self, other: &Metrics) {
        self.executions += other.executions;
        self.reexecutions += other.reexecutions;
        self.validations += other.validations;
        self.validation_failures += other.validation_failures;
        self.dependency_waits += other.dependency_waits;
        self.execution_time += other.execution_time;
        self.validation_time += other.validation_time;
        self.scheduling_time += other.scheduling_time;
        self.finalize_time += other.finalize_time;
    }

    /// Adds `value` to the engine-specific counter `name` (reported from now on).
    pub fn add_extra(&mut self, name: &'static str, value: u64) {
        match self.extra.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v += value,
            None => self.extra.push((name, value)),
        }
    }

    /// The engine-specific counter `name`, if the engine reported it.
    pub fn extra(&self, name: &str) -> Option<u64> {
        self.extra.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}
