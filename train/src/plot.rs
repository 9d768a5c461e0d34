//! Training curves as a standalone SVG document, drawn with `plotters` (its SVG backend, pure
//! Rust, no fonts or C libraries).
//!
//! [`svg`] stacks one chart per [`Panel`] vertically, all sharing the x range (the optimizer
//! step), each with its title, y-axis label, grid, one line per [`Series`] and a legend. Points
//! with a non-finite coordinate are skipped, as are values <= 0 on a log-scale panel. There are
//! no timestamps or random ids in the output: the same input always gives the same bytes.

use anyhow::{Result, anyhow};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One line on a panel.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: RGBColor,
}

/// One chart: a title, y-axis label, whether the y axis is log scale, and its series.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub log_y: bool,
    pub series: Vec<Series<'a>>,
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 260;
const FOOTER_HEIGHT: u32 = 30;
/// Series with at most this many points also get a marker on every point.
const MARKER_MAX_POINTS: usize = 30;
/// Fraction of the y data range added above and below the data.
const Y_PAD_FRACTION: f64 = 0.05;
const FONT: &str = "sans-serif";

/// A complete SVG document: `panels` stacked vertically over a shared x axis labelled `x_label`.
pub fn svg(panels: &[Panel], x_label: &str) -> Result<String> {
    let mut out = String::new();
    render(&mut out, panels, x_label).map_err(|e| anyhow!("drawing the curves: {e}"))?;
    Ok(out)
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn render(out: &mut String, panels: &[Panel], x_label: &str) -> DrawResult<()> {
    let height = PANEL_HEIGHT * panels.len().max(1) as u32 + FOOTER_HEIGHT;
    let root = SVGBackend::with_string(out, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (body, footer) = root.split_vertically(height - FOOTER_HEIGHT);
    let x = x_range(panels);
    if panels.is_empty() {
        no_data(&body)?;
    }
    for (area, panel) in body
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(panels)
    {
        let Some((lo, hi)) = y_range(panel) else {
            let inner = area.titled(panel.title, (FONT, 15))?;
            no_data(&inner)?;
            continue;
        };
        if panel.log_y {
            draw_panel(area, panel, x.clone(), (lo..hi).log_scale())?;
        } else {
            draw_panel(area, panel, x.clone(), lo..hi)?;
        }
    }
    footer.draw(&Text::new(
        x_label.to_string(),
        (WIDTH as i32 / 2, 8),
        (FONT, 13)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    root.present()?;
    Ok(())
}

fn draw_panel<Y>(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    panel: &Panel,
    x: std::ops::Range<f64>,
    y: Y,
) -> DrawResult<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 15))
        .margin_top(4)
        .margin_left(8)
        .margin_right(16)
        .x_label_area_size(24)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .y_desc(panel.y_label)
        .axis_desc_style((FONT, 12))
        .label_style((FONT, 11))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    for s in &panel.series {
        let color = s.color;
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|&p| plottable(p, panel.log_y))
            .collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        if points.len() <= MARKER_MAX_POINTS {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 11))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()?;
    Ok(())
}

fn no_data(area: &DrawingArea<SVGBackend, plotters::coord::Shift>) -> DrawResult<()> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        "no data",
        (w as i32 / 2, h as i32 / 2),
        (FONT, 14)
            .into_font()
            .color(&RGBColor(136, 136, 136))
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    Ok(())
}

fn plottable((x, y): (f64, f64), log_y: bool) -> bool {
    x.is_finite() && y.is_finite() && (!log_y || y > 0.0)
}

/// The x range over every panel's points, padded when it is a single value.
fn x_range(panels: &[Panel]) -> std::ops::Range<f64> {
    let xs = panels.iter().flat_map(|p| {
        p.series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|&&pt| plottable(pt, p.log_y))
            .map(|&(x, _)| x)
    });
    match min_max(xs) {
        None => 0.0..1.0,
        Some((lo, hi)) if lo == hi => lo - 1.0..hi + 1.0,
        Some((lo, hi)) => lo..hi,
    }
}

/// The panel's y range with a margin (multiplicative on a log scale); None without data.
fn y_range(panel: &Panel) -> Option<(f64, f64)> {
    let ys = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|&&pt| plottable(pt, panel.log_y))
        .map(|&(_, y)| y);
    let (lo, hi) = min_max(ys)?;
    if panel.log_y {
        let (l, h) = (lo.log10(), hi.log10());
        let pad = if h > l { (h - l) * Y_PAD_FRACTION } else { 0.5 };
        return Some((10f64.powf(l - pad), 10f64.powf(h + pad)));
    }
    let pad = if hi > lo {
        (hi - lo) * Y_PAD_FRACTION
    } else {
        (lo.abs() * 0.1).max(1e-9)
    };
    Some((lo - pad, hi + pad))
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
    const RED: RGBColor = RGBColor(0xd6, 0x27, 0x28);

    fn series<'a>(name: &'a str, points: &'a [(f64, f64)], color: RGBColor) -> Series<'a> {
        Series {
            name,
            points,
            color,
        }
    }

    fn panel<'a>(title: &'a str, log_y: bool, series: Vec<Series<'a>>) -> Panel<'a> {
        Panel {
            title,
            y_label: "y",
            log_y,
            series,
        }
    }

    /// The parsed document's `<text>` contents and, per stroke colour, the number of points
    /// of each `<polyline>` drawn in that colour (the legend's sample lines have 2).
    struct Parsed {
        texts: Vec<String>,
        polylines: Vec<(String, usize)>,
    }

    fn parse(svg: &str) -> Parsed {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect();
        let polylines = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .map(|n| {
                let stroke = n.attribute("stroke").unwrap_or_default().to_uppercase();
                let points = n.attribute("points").unwrap_or_default();
                (stroke, points.split_whitespace().count())
            })
            .collect();
        Parsed { texts, polylines }
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    fn longest_line(p: &Parsed, c: RGBColor) -> usize {
        p.polylines
            .iter()
            .filter(|(s, _)| *s == hex(c))
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn every_series_is_drawn_and_named_in_the_legend() {
        let a: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 3.0 - 0.02 * i as f64)).collect();
        let b = [(10.0, 2.9), (20.0, 2.7), (30.0, 2.6), (40.0, 2.55)];
        let out = svg(
            &[
                panel(
                    "Loss",
                    false,
                    vec![series("train", &a, BLUE), series("held-out", &b, RED)],
                ),
                panel("Perplexity", true, vec![series("ppl", &b, BLUE)]),
            ],
            "optimizer step",
        )
        .unwrap();
        let p = parse(&out);
        for t in [
            "Loss",
            "Perplexity",
            "train",
            "held-out",
            "ppl",
            "optimizer step",
            "y",
        ] {
            assert!(
                p.texts.iter().any(|x| x == t),
                "no text {t:?} in {:?}",
                p.texts
            );
        }
        assert_eq!(
            longest_line(&p, BLUE),
            50,
            "every train point is on the line"
        );
        assert_eq!(longest_line(&p, RED), 4);
        assert_eq!(
            p.polylines
                .iter()
                .filter(|(s, n)| *s == hex(RED) && *n == 4)
                .count(),
            1
        );
    }

    #[test]
    fn non_finite_and_non_positive_log_points_are_skipped() {
        let pts = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 2.0),
            (f64::INFINITY, 3.0),
            (3.0, -1.0),
            (4.0, 4.0),
        ];
        let linear = parse(&svg(&[panel("p", false, vec![series("s", &pts, BLUE)])], "x").unwrap());
        assert_eq!(longest_line(&linear, BLUE), 4);
        let log = parse(&svg(&[panel("p", true, vec![series("s", &pts, BLUE)])], "x").unwrap());
        assert_eq!(longest_line(&log, BLUE), 3);
    }

    #[test]
    fn a_panel_without_data_says_so() {
        let nan = [(f64::NAN, f64::NAN)];
        let negative = [(1.0, -3.0)];
        let p = parse(
            &svg(
                &[
                    panel("empty", false, vec![series("a", &nan, BLUE)]),
                    panel("log of negatives", true, vec![series("b", &negative, RED)]),
                ],
                "x",
            )
            .unwrap(),
        );
        assert_eq!(p.texts.iter().filter(|t| *t == "no data").count(), 2);
        assert!(p.texts.iter().any(|t| t == "log of negatives"));
        let none = parse(&svg(&[], "x").unwrap());
        assert!(none.texts.iter().any(|t| t == "no data"));
    }

    #[test]
    fn a_single_point_is_drawn() {
        let pts = [(7.0, 0.3)];
        let out = svg(&[panel("p", false, vec![series("s", &pts, BLUE)])], "step").unwrap();
        assert!(out.contains("<circle"), "a marker shows the lone point");
        parse(&out);
    }

    #[test]
    fn text_is_escaped() {
        let pts = [(0.0, 1.0), (1.0, 2.0)];
        let out = svg(
            &[panel(
                "a < b & \"c\"",
                false,
                vec![series("<s>", &pts, BLUE)],
            )],
            "x",
        )
        .unwrap();
        let p = parse(&out);
        assert!(p.texts.iter().any(|t| t == "a < b & \"c\""));
        assert!(p.texts.iter().any(|t| t == "<s>"));
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        let a = [(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)];
        let b = [(0.0, 3.5), (2.0, 2.5)];
        let make = || {
            svg(
                &[panel(
                    "p",
                    false,
                    vec![series("a", &a, BLUE), series("b", &b, RED)],
                )],
                "step",
            )
            .unwrap()
        };
        assert_eq!(make(), make());
        let c = [(0.0, 3.0), (1.0, 2.0), (2.0, 1.5)];
        let other = svg(
            &[panel(
                "p",
                false,
                vec![series("a", &c, BLUE), series("b", &b, RED)],
            )],
            "step",
        )
        .unwrap();
        assert_ne!(make(), other, "the bytes follow the data");
    }
}
