//! `parex run --trace`, `parex run --block` and `parex report`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn parex(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parex"))
        .args(args)
        .output()
        .expect("parex runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "expected failure: {}", text(&o.stdout));
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "no panic: {err}");
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../report/tests/fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("parex-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn read_json(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Runs a traced block-stm erc20 block of `txs` transactions on 2 threads; returns the
/// trace and the workers that have spans.
fn traced_run(txs: u64, trace: &str) -> (serde_json::Value, BTreeSet<u64>) {
    let o = parex(&[
        "run",
        "--workload",
        "erc20",
        "--txs",
        &txs.to_string(),
        "--engine",
        "block-stm",
        "--threads",
        "2",
        "--trace",
        trace,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = read_json(trace);
    let workers = t["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["worker"].as_u64().unwrap())
        .collect();
    (t, workers)
}

#[test]
fn a_traced_run_reports_into_one_html_page() {
    let dir = TempDir::new("report");
    let (trace, html) = (dir.file("t.json"), dir.file("r.html"));
    // A 200-transaction block takes about a millisecond: on a loaded machine the second
    // worker's thread may not get a core before the first has done everything (then it
    // rightly has no spans). Retry, then grow the block, until both worked.
    let sizes = [200, 200, 200, 200, 200, 2000, 2000, 5000];
    let (t, workers, txs) = sizes
        .iter()
        .map(|&n| {
            let (t, w) = traced_run(n, &trace);
            (t, w, n)
        })
        .find(|(_, w, _)| w.len() >= 2)
        .expect("a run in which both workers have spans");
    assert_eq!(t["engine"], "block-stm");
    assert_eq!(t["workload"], "erc20 hot 0");
    assert_eq!(t["threads"], 2);
    assert_eq!(t["txs"], txs);
    assert!(t["gas"].as_u64().unwrap() > txs * 21_000);
    assert!(t["workers"].as_u64().unwrap() >= 2, "{workers:?}");
    let wall = t["wall_ns"].as_u64().unwrap();
    let spans = t["spans"].as_array().unwrap();
    let executed: BTreeSet<u64> = spans
        .iter()
        .filter(|s| s["kind"] == "execute" || s["kind"] == "reexecute")
        .filter_map(|s| s["tx"].as_u64())
        .collect();
    assert_eq!(executed, (0..txs).collect(), "every transaction executed");
    for s in spans {
        let (a, b) = (
            s["start_ns"].as_u64().unwrap(),
            s["end_ns"].as_u64().unwrap(),
        );
        assert!(a <= b && b <= wall, "{s}");
    }

    let o = parex(&[
        "report",
        &fixture("bench_2t.json"),
        &fixture("bench_1t4t.json"),
        "--trace",
        &trace,
        "--analyze",
        &fixture("analyze.json"),
        "-o",
        &html,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains(" trace spans"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.matches("<svg").count() >= 6);
    assert!(page.contains("worker 1 · "), "rows for both workers");
    // The last transaction's span: its own rectangle, or the end of a merged one.
    let last = txs - 1;
    assert!(
        page.contains(&format!(" tx {last} ")) || page.contains(&format!("–{last} ·")),
        "tx {last} in the timeline"
    );
    assert!(!page.contains("<script"));
}

#[test]
fn run_executes_one_mainnet_block_and_traces_it() {
    let dir = TempDir::new("block");
    let trace = dir.file("b.json");
    let o = parex(&[
        "run",
        "--block",
        "12244000",
        "--engine",
        "block-stm",
        "--threads",
        "2",
        "--trace",
        &trace,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("header check    gas ok, bloom ok, receipts root ok"),
        "{out}"
    );
    let t = read_json(&trace);
    assert_eq!(t["workload"], "block 12244000");
    assert_eq!(t["txs"], 133);
    assert!(!t["spans"].as_array().unwrap().is_empty());

    assert_clean_failure(&parex(&["run", "--block", "5"]), &["block 5 is not in"]);
    assert_clean_failure(
        &parex(&["run", "--block", "46147", "--workload", "raw"]),
        &["--workload"],
    );
    assert_clean_failure(&parex(&["run"]), &["--workload"]);
}

#[test]
fn report_rejects_bad_input_naming_the_file() {
    let dir = TempDir::new("report-bad");
    let html = dir.file("r.html");
    assert_clean_failure(
        &parex(&["report", "/nonexistent/bench.json", "-o", &html]),
        &["/nonexistent/bench.json", "No such file"],
    );
    let bad = dir.file("bad.json");
    std::fs::write(&bad, "{\"cells\": [ {\"workload\": \"raw\"").unwrap();
    assert_clean_failure(
        &parex(&["report", &bad, "-o", &html]),
        &["bad.json", "not valid bench JSON", "line 1"],
    );
    std::fs::write(
        &bad,
        "{\"cells\": [{\"workload\": \"raw\", \"engine\": \"dag\"}]}",
    )
    .unwrap();
    assert_clean_failure(
        &parex(&["report", &bad, "-o", &html]),
        &["bad.json", "missing field `threads`"],
    );
    assert_clean_failure(
        &parex(&["report", "--trace", &fixture("bench_2t.json"), "-o", &html]),
        &["trace file", "bench_2t.json"],
    );
    assert_clean_failure(&parex(&["report", "-o", &html]), &["nothing to report"]);
    assert!(!Path::new(&html).exists(), "nothing written on failure");
    let o = parex(&["report", "--help"]);
    assert!(o.status.success() && text(&o.stdout).contains("Usage: parex report"));
}
