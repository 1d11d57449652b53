//! The mock VM that the engine tests share.
//!
//! Each mock transaction reads keys through the view (one only when the first value read
//! is odd, so read sets depend on values), spins for a while, writes a subset of its
//! candidate keys that depends on what it read (so the write set of a re-execution may
//! differ from the previous one's), and credits deltas. It may fail or panic depending
//! on what it read (so speculative executions hit failures serial execution does not),
//! and it declares whatever its `declared` list says, right or wrong.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::hint::black_box;

use parex_core::{AccessKind, Execution, InMemoryStorage, ReadView, TxIndex, Vm, VmError, Write};
use proptest::prelude::*;

pub type Key = u32;
pub type Value = u64;
pub type Delta = u64;

#[derive(Clone, Debug, Default)]
pub struct MockTx {
    /// Keys read unconditionally, in order.
    pub reads: Vec<Key>,
    /// Read only when the first value read is odd (a read set that depends on values).
    pub extra_read: Key,
    /// Candidate keys for full writes (each written or not depending on what was read).
    pub writes: Vec<Key>,
    /// Keys credited with a delta.
    pub deltas: Vec<Key>,
    /// Busy work, to vary execution times.
    pub work: u32,
    /// What the transaction declares ([`Vm::declared_access`]), right or wrong.
    pub declared: Vec<(Key, AccessKind)>,
    /// Its sequence key ([`Vm::sequence_key`]), right or wrong.
    pub sequence: Option<Key>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MockOutput {
    pub seen: u64,
    pub gas: u64,
    pub cumulative: u64,
}

/// Busy work of a light transaction (see `Vm::light_tx_equivalents_of`): in
/// `tx_strategy`'s range of work, three transactions in five are light.
pub const LIGHT_WORK: u32 = 1000;

#[derive(Default)]
pub struct MockVm {
    pub txs: Vec<MockTx>,
    /// Fail with `BadData` when the digest of the values read is 0 modulo this (0: never).
    pub fail_modulo: u64,
    /// Panic when the digest is 1 modulo this (0: never).
    pub panic_modulo: u64,
    /// Sequence keys gate like a nonce: a transaction whose first read is its sequence
    /// key, and finds it even, reads nothing more (and writes nothing);
    /// [`Vm::in_sequence`] makes the value odd (with `false`, it leaves it as it is).
    pub sequence_gate: Option<bool>,
    /// The keys declared as the block's delta sinks ([`Vm::delta_sinks`]), right or wrong.
    pub sinks: Vec<Key>,
}

pub const PANIC_PREFIX: &str = "mock panic at transaction ";

/// A block of these transactions that never fails, with key 0 as its delta sink (the
/// engines keep a sink's entries apart; with the default, none, they do not).
pub fn vm(txs: Vec<MockTx>) -> MockVm {
    MockVm {
        txs,
        sinks: vec![0],
        ..MockVm::default()
    }
}

pub fn mix(mut h: u64, v: u64) -> u64 {
    h ^= v
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(h << 6)
        .wrapping_add(h >> 2);
    h.wrapping_mul(0xff51_afd7_ed55_8ccd)
}

impl Vm for MockVm {
    type Key = Key;
    type Value = Value;
    type Delta = Delta;
    type Output = MockOutput;

    fn tx_count(&self) -> usize {
        self.txs.len()
    }

    fn execute<R: ReadView<Key, Value>>(
        &self,
        tx: TxIndex,
        view: &mut R,
    ) -> Result<Execution<Key, Value, Delta, MockOutput>, VmError> {
        let t = &self.txs[tx];
        let mut h = tx as u64;
        let mut first = None;
        for key in &t.reads {
            let v = view.read(key)?;
            first.get_or_insert(v.unwrap_or(0));
            h = mix(h, v.map_or(u64::MAX, |v| v));
            let gated = self.sequence_gate.is_some() && t.sequence == t.reads.first().copied();
            if gated && first.is_some_and(|v| v % 2 == 0) {
                let output = MockOutput {
                    seen: h,
                    gas: 1,
                    cumulative: 0,
                };
                return Ok(Execution {
                    writes: Vec::new(),
                    output,
                });
            }
        }
        if first.is_some_and(|v| v % 2 == 1) {
            let v = view.read(&t.extra_read)?;
            h = mix(h, v.map_or(7, |v| v.wrapping_mul(3)));
        }
        let mut spin = h;
        for _ in 0..t.work {
            spin = black_box(mix(spin, 1));
        }
        if self.fail_modulo != 0 && h.is_multiple_of(self.fail_modulo) {
            return Err(VmError::BadData(format!("transaction {tx} saw digest {h}")));
        }
        if self.panic_modulo != 0 && h % self.panic_modulo == 1 {
            panic!("{PANIC_PREFIX}{tx}");
        }
        let mut writes: Vec<(Key, Write<Value, Delta>)> = Vec::new();
        for (i, key) in t.writes.iter().enumerate() {
            // The write set depends on the values read: some keys are skipped.
            if (h >> (i % 48)) & 3 != 0 && !writes.iter().any(|(k, _)| k == key) {
                writes.push((*key, Write::Put(mix(h, *key as u64) % 1000)));
            }
        }
        for (i, key) in t.deltas.iter().enumerate() {
            if !writes.iter().any(|(k, _)| k == key) {
                writes.push((*key, Write::Delta((h >> (i % 32)) % 50)));
            }
        }
        Ok(Execution {
            writes,
            output: MockOutput {
                seen: h,
                gas: h % 100,
                cumulative: 0,
            },
        })
    }

    fn apply_delta(&self, _key: &Key, value: Option<Value>, delta: &Delta) -> Option<Value> {
        match value {
            Some(v) => Some(v.wrapping_add(*delta)),
            // A zero credit to an absent key leaves it absent.
            None if *delta == 0 => None,
            None => Some(*delta),
        }
    }

    fn merge_deltas(&self, earlier: &mut Delta, later: &Delta) {
        *earlier = earlier.wrapping_add(*later);
    }

    fn finalize_outputs(&self, outputs: &mut [MockOutput]) -> Result<(), VmError> {
        let mut cumulative = 0;
        for o in outputs {
            cumulative += o.gas;
            o.cumulative = cumulative;
        }
        Ok(())
    }

    fn delta_sinks(&self) -> Vec<Key> {
        self.sinks.clone()
    }

    fn sequence_key(&self, tx: TxIndex) -> Option<Key> {
        self.txs[tx].sequence
    }

    /// A transaction's busy work in units of `LIGHT_WORK` (at least one).
    fn light_tx_equivalents_of(&self, tx: TxIndex) -> usize {
        (self.txs[tx].work / LIGHT_WORK).max(1) as usize
    }

    fn in_sequence(&self, _tx: TxIndex, value: Option<Value>) -> Option<Value> {
        match self.sequence_gate {
            Some(true) => Some(value.unwrap_or(0) | 1),
            _ => value,
        }
    }

    fn declared_access<R: ReadView<Key, Value>>(
        &self,
        tx: TxIndex,
        pre_block: &mut R,
    ) -> Vec<(Key, AccessKind)> {
        // Declaring reads what it declares, as the EVM's declarations read the sender's
        // and the recipient's accounts.
        for (key, _) in &self.txs[tx].declared {
            let _ = pre_block.read(key);
        }
        self.txs[tx].declared.clone()
    }
}

/// Pre-block state over keys `0..keys`: two keys in three exist before the block.
pub fn storage_for(keys: u32) -> InMemoryStorage<Key, Value> {
    (0..keys)
        .filter(|k| k % 3 != 2)
        .map(|k| (k, (k as u64 * 37) % 101))
        .collect()
}

/// A transaction over keys `0..keys` with up to this many reads, full writes and deltas.
pub fn tx_strategy(
    keys: u32,
    max_reads: usize,
    max_writes: usize,
    max_deltas: usize,
) -> impl Strategy<Value = MockTx> {
    (
        prop::collection::vec(0..keys, 0..=max_reads),
        0..keys,
        prop::collection::vec(0..keys, 0..=max_writes),
        prop::collection::vec(0..keys, 0..=max_deltas),
        0u32..2500,
        prop::option::of(0..keys),
    )
        .prop_map(|(reads, extra_read, writes, deltas, work, sequence)| {
            // A sequence key is mostly right (the first key read, written when a write
            // candidate), sometimes arbitrary: it is only a hint.
            let sequence = match (sequence, reads.first()) {
                (Some(k), Some(&first)) if k % 4 != 0 => Some(first),
                (s, _) => s,
            };
            MockTx {
                reads,
                extra_read,
                writes,
                deltas,
                work,
                declared: Vec::new(),
                sequence,
            }
        })
}

/// Up to `txs` transactions of up to 4 reads, 3 writes and `max_deltas` deltas.
pub fn block_strategy(
    keys: u32,
    txs: usize,
    max_deltas: usize,
) -> impl Strategy<Value = Vec<MockTx>> {
    prop::collection::vec(tx_strategy(keys, 4, 3, max_deltas), 0..=txs)
}
