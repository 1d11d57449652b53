//! The boundary between schedulers (engines) and transaction semantics (VMs).

use std::fmt::Debug;
use std::hash::Hash;

use crate::storage::StorageError;

/// Position of a transaction in its block.
pub type TxIndex = usize;

/// A write produced by one execution of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write<V, D> {
    /// The key takes this value.
    Put(V),
    /// A commutative update (e.g. "add 5 wei"): it is applied to whatever value the key
    /// has when it is resolved, so it creates no read dependency for the writer.
    Delta(D),
}

/// What executing one transaction produced.
#[derive(Clone, Debug)]
pub struct Execution<K, V, D, O> {
    /// Every key the transaction changed, each at most once.
    pub writes: Vec<(K, Write<V, D>)>,
    /// The VM's per-transaction output (status, gas, logs for the EVM).
    pub output: O,
}

/// How a transaction declares it will use a key (see [`Vm::declared_access`]).
///
/// `Read` and `Write` are the usual shared and exclusive modes. `Delta` declares only
/// commutative updates ([`Write::Delta`]) *without reading the key*: any number of
/// `Delta` holders may run together (their updates commute), but not alongside a reader
/// or a writer of the key. A `Write` declaration also permits reads and deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessKind {
    Read,
    Delta,
    Write,
}

impl AccessKind {
    /// The weakest kind that permits both `self` and `other`.
    pub fn join(self, other: AccessKind) -> AccessKind {
        if self == other {
            self
        } else {
            AccessKind::Write
        }
    }

    /// Whether two holders of these kinds may use the same key at the same time.
    pub fn compatible(self, other: AccessKind) -> bool {
        self == other && self != AccessKind::Write
    }

    /// Whether a declaration of this kind permits reading the key.
    pub fn permits_read(self) -> bool {
        self != AccessKind::Delta
    }

    /// Whether a declaration of this kind permits `write`.
    pub fn permits_write<V, D>(self, write: &Write<V, D>) -> bool {
        match write {
            Write::Put(_) => self == AccessKind::Write,
            Write::Delta(_) => self != AccessKind::Read,
        }
    }
}

/// Why a read could not be served.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The value depends on transaction `blocking_tx`, which is being re-executed; the
    /// engine will suspend this execution and retry it once that transaction is done.
    #[error("read depends on transaction {blocking_tx}, which is not yet final")]
    Blocked { blocking_tx: TxIndex },
    /// The engine abandoned this execution (its result can no longer be used).
    #[error("execution aborted by the engine")]
    Aborted,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A read-only view of the state as transaction `i` should see it: the pre-block state
/// with the writes of transactions before `i` applied. Engines implement it; reads
/// made through it form the transaction's read set.
pub trait ReadView<K, V> {
    /// The value of `key`, or `None` if the key does not exist.
    fn read(&mut self, key: &K) -> Result<Option<V>, ReadError>;
}

/// An execution failed for a reason other than the transaction itself being invalid.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VmError {
    /// A read could not be served; see [`ReadError`]. Engines handle `Blocked`/`Aborted`.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The block's data is inconsistent (e.g. a BLOCKHASH the data set does not have).
    #[error("bad block data: {0}")]
    BadData(String),
    /// The VM itself failed (a bug or an unsupported feature), naming the transaction.
    #[error("VM failure at transaction {tx}: {message}")]
    Internal { tx: TxIndex, message: String },
}

/// The execution result type of a [`Vm`].
pub type VmExecution<V> =
    Execution<<V as Vm>::Key, <V as Vm>::Value, <V as Vm>::Delta, <V as Vm>::Output>;

/// Transaction semantics, as schedulers see them.
///
/// Contract: `execute(i, view)` is a pure function of `i` and the values `view` returns;
/// it may be called many times for the same `i` (re-executions) and from many threads.
pub trait Vm: Sync {
    /// A state key (an account, a storage slot, a piece of code, an object...).
    type Key: Clone + Eq + Hash + Ord + Debug + Send + Sync;
    /// A state value.
    type Value: Clone + PartialEq + Debug + Send + Sync;
    /// A commutative update to a value (see [`Write::Delta`]).
    type Delta: Clone + Debug + Send + Sync;
    /// Per-transaction output.
    type Output: Clone + Debug + Send + Sync;

    /// Number of transactions in the block.
    fn tx_count(&self) -> usize;

    /// Executes transaction `tx` against `view`.
    fn execute<R: ReadView<Self::Key, Self::Value>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<VmExecution<Self>, VmError>;

    /// Applies a delta to a key's value (`None`: the key does not exist yet).
    fn apply_delta(
        &self,
        key: &Self::Key,
        value: Option<Self::Value>,
        delta: &Self::Delta,
    ) -> Option<Self::Value>;

    /// Adds `later` into `earlier` so that applying the result equals applying both.
    fn merge_deltas(&self, earlier: &mut Self::Delta, later: &Self::Delta);

    /// Block-level post-processing of outputs in block order (e.g. cumulative gas).
    fn finalize_outputs(&self, outputs: &mut [Self::Output]) -> Result<(), VmError>;

    /// About how many light transactions (the cheapest kind the VM runs) the block's work
    /// amounts to, judged before it runs: an engine gives a small block a second worker
    /// only when this says the work repays waking one (see the engine crate's
    /// `workers::count`). Only asked of small blocks. Default: the sum of
    /// [`Vm::light_tx_equivalents_of`] over the transactions.
    fn light_tx_equivalents(&self) -> usize {
        (0..self.tx_count())
            .map(|tx| self.light_tx_equivalents_of(tx))
            .sum()
    }

    /// About how many light transactions transaction `tx`'s work amounts to, judged before
    /// it runs (at least 1): a hint for scheduling (e.g. which nonce sequences
    /// `block-stm` runs as one unit). Default: 1.
    fn light_tx_equivalents_of(&self, tx: TxIndex) -> usize {
        let _ = tx;
        1
    }

    /// A key that transaction `tx` is known, before it runs, to read first and to write
    /// whenever it is valid: an Ethereum transaction's sender account (its nonce). Two
    /// transactions with the same sequence key are ordered (a nonce sequence), so an
    /// engine may make the later one wait for the earlier instead of speculating. A hint
    /// like [`Vm::declared_access`]: engines stay exact whatever it says. Default: none.
    fn sequence_key(&self, tx: TxIndex) -> Option<Self::Key> {
        let _ = tx;
        None
    }

    /// Keys that many of the block's transactions send a [`Write::Delta`] to (for the
    /// EVM: the block's beneficiary, credited every transaction's fee, and wallets that
    /// receive many plain transfers). Engines with a multi-version memory keep their
    /// entries apart from the other keys' (one list per worker), so that workers do not
    /// all write one place. A hint: engines stay exact whatever it says. Default: none.
    fn delta_sinks(&self) -> Vec<Self::Key> {
        Vec::new()
    }

    /// `value`, a pre-block value of `tx`'s sequence key, changed so that `tx` is in
    /// sequence on it (for the EVM: the sender's nonce set to the transaction's). For hints
    /// only, never for a result: a later transaction of a nonce sequence run on the
    /// pre-block state (to learn which keys it reads) then goes on past its sequence check
    /// and reads its other keys, instead of failing before it reads any. Default: `value`.
    fn in_sequence(&self, tx: TxIndex, value: Option<Self::Value>) -> Option<Self::Value> {
        let _ = tx;
        value
    }

    /// The keys transaction `tx` declares it will access, and how (Solana-style access
    /// lists; used by the `sealevel` engine to take locks). `pre_block` reads the state
    /// *before the block* (e.g. to find an account's code or storage generation); what
    /// earlier transactions of the block change is unknown here.
    ///
    /// Declarations are hints: an engine must stay exact when they are wrong or missing
    /// (it detects an access outside them and re-runs the transaction in order). The
    /// default declares nothing, which is exact but leaves nothing to run in parallel.
    fn declared_access<R: ReadView<Self::Key, Self::Value>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(Self::Key, AccessKind)> {
        let _ = (tx, pre_block);
        Vec::new()
    }
}
