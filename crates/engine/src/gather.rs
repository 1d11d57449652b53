//! Values made by parallel workers gathered into one vector, each value moved once.
//!
//! [`gather_into`] hands out the vector's spare capacity in disjoint blocks (a turn at one
//! lock when a block is taken and when it ends, not per value); each worker fills its
//! blocks from the start ([`Block::push`]); at the end the gaps that the blocks' unfilled
//! ends leave are closed by moving the values that lie past the total into them
//! (`close_gaps`), and the vector's length grows by the total. (Parts gathered per
//! worker and appended to the largest copied half of a block's state diff once more,
//! into memory touched for the first time, on one thread, after the workers were done.)
//!
//! Invariant: a slot of the spare capacity holds a value exactly when it is among the
//! first `filled` slots of a block, as recorded when the block was dropped. A block
//! that is never dropped (forgotten) stays recorded as empty: its values leak, and its
//! slots count as unfilled. Blocks cannot outlive the closure that takes them.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Mutex;

/// The spare capacity of a vector being gathered into (see [`gather_into`]).
pub struct Gather<'v, T> {
    handout: Mutex<Handout<'v, T>>,
}

/// What a [`Gather`] has handed out, under its one lock.
struct Handout<'v, T> {
    /// The slots not handed out yet: those from the end of the last block on.
    free: &'v mut [MaybeUninit<T>],
    /// Every block handed out, in order from slot 0, with how many of its slots were
    /// filled once it ended.
    blocks: Vec<(Range<usize>, usize)>,
}

/// `len` consecutive slots of a [`Gather`], filled from the start.
pub struct Block<'g, 'v, T> {
    gather: &'g Gather<'v, T>,
    /// Its position in the gather's list of blocks.
    index: usize,
    slots: &'v mut [MaybeUninit<T>],
    filled: usize,
}

impl<'v, T> Gather<'v, T> {
    /// A block of `len` slots, or `None` if fewer remain (the caller keeps such values
    /// apart).
    pub fn block(&self, len: usize) -> Option<Block<'_, 'v, T>> {
        let mut handout = self.handout.lock().unwrap_or_else(|e| e.into_inner());
        if handout.free.len() < len {
            return None;
        }
        let (slots, rest) = std::mem::take(&mut handout.free).split_at_mut(len);
        handout.free = rest;
        let start = handout.blocks.last().map_or(0, |(block, _)| block.end);
        handout.blocks.push((start..start + len, 0));
        Some(Block {
            gather: self,
            index: handout.blocks.len() - 1,
            slots,
            filled: 0,
        })
    }
}

impl<T> Block<'_, '_, T> {
    /// Moves `value` into the next slot; gives it back if the block is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        match self.slots.get_mut(self.filled) {
            Some(slot) => {
                slot.write(value);
                self.filled += 1;
                Ok(())
            }
            None => Err(value),
        }
    }
}

impl<T> Drop for Block<'_, '_, T> {
    fn drop(&mut self) {
        let mut handout = self
            .gather
            .handout
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        handout.blocks[self.index].1 = self.filled;
    }
}

/// Runs `fill` with up to `room` slots of spare capacity of `out` to hand out in blocks
/// (from any number of threads), then appends to `out` every value the blocks received.
/// The order of the appended values is unspecified.
pub fn gather_into<T, R>(
    out: &mut Vec<T>,
    room: usize,
    fill: impl for<'g> FnOnce(&'g Gather<'_, T>) -> R,
) -> R {
    out.reserve(room);
    let before = out.len();
    let (result, blocks) = {
        let gather = Gather {
            handout: Mutex::new(Handout {
                free: &mut out.spare_capacity_mut()[..room],
                blocks: Vec::new(),
            }),
        };
        let result = fill(&gather);
        // Every block borrowed `gather` inside `fill`, so all of them have ended (or were
        // forgotten, and stay empty).
        let handout = gather
            .handout
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        (result, handout.blocks)
    };
    let total = close_gaps(&mut out.spare_capacity_mut()[..room], &blocks);
    // SAFETY: the blocks are disjoint ranges of these `room` slots, handed out one after
    // the other from slot 0; a block's recorded count is the number of slots from its
    // start that `Block::push` wrote (recorded when it was dropped; 0 for a block never
    // dropped); `close_gaps` only swapped slots, so that the first `total` of them (the
    // sum of the counts) hold values (its contract, tested in
    // `closing_gaps_keeps_every_written_value_and_nothing_else`). Nothing else wrote the
    // spare capacity, and `out` was not touched in between (it is borrowed for the call).
    unsafe { out.set_len(before + total) };
    result
}

/// Closes the gaps that parallel writers left in `slots`: `blocks` are disjoint ranges of
/// `slots`, each with how many of its first slots were written, and together they cover
/// the first slots up to the last block's end. Swaps written slots from past the total
/// into unwritten ones before it, so that the first `total` slots are the written ones
/// (in some order), and returns `total`. Only slots are swapped: nothing is read,
/// dropped or lost.
fn close_gaps<T>(slots: &mut [MaybeUninit<T>], blocks: &[(Range<usize>, usize)]) -> usize {
    let total: usize = blocks.iter().map(|(_, filled)| filled).sum();
    // Unwritten slots before `total`, and written ones from `total` on: as many of each.
    let holes = blocks
        .iter()
        .flat_map(|(block, filled)| block.start + filled..block.end.min(total));
    let mut strays = blocks
        .iter()
        .flat_map(|(block, filled)| block.start.max(total)..block.start + filled);
    for hole in holes {
        let stray = strays.next().expect("as many strays as holes");
        slots.swap(hole, stray);
    }
    debug_assert!(strays.next().is_none());
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Blocks of a vector's spare capacity, handed out in any order and each partly
        /// written, become one vector holding exactly the written values.
        #[test]
        fn closing_gaps_keeps_every_written_value_and_nothing_else(
            blocks in prop::collection::vec((0usize..40, 0.0f64..=1.0), 0..12),
            rotate in 0usize..12,
        ) {
            let len: usize = blocks.iter().map(|(len, _)| len).sum();
            let mut values: Vec<String> = Vec::with_capacity(len);
            let slots = &mut values.spare_capacity_mut()[..len];
            let (mut offset, mut written, mut expected) = (0, Vec::new(), Vec::new());
            for (b, &(block_len, share)) in blocks.iter().enumerate() {
                let filled = (block_len as f64 * share) as usize;
                for i in 0..filled {
                    let value = format!("{b}.{i}");
                    slots[offset + i].write(value.clone());
                    expected.push(value);
                }
                written.push((offset..offset + block_len, filled));
                offset += block_len;
            }
            // Writers report in any order, not in the order they claimed blocks.
            let turn = rotate % written.len().max(1);
            written.rotate_left(turn);
            let total = close_gaps(slots, &written);
            prop_assert_eq!(total, expected.len());
            // SAFETY: the test wrote the first `filled` slots of each disjoint block, and
            // `close_gaps` moved them to the first `total` slots (what is checked here: a
            // slot left unwritten would not hold one of the expected strings).
            unsafe { values.set_len(total) };
            values.sort();
            expected.sort();
            prop_assert_eq!(values, expected);
        }

        /// Threads that take blocks of any size (some refused for want of room, some
        /// forgotten half full) leave the vector holding what it held and exactly the
        /// values pushed into blocks that ended, once each (strings: a value read from an
        /// unwritten slot or dropped twice would fail or crash the test).
        #[test]
        fn gathered_values_are_every_pushed_value_once(
            held in 0usize..5,
            room in 0usize..200,
            plans in prop::collection::vec(
                prop::collection::vec((0usize..30, 0usize..35, any::<bool>()), 0..6),
                1..4,
            ),
        ) {
            let mut out: Vec<String> = (0..held).map(|i| format!("held {i}")).collect();
            let kept = gather_into(&mut out, room, |gather| {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = plans
                        .iter()
                        .enumerate()
                        .map(|(t, plan)| {
                            scope.spawn(move || {
                                let mut kept = Vec::new();
                                for (b, &(len, pushes, forget)) in plan.iter().enumerate() {
                                    let values = (0..pushes).map(|i| format!("{t}.{b}.{i}"));
                                    let Some(mut block) = gather.block(len) else {
                                        continue;
                                    };
                                    for value in values {
                                        match block.push(value.clone()) {
                                            Ok(()) if !forget => kept.push(value),
                                            Ok(()) => {}
                                            Err(back) => prop_assert_eq!(back, value),
                                        }
                                    }
                                    if forget {
                                        std::mem::forget(block);
                                    }
                                }
                                Ok(kept)
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .collect::<Result<Vec<_>, _>>()
                })
            })?;
            let mut expected: Vec<String> = (0..held).map(|i| format!("held {i}")).collect();
            expected.extend(kept.into_iter().flatten());
            prop_assert_eq!(&out[..held], &expected[..held]);
            out.sort();
            expected.sort();
            prop_assert_eq!(out, expected);
        }
    }
}
