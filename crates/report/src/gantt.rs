//! The per-worker timeline (Gantt chart) of one traced block run.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::input::{TraceFile, TraceSpan};
use crate::svg::{SPAN_KINDS, Scale, Svg, dur_ns, esc, int, num, span_color};

/// Up to this many spans every span gets its own rectangle; above, spans narrower than
/// [`MIN_DETAIL_PX`] are merged per pixel column so that the SVG stays small.
pub const DETAIL_SPANS: usize = 6000;
const MIN_DETAIL_PX: f64 = 2.0;
const PLOT_W: f64 = 1000.0;
const OTHER: usize = SPAN_KINDS.len();

fn kind_index(kind: &str) -> usize {
    SPAN_KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .unwrap_or(OTHER)
}

fn kind_name(i: usize) -> &'static str {
    SPAN_KINDS.get(i).map(|(k, _)| *k).unwrap_or("other")
}

fn span_title(s: &TraceSpan) -> String {
    let tx = s.tx.map(|t| format!(" tx {t}")).unwrap_or_default();
    format!(
        "worker {} · {}{tx} · {} ({} – {})",
        s.worker,
        s.kind,
        dur_ns((s.end_ns - s.start_ns) as f64),
        dur_ns(s.start_ns as f64),
        dur_ns(s.end_ns as f64)
    )
}

/// Small spans of one pixel column of one worker.
#[derive(Clone, Default)]
struct Column {
    ns: [u64; OTHER + 1],
    spans: [u64; OTHER + 1],
    tx_min: Option<u64>,
    tx_max: Option<u64>,
}

impl Column {
    fn busy(&self) -> u64 {
        self.ns.iter().sum()
    }

    fn dominant(&self) -> usize {
        (0..=OTHER).max_by_key(|&k| self.ns[k]).unwrap_or(0)
    }

    fn add(&mut self, other: &Column) {
        for k in 0..=OTHER {
            self.ns[k] += other.ns[k];
            self.spans[k] += other.spans[k];
        }
        self.tx_min = match (self.tx_min, other.tx_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.tx_max = self.tx_max.max(other.tx_max);
    }
}

/// The chart, a legend, an axis, and a table of where the workers' time went.
pub fn render(trace: &TraceFile) -> String {
    let workers = trace.workers.max(1) as usize;
    let wall = trace.wall_ns.max(1) as f64;
    let (ml, mr, mt, mb) = (84.0, 56.0, 40.0, 46.0);
    let width = ml + PLOT_W + mr;
    let row_h = (440.0 / workers as f64).clamp(5.0, 36.0);
    let pad = if row_h >= 10.0 { 3.0 } else { 0.5 };
    let height = mt + row_h * workers as f64 + mb;
    let x = Scale {
        lo: 0.0,
        hi: wall,
        log: false,
        p0: ml,
        p1: ml + PLOT_W,
    };
    let detail = trace.spans.len() <= DETAIL_SPANS;
    let ns_per_px = wall / PLOT_W;

    let mut by_worker: Vec<Vec<&TraceSpan>> = vec![Vec::new(); workers];
    for s in &trace.spans {
        by_worker[s.worker as usize].push(s);
    }
    let present: BTreeSet<usize> = trace.spans.iter().map(|s| kind_index(&s.kind)).collect();

    let mut svg = Svg::new(width, height, "per-worker timeline");
    let mut legend: Vec<(String, &str)> = present
        .iter()
        .map(|&k| {
            (
                kind_name(k).to_string(),
                SPAN_KINDS
                    .get(k)
                    .map(|(_, c)| *c)
                    .unwrap_or(crate::svg::OTHER_KIND_COLOR),
            )
        })
        .collect();
    legend.push(("idle (gap)".to_string(), "none"));
    svg.legend(ml, 18.0, &legend);

    // Alternate row backgrounds, worker labels.
    for w in 0..workers {
        let y = mt + w as f64 * row_h;
        if w % 2 == 1 {
            svg.rect(ml, y, PLOT_W, row_h, "#f9fafb", None);
        }
        if row_h >= 9.0 || w % ((10.0 / row_h).ceil() as usize).max(1) == 0 {
            svg.text(
                ml - 8.0,
                y + row_h / 2.0 + 4.0,
                "end",
                r##"fill="#374151" font-size="11""##,
                &format!("worker {w}"),
            );
        }
    }
    // Per worker, the share of the run spent working (any span but wait) at the right.
    svg.text(
        ml + PLOT_W + mr - 4.0,
        mt - 6.0,
        "end",
        r##"fill="#4b5563" font-size="11""##,
        "working",
    );
    for (w, spans) in by_worker.iter().enumerate() {
        let mut working = 0u64;
        let mut waiting = 0u64;
        for s in spans {
            if s.kind == "wait" {
                waiting += s.end_ns - s.start_ns;
            } else {
                working += s.end_ns - s.start_ns;
            }
        }
        let pct = |ns: u64| ns as f64 * 100.0 / wall;
        let idle = (100.0 - pct(working) - pct(waiting)).max(0.0);
        let y = mt + w as f64 * row_h + row_h / 2.0 + 4.0;
        if row_h >= 9.0 {
            let _ = write!(
                svg.out,
                r##"<text x="{:.1}" y="{y:.1}" text-anchor="end" fill="#374151" font-size="11">{}%<title>worker {w}: {}% working, {}% waiting, {}% idle</title></text>"##,
                ml + PLOT_W + mr - 4.0,
                pct(working).round(),
                num(pct(working)),
                num(pct(waiting)),
                num(idle)
            );
        }
    }
    let axis_y = mt + row_h * workers as f64;
    svg.x_axis(&x, axis_y, mt, &|v| {
        if v == 0.0 { "0".to_string() } else { dur_ns(v) }
    });
    svg.text(
        ml + PLOT_W / 2.0,
        height - 6.0,
        "middle",
        r##"fill="#374151""##,
        "time since the run started",
    );

    let mut rects = 0usize;
    for (w, spans) in by_worker.iter_mut().enumerate() {
        spans.sort_by_key(|s| (s.start_ns, s.end_ns));
        let y = mt + w as f64 * row_h + pad / 2.0;
        let h = row_h - pad;
        let mut columns: Vec<Column> = if detail {
            Vec::new()
        } else {
            vec![Column::default(); PLOT_W as usize]
        };
        for s in spans.iter() {
            let x0 = x.at(s.start_ns as f64);
            let px = (s.end_ns - s.start_ns) as f64 / ns_per_px;
            if detail || px >= MIN_DETAIL_PX {
                svg.rect(
                    x0,
                    y,
                    px.max(0.6),
                    h,
                    span_color(&s.kind),
                    Some(&span_title(s)),
                );
                rects += 1;
            } else {
                let col = ((x0 - ml) as usize).min(columns.len() - 1);
                let c = &mut columns[col];
                let k = kind_index(&s.kind);
                c.ns[k] += s.end_ns - s.start_ns;
                c.spans[k] += 1;
                if let Some(t) = s.tx {
                    c.tx_min = Some(c.tx_min.map_or(t, |m| m.min(t)));
                    c.tx_max = Some(c.tx_max.map_or(t, |m| m.max(t)));
                }
            }
        }
        // Runs of columns at least half busy with small spans, by dominant kind.
        let mut col = 0;
        while col < columns.len() {
            let c = &columns[col];
            if (c.busy() as f64) < ns_per_px * 0.5 {
                col += 1;
                continue;
            }
            let kind = c.dominant();
            let mut run = c.clone();
            let mut end = col + 1;
            while end < columns.len()
                && (columns[end].busy() as f64) >= ns_per_px * 0.5
                && columns[end].dominant() == kind
            {
                run.add(&columns[end]);
                end += 1;
            }
            let total: u64 = run.spans.iter().sum();
            let busy = run.busy().max(1) as f64;
            let mut mix: Vec<(usize, u64)> = (0..=OTHER)
                .filter(|&k| run.ns[k] > 0)
                .map(|k| (k, run.ns[k]))
                .collect();
            mix.sort_by_key(|(_, ns)| std::cmp::Reverse(*ns));
            let mix: Vec<String> = mix
                .iter()
                .map(|(k, ns)| format!("{} {}%", kind_name(*k), num(*ns as f64 * 100.0 / busy)))
                .collect();
            let txs = match (run.tx_min, run.tx_max) {
                (Some(a), Some(b)) if a == b => format!(", tx {a}"),
                (Some(a), Some(b)) => format!(", txs {a}–{b}"),
                _ => String::new(),
            };
            let t0 = col as f64 * ns_per_px;
            let t1 = end as f64 * ns_per_px;
            let title = format!(
                "worker {w} · {} spans merged{txs} · {} · {} busy of {} – {}",
                int(total as f64),
                mix.join(", "),
                dur_ns(busy),
                dur_ns(t0),
                dur_ns(t1)
            );
            let color = SPAN_KINDS
                .get(kind)
                .map(|(_, c)| *c)
                .unwrap_or(crate::svg::OTHER_KIND_COLOR);
            svg.rect(
                ml + col as f64,
                y,
                (end - col) as f64,
                h,
                color,
                Some(&title),
            );
            rects += 1;
            col = end;
        }
    }
    let mut html = String::new();
    html.push_str(&svg.finish());
    if !detail {
        let _ = write!(
            html,
            r#"<p class="note">{} spans drawn as {} rectangles: spans narrower than {} px ({} each) are merged per pixel column and per worker, colored by the kind that took most of the column (hover for the mix); wider spans are drawn one by one.</p>"#,
            int(trace.spans.len() as f64),
            int(rects as f64),
            num(MIN_DETAIL_PX),
            esc(&dur_ns(ns_per_px * MIN_DETAIL_PX)),
        );
    }
    html.push_str(&time_table(trace, &by_worker));
    html
}

/// Per kind: time summed over workers, share of worker-time, span count; plus idle.
fn time_table(trace: &TraceFile, by_worker: &[Vec<&TraceSpan>]) -> String {
    let workers = by_worker.len().max(1) as f64;
    let capacity = workers * trace.wall_ns.max(1) as f64;
    let mut ns = [0u64; OTHER + 1];
    let mut count = [0u64; OTHER + 1];
    let mut others = BTreeSet::new();
    for s in &trace.spans {
        let k = kind_index(&s.kind);
        if k == OTHER {
            others.insert(s.kind.as_str());
        }
        ns[k] += s.end_ns - s.start_ns;
        count[k] += 1;
    }
    let busy: u64 = ns.iter().sum();
    let mut out = String::from(
        r#"<table class="num"><thead><tr><th>kind</th><th>spans</th><th>time (summed over workers)</th><th>share of worker time</th></tr></thead><tbody>"#,
    );
    for k in 0..=OTHER {
        if count[k] == 0 {
            continue;
        }
        let name = if k == OTHER {
            others.iter().copied().collect::<Vec<_>>().join(", ")
        } else {
            kind_name(k).to_string()
        };
        let _ = write!(
            out,
            r#"<tr><td><span class="sw" style="background:{}"></span>{}</td><td>{}</td><td>{}</td><td>{}%</td></tr>"#,
            span_color(kind_name(k)),
            esc(&name),
            int(count[k] as f64),
            dur_ns(ns[k] as f64),
            num(ns[k] as f64 * 100.0 / capacity)
        );
        if k == OTHER {
            break;
        }
    }
    let idle = (capacity - busy as f64).max(0.0);
    let _ = write!(
        out,
        r#"<tr><td><span class="sw idle"></span>idle (gaps)</td><td></td><td>{}</td><td>{}%</td></tr></tbody></table>"#,
        dur_ns(idle),
        num(idle * 100.0 / capacity)
    );
    out
}

/// Distinct transactions that have an execute or reexecute span.
pub fn executed_txs(trace: &TraceFile) -> usize {
    trace
        .spans
        .iter()
        .filter(|s| s.kind == "execute" || s.kind == "reexecute")
        .filter_map(|s| s.tx)
        .collect::<BTreeSet<_>>()
        .len()
}
