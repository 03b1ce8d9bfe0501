//! The comparison of variants: per variant, level and metric, the mean ± sd over folds and seeds
//! with a 95% t interval over folds; per variant against the reference, the paired per-fold
//! difference with its interval and a paired t-test; and each variant's test predictions pooled
//! over folds and seeds, with a bootstrap interval over cases; as tables in `report.md`, as
//! `comparison.parquet`, and as a forest plot of the differences.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array};
use plotters::prelude::*;

use arrow::array::RecordBatch;

use super::{distinct, plot_error};
use crate::error::Result;
use crate::hmil::infer::argmax;
use crate::hmil::metrics::{self, Scored};
use crate::hmil::train::Classes;
use crate::stats::{self, Interval, Paired};
use crate::{par, table};

/// Bootstrap resamples of the pooled predictions, and their seed.
const DRAWS: usize = 1000;
const BOOTSTRAP_SEED: u64 = 0;

/// The levels and metrics compared (the columns of the table).
pub const LEVELS: [&str; 3] = ["fine", "coarse", "coarse_from_fine"];
pub const METRICS: [&str; 3] = ["balanced_accuracy", "auc_macro", "f1_macro"];

/// Test-split values of one variant: (level, metric) → (seed, fold) → value.
pub type Values = BTreeMap<(String, String), BTreeMap<(u64, usize), f64>>;

/// One variant's numbers for one level and metric.
#[derive(Debug, Clone)]
pub struct Row {
    pub variant: String,
    pub level: String,
    pub metric: String,
    /// Mean ± sd over every fold and seed.
    pub mean: f64,
    pub sd: f64,
    /// Folds × seeds.
    pub runs: usize,
    /// The 95% t interval of the mean over folds (each fold's value averaged over seeds).
    pub interval: Interval,
    /// Against the reference: the paired per-fold difference (none for the reference itself).
    pub against: Option<Paired>,
}

/// Each fold's value averaged over the seeds that have it.
fn per_fold(values: &BTreeMap<(u64, usize), f64>) -> BTreeMap<usize, f64> {
    let mut folds: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (&(_, fold), &v) in values {
        folds.entry(fold).or_default().push(v);
    }
    folds.into_iter().map(|(k, v)| (k, stats::mean_sd(&v).0)).collect()
}

/// The rows of every variant (in `variants` order), level and metric, compared with `reference`.
pub fn rows(variants: &[(String, Values)], reference: &str) -> Vec<Row> {
    let base = variants.iter().find(|(name, _)| name == reference).map(|(_, v)| v);
    let mut rows = Vec::new();
    for (name, values) in variants {
        for level in LEVELS {
            for metric in METRICS {
                let key = (level.to_owned(), metric.to_owned());
                let Some(runs) = values.get(&key) else { continue };
                let all: Vec<f64> = runs.values().copied().collect();
                let (mean, sd) = stats::mean_sd(&all);
                let folds = per_fold(runs);
                let interval = stats::t_interval(&folds.values().copied().collect::<Vec<_>>());
                let against = base.filter(|_| name != reference).and_then(|b| b.get(&key)).map(|b| {
                    let b = per_fold(b);
                    let shared: Vec<usize> = folds.keys().filter(|k| b.contains_key(k)).copied().collect();
                    let ours: Vec<f64> = shared.iter().map(|k| folds[k]).collect();
                    let theirs: Vec<f64> = shared.iter().map(|k| b[k]).collect();
                    stats::paired(&ours, &theirs)
                });
                rows.push(Row {
                    variant: name.clone(),
                    level: level.into(),
                    metric: metric.into(),
                    mean,
                    sd,
                    runs: all.len(),
                    interval,
                    against,
                });
            }
        }
    }
    rows
}

fn bound(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{v:.3}") }
}

/// The report's comparison sections: variants × (level, metric), the best of each column in
/// bold; then each variant's paired differences from the reference, with the caveat that
/// folds share slides.
pub fn markdown(rows: &[Row], variants: &[String], reference: &str, seeds: usize) -> String {
    let mut md = String::from("## Comparison of variants\n\n");
    let over = if seeds > 1 { format!("over folds and {seeds} seeds") } else { "over folds".into() };
    let _ = writeln!(
        md,
        "Test split. Each cell: mean ± sd {over}, and the 95% t interval of the mean over folds (a fold's value \
         averaged over seeds). The best mean of each column is in bold."
    );
    let find = |v: &str, l: &str, m: &str| rows.iter().find(|r| r.variant == v && r.level == l && r.metric == m);
    // Every metric compared lies in [0, 1]; an interval reaching past it is shown cut there.
    let clip = |v: f64| bound(v.clamp(0.0, 1.0));
    for level in LEVELS {
        let _ = writeln!(
            md,
            "\n**{level}**\n\n| variant | {} |\n|---|{}",
            METRICS.join(" | "),
            "---|".repeat(METRICS.len())
        );
        for v in variants {
            let cells: Vec<String> = METRICS
                .iter()
                .map(|m| match find(v, level, m) {
                    None => "–".into(),
                    Some(r) => {
                        let best =
                            variants.iter().filter_map(|o| find(o, level, m)).map(|o| o.mean).fold(f64::MIN, f64::max);
                        let text = format!("{:.3} ± {:.3}", r.mean, r.sd);
                        let text = if r.mean == best && variants.len() > 1 { format!("**{text}**") } else { text };
                        format!("{text} [{}, {}]", clip(r.interval.low), clip(r.interval.high))
                    }
                })
                .collect();
            let _ = writeln!(md, "| {v} | {} |", cells.join(" | "));
        }
    }
    let _ = writeln!(
        md,
        "\nA flat model (abmil, meanpool, transmil) predicts the fine classes alone: its coarse prediction is its fine \
         probabilities summed per coarse class, so its `coarse` and `coarse_from_fine` rows agree."
    );
    let paired: Vec<&Row> = rows.iter().filter(|r| r.against.is_some()).collect();
    if paired.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "\n## Against {reference}\n\nEach variant minus {reference}, fold by fold (each fold's value averaged over seeds): \
         the mean difference, its 95% t interval, and the two-sided p-value of a paired t-test over folds. \
         Folds share training slides, and Monte-Carlo folds share test slides too, so fold results are not \
         independent: the intervals are narrower and the p-values smaller than they would be for independent \
         samples. Read them as a guide, not as a significance test.\n\n![Differences](comparison.png)\n"
    );
    let _ =
        writeln!(md, "| variant | level | metric | difference | 95% CI | p | folds |\n|---|---|---|---|---|---|---|");
    for r in paired {
        let p = r.against.expect("filtered");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:+.3} | [{}, {}] | {} | {} |",
            r.variant,
            r.level,
            r.metric,
            p.difference.mean,
            bound(p.difference.low),
            bound(p.difference.high),
            if p.p.is_nan() { "–".into() } else { format!("{:.3}", p.p) },
            p.difference.n
        );
    }
    md
}

/// One level of a variant's test predictions pooled over its folds and seeds.
struct PooledLevel {
    y_true: Vec<usize>,
    probs: Vec<Vec<f64>>,
    n_classes: usize,
}

impl PooledLevel {
    /// The [`METRICS`] (summaries of `metrics::all`) over the rows `idx`.
    fn metrics(&self, idx: &[usize]) -> Vec<f64> {
        let y_true: Vec<usize> = idx.iter().map(|&i| self.y_true[i]).collect();
        let probs: Vec<Vec<f64>> = idx.iter().map(|&i| self.probs[i].clone()).collect();
        let y_pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
        let scored = Scored { y_true: &y_true, y_pred: &y_pred, probs: &probs, n_classes: self.n_classes };
        let all = metrics::all(&scored);
        let value = |name: &str| all.iter().find(|m| m.name == name && m.class.is_none()).map_or(f64::NAN, |m| m.value);
        METRICS.iter().map(|m| value(m)).collect()
    }
}

/// One variant's (level, metric) on its test predictions pooled over folds and seeds: the value
/// and its 95% percentile bootstrap interval, cases resampled (all the rows of a case: its
/// slides, in every fold and seed that tested them).
pub type Pooled = BTreeMap<(String, String, String), Interval>;

/// [`Pooled`] for every variant (with its runs' predictions), level and metric.
pub fn pooled(variants: &[(String, Vec<&RecordBatch>)], classes: &Classes) -> Pooled {
    let mut out = Pooled::new();
    for (variant, predictions) in variants {
        let (cases, levels) = pooled_levels(predictions, classes);
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, case) in cases.iter().enumerate() {
            groups.entry(case).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = groups.into_values().collect();
        let all: Vec<usize> = (0..cases.len()).collect();
        // Each level on its own core: every metric from one pass over the same resamples.
        let per_level = par::map(&levels, |level| {
            let bounds = stats::bootstrap_each(&groups, DRAWS, BOOTSTRAP_SEED, |idx| level.metrics(idx));
            let means = level.metrics(&all);
            means
                .into_iter()
                .zip(bounds)
                .map(|(mean, (low, high))| Interval { mean, low, high, n: cases.len() })
                .collect::<Vec<_>>()
        });
        for (name, intervals) in LEVELS.iter().zip(per_level) {
            for (metric, interval) in METRICS.iter().zip(intervals) {
                out.insert((variant.clone(), (*name).to_owned(), (*metric).to_owned()), interval);
            }
        }
    }
    out
}

/// The section on each variant's [`pooled`] test predictions.
pub fn pooled_markdown(variants: &[String], pooled: &Pooled) -> String {
    let columns = [
        ("fine", "balanced_accuracy"),
        ("fine", "auc_macro"),
        ("coarse", "balanced_accuracy"),
        ("coarse", "auc_macro"),
    ];
    let mut md = format!(
        "\n## Pooled test predictions\n\nEach variant's test predictions of every fold and seed taken together; in brackets \
         the 95% percentile bootstrap interval ({DRAWS} resamples of the cases, each with all its rows; every level and \
         metric in `comparison.parquet`).\n\n| variant | {} |\n|---|{}\n",
        columns.iter().map(|(l, m)| format!("{l} {m}")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(columns.len())
    );
    for variant in variants {
        let cells: Vec<String> = columns
            .iter()
            .map(|&(level, metric)| match pooled.get(&(variant.clone(), level.to_owned(), metric.to_owned())) {
                Some(i) => format!("{:.3} [{}, {}]", i.mean, bound(i.low), bound(i.high)),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(md, "| {variant} | {} |", cells.join(" | "));
    }
    md
}

/// The cases and the [`LEVELS`] (fine, coarse, coarse from fine) of the test rows of
/// `predictions`.
fn pooled_levels(predictions: &[&RecordBatch], classes: &Classes) -> (Vec<String>, [PooledLevel; 3]) {
    let mut cases = Vec::new();
    // (class names, truth column, probability prefix) per level.
    let sources = [
        (&classes.fine, "fine", "fine"),
        (&classes.coarse, "coarse", "coarse"),
        (&classes.coarse, "coarse", "coarse_from_fine"),
    ];
    let mut levels =
        sources.map(|(names, _, _)| PooledLevel { y_true: Vec::new(), probs: Vec::new(), n_classes: names.len() });
    for p in predictions {
        let split = table::strings(p, "split");
        let case = table::strings(p, "case_id");
        let test: Vec<usize> = (0..p.num_rows()).filter(|&i| split[i] == "test").collect();
        for (level, (names, truth, prefix)) in levels.iter_mut().zip(sources) {
            let truth = table::strings(p, &format!("{truth}_true"));
            let probs: Vec<Vec<Option<f64>>> =
                names.iter().map(|c| table::f64s(p, &format!("prob_{prefix}_{c}"))).collect();
            for &i in &test {
                level.y_true.push(names.iter().position(|c| *c == truth[i]).unwrap_or(0));
                level.probs.push(probs.iter().map(|col| col[i].unwrap_or(f64::NAN)).collect());
            }
        }
        cases.extend(test.iter().map(|&i| case[i].clone()));
    }
    (cases, levels)
}

/// `comparison.parquet`: the rows, with the [`pooled`] values, for SQL.
pub fn write(path: &Path, rows: &[Row], pooled: &Pooled) -> Result<()> {
    let f = |v: &dyn Fn(&Row) -> f64| -> ArrayRef {
        Arc::new(rows.iter().map(|r| Some(v(r)).filter(|x| !x.is_nan())).collect::<Float64Array>())
    };
    let against = |v: &dyn Fn(&Paired) -> f64| -> ArrayRef {
        Arc::new(rows.iter().map(|r| r.against.as_ref().map(v).filter(|x| !x.is_nan())).collect::<Float64Array>())
    };
    let pooled_col = |v: &dyn Fn(&Interval) -> f64| -> ArrayRef {
        let of = |r: &Row| pooled.get(&(r.variant.clone(), r.level.clone(), r.metric.clone())).map(v);
        Arc::new(rows.iter().map(|r| of(r).filter(|x| !x.is_nan())).collect::<Float64Array>())
    };
    table::write(
        path,
        (schemas::artifacts::COMPARISON.schema)(),
        vec![
            table::string_col(rows.iter().map(|r| r.variant.as_str())),
            table::string_col(rows.iter().map(|r| r.level.as_str())),
            table::string_col(rows.iter().map(|r| r.metric.as_str())),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.runs as i64))),
            f(&|r| r.mean),
            f(&|r| r.sd),
            f(&|r| r.interval.low),
            f(&|r| r.interval.high),
            against(&|p| p.difference.mean),
            against(&|p| p.difference.low),
            against(&|p| p.difference.high),
            against(&|p| p.p),
            pooled_col(&|i| i.mean),
            pooled_col(&|i| i.low),
            pooled_col(&|i| i.high),
        ],
    )
}

/// The forest plot of the differences from the reference: one line per variant, level and
/// metric, its 95% interval as a bar around the mean difference, and zero marked.
pub fn plot(path: &Path, rows: &[Row], reference: &str) -> Result<()> {
    let err = plot_error(path);
    let variants = distinct(rows.iter().filter(|r| r.against.is_some()).map(|r| r.variant.as_str()));
    let lines: Vec<(String, usize, Interval)> = rows
        .iter()
        .filter_map(|r| {
            let colour = variants.iter().position(|v| *v == r.variant).unwrap_or(0);
            r.against.map(|p| (format!("{} · {} {}", r.variant, r.level, r.metric), colour, p.difference))
        })
        .collect();
    let height = 90 + 26 * lines.len().max(1) as u32;
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let finite = |v: f64| v.is_finite().then_some(v);
    let reach = lines
        .iter()
        .flat_map(|(_, _, i)| [i.mean, i.low, i.high])
        .filter_map(finite)
        .fold(0.01f64, |m, v| m.max(v.abs()))
        * 1.1;
    let n = lines.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("difference from {reference} (mean, 95% CI over folds)"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(330)
        .build_cartesian_2d(-reach..reach, -0.5..(n - 0.5).max(0.5))
        .map_err(|e| err(&e))?;
    let labels: Vec<String> = lines.iter().map(|(l, _, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(TRANSPARENT)
        .y_labels(lines.len().max(1))
        .y_label_formatter(&|y| {
            let i = (n - 1.0 - y).round();
            if (y - y.round()).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("variant − reference")
        .draw()
        .map_err(|e| err(&e))?;
    chart.draw_series(LineSeries::new([(0.0, -0.5), (0.0, n - 0.5)], BLACK.mix(0.5))).map_err(|e| err(&e))?;
    for (i, (_, colour, interval)) in lines.iter().enumerate() {
        let y = n - 1.0 - i as f64;
        let colour = Palette99::pick(*colour).to_rgba();
        if let (Some(low), Some(high)) = (finite(interval.low), finite(interval.high)) {
            chart.draw_series(LineSeries::new([(low, y), (high, y)], colour.stroke_width(2))).map_err(|e| err(&e))?;
        }
        if let Some(mean) = finite(interval.mean) {
            chart.draw_series([Circle::new((mean, y), 5, colour.filled())]).map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(per_run: &[((u64, usize), f64)]) -> Values {
        let mut v = Values::new();
        v.insert(("fine".into(), "auc_macro".into()), per_run.iter().copied().collect());
        v
    }

    #[test]
    fn seeds_are_averaged_within_a_fold_before_folds_are_paired() {
        let hmil =
            values(&[((1, 0), 0.80), ((2, 0), 0.84), ((1, 1), 0.70), ((2, 1), 0.72), ((1, 2), 0.90), ((2, 2), 0.90)]);
        let flat =
            values(&[((1, 0), 0.78), ((2, 0), 0.80), ((1, 1), 0.69), ((2, 1), 0.69), ((1, 2), 0.85), ((2, 2), 0.87)]);
        let rows = rows(&[("hmil".into(), hmil), ("abmil".into(), flat)], "hmil");
        assert_eq!(rows.len(), 2);
        let (h, a) = (&rows[0], &rows[1]);
        assert!(h.against.is_none() && h.runs == 6);
        // Fold means: hmil 0.82, 0.71, 0.90; abmil 0.79, 0.69, 0.86.
        let mean = |a: f64, b: f64| stats::mean_sd(&[a, b]).0;
        let hmil_folds = [mean(0.80, 0.84), mean(0.70, 0.72), mean(0.90, 0.90)];
        let abmil_folds = [mean(0.78, 0.80), mean(0.69, 0.69), mean(0.85, 0.87)];
        assert_eq!(h.interval, stats::t_interval(&hmil_folds));
        let p = a.against.unwrap();
        assert_eq!(p, stats::paired(&abmil_folds, &hmil_folds));
        assert!(p.difference.mean < 0.0 && p.difference.n == 3);
        let md = markdown(&rows, &["hmil".into(), "abmil".into()], "hmil", 2);
        assert!(md.contains("| hmil | – | **0.810 ± "), "{md}");
        assert!(md.contains(", 1.000] |"), "an interval past 1 is cut there: {md}");
        assert!(md.contains("| abmil | fine | auc_macro | -0.030 |") && md.contains("not independent"), "{md}");
    }
}
