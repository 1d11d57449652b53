//! Every mainnet block, executed by the sequential engine, matches its header.

use std::path::PathBuf;

use parex_engine::EngineKind;
use parex_workloads::mainnet::{MainnetBlock, Source, builtin_dir};
use parex_workloads::verify::check_block;

fn load(dir: &std::path::Path) -> Vec<MainnetBlock> {
    load_where(dir, |_| true)
}

/// The blocks of `dir` whose number `wanted` accepts.
fn load_where(dir: &std::path::Path, wanted: impl Fn(u64) -> bool) -> Vec<MainnetBlock> {
    let source = Source::open(dir).expect("data directory opens");
    source
        .load_where(wanted)
        .into_iter()
        .map(|(n, b)| b.unwrap_or_else(|e| panic!("block {n}: {e}")))
        .collect()
}

/// These blocks of the built-in copy.
fn builtin_blocks(numbers: &[u64]) -> Vec<MainnetBlock> {
    let blocks = load_where(&builtin_dir(), |n| numbers.contains(&n));
    assert_eq!(blocks.len(), numbers.len());
    blocks
}

/// The plain data set beside the repository (present in development and CI, absent in
/// a user's clone).
fn shared_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mainnet");
    dir.is_dir().then_some(dir)
}

#[test]
fn builtin_copy_passes_every_block_with_sequential() {
    let blocks = load(&builtin_dir());
    assert_eq!(
        blocks.len(),
        51,
        "the built-in copy holds the 51 blocks of the data set"
    );
    let mut unchecked_roots = 0;
    let mut txs = 0;
    for block in &blocks {
        let check = check_block(block, EngineKind::Sequential, 1).expect("executes");
        assert!(
            check.passed(),
            "block {}: {}",
            block.number,
            check.mismatches(block)
        );
        assert_eq!(check.outcome.invalid_count(), 0, "block {}", block.number);
        txs += check.txs;
        if check.receipts_root_matches.is_none() {
            unchecked_roots += 1;
        }
    }
    assert_eq!(txs, 14_130);
    assert_eq!(
        unchecked_roots, 11,
        "exactly the pre-Byzantium blocks skip the receipts root"
    );
}

#[test]
fn plain_layout_gives_the_same_results_as_the_compact_copy() {
    let Some(dir) = shared_dir() else {
        eprintln!("../shared/data/mainnet not present: comparison with the plain layout skipped");
        return;
    };
    let plain = load(&dir);
    let compact = load(&builtin_dir());
    assert_eq!(plain.len(), compact.len());
    for (p, c) in plain.iter().zip(&compact) {
        assert_eq!(p.number, c.number);
        let (pc, cc) = (
            check_block(p, EngineKind::Sequential, 1).unwrap(),
            check_block(c, EngineKind::Sequential, 1).unwrap(),
        );
        assert!(pc.passed(), "block {}: {}", p.number, pc.mismatches(p));
        assert_eq!(pc.state_diff_hash, cc.state_diff_hash, "block {}", p.number);
        assert_eq!(
            pc.outcome.tx_outcomes, cc.outcome.tx_outcomes,
            "block {}",
            p.number
        );
    }
}

#[test]
fn a_single_block_directory_can_be_verified() {
    let Some(dir) = shared_dir() else { return };
    let blocks = load(&dir.join("blocks/5526571"));
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].number, 5_526_571);
    assert!(
        check_block(&blocks[0], EngineKind::Sequential, 1)
            .unwrap()
            .passed()
    );
}

#[test]
fn senders_recover_from_signatures_across_forks() {
    let blocks = load(&builtin_dir());
    for block in blocks
        .iter()
        .filter(|b| [46_147, 2_675_000, 12_244_000, 19_426_586].contains(&b.number))
    {
        block.recover_senders().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_wrong_sender_or_header_is_detected() {
    let mut blocks = load(&builtin_dir());
    let block = blocks.iter_mut().find(|b| b.number == 12_244_000).unwrap();
    block.signed[3].1 = alloy_primitives::Address::repeat_byte(7);
    let err = block.recover_senders().unwrap_err().to_string();
    assert!(
        err.contains("transaction 3") && err.contains("differs"),
        "{err}"
    );

    block.expected.receipts_root = alloy_primitives::B256::repeat_byte(1);
    let check = check_block(block, EngineKind::Sequential, 1).unwrap();
    assert!(!check.passed());
    assert!(check.mismatches(block).contains("receipts root"));
}

/// `block-stm` runs a sender's run of light transactions as one unit, so its up-front
/// chain check judges the pairs between units: 8889776, which opens with 40 payouts of
/// one sender and goes on with independent transfers, is speculated on there (a chain by
/// transaction pairs, for `optimistic`), while 11814555 and 5891667, one sender's run
/// throughout their first 64 transactions, run in order in both. Every result passes.
#[test]
fn block_stm_judges_a_chain_by_its_units() {
    let wanted = [5_891_667, 8_889_776, 11_814_555];
    let blocks = builtin_blocks(&wanted);
    for block in &blocks {
        let speculates = block.number == 8_889_776;
        for (engine, fallback) in [
            (EngineKind::BlockStm, !speculates),
            (EngineKind::Optimistic, true),
        ] {
            let check = check_block(block, engine, 2).expect("executes");
            assert!(check.passed(), "{engine} on {}", block.number);
            assert_eq!(
                check.metrics.extra("sequential_fallback"),
                Some(u64::from(fallback)),
                "{engine} on {}: {:?}",
                block.number,
                check.metrics
            );
        }
    }
}

/// `block-stm` starts the transactions that weigh a large share of its block, or would end
/// it, first, out of turn: 19929064's transaction 91 (2.5 Mgas of limit, about 40% of the
/// block's time) and its transaction 2; 18426253's four that weigh at least 5% of its gas
/// limits (one of them, transaction 138, takes half the block's time); none of 4370000's
/// (none weighs 2%). Every result passes its header.
#[test]
fn block_stm_starts_heavy_transactions_first() {
    let wanted = [(4_370_000, 0), (18_426_253, 4), (19_929_064, 2)];
    assert_extra_per_block(&wanted, &[EngineKind::BlockStm], "heavy_first");
}

/// A block too small to give two workers 64 transactions each gets its second worker by its
/// transactions' weight, counted twice when they weigh two light ones or more on average
/// (contract calls): 19923400 (24 calls) and 19933122 (45) run on two workers in the engines
/// that judge blocks by their work; 6196166 (108 calls worth 126 light ones, two chains into
/// two contracts) stays on one, in order. Every result passes its header.
#[test]
fn small_blocks_of_calls_get_a_second_worker_by_weight() {
    let wanted = [(19_923_400, 2), (19_933_122, 2), (6_196_166, 1)];
    let engines = [EngineKind::BlockStm, EngineKind::Optimistic];
    assert_extra_per_block(&wanted, &engines, "workers");
}

/// Each of the `wanted` built-in blocks (number, expected value), executed by each of
/// `engines` on 2 threads, passes its header and reports metric `extra` with that value.
fn assert_extra_per_block(wanted: &[(u64, u64)], engines: &[EngineKind], extra: &str) {
    let numbers: Vec<u64> = wanted.iter().map(|(number, _)| *number).collect();
    for block in &builtin_blocks(&numbers) {
        let (_, value) = wanted.iter().find(|(n, _)| *n == block.number).unwrap();
        for &engine in engines {
            let check = check_block(block, engine, 2).expect("executes");
            assert!(check.passed(), "block {} ({engine:?})", block.number);
            assert_eq!(
                check.metrics.extra(extra),
                Some(*value),
                "block {} ({engine:?}): {:?}",
                block.number,
                check.metrics
            );
        }
    }
}
