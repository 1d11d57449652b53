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

#[test]
fn a_traced_run_reports_into_one_html_page() {
    let dir = TempDir::new("report");
    let (trace, html) = (dir.file("t.json"), dir.file("r.html"));
    let o = parex(&[
        "run",
        "--workload",
        "erc20",
        "--txs",
        "200",
        "--engine",
        "block-stm",
        "--threads",
        "2",
        "--trace",
        &trace,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    let t = read_json(&trace);
    assert_eq!(t["engine"], "block-stm");
    assert_eq!(t["workload"], "erc20 hot 0");
    assert_eq!(t["threads"], 2);
    assert_eq!(t["txs"], 200);
    assert!(t["gas"].as_u64().unwrap() > 200 * 21_000);
    let wall = t["wall_ns"].as_u64().unwrap();
    let spans = t["spans"].as_array().unwrap();
    let workers: BTreeSet<u64> = spans
        .iter()
        .map(|s| s["worker"].as_u64().unwrap())
        .collect();
    assert!(workers.len() >= 2, "spans of {workers:?}");
    assert!(t["workers"].as_u64().unwrap() >= 2);
    let executed: BTreeSet<u64> = spans
        .iter()
        .filter(|s| s["kind"] == "execute" || s["kind"] == "reexecute")
        .filter_map(|s| s["tx"].as_u64())
        .collect();
    assert_eq!(executed, (0..200).collect(), "every transaction executed");
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
    assert!(text(&o.stdout).contains("200 trace spans") || text(&o.stdout).contains("trace spans"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.matches("<svg").count() >= 6);
    assert!(page.contains("worker 1 · "), "rows for both workers");
    assert!(page.contains(" tx 199 · "), "the last transaction's span");
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
