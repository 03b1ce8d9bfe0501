//! `report`: `report.md` (with several variants, their comparison first (see [`compare`]); then,
//! for the reference variant, mean ± sd over folds of every metric and level, per-class tables,
//! confusion matrices), PNG plots (ROC per fine class, confusion heatmap, training curves), and
//! every run's metrics and predictions in one table each, with its variant and seed;
//! [`headline`] reads the numbers a run ends with back from those.

pub mod compare;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type};
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use schemas::artifacts::{
    ALL_METRICS, ALL_PREDICTIONS, COMPARISON, COMPARISON_PLOT, CONFUSION, CURVES, EXTERNAL_METRICS, HEATMAPS, HISTORY,
    METRICS, PREDICTIONS, REPORT, ROC,
};

use crate::error::{Error, Result};
use crate::hmil::metrics::binary_auc;
use crate::hmil::train::Classes;
use crate::{stats, table};

/// The `report` stage.
pub struct Report {
    pub workflow: String,
    pub workflow_digest: String,
    pub device: String,
    pub classes: Classes,
    pub folds: Vec<FoldNodes>,
    /// The variant the others are compared with, and whose details the report shows.
    pub compare_to: String,
    /// The external cohorts' predictions, per cohort, variant and seed.
    pub externals: Vec<ExternalNodes>,
}

/// One `external` node: a cohort predicted by one variant's and seed's fold models.
#[derive(Debug, Clone)]
pub struct ExternalNodes {
    pub cohort: String,
    pub variant: String,
    pub seed: u64,
    pub node: NodeRef,
}

/// The nodes of one run (variant, seed, fold) the report reads, and the folder of the results
/// folder that shows them (the report links the run's heatmaps there).
#[derive(Debug, Clone)]
pub struct FoldNodes {
    pub variant: String,
    pub seed: u64,
    pub fold: usize,
    pub train: NodeRef,
    pub evaluate: NodeRef,
    /// None for a model without heatmaps (a flat one).
    pub heatmaps: Option<NodeRef>,
    pub results: String,
}

impl Stage for Report {
    fn kind(&self) -> &str {
        "report"
    }
    /// Small: runs in the driver.
    fn resources(&self) -> Resources {
        Resources { gpu: false, in_driver: true }
    }
    /// 2: the confusion plot drawn rows-true from the top with centred labels; support as totals.
    /// 3: all folds' metrics and predictions as tables.
    /// 4: links to the heatmaps of each class's best and worst predicted test slides.
    /// 5: `history.parquet` in long form; variants and seeds: their comparison, and `variant`
    /// and `seed` columns in the combined tables.
    /// 6: pooled values with bootstrap intervals in `comparison.parquet`, at every level.
    fn code_version(&self) -> &str {
        "6"
    }
    fn params(&self) -> serde_json::Value {
        let runs: Vec<serde_json::Value> = self
            .folds
            .iter()
            .map(|f| serde_json::json!({ "variant": f.variant, "seed": f.seed, "fold": f.fold, "results": f.results }))
            .collect();
        serde_json::json!({
            "workflow": self.workflow, "workflow_digest": self.workflow_digest, "device": self.device,
            "classes": self.classes, "runs": runs, "compare_to": self.compare_to,
            "externals": self.externals.iter().map(|e| [&e.cohort, &e.variant]).collect::<Vec<_>>(),
        })
    }
    fn inputs(&self) -> Vec<Input> {
        self.folds
            .iter()
            .enumerate()
            .flat_map(|(k, f)| {
                [
                    Some(Input::artifact(&format!("history{k}"), &f.train, &HISTORY)),
                    Some(Input::artifact(&format!("metrics{k}"), &f.evaluate, &METRICS)),
                    Some(Input::artifact(&format!("predictions{k}"), &f.evaluate, &PREDICTIONS)),
                    f.heatmaps.as_ref().map(|node| Input::artifact(&format!("heatmaps{k}"), node, &HEATMAPS)),
                ]
            })
            .flatten()
            .chain(
                self.externals
                    .iter()
                    .enumerate()
                    .map(|(j, e)| Input::artifact(&format!("external{j}"), &e.node, &EXTERNAL_METRICS)),
            )
            .collect()
    }
    fn outputs(&self) -> Vec<Output> {
        let (fine, coarse) = self.classes.names();
        let mut v: Vec<Output> = [REPORT, ROC, CONFUSION, CURVES].iter().map(Output::from).collect();
        v.extend([
            (&ALL_METRICS).into(),
            Output::table(&ALL_PREDICTIONS, (ALL_PREDICTIONS.schema)(&fine, &coarse)),
            (&COMPARISON).into(),
        ]);
        if self.variants().len() > 1 {
            v.push((&COMPARISON_PLOT).into());
        }
        v
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.write(ctx)?)
    }
}

/// Metric values on the test split: (level, metric, class) → one value per fold.
type Collected = BTreeMap<(String, String, Option<String>), Vec<f64>>;

/// What the report reads of one run.
struct RunTables<'a> {
    nodes: &'a FoldNodes,
    metrics: RecordBatch,
    predictions: RecordBatch,
    history: RecordBatch,
    drawn: Option<RecordBatch>,
}

impl Report {
    /// The variants, in the workflow's order.
    fn variants(&self) -> Vec<String> {
        distinct(self.folds.iter().map(|f| f.variant.clone()))
    }

    fn write(&self, ctx: &Context) -> Result<()> {
        register_font();
        let mut runs = Vec::new();
        for (k, nodes) in self.folds.iter().enumerate() {
            let read = |name: &str| table::read(ctx.input(&format!("{name}{k}")));
            runs.push(RunTables {
                nodes,
                metrics: read("metrics")?,
                predictions: read("predictions")?,
                history: read("history")?,
                drawn: nodes.heatmaps.as_ref().map(|_| read("heatmaps")).transpose()?,
            });
        }
        let metrics = runs
            .iter()
            .map(|r| table::tag_run(&r.metrics, None, &r.nodes.variant, r.nodes.seed))
            .collect::<Result<Vec<_>>>()?;
        table::write_all(&ctx.output(ALL_METRICS.file), &metrics)?;
        let predictions = runs
            .iter()
            .map(|r| table::tag_run(&r.predictions, None, &r.nodes.variant, r.nodes.seed))
            .collect::<Result<Vec<_>>>()?;
        table::write_all(&ctx.output(ALL_PREDICTIONS.file), &predictions)?;
        let variants = self.variants();
        let seeds = distinct(self.folds.iter().map(|f| f.seed)).len();
        let values: Vec<(String, compare::Values)> = variants
            .iter()
            .map(|v| (v.clone(), compared_values(runs.iter().filter(|r| &r.nodes.variant == v))))
            .collect();
        let rows = compare::rows(&values, &self.compare_to);
        let predictions_of: Vec<(String, Vec<&RecordBatch>)> = variants
            .iter()
            .map(|v| (v.clone(), runs.iter().filter(|r| &r.nodes.variant == v).map(|r| &r.predictions).collect()))
            .collect();
        let pooled = compare::pooled(&predictions_of, &self.classes);
        compare::write(&ctx.output(COMPARISON.file), &rows, &pooled)?;
        let reference: Vec<&RunTables> = runs.iter().filter(|r| r.nodes.variant == self.compare_to).collect();
        let mut test: Collected = BTreeMap::new();
        for r in &reference {
            collect_test(&r.metrics, &mut test);
        }
        let k = reference.len();
        let mut md = String::new();
        let _ = writeln!(md, "# {} — cross-validated HMIL results\n", self.workflow);
        let runs_line = if seeds > 1 { format!("{} folds × {seeds} seeds", k / seeds) } else { format!("{k}") };
        let _ = writeln!(
            md,
            "- run: `{}`\n- workflow digest: `{}`\n- device: {}\n- versions: hmil-flow {}, tch 0.24.0 (libtorch 2.11.0)\n- folds: {runs_line}; metrics on each fold's test split, mean ± sd over folds\n",
            ctx.run_id(),
            &self.workflow_digest[..16.min(self.workflow_digest.len())],
            self.device,
            env!("CARGO_PKG_VERSION"),
        );
        if variants.len() > 1 {
            md.push_str(&compare::markdown(&rows, &variants, &self.compare_to, seeds));
            compare::plot(&ctx.output(COMPARISON_PLOT.file), &rows, &self.compare_to)?;
        }
        md.push_str(&compare::pooled_markdown(&variants, &pooled));
        if !self.externals.is_empty() {
            let tables = (0..self.externals.len())
                .map(|j| table::read(ctx.input(&format!("external{j}"))))
                .collect::<Result<Vec<_>>>()?;
            md.push_str(&self.external_section(&tables, seeds > 1));
        }
        if variants.len() > 1 {
            let _ = writeln!(md, "\n# Reference variant: {}\n", self.compare_to);
        }
        let summary = ["accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "auc_macro", "kappa_quadratic"];
        let _ =
            writeln!(md, "## Summary\n\n| level | {} |\n|---|{}", summary.join(" | "), "---|".repeat(summary.len()));
        for level in ["coarse", "fine", "coarse_from_fine"] {
            let cells: Vec<String> = summary.iter().map(|m| cell(&test, level, m, None)).collect();
            let _ = writeln!(md, "| {level} | {} |", cells.join(" | "));
        }
        for (level, names) in [("fine", &self.classes.fine), ("coarse", &self.classes.coarse)] {
            let _ = writeln!(
                md,
                "\n## Per class ({level})\n\nMean ± sd over folds; support is the number of test slides of the class, summed over folds.\n\n| class | precision | recall | F1 | AUC | support |\n|---|---|---|---|---|---|"
            );
            for c in names.iter() {
                let cells: Vec<String> = ["precision", "recall", "f1", "auc", "support"]
                    .iter()
                    .map(|m| cell(&test, level, m, Some(c)))
                    .collect();
                let _ = writeln!(md, "| {c} | {} |", cells.join(" | "));
            }
            let _ = writeln!(md, "\n## Confusion ({level}, test, summed over folds; rows true, columns predicted)\n");
            let _ = writeln!(md, "| | {} |\n|---|{}", names.join(" | "), "---|".repeat(names.len()));
            for t in names.iter() {
                let row: Vec<String> = names.iter().map(|p| format!("{:.0}", confusion(&test, level, t, p))).collect();
                let _ = writeln!(md, "| **{t}** | {} |", row.join(" | "));
            }
        }
        let _ = writeln!(
            md,
            "\n## Plots\n\n![ROC](roc.png)\n\n![Confusion](confusion.png)\n\n![Training curves](curves.png)"
        );
        let drawn: Vec<(&FoldNodes, &RecordBatch, &RecordBatch)> =
            reference.iter().filter_map(|r| r.drawn.as_ref().map(|d| (r.nodes, &r.predictions, d))).collect();
        if !drawn.is_empty() {
            md.push_str(&heatmap_links(&self.classes, &drawn, seeds > 1));
        }
        std::fs::write(ctx.output(REPORT.file), md).map_err(|e| Error::io(&ctx.output(REPORT.file), e))?;
        let preds: Vec<&RecordBatch> = reference.iter().map(|r| &r.predictions).collect();
        self.plot_roc(&ctx.output(ROC.file), &preds)?;
        self.plot_confusion(&ctx.output(CONFUSION.file), &test)?;
        // With one variant, a line per fold; with several, a colour per variant.
        let curves: Vec<(String, &RecordBatch)> = if variants.len() > 1 {
            runs.iter().map(|r| (r.nodes.variant.clone(), &r.history)).collect()
        } else {
            reference.iter().map(|r| (format!("fold {}", r.nodes.fold), &r.history)).collect()
        };
        plot_curves(&ctx.output(CURVES.file), &curves)
    }

    /// Per cohort, each variant's (and seed's) ensemble and fold models on the cohort.
    fn external_section(&self, tables: &[RecordBatch], show_seed: bool) -> String {
        let mut md = String::from(
            "## External cohorts\n\nEvery fold model predicts every labelled slide of the cohort; the ensemble is \
             the mean of their probabilities. Each cell: the ensemble's value, then the fold models' mean ± sd.\n",
        );
        let columns = [
            ("fine", "balanced_accuracy"),
            ("fine", "auc_macro"),
            ("coarse", "balanced_accuracy"),
            ("coarse", "auc_macro"),
        ];
        for cohort in distinct(self.externals.iter().map(|e| e.cohort.as_str())) {
            let header: Vec<String> = columns.iter().map(|(l, m)| format!("{l} {m}")).collect();
            let _ = writeln!(
                md,
                "\n**{cohort}**\n\n| variant | {} |\n|---|{}",
                header.join(" | "),
                "---|".repeat(columns.len())
            );
            for (e, t) in self.externals.iter().zip(tables).filter(|(e, _)| e.cohort == cohort) {
                let mut ensemble = Collected::new();
                let mut folds = Collected::new();
                collect_split(t, "ensemble", &mut ensemble);
                collect_split(t, "external", &mut folds);
                let cells: Vec<String> = columns
                    .iter()
                    .map(|(l, m)| {
                        let key = (l.to_string(), m.to_string(), None);
                        let one =
                            ensemble.get(&key).and_then(|v| v.first()).map_or("–".into(), |v| format!("{v:.3}"));
                        format!("{one} ({})", cell(&folds, l, m, None))
                    })
                    .collect();
                let name = if show_seed { format!("{}, seed {}", e.variant, e.seed) } else { e.variant.clone() };
                let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
            }
        }
        md.push('\n');
        md
    }

    fn plot_roc(&self, path: &Path, preds: &[&RecordBatch]) -> Result<()> {
        let root = BitMapBackend::new(path, (720, 640)).into_drawing_area();
        let err = plot_error(path);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("ROC, fine classes (test, pooled over folds)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("false positive rate")
            .y_desc("true positive rate")
            .draw()
            .map_err(|e| err(&e))?;
        for (c, name) in self.classes.fine.iter().enumerate() {
            let (mut truth, mut scores) = (Vec::new(), Vec::new());
            for p in preds {
                let split = table::strings(p, "split");
                let fine_true = table::strings(p, "fine_true");
                for (i, s) in table::f64s(p, &format!("prob_fine_{name}")).into_iter().enumerate() {
                    if split[i] == "test" {
                        truth.push(fine_true[i] == *name);
                        scores.push(s.unwrap_or(0.0));
                    }
                }
            }
            let auc = binary_auc(&truth, &scores);
            let color = Palette99::pick(c).to_rgba();
            chart
                .draw_series(LineSeries::new(roc_points(&truth, &scores), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{name} (AUC {auc:.3})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3))).map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))
    }

    fn plot_confusion(&self, path: &Path, test: &Collected) -> Result<()> {
        let counts: Vec<Vec<f64>> = self
            .classes
            .fine
            .iter()
            .map(|t| self.classes.fine.iter().map(|p| confusion(test, "fine", t, p)).collect())
            .collect();
        plot_confusion(path, "Confusion, fine (test, summed over folds)", &self.classes.fine, &counts)
    }
}

/// Where each part of a confusion plot goes, in pixels: the true class of row `t` is the `t`-th
/// band from the top, the predicted class of column `p` the `p`-th from the left, and every
/// label and count is centred on its row, column or cell.
#[derive(Debug, Clone, Copy)]
struct ConfusionLayout {
    left: i32,
    top: i32,
    cell: i32,
}

impl ConfusionLayout {
    /// Room for the caption above, row labels to the left and column labels below.
    fn new(size: (u32, u32), n: usize) -> ConfusionLayout {
        let (left, top, right, bottom) = (130, 56, 24, 76);
        let cell = ((size.0 as i32 - left - right).min(size.1 as i32 - top - bottom) / n.max(1) as i32).max(1);
        ConfusionLayout { left, top, cell }
    }

    /// The cell of true class `t` and predicted class `p`: top-left and bottom-right corners.
    fn cell(&self, t: usize, p: usize) -> ((i32, i32), (i32, i32)) {
        let (x, y) = (self.left + p as i32 * self.cell, self.top + t as i32 * self.cell);
        ((x, y), (x + self.cell, y + self.cell))
    }

    fn centre(&self, t: usize, p: usize) -> (i32, i32) {
        let ((x0, y0), (x1, y1)) = self.cell(t, p);
        ((x0 + x1) / 2, (y0 + y1) / 2)
    }

    /// Anchor (right edge, vertical centre) of the label of row `t`.
    fn row_label(&self, t: usize) -> (i32, i32) {
        (self.left - 8, self.centre(t, 0).1)
    }

    /// Anchor (horizontal centre, top edge) of the label of column `p`, below `n` rows.
    fn column_label(&self, p: usize, n: usize) -> (i32, i32) {
        (self.centre(0, p).0, self.top + n as i32 * self.cell + 8)
    }
}

/// The fill of a cell holding `share` of its row.
fn shade(share: f64) -> RGBColor {
    let share = share.clamp(0.0, 1.0);
    RGBColor(255 - (share * 200.0) as u8, 255 - (share * 160.0) as u8, 255)
}

/// Draws `counts` (rows true, columns predicted, in the order of `names`) as a heatmap whose
/// cells are shaded by their share of the row, with the count centred in each cell.
fn plot_confusion(path: &Path, caption: &str, names: &[String], counts: &[Vec<f64>]) -> Result<()> {
    let size = (640, 640);
    let n = names.len();
    let layout = ConfusionLayout::new(size, n);
    let err = plot_error(path);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let centred = Pos::new(HPos::Center, VPos::Center);
    let font = |px: u32| ("sans-serif", px).into_font();
    let text = |s: &str, at: (i32, i32), px: u32, pos: Pos, color: &RGBColor| {
        root.draw(&Text::new(s.to_owned(), at, font(px).color(color).pos(pos))).map_err(|e| err(&e))
    };
    text(caption, (size.0 as i32 / 2, 24), 20, centred, &BLACK)?;
    for (t, row) in counts.iter().enumerate() {
        let total = row.iter().sum::<f64>().max(1.0);
        for (p, &v) in row.iter().enumerate() {
            let share = v / total;
            root.draw(&Rectangle::new(<[_; 2]>::from(layout.cell(t, p)), shade(share).filled()))
                .map_err(|e| err(&e))?;
            root.draw(&Rectangle::new(<[_; 2]>::from(layout.cell(t, p)), WHITE.stroke_width(1)))
                .map_err(|e| err(&e))?;
            let ink = if share > 0.55 { WHITE } else { BLACK };
            text(&format!("{v:.0}"), layout.centre(t, p), 16, centred, &ink)?;
        }
    }
    for (i, name) in names.iter().enumerate() {
        text(name, layout.row_label(i), 15, Pos::new(HPos::Right, VPos::Center), &BLACK)?;
        text(name, layout.column_label(i, n), 15, Pos::new(HPos::Center, VPos::Top), &BLACK)?;
    }
    let side = n as i32 * layout.cell;
    let below = Pos::new(HPos::Center, VPos::Top);
    text("predicted", (layout.left + side / 2, layout.top + side + 40), 16, below, &BLACK)?;
    text("true", (20, layout.top + side / 2), 16, centred, &BLACK)?;
    root.present().map_err(|e| err(&e))
}

/// Adds the test-split values of a `metrics` table to `test`.
fn collect_test(m: &RecordBatch, test: &mut Collected) {
    collect_split(m, "test", test);
}

/// The values of `m`'s rows of split `name`.
fn collect_split(m: &RecordBatch, name: &str, test: &mut Collected) {
    let (split, level, metric) = (table::strings(m, "split"), table::strings(m, "level"), table::strings(m, "metric"));
    let class = m.column_by_name("class").expect("class column").as_string::<i32>().clone();
    for (i, v) in table::f64s(m, "value").into_iter().enumerate() {
        if split[i] == name
            && let Some(v) = v
        {
            let c = (!class.is_null(i)).then(|| class.value(i).to_owned());
            test.entry((level[i].clone(), metric[i].clone(), c)).or_default().push(v);
        }
    }
}

/// The numbers a run ends with: macro AUC and balanced accuracy on the test splits, fine and
/// coarse, as mean ± sd over folds (and seeds), per variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Headline {
    pub folds: usize,
    pub seeds: usize,
    /// Each variant's levels, in the order of the table.
    pub variants: Vec<(String, Vec<HeadlineLevel>)>,
}

/// One level's headline numbers, as (mean, sd) over runs; `None` where no run has the value.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadlineLevel {
    pub level: &'static str,
    pub auc_macro: Option<(f64, f64)>,
    pub balanced_accuracy: Option<(f64, f64)>,
}

/// The headline of the report's [`ALL_METRICS`] table.
pub fn headline(metrics: &Path) -> Result<Headline> {
    let m = table::read(metrics)?;
    let folds = distinct(table::i32s(&m, "fold")).len();
    let seeds =
        distinct(m.column_by_name("seed").map_or(vec![0], |c| c.as_primitive::<Int64Type>().values().to_vec())).len();
    let names = table::strings(&m, "variant");
    let variants = distinct(names.iter().cloned())
        .into_iter()
        .map(|variant| {
            let mask: arrow::array::BooleanArray = names.iter().map(|n| Some(*n == variant)).collect();
            let rows = arrow::compute::filter_record_batch(&m, &mask)
                .map_err(|e| Error::Table { path: metrics.into(), message: e.to_string() })?;
            let mut test = Collected::new();
            collect_test(&rows, &mut test);
            let value = |level: &str, metric: &str| {
                test.get(&(level.to_owned(), metric.to_owned(), None)).map(|v| stats::mean_sd(v))
            };
            let levels = ["fine", "coarse"]
                .map(|level| HeadlineLevel {
                    level,
                    auc_macro: value(level, "auc_macro"),
                    balanced_accuracy: value(level, "balanced_accuracy"),
                })
                .to_vec();
            Ok((variant, levels))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Headline { folds, seeds, variants })
}

impl std::fmt::Display for Headline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<(f64, f64)>| v.map_or_else(|| "–".to_owned(), |(m, s)| format!("{m:.3} ± {s:.3}"));
        let mut over = if self.folds == 1 { "1 fold".to_owned() } else { format!("{} folds", self.folds) };
        if self.seeds > 1 {
            over += &format!(" × {} seeds", self.seeds);
        }
        writeln!(f, "test split, mean ± sd over {over}:")?;
        let several = self.variants.len() > 1;
        let width = self.variants.iter().map(|(v, _)| v.len()).max().unwrap_or(0).max(7);
        if several {
            write!(f, "  {:<width$}", "variant")?;
        }
        writeln!(f, "  {:<8} {:<15}  balanced accuracy", "level", "macro AUC")?;
        for (variant, levels) in &self.variants {
            for l in levels {
                if several {
                    write!(f, "  {variant:<width$}")?;
                }
                writeln!(f, "  {:<8} {:<15}  {}", l.level, show(l.auc_macro), show(l.balanced_accuracy))?;
            }
        }
        Ok(())
    }
}

fn cell(test: &Collected, level: &str, metric: &str, class: Option<&String>) -> String {
    match test.get(&(level.to_owned(), metric.to_owned(), class.cloned())) {
        Some(v) if metric == "support" => format!("{:.0}", v.iter().sum::<f64>()),
        Some(v) => {
            let (m, s) = stats::mean_sd(v);
            format!("{m:.3} ± {s:.3}")
        }
        None => "–".into(),
    }
}

fn confusion(test: &Collected, level: &str, t: &str, p: &str) -> f64 {
    test.get(&(level.to_owned(), format!("confusion[{p}]"), Some(t.to_owned()))).map_or(0.0, |v| v.iter().sum())
}

/// ROC curve points (FPR, TPR), thresholds at every distinct score.
fn roc_points(truth: &[bool], scores: &[f64]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let pos = truth.iter().filter(|&&t| t).count().max(1) as f64;
    let neg = truth.iter().filter(|&&t| !t).count().max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut out = vec![(0.0, 0.0)];
    for (j, &i) in order.iter().enumerate() {
        if truth[i] {
            tp += 1.0
        } else {
            fp += 1.0
        }
        if j + 1 == order.len() || scores[order[j + 1]] != scores[i] {
            out.push((fp / neg, tp / pos));
        }
    }
    out
}

/// The section linking, per class and fold, the heatmaps of the test slide of that class
/// predicted best (the highest probability of its true class) and worst.
fn heatmap_links(classes: &Classes, runs: &[(&FoldNodes, &RecordBatch, &RecordBatch)], show_seed: bool) -> String {
    let mut md = String::from("\n## Heatmaps of the best and worst predicted test slides\n\n");
    if runs.iter().all(|r| r.2.num_rows() == 0) {
        md.push_str("No heatmaps were drawn: the feature files hold no patch coordinates.\n");
        return md;
    }
    md.push_str(
        "Per class and fold, the test slide of the class given the highest probability of its true \
         class, and the one given the lowest, each linked to its heatmap (and its top tiles, where the \
         slide could be read).\n",
    );
    // Per fold: each drawn slide's pictures (relative to the fold's folder).
    let pictures: Vec<BTreeMap<String, (String, String)>> = runs
        .iter()
        .map(|(_, _, d)| {
            let pictures = table::strings(d, "heatmap").into_iter().zip(table::strings(d, "top_tiles"));
            table::strings(d, "slide_id").into_iter().zip(pictures).collect()
        })
        .collect();
    let cell = |k: usize, pick: Option<&(f64, String)>| match pick {
        None => "–".to_owned(),
        Some((prob, slide)) => match pictures[k].get(slide) {
            None => format!("{slide} {prob:.2} (no heatmap)"),
            Some((heatmap, tiles)) => {
                let dir = &runs[k].0.results;
                let tiles = if tiles.is_empty() { String::new() } else { format!(" ([top tiles]({dir}/{tiles}))") };
                format!("[{slide}]({dir}/{heatmap}) {prob:.2}{tiles}")
            }
        },
    };
    for (level, names) in [("fine", &classes.fine), ("coarse", &classes.coarse)] {
        let _ = writeln!(md, "\n| {level} class | fold | best predicted | worst predicted |\n|---|---|---|---|");
        // Per fold: the test slides with their true class and the probabilities of each.
        let tested: Vec<Vec<(String, String, usize)>> = runs
            .iter()
            .map(|(_, p, _)| {
                let (split, slides) = (table::strings(p, "split"), table::strings(p, "slide_id"));
                let truth = table::strings(p, &format!("{level}_true"));
                (0..p.num_rows())
                    .filter(|&i| split[i] == "test")
                    .map(|i| (slides[i].clone(), truth[i].clone(), i))
                    .collect()
            })
            .collect();
        for class in names.iter() {
            for (k, (nodes, p, _)) in runs.iter().enumerate() {
                let probs = table::f64s(p, &format!("prob_{level}_{class}"));
                let mut of_class: Vec<(f64, String)> = tested[k]
                    .iter()
                    .filter(|(_, truth, _)| truth == class)
                    .map(|(slide, _, i)| (probs[*i].unwrap_or(f64::NAN), slide.clone()))
                    .collect();
                of_class.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let (best, worst) = (cell(k, of_class.first()), cell(k, of_class.last()));
                let run = if show_seed {
                    format!("seed {}, fold {}", nodes.seed, nodes.fold)
                } else {
                    nodes.fold.to_string()
                };
                let _ = writeln!(md, "| {class} | {run} | {best} | {worst} |");
            }
        }
    }
    md
}

/// `items` without repeats, each where it first appears.
fn distinct<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The test-split values of `runs` (one variant's) that [`compare`] compares.
fn compared_values<'a>(runs: impl Iterator<Item = &'a RunTables<'a>>) -> compare::Values {
    let mut values = compare::Values::new();
    for r in runs {
        let mut test = Collected::new();
        collect_test(&r.metrics, &mut test);
        for ((level, metric, class), v) in test {
            if class.is_none()
                && let Some(&v) = v.first()
            {
                values.entry((level, metric)).or_default().insert((r.nodes.seed, r.nodes.fold), v);
            }
        }
    }
    values
}

/// Turns a plotting failure into an error naming the PNG being drawn.
fn plot_error(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::BadFile { path: path.into(), message: e.to_string() }
}

/// Training loss and validation fine AUC by epoch, one line per history; histories with the same
/// label share a colour and one legend entry.
fn plot_curves(path: &Path, histories: &[(String, &RecordBatch)]) -> Result<()> {
    let err = plot_error(path);
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    for (panel, (column, title)) in
        panels.iter().zip([("loss", "training loss"), ("val_auc_fine", "validation fine macro AUC")])
    {
        let series: Vec<Vec<(f64, f64)>> = histories
            .iter()
            .map(|(_, h)| {
                let epochs = h.column_by_name("epoch").expect("epoch").as_primitive::<Int32Type>().values().to_vec();
                epochs
                    .iter()
                    .zip(table::strings(h, "name"))
                    .zip(table::f64s(h, "value"))
                    .filter(|((_, name), _)| name == column)
                    .filter_map(|((e, _), v)| v.filter(|v| v.is_finite()).map(|v| (*e as f64, v)))
                    .collect()
            })
            .collect();
        let all = series.iter().flatten();
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
        let (y_min, y_max) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let (y_min, y_max) = if y_min.is_finite() { (y_min, y_max.max(y_min + 1e-6)) } else { (0.0, 1.0) };
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..x_max, y_min..y_max)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("epoch").draw().map_err(|e| err(&e))?;
        let mut labels: Vec<&str> = Vec::new();
        for ((label, _), s) in histories.iter().zip(series) {
            let known = labels.contains(&label.as_str());
            if !known {
                labels.push(label);
            }
            let k = labels.iter().position(|l| l == label).expect("pushed above");
            let color = Palette99::pick(k).to_rgba();
            let drawn = chart.draw_series(LineSeries::new(s, color.stroke_width(2))).map_err(|e| err(&e))?;
            if !known {
                drawn
                    .label(label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// Makes the embedded DejaVu Sans the plots' `sans-serif` font (no system fonts needed).
pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, Int32Array, StringArray};

    use super::*;

    /// (split, slide, fine truth, the probability of IC).
    type Row = (&'static str, &'static str, &'static str, f64);

    /// A fold's predictions of `rows`.
    fn predictions(rows: &[Row]) -> RecordBatch {
        let strings = |f: &dyn Fn(&Row) -> &'static str| table::string_col(rows.iter().map(f));
        let probs =
            |v: &dyn Fn(f64) -> f64| -> ArrayRef { Arc::new(rows.iter().map(|r| v(r.3)).collect::<Float64Array>()) };
        let columns = vec![
            Arc::new(Int32Array::from(vec![0; rows.len()])) as ArrayRef,
            strings(&|r| r.0),
            strings(&|r| r.1),
            strings(&|r| r.1),
            strings(&|r| r.2),
            strings(&|r| r.2),
            strings(&|_| "benign"),
            strings(&|_| "benign"),
            strings(&|_| "benign"),
            probs(&|p| 1.0 - p),
            probs(&|p| p),
            probs(&|p| 1.0 - p),
            probs(&|p| p),
            probs(&|p| 1.0 - p),
            probs(&|p| p),
        ];
        RecordBatch::try_new(schemas::tables::predictions(&["N", "IC"], &["benign", "malignant"]), columns).unwrap()
    }

    #[test]
    fn heatmap_links_name_each_class_s_best_and_worst_test_slide() {
        let classes = Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "IC".into()],
            fine_to_coarse: vec![0, 1],
        };
        let stage = crate::thumbnails::Thumbnails { dir: "slides".into() };
        let node = pipeline::Node::new("any", None, std::sync::Arc::new(stage)).handle();
        let fold = |k: usize| FoldNodes {
            variant: "hmil".into(),
            seed: 1,
            fold: k,
            train: node.clone(),
            evaluate: node.clone(),
            heatmaps: Some(node.clone()),
            results: format!("folds/{k}"),
        };
        let folds = [fold(0), fold(1)];
        // Fold 0 tests two IC slides (and validates a third, which never counts); fold 1 none.
        let preds = [
            predictions(&[("test", "s1", "IC", 0.2), ("test", "s2", "IC", 0.9), ("val", "s3", "IC", 0.99)]),
            predictions(&[("test", "s4", "N", 0.1)]),
        ];
        let drawn = |slides: &[&str], tiles: Option<&str>| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int32Array::from(vec![0; slides.len()])),
                table::string_col(slides.iter().copied()),
                table::string_col(slides.iter().map(|s| format!("heatmaps/{s}.png"))),
                Arc::new(slides.iter().map(|s| tiles.map(|t| format!("{t}/{s}.png"))).collect::<StringArray>()),
                table::string_col(slides.iter().map(|_| "slide")),
                Arc::new(Float64Array::from(vec![0.1; slides.len()])),
            ];
            RecordBatch::try_new(schemas::tables::heatmaps(), columns).unwrap()
        };
        let drawn_some = [drawn(&["s1", "s2"], Some("top_tiles")), drawn(&["s4"], None)];
        let md = heatmap_links(
            &classes,
            &[(&folds[0], &preds[0], &drawn_some[0]), (&folds[1], &preds[1], &drawn_some[1])],
            false,
        );
        assert!(
            md.contains(
                "| IC | 0 | [s2](folds/0/heatmaps/s2.png) 0.90 ([top tiles](folds/0/top_tiles/s2.png)) | \
                 [s1](folds/0/heatmaps/s1.png) 0.20 ([top tiles](folds/0/top_tiles/s1.png)) |"
            ),
            "{md}"
        );
        assert!(md.contains("| IC | 1 | – | – |"), "{md}");
        assert!(
            md.contains("| N | 1 | [s4](folds/1/heatmaps/s4.png) 0.90 | [s4](folds/1/heatmaps/s4.png) 0.90 |"),
            "{md}"
        );
        let blank = [drawn(&[], None), drawn(&[], None)];
        let none =
            heatmap_links(&classes, &[(&folds[0], &preds[0], &blank[0]), (&folds[1], &preds[1], &blank[1])], false);
        assert!(none.contains("No heatmaps were drawn"), "{none}");
    }

    #[test]
    fn pooled_predictions_take_every_test_row_of_every_run() {
        let classes = Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "IC".into()],
            fine_to_coarse: vec![0, 1],
        };
        let a = predictions(&[("test", "s1", "IC", 0.9), ("test", "s2", "N", 0.2), ("val", "s3", "IC", 0.1)]);
        let b = predictions(&[("test", "s4", "IC", 0.6), ("test", "s5", "N", 0.7), ("test", "s6", "N", 0.1)]);
        let pooled = compare::pooled(&[("hmil".into(), vec![&a, &b])], &classes);
        let md = compare::pooled_markdown(&["hmil".into()], &pooled);
        assert_eq!(pooled.len(), 9, "every level and metric: {pooled:?}");
        let auc = pooled[&("hmil".into(), "fine".into(), "auc_macro".into())];
        assert!((auc.mean - 5.0 / 6.0).abs() < 1e-12 && auc.n == 5 && auc.low <= auc.mean && auc.mean <= auc.high);
        // Five test rows (the validation row left out): IC at 0.9 and 0.6, N at 0.2, 0.7 and 0.1.
        // AUC 5/6; balanced accuracy (1 + 2/3) / 2.
        assert!(md.contains("| hmil | 0.833 [") && md.contains("| 0.833 ["), "{md}");
        assert!(md.contains("1000 resamples of the cases"), "{md}");
        assert!(md.contains("---|\n| hmil |"), "the table's rows start on their own lines: {md}");
    }

    #[test]
    fn roc_points_step_through_distinct_scores() {
        // Scores 0.9 (pos), 0.5 (neg, pos tied), 0.1 (neg): ties move diagonally in one step.
        let truth = [true, false, true, false];
        let scores = [0.9, 0.5, 0.5, 0.1];
        assert_eq!(roc_points(&truth, &scores), vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
    }

    /// Pixels of `img` within `r` of `at` for which `ink` holds.
    fn any_ink(img: &image::RgbImage, at: (i32, i32), r: (i32, i32), ink: impl Fn([u8; 3]) -> bool) -> bool {
        (-r.0..=r.0).any(|dx| (-r.1..=r.1).any(|dy| ink(img.get_pixel((at.0 + dx) as u32, (at.1 + dy) as u32).0)))
    }

    #[test]
    fn confusion_rows_are_true_classes_from_the_top_with_counts_and_labels_centred() {
        register_font();
        let names: Vec<String> = ["N", "PB", "IC"].map(String::from).to_vec();
        // Asymmetric, so a flipped or transposed drawing cannot pass.
        let counts = vec![vec![8.0, 0.0, 0.0], vec![1.0, 0.0, 7.0], vec![0.0, 4.0, 4.0]];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("confusion.png");
        plot_confusion(&path, "test", &names, &counts).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let layout = ConfusionLayout::new(img.dimensions(), names.len());
        let dark = |p: [u8; 3]| p.iter().all(|&c| c < 110);
        let light = |p: [u8; 3]| p.iter().all(|&c| c > 200);
        for (t, row) in counts.iter().enumerate() {
            let total: f64 = row.iter().sum();
            for (p, &v) in row.iter().enumerate() {
                // The fill, read inside the cell away from its count: row t is true class t.
                let ((x0, y0), (x1, y1)) = layout.cell(t, p);
                let fill = shade(v / total);
                for (x, y) in [(x0 + 4, y0 + 4), (x1 - 5, y1 - 5)] {
                    assert_eq!(img.get_pixel(x as u32, y as u32).0, [fill.0, fill.1, fill.2], "cell ({t}, {p})");
                }
                // The count sits on the cell's centre, in ink that reads on its fill.
                let ink: &dyn Fn([u8; 3]) -> bool = if v / total > 0.55 { &light } else { &dark };
                assert!(any_ink(&img, layout.centre(t, p), (4, 4), ink), "count of ({t}, {p}) not at its centre");
                assert!(!any_ink(&img, (x0 + 6, y0 + 6), (2, 2), dark), "ink in the corner of ({t}, {p})");
            }
            // Row labels on the row's centre line, column labels on the column's.
            assert_eq!(layout.row_label(t).1, layout.centre(t, 0).1);
            assert_eq!(layout.column_label(t, 3).0, layout.centre(0, t).0);
            let (x, y) = layout.row_label(t);
            assert!(any_ink(&img, (x - 10, y), (8, 3), dark), "row label {t}");
            let (x, y) = layout.column_label(t, 3);
            assert!(any_ink(&img, (x, y + 7), (4, 5), dark), "column label {t}");
        }
        assert!(layout.centre(1, 0).1 > layout.centre(0, 0).1, "rows run down the page in class order");
    }

    #[test]
    fn mean_and_sample_sd() {
        assert_eq!(stats::mean_sd(&[1.0, 3.0]), (2.0, 2f64.sqrt()));
        assert_eq!(stats::mean_sd(&[0.5]), (0.5, 0.0));
    }
}
