//! Every engine of `EngineKind::ALL` on raw transfers, ERC20 transfers, Uniswap V2 swaps
//! and a fully dependent chain, 2 threads, at a moderate size (100 Mgas), for developers:
//! `cargo bench -p parex-workloads --bench engines` (criterion; not run in CI).
//!
//! Each engine's result is checked against `sequential` once before it is timed. For the
//! full matrix, with thread counts, read latency and mainnet blocks, use `parex bench`.

use criterion::{Criterion, criterion_group, criterion_main};
use parex_engine::EngineKind;
use parex_evm::EvmVm;
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, synthetic};

/// The allocator of the `parex` binary, so that these numbers match its.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const THREADS: usize = 2;
const GAS: u64 = 100_000_000;

fn bench(c: &mut Criterion) {
    for kind in [
        WorkloadKind::Raw,
        WorkloadKind::Erc20,
        WorkloadKind::Swap,
        WorkloadKind::Chain,
    ] {
        let w = synthetic::generate(&WorkloadSpec::new(kind, Size::Gas(GAS))).unwrap();
        let vm = EvmVm::new(&w.block);
        let (reference, _) = EngineKind::Sequential
            .execute(&vm, &w.pre_state, 1)
            .unwrap();
        let mut group = c.benchmark_group(format!("engines/{kind}"));
        group.sample_size(20);
        for &engine in EngineKind::ALL {
            let (outcome, _) = engine.execute(&vm, &w.pre_state, THREADS).unwrap();
            assert!(
                outcome == reference,
                "{engine} differs from sequential on {kind}"
            );
            group.bench_function(format!("{engine}/{THREADS}threads"), |b| {
                b.iter(|| engine.execute(&vm, &w.pre_state, THREADS).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
