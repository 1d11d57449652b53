//! `parex analyze`: the dependency structure a block really has, from a serial run's
//! read and write sets (see `parex_engine::analyze`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use parex_core::{InMemoryStorage, StateKey, StateValue, TxOutcome};
use parex_engine::analyze::{BlockAnalysis, analyze};
use parex_evm::{EvmBlock, EvmVm};
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, mainnet, synthetic};
use serde_json::json;

/// Thread counts at which the list-scheduling bound is reported.
pub const BOUND_THREADS: [usize; 3] = [2, 8, 32];

#[derive(Args)]
pub struct AnalyzeArgs {
    /// A mainnet block directory in the plain layout (block.json, pre_state.json; e.g.
    /// ../shared/data/mainnet/blocks/46147), or a data set holding several blocks together
    /// with --block.
    #[arg(conflicts_with = "workload")]
    block_dir: Option<PathBuf>,
    /// Block number to analyze: from BLOCK_DIR's data set, or, without BLOCK_DIR, from the
    /// built-in compact data set (data/mainnet).
    #[arg(long, conflicts_with = "workload")]
    block: Option<u64>,
    /// Analyze a generated workload block instead: raw, erc20, swap, mix or chain.
    #[arg(long, value_parser = crate::workload_names())]
    workload: Option<WorkloadKind>,
    /// Workload size in transactions [default: 10000 when --gas is not given].
    #[arg(long, requires = "workload", conflicts_with = "gas", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    txs: Option<u64>,
    /// Workload size in total gas (e.g. 1G).
    #[arg(long, requires = "workload", value_parser = crate::parse_gas)]
    gas: Option<u64>,
    /// Accounts in the workload's population (10% hot); default: enough for every cold
    /// pick to be fresh.
    #[arg(long, requires = "workload", value_parser = clap::value_parser!(u64).range(2..=100_000_000))]
    accounts: Option<u64>,
    /// Probability that an account (or pool) a transaction picks is a hot one.
    #[arg(long, requires = "workload", default_value_t = 0.0, value_parser = crate::parse_ratio, allow_negative_numbers = true)]
    hot_ratio: f64,
    /// Seed of the workload generator.
    #[arg(long, requires = "workload", default_value_t = 1)]
    seed: u64,
    /// How many of the hottest keys to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also write the analysis as a JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// An analysed block with a name for it.
pub struct Report {
    pub source: String,
    pub analysis: BlockAnalysis<StateKey>,
}

/// Analyses an EVM block: dependencies from a serial run, weighted by gas used.
pub fn analyze_block(
    source: String,
    block: &EvmBlock,
    pre_state: &InMemoryStorage<StateKey, StateValue>,
    top: usize,
) -> Result<Report> {
    let vm = EvmVm::with_pre_block(block, pre_state);
    let analysis = analyze(&vm, pre_state, |o: &TxOutcome| o.gas_used, top)
        .with_context(|| format!("cannot execute {source}"))?;
    Ok(Report { source, analysis })
}

/// A state key for people: `account 0x…`, `slot 0x…[generation] 0x…`, `code 0x…`,
/// `balance 0x…` (a contract's balance, kept apart from its account).
pub fn key_name(key: &StateKey) -> String {
    match key {
        StateKey::Account(a) => format!("account {a}"),
        StateKey::Slot(a, 0, s) => format!("slot {a} {s:#x}"),
        StateKey::Slot(a, g, s) => format!("slot {a} (storage generation {g}) {s:#x}"),
        StateKey::Code(h) => format!("code {h}"),
        StateKey::Balance(a) => format!("balance {a}"),
    }
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        let g = &self.analysis.graph;
        let bounds: serde_json::Map<String, serde_json::Value> = BOUND_THREADS
            .iter()
            .map(|t| (t.to_string(), json!(g.speedup_bound(*t))))
            .collect();
        json!({
            "source": self.source,
            "txs": g.txs(),
            "total_gas": g.total_gas(),
            "dependent_txs": g.dependent_txs(),
            "dependent_ratio": g.dependent_ratio(),
            "dependencies": g.dependencies(),
            "critical_path_txs": g.critical_path_txs(),
            "critical_path_gas": g.critical_path_gas(),
            "ideal_speedup": g.ideal_speedup(),
            "speedup_bound_at": bounds,
            "dependency_distance_histogram": g.distance_histogram().iter().map(|b| json!({
                "min": b.min, "max": b.max, "count": b.count,
            })).collect::<Vec<_>>(),
            "hot_keys": self.analysis.hot_keys.iter().map(|k| json!({
                "key": key_name(&k.key),
                "writers": k.writers,
                "dependent_reads": k.dependent_reads,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn print(&self) {
        let g = &self.analysis.graph;
        out!("source              {}", self.source);
        out!("transactions        {}", g.txs());
        out!("total gas           {}", g.total_gas());
        out!(
            "dependent txs       {} ({:.1}%), {} direct dependencies",
            g.dependent_txs(),
            g.dependent_ratio() * 100.0,
            g.dependencies()
        );
        out!(
            "critical path       {} txs, {} gas",
            g.critical_path_txs(),
            g.critical_path_gas()
        );
        out!(
            "ideal speedup       {:.2}x (total gas / critical-path gas)",
            g.ideal_speedup()
        );
        for t in BOUND_THREADS {
            out!(
                "bound at {t:<2} threads {:.2}x (greedy list schedule, weights = gas)",
                g.speedup_bound(t)
            );
        }
        let histogram = g.distance_histogram();
        if !histogram.is_empty() {
            out!("dependency distances (j - i per read-after-write dependency)");
            for b in histogram {
                let range = if b.min == b.max {
                    b.min.to_string()
                } else {
                    format!("{}-{}", b.min, b.max)
                };
                out!("  {range:>13}  {}", b.count);
            }
        }
        if self.analysis.hot_keys.is_empty() {
            out!("hot keys            none (no key is written twice or read after a write)");
        } else {
            out!("hot keys (dependent reads, writers)");
            for k in &self.analysis.hot_keys {
                out!(
                    "  {:>6} {:>6}  {}",
                    k.dependent_reads,
                    k.writers,
                    key_name(&k.key)
                );
            }
        }
    }
}

/// Loads block `number` (or the only block) of the data set at `dir`.
pub fn load_mainnet_block(
    dir: &std::path::Path,
    number: Option<u64>,
) -> Result<mainnet::MainnetBlock> {
    let source = mainnet::Source::open(dir)
        .with_context(|| format!("cannot read mainnet data from {}", dir.display()))?;
    let numbers = source.numbers();
    let wanted = match number {
        Some(n) if numbers.contains(&n) => n,
        Some(n) => bail!(
            "block {n} is not in {} (it has {} blocks: {}{})",
            dir.display(),
            numbers.len(),
            numbers
                .iter()
                .take(8)
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if numbers.len() > 8 { ", ..." } else { "" }
        ),
        None if numbers.len() == 1 => numbers[0],
        None => bail!(
            "{} holds {} blocks; pick one with --block N",
            dir.display(),
            numbers.len()
        ),
    };
    let (_, block) = source
        .load_all()
        .into_iter()
        .find(|(n, _)| *n == wanted)
        .expect("a listed block");
    block.with_context(|| format!("cannot load block {wanted} from {}", dir.display()))
}

pub fn cmd_analyze(args: AnalyzeArgs) -> Result<ExitCode> {
    let report = if let Some(kind) = args.workload {
        let size = match (args.txs, args.gas) {
            (_, Some(g)) => Size::Gas(g),
            (Some(t), None) => Size::Txs(t as usize),
            (None, None) => Size::Txs(10_000),
        };
        let spec = WorkloadSpec {
            kind,
            size,
            accounts: args.accounts.map(|a| a as usize),
            hot_ratio: args.hot_ratio,
            seed: args.seed,
        };
        let workload = synthetic::generate(&spec).context("cannot build the workload")?;
        let source = format!(
            "workload {kind} (hot ratio {}, {} txs, seed {})",
            spec.hot_ratio,
            workload.block.txs.len(),
            spec.seed
        );
        analyze_block(source, &workload.block, &workload.pre_state, args.top)?
    } else {
        let dir = match (&args.block_dir, args.block) {
            (Some(dir), _) => dir.clone(),
            (None, Some(_)) => mainnet::builtin_dir(),
            (None, None) => bail!(
                "nothing to analyze: give a block directory, --block N (built-in data set) or --workload W"
            ),
        };
        let block = load_mainnet_block(&dir, args.block)?;
        analyze_block(
            format!("block {}", block.number),
            &block.block,
            &block.pre_state,
            args.top,
        )?
    };
    report.print();
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report.to_json())? + "\n",
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
