//! Bar, line and scatter charts of bench results, and the dependency-distance histogram.

use crate::svg::{Scale, Svg, esc, gas_rate, num, text_width};

/// One series' color and label (an engine).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub color: &'static str,
}

/// A group of bars (one workload); `values[i]` belongs to `series[i]`.
pub struct BarGroup {
    pub label: String,
    pub values: Vec<Option<f64>>,
    /// Hover text per bar.
    pub titles: Vec<String>,
    /// Per bar, the middle half of the measurements behind it (drawn as a whisker).
    pub spreads: Vec<Option<[f64; 2]>>,
}

/// Grouped vertical bars with a dashed reference line at `reference` (1.0 for speedups);
/// a bar with a spread gets a whisker from its low to its high end.
pub fn grouped_bars(
    title: &str,
    y_label: &str,
    series: &[Series],
    groups: &[BarGroup],
    reference: Option<f64>,
) -> String {
    // Group labels: the workload, then one line per parameter ("hot 0", "1000 txs").
    let label_lines = |label: &str| -> (String, Vec<String>) {
        match label.split_once(' ') {
            Some((first, rest)) => (
                first.to_string(),
                rest.split(", ").map(str::to_string).collect(),
            ),
            None => (label.to_string(), Vec::new()),
        }
    };
    let parameter_lines = groups
        .iter()
        .map(|g| label_lines(&g.label).1.len())
        .max()
        .unwrap_or(0);
    let extra = 15.0 * parameter_lines.saturating_sub(1) as f64;
    let (ml, mr, mt, mb) = (64.0, 96.0, 44.0, 58.0 + extra);
    let group_w = (960.0 / groups.len().max(1) as f64).clamp(70.0, 180.0);
    let width = (ml + mr + group_w * groups.len() as f64).max(520.0);
    let plot_w = width - ml - mr;
    let group_w = plot_w / groups.len().max(1) as f64;
    let height = 340.0 + extra;
    let highest_spread = groups
        .iter()
        .flat_map(|g| g.spreads.iter().flatten())
        .map(|[_, high]| *high);
    let max = groups
        .iter()
        .flat_map(|g| g.values.iter().flatten())
        .copied()
        .chain(highest_spread)
        .fold(reference.unwrap_or(0.0), f64::max);
    let y = Scale::linear(0.0, max * 1.12, height - mb, mt);
    let mut svg = Svg::new(width, height, title);
    let legend: Vec<(String, &str)> = series.iter().map(|s| (s.name.clone(), s.color)).collect();
    svg.legend(ml, 18.0, &legend);
    svg.y_axis(&y, ml, width - mr, &|v| num(v));
    svg.text(
        14.0,
        (mt + height - mb) / 2.0,
        "middle",
        &format!(
            r##"fill="#374151" transform="rotate(-90 14 {:.1})""##,
            (mt + height - mb) / 2.0
        ),
        y_label,
    );
    let n = series.len().max(1) as f64;
    let bar_w = ((group_w * 0.8) / n).min(40.0);
    for (gi, g) in groups.iter().enumerate() {
        let gx = ml + gi as f64 * group_w;
        let start = gx + (group_w - bar_w * n) / 2.0;
        for (si, v) in g.values.iter().enumerate() {
            let Some(v) = v else { continue };
            let x = start + si as f64 * bar_w;
            let top = y.at(*v);
            let title = g.titles.get(si).map(String::as_str);
            svg.rect(
                x + 1.0,
                top,
                bar_w - 2.0,
                y.at(0.0) - top,
                series[si].color,
                title,
            );
            if let Some(Some([low, high])) = g.spreads.get(si) {
                let cx = x + bar_w / 2.0;
                let cap = (bar_w / 4.0).min(6.0);
                let style = r#"stroke-width="1.5" class="spread""#;
                svg.line(cx, y.at(*low), cx, y.at(*high), "#111827", style);
                for end in [*low, *high] {
                    svg.line(cx - cap, y.at(end), cx + cap, y.at(end), "#111827", style);
                }
            }
            if bar_w >= 30.0 {
                svg.text(
                    x + bar_w / 2.0,
                    top - 4.0,
                    "middle",
                    r##"fill="#111827" font-size="10" stroke="white" stroke-width="3" paint-order="stroke""##,
                    &format!("{}×", short(*v)),
                );
            }
        }
        let (first, parameters) = label_lines(&g.label);
        let cx = gx + group_w / 2.0;
        svg.text(
            cx,
            height - mb + 18.0,
            "middle",
            r##"fill="#111827" font-weight="600""##,
            &first,
        );
        for (i, line) in parameters.iter().enumerate() {
            svg.text(
                cx,
                height - mb + 33.0 + 15.0 * i as f64,
                "middle",
                r##"fill="#4b5563" font-size="11""##,
                line,
            );
        }
    }
    if let Some(r) = reference {
        let ry = y.at(r);
        svg.line(
            ml,
            ry,
            width - mr,
            ry,
            "#111827",
            r#"stroke-width="1.2" stroke-dasharray="6 4""#,
        );
        svg.text(
            width - mr + 6.0,
            ry + 4.0,
            "start",
            r##"fill="#111827" font-size="11""##,
            &format!("{}× = sequential", num(r)),
        );
    }
    svg.line(ml, y.at(0.0), width - mr, y.at(0.0), "#6b7280", "");
    svg.finish()
}

/// A point of a line chart.
pub struct LinePoint {
    pub x: f64,
    pub y: f64,
    pub title: String,
}

/// Throughput (y, gas/s) against thread counts (x, categorical, evenly spaced), one line
/// per series.
pub fn lines_vs_threads(title: &str, series: &[(Series, Vec<LinePoint>)]) -> String {
    let (width, height) = (540.0, 300.0);
    let (ml, mr, mt, mb) = (78.0, 16.0, 52.0, 44.0);
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.x))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.y))
        .fold(0.0, f64::max);
    let y = Scale::linear(0.0, max_y * 1.1, height - mb, mt);
    let step = (width - ml - mr) / xs.len().max(1) as f64;
    let x_at = |v: f64| {
        let i = xs.iter().position(|x| *x == v).unwrap_or(0);
        ml + step * (i as f64 + 0.5)
    };
    let mut svg = Svg::new(width, height, title);
    svg.text(
        ml,
        16.0,
        "start",
        r##"fill="#111827" font-weight="600" font-size="13""##,
        title,
    );
    let legend: Vec<(String, &str)> = series
        .iter()
        .map(|(s, _)| (s.name.clone(), s.color))
        .collect();
    svg.legend(ml, 36.0, &legend);
    svg.y_axis(&y, ml, width - mr, &|v| gas_rate(v).replace("gas/s", ""));
    svg.text(
        14.0,
        (mt + height - mb) / 2.0,
        "middle",
        &format!(
            r##"fill="#374151" transform="rotate(-90 14 {:.1})""##,
            (mt + height - mb) / 2.0
        ),
        "gas / s",
    );
    for &t in &xs {
        let x = x_at(t);
        svg.line(x, height - mb, x, height - mb + 4.0, "#9ca3af", "");
        svg.text(
            x,
            height - mb + 17.0,
            "middle",
            r##"fill="#4b5563""##,
            &num(t),
        );
    }
    svg.line(ml, height - mb, width - mr, height - mb, "#9ca3af", "");
    svg.text(
        (ml + width - mr) / 2.0,
        height - 6.0,
        "middle",
        r##"fill="#374151""##,
        "threads",
    );
    for (s, points) in series {
        let mut pts: Vec<&LinePoint> = points.iter().collect();
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", x_at(p.x), y.at(p.y)))
            .collect();
        if path.len() > 1 {
            svg.raw(&format!(
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                s.color
            ));
        }
        for p in pts {
            svg.circle(x_at(p.x), y.at(p.y), 4.0, s.color, &p.title);
        }
    }
    svg.finish()
}

/// A scatter point: x = what the block allows, y = what was measured.
pub struct ScatterPoint {
    pub x: f64,
    pub y: f64,
    pub series: usize,
    pub title: String,
}

/// Measured speedup against the dependency bound, with the y = x diagonal (the bound) and
/// y = 1 (sequential speed).
pub fn bound_scatter(title: &str, series: &[Series], points: &[ScatterPoint]) -> String {
    let (width, height) = (620.0, 500.0);
    let (ml, mr, mt, mb) = (64.0, 24.0, 44.0, 52.0);
    let lo = points
        .iter()
        .flat_map(|p| [p.x, p.y])
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = points.iter().flat_map(|p| [p.x, p.y]).fold(1.0, f64::max);
    let log = lo.is_finite() && hi / lo > 12.0;
    let (xs, ys) = if log {
        (
            Scale::log(lo, hi, ml, width - mr),
            Scale::log(lo, hi, height - mb, mt),
        )
    } else {
        (
            Scale::linear(0.0, hi * 1.08, ml, width - mr),
            Scale::linear(0.0, hi * 1.08, height - mb, mt),
        )
    };
    let mut svg = Svg::new(width, height, title);
    let legend: Vec<(String, &str)> = series.iter().map(|s| (s.name.clone(), s.color)).collect();
    svg.legend(ml, 18.0, &legend);
    svg.y_axis(&ys, ml, width - mr, &|v| format!("{}×", num(v)));
    svg.x_axis(&xs, height - mb, mt, &|v| format!("{}×", num(v)));
    svg.text(
        (ml + width - mr) / 2.0,
        height - 10.0,
        "middle",
        r##"fill="#374151""##,
        "speedup the block's dependencies allow at this thread count",
    );
    svg.text(
        16.0,
        (mt + height - mb) / 2.0,
        "middle",
        &format!(
            r##"fill="#374151" transform="rotate(-90 16 {:.1})""##,
            (mt + height - mb) / 2.0
        ),
        "measured speedup over sequential",
    );
    // The bound (y = x) and sequential speed (y = 1).
    let (d0, d1) = (xs.lo, xs.hi.min(ys.hi));
    svg.line(
        xs.at(d0),
        ys.at(d0),
        xs.at(d1),
        ys.at(d1),
        "#111827",
        r#"stroke-width="1.2" stroke-dasharray="6 4""#,
    );
    // The diagonal's label runs along it, just above, three quarters of the way up.
    let (x0, y0, x1, y1) = (xs.at(d0), ys.at(d0), xs.at(d1), ys.at(d1));
    let (lx, ly) = (x0 + (x1 - x0) * 0.75, y0 + (y1 - y0) * 0.75 - 6.0);
    let angle = (y1 - y0).atan2(x1 - x0).to_degrees();
    svg.text(
        lx,
        ly,
        "middle",
        &format!(
            r##"fill="#111827" font-size="11" transform="rotate({angle:.1} {lx:.1} {ly:.1})""##
        ),
        "y = x: the bound",
    );
    if ys.lo <= 1.0 && ys.hi >= 1.0 {
        svg.line(
            ml,
            ys.at(1.0),
            width - mr,
            ys.at(1.0),
            "#9ca3af",
            r#"stroke-dasharray="2 3""#,
        );
        svg.text(
            ml + 6.0,
            ys.at(1.0) - 5.0,
            "start",
            r##"fill="#6b7280" font-size="11""##,
            "1× = sequential",
        );
    }
    // Engines side by side (a few pixels apart) where blocks share a bound.
    let spread = |si: usize| (si as f64 - (series.len() as f64 - 1.0) / 2.0) * 3.0;
    for p in points {
        svg.circle(
            xs.at(p.x) + spread(p.series),
            ys.at(p.y),
            4.5,
            series[p.series].color,
            &p.title,
        );
    }
    if log {
        svg.text(
            width - mr,
            mt - 6.0,
            "end",
            r##"fill="#6b7280" font-size="11""##,
            "log scales",
        );
    }
    svg.finish()
}

/// The dependency-distance histogram of `parex analyze`: one bar per bucket.
pub fn histogram(title: &str, buckets: &[(String, u64)]) -> String {
    let (ml, mr, mt, mb) = (64.0, 16.0, 36.0, 48.0);
    let bar_slot = (900.0 / buckets.len().max(1) as f64).clamp(28.0, 90.0);
    let width = (ml + mr + bar_slot * buckets.len() as f64).max(420.0);
    let slot = (width - ml - mr) / buckets.len().max(1) as f64;
    let height = 280.0;
    let max = buckets.iter().map(|(_, c)| *c).max().unwrap_or(0) as f64;
    let y = Scale::linear(0.0, (max * 1.1).max(1.0), height - mb, mt);
    let mut svg = Svg::new(width, height, title);
    svg.text(
        ml,
        16.0,
        "start",
        r##"fill="#111827" font-weight="600" font-size="13""##,
        title,
    );
    svg.y_axis(&y, ml, width - mr, &|v| {
        if v.fract() == 0.0 {
            num(v)
        } else {
            String::new()
        }
    });
    svg.text(
        14.0,
        (mt + height - mb) / 2.0,
        "middle",
        &format!(
            r##"fill="#374151" transform="rotate(-90 14 {:.1})""##,
            (mt + height - mb) / 2.0
        ),
        "dependencies",
    );
    let label_every = {
        let widest = buckets
            .iter()
            .map(|(l, _)| text_width(l, 11.0))
            .fold(0.0, f64::max);
        ((widest + 6.0) / slot).ceil().max(1.0) as usize
    };
    for (i, (label, count)) in buckets.iter().enumerate() {
        let x = ml + i as f64 * slot;
        let top = y.at(*count as f64);
        svg.rect(
            x + slot * 0.1,
            top,
            slot * 0.8,
            y.at(0.0) - top,
            "#0d9488",
            Some(&format!("distance {label}: {count} dependencies")),
        );
        if slot >= 24.0 {
            svg.text(
                x + slot / 2.0,
                top - 4.0,
                "middle",
                r##"fill="#111827" font-size="10""##,
                &count.to_string(),
            );
        }
        if i % label_every == 0 {
            svg.text(
                x + slot / 2.0,
                height - mb + 16.0,
                "middle",
                r##"fill="#4b5563" font-size="11""##,
                label,
            );
        }
    }
    svg.line(ml, y.at(0.0), width - mr, y.at(0.0), "#6b7280", "");
    svg.text(
        (ml + width - mr) / 2.0,
        height - 8.0,
        "middle",
        r##"fill="#374151""##,
        "distance (reader index − writer index)",
    );
    svg.finish()
}

/// A bar label: two decimals below 10, none above ("0.94", "1.5", "28").
fn short(v: f64) -> String {
    let s = if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// An HTML note paragraph.
pub fn note(text: &str) -> String {
    format!(r#"<p class="note">{}</p>"#, esc(text))
}
