//! The `parex` binary: verify, run, and clear errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

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

/// A failure: non-zero exit, an error message on stderr, and no panic.
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

#[test]
fn verify_passes_every_builtin_block_and_ends_with_the_count() {
    let o = parex(&["verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().last(), Some("51 passed, 0 failed"));
    assert_eq!(out.lines().filter(|l| l.contains(" ok ")).count(), 51);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("receipts root not checked"))
            .count(),
        11
    );
}

#[test]
fn verify_reports_a_missing_directory() {
    assert_clean_failure(
        &parex(&["verify", "/nonexistent/parex-data"]),
        "/nonexistent/parex-data",
    );
}

#[test]
fn verify_counts_malformed_blocks_as_failures() {
    let dir = std::env::temp_dir().join(format!("parex-bad-{}", std::process::id()));
    let block = dir.join("blocks/100");
    std::fs::create_dir_all(&block).unwrap();
    std::fs::write(block.join("block.json"), "{ not json").unwrap();
    std::fs::write(block.join("pre_state.json"), "{}").unwrap();
    let o = parex(&["verify", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("malformed JSON") && out.contains("block.json"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("0 passed, 1 failed"));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn unknown_names_and_nonsensical_parameters_are_rejected() {
    assert_clean_failure(
        &parex(&["verify", "--engine", "warp"]),
        "possible values: sequential, block-stm",
    );
    assert_clean_failure(
        &parex(&["run", "--workload", "nft"]),
        "invalid value 'nft' for '--workload",
    );
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--hot-ratio", "1.5"]),
        "between 0 and 1",
    );
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--hot-ratio", "-0.5"]),
        "between 0 and 1",
    );
    // A latency of hours per read would stall the run instead of failing it.
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--latency-us", "99999999999"]),
        "--latency-us",
    );
    assert_clean_failure(&parex(&["run", "--workload", "raw", "--txs", "0"]), "--txs");
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--threads", "0"]),
        "--threads",
    );
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--gas", "lots"]),
        "not an amount of gas",
    );
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--txs", "5", "--gas", "1G"]),
        "cannot be used with",
    );
    assert_clean_failure(
        &parex(&[
            "run",
            "--workload",
            "raw",
            "--txs",
            "1000",
            "--accounts",
            "50",
        ]),
        "too few",
    );
    assert_clean_failure(
        &parex(&[
            "run",
            "--workload",
            "raw",
            "--txs",
            "10",
            "--json",
            "/nonexistent/dir/x.json",
        ]),
        "cannot write",
    );
}

#[test]
fn run_prints_results_and_writes_json_that_identifies_the_result() {
    let dir = std::env::temp_dir();
    let a = dir.join(format!("parex-run-a-{}.json", std::process::id()));
    let b = dir.join(format!("parex-run-b-{}.json", std::process::id()));
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    for path in [&a, &b] {
        let o = parex(&[
            "run",
            "--workload",
            "mix",
            "--txs",
            "300",
            "--hot-ratio",
            "0.3",
            "--seed",
            "9",
            "--stats",
            "--json",
            path.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        for field in [
            "transactions",
            "gas",
            "wall time",
            "throughput",
            "receipts root",
            "state diff hash",
            "executions",
        ] {
            assert!(out.contains(field), "missing {field}: {out}");
        }
    }
    let (ja, jb) = (read(&a), read(&b));
    for key in [
        "engine",
        "workload",
        "threads",
        "txs",
        "gas",
        "wall_ms",
        "gas_per_s",
        "receipts_root",
        "state_diff_hash",
    ] {
        assert!(ja.get(key).is_some(), "JSON lacks {key}: {ja}");
    }
    assert_eq!(ja["engine"], "sequential");
    assert_eq!(ja["workload"], "mix");
    assert_eq!(ja["txs"], 300);
    assert_eq!(
        ja["state_diff_hash"], jb["state_diff_hash"],
        "same seed, same result"
    );
    assert_eq!(ja["receipts_root"], jb["receipts_root"]);
    std::fs::remove_file(&a).ok();
    std::fs::remove_file(&b).ok();
}

#[test]
fn run_repeats_a_block_and_reports_the_median_run() {
    let path = std::env::temp_dir().join(format!("parex-run-repeat-{}.json", std::process::id()));
    let o = parex(&[
        "run",
        "--workload",
        "erc20",
        "--txs",
        "200",
        "--hot-ratio",
        "0.5",
        "--engine",
        "block-stm",
        "--threads",
        "2",
        "--repeat",
        "3",
        "--stats",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("(median of 3 runs; min "),
        "{}",
        stdout(&o)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(json["runs"], 3);
    let (median, min) = (
        json["wall_ms"].as_f64().unwrap(),
        json["min_wall_ms"].as_f64().unwrap(),
    );
    assert!(min > 0.0 && min <= median, "{json}");
    assert_eq!(
        json["metrics"]["executions"].as_u64().map(|e| e >= 200),
        Some(true)
    );
    std::fs::remove_file(&path).ok();
    assert_clean_failure(
        &parex(&["run", "--workload", "raw", "--txs", "10", "--repeat", "0"]),
        "--repeat",
    );
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["verify", "run", "pack"] {
        let o = parex(&[sub, "--help"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains("Usage: parex"), "{sub}");
    }
}

#[test]
fn pack_refuses_bad_blocks_and_leaves_nothing_half_written() {
    let dir = std::env::temp_dir().join(format!("parex-pack-{}", std::process::id()));
    let block = dir.join("src/blocks/7");
    std::fs::create_dir_all(&block).unwrap();
    std::fs::write(block.join("block.json"), "{ truncated").unwrap();
    std::fs::write(block.join("pre_state.json"), "{}").unwrap();
    let out = dir.join("out");
    let o = parex(&[
        "pack",
        dir.join("src").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "malformed JSON");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("src")],
        "nothing written beside the source"
    );

    // A good data set packs, and the copy verifies like the original.
    let Some(shared) = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/mainnet/blocks/12244000")
        .canonicalize()
        .ok()
    else {
        std::fs::remove_dir_all(&dir).ok();
        return;
    };
    let o = parex(&["pack", shared.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = parex(&["verify", out.to_str().unwrap()]);
    assert_eq!(stdout(&o).lines().last(), Some("1 passed, 0 failed"));
    std::fs::remove_dir_all(&dir).ok();
}
