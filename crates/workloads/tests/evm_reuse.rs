//! The EVM Vm reuses one revm EVM per thread and attaches the engine's view to it for each
//! call (the crate's one `unsafe`): a view that panics mid-execution must not leave a
//! dangling view or stale state behind for the next call on the same thread.

use std::panic::{AssertUnwindSafe, catch_unwind};

use parex_core::{ReadError, ReadView, StateKey, StateValue, Storage, Vm};
use parex_evm::EvmVm;
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, synthetic};

/// Reads the pre-block state; panics on read number `panic_at`.
struct Flaky<'a, S> {
    storage: &'a S,
    reads: usize,
    panic_at: usize,
}

impl<S: Storage<Key = StateKey, Value = StateValue>> ReadView<StateKey, StateValue>
    for Flaky<'_, S>
{
    fn read(&mut self, key: &StateKey) -> Result<Option<StateValue>, ReadError> {
        self.reads += 1;
        assert!(
            self.reads != self.panic_at,
            "view failure injected at read {}",
            self.reads
        );
        Ok(self.storage.read(key)?)
    }
}

#[test]
fn a_panicking_view_leaves_nothing_behind() {
    let w = synthetic::generate(&WorkloadSpec::new(WorkloadKind::Swap, Size::Txs(4))).unwrap();
    let vm = EvmVm::new(&w.block);
    // Writes sorted by key (their order carries no meaning: each key is written once).
    let fresh = |tx| {
        let mut view = Flaky {
            storage: &w.pre_state,
            reads: 0,
            panic_at: usize::MAX,
        };
        let mut writes = vm.execute(tx, &mut view).unwrap().writes;
        writes.sort_by_key(|w| w.0);
        writes
    };
    let expected: Vec<_> = (0..4).map(fresh).collect();
    for panic_at in [1, 2, 5, 9] {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut view = Flaky {
                storage: &w.pre_state,
                reads: 0,
                panic_at,
            };
            vm.execute(0, &mut view)
        }));
        assert!(outcome.is_err(), "the view panicked at read {panic_at}");
        // The same thread executes again, with a new view: same result as a fresh run.
        for (tx, writes) in expected.iter().enumerate() {
            assert_eq!(
                &fresh(tx),
                writes,
                "tx {tx} after a panic at read {panic_at}"
            );
        }
    }
}
