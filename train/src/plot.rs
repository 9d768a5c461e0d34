//! Training curves rendered as a standalone SVG document.
//!
//! [`svg`] draws one or more [`Panel`]s stacked vertically, sharing one x axis
//! range (typically the optimizer step). Each panel has a title, a y-axis
//! label, optional log-scale y axis, light grid lines at "nice" tick values
//! (1, 2 or 5 × 10^k), one polyline per [`Series`] and a legend.
//!
//! The output is plain SVG 1.1 with no scripts, external resources or
//! timestamps, so the same input always yields the same bytes and the file
//! opens in any browser. Points with a non-finite coordinate are skipped, as
//! are values ≤ 0 on a log-scale panel.

/// One line on a panel.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: &'a str,
}

/// One chart: a title, y-axis label, whether the y axis is log scale, and its series.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub log_y: bool,
    pub series: Vec<Series<'a>>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 260.0;
const MARGIN_LEFT: f64 = 72.0;
const MARGIN_RIGHT: f64 = 180.0;
const MARGIN_TOP: f64 = 34.0;
const MARGIN_BOTTOM: f64 = 34.0;
const TOP_PAD: f64 = 8.0;
const FOOTER_HEIGHT: f64 = 32.0;
/// Series with at most this many points also get a marker on every point.
const MARKER_MAX_POINTS: usize = 30;
/// Fraction of the y data range added above and below the data.
const Y_PAD_FRACTION: f64 = 0.05;
/// Legend entries longer than this many characters are shortened.
const LEGEND_MAX_CHARS: usize = 22;

/// A complete SVG document: panels stacked vertically, shared x axis label `x_label` (e.g. "optimizer step").
pub fn svg(panels: &[Panel], x_label: &str) -> String {
    let (x_lo, x_hi) = x_range(panels);
    let x_axis = Axis::new(x_lo, x_hi, false, MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
    let x_ticks = nice_ticks(x_lo, x_hi);
    let height = TOP_PAD + PANEL_HEIGHT * panels.len().max(1) as f64 + FOOTER_HEIGHT;

    let mut out = String::new();
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{w}\" \
         height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        w = num(WIDTH),
        h = num(height),
    ));
    out.push_str("<rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"white\"/>\n");

    if panels.is_empty() {
        push_text(
            &mut out,
            WIDTH / 2.0,
            TOP_PAD + PANEL_HEIGHT / 2.0,
            "middle",
            " fill=\"#888\" font-size=\"14\"",
            "no data",
        );
    }
    for (index, panel) in panels.iter().enumerate() {
        let top = TOP_PAD + index as f64 * PANEL_HEIGHT;
        render_panel(&mut out, panel, top, &x_axis, &x_ticks);
    }

    push_text(
        &mut out,
        (MARGIN_LEFT + WIDTH - MARGIN_RIGHT) / 2.0,
        height - 10.0,
        "middle",
        " font-size=\"12\"",
        x_label,
    );
    out.push_str("</svg>\n");
    out
}

/// Maps data values on one axis to pixel coordinates.
struct Axis {
    /// Data range, in log10 units when `log` is set.
    lo: f64,
    hi: f64,
    log: bool,
    /// Pixel positions of `lo` and `hi` (for a y axis, `px_lo` is the bottom).
    px_lo: f64,
    px_hi: f64,
}

impl Axis {
    fn new(lo: f64, hi: f64, log: bool, px_lo: f64, px_hi: f64) -> Self {
        let (lo, hi) = if log {
            (lo.log10(), hi.log10())
        } else {
            (lo, hi)
        };
        Axis {
            lo,
            hi,
            log,
            px_lo,
            px_hi,
        }
    }

    fn map(&self, value: f64) -> f64 {
        let v = if self.log { value.log10() } else { value };
        let span = self.hi - self.lo;
        if !(span.is_finite() && span > 0.0) {
            return (self.px_lo + self.px_hi) / 2.0;
        }
        let px = self.px_lo + (v - self.lo) / span * (self.px_hi - self.px_lo);
        // Keep wildly out-of-range values from producing absurd coordinates.
        let (min, max) = if self.px_lo < self.px_hi {
            (self.px_lo, self.px_hi)
        } else {
            (self.px_hi, self.px_lo)
        };
        px.clamp(min - 1.0, max + 1.0)
    }
}

fn render_panel(out: &mut String, panel: &Panel, top: f64, x_axis: &Axis, x_ticks: &[f64]) {
    let left = MARGIN_LEFT;
    let right = WIDTH - MARGIN_RIGHT;
    let plot_top = top + MARGIN_TOP;
    let plot_bottom = top + PANEL_HEIGHT - MARGIN_BOTTOM;

    push_text(
        out,
        left,
        top + 20.0,
        "start",
        " font-size=\"14\" font-weight=\"bold\"",
        panel.title,
    );
    out.push_str(&format!(
        "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n",
        num(18.0),
        num((plot_top + plot_bottom) / 2.0),
        escape(panel.y_label),
    ));

    let Some((y_lo, y_hi)) = y_range(panel) else {
        out.push_str(&frame(left, plot_top, right, plot_bottom));
        push_text(
            out,
            (left + right) / 2.0,
            (plot_top + plot_bottom) / 2.0,
            "middle",
            " fill=\"#888\" font-size=\"14\"",
            "no data",
        );
        return;
    };
    let y_axis = Axis::new(y_lo, y_hi, panel.log_y, plot_bottom, plot_top);
    let y_ticks = if panel.log_y {
        log_ticks(y_lo, y_hi)
    } else {
        nice_ticks(y_lo, y_hi)
    };

    // Grid lines and tick labels.
    let y_labels = tick_labels(&y_ticks);
    for (&tick, label) in y_ticks.iter().zip(&y_labels) {
        let y = y_axis.map(tick);
        out.push_str(&grid_line(left, y, right, y));
        push_text(out, left - 6.0, y + 4.0, "end", "", label);
    }
    let x_labels = tick_labels(x_ticks);
    for (&tick, label) in x_ticks.iter().zip(&x_labels) {
        let x = x_axis.map(tick);
        out.push_str(&grid_line(x, plot_top, x, plot_bottom));
        push_text(out, x, plot_bottom + 16.0, "middle", "", label);
    }
    out.push_str(&frame(left, plot_top, right, plot_bottom));

    // Data.
    for series in &panel.series {
        let color = escape(series.color);
        let pixels: Vec<(f64, f64)> = series
            .points
            .iter()
            .filter(|&&point| plottable(point, panel.log_y))
            .map(|&(x, y)| (x_axis.map(x), y_axis.map(y)))
            .collect();
        if pixels.len() >= 2 {
            let coords: Vec<String> = pixels
                .iter()
                .map(|&(x, y)| format!("{},{}", num(x), num(y)))
                .collect();
            out.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" \
                 stroke-linejoin=\"round\" points=\"{}\"/>\n",
                coords.join(" "),
            ));
        }
        if !pixels.is_empty() && pixels.len() <= MARKER_MAX_POINTS {
            for &(x, y) in &pixels {
                out.push_str(&format!(
                    "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{color}\"/>\n",
                    num(x),
                    num(y),
                ));
            }
        }
    }

    // Legend, to the right of the plot area.
    let legend_x = right + 10.0;
    for (index, series) in panel.series.iter().enumerate() {
        let y = plot_top + 8.0 + index as f64 * 18.0;
        out.push_str(&format!(
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{}\" stroke-width=\"2.5\"/>\n",
            num(legend_x),
            num(legend_x + 18.0),
            escape(series.color),
            y = num(y),
        ));
        push_text(
            out,
            legend_x + 24.0,
            y + 4.0,
            "start",
            "",
            &shorten(series.name, LEGEND_MAX_CHARS),
        );
    }
}

fn frame(left: f64, top: f64, right: f64, bottom: f64) -> String {
    format!(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n",
        num(left),
        num(top),
        num(right - left),
        num(bottom - top),
    )
}

fn grid_line(x1: f64, y1: f64, x2: f64, y2: f64) -> String {
    format!(
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#e5e5e5\" stroke-width=\"1\"/>\n",
        num(x1),
        num(y1),
        num(x2),
        num(y2),
    )
}

/// Appends a `<text>` element; `attrs` is extra attribute text (already
/// escaped, starting with a space) and `content` is escaped here.
fn push_text(out: &mut String, x: f64, y: f64, anchor: &str, attrs: &str, content: &str) {
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\"{attrs}>{}</text>\n",
        num(x),
        num(y),
        escape(content),
    ));
}

/// Formats a pixel coordinate with one decimal, dropping a trailing ".0".
fn num(value: f64) -> String {
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// Escapes text for use in SVG character data and double-quoted attributes.
/// Control characters that XML 1.0 forbids are dropped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Truncates `text` to at most `max_chars` characters, marking the cut with "…".
fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    short.push('…');
    short
}

fn plottable((x, y): (f64, f64), log_y: bool) -> bool {
    x.is_finite() && y.is_finite() && (!log_y || y > 0.0)
}

/// Shared x range over every finite point of every panel, padded when it is a
/// single value; `(0, 1)` when there are no finite points at all.
fn x_range(panels: &[Panel]) -> (f64, f64) {
    let xs = panels
        .iter()
        .flat_map(|panel| &panel.series)
        .flat_map(|series| series.points)
        .filter(|&&point| plottable(point, false))
        .map(|&(x, _)| x);
    match min_max(xs) {
        None => (0.0, 1.0),
        Some((lo, hi)) if lo == hi => {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, hi + pad)
        }
        Some(range) => range,
    }
}

/// Padded y range of a panel's plottable points, or `None` when it has none.
fn y_range(panel: &Panel) -> Option<(f64, f64)> {
    let ys = panel
        .series
        .iter()
        .flat_map(|series| series.points)
        .filter(|&&point| plottable(point, panel.log_y))
        .map(|&(_, y)| y);
    let (lo, hi) = min_max(ys)?;
    if panel.log_y {
        let (mut a, mut b) = (lo.log10(), hi.log10());
        if a == b {
            // Half a decade either side of a constant series.
            a -= 0.5;
            b += 0.5;
        } else {
            let pad = (b - a) * Y_PAD_FRACTION;
            a -= pad;
            b += pad;
        }
        Some((10f64.powf(a), 10f64.powf(b)))
    } else if lo == hi {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        Some((lo - pad, hi + pad))
    } else {
        let pad = (hi - lo) * Y_PAD_FRACTION;
        Some((lo - pad, hi + pad))
    }
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Tick values inside `[lo, hi]` spaced by a "nice" step (1, 2 or 5 × 10^k),
/// preferring 4–6 ticks; when no step gives 4–6, the closest count wins
/// (ties go to more ticks).
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi < lo {
        return Vec::new();
    }
    let span = hi - lo;
    if span == 0.0 {
        return vec![lo];
    }
    if !span.is_finite() {
        return vec![lo, hi];
    }
    let base_exp = (span / 5.0).log10().floor() as i32 - 1;
    let mut best: Option<(usize, f64)> = None;
    for exp in base_exp..base_exp + 4 {
        for mantissa in [1.0, 2.0, 5.0] {
            let step = mantissa * pow10(exp);
            if !(step.is_finite() && step > 0.0) {
                continue;
            }
            let (first, last) = tick_index_range(lo, hi, step);
            let count = (last - first + 1.0).max(0.0);
            let miss = if count < 4.0 {
                4.0 - count
            } else if count > 6.0 {
                count - 6.0
            } else {
                0.0
            };
            // Steps are visited from small to large, so a tie keeps more ticks.
            let better = best.is_none_or(|(best_miss, _)| (miss as usize) < best_miss);
            if better && count <= 100.0 {
                best = Some((miss as usize, step));
            }
        }
    }
    let Some((_, step)) = best else {
        return vec![lo, hi];
    };
    let (first, last) = tick_index_range(lo, hi, step);
    let mut ticks = Vec::new();
    let mut i = first;
    while i <= last {
        // `+ 0.0` turns a negative zero into a positive one.
        ticks.push(i * step + 0.0);
        i += 1.0;
    }
    ticks
}

/// Integer multiples of `step` that fall in `[lo, hi]`, with a little slack
/// so rounding error does not drop an end tick.
fn tick_index_range(lo: f64, hi: f64, step: f64) -> (f64, f64) {
    ((lo / step - 1e-9).ceil(), (hi / step + 1e-9).floor())
}

/// Ticks for a log-scale axis over `[lo, hi]` (both > 0): powers of ten when
/// the range spans three or more decades, otherwise 1-2-5 multiples, otherwise
/// linear nice ticks.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi >= lo) {
        return Vec::new();
    }
    let in_range = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let first = (lo.log10() - 1e-9).ceil() as i32;
    let last = (hi.log10() + 1e-9).floor() as i32;
    let decades = last - first + 1;
    if decades >= 3 {
        let stride = ((decades + 5) / 6) as usize;
        return (first..=last).step_by(stride).map(pow10).collect();
    }
    let multiples: Vec<f64> = (first - 1..=last)
        .flat_map(|exp| [1.0, 2.0, 5.0].map(|m| m * pow10(exp)))
        .filter(|&v| in_range(v))
        .collect();
    if (3..=7).contains(&multiples.len()) {
        return multiples;
    }
    if multiples.len() > 7 {
        return (first..=last).map(pow10).collect();
    }
    let linear: Vec<f64> = nice_ticks(lo, hi)
        .into_iter()
        .filter(|&v| v > 0.0)
        .collect();
    if linear.is_empty() { multiples } else { linear }
}

/// Exactly 10^exp as the nearest `f64` (`powi` can be off by an ulp).
fn pow10(exp: i32) -> f64 {
    format!("1e{exp}")
        .parse()
        .unwrap_or_else(|_| 10f64.powi(exp))
}

/// Labels for a sorted list of ticks, with just enough digits to tell
/// neighbouring ticks apart.
fn tick_labels(ticks: &[f64]) -> Vec<String> {
    let spacing = ticks
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).abs())
        .filter(|d| *d > 0.0)
        .fold(f64::INFINITY, f64::min);
    ticks
        .iter()
        .map(|&tick| {
            let resolution = if spacing.is_finite() {
                spacing
            } else {
                tick.abs()
            };
            format_tick(tick, resolution)
        })
        .collect()
}

/// Formats `value` with as many significant digits as `resolution` (the tick
/// spacing) needs.
fn format_tick(value: f64, resolution: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let magnitude = |v: f64| (v.abs().log10() + 1e-9).floor() as i64;
    let digits = if resolution > 0.0 && resolution.is_finite() {
        magnitude(value) - magnitude(resolution) + 1
    } else {
        3
    };
    format_number(value, digits.clamp(1, 15) as usize)
}

/// Compact number formatting rounded to `sig` significant digits:
/// `0.0001` → `1e-4`, `12000` → `12k`, `2.5` → `2.5`, `3000000` → `3e6`.
fn format_number(value: f64, sig: usize) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    if !value.is_finite() {
        return format!("{value}");
    }
    let sig = sig.clamp(1, 15);
    let scientific = format!("{:.*e}", sig - 1, value);
    let Some((mantissa, exp)) = scientific.split_once('e') else {
        return scientific;
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return scientific;
    };
    let mantissa = trim_fraction(mantissa);
    if !(-4 < exp && exp < 6) {
        return format!("{mantissa}e{exp}");
    }
    let rounded: f64 = scientific.parse().unwrap_or(value);
    if exp >= 3 && rounded % 100.0 == 0.0 {
        return format!("{}k", rounded / 1000.0);
    }
    let decimals = (sig as i32 - 1 - exp).max(0) as usize;
    trim_fraction(&format!("{rounded:.decimals$}")).to_owned()
}

/// Drops trailing zeros after a decimal point, and the point itself if bare.
fn trim_fraction(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel<'a>(title: &'a str, log_y: bool, series: Vec<Series<'a>>) -> Panel<'a> {
        Panel {
            title,
            y_label: "loss",
            log_y,
            series,
        }
    }

    fn series<'a>(name: &'a str, points: &'a [(f64, f64)]) -> Series<'a> {
        Series {
            name,
            points,
            color: "#1f77b4",
        }
    }

    /// The `points` attribute of every polyline, split into coordinate pairs.
    fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
        svg.lines()
            .filter(|line| line.starts_with("<polyline"))
            .map(|line| {
                let start = line.find("points=\"").expect("points attribute") + 8;
                let end = start + line[start..].find('"').expect("closing quote");
                line[start..end]
                    .split_whitespace()
                    .map(|pair| {
                        let (x, y) = pair.split_once(',').expect("x,y pair");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect()
            })
            .collect()
    }

    fn assert_ticks(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() < 1e-9 * e.abs().max(1.0),
                "{actual:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn document_structure() {
        let points = [(0.0, 2.0), (1.0, 1.5), (2.0, 1.2)];
        let out = svg(
            &[panel("Loss", false, vec![series("train", &points)])],
            "optimizer step",
        );
        assert!(out.starts_with("<svg"));
        assert!(out.trim_end().ends_with("</svg>"));
        assert!(out.contains("xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(out.contains("width=\"900\""));
        assert!(out.contains("height=\"300\""));
        assert!(out.contains("viewBox=\"0 0 900 300\""));
        assert!(out.contains("fill=\"white\""));
        assert!(out.contains(">Loss</text>"));
        assert!(out.contains(">train</text>"));
        assert!(out.contains(">optimizer step</text>"));
        assert!(out.contains("stroke=\"#1f77b4\""));
        assert_eq!(out.matches("<svg").count(), 1);
        // Every element opened with `<text` is closed.
        assert_eq!(out.matches("<text").count(), out.matches("</text>").count());
    }

    #[test]
    fn panels_are_stacked() {
        let a = [(0.0, 1.0), (10.0, 2.0)];
        let b = [(5.0, 3.0), (20.0, 4.0)];
        let panels = [
            panel("A", false, vec![series("a", &a)]),
            panel("B", false, vec![series("b", &b)]),
        ];
        let out = svg(&panels, "step");
        assert!(out.contains("viewBox=\"0 0 900 560\""));
        let lines = polylines(&out);
        assert_eq!(lines.len(), 2);
        // Shared x range 0..20: a starts at the left edge, b ends at the right edge.
        assert_eq!(lines[0][0].0, MARGIN_LEFT);
        assert_eq!(lines[1][1].0, WIDTH - MARGIN_RIGHT);
        // b starts at x = 5, a quarter of the way across.
        let quarter = MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 4.0;
        assert!((lines[1][0].0 - quarter).abs() < 0.1);
        // The second panel lies below the first.
        assert!(lines[1][0].1 > PANEL_HEIGHT);
        assert!(lines[0][0].1 < PANEL_HEIGHT);
        assert_eq!(x_range(&panels), (0.0, 20.0));
    }

    #[test]
    fn polyline_has_one_pair_per_finite_point() {
        let points: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
            .collect();
        let out = svg(&[panel("p", false, vec![series("s", &points)])], "step");
        let lines = polylines(&out);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 50);
        // Larger values are drawn higher up (smaller y pixel): the first,
        // largest value touches the top padding, the last the bottom padding.
        assert!(lines[0][0].1 < lines[0][49].1);
        assert!(lines[0][0].1 < TOP_PAD + MARGIN_TOP + 15.0);
        assert!(lines[0][49].1 > TOP_PAD + PANEL_HEIGHT - MARGIN_BOTTOM - 15.0);
        // More than 30 points: no markers.
        assert!(!out.contains("<circle"));
    }

    #[test]
    fn non_finite_points_are_skipped() {
        let points = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 0.5),
            (f64::INFINITY, 0.4),
            (f64::NAN, 0.3),
            (3.0, f64::NEG_INFINITY),
            (4.0, 0.25),
        ];
        let out = svg(&[panel("p", false, vec![series("s", &points)])], "step");
        let lines = polylines(&out);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), 3);
        assert_eq!(out.matches("<circle").count(), 3);
        assert!(!out.contains("NaN"));
        assert!(!out.contains("inf"));
        // The infinite x did not stretch the shared x range.
        assert_eq!(lines[0][2].0, WIDTH - MARGIN_RIGHT);
    }

    #[test]
    fn single_point_is_visible() {
        let points = [(7.0, 0.3)];
        let out = svg(&[panel("p", false, vec![series("s", &points)])], "step");
        assert_eq!(out.matches("<circle").count(), 1);
        assert!(polylines(&out).is_empty());
        assert!(!out.contains("no data"));
        // Degenerate x range 7..7 is padded, so the point is centred.
        let (lo, hi) = x_range(&[panel("p", false, vec![series("s", &points)])]);
        assert!(lo < 7.0 && hi > 7.0);
        let centre = (MARGIN_LEFT + WIDTH - MARGIN_RIGHT) / 2.0;
        assert!(out.contains(&format!("cx=\"{}\"", num(centre))));
    }

    #[test]
    fn text_is_escaped() {
        let points = [(0.0, 1.0), (1.0, 2.0)];
        let p = Panel {
            title: "a<b & \"c\">",
            y_label: "<y>",
            log_y: false,
            series: vec![Series {
                name: "x&y",
                points: &points,
                color: "red\"/><script>",
            }],
        };
        let out = svg(&[p], "steps <&>");
        assert!(out.contains("a&lt;b &amp; &quot;c&quot;&gt;"));
        assert!(out.contains("&lt;y&gt;"));
        assert!(out.contains(">x&amp;y</text>"));
        assert!(out.contains("steps &lt;&amp;&gt;"));
        assert!(out.contains("red&quot;/&gt;&lt;script&gt;"));
        assert!(!out.contains("<script"));
        assert!(!out.contains("a<b"));
        assert_eq!(escape("q\u{1}\u{7}ok\ttab"), "qok tab");
    }

    #[test]
    fn nice_ticks_for_common_ranges() {
        assert_ticks(&nice_ticks(0.0, 1.0), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_ticks(&nice_ticks(3.7, 9.2), &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        assert_ticks(
            &nice_ticks(0.0, 1000.0),
            &[0.0, 200.0, 400.0, 600.0, 800.0, 1000.0],
        );
        assert_ticks(&nice_ticks(-1.0, 1.0), &[-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_ticks(
            &nice_ticks(2.301, 2.305),
            &[2.301, 2.302, 2.303, 2.304, 2.305],
        );
        assert_ticks(
            &nice_ticks(1.0, 12000.0),
            &[2000.0, 4000.0, 6000.0, 8000.0, 10000.0, 12000.0],
        );
        for (lo, hi) in [
            (0.0, 1.0),
            (3.7, 9.2),
            (0.013, 0.0171),
            (-7e5, 3e6),
            (1e-7, 9e-7),
        ] {
            let ticks = nice_ticks(lo, hi);
            assert!((4..=6).contains(&ticks.len()), "{lo}..{hi}: {ticks:?}");
            assert!(ticks.iter().all(|&t| t >= lo - 1e-12 && t <= hi + 1e-12));
        }
        assert_eq!(nice_ticks(5.0, 5.0), vec![5.0]);
        assert!(nice_ticks(f64::NAN, 1.0).is_empty());
        assert_eq!(nice_ticks(-f64::MAX, f64::MAX).len(), 2);
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(
            tick_labels(&nice_ticks(0.0, 1.0)),
            ["0", "0.2", "0.4", "0.6", "0.8", "1"]
        );
        assert_eq!(
            tick_labels(&nice_ticks(0.0, 2000.0)),
            ["0", "500", "1k", "1.5k", "2k"]
        );
        assert_eq!(format_number(0.0001, 1), "1e-4");
        assert_eq!(format_number(0.00025, 2), "2.5e-4");
        assert_eq!(format_number(0.001, 1), "0.001");
        assert_eq!(format_number(12000.0, 2), "12k");
        assert_eq!(format_number(12345.0, 5), "12345");
        assert_eq!(format_number(2.5, 2), "2.5");
        assert_eq!(format_number(-2.5, 2), "-2.5");
        assert_eq!(format_number(3_000_000.0, 1), "3e6");
        assert_eq!(format_tick(0.6000000000000001, 0.2), "0.6");
        assert_eq!(format_tick(2.302, 0.001), "2.302");
    }

    #[test]
    fn log_scale_panel() {
        let points = [
            (0.0, 1e-5),
            (1.0, 1e-4),
            (2.0, 1e-3),
            (3.0, 0.0),
            (4.0, -1.0),
        ];
        let out = svg(&[panel("lr", true, vec![series("lr", &points)])], "step");
        let lines = polylines(&out);
        assert_eq!(lines.len(), 1);
        // Values <= 0 are skipped on a log axis.
        assert_eq!(lines[0].len(), 3);
        // Equal ratios are equally spaced vertically.
        let upper = lines[0][0].1 - lines[0][1].1;
        let lower = lines[0][1].1 - lines[0][2].1;
        assert!(
            upper > 0.0 && (upper - lower).abs() < 0.2,
            "{upper} vs {lower}"
        );
        for label in [">1e-5</text>", ">1e-4</text>", ">0.001</text>"] {
            assert!(out.contains(label), "missing {label}");
        }
        assert_ticks(&log_ticks(8e-6, 1.2e-3), &[1e-5, 1e-4, 1e-3]);
        assert_ticks(&log_ticks(0.15, 6.0), &[0.2, 0.5, 1.0, 2.0, 5.0]);
        assert_ticks(&log_ticks(1e-9, 1.0), &[1e-9, 1e-7, 1e-5, 1e-3, 1e-1]);
        let narrow = log_ticks(2.1, 2.9);
        assert!(narrow.len() >= 3 && narrow.iter().all(|&t| (2.1..=2.9).contains(&t)));
    }

    #[test]
    fn empty_panel_says_no_data() {
        let nan = [(f64::NAN, f64::NAN)];
        let negative = [(1.0, -3.0)];
        let panels = [
            panel("empty", false, vec![series("s", &[])]),
            panel("nothing", false, vec![]),
            panel("all nan", false, vec![series("s", &nan)]),
            panel("log of negatives", true, vec![series("s", &negative)]),
        ];
        let out = svg(&panels, "step");
        assert_eq!(out.matches(">no data</text>").count(), 4);
        assert!(out.starts_with("<svg") && out.contains("</svg>"));

        let points = [(0.0, 1.0), (1.0, 2.0)];
        let mixed = svg(
            &[
                panel("ok", false, vec![series("s", &points)]),
                panel("empty", false, vec![series("t", &[])]),
            ],
            "step",
        );
        assert_eq!(mixed.matches(">no data</text>").count(), 1);

        let none = svg(&[], "step");
        assert!(none.starts_with("<svg") && none.contains(">no data</text>"));
    }

    #[test]
    fn output_is_deterministic() {
        let a = [(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)];
        let b = [(0.0, 3.5), (2.0, 2.5)];
        let make = || {
            svg(
                &[panel("p", false, vec![series("a", &a), series("b", &b)])],
                "step",
            )
        };
        assert_eq!(make(), make());
    }

    #[test]
    fn long_legend_names_are_shortened() {
        assert_eq!(shorten("short", LEGEND_MAX_CHARS), "short");
        let long = "a-very-long-series-name-that-does-not-fit";
        let short = shorten(long, LEGEND_MAX_CHARS);
        assert_eq!(short.chars().count(), LEGEND_MAX_CHARS);
        assert!(short.ends_with('…'));
        assert_eq!(shorten("ééééé", 3), "éé…");
    }
}
