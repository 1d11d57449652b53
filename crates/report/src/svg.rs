//! Hand-written SVG: escaping, number formatting, scales with readable ticks, colors.

use std::fmt::Write as _;

/// Escapes text for an XML text node or a double-quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A number in at most 3 significant decimals, without trailing zeros ("0.3", "12", "1.25").
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    let s = if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// An integer with thin thousands separators ("1 234 567").
pub fn int(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A duration given in nanoseconds, in the unit that reads best.
pub fn dur_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{} s", num(ns / 1e9))
    } else if ns >= 1e6 {
        format!("{} ms", num(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{} µs", num(ns / 1e3))
    } else {
        format!("{} ns", num(ns))
    }
}

/// Gas per second with its SI prefix ("12.3 Ggas/s").
pub fn gas_rate(v: f64) -> String {
    if v >= 1e9 {
        format!("{} Ggas/s", num(v / 1e9))
    } else if v >= 1e6 {
        format!("{} Mgas/s", num(v / 1e6))
    } else if v >= 1e3 {
        format!("{} kgas/s", num(v / 1e3))
    } else {
        format!("{} gas/s", num(v))
    }
}

/// 1, 2 or 5 times a power of ten, near `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * p
}

/// A map from data values to pixels along one axis.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    /// Pixel positions of `lo` and `hi` (may be reversed, as for a y axis).
    pub p0: f64,
    pub p1: f64,
}

impl Scale {
    /// A linear scale from `lo` to a "nice" value at or above `hi`.
    pub fn linear(lo: f64, hi: f64, p0: f64, p1: f64) -> Self {
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let step = nice_step((hi - lo) / 5.0);
        let hi = (hi / step).ceil() * step;
        Self {
            lo,
            hi,
            log: false,
            p0,
            p1,
        }
    }

    /// A log scale from a power-of-ten-ish value at or below `lo` to one at or above `hi`.
    pub fn log(lo: f64, hi: f64, p0: f64, p1: f64) -> Self {
        let lo = lo.max(1e-9);
        let hi = hi.max(lo * 1.5);
        let lo = snap_125(lo, false);
        let hi = snap_125(hi, true);
        Self {
            lo,
            hi,
            log: true,
            p0,
            p1,
        }
    }

    pub fn at(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo * 1e-3).ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.p0 + t * (self.p1 - self.p0)
    }

    pub fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut out = Vec::new();
            let mut p = 10f64.powf(self.lo.log10().floor());
            while p <= self.hi * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    let v = p * m;
                    if v >= self.lo * 0.9999 && v <= self.hi * 1.0001 {
                        out.push(v);
                    }
                }
                p *= 10.0;
            }
            out
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut out = Vec::new();
            let mut v = (self.lo / step).ceil() * step;
            while v <= self.hi + step * 1e-6 {
                out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
                v += step;
            }
            out
        }
    }
}

fn snap_125(v: f64, up: bool) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    let steps = [1.0, 2.0, 5.0, 10.0];
    if up {
        steps
            .iter()
            .map(|m| m * p)
            .find(|c| *c >= v * 0.9999)
            .unwrap_or(10.0 * p)
    } else {
        steps
            .iter()
            .rev()
            .map(|m| m * p)
            .find(|c| *c <= v * 1.0001)
            .unwrap_or(p)
    }
}

/// The color of an engine: fixed for the known ones, then from a palette by first use.
pub fn engine_color(engine: &str, index: usize) -> &'static str {
    match engine {
        "sequential" => "#6b7280",
        "block-stm" => "#2563eb",
        "optimistic" => "#d97706",
        "sealevel" => "#059669",
        "dag" => "#9333ea",
        _ => {
            const PALETTE: [&str; 6] = [
                "#db2777", "#0891b2", "#65a30d", "#dc2626", "#4f46e5", "#92400e",
            ];
            PALETTE[index % PALETTE.len()]
        }
    }
}

/// Span kinds in legend order, with their colors.
pub const SPAN_KINDS: [(&str, &str); 8] = [
    ("execute", "#3b82f6"),
    ("reexecute", "#f97316"),
    ("validate", "#22c55e"),
    ("blocked", "#dc2626"),
    ("wait", "#a8a29e"),
    ("hint", "#a855f7"),
    ("merge", "#eab308"),
    ("finalize", "#0f766e"),
];

/// Color of a span kind not in [`SPAN_KINDS`].
pub const OTHER_KIND_COLOR: &str = "#1f2937";

pub fn span_color(kind: &str) -> &'static str {
    SPAN_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, c)| *c)
        .unwrap_or(OTHER_KIND_COLOR)
}

/// An SVG document being written.
pub struct Svg {
    pub out: String,
}

impl Svg {
    pub fn new(width: f64, height: f64, label: &str) -> Self {
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{l}" font-family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif" font-size="12">"#,
            w = width.round(),
            h = height.round(),
            l = esc(label)
        );
        Self { out }
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("</svg>");
        self.out
    }

    pub fn raw(&mut self, s: &str) {
        self.out.push_str(s);
    }

    /// A rectangle with an optional hover title.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: Option<&str>) {
        let _ = write!(
            self.out,
            r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{fill}""#,
            x,
            y,
            w.max(0.0),
            h.max(0.0)
        );
        match title {
            Some(t) => {
                let _ = write!(self.out, "><title>{}</title></rect>", esc(t));
            }
            None => self.out.push_str("/>"),
        }
    }

    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, extra: &str) {
        let _ = write!(
            self.out,
            r#"<line x1="{x1:.2}" y1="{y1:.2}" x2="{x2:.2}" y2="{y2:.2}" stroke="{stroke}" {extra}/>"#
        );
    }

    /// Text; `anchor` is start, middle or end.
    pub fn text(&mut self, x: f64, y: f64, anchor: &str, extra: &str, s: &str) {
        let _ = write!(
            self.out,
            r#"<text x="{x:.2}" y="{y:.2}" text-anchor="{anchor}" {extra}>{}</text>"#,
            esc(s)
        );
    }

    pub fn circle(&mut self, cx: f64, cy: f64, r: f64, fill: &str, title: &str) {
        let _ = write!(
            self.out,
            r#"<circle cx="{cx:.2}" cy="{cy:.2}" r="{r}" fill="{fill}" fill-opacity="0.85" stroke="white" stroke-width="1"><title>{}</title></circle>"#,
            esc(title)
        );
    }

    /// A horizontal legend row of colored swatches starting at (`x`, `y`); returns its width.
    pub fn legend(&mut self, x: f64, y: f64, items: &[(String, &str)]) -> f64 {
        let mut cx = x;
        for (label, color) in items {
            if *color == "none" {
                let _ = write!(
                    self.out,
                    r##"<rect x="{cx:.1}" y="{:.1}" width="12" height="12" fill="white" stroke="#9ca3af"/>"##,
                    y - 10.0
                );
            } else {
                self.rect(cx, y - 10.0, 12.0, 12.0, color, None);
            }
            self.text(cx + 16.0, y, "start", r##"fill="#374151""##, label);
            cx += 16.0 + text_width(label, 12.0) + 14.0;
        }
        cx - x
    }

    /// Left y axis with grid lines and tick labels; `fmt` formats tick values.
    pub fn y_axis(&mut self, s: &Scale, x0: f64, x1: f64, fmt: &dyn Fn(f64) -> String) {
        for t in s.ticks() {
            let y = s.at(t);
            self.line(x0, y, x1, y, "#e5e7eb", "");
            self.text(x0 - 6.0, y + 4.0, "end", r##"fill="#4b5563""##, &fmt(t));
        }
        self.line(x0, s.p0, x0, s.p1, "#9ca3af", "");
    }

    /// Bottom x axis with tick labels (and light vertical grid lines up to `y_top`).
    pub fn x_axis(&mut self, s: &Scale, y: f64, y_top: f64, fmt: &dyn Fn(f64) -> String) {
        for t in s.ticks() {
            let x = s.at(t);
            self.line(x, y_top, x, y, "#f3f4f6", "");
            self.line(x, y, x, y + 4.0, "#9ca3af", "");
            self.text(x, y + 17.0, "middle", r##"fill="#4b5563""##, &fmt(t));
        }
        self.line(s.p0, y, s.p1, y, "#9ca3af", "");
    }
}

/// Rough width of `s` in pixels at `size` px (proportional font; enough for layout).
pub fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.58
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1.0), "1");
        assert_eq!(num(0.3), "0.3");
        assert_eq!(num(1.256), "1.26");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1234.0), "1234");
        assert_eq!(int(1234567.0), "1\u{202f}234\u{202f}567");
        assert_eq!(dur_ns(1500.0), "1.5 µs");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let s = Scale::linear(0.0, 1.7, 300.0, 0.0);
        assert_eq!(s.ticks(), vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        assert_eq!(s.at(0.0), 300.0);
        assert_eq!(s.at(2.0), 0.0);
        let l = Scale::log(0.3, 40.0, 0.0, 100.0);
        assert_eq!(l.lo, 0.2);
        assert_eq!(l.hi, 50.0);
        assert!(l.ticks().contains(&1.0) && l.ticks().contains(&10.0));
    }
}
