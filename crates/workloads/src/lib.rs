//! parex-workloads: the blocks parex executes — real mainnet blocks with their
//! pre-state, and seeded synthetic workloads on real contracts.

pub mod mainnet;
pub mod verify;
