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
    /// The engine-specific counter `name`, if the engine reported it.
    pub fn extra(&self, name: &str) -> Option<u64> {
        self.extra.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}
