//! parex-report: one self-contained HTML page (inline SVG and CSS, no scripts, nothing
//! fetched) from the JSON that `parex bench`, `parex analyze` and `parex run --trace`
//! write. It shows how fast each engine is per workload and how it scales with threads,
//! how close it gets on mainnet blocks to the speedup their dependencies allow, where a
//! traced run's time went (a per-worker timeline), and a block's dependency structure.
//!
//! The page is well-formed XML as well as HTML (void elements closed, only XML entities),
//! so that tests can parse it with an XML parser.

pub mod charts;
pub mod gantt;
pub mod input;
pub mod svg;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use input::{
    Analyze, BenchCell, BenchFile, DistanceBucket, HotKey, MainnetSummary, ReportError, TraceFile,
    TraceSpan,
};

use charts::{BarGroup, LinePoint, ScatterPoint, Series, note};
use svg::{dur_ns, engine_color, esc, gas_rate, int, num};

/// Everything a report is made of.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Bench files, by the name shown in the report (their path).
    pub bench: Vec<(String, BenchFile)>,
    pub trace: Option<(String, TraceFile)>,
    pub analyze: Vec<(String, Analyze)>,
}

impl Inputs {
    /// Reads and checks every input file; the first bad one is the error.
    pub fn load(
        bench: &[PathBuf],
        trace: Option<&Path>,
        analyze: &[PathBuf],
    ) -> Result<Self, ReportError> {
        let mut inputs = Inputs::default();
        for p in bench {
            inputs
                .bench
                .push((p.display().to_string(), BenchFile::load(p)?));
        }
        if let Some(p) = trace {
            inputs.trace = Some((p.display().to_string(), TraceFile::load(p)?));
        }
        for p in analyze {
            for a in Analyze::load(p)? {
                inputs.analyze.push((p.display().to_string(), a));
            }
        }
        Ok(inputs)
    }

    /// The cells of every bench file; a later file's cell replaces an earlier one for the
    /// same workload, size, engine, thread count and block.
    pub fn cells(&self) -> Vec<&BenchCell> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut out: Vec<&BenchCell> = Vec::new();
        for c in self.bench.iter().flat_map(|(_, f)| f.cells.iter()) {
            let key = format!(
                "{}|{}|{}|{:?}|{:?}|{:?}|{:?}",
                c.workload_label(),
                c.engine,
                c.threads,
                c.block,
                c.hot_ratio.map(f64::to_bits),
                c.latency_us.map(f64::to_bits),
                c.txs.map(f64::to_bits)
            );
            match seen.get(&key) {
                Some(&i) => out[i] = c,
                None => {
                    seen.insert(key, out.len());
                    out.push(c);
                }
            }
        }
        out
    }
}

const KNOWN_ENGINES: [&str; 5] = ["sequential", "block-stm", "optimistic", "sealevel", "dag"];

/// Engines in a stable order (known ones first) with their colors.
fn engine_series<'a>(names: impl Iterator<Item = &'a str>) -> Vec<Series> {
    let mut seen: Vec<&str> = Vec::new();
    for n in names {
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen.sort_by_key(|n| {
        KNOWN_ENGINES
            .iter()
            .position(|k| k == n)
            .unwrap_or(usize::MAX)
    });
    let mut unknown = 0;
    seen.into_iter()
        .map(|n| {
            let color = engine_color(n, unknown);
            if !KNOWN_ENGINES.contains(&n) {
                unknown += 1;
            }
            Series {
                name: n.to_string(),
                color,
            }
        })
        .collect()
}

/// The geometric mean of positive `values` (`None` if there are none); `parex bench`'s
/// summaries use it too.
pub fn geomean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v.ln();
        n += 1;
    }
    (n > 0).then(|| (sum / n as f64).exp())
}

/// The cell's speedup over sequential: as measured by bench, or from the medians of the
/// sequential cell of the same workload and thread count.
fn speedup(c: &BenchCell, cells: &[&BenchCell]) -> Option<f64> {
    if let Some(s) = c.speedup_vs_sequential {
        return Some(s);
    }
    let seq = cells.iter().find(|s| {
        s.engine == "sequential"
            && s.threads == c.threads
            && s.workload_label() == c.workload_label()
            && s.txs == c.txs
    })?;
    Some(seq.median_ms? / c.median_ms?)
}

const CSS: &str = r#"
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #111827; margin: 0; background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 40px 0 8px; padding-top: 16px; border-top: 1px solid #e5e7eb; }
h3 { font-size: 15px; margin: 24px 0 6px; }
p { line-height: 1.45; margin: 6px 0; max-width: 900px; }
.sub { color: #4b5563; }
.note { color: #6b7280; font-size: 13px; font-style: italic; }
nav a { margin-right: 14px; color: #2563eb; text-decoration: none; font-size: 14px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 4px; }
th { background: #f3f4f6; text-align: left; font-weight: 600; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e5e7eb; white-space: nowrap; }
td.r, table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.num td:first-child, table.cells td:nth-child(2) { text-align: left; }
tr.bad td { color: #b91c1c; }
.sw { display: inline-block; width: 10px; height: 10px; margin-right: 6px; vertical-align: -1px; }
.sw.idle { border: 1px solid #9ca3af; width: 8px; height: 8px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px 24px; }
figure { margin: 8px 0; }
figcaption { font-size: 13px; color: #4b5563; margin-bottom: 4px; }
svg { max-width: 100%; height: auto; }
details summary { cursor: pointer; color: #2563eb; font-size: 14px; margin: 8px 0; }
.kv td:first-child { color: #4b5563; }
"#;

/// Renders the whole page.
pub fn render(inputs: &Inputs) -> String {
    let cells = inputs.cells();
    let mut body = String::new();
    body.push_str(&header(inputs, &cells));
    body.push_str(&speedup_section(&cells));
    body.push_str(&throughput_section(&cells));
    body.push_str(&mainnet_section(inputs, &cells));
    body.push_str(&trace_section(inputs));
    body.push_str(&analyze_section(inputs));
    body.push_str(&cells_section(&cells));
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n<title>parex report</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n"
    )
}

fn header(inputs: &Inputs, cells: &[&BenchCell]) -> String {
    let mut h = String::from("<h1>parex report</h1>");
    h.push_str(r#"<p class="sub">Parallel execution engines against <code>sequential</code>: every result below was produced by engines whose output equals sequential execution. Ratios and counts are what to compare; absolute times depend on the machine. Hover over bars, points and timeline intervals for details.</p>"#);
    h.push_str("<ul class=\"sub\">");
    for (name, f) in &inputs.bench {
        let mut facts = vec![format!("{} cells", f.cells.len())];
        if let Some(v) = &f.parex_version {
            facts.push(format!("parex {v}"));
        }
        if let Some(m) = &f.machine {
            if let Some(c) = m.cores {
                facts.push(format!("{c} cores"));
            }
            if let Some(os) = &m.os {
                facts.push(os.clone());
            }
        }
        if let Some(r) = f.repeat {
            facts.push(format!("median of {r} runs"));
        }
        let _ = write!(
            h,
            "<li>bench <code>{}</code>: {}</li>",
            esc(name),
            esc(&facts.join(", "))
        );
    }
    if let Some((name, _)) = &inputs.trace {
        let _ = write!(h, "<li>trace <code>{}</code></li>", esc(name));
    }
    for (name, a) in &inputs.analyze {
        let _ = write!(
            h,
            "<li>analysis <code>{}</code>{}</li>",
            esc(name),
            a.source
                .as_deref()
                .map(|s| format!(" ({})", esc(s)))
                .unwrap_or_default()
        );
    }
    if inputs.bench.is_empty() && inputs.trace.is_none() && inputs.analyze.is_empty() {
        h.push_str("<li>no inputs</li>");
    }
    h.push_str("</ul>");
    let _ = cells;
    h.push_str(r##"<nav><a href="#speedup">Speedup</a><a href="#throughput">Throughput vs threads</a><a href="#mainnet">Mainnet vs bound</a><a href="#timeline">Timeline</a><a href="#dependencies">Dependencies</a><a href="#cells">All cells</a></nav>"##);
    h
}

fn speedup_section(cells: &[&BenchCell]) -> String {
    let mut s = String::from(r#"<h2 id="speedup">Speedup over sequential, per workload</h2>"#);
    let synth: Vec<&BenchCell> = cells.iter().copied().filter(|c| !c.is_mainnet()).collect();
    if synth.is_empty() {
        s.push_str(&note(
            "No synthetic-workload bench cells in the input: chart omitted.",
        ));
        return s;
    }
    s.push_str("<p>Engine time against <code>sequential</code> on the same block (higher is better); the dashed line is sequential speed. One chart per thread count measured, and a separate one for workloads with slow storage reads (a different regime).</p>");
    let latency = |c: &BenchCell| c.latency_us.unwrap_or(0.0);
    let mut regimes: Vec<(u32, f64)> = synth.iter().map(|c| (c.threads, latency(c))).collect();
    regimes.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    regimes.dedup();
    for (t, lat) in regimes {
        let at: Vec<&BenchCell> = synth
            .iter()
            .copied()
            .filter(|c| c.threads == t && latency(c) == lat)
            .collect();
        let regime = format!(
            "{t} thread{}{}",
            if t == 1 { "" } else { "s" },
            if lat > 0.0 {
                format!(", {} µs per storage read", num(lat))
            } else {
                String::new()
            }
        );
        let series = engine_series(
            at.iter()
                .map(|c| c.engine.as_str())
                .filter(|e| *e != "sequential"),
        );
        if series.is_empty() {
            let _ = write!(
                s,
                "{}",
                note(&format!(
                    "{regime}: only sequential was measured, nothing to compare."
                ))
            );
            continue;
        }
        let label = input::labeler(&at);
        let mut labels: Vec<String> = Vec::new();
        for c in &at {
            let l = label(c);
            if !labels.contains(&l) {
                labels.push(l);
            }
        }
        let groups: Vec<BarGroup> = labels
            .iter()
            .map(|l| {
                let mut values = Vec::new();
                let mut titles = Vec::new();
                let mut spreads = Vec::new();
                for se in &series {
                    let cell = at.iter().find(|c| c.engine == se.name && &label(c) == l);
                    let v = cell.and_then(|c| speedup(c, cells));
                    values.push(v);
                    spreads.push(cell.and_then(|c| c.speedup_quartiles));
                    titles.push(match (cell, v) {
                        (Some(c), Some(v)) => format!(
                            "{} on {l}, {regime}: {}× sequential{}{}{}",
                            se.name,
                            num(v),
                            c.speedup_quartiles
                                .map(|[low, high]| format!(
                                    " (per-round quartiles {}–{}×)",
                                    num(low),
                                    num(high)
                                ))
                                .unwrap_or_default(),
                            c.median_ms
                                .map(|m| format!(", median {} ms", num(m)))
                                .unwrap_or_default(),
                            c.reexecutions_per_tx
                                .map(|r| format!(", {} re-executions per tx", num(r)))
                                .unwrap_or_default()
                        ),
                        _ => String::new(),
                    });
                }
                BarGroup {
                    label: l.clone(),
                    values,
                    titles,
                    spreads,
                }
            })
            .collect();
        let title = format!("Speedup over sequential at {regime}");
        let _ = write!(
            s,
            "<figure><figcaption>{}</figcaption>{}</figure>",
            esc(&title),
            charts::grouped_bars(&title, "speedup (×)", &series, &groups, Some(1.0))
        );
    }
    s
}

fn throughput_section(cells: &[&BenchCell]) -> String {
    let mut s = String::from(r#"<h2 id="throughput">Throughput against thread count</h2>"#);
    let synth: Vec<&BenchCell> = cells
        .iter()
        .copied()
        .filter(|c| !c.is_mainnet() && c.gas_per_s.is_some())
        .collect();
    let label = input::labeler(&synth);
    let mut labels: Vec<String> = Vec::new();
    for c in &synth {
        let l = label(c);
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let mut charts_html = String::new();
    for l in &labels {
        let of: Vec<&BenchCell> = synth.iter().copied().filter(|c| &label(c) == l).collect();
        let threads: BTreeSet<u32> = of.iter().map(|c| c.threads).collect();
        if threads.len() < 2 {
            continue;
        }
        let series = engine_series(of.iter().map(|c| c.engine.as_str()));
        let lines: Vec<(Series, Vec<LinePoint>)> = series
            .into_iter()
            .map(|se| {
                let points = of
                    .iter()
                    .filter(|c| c.engine == se.name)
                    .filter_map(|c| {
                        let g = c.gas_per_s?;
                        Some(LinePoint {
                            x: c.threads as f64,
                            y: g,
                            title: format!(
                                "{} on {l}, {} threads: {}",
                                se.name,
                                c.threads,
                                gas_rate(g)
                            ),
                        })
                    })
                    .collect();
                (se, points)
            })
            .collect();
        charts_html.push_str(&charts::lines_vs_threads(l, &lines));
    }
    if charts_html.is_empty() {
        s.push_str(&note(
            "Every workload was measured at one thread count only: throughput-vs-threads charts omitted (merge bench files taken at several --threads to get them).",
        ));
    } else {
        s.push_str("<p>Gas per second (higher is better), one line per engine; one chart per workload measured at several thread counts.</p>");
        let _ = write!(s, r#"<div class="charts">{charts_html}</div>"#);
    }
    s
}

fn mainnet_section(inputs: &Inputs, cells: &[&BenchCell]) -> String {
    let mut s = String::from(
        r#"<h2 id="mainnet">Mainnet blocks: measured speedup against what each block allows</h2>"#,
    );
    let mainnet: Vec<&BenchCell> = cells
        .iter()
        .copied()
        .filter(|c| c.is_mainnet() && c.engine != "sequential")
        .collect();
    if mainnet.is_empty() {
        s.push_str(&note(
            "No mainnet bench cells in the input: section omitted.",
        ));
        return s;
    }
    let series = engine_series(mainnet.iter().map(|c| c.engine.as_str()));
    let mut points = Vec::new();
    let mut unbounded = 0usize;
    for c in &mainnet {
        let (Some(y), Some(x)) = (speedup(c, cells), c.bound_at_threads.or(c.ideal_speedup)) else {
            unbounded += 1;
            continue;
        };
        let Some(si) = series.iter().position(|se| se.name == c.engine) else {
            continue;
        };
        points.push(ScatterPoint {
            x,
            y,
            series: si,
            title: format!(
                "block {}{}: {} at {} threads {}× (bound {}×{}){}",
                c.block.map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
                c.txs
                    .map(|t| format!(", {} txs", int(t)))
                    .unwrap_or_default(),
                c.engine,
                c.threads,
                num(y),
                num(x),
                c.ideal_speedup
                    .map(|i| format!(", ideal {}×", num(i)))
                    .unwrap_or_default(),
                c.reexecutions_per_tx
                    .map(|r| format!(", {} re-executions per tx", num(r)))
                    .unwrap_or_default()
            ),
        });
    }
    if points.is_empty() {
        s.push_str(&note("The mainnet cells carry no bound (bound_at_threads or ideal_speedup): scatter omitted."));
    } else {
        s.push_str("<p>One point per block and engine: x is the speedup the block's dependencies allow at the cell's thread count (<code>parex analyze</code>'s bound), y the measured speedup. A point on the dashed diagonal reaches the bound; below the dotted line it is slower than sequential.</p>");
        let _ = write!(
            s,
            "<figure>{}</figure>",
            charts::bound_scatter("measured speedup against the bound", &series, &points)
        );
        if unbounded > 0 {
            s.push_str(&note(&format!(
                "{unbounded} mainnet cells without a bound or a speedup are not plotted."
            )));
        }
    }
    // Summary: from the bench files' mainnet_summary, else computed from the cells.
    let mut rows: Vec<MainnetSummary> = inputs
        .bench
        .iter()
        .flat_map(|(_, f)| f.mainnet_summary.iter().flatten().cloned())
        .collect();
    let computed = rows.is_empty();
    if computed {
        let mut keys: Vec<(String, u32)> = mainnet
            .iter()
            .map(|c| (c.engine.clone(), c.threads))
            .collect();
        keys.sort();
        keys.dedup();
        for (e, t) in keys {
            let sp: Vec<(f64, Option<u64>)> = mainnet
                .iter()
                .filter(|c| c.engine == e && c.threads == t)
                .filter_map(|c| Some((speedup(c, cells)?, c.block)))
                .filter(|(v, _)| *v > 0.0)
                .collect();
            if sp.is_empty() {
                continue;
            }
            let geo = geomean(sp.iter().map(|(v, _)| *v)).expect("not empty");
            let worst = sp.iter().min_by(|a, b| a.0.total_cmp(&b.0)).copied();
            rows.push(MainnetSummary {
                engine: e,
                threads: Some(t),
                geomean_speedup: Some(geo),
                worst_speedup: worst.map(|w| w.0),
                worst_block: worst.and_then(|w| w.1),
            });
        }
    }
    s.push_str("<h3>Over all blocks</h3>");
    s.push_str(r#"<table class="num"><thead><tr><th>engine</th><th>threads</th><th>blocks</th><th>geomean speedup</th><th>worst speedup</th><th>worst block</th><th>geomean share of the bound reached</th><th>geomean share of the machine ceiling reached</th></tr></thead><tbody>"#);
    for r in &rows {
        let of: Vec<&&BenchCell> = mainnet
            .iter()
            .filter(|c| c.engine == r.engine && r.threads.is_none_or(|t| t == c.threads))
            .collect();
        // Geometric mean, in percent, of each block's speedup over its `limit`.
        let share = |limit: &dyn Fn(&BenchCell) -> Option<f64>| {
            geomean(
                of.iter()
                    .filter_map(|c| Some(speedup(c, cells)? / limit(c)?))
                    .filter(|v| v.is_finite() && *v > 0.0),
            )
            .map(|g| g * 100.0)
        };
        let of_bound = share(&|c| c.bound_at_threads.or(c.ideal_speedup));
        let of_ceiling = share(&|c| c.machine_ceiling);
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_default();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.engine),
            r.threads.map(|t| t.to_string()).unwrap_or_default(),
            of.len(),
            opt(r.geomean_speedup, &|v| format!("{}×", num(v))),
            opt(r.worst_speedup, &|v| format!("{}×", num(v))),
            r.worst_block.map(|b| b.to_string()).unwrap_or_default(),
            opt(of_bound, &|v| format!("{}%", num(v))),
            opt(of_ceiling, &|v| format!("{}%", num(v))),
        );
    }
    s.push_str("</tbody></table>");
    if computed {
        s.push_str(&note(
            "No mainnet_summary in the bench files: geomean and worst computed from the cells.",
        ));
    }
    s
}

fn trace_section(inputs: &Inputs) -> String {
    let mut s = String::from(
        r#"<h2 id="timeline">Where the time goes: per-worker timeline of one block</h2>"#,
    );
    let Some((_, t)) = &inputs.trace else {
        s.push_str(&note(
            "No trace given (parex run ... --trace FILE, then --trace FILE here): timeline omitted.",
        ));
        return s;
    };
    if t.spans.is_empty() {
        s.push_str(&note("The trace has no spans: timeline omitted."));
        return s;
    }
    let mut facts = Vec::new();
    if let Some(e) = &t.engine {
        facts.push(format!("engine <b>{}</b>", esc(e)));
    }
    if let Some(w) = &t.workload {
        facts.push(format!("workload <b>{}</b>", esc(w)));
    }
    if let Some(th) = t.threads {
        facts.push(format!("{th} threads"));
    }
    facts.push(format!("{} workers", t.workers));
    if let Some(n) = t.txs {
        facts.push(format!(
            "{} transactions ({} with an execution span)",
            int(n as f64),
            int(gantt::executed_txs(t) as f64)
        ));
    }
    if let Some(g) = t.gas {
        facts.push(format!("{} gas", int(g)));
    }
    facts.push(format!("wall time {} (traced)", dur_ns(t.wall_ns as f64)));
    let _ = write!(s, "<p>{}.</p>", facts.join(", "));
    s.push_str("<p>One row per worker; colored intervals are what the worker did (hover for the transaction and duration), white gaps are idle time. Tracing adds a clock reading per span, so the traced run is a little slower than an untraced one.</p>");
    s.push_str(&gantt::render(t));
    s
}

fn analyze_section(inputs: &Inputs) -> String {
    let mut s = String::from(r#"<h2 id="dependencies">Dependencies of a block</h2>"#);
    if inputs.analyze.is_empty() {
        s.push_str(&note(
            "No analysis given (parex analyze --json FILE, then --analyze FILE here): section omitted.",
        ));
        return s;
    }
    for (name, a) in &inputs.analyze {
        let _ = write!(
            s,
            "<h3>{}</h3>",
            esc(a.source.as_deref().unwrap_or(name.as_str()))
        );
        s.push_str(r#"<table class="kv"><tbody>"#);
        let mut kv = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
            }
        };
        kv("transactions", a.txs.map(|t| int(t as f64)));
        kv("gas", a.total_gas.map(int));
        kv(
            "dependent transactions",
            a.dependent_txs.map(|d| {
                format!(
                    "{}{}",
                    int(d as f64),
                    a.dependent_ratio
                        .map(|r| format!(" ({}%)", num(r * 100.0)))
                        .unwrap_or_default()
                )
            }),
        );
        kv(
            "critical path",
            match (a.critical_path_txs, a.critical_path_gas) {
                (Some(t), Some(g)) => Some(format!("{} txs, {} gas", int(t as f64), int(g))),
                (Some(t), None) => Some(format!("{} txs", int(t as f64))),
                (None, Some(g)) => Some(format!("{} gas", int(g))),
                _ => None,
            },
        );
        kv(
            "ideal speedup (unlimited threads)",
            a.ideal_speedup.map(|v| format!("{}×", num(v))),
        );
        let bounds = a.bounds();
        kv(
            "speedup bound",
            (!bounds.is_empty()).then(|| {
                bounds
                    .iter()
                    .map(|(t, b)| format!("{}× at {t} threads", num(*b)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        );
        s.push_str("</tbody></table>");
        match &a.dependency_distance_histogram {
            Some(h) if !h.is_empty() => {
                let buckets: Vec<(String, u64)> = h
                    .iter()
                    .map(|b| {
                        let l = if b.min == b.max {
                            b.min.to_string()
                        } else {
                            format!("{}–{}", b.min, b.max)
                        };
                        (l, b.count)
                    })
                    .collect();
                s.push_str(&charts::histogram("dependency distance", &buckets));
            }
            _ => s.push_str(&note(
                "No dependency-distance histogram (no dependencies, or not in the file).",
            )),
        }
        match &a.hot_keys {
            Some(keys) if !keys.is_empty() => {
                s.push_str("<h3>Hot keys</h3><p>State keys written by the most transactions, with the reads that depend on them.</p>");
                s.push_str(r#"<table class="num"><thead><tr><th>key</th><th>writers</th><th>dependent reads</th></tr></thead><tbody>"#);
                for k in keys.iter().take(25) {
                    let _ = write!(
                        s,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                        esc(&k.key),
                        k.writers.map(|w| int(w as f64)).unwrap_or_default(),
                        k.dependent_reads.map(|w| int(w as f64)).unwrap_or_default()
                    );
                }
                s.push_str("</tbody></table>");
                if keys.len() > 25 {
                    s.push_str(&note(&format!("{} more keys not shown.", keys.len() - 25)));
                }
            }
            _ => s.push_str(&note(
                "No hot keys (no key written by several transactions).",
            )),
        }
    }
    s
}

fn cells_table(cells: &[&BenchCell], all: &[&BenchCell]) -> String {
    let mut s = String::from(
        r#"<table class="num cells"><thead><tr><th>workload</th><th>engine</th><th>threads</th><th>txs</th><th>gas</th><th>median</th><th>min</th><th>throughput</th><th>tx/s</th><th>speedup</th><th>per-round quartiles</th><th>re-exec / tx</th><th>peak RSS</th><th>bound</th><th>machine ceiling</th></tr></thead><tbody>"#,
    );
    for c in cells {
        let sp = speedup(c, all);
        let f = |v: Option<f64>, g: &dyn Fn(f64) -> String| v.map(g).unwrap_or_default();
        let _ = write!(
            s,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if sp.is_some_and(|v| v < 1.0) && c.engine != "sequential" {
                r#" class="bad""#
            } else {
                ""
            },
            esc(&c.workload_label()),
            esc(&c.engine),
            c.threads,
            f(c.txs, &int),
            f(c.gas, &int),
            f(c.median_ms, &|v| format!("{} ms", num(v))),
            f(c.min_ms, &|v| format!("{} ms", num(v))),
            f(c.gas_per_s, &gas_rate),
            f(c.txs_per_s, &int),
            f(sp, &|v| format!("{}×", num(v))),
            c.speedup_quartiles
                .map(|[low, high]| format!("{}–{}×", num(low), num(high)))
                .unwrap_or_default(),
            f(c.reexecutions_per_tx, &num),
            f(c.peak_rss_mb, &|v| format!("{} MB", num(v))),
            f(c.bound_at_threads.or(c.ideal_speedup), &|v| format!(
                "{}×",
                num(v)
            )),
            f(c.machine_ceiling, &|v| format!("{}×", num(v))),
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn cells_section(cells: &[&BenchCell]) -> String {
    let mut s = String::from(r#"<h2 id="cells">All bench cells</h2>"#);
    if cells.is_empty() {
        s.push_str(&note("No bench cells in the input."));
        return s;
    }
    s.push_str(
        "<p>Rows in red are slower than sequential. <i>Bound</i>: what the block's \
         dependencies allow at the cell's threads (<code>parex analyze</code>); \
         <i>machine ceiling</i>: what the machine allows, the speedup of as many \
         independent sequential runs side by side; <i>per-round quartiles</i>: the \
         middle half of the speedups of single rounds (each round runs every engine \
         once, back to back), which says how far the machine's noise moves the median.</p>",
    );
    let synth: Vec<&BenchCell> = cells.iter().copied().filter(|c| !c.is_mainnet()).collect();
    let mainnet: Vec<&BenchCell> = cells.iter().copied().filter(|c| c.is_mainnet()).collect();
    if !synth.is_empty() {
        s.push_str(&cells_table(&synth, cells));
    }
    if !mainnet.is_empty() {
        let _ = write!(
            s,
            "<details><summary>{} mainnet cells</summary>{}</details>",
            mainnet.len(),
            cells_table(&mainnet, cells)
        );
    }
    s
}
