//! `parex analyze` and `parex bench`: their output, their JSON schemas, and clean errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn parex(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parex"))
        .args(args)
        .output()
        .expect("parex runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure; stdout: {}",
        stdout(o)
    );
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "no panic: {err}");
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("parex-{name}-{}.json", std::process::id()))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::remove_file(path).ok();
    serde_json::from_str(&text).unwrap()
}

const ANALYZE_KEYS: [&str; 11] = [
    "source",
    "txs",
    "total_gas",
    "dependent_txs",
    "dependent_ratio",
    "critical_path_txs",
    "critical_path_gas",
    "ideal_speedup",
    "speedup_bound_at",
    "dependency_distance_histogram",
    "hot_keys",
];

fn analyze_json(args: &[&str], name: &str) -> (String, Value) {
    let path = temp(name);
    let mut all = vec!["analyze"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", path.to_str().unwrap()]);
    let o = parex(&all);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let j = read_json(&path);
    for key in ANALYZE_KEYS {
        assert!(j.get(key).is_some(), "analysis JSON lacks {key}: {j}");
    }
    for t in ["2", "8", "32"] {
        assert!(j["speedup_bound_at"][t].is_f64(), "bound at {t}: {j}");
    }
    (stdout(&o), j)
}

#[test]
fn analyze_a_chain_and_a_conflict_free_workload() {
    let (out, chain) = analyze_json(&["--workload", "chain", "--txs", "40"], "an-chain");
    assert!(out.contains("ideal speedup       1.00x"), "{out}");
    assert_eq!(chain["txs"], 40);
    assert_eq!(chain["dependent_txs"], 39);
    assert_eq!(chain["critical_path_txs"], 40);
    assert_eq!(chain["ideal_speedup"], 1.0);
    assert_eq!(chain["speedup_bound_at"]["32"], 1.0);
    assert_eq!(chain["dependency_distance_histogram"][0]["count"], 39);
    assert!(
        chain["source"]
            .as_str()
            .unwrap()
            .starts_with("workload chain")
    );

    // Raw transfers between fresh accounts: only the beneficiary's fee credit is shared,
    // and it is a delta, so nothing depends on anything.
    let (_, raw) = analyze_json(&["--workload", "raw", "--txs", "64"], "an-raw");
    assert_eq!(raw["dependent_txs"], 0);
    assert_eq!(raw["critical_path_txs"], 1);
    assert_eq!(raw["ideal_speedup"], 64.0);
    assert_eq!(raw["speedup_bound_at"]["2"], 2.0);
    // The beneficiary is credited by every transaction (a delta) and read by none.
    let hot = raw["hot_keys"].as_array().unwrap();
    assert_eq!(hot.len(), 1, "{raw}");
    assert_eq!(hot[0]["writers"], 64);
    assert_eq!(hot[0]["dependent_reads"], 0);
}

#[test]
fn analyze_a_mainnet_block() {
    let (out, j) = analyze_json(&["--block", "12244000"], "an-block");
    assert_eq!(j["source"], "block 12244000");
    assert_eq!(j["txs"], 133);
    assert_eq!(j["total_gas"], 12450737);
    let ideal = j["ideal_speedup"].as_f64().unwrap();
    let at2 = j["speedup_bound_at"]["2"].as_f64().unwrap();
    let at32 = j["speedup_bound_at"]["32"].as_f64().unwrap();
    assert!(
        (1.0..=2.0).contains(&at2) && at2 <= at32 && at32 <= ideal + 1e-9,
        "{j}"
    );
    // WETH's balance, kept apart from its account: its deposits are credits that no one
    // depends on, its withdrawals read it (with WETH's balance inside its account, 23% of
    // this block's transactions were dependent; now 12%).
    let hot = &j["hot_keys"][0];
    assert_eq!(
        hot["key"], "balance 0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2",
        "{j}"
    );
    assert!(j["dependent_ratio"].as_f64().unwrap() < 0.2, "{j}");
    assert!(hot["writers"].as_u64().unwrap() > 1);
    assert!(out.contains("hot keys"), "{out}");
    let counted: u64 = j["dependency_distance_histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert!(counted >= j["dependent_txs"].as_u64().unwrap());

    // The same block from the plain layout, when the shared data set is there.
    if let Ok(dir) = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/mainnet/blocks/12244000")
        .canonicalize()
    {
        let (_, plain) = analyze_json(&[dir.to_str().unwrap()], "an-plain");
        assert_eq!(plain, j, "plain and compact copies agree");
    }
}

#[test]
fn analyze_rejects_bad_input() {
    assert_clean_failure(
        &parex(&["analyze", "/nonexistent/parex-block"]),
        "/nonexistent/parex-block",
    );
    let dir = std::env::temp_dir().join(format!("parex-an-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = parex(&["analyze", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_clean_failure(&o, "cannot read mainnet data");
    assert_clean_failure(&parex(&["analyze"]), "nothing to analyze");
    assert_clean_failure(&parex(&["analyze", "--block", "7"]), "block 7 is not in");
    assert_clean_failure(
        &parex(&["analyze", "--block", "46147", "--workload", "raw"]),
        "cannot be used with",
    );
    assert_clean_failure(&parex(&["analyze", "--txs", "5"]), "--workload");
}

#[test]
fn bench_writes_the_documented_json() {
    let path = temp("bench");
    let o = parex(&[
        "bench",
        "--quick",
        "--workloads",
        "raw,mix@0.3",
        "--txs",
        "60",
        "--threads",
        "2",
        "--repeat",
        "1",
        "--min-time-ms",
        "0",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("| workload |") && out.contains("| mainnet |"),
        "{out}"
    );
    let j = read_json(&path);
    assert_eq!(j["parex_version"], env!("CARGO_PKG_VERSION"));
    assert!(j["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(j["machine"]["os"].is_string());
    assert_eq!(j["repeat"], 1);
    assert_eq!(j["min_time_ms"], 0);
    let cells = j["cells"].as_array().unwrap();
    let engines = j["engines"].as_array().unwrap();
    assert_eq!(engines[0], "sequential");
    let fields = [
        "workload",
        "hot_ratio",
        "engine",
        "threads",
        "latency_us",
        "txs",
        "gas",
        "median_ms",
        "min_ms",
        "runs",
        "gas_per_s",
        "txs_per_s",
        "speedup_vs_sequential",
        "speedup_quartiles",
        "machine_ceiling",
        "reexecutions_per_tx",
        "peak_rss_mb",
        "block",
        "ideal_speedup",
        "bound_at_threads",
    ];
    for c in cells {
        for f in fields {
            assert!(c.get(f).is_some(), "cell lacks {f}: {c}");
        }
        assert_eq!(c["threads"], 2);
        assert_eq!(c["latency_us"], 0);
        assert_eq!(c["runs"], 1, "--repeat 1 with no minimum time: {c}");
        assert!(c["median_ms"].as_f64().unwrap() >= c["min_ms"].as_f64().unwrap());
        assert!(c["median_ms"].as_f64().unwrap() > 0.0);
        let mainnet = c["workload"] == "mainnet";
        assert_eq!(c["block"].is_u64(), mainnet, "{c}");
        assert_eq!(c["ideal_speedup"].is_f64(), mainnet, "{c}");
        assert_eq!(c["bound_at_threads"].is_f64(), mainnet, "{c}");
        if !mainnet {
            assert_eq!(c["txs"], 60);
            let secs = c["median_ms"].as_f64().unwrap() / 1e3;
            let gas_per_s = c["gas"].as_f64().unwrap() / secs;
            assert!((c["gas_per_s"].as_f64().unwrap() / gas_per_s - 1.0).abs() < 1e-9);
            assert!((c["txs_per_s"].as_f64().unwrap() * secs - 60.0).abs() < 1e-6);
        }
        // The speedup is sequential's median over this cell's, measured in the same cell.
        let seq = cells
            .iter()
            .find(|s| {
                s["engine"] == "sequential"
                    && s["workload"] == c["workload"]
                    && s["hot_ratio"] == c["hot_ratio"]
                    && s["block"] == c["block"]
                    && s["txs"] == c["txs"]
                    && s["threads"] == c["threads"]
            })
            .expect("a sequential cell beside every cell");
        let expected = seq["median_ms"].as_f64().unwrap() / c["median_ms"].as_f64().unwrap();
        let speedup = c["speedup_vs_sequential"].as_f64().unwrap();
        assert!((speedup / expected - 1.0).abs() < 1e-9, "{c} vs {seq}");
        if c["engine"] == "sequential" {
            assert_eq!(speedup, 1.0);
            assert_eq!(c["reexecutions_per_tx"], 0.0);
        }
        // One round: no spread of per-round speedups to report.
        assert!(c["speedup_quartiles"].is_null(), "{c}");
        // Two sequential runs side by side: measured in every cell at 2 threads, the same
        // for every engine of the cell.
        let ceiling = c["machine_ceiling"]
            .as_f64()
            .expect("a ceiling at 2 threads");
        assert!(ceiling > 0.0 && ceiling.is_finite(), "{c}");
        assert_eq!(c["machine_ceiling"], seq["machine_ceiling"]);
    }
    let synthetic = cells.iter().filter(|c| c["workload"] != "mainnet").count();
    assert_eq!(
        synthetic,
        2 * engines.len(),
        "raw and mix@0.3, every engine"
    );
    assert!(
        cells
            .iter()
            .any(|c| c["workload"] == "mix" && c["hot_ratio"] == 0.3)
    );
    let mainnet_blocks = cells.iter().filter(|c| c["workload"] == "mainnet").count();
    assert_eq!(mainnet_blocks, 51 * engines.len());
    let summary = j["mainnet_summary"].as_array().unwrap();
    assert_eq!(
        summary.len(),
        engines.len() - 1,
        "one row per parallel engine"
    );
    for s in summary {
        for f in [
            "engine",
            "threads",
            "geomean_speedup",
            "worst_speedup",
            "worst_block",
            "geomean_bound",
            "geomean_ceiling",
        ] {
            assert!(s.get(f).is_some(), "summary lacks {f}: {s}");
        }
        assert!(s["worst_speedup"].as_f64() <= s["geomean_speedup"].as_f64());
        let worst = cells
            .iter()
            .find(|c| c["block"] == s["worst_block"] && c["engine"] == s["engine"])
            .expect("the worst block is a cell");
        assert_eq!(worst["speedup_vs_sequential"], s["worst_speedup"]);
    }
}

#[test]
fn bench_rejects_bad_input() {
    assert_clean_failure(
        &parex(&["bench", "--workloads", "nft"]),
        "unknown workload 'nft'",
    );
    assert_clean_failure(
        &parex(&["bench", "--workloads", "mix@2"]),
        "between 0 and 1",
    );
    assert_clean_failure(&parex(&["bench", "--engines", "warp"]), "possible values");
    assert_clean_failure(&parex(&["bench", "--threads", "0"]), "--threads");
    assert_clean_failure(
        &parex(&["bench", "--latency-us", "100,5000000"]),
        "--latency-us",
    );
    assert_clean_failure(&parex(&["bench", "--processes", "0"]), "--processes");
    assert_clean_failure(
        &parex(&["bench", "--json", "/nonexistent/dir/b.json"]),
        "cannot write",
    );
    assert_clean_failure(&parex(&["bench", "--blocks", "1"]), "has no block 1");
    assert_clean_failure(
        &parex(&["bench", "--blocks", "46147", "--no-mainnet"]),
        "cannot be used with",
    );
}

#[test]
fn bench_runs_in_several_processes_and_reports_their_spread() {
    let path = temp("bench-processes");
    let o = parex(&[
        "bench",
        "--workloads",
        "raw",
        "--txs",
        "100",
        "--no-mainnet",
        "--engines",
        "block-stm",
        "--threads",
        "2",
        "--repeat",
        "1",
        "--min-time-ms",
        "0",
        "--no-ceiling",
        "--processes",
        "2",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("range over processes"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        stderr(&o).matches("bench: process ").count(),
        2,
        "{}",
        stderr(&o)
    );
    let j = read_json(&path);
    assert_eq!(j["processes"], 2);
    let cells = j["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2, "{cells:?}");
    assert_eq!(cells[0]["engine"], "sequential");
    assert!(cells[0].get("speedup_process_range").is_none());
    let stm = &cells[1];
    assert_eq!(stm["engine"], "block-stm");
    // One timed run per process, merged.
    assert_eq!(stm["runs"], 2);
    let range = stm["speedup_process_range"].as_array().unwrap();
    let (low, high) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    let speedup = stm["speedup_vs_sequential"].as_f64().unwrap();
    assert!(low <= speedup && speedup <= high, "{low} {speedup} {high}");
    // Each process's scratch file is gone.
    let scratch = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("parex-bench-") && name.contains("-process-")
        })
        .count();
    assert_eq!(scratch, 0);
}

#[test]
fn bench_runs_only_the_blocks_asked_for() {
    let path = temp("bench-blocks");
    let o = parex(&[
        "bench",
        "--blocks",
        "46147,930196,46147",
        "--engines",
        "block-stm",
        "--threads",
        "2",
        "--repeat",
        "1",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let j = read_json(&path);
    let mut blocks: Vec<u64> = j["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["block"].as_u64().expect("only mainnet cells"))
        .collect();
    blocks.dedup();
    assert_eq!(blocks, [46147, 930196]);
    // Blocks this short (microseconds) never add up to the default 200 ms of sequential
    // runs: every engine gets the most rounds, 100 per --repeat.
    assert_eq!(j["min_time_ms"], 200);
    for c in j["cells"].as_array().unwrap() {
        assert_eq!(c["runs"], 100, "{c}");
    }
}

#[test]
fn bench_adds_rounds_until_sequential_reaches_the_minimum_time() {
    let path = temp("bench-min-time");
    let o = parex(&[
        "bench",
        "--workloads",
        "raw",
        "--txs",
        "100",
        "--no-mainnet",
        "--engines",
        "optimistic",
        "--threads",
        "2",
        "--repeat",
        "2",
        "--min-time-ms",
        "30",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let j = read_json(&path);
    let cells = j["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    // A 100-transaction block takes well under 15 ms: two rounds cannot add up to 30 ms,
    // so rounds were added, at most 100 per --repeat, and every engine ran in each.
    let runs = cells[0]["runs"].as_u64().unwrap();
    assert!((3..=200).contains(&runs), "{runs} runs");
    assert_eq!(cells[1]["runs"], cells[0]["runs"]);
}

#[test]
fn bench_measures_the_machine_ceiling_above_one_thread_unless_told_not_to() {
    let run = |name: &str, extra: &[&str]| {
        let path = temp(name);
        let mut args = vec![
            "bench",
            "--workloads",
            "erc20",
            "--txs",
            "200",
            "--no-mainnet",
            "--engines",
            "block-stm",
            "--repeat",
            "2",
            "--min-time-ms",
            "0",
            "--json",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = parex(&args);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        (stdout(&o), read_json(&path))
    };
    let (out, j) = run("bench-ceiling", &["--threads", "1,3"]);
    assert!(out.contains("| machine ceiling |"), "{out}");
    for c in j["cells"].as_array().unwrap() {
        // Two rounds: the per-round speedups' quartiles, for every engine but the base.
        let quartiles = &c["speedup_quartiles"];
        if c["engine"] == "sequential" {
            assert!(quartiles.is_null(), "{c}");
        } else {
            let [low, high] = [0, 1].map(|i| quartiles[i].as_f64().expect("two quartiles"));
            assert!(0.0 < low && low <= high && high.is_finite(), "{c}");
        }
        let ceiling = &c["machine_ceiling"];
        if c["threads"] == 1 {
            assert!(ceiling.is_null(), "no ceiling at one thread: {c}");
        } else {
            // A ratio of timings: measured and positive (its size is the machine's, and
            // under a loaded test run anything; speed is never asserted in tests).
            let x = ceiling.as_f64().expect("a ceiling at 3 threads");
            assert!(x > 0.0 && x.is_finite(), "{c}");
        }
    }
    let (_, j) = run("bench-no-ceiling", &["--threads", "2", "--no-ceiling"]);
    for c in j["cells"].as_array().unwrap() {
        assert!(c["machine_ceiling"].is_null(), "--no-ceiling: {c}");
    }
}

#[test]
fn analyze_and_bench_have_help() {
    for sub in ["analyze", "bench"] {
        let o = parex(&[sub, "--help"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Usage: parex"), "{sub}");
    }
}
