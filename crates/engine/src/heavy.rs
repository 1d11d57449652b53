//! Heavy transactions first: the units of a block that a worker executes first, out of
//! turn, because in block order they would start late and end the block alone. Engines
//! that hand out transactions in block order (`block-stm`'s scheduler, `optimistic`'s
//! pre-executors) have the last worker claim these first; whoever reaches one in order
//! after it was claimed passes over it. Only the order of the work changes: each engine
//! validates such an execution as any other.

use parex_core::{TxIndex, Vm};

/// A unit that weighs at least this share of its block's work is executed first...
const HEAVY_FIRST_SHARE: f64 = 0.05;
/// ...and so is one that weighs at least this share and would, in block order, finish
/// after the rest of the block...
const LATE_HEAVY_SHARE: f64 = 0.02;
/// ...the heaviest this many at most.
const MAX_HEAVY_FIRST: usize = 8;

/// The units that the last worker executes first, out of turn, in block order (each one
/// it finds not yet claimed): those heavier than a light transaction
/// ([`Vm::light_tx_equivalents_of`]) and not among the first `workers` units (which start
/// at once anyway) that weigh at least `HEAVY_FIRST_SHARE` of the block, or at least
/// `LATE_HEAVY_SHARE` when in block order they would finish after everything else (with
/// `workers` sharing the work before a unit, it ends last when `workers - 1` times its
/// weight exceeds the weight after it). In block order a heavy unit starts only when the
/// index reaches it, and then runs alone at the end: mainnet 19929064's transaction 91
/// (2.4 of 6.1 ms) started 2.25 ms into the block, which ran at 1.01x of `sequential`
/// against a bound of 1.71x. Gas limits are a rough weight (18426253's transaction 138 takes
/// half the block's time and ranks third by gas limit, behind two that take at most 0.5 ms
/// each), so more than the heaviest one is taken; a wrong pick costs little, as another
/// worker reaching it in order finds it claimed and moves on. Exact either way:
/// `block-stm` validates the execution in order (one that read what an earlier one then
/// wrote runs again), `optimistic` merges it only if what it read still holds.
pub(crate) fn heavy_first<V: Vm>(vm: &V, workers: usize) -> Box<[TxIndex]> {
    let weights: Vec<usize> = (0..vm.tx_count())
        .map(|unit| vm.light_tx_equivalents_of(unit))
        .collect();
    let total = weights.iter().sum::<usize>() as f64;
    let mut after = total;
    let mut heavy: Vec<TxIndex> = Vec::new();
    for (unit, &weight) in weights.iter().enumerate() {
        let w = weight as f64;
        after -= w;
        let ends_last = (workers - 1) as f64 * w >= after;
        if unit >= workers
            && weight > 1
            && (w >= HEAVY_FIRST_SHARE * total || (ends_last && w >= LATE_HEAVY_SHARE * total))
        {
            heavy.push(unit);
        }
    }
    if heavy.len() > MAX_HEAVY_FIRST {
        heavy.sort_by_key(|&unit| std::cmp::Reverse(weights[unit]));
        heavy.truncate(MAX_HEAVY_FIRST);
        heavy.sort_unstable();
    }
    heavy.into()
}
