//! `parex bench`: every engine on a matrix of workloads, sizes, thread counts and read
//! latencies (plus the built-in mainnet blocks), side by side in one process.
//!
//! Per *group* (one block at one read latency): every run — `sequential` once and each
//! other engine at each thread count — is executed once as warm-up, then in interleaved
//! rounds (each round runs every engine once, so drift hits all of them alike, each round
//! starting one run further along, so that no engine always runs in the same place): at least
//! `repeat` rounds, and more until `sequential`'s timed runs add up to `min_time` (at most
//! `MAX_ROUNDS_PER_REPEAT` times `repeat`), so that a block of a fraction of a millisecond
//! gets enough runs for one slow moment of the machine not to decide its median.
//! Every run's outcome must equal `sequential`'s warm-up outcome (per-transaction outcomes
//! and state diff) or the engine's cell is dropped and the command fails at the end,
//! naming the cell and the engine. Beside each engine's speedup (medians' ratio) go the
//! quartiles of its per-round speedups: a round's runs are back to back, so their ratio is
//! what the machine's drift disturbs least, and the quartiles' spread is the noise.
//!
//! Each round also runs, for every thread count T above one, `sequential` on T threads at
//! once ([`sequential_copies`]): T x `sequential`'s median over theirs is the machine's
//! ceiling at T threads on that block, reported beside every engine's speedup.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use parex_core::outcome::EvmBlockOutcome;
use parex_core::{InMemoryStorage, LatencyStorage, StateKey, StateValue, Storage};
use parex_engine::EngineKind;
use parex_evm::{EvmBlock, EvmVm};
use parex_report::geomean;
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, mainnet, synthetic};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::analyze::analyze_block;

mod processes;

#[derive(Args)]
pub struct BenchArgs {
    /// Engines to compare, comma-separated [default: all]. `sequential` always runs: it is
    /// the reference every result is checked against and the base of every speedup.
    #[arg(long, value_delimiter = ',', value_parser = crate::engine_names())]
    engines: Vec<EngineKind>,
    /// Workloads, comma-separated, each NAME or NAME@HOT_RATIO (raw, erc20, swap, mix,
    /// chain; e.g. mix@0.3) [default: raw,erc20,swap,mix,mix@0.3,chain; with --quick
    /// raw,erc20,swap,mix@0.3,chain].
    #[arg(long, value_delimiter = ',', value_parser = parse_workload)]
    workloads: Vec<(WorkloadKind, f64)>,
    /// Worker thread counts, comma-separated [default: 1 and the available cores; with
    /// --quick the available cores]. `sequential` ignores threads: its one measurement per
    /// repeat is reported at every thread count.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Vec<u64>,
    /// Block sizes in total gas, comma-separated (e.g. 1G,100M).
    #[arg(long, value_delimiter = ',', value_parser = crate::parse_gas)]
    gas: Vec<u64>,
    /// Block sizes in transactions, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    txs: Vec<u64>,
    /// Read latencies of pre-block state in microseconds, comma-separated (each at most
    /// 1000000).
    ///
    /// With none of --gas, --txs, --latency-us the plan is: 1G gas and 1000 txs at 0 us, and
    /// 1000 txs at 100 us (--quick: 2000 txs at 0 us, 200 txs at 100 us). With any of them,
    /// every size runs at every latency (sizes default to that plan's sizes, latencies to 0).
    /// Mainnet blocks always run at 0 us.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(0..=crate::MAX_LATENCY_US))]
    latency_us: Vec<u64>,
    /// Timed runs per engine and cell, after one warm-up run, at least [default: 5; --quick:
    /// 3]; see --min-time-ms.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    repeat: Option<u64>,
    /// Keep adding rounds (every engine once) until sequential's timed runs of a cell add
    /// up to this many milliseconds, up to 100 times --repeat rounds [default: 200; --quick:
    /// 50]. Short blocks (most mainnet blocks take 0.1 to 15 ms) then get dozens of runs;
    /// 0 runs exactly --repeat rounds.
    #[arg(long)]
    min_time_ms: Option<u64>,
    /// A small matrix that finishes in about a minute on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Skip the built-in mainnet blocks.
    #[arg(long, conflicts_with = "blocks")]
    no_mainnet: bool,
    /// Only these built-in mainnet blocks, comma-separated block numbers (and no synthetic
    /// workload unless --workloads names some).
    #[arg(long, value_delimiter = ',')]
    blocks: Vec<u64>,
    /// Skip the machine's ceiling: by default, for every thread count above 1, each round
    /// also runs `sequential` on the block in that many threads at once, and each cell
    /// reports the speedup those independent copies reach (threads x sequential's time /
    /// their time), the most any engine can get from the machine on that block.
    #[arg(long)]
    no_ceiling: bool,
    /// Seed of the workload generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write every cell and the mainnet summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the whole matrix this many times, one process after another, and report each
    /// cell's median over the processes with the range of its speedups between them. One
    /// process can measure an engine a few percent off in a way its per-round quartiles do
    /// not show (where code and data happened to land in it); several show it and average
    /// it out.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    processes: u64,
}

fn parse_workload(s: &str) -> Result<(WorkloadKind, f64), String> {
    let (name, ratio) = match s.split_once('@') {
        Some((n, r)) => (n, crate::parse_ratio(r)?),
        None => (s, 0.0),
    };
    let kind = WorkloadKind::parse(name).ok_or_else(|| {
        let names: Vec<_> = WorkloadKind::ALL.iter().map(|k| k.name()).collect();
        format!(
            "unknown workload '{name}' (expected NAME or NAME@HOT_RATIO with NAME one of {})",
            names.join(", ")
        )
    })?;
    Ok((kind, ratio))
}

/// What to measure.
struct Plan {
    /// `sequential` first.
    engines: Vec<EngineKind>,
    threads: Vec<usize>,
    workloads: Vec<(WorkloadKind, f64)>,
    /// (size, read latency in µs)
    sizes: Vec<(Size, u64)>,
    repeat: usize,
    /// Rounds continue until sequential's runs add up to this (see `MAX_ROUNDS_PER_REPEAT`).
    min_time: Duration,
    mainnet: bool,
    /// Thread counts at which the machine's ceiling is measured (see [`sequential_copies`]).
    ceilings: Vec<usize>,
    seed: u64,
}

/// Rounds of a cell stop at this many times `repeat`, however short its block.
const MAX_ROUNDS_PER_REPEAT: usize = 100;

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Plan {
        let mut engines = vec![EngineKind::Sequential];
        let chosen = if args.engines.is_empty() {
            EngineKind::ALL.to_vec()
        } else {
            args.engines.clone()
        };
        for e in chosen {
            if !engines.contains(&e) {
                engines.push(e);
            }
        }
        let mut threads: Vec<usize> = if !args.threads.is_empty() {
            args.threads.iter().map(|&t| t as usize).collect()
        } else if args.quick {
            vec![cores()]
        } else {
            vec![1, cores()]
        };
        dedup_in_order(&mut threads);
        let mut workloads = if !args.workloads.is_empty() {
            args.workloads.clone()
        } else if !args.blocks.is_empty() {
            Vec::new()
        } else {
            use WorkloadKind::*;
            let mut w = vec![(Raw, 0.0), (Erc20, 0.0), (Swap, 0.0)];
            if !args.quick {
                w.push((Mix, 0.0));
            }
            w.extend([(Mix, 0.3), (Chain, 0.0)]);
            w
        };
        dedup_in_order(&mut workloads);
        let default_plan: Vec<(Size, u64)> = if args.quick {
            vec![(Size::Txs(2000), 0), (Size::Txs(200), 100)]
        } else {
            vec![
                (Size::Gas(1_000_000_000), 0),
                (Size::Txs(1000), 0),
                (Size::Txs(1000), 100),
            ]
        };
        let sizes = if args.gas.is_empty() && args.txs.is_empty() && args.latency_us.is_empty() {
            default_plan
        } else {
            let mut sizes: Vec<Size> = args.gas.iter().map(|&g| Size::Gas(g)).collect();
            sizes.extend(args.txs.iter().map(|&t| Size::Txs(t as usize)));
            if sizes.is_empty() {
                sizes = default_plan.iter().map(|(s, _)| *s).collect();
            }
            dedup_in_order(&mut sizes);
            let mut latencies = args.latency_us.clone();
            if latencies.is_empty() {
                latencies.push(0);
            }
            dedup_in_order(&mut latencies);
            sizes
                .iter()
                .flat_map(|s| latencies.iter().map(move |l| (*s, *l)))
                .collect()
        };
        let repeat = args
            .repeat
            .map_or(if args.quick { 3 } else { 5 }, |r| r as usize);
        let min_time_ms = args
            .min_time_ms
            .unwrap_or(if args.quick { 50 } else { 200 });
        let ceilings = if args.no_ceiling {
            Vec::new()
        } else {
            threads.iter().copied().filter(|&t| t > 1).collect()
        };
        Plan {
            engines,
            ceilings,
            threads,
            workloads,
            sizes,
            repeat,
            min_time: Duration::from_millis(min_time_ms),
            mainnet: !args.no_mainnet,
            seed: args.seed,
        }
    }

    /// Runs of one group per round: the engines' and the ceilings'.
    fn runs_per_round(&self) -> usize {
        self.runs().len() + self.ceilings.len()
    }

    /// The runs of one group: `sequential` once, then each other engine at each thread count.
    fn runs(&self) -> Vec<(EngineKind, usize)> {
        let mut runs = vec![(EngineKind::Sequential, 1)];
        for &e in &self.engines[1..] {
            for &t in &self.threads {
                runs.push((e, t));
            }
        }
        runs
    }
}

fn dedup_in_order<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::with_capacity(v.len());
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(x.clone());
            true
        }
    });
}

/// One engine at one thread count on one block, as `--json` writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Cell {
    workload: String,
    hot_ratio: f64,
    engine: String,
    threads: usize,
    latency_us: u64,
    txs: usize,
    gas: u64,
    median_ms: f64,
    min_ms: f64,
    /// Timed runs behind `median_ms` (at least `repeat`; more on short blocks).
    runs: usize,
    gas_per_s: f64,
    txs_per_s: f64,
    /// The median of the per-round speedups (`sequential`'s time over the engine's in the
    /// same round; 1 for `sequential`).
    speedup_vs_sequential: f64,
    /// The 25th and 75th percentiles of the per-round speedups: each round runs every
    /// engine once, back to back, so a round's ratio compares runs made under the same
    /// machine conditions; the spread says how far to trust `speedup_vs_sequential`
    /// (none for `sequential`).
    speedup_quartiles: Option<[f64; 2]>,
    /// The machine's ceiling at this thread count: the speedup that `threads` independent
    /// `sequential` runs of the block reach side by side (none at 1 thread, or with
    /// `--no-ceiling`).
    machine_ceiling: Option<f64>,
    reexecutions_per_tx: f64,
    peak_rss_mb: Option<f64>,
    block: Option<u64>,
    ideal_speedup: Option<f64>,
    bound_at_threads: Option<f64>,
    /// With `--processes` above 1: the lowest and highest of the processes' speedups (none
    /// for `sequential`, and absent from the JSON of a single process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    speedup_process_range: Option<[f64; 2]>,
}

/// A block to measure, with what the cells need to say about it.
struct Group<'a> {
    label: String,
    workload: &'static str,
    hot_ratio: f64,
    block_number: Option<u64>,
    latency_us: u64,
    block: &'a EvmBlock,
    pre_state: &'a InMemoryStorage<StateKey, StateValue>,
    /// For mainnet blocks: the analysis bound (ideal, and per thread count).
    bounds: Option<(f64, Vec<(usize, f64)>)>,
}

/// What the repeats of one run measured.
#[derive(Default)]
struct RunStats {
    times: Vec<Duration>,
    reexecutions: u64,
    peak_rss_mb: Option<f64>,
    rss_measurable: bool,
    failed: bool,
}

struct Bench {
    plan: Plan,
    /// One pool per thread count of `plan.ceilings`, in order.
    ceiling_pools: Vec<rayon::ThreadPool>,
    bar: ProgressBar,
    cells: Vec<Cell>,
    failures: Vec<String>,
}

impl Bench {
    fn group<S: Storage<Key = StateKey, Value = StateValue>>(
        &mut self,
        group: &Group<'_>,
        storage: &S,
    ) {
        let runs = self.plan.runs();
        let vm = EvmVm::with_pre_block(group.block, storage);
        self.bar.set_message(group.label.clone());
        // Warm-up, and sequential's outcome as the reference.
        let reference = match EngineKind::Sequential.execute(&vm, storage, 1) {
            Ok((outcome, _)) => outcome,
            Err(e) => {
                self.failures
                    .push(format!("cell {}: sequential failed: {e}", group.label));
                self.bar
                    .inc(((self.plan.repeat + 1) * self.plan.runs_per_round()) as u64);
                return;
            }
        };
        self.bar.inc(1);
        let mut stats: Vec<RunStats> = runs.iter().map(|_| RunStats::default()).collect();
        for (i, &(engine, threads)) in runs.iter().enumerate().skip(1) {
            if let Err(e) = self.check(&vm, storage, engine, threads, &reference) {
                self.fail(group, engine, threads, &e);
                stats[i].failed = true;
            }
            self.bar.inc(1);
        }
        let ceilings = self.plan.ceilings.clone();
        let mut ceiling_stats: Vec<RunStats> =
            ceilings.iter().map(|_| RunStats::default()).collect();
        for (i, &copies) in ceilings.iter().enumerate() {
            if let Err(e) = sequential_copies(&self.ceiling_pools[i], &vm, storage, &reference) {
                self.fail_ceiling(group, copies, &e);
                ceiling_stats[i].failed = true;
            }
            self.bar.inc(1);
        }
        let max_rounds = self.plan.repeat * MAX_ROUNDS_PER_REPEAT;
        let mut sequential_time = Duration::ZERO;
        for round in 0..max_rounds {
            if round >= self.plan.repeat {
                if sequential_time >= self.plan.min_time || stats[0].failed {
                    break;
                }
                // A round beyond the plan: the bar learns of it as it starts.
                self.bar.inc_length(self.plan.runs_per_round() as u64);
            }
            for slot in round_order(round, runs.len() + ceilings.len()) {
                self.bar.inc(1);
                if let Some(&(engine, threads)) = runs.get(slot) {
                    let i = slot;
                    let s = &mut stats[i];
                    if s.failed {
                        continue;
                    }
                    let rss_reset = reset_peak_rss();
                    let started = Instant::now();
                    let result = engine.execute(&vm, storage, threads);
                    let elapsed = started.elapsed();
                    let peak = if rss_reset { peak_rss_mb() } else { None };
                    match result
                        .map_err(|e| e.to_string())
                        .and_then(|(outcome, metrics)| {
                            same_result(&outcome, &reference).map(|()| metrics)
                        }) {
                        Ok(metrics) => {
                            if i == 0 {
                                sequential_time += elapsed;
                            }
                            s.times.push(elapsed);
                            s.reexecutions += metrics.reexecutions;
                            s.rss_measurable = rss_reset && peak.is_some();
                            s.peak_rss_mb = max_opt(s.peak_rss_mb, peak);
                        }
                        Err(e) => {
                            s.failed = true;
                            self.fail(group, engine, threads, &e);
                        }
                    }
                } else {
                    let i = slot - runs.len();
                    let s = &mut ceiling_stats[i];
                    if s.failed {
                        continue;
                    }
                    match sequential_copies(&self.ceiling_pools[i], &vm, storage, &reference) {
                        Ok(elapsed) => s.times.push(elapsed),
                        Err(e) => {
                            s.failed = true;
                            self.fail_ceiling(group, ceilings[i], &e);
                        }
                    }
                }
            }
        }
        let txs = reference.tx_outcomes.len();
        let gas = reference.gas_used();
        // Round by round, as the engines' speedups: `threads` times `sequential`'s time over
        // the time of the copies side by side in the same round, the median over the rounds.
        let ceiling_at: Vec<Option<f64>> = ceilings
            .iter()
            .zip(&ceiling_stats)
            .map(|(&threads, s)| {
                if s.failed {
                    return None;
                }
                Some(threads as f64 * per_round(&stats[0].times, &s.times).median?)
            })
            .collect();
        let ceiling = |threads: usize| -> Option<f64> {
            ceiling_at[ceilings.iter().position(|&t| t == threads)?]
        };
        for (i, &(engine, threads)) in runs.iter().enumerate() {
            let s = &stats[i];
            if s.failed || s.times.is_empty() {
                continue;
            }
            let median = median(&s.times);
            // None for `sequential`, the base of every speedup.
            let rounds =
                (engine != EngineKind::Sequential).then(|| per_round(&stats[0].times, &s.times));
            let min = s.times.iter().min().copied().unwrap_or_default();
            let thread_counts = if engine == EngineKind::Sequential {
                self.plan.threads.clone()
            } else {
                vec![threads]
            };
            for t in thread_counts {
                self.cells.push(Cell {
                    workload: group.workload.to_string(),
                    hot_ratio: group.hot_ratio,
                    engine: engine.name().to_string(),
                    threads: t,
                    latency_us: group.latency_us,
                    txs,
                    gas,
                    median_ms: median * 1e3,
                    min_ms: min.as_secs_f64() * 1e3,
                    runs: s.times.len(),
                    gas_per_s: per_second(gas as f64, median),
                    txs_per_s: per_second(txs as f64, median),
                    speedup_vs_sequential: rounds.and_then(|r| r.median).unwrap_or(1.0),
                    speedup_quartiles: rounds.and_then(|r| r.quartiles),
                    machine_ceiling: ceiling(t),
                    reexecutions_per_tx: if txs == 0 {
                        0.0
                    } else {
                        s.reexecutions as f64 / s.times.len() as f64 / txs as f64
                    },
                    peak_rss_mb: if s.rss_measurable {
                        s.peak_rss_mb
                    } else {
                        None
                    },
                    block: group.block_number,
                    ideal_speedup: group.bounds.as_ref().map(|(ideal, _)| *ideal),
                    bound_at_threads: group
                        .bounds
                        .as_ref()
                        .and_then(|(_, at)| at.iter().find(|(n, _)| *n == t).map(|(_, b)| *b)),
                    speedup_process_range: None,
                });
            }
        }
    }

    /// Runs `engine` once (warm-up) and compares its result with the reference.
    fn check<S: Storage<Key = StateKey, Value = StateValue>>(
        &self,
        vm: &EvmVm<'_>,
        storage: &S,
        engine: EngineKind,
        threads: usize,
        reference: &EvmBlockOutcome,
    ) -> Result<(), String> {
        let (outcome, _) = engine
            .execute(vm, storage, threads)
            .map_err(|e| e.to_string())?;
        same_result(&outcome, reference)
    }

    fn fail_ceiling(&mut self, group: &Group<'_>, copies: usize, why: &str) {
        self.record_failure(format!(
            "cell {}, machine ceiling ({copies} sequential runs at once): {why}",
            group.label
        ));
    }

    fn fail(&mut self, group: &Group<'_>, engine: EngineKind, threads: usize, why: &str) {
        self.record_failure(format!(
            "cell {}, {threads} threads: engine {engine}: {why}",
            group.label
        ));
    }

    /// Says a failure at once (above the progress bar) and keeps it for the end.
    fn record_failure(&mut self, line: String) {
        self.bar.suspend(|| eprintln!("WRONG RESULT: {line}"));
        self.failures.push(line);
    }
}

/// The threads that run the copies of [`sequential_copies`] at `copies` threads: kept for
/// the whole bench, as the engines' worker threads are (a thread started for each run
/// begins with an empty allocator heap and faults its memory in, which on short blocks
/// cost the copies a third of the machine).
fn ceiling_pool(copies: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(copies)
        .thread_name(|i| format!("parex-ceiling-{i}"))
        .build()
        .with_context(|| format!("cannot start {copies} threads for the machine's ceiling"))
}

/// Runs `sequential` on the block on every thread of `pool` at once (released together,
/// each timing its own run) and checks every outcome; returns the longest run. Independent
/// copies share nothing but the read-only block and pre-block state, so what they lose
/// against one run alone is the machine's (memory bandwidth, shared caches, clock), not
/// any engine's: copies x sequential's time / this time is the most speedup any engine
/// can reach with that many threads on this block here.
fn sequential_copies<S: Storage<Key = StateKey, Value = StateValue>>(
    pool: &rayon::ThreadPool,
    vm: &EvmVm<'_>,
    storage: &S,
    reference: &EvmBlockOutcome,
) -> Result<Duration, String> {
    let start = Barrier::new(pool.current_num_threads());
    let results = pool.broadcast(|_| {
        start.wait();
        let started = Instant::now();
        // A panic is caught here, so that no copy is left waiting for the others.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            EngineKind::Sequential.execute(vm, storage, 1)
        }));
        (started.elapsed(), result)
    });
    let mut longest = Duration::ZERO;
    for (elapsed, result) in results {
        let result = result.map_err(|_| "a sequential run panicked".to_string())?;
        let (outcome, _) = result.map_err(|e| e.to_string())?;
        same_result(&outcome, reference)?;
        longest = longest.max(elapsed);
    }
    Ok(longest)
}

/// `Ok` when `outcome` equals the reference; otherwise where they first differ.
fn same_result(outcome: &EvmBlockOutcome, reference: &EvmBlockOutcome) -> Result<(), String> {
    if outcome == reference {
        return Ok(());
    }
    if outcome.tx_outcomes.len() != reference.tx_outcomes.len() {
        return Err(format!(
            "result differs from sequential: {} transaction outcomes instead of {}",
            outcome.tx_outcomes.len(),
            reference.tx_outcomes.len()
        ));
    }
    if let Some(i) =
        (0..outcome.tx_outcomes.len()).find(|&i| outcome.tx_outcomes[i] != reference.tx_outcomes[i])
    {
        return Err(format!(
            "result differs from sequential: first at transaction {i} ({:?} instead of {:?})",
            outcome.tx_outcomes[i].status, reference.tx_outcomes[i].status
        ));
    }
    Err(format!(
        "result differs from sequential: state diff hash {} instead of {} ({} keys instead of {})",
        outcome.state_diff_hash(),
        reference.state_diff_hash(),
        outcome.state_diff.len(),
        reference.state_diff.len()
    ))
}

/// Median in seconds.
fn median(times: &[Duration]) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    let mut s: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The `q` quantile (0 to 1) of sorted `values`, interpolated between the nearest ranks.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// What the rounds of a cell say of an engine against `sequential`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct PerRound {
    /// The median of the per-round speedups (`sequential`'s time over the engine's in the
    /// same round, `times[r]` of both being from round `r`): the cell's speedup. A round
    /// runs every engine once, back to back, so its ratio compares runs made under the
    /// same machine conditions, where the two medians taken apart can pair a slow minute of
    /// one with a fast minute of the other. None without a round to compare.
    median: Option<f64>,
    /// Their 25th and 75th percentiles; none without two rounds to compare.
    quartiles: Option<[f64; 2]>,
}

fn per_round(sequential: &[Duration], engine: &[Duration]) -> PerRound {
    let mut ratios: Vec<f64> = sequential
        .iter()
        .zip(engine)
        .filter(|(_, e)| !e.is_zero())
        .map(|(s, e)| s.as_secs_f64() / e.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    PerRound {
        median: (!ratios.is_empty()).then(|| quantile(&ratios, 0.5)),
        quartiles: (ratios.len() >= 2).then(|| [quantile(&ratios, 0.25), quantile(&ratios, 0.75)]),
    }
}

fn per_second(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { amount / seconds } else { 0.0 }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Resets the process's peak resident set size (Linux: `/proc/self/clear_refs`).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size since the last reset, in MB (Linux: `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn size_name(size: Size) -> String {
    match size {
        Size::Txs(t) => format!("{t} txs"),
        Size::Gas(g) if g % 1_000_000_000 == 0 => format!("{}G gas", g / 1_000_000_000),
        Size::Gas(g) if g % 1_000_000 == 0 => format!("{}M gas", g / 1_000_000),
        Size::Gas(g) => format!("{g} gas"),
    }
}

/// Geometric mean speedup and worst block of one engine at one thread count.
#[derive(Serialize)]
struct MainnetSummary {
    engine: String,
    threads: usize,
    geomean_speedup: f64,
    worst_speedup: f64,
    worst_block: u64,
    /// Blocks summarized (blocks without transactions are left out).
    blocks: usize,
    /// Geometric mean of the analysis bound at this thread count.
    geomean_bound: Option<f64>,
    /// Geometric mean of the machine's ceiling at this thread count.
    geomean_ceiling: Option<f64>,
}

fn mainnet_summary(plan: &Plan, cells: &[Cell]) -> Vec<MainnetSummary> {
    let mut out = Vec::new();
    for &engine in &plan.engines[1..] {
        for &threads in &plan.threads {
            let blocks: Vec<&Cell> = cells
                .iter()
                .filter(|c| {
                    c.workload == "mainnet"
                        && c.engine == engine.name()
                        && c.threads == threads
                        && c.txs > 0
                })
                .collect();
            let Some(geo) = geomean(blocks.iter().map(|c| c.speedup_vs_sequential)) else {
                continue;
            };
            let worst = blocks
                .iter()
                .min_by(|a, b| a.speedup_vs_sequential.total_cmp(&b.speedup_vs_sequential))
                .expect("not empty");
            out.push(MainnetSummary {
                engine: engine.name().to_string(),
                threads,
                geomean_speedup: geo,
                worst_speedup: worst.speedup_vs_sequential,
                worst_block: worst.block.unwrap_or(0),
                blocks: blocks.len(),
                geomean_bound: geomean(blocks.iter().filter_map(|c| c.bound_at_threads)),
                geomean_ceiling: geomean(blocks.iter().filter_map(|c| c.machine_ceiling)),
            });
        }
    }
    out
}

/// A ratio as the tables print it (`-` for none).
fn times(ratio: Option<f64>) -> String {
    ratio.map_or("-".to_string(), |r| format!("{r:.2}x"))
}

/// Quartiles as the tables print them (`-` for none).
fn quartiles(q: Option<[f64; 2]>) -> String {
    q.map_or("-".to_string(), |[low, high]| {
        format!("{low:.2}-{high:.2}x")
    })
}

fn print_tables(cells: &[Cell], summary: &[MainnetSummary]) {
    let synthetic: Vec<&Cell> = cells.iter().filter(|c| c.workload != "mainnet").collect();
    // The range over processes, when the cells were measured in several.
    let ranges = cells.iter().any(|c| c.speedup_process_range.is_some());
    let (range_head, range_rule) = if ranges {
        (" range over processes |", "---|")
    } else {
        ("", "")
    };
    if !synthetic.is_empty() {
        out!(
            "| workload | hot | txs | Mgas | latency us | threads | engine | median ms | min ms | Mgas/s | ktx/s | speedup | per-round quartiles |{range_head} machine ceiling | re-exec/tx | peak RSS MB |"
        );
        out!("|---|---|---|---|---|---|---|---|---|---|---|---|---|{range_rule}---|---|---|");
        for c in synthetic {
            let range = if ranges {
                format!(" {} |", quartiles(c.speedup_process_range))
            } else {
                String::new()
            };
            out!(
                "| {} | {} | {} | {:.1} | {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.2}x | {} |{range} {} | {:.3} | {} |",
                c.workload,
                c.hot_ratio,
                c.txs,
                c.gas as f64 / 1e6,
                c.latency_us,
                c.threads,
                c.engine,
                c.median_ms,
                c.min_ms,
                c.gas_per_s / 1e6,
                c.txs_per_s / 1e3,
                c.speedup_vs_sequential,
                quartiles(c.speedup_quartiles),
                times(c.machine_ceiling),
                c.reexecutions_per_tx,
                c.peak_rss_mb.map_or("-".to_string(), |m| format!("{m:.0}")),
            );
        }
    }
    if !summary.is_empty() {
        out!("");
        out!(
            "| mainnet | threads | blocks | geomean speedup | worst speedup | worst block | geomean analysis bound | geomean machine ceiling |"
        );
        out!("|---|---|---|---|---|---|---|---|");
        for s in summary {
            out!(
                "| {} | {} | {} | {:.2}x | {:.2}x | {} | {} | {} |",
                s.engine,
                s.threads,
                s.blocks,
                s.geomean_speedup,
                s.worst_speedup,
                s.worst_block,
                times(s.geomean_bound),
                times(s.geomean_ceiling),
            );
        }
    }
}

pub fn cmd_bench(args: BenchArgs) -> Result<ExitCode> {
    if let Some(path) = &args.json
        && let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
    {
        bail!(
            "cannot write {}: {} is not a directory",
            path.display(),
            parent.display()
        );
    }
    let plan = Plan::from_args(&args);
    if args.processes > 1 {
        return processes::run(&args, &plan);
    }
    let runs_per_group = (plan.repeat + 1) * plan.runs_per_round();
    let synthetic_groups = plan.workloads.len() * plan.sizes.len();
    let mainnet_source = if plan.mainnet {
        let dir = mainnet::builtin_dir();
        Some(
            mainnet::Source::open(&dir)
                .with_context(|| format!("cannot read mainnet data from {}", dir.display()))?,
        )
    } else {
        None
    };
    let mut wanted_blocks = args.blocks.clone();
    dedup_in_order(&mut wanted_blocks);
    if let Some(source) = &mainnet_source {
        let have = source.numbers();
        if let Some(missing) = wanted_blocks.iter().find(|n| !have.contains(n)) {
            bail!(
                "the built-in mainnet data set has no block {missing} (it has {} blocks, {} to {})",
                have.len(),
                have.first().copied().unwrap_or(0),
                have.last().copied().unwrap_or(0)
            );
        }
    }
    let mainnet_blocks = mainnet_source.as_ref().map_or(0, |s| {
        if wanted_blocks.is_empty() {
            s.len()
        } else {
            wanted_blocks.len()
        }
    });
    let groups = synthetic_groups + mainnet_blocks;
    eprintln!(
        "bench: engines {}; threads {:?}; {} synthetic cells{}; {} timed runs per engine after a warm-up, more while sequential's add up to less than {} ms",
        plan.engines
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(", "),
        plan.threads,
        synthetic_groups,
        mainnet_source.as_ref().map_or(String::new(), |_| format!(
            " + {mainnet_blocks} mainnet blocks"
        )),
        plan.repeat,
        plan.min_time.as_millis(),
    );
    let bar = ProgressBar::new((groups * runs_per_group) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} runs, {elapsed} {msg}")
            .expect("valid template"),
    );
    let ceiling_pools = plan
        .ceilings
        .iter()
        .map(|&t| ceiling_pool(t))
        .collect::<Result<_>>()?;
    let mut bench = Bench {
        ceiling_pools,
        bar,
        cells: Vec::new(),
        failures: Vec::new(),
        plan,
    };
    let workloads = bench.plan.workloads.clone();
    let sizes = bench.plan.sizes.clone();
    for (kind, hot_ratio) in workloads {
        for &(size, latency_us) in &sizes {
            let spec = WorkloadSpec {
                kind,
                size,
                accounts: None,
                hot_ratio,
                seed: bench.plan.seed,
            };
            let label = format!(
                "{kind} (hot ratio {hot_ratio}, {}, {latency_us} us)",
                size_name(size)
            );
            bench.bar.set_message(format!("generating {label}"));
            let workload = synthetic::generate(&spec)
                .with_context(|| format!("cannot build the workload {label}"))?;
            let group = Group {
                label,
                workload: kind.name(),
                hot_ratio,
                block_number: None,
                latency_us,
                block: &workload.block,
                pre_state: &workload.pre_state,
                bounds: None,
            };
            run_group(&mut bench, &group);
        }
    }
    if let Some(source) = &mainnet_source {
        let wanted = &wanted_blocks;
        for (number, loaded) in source.load_where(|n| wanted.is_empty() || wanted.contains(&n)) {
            let block = loaded.with_context(|| format!("cannot load mainnet block {number}"))?;
            let report =
                analyze_block(format!("block {number}"), &block.block, &block.pre_state, 0)?;
            let g = &report.analysis.graph;
            let bounds = (
                g.ideal_speedup(),
                bench
                    .plan
                    .threads
                    .iter()
                    .map(|&t| (t, g.speedup_bound(t)))
                    .collect(),
            );
            let group = Group {
                label: format!("mainnet block {number}"),
                workload: "mainnet",
                hot_ratio: 0.0,
                block_number: Some(number),
                latency_us: 0,
                block: &block.block,
                pre_state: &block.pre_state,
                bounds: Some(bounds),
            };
            run_group(&mut bench, &group);
        }
    }
    bench.bar.finish_and_clear();
    let summary = mainnet_summary(&bench.plan, &bench.cells);
    print_tables(&bench.cells, &summary);
    if let Some(path) = &args.json {
        write_json(
            path,
            &bench.plan,
            1,
            &bench.cells,
            &summary,
            &bench.failures,
        )?;
    }
    finish(&bench.failures)
}

/// The command's end: failure (exit 1) if any engine result was wrong or failed.
fn finish(failures: &[String]) -> Result<ExitCode> {
    if !failures.is_empty() {
        bail!(
            "{} engine results differ from sequential or failed (their cells are left out):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the results as `--json` documents them.
fn write_json(
    path: &std::path::Path,
    plan: &Plan,
    processes: u64,
    cells: &[Cell],
    summary: &[MainnetSummary],
    failures: &[String],
) -> Result<()> {
    let value = json!({
        "parex_version": env!("CARGO_PKG_VERSION"),
        "machine": {
            "cores": cores(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "repeat": plan.repeat,
        "min_time_ms": plan.min_time.as_millis() as u64,
        "processes": processes,
        "engines": plan.engines.iter().map(|e| e.name()).collect::<Vec<_>>(),
        "threads": plan.threads,
        "cells": cells,
        "mainnet_summary": summary,
        "failures": failures,
    });
    std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn run_group(bench: &mut Bench, group: &Group<'_>) {
    if group.latency_us == 0 {
        bench.group(group, group.pre_state);
    } else {
        let storage = LatencyStorage::new(group.pre_state, Duration::from_micros(group.latency_us));
        bench.group(group, &storage);
    }
}

/// The order of a round's runs (`slots`: the engines' runs, then the ceilings): each
/// round starts one place further along, so that no run always comes right after the
/// same one (the ceiling's threads leave the caches full of their data; the engine before
/// leaves its own), and whatever a place costs, every engine pays it alike.
fn round_order(round: usize, slots: usize) -> impl Iterator<Item = usize> {
    (0..slots).map(move |k| (round + k) % slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parex_core::{AccountInfo, AccountValue, TxOutcome, TxStatus};

    #[test]
    fn every_run_takes_every_place_in_turn() {
        let slots = 4;
        let rounds: Vec<Vec<usize>> = (0..slots)
            .map(|r| round_order(r, slots).collect())
            .collect();
        for order in &rounds {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3], "each run once per round");
        }
        for place in 0..slots {
            let mut at_place: Vec<usize> = rounds.iter().map(|order| order[place]).collect();
            at_place.sort_unstable();
            assert_eq!(at_place, vec![0, 1, 2, 3], "each run once at place {place}");
        }
        assert_eq!(round_order(0, 1).collect::<Vec<_>>(), vec![0]);
    }

    fn outcome(gas: u64, balance: u64) -> EvmBlockOutcome {
        let a = alloy_primitives::Address::repeat_byte(1);
        EvmBlockOutcome {
            tx_outcomes: vec![TxOutcome {
                tx_type: 2,
                status: TxStatus::Success,
                gas_used: gas,
                cumulative_gas_used: gas,
                logs: Vec::new(),
            }],
            state_diff: vec![(
                StateKey::Account(a),
                StateValue::Account(AccountValue {
                    info: Some(AccountInfo::with_balance(
                        alloy_primitives::U256::from(balance),
                        1,
                    )),
                    ..AccountValue::default()
                }),
            )],
        }
    }

    #[test]
    fn a_different_result_is_caught_and_located() {
        let reference = outcome(21000, 5);
        assert_eq!(same_result(&outcome(21000, 5), &reference), Ok(()));
        let e = same_result(&outcome(22000, 5), &reference).unwrap_err();
        assert!(e.contains("transaction 0"), "{e}");
        let e = same_result(&outcome(21000, 6), &reference).unwrap_err();
        assert!(e.contains("state diff hash"), "{e}");
    }

    #[test]
    fn sequential_copies_check_every_outcome() {
        let spec = WorkloadSpec {
            kind: WorkloadKind::Erc20,
            size: Size::Txs(30),
            accounts: None,
            hot_ratio: 0.0,
            seed: 7,
        };
        let w = synthetic::generate(&spec).unwrap();
        let vm = EvmVm::with_pre_block(&w.block, &w.pre_state);
        let (reference, _) = EngineKind::Sequential
            .execute(&vm, &w.pre_state, 1)
            .unwrap();
        for copies in [1, 2, 3] {
            let pool = ceiling_pool(copies).unwrap();
            let t = sequential_copies(&pool, &vm, &w.pre_state, &reference).unwrap();
            assert!(t > Duration::ZERO);
        }
        let mut wrong = reference.clone();
        wrong.tx_outcomes[4].gas_used += 1;
        let pool = ceiling_pool(2).unwrap();
        let e = sequential_copies(&pool, &vm, &w.pre_state, &wrong).unwrap_err();
        assert!(e.contains("transaction 4"), "{e}");
    }

    #[test]
    fn workloads_parse_with_optional_hot_ratio() {
        assert_eq!(parse_workload("mix@0.3"), Ok((WorkloadKind::Mix, 0.3)));
        assert_eq!(parse_workload("erc20"), Ok((WorkloadKind::Erc20, 0.0)));
        assert!(parse_workload("mix@x").is_err());
        assert!(parse_workload("nft").unwrap_err().contains("raw, erc20"));
    }

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn medians_and_geometric_means() {
        assert_eq!(median(&ms(&[3, 1, 2])), 0.002);
        assert_eq!(median(&ms(&[4, 1, 2, 3])), 0.0025);
        assert_eq!(median(&[]), 0.0);
        assert!((geomean([2.0, 8.0].into_iter()).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geomean(std::iter::empty()), None);
    }

    #[test]
    fn per_round_speedups_are_paired_by_round() {
        // The machine slows down by 2x halfway: each round's ratio is still 2.
        let sequential = ms(&[100, 100, 200, 200]);
        let engine = ms(&[50, 50, 100, 100]);
        assert_eq!(per_round(&sequential, &engine).quartiles, Some([2.0, 2.0]));
        // Ratios 1, 2, 3, 4, 5: quartiles interpolated between ranks.
        let q = per_round(&ms(&[10, 20, 30, 40, 50]), &ms(&[10; 5]))
            .quartiles
            .unwrap();
        assert_eq!(q, [2.0, 4.0]);
        let q = per_round(&ms(&[10, 20, 30, 40]), &ms(&[10; 4]))
            .quartiles
            .unwrap();
        assert_eq!(q, [1.75, 3.25]);
        assert_eq!(per_round(&ms(&[10]), &ms(&[5])).quartiles, None);
    }

    /// A cell's speedup is the median of the per-round speedups, not the ratio of the
    /// two medians: the engine's one lucky round (30 against 10 ms, while the machine ran
    /// `sequential` slow) does not make it 3x faster.
    #[test]
    fn a_cells_speedup_is_the_median_of_its_rounds() {
        let sequential = ms(&[10, 10, 30, 30, 30]);
        let engine = ms(&[10, 10, 10, 30, 30]);
        assert_eq!(median(&sequential) / median(&engine), 3.0);
        assert_eq!(per_round(&sequential, &engine).median, Some(1.0));
        assert_eq!(per_round(&ms(&[10, 20]), &ms(&[10, 10])).median, Some(1.5));
        assert_eq!(per_round(&ms(&[10]), &ms(&[5])).median, Some(2.0));
        assert_eq!(per_round(&[], &[]).median, None);
    }
}
