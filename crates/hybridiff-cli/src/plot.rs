//! PNG plots: `hybridiff plot TRACE.json` (one run's trace) and `tune`'s report.
//!
//! Drawn with `plotters` on its in-memory bitmap backend and encoded by our PNG writer
//! (atomic). Text goes through plotters' `ab_glyph` renderer with DejaVu Sans embedded from
//! the `dejavu` crate (the font's licence: Bitstream Vera / DejaVu, permissive; the crate
//! MIT or Apache-2.0), so drawing needs no system font library (plotters' `ttf` feature
//! would link fontconfig and freetype).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hybridiff_engine::trace::{StepMode, Trace};
use hybridiff_engine::tune::{step_mode, Schedule};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Arguments of `hybridiff plot`.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// A trace written by `--trace` (generate, denoise) or `bench --trace-dir`.
    pub trace: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: PlotArgs) -> Result<()> {
    crate::outputs::check_name("--out", &args.out, crate::outputs::Format::Png)?;
    hybridiff_engine::io::check_output_path(&args.out, "--out")?;
    hybridiff_engine::io::check_distinct_paths(&[("--out", &args.out)], &[("TRACE", &args.trace)])?;
    let text = hybridiff_models::weights::read_text_bounded(&args.trace, 64 << 20)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    let trace: Trace = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a trace (as --trace and bench --trace-dir write)",
            args.trace.display()
        )
    })?;
    if trace.steps.is_empty() {
        anyhow::bail!("{}: the trace has no steps", args.trace.display());
    }
    for s in &trace.steps {
        if s.rank_compute_seconds.len() != trace.world_size
            || !s.rel_mae.is_finite()
            || !s.wall_seconds.is_finite()
            || s.rank_compute_seconds.iter().any(|c| !c.is_finite())
        {
            anyhow::bail!(
                "{}: step {} has {} per-rank times for {} ranks, or a non-finite value",
                args.trace.display(),
                s.index,
                s.rank_compute_seconds.len(),
                trace.world_size
            );
        }
    }
    trace_plot(&args.out, &trace)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    anyhow::ensure!(ok, "the embedded DejaVu Sans font could not be read");
    Ok(())
}

/// Draws on a white `w x h` canvas with `draw`, then writes the PNG atomically.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    let png = hybridiff_engine::io::encode_png(path, w, h, buf)?;
    hybridiff_engine::io::write_bytes_atomic(path, &png)?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}

/// `lo..hi` widened by 5% (and to a non-empty range).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let span = (hi - lo).abs().max(1e-9 * hi.abs().max(1.0));
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

const EXACT_BG: RGBColor = RGBColor(255, 255, 255);
const FILL_BG: RGBColor = RGBColor(255, 214, 153);
const PIPE_BG: RGBColor = RGBColor(190, 215, 245);

fn mode_color(m: StepMode) -> RGBColor {
    match m {
        StepMode::Exact => EXACT_BG,
        StepMode::Fill => FILL_BG,
        StepMode::Pipelined => PIPE_BG,
    }
}

/// One run's trace: rel-MAE of the exact steps over the mode of every step (shaded), the
/// switching slope, and each rank's compute seconds per step.
pub fn trace_plot(path: &Path, t: &Trace) -> Result<()> {
    let n = t.steps.len();
    let x = -0.5..(n as f64 - 0.5);
    render(path, (1000, 960), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let title = format!(
            "{} on {} rank(s), {} steps {}, guidance {}{}",
            t.strategy,
            t.world_size,
            t.num_steps,
            t.scheduler,
            t.guidance,
            match (t.tau1, t.tau2) {
                (Some(a), Some(b)) => format!(", tau1 {a}, tau2 {b}"),
                _ => String::new(),
            }
        );
        let root = root.titled(&title, (FONT, 22)).map_err(plot_err)?;
        let panels = root.split_evenly((3, 1));
        // rel-MAE over the modes.
        let exact: Vec<(f64, f64)> = t
            .steps
            .iter()
            .filter(|s| s.mode == StepMode::Exact)
            .map(|s| (s.index as f64, s.rel_mae))
            .collect();
        let top = exact.iter().map(|p| p.1).fold(0.0, f64::max);
        let mut c = ChartBuilder::on(&panels[0])
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .caption("rel-MAE of the CFG branches (exact steps); shaded: fill (orange), pipelined (blue)", (FONT, 16))
            .build_cartesian_2d(x.clone(), padded(0.0, top))
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("rel-MAE")
            .label_style((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        let y = padded(0.0, top);
        c.draw_series(
            t.steps
                .iter()
                .filter(|s| s.mode != StepMode::Exact)
                .map(|s| {
                    let i = s.index as f64;
                    Rectangle::new(
                        [(i - 0.5, y.start), (i + 0.5, y.end)],
                        mode_color(s.mode).filled(),
                    )
                }),
        )
        .map_err(plot_err)?;
        // One line per run of consecutive exact steps (nothing is measured in between).
        for run in exact.chunk_by(|a, b| b.0 - a.0 == 1.0) {
            c.draw_series(LineSeries::new(run.iter().copied(), BLUE.stroke_width(2)))
                .map_err(plot_err)?;
        }
        c.draw_series(exact.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(plot_err)?;
        // Slope.
        let slopes: Vec<(f64, f64)> = t
            .steps
            .iter()
            .filter_map(|s| {
                s.slope
                    .filter(|v| v.is_finite())
                    .map(|v| (s.index as f64, v))
            })
            .collect();
        let (lo, hi) = slopes
            .iter()
            .fold((0.0f64, 0.0f64), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let mut c = ChartBuilder::on(&panels[1])
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .caption(
                "switching slope (log[n-L] - log[n-1]) / L, while tau1 is unknown",
                (FONT, 16),
            )
            .build_cartesian_2d(x.clone(), padded(lo, hi))
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("slope")
            .label_style((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        c.draw_series(LineSeries::new(
            [(x.start, 0.0), (x.end, 0.0)],
            BLACK.mix(0.4),
        ))
        .map_err(plot_err)?;
        c.draw_series(slopes.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(plot_err)?;
        // Per-rank step time.
        let top = t
            .steps
            .iter()
            .flat_map(|s| {
                s.rank_compute_seconds
                    .iter()
                    .copied()
                    .chain([s.wall_seconds])
            })
            .fold(0.0, f64::max);
        let mut c = ChartBuilder::on(&panels[2])
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .caption(
                "seconds per step: each rank's compute, and the step's wall time on rank 0",
                (FONT, 16),
            )
            .build_cartesian_2d(x.clone(), padded(0.0, top))
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("seconds")
            .label_style((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        for r in 0..t.world_size {
            let color = Palette99::pick(r).to_rgba();
            c.draw_series(LineSeries::new(
                t.steps
                    .iter()
                    .map(|s| (s.index as f64, s.rank_compute_seconds[r])),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("rank {r} compute"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        c.draw_series(LineSeries::new(
            t.steps.iter().map(|s| (s.index as f64, s.wall_seconds)),
            BLACK.mix(0.6),
        ))
        .map_err(plot_err)?
        .label("wall (rank 0)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.mix(0.6)));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// One class of tune's candidates.
pub struct FrontPoint {
    pub seconds: f64,
    pub quality: f64,
    pub on_front: bool,
    pub chosen: bool,
    pub meets: bool,
}

/// Predicted latency against quality: every class (grey: below the floor, dark: meets it),
/// the Pareto front joined, the floor and serial's latency dashed, the choice in red.
pub fn latency_quality(
    path: &Path,
    points: &[FrontPoint],
    metric: &str,
    floor: f64,
    serial_seconds: f64,
    subtitle: &str,
) -> Result<()> {
    let (smin, smax) = points
        .iter()
        .map(|p| p.seconds)
        .chain([serial_seconds])
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let (qmin, qmax) = points
        .iter()
        .map(|p| p.quality)
        .chain([floor])
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let xr = padded(smin, smax);
    let yr = padded(qmin, qmax);
    render(path, (900, 640), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut c = ChartBuilder::on(root)
            .margin(16)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .caption(format!("tune: predicted latency vs {metric}"), (FONT, 22))
            .build_cartesian_2d(xr.clone(), yr.clone())
            .map_err(plot_err)?;
        c.configure_mesh()
            .x_desc(format!("predicted seconds per image ({subtitle})"))
            .y_desc(metric)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(plot_err)?;
        let dashed = |a: (f64, f64), b: (f64, f64), color: RGBColor| {
            let n = 40;
            (0..n).filter(|i| i % 2 == 0).map(move |i| {
                let f0 = i as f64 / n as f64;
                let f1 = (i + 1) as f64 / n as f64;
                PathElement::new(
                    [
                        (a.0 + (b.0 - a.0) * f0, a.1 + (b.1 - a.1) * f0),
                        (a.0 + (b.0 - a.0) * f1, a.1 + (b.1 - a.1) * f1),
                    ],
                    color.stroke_width(2),
                )
            })
        };
        c.draw_series(dashed((xr.start, floor), (xr.end, floor), RED))
            .map_err(plot_err)?
            .label("floor")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
        c.draw_series(dashed(
            (serial_seconds, yr.start),
            (serial_seconds, yr.end),
            RGBColor(90, 90, 90),
        ))
        .map_err(plot_err)?
        .label("serial")
        .legend(|(x, y)| {
            PathElement::new([(x, y), (x + 16, y)], RGBColor(90, 90, 90).stroke_width(2))
        });
        c.draw_series(points.iter().map(|p| {
            let color = if p.meets {
                RGBColor(60, 60, 60)
            } else {
                RGBColor(185, 185, 185)
            };
            Circle::new((p.seconds, p.quality), 3, color.filled())
        }))
        .map_err(plot_err)?
        .label("candidate class")
        .legend(|(x, y)| Circle::new((x + 8, y), 3, RGBColor(60, 60, 60).filled()));
        let mut front: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.on_front)
            .map(|p| (p.seconds, p.quality))
            .collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        c.draw_series(LineSeries::new(front.iter().copied(), BLUE.stroke_width(2)))
            .map_err(plot_err)?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        c.draw_series(front.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))
            .map_err(plot_err)?;
        if let Some(p) = points.iter().find(|p| p.chosen) {
            c.draw_series([Circle::new((p.seconds, p.quality), 9, RED.stroke_width(3))])
                .map_err(plot_err)?
                .label("chosen")
                .legend(|(x, y)| Circle::new((x + 8, y), 6, RED.stroke_width(2)));
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT, 14))
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })
}

/// One input's serial rel-MAE curve and the chosen candidate's schedule on it.
pub struct CurvePanel {
    pub title: String,
    pub curve: Vec<f64>,
    pub schedule: Option<Schedule>,
}

/// Serial's rel-MAE curve of each input, with the chosen candidate's tau1 and tau2 and its
/// pipelined steps shaded.
pub fn rel_mae_panels(path: &Path, panels: &[CurvePanel], steps: usize) -> Result<()> {
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (560 * cols as u32, 300 * rows as u32 + 50);
    render(path, (w, h), |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root
            .titled(
                "serial's rel-MAE per step; the chosen candidate's tau1 (red), tau2 (purple), fill (orange) and pipelined (blue) steps",
                (FONT, 18),
            )
            .map_err(plot_err)?;
        let areas = root.split_evenly((rows, cols));
        for (p, area) in panels.iter().zip(&areas) {
            let top = p
                .curve
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max);
            let y = padded(0.0, top);
            let caption = match p.schedule {
                Some(s) => format!(
                    "{} (tau1 {}, tau2 {}{})",
                    p.title,
                    s.tau1,
                    s.tau2,
                    if s.fallback() { ", fallback" } else { "" }
                ),
                None => p.title.clone(),
            };
            let mut c = ChartBuilder::on(area)
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(55)
                .caption(caption, (FONT, 14))
                .build_cartesian_2d(-0.5..(steps as f64 - 0.5), y.clone())
                .map_err(plot_err)?;
            c.configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 12))
                .draw()
                .map_err(plot_err)?;
            let pipelined = p.schedule.and_then(|s| s.pipelined(steps));
            c.draw_series((0..steps).filter_map(|i| {
                let m = step_mode(i, pipelined);
                (m != StepMode::Exact).then(|| {
                    let x = i as f64;
                    Rectangle::new(
                        [(x - 0.5, y.start), (x + 0.5, y.end)],
                        mode_color(m).filled(),
                    )
                })
            }))
            .map_err(plot_err)?;
            c.draw_series(LineSeries::new(
                p.curve.iter().enumerate().map(|(i, &v)| (i as f64, v)),
                BLUE.stroke_width(2),
            ))
            .map_err(plot_err)?;
            if let Some(s) = p.schedule {
                for (t, color) in [(s.tau1, RED), (s.tau2, RGBColor(120, 0, 160))] {
                    c.draw_series(LineSeries::new(
                        [(t as f64, y.start), (t as f64, y.end)],
                        color.stroke_width(2),
                    ))
                    .map_err(plot_err)?;
                }
            }
        }
        Ok(())
    })
}
