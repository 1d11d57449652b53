//! parex-core: the vocabulary every parex engine and VM shares.
//!
//! * [`Vm`] — "execute transaction i against this read view, return its writes and
//!   output". Schedulers are generic over it; the EVM is the first implementation.
//! * [`ReadView`] — what a VM reads through. The *engine* implements it, so the engine
//!   alone knows versions and records read sets; the VM never sees them.
//! * [`Storage`] — the pre-block state, with an in-memory implementation and a
//!   latency-injecting wrapper that models a disk-backed node.
//! * [`state`] — the Ethereum account model (keys, values, balance deltas) and
//!   [`outcome`] — per-transaction and per-block results, with a canonical digest.

pub mod outcome;
pub mod state;
pub mod storage;
pub mod vm;

pub use outcome::{BlockOutcome, TxOutcome, TxStatus};
pub use state::{AccountInfo, AccountValue, BalanceDelta, StateKey, StateValue};
pub use storage::{InMemoryStorage, LatencyStorage, PreBlockView, Storage, StorageError};
pub use vm::{
    AccessKind, Execution, ReadError, ReadView, TxIndex, Vm, VmError, VmExecution, Write,
};
