//! `parex report`: one self-contained HTML page from bench, trace and analyze JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use parex_report::{Inputs, render};

#[derive(Args)]
pub struct ReportArgs {
    /// Bench result files (`parex bench --json`); the cells of several files are merged
    /// (e.g. runs at different thread counts).
    bench: Vec<PathBuf>,
    /// A per-worker trace of one block (`parex run ... --trace FILE`): the timeline.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// A block analysis (`parex analyze --json`): dependency distances and hot keys.
    /// May be given several times.
    #[arg(long)]
    analyze: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn cmd_report(args: ReportArgs) -> Result<ExitCode> {
    if args.bench.is_empty() && args.trace.is_none() && args.analyze.is_empty() {
        bail!("nothing to report: give bench JSON files, --trace FILE or --analyze FILE");
    }
    let inputs = Inputs::load(&args.bench, args.trace.as_deref(), &args.analyze)?;
    let html = render(&inputs);
    std::fs::write(&args.output, &html)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let cells = inputs.cells().len();
    let spans = inputs.trace.as_ref().map_or(0, |(_, t)| t.spans.len());
    println!(
        "wrote {} ({} KB): {cells} bench cells, {spans} trace spans, {} block analyses",
        args.output.display(),
        html.len().div_ceil(1024),
        inputs.analyze.len()
    );
    Ok(ExitCode::SUCCESS)
}
