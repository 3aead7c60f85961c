//! `selfsup report <run-dir>`: PNG plots of a run's logged metrics and a Markdown summary.
//!
//! Reads what a run directory holds: `metrics.jsonl` (the trainer's per-step lines and the
//! online-kNN lines), `config.toml`, and the JSON results the `eval` commands leave there
//! (`knn.json`, `linear.json`, `finetune.json`). Writes `report/summary.md` and, when a
//! TrueType font is available, `report/loss.png`, `report/schedule.png`,
//! `report/knn.png` (if the run logged online kNN) and `report/throughput.png`.
//!
//! Plots use plotters' bitmap backend with ab_glyph text: pure Rust, but it needs a font file
//! at run time. The first of `--font`, DejaVu Sans / Liberation Sans / Noto Sans in the usual
//! Linux places is used; with none, the summary is still written and says why there are no
//! plots. A line of `metrics.jsonl` that does not parse (a run killed mid-write) is skipped
//! and counted in the summary, never silently.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::fsutil::write_atomic;

/// Fonts tried in order when none is given.
pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

/// The parsed lines of a `metrics.jsonl`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub rows: Vec<Map<String, Value>>,
    /// 1-based numbers of the lines that were not JSON objects with a numeric `step`.
    pub skipped: Vec<usize>,
}

impl Metrics {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut m = Metrics::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(row)) if row.get("step").and_then(Value::as_f64).is_some() => m.rows.push(row),
                _ => m.skipped.push(i + 1),
            }
        }
        Ok(m)
    }

    /// Every key with numeric values whose name satisfies `pick`, sorted.
    pub fn keys(&self, pick: impl Fn(&str) -> bool) -> Vec<String> {
        let keys: BTreeSet<&String> =
            self.rows.iter().flat_map(|r| r.iter()).filter(|(k, v)| v.is_number() && pick(k)).map(|(k, _)| k).collect();
        keys.into_iter().cloned().collect()
    }

    /// (step, value) of every line that has `key`, in file order.
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    }
}

/// What `report` wrote.
#[derive(Debug)]
pub struct Written {
    pub summary: PathBuf,
    pub plots: Vec<PathBuf>,
    /// Why no plots were drawn, if none were.
    pub no_plots: Option<String>,
}

/// Loads the font (once per process) under plotters' "sans-serif" family.
fn register_font(explicit: Option<&Path>) -> Result<std::result::Result<PathBuf, String>> {
    static REGISTERED: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = explicit.filter(|p| !p.is_file()) {
        bail!("--font {}: no such file", p.display())
    }
    if let Some(p) = REGISTERED.get() {
        return Ok(Ok(p.clone()));
    }
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match FONT_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()) {
            Some(p) => p,
            None => {
                return Ok(Err(format!(
                    "no TrueType font found (looked for {}); install fonts-dejavu-core or pass --font FILE",
                    FONT_CANDIDATES.join(", ")
                )))
            }
        },
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {}", path.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", path.display()))?;
    Ok(Ok(REGISTERED.get_or_init(|| path).clone()))
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Series = (String, Vec<(f64, f64)>);
/// A panel: title, y-axis label, its series.
type Panel = (&'static str, &'static str, Vec<Series>);

/// Draws named series against the step into one panel of `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y: &str,
    series: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, v) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(v), y1.max(v));
    }
    if x0 > x1 {
        bail!("{title}: nothing to plot")
    }
    let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-12);
    let (x1, y0, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, y0 - pad, y1 + pad);
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing {title}: {e:?}");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(32)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, s)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(s.iter().copied(), colour.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// One PNG with one panel per entry of `panels` (stacked vertically).
fn plot(path: &Path, panels: &[Panel]) -> Result<()> {
    // Drawn beside the target and renamed over it (the encoder picks PNG by the extension).
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("plot.png");
    let tmp = path.with_file_name(format!(".partial-{name}"));
    {
        let root = BitMapBackend::new(&tmp, (900, 360 * panels.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))?;
        for (area, (title, y, series)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
            draw_panel(area, title, y, series)?;
        }
        root.present().map_err(|e| anyhow::anyhow!("writing {}: {e:?}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn named(m: &Metrics, keys: &[String]) -> Vec<Series> {
    keys.iter().map(|k| (k.clone(), m.series(k))).filter(|(_, s)| !s.is_empty()).collect()
}

/// Writes the report of `run_dir` into `run_dir/report/`.
pub fn report(run_dir: &Path, font: Option<&Path>) -> Result<Written> {
    let metrics_path = run_dir.join("metrics.jsonl");
    if !metrics_path.is_file() {
        bail!("{} has no metrics.jsonl: is it a run directory (the output_dir of a run)?", run_dir.display())
    }
    let m = Metrics::read(&metrics_path)?;
    let out = run_dir.join("report");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let losses = named(&m, &m.keys(|k| k == "loss" || k.starts_with("loss_")));
    let lr = named(&m, &["lr".to_string()]);
    let momentum = named(&m, &["momentum".to_string()]);
    let knn = named(&m, &m.keys(|k| k.starts_with("knn_top1")));
    let speed = named(&m, &["images_per_sec".to_string()]);
    let mut wanted: Vec<(&str, Vec<Panel>)> = Vec::new();
    if !losses.is_empty() {
        wanted.push(("loss.png", vec![("Training loss", "loss", losses)]));
    }
    let mut schedule = Vec::new();
    if !lr.is_empty() {
        schedule.push(("Learning rate", "lr", lr));
    }
    if !momentum.is_empty() {
        schedule.push(("EMA momentum", "momentum", momentum));
    }
    if !schedule.is_empty() {
        wanted.push(("schedule.png", schedule));
    }
    if !knn.is_empty() {
        wanted.push(("knn.png", vec![("Online kNN top-1 (held-out queries)", "accuracy %", knn)]));
    }
    if !speed.is_empty() {
        wanted.push(("throughput.png", vec![("Training throughput", "images/s", speed)]));
    }
    let (mut plots, mut no_plots) = (Vec::new(), None);
    match register_font(font)? {
        Ok(_) => {
            for (name, panels) in &wanted {
                let path = out.join(name);
                plot(&path, panels)?;
                plots.push(path);
            }
        }
        Err(why) => no_plots = Some(why),
    }
    let summary = out.join("summary.md");
    write_atomic(&summary, summarize(run_dir, &m, &plots, no_plots.as_deref()).as_bytes())?;
    Ok(Written { summary, plots, no_plots })
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

/// The Markdown summary.
fn summarize(run_dir: &Path, m: &Metrics, plots: &[PathBuf], no_plots: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Run report: {}\n", run_dir.display());
    if let Ok(cfg) = crate::RunConfig::from_file(&run_dir.join("config.toml")) {
        let _ = writeln!(
            s,
            "- objective `{}`, model `{}`{}, {} images per batch, seed {}",
            cfg.objective.id(),
            format!("{:?}", cfg.model.arch).to_lowercase(),
            cfg.model.widths.as_ref().map(|w| format!(" with widths {w:?}")).unwrap_or_default(),
            cfg.batch_size,
            cfg.seed
        );
    }
    let loss = m.series("loss");
    if let (Some(first), Some(last)) = (loss.first(), loss.last()) {
        let tail = &loss[loss.len() - loss.len().div_ceil(10)..];
        let tail_mean = tail.iter().map(|p| p.1).sum::<f64>() / tail.len() as f64;
        let _ = writeln!(
            s,
            "- {} logged steps up to step {}; loss {:.4} at step {} -> {:.4} at step {} (mean of the last tenth {:.4})",
            loss.len(),
            last.0,
            first.1,
            first.0,
            last.1,
            last.0,
            tail_mean
        );
    }
    let speed = m.series("images_per_sec");
    if !speed.is_empty() {
        let mean = speed.iter().map(|p| p.1).sum::<f64>() / speed.len() as f64;
        let _ = writeln!(s, "- throughput {mean:.0} images/s on average over the logged windows");
    }
    for key in m.keys(|k| k.starts_with("knn_top1")) {
        let ser = m.series(&key);
        if let (Some(a), Some(b)) = (ser.first(), ser.last()) {
            let _ = writeln!(s, "- online `{key}`: {:.2} % at step {} -> {:.2} % at step {}", a.1, a.0, b.1, b.0);
        }
    }
    if !m.skipped.is_empty() {
        let _ = writeln!(
            s,
            "- **{} line(s) of metrics.jsonl could not be read and were skipped** (lines {:?})",
            m.skipped.len(),
            m.skipped
        );
    }

    let mut evals = String::new();
    if let Some(v) = read_json(&run_dir.join("knn.json")) {
        let _ = writeln!(
            evals,
            "\n### kNN ({} bank images, {} queries, {} px{})\n",
            v["bank"],
            v["queries"],
            v["size"],
            pooling_note(&v)
        );
        let results = v["results"].as_array().cloned().unwrap_or_default();
        let settings: Vec<String> = results
            .first()
            .and_then(|r| r["accuracy"].as_array())
            .into_iter()
            .flatten()
            .map(|a| format!("k={} T={}", a["setting"]["k"], a["setting"]["temperature"]))
            .collect();
        let _ = writeln!(
            evals,
            "| features | {} |",
            settings.iter().map(|h| format!("{h} top-1 %")).collect::<Vec<_>>().join(" | ")
        );
        let _ = writeln!(evals, "|---|{}", "---|".repeat(settings.len()));
        for r in &results {
            let cells: Vec<String> = r["accuracy"].as_array().into_iter().flatten().map(|a| num(&a["top1"])).collect();
            let _ = writeln!(evals, "| {} | {} |", r["features"].as_str().unwrap_or("?"), cells.join(" | "));
        }
    }
    // (file, what names a row, heading)
    let tables = [("linear.json", "features", "Linear probe"), ("finetune.json", "init", "Fine-tuning")];
    for (file, row_key, heading) in tables {
        let Some(v) = read_json(&run_dir.join(file)) else { continue };
        // finetune.json keeps its recipe under `config`, linear.json under `probe`.
        let epochs = v["config"]["epochs"]
            .as_u64()
            .or(v["probe"]["epochs"].as_u64())
            .map(|e| format!(", {e} epochs"))
            .unwrap_or_default();
        let preset = v["preset"].as_str().unwrap_or("?");
        let (train, test) = (&v["train"], &v["test"]);
        let pooling = pooling_note(&v);
        let _ = writeln!(evals, "\n### {heading} ({preset}{epochs}, {train} training / {test} test images{pooling})\n");
        let _ = writeln!(evals, "| {row_key} | top-1 % | top-5 % |\n|---|---|---|");
        for r in v["results"].as_array().into_iter().flatten() {
            let (t1, t5) = (num(&r["result"]["top1"]), num(&r["result"]["top5"]));
            let _ = writeln!(evals, "| {} | {t1} | {t5} |", r[row_key].as_str().unwrap_or("?"));
        }
    }
    if !evals.is_empty() {
        let _ = write!(s, "\n## Evaluations\n{evals}");
    }
    let _ = writeln!(s, "\n## Plots\n");
    match no_plots {
        Some(why) => {
            let _ = writeln!(s, "No plots were drawn: {why}.");
        }
        None => {
            for p in plots {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                let _ = writeln!(s, "![{}]({name})\n", name.trim_end_matches(".png"));
            }
        }
    }
    s
}

/// ", 2x2 grid of the final map" when an evaluation pooled the features other than globally
/// (older result files carry no `pooling` and were globally pooled).
fn pooling_note(v: &serde_json::Value) -> String {
    v["pooling"].as_str().filter(|p| *p != "global pool").map(|p| format!(", {p}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_run(dir: &Path) {
        let mut lines = String::new();
        for step in (10..=200).step_by(10) {
            let loss = 2.0 - step as f64 / 200.0;
            lines += &format!(
                "{{\"step\":{step},\"loss\":{loss},\"loss_12\":{},\"loss_21\":{},\"lr\":{},\"momentum\":0.99,\"images_per_sec\":300}}\n",
                loss / 2.0,
                loss / 2.0,
                1e-3 * step as f64 / 200.0
            );
            if step % 100 == 0 {
                lines += &format!("{{\"step\":{step},\"knn_top1_k20\":{},\"knn_top1_k200\":60.0}}\n", 50 + step / 10);
            }
        }
        lines += "{\"step\":210,\"loss\":0.9"; // a run killed mid-write
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
        std::fs::write(
            dir.join("linear.json"),
            r#"{"preset":"mae","probe":{"epochs":90},"train":100,"test":50,"pooling":"2x2 grid of the final map","results":[{"features":"pretrained","result":{"top1":81.5,"top5":99.0}}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn metrics_series_keys_and_skipped_lines() {
        let dir = tempfile::tempdir().unwrap();
        write_run(dir.path());
        let m = Metrics::read(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(m.rows.len(), 22);
        assert_eq!(m.skipped, vec![23]);
        assert_eq!(m.keys(|k| k.starts_with("knn_top1")), ["knn_top1_k20", "knn_top1_k200"]);
        assert_eq!(m.series("knn_top1_k20"), [(100.0, 60.0), (200.0, 70.0)]);
        assert_eq!(m.series("loss").len(), 20);
    }

    #[test]
    fn writes_plots_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        write_run(dir.path());
        let font = FONT_CANDIDATES.iter().map(Path::new).find(|p| p.is_file());
        let w = report(dir.path(), font).unwrap();
        let text = std::fs::read_to_string(&w.summary).unwrap();
        assert!(text.contains("20 logged steps up to step 200"), "{text}");
        assert!(text.contains("online `knn_top1_k20`: 60.00 % at step 100 -> 70.00 % at step 200"), "{text}");
        assert!(
            text.contains("1 line(s) of metrics.jsonl could not be read and were skipped** (lines [23])"),
            "{text}"
        );
        assert!(text.contains("| pretrained | 81.50 | 99.00 |"), "{text}");
        assert!(
            text.contains(
                "### Linear probe (mae, 90 epochs, 100 training / 50 test images, 2x2 grid of the final map)"
            ),
            "{text}"
        );
        // CI installs fonts-dejavu-core (.ci/run), so the plots are drawn there.
        assert!(font.is_some(), "no font: apt-get install -y fonts-dejavu-core");
        let names: Vec<_> = w.plots.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["loss.png", "schedule.png", "knn.png", "throughput.png"]);
        for p in &w.plots {
            let bytes = std::fs::read(p).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", p.display());
            assert!(text.contains(&format!("]({})", p.file_name().unwrap().to_str().unwrap())));
        }
        let missing = report(dir.path(), Some(Path::new("/nonexistent/font.ttf"))).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/font.ttf"), "{missing}");
        let e = report(&dir.path().join("nope"), None).unwrap_err().to_string();
        assert!(e.contains("has no metrics.jsonl"), "{e}");
    }
}
