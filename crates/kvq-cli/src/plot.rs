//! The sweep's plot: perplexity ratio to fp16 against bits/elem, kvq's plans and the peer's KV types,
//! each set's Pareto front as a line, fp16 as the reference line and the targets as boxes.
//! Drawn with plotters' bitmap backend; text uses DejaVu Sans compiled in (the `dejavu` crate) through
//! plotters' `ab_glyph` feature, so no system font library is needed. If the font cannot be
//! registered the plot is drawn without text.

use anyhow::{Context, Result};
use kvq_model::sweep::{pareto_front, short_label, Point, TARGETS};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::OnceLock;

/// Registers the embedded font once; false when it cannot be (then text is skipped).
pub(crate) fn font_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    })
}

/// What to draw.
pub struct PlotSpec<'a> {
    /// Title line.
    pub title: &'a str,
    /// kvq's points (fp16 included).
    pub ours: &'a [Point],
    /// The peer's points (may be empty).
    pub peer: &'a [Point],
    /// Upper end of the ratio axis; points above it are drawn on the top edge as triangles.
    pub y_max: f64,
}

/// Writes the plot as a PNG of `w` x `h` pixels.
pub fn plot_png(path: &str, spec: &PlotSpec, w: u32, h: u32) -> Result<()> {
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    draw(&root, spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing the plot {path}"))?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    spec: &PlotSpec,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let text = font_ok();
    let all: Vec<&Point> = spec.ours.iter().chain(spec.peer).collect();
    let x_max = all
        .iter()
        .map(|p| p.bits)
        .filter(|b| b.is_finite())
        .fold(4.0f64, f64::max)
        + 1.0;
    let y_max = spec.y_max.max(1.05);
    let y_min = all
        .iter()
        .map(|p| p.ratio)
        .filter(|r| r.is_finite())
        .fold(1.0f64, f64::min)
        - 0.01;
    let mut b = ChartBuilder::on(root);
    b.margin(20);
    if text {
        b.caption(spec.title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = b.build_cartesian_2d(0f64..x_max, y_min..y_max)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(WHITE.mix(0.0));
    if text {
        mesh.x_desc("bits per element (scales, zeros, norms, codes and f16 window counted)")
            .y_desc("perplexity / own fp16 perplexity")
            .label_style(("sans-serif", 14))
            .y_labels(20)
            .x_labels(18)
            .y_label_formatter(&|y| format!("{y:.2}"));
    } else {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.draw()?;
    // fp16 reference.
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (x_max, 1.0)],
            BLACK.stroke_width(1),
        ))?
        .label("fp16 (ratio 1)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    // Targets: the allowed region of each is below-left of its corner.
    let grey = RGBColor(150, 150, 150);
    for (i, (bits, ratio)) in TARGETS.iter().enumerate() {
        let s = chart.draw_series(LineSeries::new(
            [(0.0, *ratio), (*bits, *ratio), (*bits, y_min)],
            grey.stroke_width(1),
        ))?;
        if i == 0 {
            s.label("targets (ratio <= r at <= b bits)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey));
        }
    }
    let clip = |r: f64| r.min(y_max);
    let sets: [(&[Point], RGBColor, &str); 2] = [
        (spec.ours, RGBColor(31, 90, 180), "kvq"),
        (spec.peer, RGBColor(200, 50, 40), "llama.cpp"),
    ];
    let mut clipped = 0;
    for (pts, color, name) in sets {
        if pts.is_empty() {
            continue;
        }
        let front = pareto_front(pts);
        chart
            .draw_series(LineSeries::new(
                front.iter().map(|&i| (pts[i].bits, clip(pts[i].ratio))),
                color.stroke_width(2),
            ))?
            .label(format!("{name} (line: Pareto front)"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        for (i, p) in pts.iter().enumerate() {
            if !(p.bits.is_finite() && p.ratio.is_finite()) {
                continue;
            }
            let at = (p.bits, clip(p.ratio));
            if p.ratio > y_max {
                chart.draw_series(std::iter::once(TriangleMarker::new(at, 6, color)))?;
            } else if name == "kvq" {
                chart.draw_series(std::iter::once(Circle::new(at, 4, color.filled())))?;
            } else {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [
                        (p.bits - 0.06, p.ratio * 0.998),
                        (p.bits + 0.06, p.ratio * 1.002),
                    ],
                    color.filled(),
                )))?;
            }
            if text && (front.contains(&i) || name != "kvq" || p.ratio > y_max) {
                let mut l = short_label(&p.label);
                // Labels of clipped points are stacked down from the top edge, one line each.
                let mut dy = -14;
                if p.ratio > y_max {
                    l = format!("{l} (ratio {:.2})", p.ratio);
                    dy = 6 + 13 * clipped;
                    clipped += 1;
                }
                let style = ("sans-serif", 11).into_font().color(&color);
                chart.draw_series(std::iter::once(
                    EmptyElement::at(at) + Text::new(l, (6, dy), style),
                ))?;
            }
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("kvq-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.png");
        let p = |l: &str, bits: f64, ratio: f64| Point {
            label: l.into(),
            bits,
            ratio,
        };
        let ours = vec![
            p("fp16", 16.0, 1.0),
            p("kivi:bits=4", 5.0, 1.016),
            p("kivi:bits=2", 3.0, 1.8),
            p("rvq", 2.25, 4.0),
        ];
        let peer = vec![p("llama.cpp -ctk q4_0 -ctv q4_0", 4.5, 1.05)];
        plot_png(
            path.to_str().unwrap(),
            &PlotSpec {
                title: "test",
                ours: &ours,
                peer: &peer,
                y_max: 2.0,
            },
            640,
            480,
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // Width and height from the IHDR chunk.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 640);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 480);
        assert!(font_ok(), "the embedded font must register");
        std::fs::remove_dir_all(&dir).ok();
    }
}
