//! `parex run --trace FILE`: every worker's timeline of the run, as JSON for
//! `parex report --trace`.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use parex_engine::Metrics;
use parex_engine::trace::Span;
use serde::Serialize;

/// What a trace file holds: the run it describes, then the spans.
#[derive(Serialize)]
struct TraceJson<'a> {
    engine: &'a str,
    /// "erc20 hot 0" or "block 46147".
    workload: &'a str,
    threads: usize,
    txs: usize,
    gas: u64,
    wall_ns: u64,
    workers: u32,
    spans: &'a [Span],
}

/// The run being written down.
pub struct TracedRun<'a> {
    pub engine: &'a str,
    pub workload: &'a str,
    pub threads: usize,
    pub txs: usize,
    pub gas: u64,
}

/// Writes `metrics.trace` to `path`.
pub fn write(path: &Path, run: &TracedRun<'_>, metrics: &Metrics) -> Result<()> {
    let trace = metrics
        .trace
        .as_ref()
        .with_context(|| format!("engine {} recorded no trace", run.engine))?;
    let json = TraceJson {
        engine: run.engine,
        workload: run.workload,
        threads: run.threads,
        txs: run.txs,
        gas: run.gas,
        wall_ns: trace.wall_ns,
        workers: trace.workers,
        spans: &trace.spans,
    };
    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer(&mut file, &json)?;
        file.write_all(b"\n")?;
        file.flush()
    };
    write().with_context(|| format!("cannot write trace {}", path.display()))
}
