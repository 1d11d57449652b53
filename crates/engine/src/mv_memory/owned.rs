//! Owner lists: the writes of a transaction under keys of buckets that it alone wrote,
//! kept as the list its execution returned instead of in the shards (fast storage; the
//! engine opts in with [`super::MvMemory::with_owners`] and publishes each incarnation's
//! writes whole with [`super::MvMemory::publish`]).
//!
//! In a block whose transactions touch keys of their own (transfers between fresh
//! accounts, most token transfers), nearly every key is written once: filing it in a
//! shard was a lookup in the shard's table of positions and a 192-byte state pushed into
//! one of 256 vectors, for a value that no other transaction reads. Here the list the
//! execution returned is kept as it is, and a bucket's writer cell ([`super::Writers`])
//! says where a key's entries are:
//!
//! * none: no entry anywhere; one transaction `f` (alone): only in `f`'s list (if `f`
//!   wrote that key of the bucket at all); many: only in the shards.
//! * A second writer of a bucket owned by `f` first marks the cell *migrating*, copies
//!   `f`'s entries of the bucket from `f`'s list into the shards (flagging them in the list),
//!   then marks it *many*. Readers and writers that find a bucket migrating wait for it.
//! * A transaction replaces its list whole when it publishes an incarnation (under the
//!   list's lock), then files in the shards every entry whose bucket is no longer its
//!   own; an abort flags the list, so that its entries read as estimates.
//!
//! Locks are taken in one order, slot (the engine's), then list, then shard; nobody
//! waits for a migrating cell while holding a list or a shard lock, so the migrator, who
//! holds the owner's list and then shards, always gets through.

use parex_core::{TxIndex, Write};

use super::{Entry, Incarnation};

/// One transaction's latest published writes.
pub(super) struct Owned<K, V, D> {
    pub(super) incarnation: Incarnation,
    /// The incarnation was aborted: its entries read as estimates.
    pub(super) aborted: bool,
    pub(super) writes: Vec<(K, Write<V, D>)>,
    /// The memory's hash of each write's key.
    pub(super) hashes: Vec<u64>,
    /// Whether each write is filed elsewhere (in the shards, or a delta sink's lanes), not
    /// here: readers and the final drain skip it.
    pub(super) elsewhere: Vec<bool>,
}

impl<K, V, D> Default for Owned<K, V, D> {
    fn default() -> Self {
        Self {
            incarnation: 0,
            aborted: false,
            writes: Vec::new(),
            hashes: Vec::new(),
            elsewhere: Vec::new(),
        }
    }
}

/// What an owner list holds for a key.
pub(super) enum Found<'a, V, D> {
    /// No write of the key here (or not any more: it was moved to the shards).
    Nothing,
    /// Moved to the shards since the caller read the bucket's cell: look again.
    Moved,
    Entry(Incarnation, bool, &'a Write<V, D>),
}

impl<K: Eq, V: Clone, D: Clone> Owned<K, V, D> {
    /// The list's write of `key` (of hash `hash`).
    pub(super) fn find(&self, key: &K, hash: u64) -> Found<'_, V, D> {
        for (i, h) in self.hashes.iter().enumerate() {
            if *h == hash && self.writes[i].0 == *key {
                if self.elsewhere[i] {
                    return Found::Moved;
                }
                return Found::Entry(self.incarnation, self.aborted, &self.writes[i].1);
            }
        }
        Found::Nothing
    }

    /// The shard entry that stands for write `i` of this list.
    pub(super) fn entry(&self, i: usize) -> Entry<V, D> {
        entry_of(self.incarnation, self.aborted, &self.writes[i].1)
    }
}

/// The shard entry of a write of `incarnation` (an estimate if it was aborted).
pub(super) fn entry_of<V: Clone, D: Clone>(
    incarnation: Incarnation,
    aborted: bool,
    write: &Write<V, D>,
) -> Entry<V, D> {
    match write {
        _ if aborted => Entry::Estimate,
        Write::Put(value) => Entry::Write(incarnation, value.clone()),
        Write::Delta(delta) => Entry::Delta(incarnation, delta.clone()),
    }
}

/// The transactions whose lists a drain claim takes at a time.
pub(super) const LISTS_PER_CLAIM: usize = 64;

/// Claims of lists for `txs` transactions.
pub(super) fn claims(txs: usize) -> usize {
    txs.div_ceil(LISTS_PER_CLAIM)
}

/// The transactions of claim `claim`.
pub(super) fn claimed(claim: usize, txs: usize) -> std::ops::Range<TxIndex> {
    let first = claim * LISTS_PER_CLAIM;
    first..(first + LISTS_PER_CLAIM).min(txs)
}
