//! `ftscript plot RUN_DIR...`: a run's curves from its `metrics.jsonl` as one PNG — train and
//! eval loss, learning rate, and tokens/s against the optimizer step, a panel each, one colour
//! per run when several are overlaid. `train` writes `output_dir/loss.png` this way at the end
//! of a run. Text is set in DejaVu Sans, embedded in the binary (no system fonts needed).

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// DejaVu Sans (Bitstream Vera license: `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The picture's size in pixels.
pub const SIZE: (u32, u32) = (1200, 1000);

/// One run's series, `(step, value)` each.
#[derive(Default)]
struct Curves {
    name: String,
    loss: Vec<(f64, f64)>,
    eval_loss: Vec<(f64, f64)>,
    lr: Vec<(f64, f64)>,
    tokens_per_sec: Vec<(f64, f64)>,
}

/// The curves of `dir/metrics.jsonl` (lines without a `step` are skipped; a line that is not
/// JSON is an error naming `file:line`).
fn read(dir: &Path) -> Result<Curves> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {} (is {} a run's output_dir?)", path.display(), dir.display()))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| dir.display().to_string());
    let mut c = Curves { name, ..Default::default() };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else { continue };
        let push = |key: &str, to: &mut Vec<(f64, f64)>| {
            if let Some(x) = v.get(key).and_then(|x| x.as_f64()).filter(|x| x.is_finite()) {
                to.push((step, x));
            }
        };
        push("loss", &mut c.loss);
        push("eval_loss", &mut c.eval_loss);
        push("lr", &mut c.lr);
        push("tokens_per_sec", &mut c.tokens_per_sec);
    }
    if c.loss.is_empty() && c.eval_loss.is_empty() {
        bail!("{}: no loss logged yet", path.display());
    }
    Ok(c)
}

/// `(lo, hi)` of the values, widened a little (and made non-empty).
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad, hi + pad)
}

/// Writes the curves of the runs in `dirs` to `out` (a PNG, written whole or not at all).
pub fn plot(dirs: &[PathBuf], out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("plot: name at least one run directory");
    }
    let runs = dirs.iter().map(|d| read(d)).collect::<Result<Vec<_>>>()?;
    // ignore the error of a second registration: the font is the same
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    // beside `out`, named `.NAME.tmp-PID.png` (the backend picks the format by the extension)
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "loss".into());
    let tmp = out.with_file_name(format!(".{stem}.tmp-{}.png", std::process::id()));
    draw(&runs, &tmp).map_err(|e| anyhow::anyhow!("plot: drawing {}: {e}", out.display()))?;
    crate::nn::weights::persist(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

type Panel<'a> = (&'a str, &'a str, fn(&Curves) -> Vec<&Vec<(f64, f64)>>);

fn draw(runs: &[Curves], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = if runs.len() == 1 { runs[0].name.clone() } else { runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(" vs ") };
    let root = root.titled(&title, ("sans-serif", 26))?;
    let panels: [Panel; 3] = [
        ("loss (train: line, eval: dots)", "loss", |c| vec![&c.loss, &c.eval_loss]),
        ("learning rate", "lr", |c| vec![&c.lr]),
        ("throughput", "tokens/s", |c| vec![&c.tokens_per_sec]),
    ];
    let steps = span(runs.iter().flat_map(|r| r.loss.iter().chain(&r.eval_loss).map(|p| p.0)));
    for (area, (caption, y_label, series)) in root.split_evenly((3, 1)).iter().zip(panels) {
        let ys = span(runs.iter().flat_map(|r| series(r).into_iter().flatten().map(|p| p.1)));
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(steps.0..steps.1, ys.0..ys.1)?;
        chart.configure_mesh().x_desc("step").y_desc(y_label).label_style(("sans-serif", 14)).draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let parts = series(run);
            chart.draw_series(LineSeries::new(parts[0].iter().copied(), color.stroke_width(2)))?.label(run.name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            if let Some(eval) = parts.get(1) {
                chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
        }
        if runs.len() > 1 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
        }
    }
    root.present()?;
    Ok(())
}
