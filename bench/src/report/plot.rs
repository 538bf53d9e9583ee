//! The report's plots, drawn with plotters' SVG backend into strings: CDFs, figures
//! against a variable, and a timeline of horizontal bars. Every series is cut to at most
//! [`MAX_POINTS`] points, so the page stays small whatever the sample count.

use plotters::coord::Shift;
use plotters::prelude::*;

/// The most points a plotted series has.
pub const MAX_POINTS: usize = 500;

const WIDTH: u32 = 820;
const HEIGHT: u32 = 440;
const FONT: &str = "sans-serif";

/// Distinguishable colors (the "tab10" palette), one a series.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// A named line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// At most `max` of `steps` (each `(x, y)`, y rising): evenly spaced from the first, the
/// last quarter of the budget kept for the tail (the largest values, where the p99 lives),
/// the last step always kept. A step left out makes the curve rise later, at the next step kept.
pub fn thin_steps(steps: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if steps.len() <= max {
        return steps.to_vec();
    }
    let tail = if max >= 4 { max / 4 } else { 0 };
    let body = &steps[..steps.len() - tail];
    let take = max - tail;
    let mut out: Vec<(f64, f64)> = match take {
        0 => Vec::new(),
        1 => vec![body[body.len() - 1]],
        _ => (0..take)
            .map(|k| body[k * (body.len() - 1) / (take - 1)])
            .collect(),
    };
    out.dedup_by(|a, b| a == b);
    out.extend_from_slice(&steps[steps.len() - tail..]);
    out
}

/// The polyline of a CDF given as steps: from `(start, 0)`, flat until each step's x,
/// then up to its fraction. At most [`MAX_POINTS`] points.
pub fn staircase(start: f64, steps: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let steps = thin_steps(steps, (MAX_POINTS - 1) / 2);
    let mut points = Vec::with_capacity(1 + 2 * steps.len());
    let mut y = 0.0;
    points.push((start.min(steps.first().map_or(start, |s| s.0)), 0.0));
    for (x, to) in steps {
        points.push((x, y));
        points.push((x, to));
        y = to;
    }
    points
}

/// The empirical CDF of samples, as steps: the i-th smallest of n at `(x_i, i/n)`; equal
/// samples make one step.
pub fn sample_steps(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mut steps: Vec<(f64, f64)> = Vec::new();
    for (i, &x) in sorted.iter().enumerate() {
        let y = (i + 1) as f64 / n;
        match steps.last_mut() {
            Some(last) if last.0 == x => last.1 = y,
            _ => steps.push((x, y)),
        }
    }
    steps
}

/// A number for an axis label: no trailing zeros, no exponent.
pub fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 1.0 {
        1
    } else {
        (-v.abs().log10().floor()) as usize + 1
    };
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The x (or y) range of log axis that holds every positive value of `values`.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.1, 10.0);
    }
    let (lo, hi) = (lo / 1.3, hi * 1.3);
    if hi / lo < 4.0 {
        let mid = (lo * hi).sqrt();
        (mid / 2.0, mid * 2.0)
    } else {
        (lo, hi)
    }
}

/// Ticks of a log axis over `[lo, hi]`: the labelled ones (1-2-5 of each decade, or only
/// the decades when there are many, or 1..9 when there are few) and the unlabelled grid.
pub fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let ticks = |mults: &[f64]| -> Vec<f64> {
        let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        (d0..=d1)
            .flat_map(|d| mults.iter().map(move |m| m * 10f64.powi(d)))
            .filter(|v| *v >= lo * (1.0 - 1e-9) && *v <= hi * (1.0 + 1e-9))
            .collect()
    };
    let all = ticks(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    let bold = match ticks(&[1.0, 2.0, 5.0]) {
        t if t.len() > 12 => ticks(&[1.0]),
        t if t.len() < 4 => all.clone(),
        t => t,
    };
    (bold, all)
}

fn linear_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let hi = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    (0.0, if hi > 0.0 { hi * 1.08 } else { 1.0 })
}

fn err(e: impl std::fmt::Display) -> String {
    format!("cannot draw a plot: {e}")
}

/// Draws into an SVG string with `draw` and returns it.
fn svg(
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// CDFs, one line a series (points as [`staircase`] makes them), y the fraction of
/// samples, x on a log scale when `log_x`.
pub fn cdf(title: &str, x_label: &str, series: &[Series], log_x: bool) -> Result<String, String> {
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    svg(|root| {
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64);
        let y_desc = "fraction of samples at or below";
        // One chart either way; x below `$floor` (a log axis' lower end) is drawn at it.
        macro_rules! draw {
            ($chart:expr, $floor:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_desc)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .axis_desc_style((FONT, 15))
                    .label_style((FONT, 13))
                    .draw()
                    .map_err(err)?;
                for (i, s) in series.iter().enumerate() {
                    let c = color(i);
                    let points: Vec<(f64, f64)> =
                        s.points.iter().map(|&(x, y)| (x.max($floor), y)).collect();
                    chart
                        .draw_series(LineSeries::new(points, c.stroke_width(2)))
                        .map_err(err)?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                        });
                }
                legend(&mut chart, SeriesLabelPosition::LowerRight)
            }};
        }
        if log_x {
            let (lo, hi) = log_range(xs());
            let (bold, light) = log_ticks(lo, hi);
            draw!(
                builder
                    .build_cartesian_2d(
                        (lo..hi)
                            .log_scale()
                            .with_key_points(bold)
                            .with_light_points(light),
                        0.0..1.0,
                    )
                    .map_err(err)?,
                lo
            )
        } else {
            let (lo, hi) = linear_range(xs());
            draw!(
                builder.build_cartesian_2d(lo..hi, 0.0..1.0).map_err(err)?,
                f64::NEG_INFINITY
            )
        }
    })
}

fn legend<'a, X: plotters::coord::ranged1d::Ranged, Y: plotters::coord::ranged1d::Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    at: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)
}

/// Lines with a marker at each point, x linear from 0, y on a log scale when `log_y`.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<String, String> {
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    svg(|root| {
        let (x0, x1) = linear_range(xs());
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .x_label_formatter(&|v| tick(*v))
                    .y_label_formatter(&|v| tick(*v))
                    .axis_desc_style((FONT, 15))
                    .label_style((FONT, 13))
                    .draw()
                    .map_err(err)?;
                for (i, s) in series.iter().enumerate() {
                    let c = color(i);
                    let points: Vec<(f64, f64)> =
                        s.points.iter().copied().take(MAX_POINTS).collect();
                    chart
                        .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                        .map_err(err)?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                        });
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                        .map_err(err)?;
                }
                legend(&mut chart, SeriesLabelPosition::UpperLeft)
            }};
        }
        // Headroom above the lines for the legend, a line a series.
        let room = 1.0 + 0.1 * series.len() as f64;
        if log_y {
            let (y0, y1) = log_range(ys());
            let y1 = y1 * (y1 / y0).powf(room - 1.0);
            let (bold, light) = log_ticks(y0, y1);
            draw!(builder
                .build_cartesian_2d(
                    x0..x1,
                    (y0..y1)
                        .log_scale()
                        .with_key_points(bold)
                        .with_light_points(light)
                )
                .map_err(err)?)
        } else {
            let (y0, y1) = linear_range(ys());
            draw!(builder
                .build_cartesian_2d(x0..x1, y0..y1 * room)
                .map_err(err)?)
        }
    })
}

/// One bar of a timeline: a row's stretch `[from, to]` of kind `kind` (an index into the
/// timeline's kinds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stretch {
    pub from: f64,
    pub to: f64,
    pub kind: usize,
}

/// Horizontal bars, one row each (labelled `row_label` and its number, from the top),
/// each a sequence of stretches colored by kind; `kinds` names them in the legend.
pub fn timeline(
    title: &str,
    x_label: &str,
    row_label: &str,
    rows: &[Vec<Stretch>],
    kinds: &[&str],
) -> Result<String, String> {
    let end = rows.iter().flatten().map(|s| s.to).fold(0.0f64, f64::max);
    let n = rows.len().max(1);
    svg(|root| {
        // Room on the right for the legend.
        let x1 = if end > 0.0 { end * 1.45 } else { 1.0 };
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 18))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..x1, (n as f64 + 0.5)..0.5)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(row_label)
            .y_labels(n + 1)
            .disable_y_mesh()
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-9 && *v >= 1.0 {
                    format!("{}", v.round() as u64)
                } else {
                    String::new()
                }
            })
            .axis_desc_style((FONT, 15))
            .label_style((FONT, 13))
            .draw()
            .map_err(err)?;
        for (k, name) in kinds.iter().enumerate() {
            let c = color(k);
            let bars: Vec<Rectangle<(f64, f64)>> = rows
                .iter()
                .enumerate()
                .flat_map(|(r, row)| {
                    let y = (r + 1) as f64;
                    row.iter()
                        .filter(move |s| s.kind == k && s.to >= s.from)
                        .map(move |s| {
                            Rectangle::new([(s.from, y - 0.32), (s.to, y + 0.32)], c.filled())
                        })
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Structural checks every plot passes: one SVG, the texts, no external reference, a
    /// bounded size.
    pub(crate) fn check_svg(svg: &str, texts: &[&str]) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
        for t in texts {
            assert!(svg.contains(t), "no {t:?} in the plot");
        }
        let without_ns = svg.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(!without_ns.contains("http://") && !without_ns.contains("https://"));
        assert!(!svg.contains("<image") && !svg.contains("href"));
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
    }

    fn polyline_points(svg: &str) -> Vec<usize> {
        svg.split("<polyline")
            .skip(1)
            .map(|p| {
                let at = p.find("points=\"").unwrap() + 8;
                p[at..p[at..].find('"').unwrap() + at]
                    .split_whitespace()
                    .count()
            })
            .collect()
    }

    #[test]
    fn staircase_of_steps() {
        let steps = [(10.0, 0.25), (20.0, 1.0)];
        assert_eq!(
            staircase(5.0, &steps),
            vec![
                (5.0, 0.0),
                (10.0, 0.0),
                (10.0, 0.25),
                (20.0, 0.25),
                (20.0, 1.0)
            ]
        );
        // The start never lies after the first step.
        assert_eq!(staircase(50.0, &steps)[0], (10.0, 0.0));
        assert_eq!(staircase(1.0, &[]), vec![(1.0, 0.0)]);
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_tail() {
        let steps: Vec<(f64, f64)> = (1..=10_000).map(|i| (i as f64, i as f64 / 1e4)).collect();
        let thin = thin_steps(&steps, 200);
        assert!(thin.len() <= 200, "{}", thin.len());
        assert_eq!(thin.last(), Some(&(10_000.0, 1.0)));
        // The last 50 steps whole.
        assert_eq!(&thin[thin.len() - 50..], &steps[steps.len() - 50..]);
        assert!(thin.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(thin[0], steps[0]);
        let few = &steps[..30];
        assert_eq!(thin_steps(few, 200), few.to_vec());
        let line = staircase(0.0, &steps);
        assert!(line.len() <= MAX_POINTS, "{}", line.len());
    }

    #[test]
    fn empirical_cdf() {
        let steps = sample_steps(&[3.0, 1.0, 2.0, 2.0]);
        assert_eq!(steps, vec![(1.0, 0.25), (2.0, 0.75), (3.0, 1.0)]);
        assert!(sample_steps(&[]).is_empty());
    }

    #[test]
    fn log_axis_ticks() {
        let near = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9 * y.abs())
        };
        // Less than a decade and a half: 1..9 of each decade.
        let (bold, light) = log_ticks(0.11, 1.9);
        assert!(
            near(&bold, &[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
            "{bold:?}"
        );
        assert_eq!(bold, light);
        // A few decades: 1-2-5.
        let (bold, light) = log_ticks(0.05, 30.0);
        assert!(
            near(&bold, &[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]),
            "{bold:?}"
        );
        assert_eq!(light.len(), 5 + 9 + 9 + 3);
        // Many: the decades alone.
        let (bold, _) = log_ticks(1.0, 1e6);
        assert!(
            near(&bold, &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]),
            "{bold:?}"
        );
    }

    #[test]
    fn ticks() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(1.0), "1");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(0.05), "0.05");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(250.0), "250");
        assert_eq!(tick(1000.0), "1000");
    }

    #[test]
    fn cdf_plot_of_many_samples() {
        let samples: Vec<f64> = (1..=20_000)
            .map(|i| 0.1 + (i % 997) as f64 / 100.0)
            .collect();
        let series = vec![
            Series {
                name: "100 pages/epoch".into(),
                points: staircase(0.1, &sample_steps(&samples)),
            },
            Series {
                name: "4000 pages/epoch".into(),
                points: staircase(1.0, &[(2.0, 0.5), (9.0, 1.0)]),
            },
        ];
        for log_x in [true, false] {
            let svg = cdf("Epoch pause", "pause (ms)", &series, log_x).unwrap();
            check_svg(
                &svg,
                &[
                    "Epoch pause",
                    "pause (ms)",
                    "100 pages/epoch",
                    "4000 pages/epoch",
                    "fraction",
                ],
            );
            assert!(polyline_points(&svg).iter().all(|&n| n <= MAX_POINTS));
        }
    }

    #[test]
    fn lines_plot() {
        let series = vec![
            Series {
                name: "pause p50".into(),
                points: vec![(100.0, 0.2), (1000.0, 0.3), (4000.0, 1.5)],
            },
            Series {
                name: "pause p99".into(),
                points: vec![(100.0, 0.4), (1000.0, 0.9), (4000.0, 7.0)],
            },
        ];
        for log_y in [true, false] {
            let svg = lines("Pause", "dirty pages per epoch", "ms", &series, log_y).unwrap();
            check_svg(
                &svg,
                &["Pause", "dirty pages per epoch", "pause p50", "pause p99"],
            );
            assert_eq!(svg.matches("<circle").count(), 6);
        }
        // No series at all still draws the axes.
        let svg = lines("Nothing", "x", "y", &[], true).unwrap();
        check_svg(&svg, &["Nothing"]);
    }

    #[test]
    fn timeline_plot() {
        let rows = vec![
            vec![
                Stretch {
                    from: 0.0,
                    to: 1.0,
                    kind: 0,
                },
                Stretch {
                    from: 1.0,
                    to: 30.0,
                    kind: 1,
                },
                Stretch {
                    from: 30.0,
                    to: 45.0,
                    kind: 2,
                },
                Stretch {
                    from: 45.0,
                    to: 190.0,
                    kind: 3,
                },
            ],
            vec![
                Stretch {
                    from: 0.0,
                    to: 2.0,
                    kind: 0,
                },
                Stretch {
                    from: 2.0,
                    to: 210.0,
                    kind: 3,
                },
            ],
        ];
        let kinds = [
            "kill → detected",
            "detected → fenced",
            "fenced → promoted",
            "promoted → first reply",
        ];
        let svg = timeline("Failover", "ms after the SIGKILL", "trial", &rows, &kinds).unwrap();
        check_svg(
            &svg,
            &[
                "Failover",
                "ms after the SIGKILL",
                "trial",
                "detected → fenced",
                "promoted → first reply",
            ],
        );
        // Six bars and four legend keys, besides the background rectangles.
        assert!(svg.matches("<rect").count() >= 10);
    }
}
