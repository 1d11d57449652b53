//! Parsing the bench, analyze and trace JSON, and the page they render to.

use std::path::{Path, PathBuf};

use parex_report::{Analyze, BenchFile, Inputs, ReportError, TraceFile, TraceSpan, render};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn full_inputs() -> Inputs {
    Inputs::load(
        &[fixture("bench_2t.json"), fixture("bench_1t4t.json")],
        Some(&fixture("trace_small.json")),
        &[fixture("analyze.json")],
    )
    .expect("fixtures load")
}

/// Parses the page as XML; returns the document text for further checks.
fn parse(html: &str) -> roxmltree::Document<'_> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(html, opts).expect("the report is well-formed XML")
}

fn svgs<'a>(doc: &'a roxmltree::Document<'a>) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("svg"))
        .collect()
}

fn title_of(n: roxmltree::Node<'_, '_>) -> Option<String> {
    n.children()
        .find(|c| c.has_tag_name("title"))
        .and_then(|t| t.text())
        .map(str::to_string)
}

#[test]
fn bench_fixtures_parse_with_extra_fields_and_nulls() {
    let f = BenchFile::load(&fixture("bench_2t.json")).unwrap();
    assert_eq!(f.repeat, Some(5));
    assert_eq!(f.machine.as_ref().and_then(|m| m.cores), Some(2));
    let mainnet: Vec<_> = f.cells.iter().filter(|c| c.is_mainnet()).collect();
    assert!(!mainnet.is_empty());
    assert!(
        mainnet
            .iter()
            .all(|c| c.block.is_some() && c.bound_at_threads.is_some())
    );
    let summary = f.mainnet_summary.unwrap();
    assert_eq!(summary[0].engine, "block-stm");
    let g = BenchFile::load(&fixture("bench_1t4t.json")).unwrap();
    assert!(g.mainnet_summary.is_none());
    assert!(
        g.cells
            .iter()
            .all(|c| c.block.is_none() && c.peak_rss_mb.is_some())
    );
}

#[test]
fn analyze_and_trace_fixtures_parse() {
    let a = Analyze::load(&fixture("analyze.json")).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].bounds().first(), Some(&(2, 1.98)));
    assert_eq!(
        a[0].dependency_distance_histogram.as_ref().unwrap()[2].max,
        4
    );
    assert_eq!(a[0].hot_keys.as_ref().unwrap()[0].writers, Some(14));
    let t = TraceFile::load(&fixture("trace_small.json")).unwrap();
    assert_eq!(t.workers, 2);
    assert!(
        t.spans
            .iter()
            .any(|s| s.kind == "finalize" && s.tx.is_none())
    );
}

/// An error with its causes, as the binary prints it.
fn chain(e: ReportError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

#[test]
fn bad_inputs_are_errors_naming_the_file_and_the_problem() {
    let p = Path::new("some/bench.json");
    let missing = BenchFile::load(Path::new("/nonexistent/bench.json")).unwrap_err();
    assert!(matches!(missing, ReportError::Read { .. }));
    assert!(missing.to_string().contains("/nonexistent/bench.json"));

    let e = chain(BenchFile::parse(p, "{ not json").unwrap_err());
    assert!(e.contains("some/bench.json") && e.contains("line 1"), "{e}");
    let e = chain(BenchFile::parse(p, r#"{"rows": []}"#).unwrap_err());
    assert!(e.contains("missing field `cells`"), "{e}");
    let e = chain(
        BenchFile::parse(p, r#"{"cells": [{"workload": "raw", "engine": "dag"}]}"#).unwrap_err(),
    );
    assert!(e.contains("threads"), "{e}");
    let e = chain(
        BenchFile::parse(
            p,
            r#"{"cells": [{"workload": "raw", "engine": "dag", "threads": "two"}]}"#,
        )
        .unwrap_err(),
    );
    assert!(e.contains("invalid type"), "{e}");

    let t = Path::new("t.json");
    let e = chain(TraceFile::parse(
        t,
        r#"{"wall_ns": 5, "workers": 1, "spans": [{"worker": 0, "kind": "execute", "start_ns": 9, "end_ns": 3}]}"#,
    )
    .unwrap_err());
    assert!(e.contains("t.json") && e.contains("span 0"), "{e}");
    let e = chain(Analyze::parse(Path::new("a.json"), "[1, 2]").unwrap_err());
    assert!(e.contains("a.json") && e.contains("object"), "{e}");
    // An array of analyses is several blocks.
    let two = Analyze::parse(Path::new("a.json"), r#"[{"source": "x"}, {"txs": 3}]"#).unwrap();
    assert_eq!(two.len(), 2);
}

#[test]
fn the_full_report_is_well_formed_and_has_every_chart() {
    let inputs = full_inputs();
    let html = render(&inputs);
    let doc = parse(&html);
    assert!(!html.contains("http://") || !html.contains("src=\"http"));
    assert!(!html.contains("<script"), "no scripts");
    let svgs = svgs(&doc);
    // Speedup at 1, 2 and 4 threads and at 2 threads with slow reads, 4 throughput charts,
    // scatter, Gantt, histogram.
    assert_eq!(svgs.len(), 4 + 4 + 1 + 1 + 1, "charts");
    for s in &svgs {
        assert!(s.descendants().count() > 10, "non-empty svg");
    }
    let label = |s: &roxmltree::Node| s.attribute("aria-label").unwrap_or("").to_string();
    // Speedup bars: one per engine but sequential per workload, titled.
    let bars = svgs
        .iter()
        .find(|s| label(s) == "Speedup over sequential at 2 threads")
        .expect("speedup chart at 2 threads");
    let bar_titles: Vec<String> = bars
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(title_of)
        .collect();
    assert_eq!(bar_titles.len(), 5 * 4);
    assert!(
        bar_titles
            .iter()
            .any(|t| t.starts_with("dag on swap hot 0, 2 threads: 1.75×"))
    );
    // The one cell with per-round quartiles (block-stm on raw) gets a whisker (a stem and
    // two caps) and says so in its title.
    let whisker = bars
        .descendants()
        .filter(|n| n.has_tag_name("line") && n.attribute("class") == Some("spread"))
        .count();
    assert_eq!(whisker, 3);
    assert!(bar_titles.iter().any(|t| t.starts_with(
        "block-stm on raw hot 0, 2 threads: 0.64× sequential (per-round quartiles 0.61–0.66×)"
    )));
    // A dashed reference line at 1.
    assert!(
        bars.descendants()
            .any(|n| n.has_tag_name("line") && n.attribute("stroke-dasharray").is_some())
    );
    // Scatter: one point per mainnet cell.
    let scatter = svgs
        .iter()
        .find(|s| label(s).contains("against the bound"))
        .unwrap();
    let points = scatter
        .descendants()
        .filter(|n| n.has_tag_name("circle"))
        .count();
    assert_eq!(points, 13 * 4);
    // Gantt: rects titled with worker, kind and transaction.
    let gantt = svgs
        .iter()
        .find(|s| label(s) == "per-worker timeline")
        .unwrap();
    let span_titles: Vec<String> = gantt
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(title_of)
        .collect();
    assert_eq!(
        span_titles.len(),
        inputs.trace.as_ref().unwrap().1.spans.len()
    );
    for tx in 0..20 {
        let needle = format!("execute tx {tx} ");
        assert!(
            span_titles.iter().any(|t| t.contains(&needle)),
            "tx {tx} in the timeline"
        );
    }
    assert!(
        span_titles
            .iter()
            .any(|t| t.starts_with("worker 1 · reexecute tx 12 ·"))
    );
    // Histogram bars and the hot keys table.
    let hist = svgs
        .iter()
        .find(|s| label(s) == "dependency distance")
        .unwrap();
    assert_eq!(
        hist.descendants()
            .filter(|n| n.has_tag_name("rect") && title_of(*n).is_some())
            .count(),
        8
    );
    assert!(html.contains("0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2"));
    // The mainnet summary table and the cell tables.
    assert!(html.contains("930196") || html.contains("46147"));
    assert!(html.contains("mainnet cells</summary>"));
    // The machine's ceiling beside each cell.
    assert!(html.contains("<th>machine ceiling</th>"));
    assert!(html.contains("<td>1.81×</td>") && html.contains("<td>1.77×</td>"));
    assert!(html.contains("<th>geomean share of the machine ceiling reached</th>"));
    // The spread of the per-round speedups, where the bench recorded it.
    assert!(html.contains("<th>per-round quartiles</th>"));
    assert!(html.contains("<td>0.61–0.66×</td>"));
    assert!(
        !html.contains("omitted"),
        "nothing omitted with full inputs"
    );
}

#[test]
fn missing_sections_are_omitted_with_a_note() {
    let html = render(&Inputs::default());
    let doc = parse(&html);
    assert!(svgs(&doc).is_empty());
    for section in [
        "speedup",
        "throughput",
        "mainnet",
        "timeline",
        "dependencies",
        "cells",
    ] {
        assert!(
            doc.descendants()
                .any(|n| n.attribute("id") == Some(section)),
            "{section}"
        );
    }
    assert!(html.matches("class=\"note\"").count() >= 5);

    // Only sequential, one thread count, mainnet cells without bounds, empty analyze.
    let bench = BenchFile::parse(
        Path::new("b.json"),
        r#"{"cells": [
            {"workload": "raw", "engine": "sequential", "threads": 2, "median_ms": 5},
            {"workload": "mainnet", "block": 5, "engine": "block-stm", "threads": 2, "speedup_vs_sequential": null}
        ]}"#,
    )
    .unwrap();
    let inputs = Inputs {
        bench: vec![("b.json".into(), bench)],
        trace: Some((
            "t.json".into(),
            TraceFile {
                workers: 1,
                ..Default::default()
            },
        )),
        analyze: vec![("a.json".into(), Analyze::default())],
    };
    let html = render(&inputs);
    let doc = parse(&html);
    assert!(svgs(&doc).is_empty(), "{html}");
    assert!(html.contains("only sequential was measured"));
    assert!(html.contains("scatter omitted"));
    assert!(html.contains("The trace has no spans"));
}

#[test]
fn big_traces_are_merged_into_a_sane_number_of_rects() {
    // 8 workers × 30 000 alternating 1 µs spans: far more than pixels.
    let mut spans = Vec::new();
    for w in 0..8u32 {
        for i in 0..30_000u64 {
            let t = i * 1_000;
            spans.push(TraceSpan {
                worker: w,
                kind: if i % 3 == 0 { "validate" } else { "execute" }.into(),
                tx: Some(i),
                start_ns: t,
                end_ns: t + 900,
            });
        }
    }
    spans.push(TraceSpan {
        worker: 0,
        kind: "finalize".into(),
        tx: None,
        start_ns: 30_000_000,
        end_ns: 33_000_000,
    });
    let trace = TraceFile {
        engine: Some("block-stm".into()),
        workers: 8,
        wall_ns: 33_000_000,
        spans,
        ..Default::default()
    };
    let html = render(&Inputs {
        trace: Some(("big.json".into(), trace)),
        ..Default::default()
    });
    let doc = parse(&html);
    let gantt = svgs(&doc).into_iter().next().unwrap();
    let rects = gantt
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .count();
    assert!(rects < 8 * 1_100, "{rects} rects");
    assert!(html.len() < 3_000_000, "{} bytes", html.len());
    assert!(html.contains("spans merged, txs"));
    assert!(html.contains("are merged per pixel column"));
    assert!(html.contains("worker 0 · finalize"));
}

#[test]
fn one_workload_at_two_sizes_keeps_both_and_labels_them_by_size() {
    // `parex bench` by default measures 1-gigagas and 1000-transaction blocks of every
    // workload: neither may replace the other, and each engine is compared with the
    // `sequential` run of its own size.
    let bench = BenchFile::parse(
        Path::new("b.json"),
        r#"{"cells": [
            {"workload": "raw", "hot_ratio": 0, "txs": 47620, "engine": "sequential", "threads": 2, "median_ms": 90},
            {"workload": "raw", "hot_ratio": 0, "txs": 47620, "engine": "block-stm", "threads": 2, "median_ms": 75},
            {"workload": "raw", "hot_ratio": 0, "txs": 1000, "engine": "sequential", "threads": 2, "median_ms": 2},
            {"workload": "raw", "hot_ratio": 0, "txs": 1000, "engine": "block-stm", "threads": 2, "median_ms": 2.5},
            {"workload": "erc20", "hot_ratio": 0, "txs": 1000, "engine": "sequential", "threads": 2, "median_ms": 6},
            {"workload": "erc20", "hot_ratio": 0, "txs": 1000, "engine": "block-stm", "threads": 2, "median_ms": 4}
        ]}"#,
    )
    .unwrap();
    let inputs = Inputs {
        bench: vec![("b.json".into(), bench)],
        ..Default::default()
    };
    assert_eq!(inputs.cells().len(), 6);
    let html = render(&inputs);
    let doc = parse(&html);
    let bars = svgs(&doc)
        .into_iter()
        .find(|s| s.attribute("aria-label") == Some("Speedup over sequential at 2 threads"))
        .expect("speedup chart");
    let titles: Vec<String> = bars
        .descendants()
        .filter(|n| n.has_tag_name("rect"))
        .filter_map(title_of)
        .collect();
    assert_eq!(titles.len(), 3, "{titles:?}");
    for expected in [
        "block-stm on raw hot 0, 47.6k txs, 2 threads: 1.2× sequential",
        "block-stm on raw hot 0, 1000 txs, 2 threads: 0.8× sequential",
        // One size only: no size in the label.
        "block-stm on erc20 hot 0, 2 threads: 1.5× sequential",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(expected)),
            "{expected}: {titles:?}"
        );
    }
}
