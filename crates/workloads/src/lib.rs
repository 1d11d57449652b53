//! parex-workloads: the blocks parex executes — real mainnet blocks with their
//! pre-state, and seeded synthetic workloads on real contracts.

pub mod contracts;
pub mod mainnet;
pub mod synthetic;
pub mod verify;

pub use synthetic::{Size, Workload, WorkloadError, WorkloadKind, WorkloadSpec};
