//! `parex`: execute blocks of Ethereum transactions with parallel engines, check them
//! against mainnet headers, and measure them on synthetic workloads.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use parex_core::{LatencyStorage, StateKey, StateValue, Storage};
use parex_engine::{EngineKind, Metrics, RunOptions};
use parex_evm::{EvmVm, receipts_root};
use parex_workloads::{Size, WorkloadKind, WorkloadSpec, mainnet, synthetic, verify};
use serde_json::json;

/// `println!` that ends the program quietly when stdout is closed (e.g. `parex verify | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {e}");
        }
    }};
}

/// mimalloc instead of the system allocator: its per-thread heaps keep freed memory for
/// reuse instead of returning large blocks to the kernel, so repeated blocks do not pay the page
/// faults of their overlays, maps and state diffs again (with purging off: see
/// [`keep_freed_memory`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the option enum of the mimalloc (v3) that `libmimalloc-sys`
/// bundles; its bindings do not name it. A test checks it against the option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turns off mimalloc's purging of freed memory (returning it to the kernel some time after
/// it was freed), as a node executing block after block would: with purging on, the large
/// buffers of a gigagas block (state diffs, multi-version states, overlays) were faulted in
/// and zeroed again on most runs, 2 MiB at a time, at about 1.5 ms per huge page on this
/// VM (steady-state page faults: 100 per run instead of none; on 2 threads block-stm's
/// runs of the raw-transfer gigagas block then varied between 52 and 63 ms, 52 without).
/// Must run before any other thread starts: mimalloc's option setter is not thread safe.
fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores a value in mimalloc's table of options (read by
    // its allocation paths); it is called first thing in `main`, before any other thread
    // exists, so nothing reads the option concurrently. `MI_OPTION_PURGE_DELAY` names the
    // purge delay (`mi_option_purge_delay_is_the_option_named`), and -1 is its documented
    // "never purge" value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

mod analyze;
mod bench;
mod block_run;
mod report_cmd;
mod trace_out;

#[derive(Parser)]
#[command(
    name = "parex",
    version,
    about = "Parallel execution engines for Ethereum blocks, checked against serial execution"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Execute mainnet blocks and check receipts root, logs bloom and gas used against their headers.
    Verify(VerifyArgs),
    /// Execute one synthetic workload block and report time, throughput and result digests.
    Run(RunArgs),
    /// Write the compact copy of a plain mainnet data directory (what `verify` reads by default).
    Pack(PackArgs),
    /// Measure the dependency structure of a block: critical path, ideal speedup bound,
    /// dependency distances, hottest keys.
    Analyze(analyze::AnalyzeArgs),
    /// Compare every engine on a matrix of workloads, sizes, thread counts and read
    /// latencies, plus the built-in mainnet blocks; every result is checked against sequential.
    Bench(bench::BenchArgs),
    /// Write one self-contained HTML report from bench, trace and analyze JSON files.
    Report(report_cmd::ReportArgs),
}

#[derive(Args)]
struct EngineArgs {
    /// Engine to execute with.
    #[arg(long, default_value = "sequential", value_parser = engine_names())]
    engine: EngineKind,
    /// Worker threads (default: the available cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
}

impl EngineArgs {
    fn threads(&self) -> usize {
        self.threads.map(|t| t as usize).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Recover every sender from its signature (in parallel) and fail a block whose
    /// recovered sender differs from the JSON's `from`.
    #[arg(long)]
    recover_senders: bool,
    /// A mainnet data directory in the plain layout (blocks/<n>/block.json, pre_state.json,
    /// block_hashes.json), a single block directory, or a compact copy. Default: the
    /// repository's built-in copy (data/mainnet).
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Workload: raw (value transfers), erc20 (ERC20 transfers), swap (Uniswap V2 swaps),
    /// mix (60% raw, 20% erc20, 20% swap) or chain (fully dependent transfers).
    #[arg(long, value_parser = workload_names(), required_unless_present_any = ["block", "data"])]
    workload: Option<WorkloadKind>,
    /// Execute this mainnet block instead (from the built-in data set, or --data), checked
    /// against its header.
    #[arg(long, conflicts_with_all = ["workload", "txs", "gas", "accounts", "seed"])]
    block: Option<u64>,
    /// Mainnet data directory for --block (as for `verify`; a single block directory needs
    /// no --block) [default: the built-in data set].
    #[arg(long, conflicts_with_all = ["workload", "txs", "gas", "accounts", "seed"])]
    data: Option<PathBuf>,
    /// Block size in transactions [default: 10000 when --gas is not given].
    #[arg(long, conflicts_with = "gas", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    txs: Option<u64>,
    /// Block size in total gas (e.g. 1000000000 for a gigagas block); accepts 1e9 or 1G.
    #[arg(long, value_parser = parse_gas)]
    gas: Option<u64>,
    /// Accounts in the population (10% hot); default: enough for every cold pick to be fresh.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=100_000_000))]
    accounts: Option<u64>,
    /// Probability that an account (or pool) a transaction picks is a hot one; 0 = conflict-free.
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio, allow_negative_numbers = true)]
    hot_ratio: f64,
    /// Delay added to every read of pre-block state, in microseconds (models a disk; keys read together wait once per 64); at most 1000000
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_LATENCY_US))]
    latency_us: u64,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print the engine's metrics (executions, re-executions, waits, phase times).
    #[arg(long)]
    stats: bool,
    /// Also write the results as a JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Record every worker's timeline and write it as JSON to this file (for
    /// `parex report --trace`; tracing makes the run slightly slower).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Execute the block this many times in one process and report the median run (wall
    /// time, --stats, --trace, --json); later runs find warm caches and reused memory, as
    /// a node executing block after block does. Every run must give the first one's result.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
}

#[derive(Args)]
struct PackArgs {
    /// Plain mainnet data directory to read (e.g. ../shared/data/mainnet).
    src: PathBuf,
    /// Output directory [default: the repository's data/mainnet].
    out: Option<PathBuf>,
}

/// The engines by name, so that `--help` and errors list exactly the ones that exist.
fn engine_names() -> impl clap::builder::TypedValueParser<Value = EngineKind> {
    let names = EngineKind::ALL.iter().map(|k| k.name());
    clap::builder::PossibleValuesParser::new(names)
        .map(|name| EngineKind::parse(&name).expect("a listed name"))
}

fn workload_names() -> impl clap::builder::TypedValueParser<Value = WorkloadKind> {
    let names = WorkloadKind::ALL.iter().map(|k| k.name());
    clap::builder::PossibleValuesParser::new(names)
        .map(|name| WorkloadKind::parse(&name).expect("a listed name"))
}

/// The longest read latency `run` and `bench` accept (one second per read: a disk read
/// takes about 100 us; a typo such as an extra zero should not stall a run for hours).
pub(crate) const MAX_LATENCY_US: u64 = 1_000_000;

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("must be between 0 and 1, got {s}"))
    }
}

fn parse_gas(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1e9),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not an amount of gas (e.g. 1000000000, 1e9, 1G)"))?;
    let gas = v * mult;
    if !(21_000.0..=1e12).contains(&gas) {
        return Err(format!("gas must be between 21000 and 1e12, got {s}"));
    }
    Ok(gas as u64)
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify(args) => cmd_verify(args),
        Command::Run(args) => cmd_run(args),
        Command::Pack(args) => cmd_pack(args),
        Command::Analyze(args) => analyze::cmd_analyze(args),
        Command::Bench(args) => bench::cmd_bench(args),
        Command::Report(args) => report_cmd::cmd_report(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fork_name(spec: revm::primitives::hardfork::SpecId) -> String {
    format!("{spec:?}")
}

fn cmd_verify(args: VerifyArgs) -> Result<ExitCode> {
    let dir = args.data_dir.clone().unwrap_or_else(mainnet::builtin_dir);
    let source = mainnet::Source::open(&dir)
        .with_context(|| format!("cannot read mainnet data from {}", dir.display()))?;
    let engine = args.engine.engine;
    let threads = args.engine.threads();
    out!(
        "verifying {} blocks from {} with engine {engine}, {threads} threads",
        source.len(),
        dir.display()
    );
    let bar = ProgressBar::new(source.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} blocks {msg}").expect("valid template"),
    );
    let started = Instant::now();
    let (mut passed, mut failed) = (0usize, 0usize);
    let mut unchecked_roots = 0usize;
    for (number, loaded) in source.load_all() {
        bar.inc(1);
        let line = match loaded.and_then(|b| {
            if args.recover_senders {
                b.recover_senders()?;
            }
            Ok(b)
        }) {
            Err(e) => {
                failed += 1;
                format!("{number:>9}  FAIL  {e}")
            }
            Ok(block) => match verify::check_block(&block, engine, threads) {
                Err(e) => {
                    failed += 1;
                    format!("{number:>9}  FAIL  execution error: {e}")
                }
                Ok(check) => {
                    let root = match check.receipts_root_matches {
                        Some(true) => "receipts root ok".to_string(),
                        Some(false) => "receipts root MISMATCH".to_string(),
                        None => {
                            unchecked_roots += 1;
                            "receipts root not checked (pre-Byzantium receipts hold state roots)"
                                .to_string()
                        }
                    };
                    let status = if check.passed() {
                        passed += 1;
                        "ok  "
                    } else {
                        failed += 1;
                        "FAIL"
                    };
                    let extra = check.mismatches(&block);
                    format!(
                        "{number:>9}  {status}  {:<15} {:>5} txs {:>10} gas  {:>9.2} ms  gas {}, bloom {}, {root}{}",
                        fork_name(block.spec()),
                        check.txs,
                        check.gas_used,
                        check.elapsed.as_secs_f64() * 1e3,
                        if check.gas_matches { "ok" } else { "MISMATCH" },
                        if check.bloom_matches {
                            "ok"
                        } else {
                            "MISMATCH"
                        },
                        if extra.is_empty() {
                            String::new()
                        } else {
                            format!("  [{extra}]")
                        },
                    )
                }
            },
        };
        bar.suspend(|| out!("{line}"));
    }
    bar.finish_and_clear();
    out!(
        "total {:.2} s; {unchecked_roots} blocks pre-Byzantium (receipts root not checkable)",
        started.elapsed().as_secs_f64()
    );
    out!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_run(args: RunArgs) -> Result<ExitCode> {
    let Some(kind) = args.workload else {
        return block_run::cmd_run_block(&args);
    };
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
    let setup_started = Instant::now();
    let workload = synthetic::generate(&spec).context("cannot build the workload")?;
    let setup_time = setup_started.elapsed();
    let engine = args.engine.engine;
    let threads = args.engine.threads();
    let options = RunOptions {
        trace: args.trace.is_some(),
        ..RunOptions::threads(threads)
    };
    // The VM reads the pre-block state through the same storage as the engine.
    let latency = Duration::from_micros(args.latency_us);
    let (outcome, metrics, wall) = if latency.is_zero() {
        let storage = &workload.pre_state;
        let vm = EvmVm::with_pre_block(&workload.block, storage);
        timed(engine, &vm, storage, &options, args.repeat)?
    } else {
        let storage = &LatencyStorage::new(&workload.pre_state, latency);
        let vm = EvmVm::with_pre_block(&workload.block, storage);
        timed(engine, &vm, storage, &options, args.repeat)?
    };
    let gas = outcome.gas_used();
    let gas_per_s = gas as f64 / wall.median.as_secs_f64();
    let root =
        receipts_root(workload.block.spec, &outcome.tx_outcomes).expect("Cancun has receipt roots");
    let digest = outcome.state_diff_hash();
    let invalid = outcome.invalid_count();
    let accounts = workload.spec.accounts.unwrap_or(0);
    out!(
        "workload        {} (hot ratio {}, {accounts} accounts, seed {})",
        spec.kind,
        spec.hot_ratio,
        spec.seed
    );
    out!(
        "engine          {engine}, {threads} threads, read latency {} us",
        args.latency_us
    );
    out!(
        "setup           {} transactions in {:.2} s (not timed below)",
        workload.setup_txs,
        setup_time.as_secs_f64()
    );
    out!(
        "transactions    {} ({invalid} invalid)",
        outcome.tx_outcomes.len()
    );
    out!("gas             {gas}");
    print_wall(&wall);
    out!("throughput      {:.3} Mgas/s", gas_per_s / 1e6);
    out!("receipts root   {root}");
    out!("state diff hash {digest}");
    if args.stats {
        print_metrics(&metrics);
    }
    if let Some(path) = &args.trace {
        let mut label = format!("{} hot {}", spec.kind, spec.hot_ratio);
        if args.latency_us > 0 {
            label += &format!(", {} us per read", args.latency_us);
        }
        trace_out::write(
            path,
            &trace_out::TracedRun {
                engine: engine.name(),
                workload: &label,
                threads,
                txs: outcome.tx_outcomes.len(),
                gas,
            },
            &metrics,
        )?;
    }
    if let Some(path) = &args.json {
        let value = json!({
            "engine": engine.name(),
            "workload": spec.kind.name(),
            "threads": threads,
            "txs": outcome.tx_outcomes.len(),
            "invalid_txs": invalid,
            "gas": gas,
            "wall_ms": wall.median.as_secs_f64() * 1e3,
            "min_wall_ms": wall.min.as_secs_f64() * 1e3,
            "runs": wall.runs,
            "gas_per_s": gas_per_s,
            "receipts_root": root.to_string(),
            "state_diff_hash": digest.to_string(),
            "hot_ratio": spec.hot_ratio,
            "accounts": accounts,
            "seed": spec.seed,
            "latency_us": args.latency_us,
            "setup_txs": workload.setup_txs,
            "metrics": metrics_json(&metrics),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if invalid > 0 {
        bail!("{invalid} transactions of the generated block were invalid");
    }
    Ok(ExitCode::SUCCESS)
}

type Outcome = parex_core::outcome::EvmBlockOutcome;

/// Wall times of the runs of one block.
struct Wall {
    median: Duration,
    min: Duration,
    runs: u32,
}

/// Runs `engine` on the block `repeat` times; returns the outcome, the median run's
/// metrics and the wall times.
fn timed<S: Storage<Key = StateKey, Value = StateValue>>(
    engine: EngineKind,
    vm: &EvmVm<'_>,
    storage: &S,
    options: &RunOptions,
    repeat: u32,
) -> Result<(Outcome, Metrics, Wall)> {
    // Engines run their helper workers on a pool kept for the process, started on first
    // use: that is setup, not execution (it took milliseconds, and left a worker idle).
    if options.threads > 1 {
        parex_engine::workers::helpers(options.threads - 1);
    }
    // Only the first outcome is kept (every later one must equal it): holding them all
    // would make each run allocate fresh memory, which a node's next block does not.
    let mut first: Option<Outcome> = None;
    let mut runs = Vec::with_capacity(repeat as usize);
    for run in 0..repeat {
        let started = Instant::now();
        let (outcome, metrics) = engine
            .run(vm, storage, options)
            .context("execution failed")?;
        let wall = started.elapsed();
        match &first {
            None => first = Some(outcome),
            Some(first) if *first != outcome => {
                bail!(
                    "run {} of {repeat} gave a different result than run 1",
                    run + 1
                )
            }
            Some(_) => {}
        }
        runs.push((metrics, wall));
    }
    let min = runs
        .iter()
        .map(|(_, wall)| *wall)
        .min()
        .expect("at least one run");
    runs.sort_by_key(|(_, wall)| *wall);
    let (metrics, median) = runs.swap_remove(runs.len() / 2);
    let wall = Wall {
        median,
        min,
        runs: repeat,
    };
    Ok((first.expect("at least one run"), metrics, wall))
}

fn print_wall(wall: &Wall) {
    if wall.runs == 1 {
        out!("wall time       {:.3} ms", wall.median.as_secs_f64() * 1e3);
    } else {
        out!(
            "wall time       {:.3} ms (median of {} runs; min {:.3} ms)",
            wall.median.as_secs_f64() * 1e3,
            wall.runs,
            wall.min.as_secs_f64() * 1e3
        );
    }
}

fn print_metrics(m: &Metrics) {
    out!(
        "executions      {} ({} re-executions)",
        m.executions,
        m.reexecutions
    );
    out!(
        "validations     {} ({} failed)",
        m.validations,
        m.validation_failures
    );
    out!("dependency waits {}", m.dependency_waits);
    out!(
        "time (summed over workers): execution {:.3} ms, validation {:.3} ms, scheduling {:.3} ms, finalize {:.3} ms",
        m.execution_time.as_secs_f64() * 1e3,
        m.validation_time.as_secs_f64() * 1e3,
        m.scheduling_time.as_secs_f64() * 1e3,
        m.finalize_time.as_secs_f64() * 1e3
    );
    for (name, value) in &m.extra {
        out!("{name:<15} {value}");
    }
}

fn metrics_json(m: &Metrics) -> serde_json::Value {
    let mut v = json!({
        "executions": m.executions,
        "reexecutions": m.reexecutions,
        "validations": m.validations,
        "validation_failures": m.validation_failures,
        "dependency_waits": m.dependency_waits,
        "execution_ms": m.execution_time.as_secs_f64() * 1e3,
        "validation_ms": m.validation_time.as_secs_f64() * 1e3,
        "scheduling_ms": m.scheduling_time.as_secs_f64() * 1e3,
        "finalize_ms": m.finalize_time.as_secs_f64() * 1e3,
    });
    for (name, value) in &m.extra {
        v[*name] = json!(value);
    }
    v
}

fn cmd_pack(args: PackArgs) -> Result<ExitCode> {
    let out = args.out.unwrap_or_else(mainnet::builtin_dir);
    let (blocks, bytes) = mainnet::pack(&args.src, &out)
        .with_context(|| format!("cannot pack {} into {}", args.src.display(), out.display()))?;
    out!(
        "packed {blocks} blocks into {} ({:.1} MB)",
        out.display(),
        bytes as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    /// The binary's allocator setting names the right option: the bundled mimalloc's
    /// purge delay, whose default (1000 ms) no neighbouring option shares. Setting it is
    /// exercised by every run of the binary (the CLI tests).
    #[test]
    fn mi_option_purge_delay_is_the_option_named() {
        // SAFETY: `mi_option_get` reads mimalloc's table of options (initialising an entry
        // from the environment on first use); it writes nothing another thread reads
        // unsynchronised except that idempotent initialisation.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        let expected = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        assert_eq!(get(MI_OPTION_PURGE_DELAY), expected);
        assert_ne!(get(MI_OPTION_PURGE_DELAY - 1), 1000);
        assert_ne!(get(MI_OPTION_PURGE_DELAY + 1), 1000);
    }
}
