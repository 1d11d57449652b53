//! The report's inputs, as `parex bench --json`, `parex analyze --json` and
//! `parex run --trace` write them. Parsing is lenient about what it does not use (extra
//! fields are ignored, most numbers may be `null` or missing) and strict about what it
//! needs (a bench file has `cells`, each with `workload`, `engine` and `threads`; a trace
//! has `workers`, `wall_ns` and well-formed `spans`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A report input that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {kind} file {}", path.display())]
    Read {
        kind: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{kind} file {} is not valid {kind} JSON", path.display())]
    Parse {
        kind: &'static str,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{kind} file {} is inconsistent: {message}", path.display())]
    Invalid {
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// `parex bench --json`: one measured cell per workload × engine × thread count.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BenchFile {
    pub parex_version: Option<String>,
    pub machine: Option<Machine>,
    pub repeat: Option<u64>,
    pub cells: Vec<BenchCell>,
    pub mainnet_summary: Option<Vec<MainnetSummary>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Machine {
    pub cores: Option<u64>,
    pub os: Option<String>,
}

/// One engine on one workload at one thread count.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BenchCell {
    /// `raw`, `erc20`, `swap`, `mix`, `chain`, ... or `mainnet` (then `block` is set).
    pub workload: String,
    pub hot_ratio: Option<f64>,
    pub engine: String,
    pub threads: u32,
    pub latency_us: Option<f64>,
    pub txs: Option<f64>,
    pub gas: Option<f64>,
    pub median_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub gas_per_s: Option<f64>,
    pub txs_per_s: Option<f64>,
    pub speedup_vs_sequential: Option<f64>,
    /// The 25th and 75th percentiles of the per-round speedups (`parex bench`).
    pub speedup_quartiles: Option<[f64; 2]>,
    pub reexecutions_per_tx: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub block: Option<u64>,
    /// What the block's dependencies allow with unlimited threads (`parex analyze`).
    pub ideal_speedup: Option<f64>,
    /// What they allow at this cell's thread count.
    pub bound_at_threads: Option<f64>,
    /// What the machine allows at this thread count: the speedup of that many independent
    /// sequential runs side by side (`parex bench`).
    pub machine_ceiling: Option<f64>,
}

impl BenchCell {
    pub fn is_mainnet(&self) -> bool {
        self.workload == "mainnet" || self.block.is_some()
    }

    /// The synthetic workload a cell measured, as a short label ("erc20 hot 0.3, 100 µs").
    pub fn workload_label(&self) -> String {
        if let Some(b) = self.block {
            return format!("block {b}");
        }
        let mut s = self.workload.clone();
        if let Some(h) = self.hot_ratio {
            s.push_str(&format!(" hot {}", crate::svg::num(h)));
        }
        if let Some(l) = self.latency_us.filter(|l| *l > 0.0) {
            s.push_str(&format!(", {} µs", crate::svg::num(l)));
        }
        s
    }

    /// [`Self::workload_label`] with the block's size ("erc20 hot 0, 19.4k txs"), for
    /// inputs that measured a workload at several sizes.
    pub fn sized_label(&self) -> String {
        let mut s = self.workload_label();
        if self.block.is_none()
            && let Some(txs) = self.txs
        {
            let size = if txs >= 10_000.0 {
                format!("{:.1}k", txs / 1000.0)
            } else {
                crate::svg::num(txs)
            };
            s.push_str(&format!(", {size} txs"));
        }
        s
    }
}

/// How to label `cells` apart: by [`BenchCell::workload_label`], with the size added
/// ([`BenchCell::sized_label`]) to the workloads measured at several sizes.
pub fn labeler<'a>(cells: &[&'a BenchCell]) -> impl Fn(&BenchCell) -> String + use<'a> {
    let mut sizes: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for c in cells {
        let txs = c.txs.unwrap_or(0.0).to_bits();
        let seen = sizes.entry(c.workload_label()).or_default();
        if !seen.contains(&txs) {
            seen.push(txs);
        }
    }
    move |c: &BenchCell| {
        let label = c.workload_label();
        if sizes.get(&label).is_some_and(|s| s.len() > 1) {
            c.sized_label()
        } else {
            label
        }
    }
}

/// An engine's speedup over all mainnet blocks of a bench run.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct MainnetSummary {
    pub engine: String,
    pub threads: Option<u32>,
    pub geomean_speedup: Option<f64>,
    pub worst_speedup: Option<f64>,
    pub worst_block: Option<u64>,
}

/// `parex analyze --json`: what one block's dependencies allow.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Analyze {
    pub source: Option<String>,
    pub txs: Option<u64>,
    pub total_gas: Option<f64>,
    pub dependent_txs: Option<u64>,
    pub dependent_ratio: Option<f64>,
    pub critical_path_txs: Option<u64>,
    pub critical_path_gas: Option<f64>,
    pub ideal_speedup: Option<f64>,
    /// Thread count (as a string key) → speedup bound.
    pub speedup_bound_at: Option<BTreeMap<String, Option<f64>>>,
    pub dependency_distance_histogram: Option<Vec<DistanceBucket>>,
    pub hot_keys: Option<Vec<HotKey>>,
}

/// Dependencies whose distance (reader index − writer index) lies in `min..=max`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DistanceBucket {
    pub min: u64,
    pub max: u64,
    pub count: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HotKey {
    pub key: String,
    pub writers: Option<u64>,
    pub dependent_reads: Option<u64>,
}

/// `parex run --trace`: every worker's timeline of one block run.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TraceFile {
    pub engine: Option<String>,
    pub workload: Option<String>,
    pub threads: Option<u32>,
    pub txs: Option<u64>,
    pub gas: Option<f64>,
    pub wall_ns: u64,
    pub workers: u32,
    pub spans: Vec<TraceSpan>,
}

/// One interval of one worker; `kind` is `execute`, `reexecute`, `validate`, `blocked`,
/// `wait`, `hint`, `merge` or `finalize` (others are drawn too, in a neutral color).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TraceSpan {
    pub worker: u32,
    pub kind: String,
    pub tx: Option<u64>,
    pub start_ns: u64,
    pub end_ns: u64,
}

fn read(kind: &'static str, path: &Path) -> Result<String, ReportError> {
    std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        kind,
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: DeserializeOwned>(
    kind: &'static str,
    path: &Path,
    text: &str,
) -> Result<T, ReportError> {
    serde_json::from_str(text).map_err(|source| ReportError::Parse {
        kind,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(kind: &'static str, path: &Path, message: String) -> ReportError {
    ReportError::Invalid {
        kind,
        path: path.to_path_buf(),
        message,
    }
}

impl BenchFile {
    pub fn load(path: &Path) -> Result<Self, ReportError> {
        Self::parse(path, &read("bench", path)?)
    }

    /// Parses `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ReportError> {
        let file: BenchFile = parse("bench", path, text)?;
        for (i, c) in file.cells.iter().enumerate() {
            if c.threads == 0 {
                return Err(invalid("bench", path, format!("cell {i} has threads 0")));
            }
            if c.workload.is_empty() || c.engine.is_empty() {
                return Err(invalid(
                    "bench",
                    path,
                    format!("cell {i} has an empty workload or engine"),
                ));
            }
        }
        Ok(file)
    }
}

impl Analyze {
    /// Loads one analysis, or several when the file holds a JSON array of them.
    pub fn load(path: &Path) -> Result<Vec<Self>, ReportError> {
        Self::parse(path, &read("analyze", path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Vec<Self>, ReportError> {
        let value: serde_json::Value = parse("analyze", path, text)?;
        let one = |v: serde_json::Value| -> Result<Analyze, ReportError> {
            if !v.is_object() {
                return Err(invalid(
                    "analyze",
                    path,
                    "expected a JSON object (or an array of them)".into(),
                ));
            }
            serde_json::from_value(v).map_err(|source| ReportError::Parse {
                kind: "analyze",
                path: path.to_path_buf(),
                source,
            })
        };
        match value {
            serde_json::Value::Array(items) => items.into_iter().map(one).collect(),
            v => Ok(vec![one(v)?]),
        }
    }

    /// `speedup_bound_at` as (threads, bound), by thread count.
    pub fn bounds(&self) -> Vec<(u32, f64)> {
        let mut v: Vec<(u32, f64)> = self
            .speedup_bound_at
            .iter()
            .flatten()
            .filter_map(|(k, b)| Some((k.trim().parse().ok()?, (*b)?)))
            .collect();
        v.sort_by_key(|(t, _)| *t);
        v
    }
}

impl TraceFile {
    pub fn load(path: &Path) -> Result<Self, ReportError> {
        Self::parse(path, &read("trace", path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ReportError> {
        let mut trace: TraceFile = parse("trace", path, text)?;
        for (i, s) in trace.spans.iter().enumerate() {
            if s.end_ns < s.start_ns {
                return Err(invalid(
                    "trace",
                    path,
                    format!(
                        "span {i} ends before it starts ({} < {})",
                        s.end_ns, s.start_ns
                    ),
                ));
            }
        }
        // Tolerate a worker count that undercounts the spans, and a wall time that ends
        // before the last span.
        let max_worker = trace.spans.iter().map(|s| s.worker + 1).max().unwrap_or(0);
        trace.workers = trace.workers.max(max_worker);
        let last = trace.spans.iter().map(|s| s.end_ns).max().unwrap_or(0);
        trace.wall_ns = trace.wall_ns.max(last);
        Ok(trace)
    }
}
