//! `parex bench --processes N`: the whole matrix measured in N processes, one after
//! another, each the same bench with `--json` to a file of its own, and merged cell by
//! cell: the median over the processes of each cell's median time and speedup, the lowest
//! minimum, and the lowest and highest speedup (`speedup_process_range`).
//!
//! Why: within one process every engine's runs are interleaved with `sequential`'s, so the
//! machine's drift cancels out of a ratio, but not where the process's code and data
//! happened to land; the same function, run as two engines of one process, has measured 4%
//! apart in one process and equal in the next. Only other processes show that.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

use super::{
    BenchArgs, Cell, Plan, finish, mainnet_summary, per_second, print_tables, quantile, write_json,
};

/// Runs the bench of `args` in `args.processes` child processes and reports the merge.
pub(super) fn run(args: &BenchArgs, plan: &Plan) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the parex binary to run again")?;
    let child_args = child_args(std::env::args_os().skip(1));
    let mut per_process = Vec::new();
    let mut failures = Vec::new();
    for i in 1..=args.processes {
        eprintln!("bench: process {i} of {}", args.processes);
        let json = scratch_json(i);
        let status = Command::new(&exe)
            .args(&child_args)
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("cannot start bench process {i}"))?;
        let text = std::fs::read_to_string(&json);
        // The file is scratch either way (a failed child may have written it).
        let _ = std::fs::remove_file(&json);
        let Ok(text) = text else {
            bail!("bench process {i} of {} failed ({status})", args.processes);
        };
        let result: ProcessResult = serde_json::from_str(&text)
            .with_context(|| format!("cannot read the results of bench process {i}"))?;
        failures.extend(
            result
                .failures
                .into_iter()
                .map(|f| format!("process {i}: {f}")),
        );
        per_process.push(result.cells);
    }
    let cells = merge(&per_process);
    let summary = mainnet_summary(plan, &cells);
    print_tables(&cells, &summary);
    if let Some(path) = &args.json {
        write_json(path, plan, args.processes, &cells, &summary, &failures)?;
    }
    finish(&failures)
}

/// What a child's `--json` holds that the merge needs.
#[derive(serde::Deserialize)]
struct ProcessResult {
    cells: Vec<Cell>,
    failures: Vec<String>,
}

/// This process's arguments for a child: the same, without `--processes` and `--json`
/// (each child writes its own file).
fn child_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const DROPPED: [&str; 2] = ["--processes", "--json"];
    let mut out = Vec::new();
    let mut args = args;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if DROPPED.contains(&text.as_ref()) {
            args.next();
        } else if !DROPPED.iter().any(|d| text.starts_with(&format!("{d}="))) {
            out.push(arg);
        }
    }
    out
}

fn scratch_json(process: u64) -> PathBuf {
    std::env::temp_dir().join(format!(
        "parex-bench-{}-process-{process}.json",
        std::process::id()
    ))
}

/// Cells of several processes merged: for each cell (in the first process's order; one
/// missing from some process, a failed engine there, merges those that have it) the median
/// of the medians, times and speedups, the lowest minimum, the summed runs, the median
/// ceiling and quartiles' bounds, the mean re-executions, the highest peak RSS and, for
/// engines other than `sequential`, the range of the speedups.
fn merge(per_process: &[Vec<Cell>]) -> Vec<Cell> {
    let same = |a: &Cell, b: &Cell| {
        a.workload == b.workload
            && a.hot_ratio.to_bits() == b.hot_ratio.to_bits()
            && a.engine == b.engine
            && a.threads == b.threads
            && a.latency_us == b.latency_us
            && a.txs == b.txs
            && a.gas == b.gas
            && a.block == b.block
    };
    let mut order: Vec<&Cell> = Vec::new();
    for cell in per_process.iter().flatten() {
        if !order.iter().any(|c| same(c, cell)) {
            order.push(cell);
        }
    }
    order
        .into_iter()
        .map(|first| {
            let all: Vec<&Cell> = per_process
                .iter()
                .flatten()
                .filter(|c| same(c, first))
                .collect();
            let median_of = |f: &dyn Fn(&Cell) -> Option<f64>| {
                median(all.iter().filter_map(|c| f(c)).collect())
            };
            let median_ms = median_of(&|c| Some(c.median_ms)).unwrap_or(first.median_ms);
            let seconds = median_ms / 1e3;
            let speedups: Vec<f64> = all.iter().map(|c| c.speedup_vs_sequential).collect();
            let is_reference = first.engine == "sequential";
            Cell {
                median_ms,
                min_ms: all.iter().map(|c| c.min_ms).fold(f64::INFINITY, f64::min),
                runs: all.iter().map(|c| c.runs).sum(),
                gas_per_s: per_second(first.gas as f64, seconds),
                txs_per_s: per_second(first.txs as f64, seconds),
                speedup_vs_sequential: median(speedups.clone()).unwrap_or(1.0),
                speedup_quartiles: match (
                    median_of(&|c| c.speedup_quartiles.map(|q| q[0])),
                    median_of(&|c| c.speedup_quartiles.map(|q| q[1])),
                ) {
                    (Some(low), Some(high)) => Some([low, high]),
                    _ => None,
                },
                machine_ceiling: median_of(&|c| c.machine_ceiling),
                reexecutions_per_tx: all.iter().map(|c| c.reexecutions_per_tx).sum::<f64>()
                    / all.len() as f64,
                peak_rss_mb: all.iter().filter_map(|c| c.peak_rss_mb).reduce(f64::max),
                speedup_process_range: (!is_reference).then(|| {
                    [
                        speedups.iter().copied().fold(f64::INFINITY, f64::min),
                        speedups.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    ]
                }),
                ..first.clone()
            }
        })
        .collect()
}

/// The median (the mean of the middle two for an even count); none of nothing.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(quantile(&values, 0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(engine: &str, median_ms: f64, speedup: f64, quartiles: Option<[f64; 2]>) -> Cell {
        Cell {
            workload: "raw".into(),
            hot_ratio: 0.0,
            engine: engine.into(),
            threads: 2,
            latency_us: 0,
            txs: 100,
            gas: 2_100_000,
            median_ms,
            min_ms: median_ms * 0.9,
            runs: 5,
            gas_per_s: 0.0,
            txs_per_s: 0.0,
            speedup_vs_sequential: speedup,
            speedup_quartiles: quartiles,
            machine_ceiling: Some(1.9),
            reexecutions_per_tx: 0.1,
            peak_rss_mb: Some(10.0),
            block: None,
            ideal_speedup: None,
            bound_at_threads: None,
            speedup_process_range: None,
        }
    }

    #[test]
    fn processes_merge_into_medians_and_the_range_of_speedups() {
        let runs = [
            vec![
                cell("sequential", 10.0, 1.0, None),
                cell("block-stm", 6.0, 1.6, Some([1.5, 1.7])),
            ],
            vec![
                cell("sequential", 12.0, 1.0, None),
                cell("block-stm", 6.0, 2.0, Some([1.9, 2.1])),
            ],
            vec![
                cell("sequential", 11.0, 1.0, None),
                cell("block-stm", 5.0, 2.2, Some([2.1, 2.3])),
            ],
        ];
        let merged = merge(&runs);
        assert_eq!(merged.len(), 2);
        let (seq, stm) = (&merged[0], &merged[1]);
        assert_eq!(seq.engine, "sequential");
        assert_eq!(seq.median_ms, 11.0);
        assert_eq!(seq.speedup_process_range, None);
        assert_eq!(seq.runs, 15);
        assert_eq!(stm.median_ms, 6.0);
        assert_eq!(stm.min_ms, 4.5);
        assert_eq!(stm.speedup_vs_sequential, 2.0);
        assert_eq!(stm.speedup_process_range, Some([1.6, 2.2]));
        assert_eq!(stm.speedup_quartiles, Some([1.9, 2.1]));
        assert!((stm.gas_per_s - 2_100_000.0 / 0.006).abs() < 1e-3);
        // A cell one process lacks (its engine failed there) merges the others.
        let partial = merge(&[runs[0].clone(), runs[1][..1].to_vec()]);
        assert_eq!(partial[1].speedup_process_range, Some([1.6, 1.6]));
        assert_eq!(partial[1].runs, 5);
    }

    #[test]
    fn children_get_the_arguments_without_processes_and_json() {
        let args = [
            "bench",
            "--processes",
            "3",
            "--json",
            "out.json",
            "--threads",
            "2",
            "--processes=4",
            "--json=x.json",
            "--no-mainnet",
        ]
        .map(OsString::from);
        let kept = child_args(args.into_iter());
        assert_eq!(
            kept,
            ["bench", "--threads", "2", "--no-mainnet"].map(OsString::from)
        );
    }
}
