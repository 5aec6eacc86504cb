//! The main curves of a run as one PNG (`output_dir/metrics.png`), from
//! `output_dir/metrics.jsonl` ([`crate::runlog`]): for users without a Grafana.
//!
//! Six panels against the step: reward (total and per function), accuracy (held-out
//! greedy / sampled, and the accuracy reward), KL, completion length, the step's time
//! split, and the loss. Panels whose metrics the run did not log (SFT has no reward)
//! say so. Text is drawn with the DejaVu Sans font compiled into the binary, so no
//! system font (nor fontconfig) is needed: the container image has none.
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use crate::runlog::{self, RunLogError, Series};

/// The file name under `output_dir`.
pub const FILE_NAME: &str = "metrics.png";

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 1200;
const FONT: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(transparent)]
    RunLog(#[from] RunLogError),
    #[error("{0}: no step metrics to plot")]
    Empty(PathBuf),
    #[error("drawing the plot: {0}")]
    Draw(String),
    #[error("writing {path}: {detail}")]
    Write { path: PathBuf, detail: String },
}

/// A panel: its title and which metric names it draws.
struct Panel {
    title: &'static str,
    wants: fn(&str) -> bool,
}

const PANELS: [Panel; 6] = [
    Panel {
        title: "reward (total and per function)",
        wants: |k| k == "reward" || (k.starts_with("rewards/") && k.ends_with("/mean")),
    },
    Panel {
        title: "accuracy",
        wants: |k| k.starts_with("eval/accuracy") || k == "rewards/accuracy/mean",
    },
    Panel {
        title: "KL to the reference",
        wants: |k| k == "kl",
    },
    Panel {
        title: "completion length (tokens)",
        wants: |k| k == "completions/mean_length" || k == "completions/max_length",
    },
    Panel {
        title: "step time split (s)",
        wants: |k| k.starts_with("time/"),
    },
    Panel {
        title: "loss",
        wants: |k| k == "loss",
    },
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the dejavu crate.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The `(step, value)` points of every metric `wants` selects, finite values only.
fn lines(series: &Series, wants: fn(&str) -> bool) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (&step, values) in series {
        for (k, v) in values {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                if wants(k) {
                    out.entry(k.clone()).or_default().push((step as f64, v));
                }
            }
        }
    }
    out.into_iter().collect()
}

/// `lo..hi` padded by 5%, never empty. A flat series (a KL of 0 with beta = 0) gets a
/// span of its magnitude (at least 1), so its tick labels stay distinct (a 1e-9 span
/// printed every tick as "0.0").
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let scale = hi.abs().max(lo.abs()).max(1.0);
    let span = hi - lo;
    let span = if span.abs() <= 1e-9 * scale {
        scale
    } else {
        span.abs()
    };
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

/// Draws `series` into an RGB buffer of `WIDTH x HEIGHT`.
pub fn render(series: &Series, title: &str) -> Result<Vec<u8>, PlotError> {
    register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, (FONT, 30)).map_err(draw_err)?;
        let areas = root.split_evenly((3, 2));
        for (area, panel) in areas.iter().zip(PANELS.iter()) {
            let data = lines(series, panel.wants);
            let points = data.iter().flat_map(|(_, p)| p.iter());
            let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for &(x, y) in points {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
            if data.is_empty() {
                let style = TextStyle::from((FONT, 20).into_font()).color(&BLACK);
                area.draw_text(&format!("{}: not logged", panel.title), &style, (40, 40))
                    .map_err(draw_err)?;
                continue;
            }
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, (FONT, 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(padded(x0, x1), padded(y0, y1))
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .label_style((FONT, 15))
                .draw()
                .map_err(draw_err)?;
            for (i, (name, pts)) in data.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(draw_err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// Draws `dir/metrics.jsonl` into `dir/metrics.png`; returns the PNG's path.
pub fn plot_run(dir: &Path) -> Result<PathBuf, PlotError> {
    let series = runlog::read(&runlog::path(dir))?;
    if series.is_empty() {
        return Err(PlotError::Empty(runlog::path(dir)));
    }
    let title = format!(
        "{} (steps {}-{})",
        dir.file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
        series.keys().next().unwrap_or(&0),
        series.keys().next_back().unwrap_or(&0)
    );
    let rgb = render(&series, &title)?;
    let out = dir.join(FILE_NAME);
    write_png(&out, &rgb, WIDTH, HEIGHT)?;
    Ok(out)
}

/// The end of a run on rank 0: draws the PNG and says where it is; a failure is
/// logged, not fatal (the model is already saved).
pub fn at_end_of_run(main: bool, output_dir: &Path) {
    if !main {
        return;
    }
    match plot_run(output_dir) {
        Ok(p) => println!("metrics plot: {}", p.display()),
        Err(e) => tracing::warn!(error = %e, "could not draw the metrics plot"),
    }
}

fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(&e))?;
    w.write_image_data(rgb).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StepLog;

    /// Pixels darker than light grey in rows `rows` of an RGB image.
    fn dark_pixels(rgb: &[u8], rows: std::ops::Range<u32>) -> usize {
        let row = (WIDTH * 3) as usize;
        rgb[rows.start as usize * row..rows.end as usize * row]
            .chunks(3)
            .filter(|p| p.iter().map(|&c| c as u32).sum::<u32>() < 3 * 160)
            .count()
    }

    #[test]
    fn a_run_is_drawn_with_readable_text() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=20u64 {
            let mut log = StepLog::new();
            let s = step as f64;
            log.insert("reward".into(), s / 20.0);
            log.insert("rewards/accuracy/mean".into(), s / 25.0);
            log.insert("kl".into(), 0.01 * s);
            log.insert("completions/mean_length".into(), 30.0 - s);
            log.insert("time/generate".into(), 1.0);
            log.insert("time/forward_backward".into(), 0.5);
            log.insert("loss".into(), if step == 3 { f64::NAN } else { 1.0 / s });
            runlog::append(dir.path(), step, &log).unwrap();
        }
        let png_path = plot_run(dir.path()).unwrap();
        assert_eq!(png_path, dir.path().join("metrics.png"));

        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&png_path).unwrap(),
        ));
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut rgb).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        // The title band holds only the title's text: glyphs were rasterised.
        let title = dark_pixels(&rgb, 0..40);
        assert!(title > 300, "title text missing: {title} dark pixels");
        // Below the plots' frames and ticks, the text of tick labels and captions.
        assert!(dark_pixels(&rgb, 40..HEIGHT) > 20_000);

        // An empty series draws the "not logged" notes, and text still renders.
        let blank = render(&Series::new(), "empty").unwrap();
        assert!(dark_pixels(&blank, 0..40) > 50);
    }

    #[test]
    fn a_flat_series_gets_a_readable_range() {
        let r = padded(0.0, 0.0);
        assert!((r.end - r.start - 0.1).abs() < 1e-12, "{r:?}");
        let r = padded(250.0, 250.0);
        assert!(
            r.start < 250.0 && r.end > 250.0 && r.end - r.start > 20.0,
            "{r:?}"
        );
        let r = padded(1.0, 3.0);
        assert!(
            (r.start - 0.9).abs() < 1e-12 && (r.end - 3.1).abs() < 1e-12,
            "{r:?}"
        );
    }

    #[test]
    fn no_file_or_no_steps_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = plot_run(dir.path()).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl"), "{err}");
        std::fs::write(runlog::path(dir.path()), "").unwrap();
        let err = plot_run(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no step metrics"), "{err}");
    }
}
