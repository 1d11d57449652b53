//! `parex run --block N`: execute one mainnet block (from the built-in data set or
//! `--data DIR`) instead of a synthetic workload, checked against its header.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use parex_core::LatencyStorage;
use parex_engine::RunOptions;
use parex_evm::{EvmVm, logs_bloom, receipts_root};
use parex_workloads::mainnet;
use serde_json::json;

use crate::{RunArgs, fork_name, metrics_json, print_metrics, print_wall, timed, trace_out};

pub fn cmd_run_block(args: &RunArgs) -> Result<ExitCode> {
    let dir = args.data.clone().unwrap_or_else(mainnet::builtin_dir);
    let source = mainnet::Source::open(&dir)
        .with_context(|| format!("cannot read mainnet data from {}", dir.display()))?;
    let numbers = source.numbers();
    let number = match args.block {
        Some(n) if numbers.contains(&n) => n,
        Some(n) => bail!(
            "block {n} is not in {} (it has {} blocks, {} to {})",
            dir.display(),
            numbers.len(),
            numbers.first().copied().unwrap_or(0),
            numbers.last().copied().unwrap_or(0)
        ),
        None if numbers.len() == 1 => numbers[0],
        None => bail!(
            "{} holds {} blocks: choose one with --block N",
            dir.display(),
            numbers.len()
        ),
    };
    let block = source
        .load_all()
        .into_iter()
        .find(|(n, _)| *n == number)
        .map(|(_, b)| b)
        .context("the block disappeared while loading")?
        .with_context(|| format!("cannot load block {number}"))?;
    let engine = args.engine.engine;
    let options = RunOptions {
        trace: args.trace.is_some(),
        ..RunOptions::threads(args.engine.threads())
    };
    // The VM reads the pre-block state through the same storage as the engine.
    let latency = Duration::from_micros(args.latency_us);
    let (outcome, metrics, wall) = if latency.is_zero() {
        let storage = &block.pre_state;
        let vm = EvmVm::with_pre_block(&block.block, storage);
        timed(engine, &vm, storage, &options, args.repeat)?
    } else {
        let storage = &LatencyStorage::new(&block.pre_state, latency);
        let vm = EvmVm::with_pre_block(&block.block, storage);
        timed(engine, &vm, storage, &options, args.repeat)?
    };
    let gas = outcome.gas_used();
    let gas_per_s = gas as f64 / wall.median.as_secs_f64();
    let root = receipts_root(block.spec(), &outcome.tx_outcomes);
    let gas_ok = gas == block.expected.gas_used;
    let bloom_ok = logs_bloom(&outcome.tx_outcomes) == block.expected.logs_bloom;
    let root_ok = root.map(|r| r == block.expected.receipts_root);
    let digest = outcome.state_diff_hash();
    let ok = |b: bool| if b { "ok" } else { "MISMATCH" };
    out!("block           {number} ({})", fork_name(block.spec()));
    out!(
        "engine          {engine}, {} threads, read latency {} us{}",
        options.threads,
        args.latency_us,
        if options.trace { ", traced" } else { "" }
    );
    out!("transactions    {}", outcome.tx_outcomes.len());
    out!("gas             {gas}");
    print_wall(&wall);
    out!("throughput      {:.3} Mgas/s", gas_per_s / 1e6);
    out!(
        "header check    gas {}, bloom {}, receipts root {}",
        ok(gas_ok),
        ok(bloom_ok),
        root_ok.map_or("not checkable (pre-Byzantium)", ok)
    );
    if let Some(root) = root {
        out!("receipts root   {root}");
    }
    out!("state diff hash {digest}");
    if args.stats {
        print_metrics(&metrics);
    }
    let label = format!("block {number}");
    if let Some(path) = &args.trace {
        trace_out::write(
            path,
            &trace_out::TracedRun {
                engine: engine.name(),
                workload: &label,
                threads: options.threads,
                txs: outcome.tx_outcomes.len(),
                gas,
            },
            &metrics,
        )?;
    }
    let passed = gas_ok && bloom_ok && root_ok != Some(false);
    if let Some(path) = &args.json {
        let value = json!({
            "engine": engine.name(),
            "workload": label,
            "block": number,
            "threads": options.threads,
            "txs": outcome.tx_outcomes.len(),
            "gas": gas,
            "wall_ms": wall.median.as_secs_f64() * 1e3,
            "min_wall_ms": wall.min.as_secs_f64() * 1e3,
            "runs": wall.runs,
            "gas_per_s": gas_per_s,
            "receipts_root": root.map(|r| r.to_string()),
            "state_diff_hash": digest.to_string(),
            "header_ok": passed,
            "latency_us": args.latency_us,
            "metrics": metrics_json(&metrics),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !passed {
        bail!("block {number} does not match its header");
    }
    Ok(ExitCode::SUCCESS)
}
