//! `evaluate[fold=k]`: the kept checkpoint on the fold's validation and test bags, written as
//! predictions, metrics at every level, and the most attended instances of each slide.

use schemas::workflow::StoreMode;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{AGREEMENT, ATTENTION, METRICS, MODEL, PREDICTIONS};
use schemas::workflow::Evaluate;

use super::checkpoint::{self, Loaded};
use super::data::Bag;
use super::infer::{BagPrediction, argmax, predict};
use super::metrics::{self, Scored};
use super::train::{Classes, Sources, device};
use crate::error::Result;
use crate::table;

/// The `evaluate[fold=k]` stage.
pub struct EvaluateFold {
    pub fold: usize,
    pub config: Evaluate,
    pub device: String,
    pub classes: Classes,
    pub sources: Sources,
    /// The `train` node of this fold.
    pub train: NodeRef,
}

impl Stage for EvaluateFold {
    fn kind(&self) -> &str {
        "evaluate"
    }
    /// Faster on a GPU unless set to run on the CPU.
    fn resources(&self) -> Resources {
        Resources { gpu: self.device != "cpu", in_driver: false }
    }
    /// 2: one joint product per shared input (same model, different float summation order).
    /// 3: `agreement.parquet`.
    fn code_version(&self) -> &str {
        "3"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "fold": self.fold, "evaluate": self.config, "classes": self.classes, "device": self.device })
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = self.sources.inputs();
        v.push(Input::artifact("checkpoint", &self.train, &MODEL));
        v
    }
    fn outputs(&self) -> Vec<Output> {
        let (fine, coarse) = self.classes.names();
        vec![
            Output::table(&PREDICTIONS, (PREDICTIONS.schema)(&fine, &coarse)),
            (&METRICS).into(),
            (&ATTENTION).into(),
            (&AGREEMENT).into(),
        ]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.evaluate(ctx)?)
    }
}

/// The network of the declared input `checkpoint`, for `classes` over `dim`-wide features, on
/// `device`.
pub fn load_checkpoint(ctx: &Context, classes: &Classes, dim: i64, device: tch::Device) -> Result<Loaded> {
    checkpoint::load(ctx.input("checkpoint"), classes, dim, device)
}

/// One attention row: slide, level, class, rank, instance, score, x, y.
type AttentionRow<'a> = (String, &'a str, String, i32, i64, f64, Option<f64>, Option<f64>);

/// One evaluated split.
pub struct SplitResult<'a> {
    pub name: &'static str,
    pub bags: &'a [Bag],
    pub preds: Vec<BagPrediction>,
}

impl EvaluateFold {
    fn evaluate(&self, ctx: &Context) -> Result<()> {
        let device = device(&self.device, ctx.gpu())?;
        let (store, bags) = Sources::load(ctx, self.fold, device, StoreMode::Auto)?;
        let c = &self.classes;
        let model = load_checkpoint(ctx, c, store.dim, device)?;
        let k = self.config.attention_top_k;
        let splits: Vec<SplitResult> = [("val", &bags.val), ("test", &bags.test)]
            .into_iter()
            .map(|(name, b)| SplitResult {
                name,
                bags: b,
                preds: predict(&*model.net, &store, b, self.config.batch_size, k, &c.fine_to_coarse),
            })
            .collect();
        self.write_predictions(ctx, &splits)?;
        self.write_metrics(ctx, &splits)?;
        self.write_attention(ctx, &splits, &store)?;
        self.write_agreement(ctx, &splits)
    }

    /// Per slide and fine class, how far the fine attention sits inside its coarse class's
    /// (cosine; see `infer::hierarchy_agreement`), for SQL to rank slides by.
    fn write_agreement(&self, ctx: &Context, splits: &[SplitResult]) -> Result<()> {
        let c = &self.classes;
        let rows: Vec<(&str, &str, usize, f64)> = splits
            .iter()
            .flat_map(|s| s.bags.iter().zip(&s.preds).map(move |(b, p)| (s.name, b, p)))
            .flat_map(|(split, b, p)| {
                p.agreement.iter().enumerate().map(move |(f, &v)| (split, b.slide_id.as_str(), f, v))
            })
            .collect();
        table::write_output(
            ctx,
            &AGREEMENT,
            vec![
                Arc::new(Int32Array::from(vec![self.fold as i32; rows.len()])),
                table::string_col(rows.iter().map(|r| r.0)),
                table::string_col(rows.iter().map(|r| r.1)),
                table::string_col(rows.iter().map(|r| c.fine[r.2].as_str())),
                table::string_col(rows.iter().map(|r| c.coarse[c.fine_to_coarse[r.2]].as_str())),
                Arc::new(rows.iter().map(|r| r.3.is_finite().then_some(r.3)).collect::<Float64Array>()),
            ],
        )
    }

    fn write_predictions(&self, ctx: &Context, splits: &[SplitResult]) -> Result<()> {
        let (schema, cols) = prediction_columns(self.fold as i32, &self.classes, splits);
        table::write(&ctx.output(PREDICTIONS.file), schema, cols)
    }

    fn write_metrics(&self, ctx: &Context, splits: &[SplitResult]) -> Result<()> {
        table::write_output(ctx, &METRICS, metric_columns(self.fold as i32, &self.classes, splits))
    }

    fn write_attention(&self, ctx: &Context, splits: &[SplitResult], store: &super::data::Store) -> Result<()> {
        let c = &self.classes;
        let mut rows: Vec<AttentionRow> = Vec::new();
        for s in splits {
            for (bag, pred) in s.bags.iter().zip(&s.preds) {
                let coords = store.coords(bag)?;
                for (level, names) in [("coarse", &c.coarse), ("fine", &c.fine)] {
                    let per_class = &pred.top_attention[usize::from(level == "fine")];
                    for (class, top) in per_class.iter().enumerate() {
                        for (rank, &(inst, score)) in top.iter().enumerate() {
                            let (x, y) = coords[inst];
                            let known = |v: f64| v.is_finite().then_some(v);
                            rows.push((
                                bag.slide_id.clone(),
                                level,
                                names[class].clone(),
                                rank as i32,
                                inst as i64,
                                score,
                                known(x),
                                known(y),
                            ));
                        }
                    }
                }
            }
        }
        table::write_output(
            ctx,
            &ATTENTION,
            vec![
                Arc::new(Int32Array::from(vec![self.fold as i32; rows.len()])),
                table::string_col(rows.iter().map(|r| r.0.as_str())),
                table::string_col(rows.iter().map(|r| r.1)),
                table::string_col(rows.iter().map(|r| r.2.as_str())),
                Arc::new(rows.iter().map(|r| r.3).collect::<Int32Array>()),
                Arc::new(rows.iter().map(|r| r.4).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| r.5).collect::<Float64Array>()),
                Arc::new(rows.iter().map(|r| r.6).collect::<Float64Array>()),
                Arc::new(rows.iter().map(|r| r.7).collect::<Float64Array>()),
            ],
        )
    }
}

/// The schema and columns of `predictions.parquet` for `splits`, as fold `fold`.
pub fn prediction_columns(
    fold: i32,
    c: &Classes,
    splits: &[SplitResult],
) -> (arrow::datatypes::SchemaRef, Vec<ArrayRef>) {
    let rows: Vec<(&str, &Bag, &BagPrediction)> =
        splits.iter().flat_map(|s| s.bags.iter().zip(&s.preds).map(move |(b, p)| (s.name, b, p))).collect();
    let from_fine: Vec<Vec<f64>> = rows.iter().map(|r| r.2.coarse_from_fine(&c.fine_to_coarse)).collect();
    let name = |names: &[String], i: usize| names[i].clone();
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(vec![fold; rows.len()])),
        table::string_col(rows.iter().map(|r| r.0)),
        table::string_col(rows.iter().map(|r| r.1.slide_id.as_str())),
        table::string_col(rows.iter().map(|r| r.1.case_id.as_str())),
        Arc::new(rows.iter().map(|r| Some(name(&c.fine, r.1.fine as usize))).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(name(&c.fine, argmax(&r.2.fine_probs)))).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(name(&c.coarse, r.1.coarse as usize))).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(name(&c.coarse, argmax(&r.2.coarse_probs)))).collect::<StringArray>()),
        Arc::new(from_fine.iter().map(|p| Some(name(&c.coarse, argmax(p)))).collect::<StringArray>()),
    ];
    let fine_probs: Vec<&[f64]> = rows.iter().map(|r| r.2.fine_probs.as_slice()).collect();
    let coarse_probs: Vec<&[f64]> = rows.iter().map(|r| r.2.coarse_probs.as_slice()).collect();
    let from_fine_probs: Vec<&[f64]> = from_fine.iter().map(Vec::as_slice).collect();
    for (probs, n) in [(&fine_probs, c.fine.len()), (&coarse_probs, c.coarse.len()), (&from_fine_probs, c.coarse.len())]
    {
        cols.extend((0..n).map(|k| Arc::new(probs.iter().map(|p| p[k]).collect::<Float64Array>()) as ArrayRef));
    }
    let (fine, coarse) = c.names();
    ((PREDICTIONS.schema)(&fine, &coarse), cols)
}

/// The columns of `metrics.parquet` for `splits`, every metric at every level, as fold `fold`.
pub fn metric_columns(fold: i32, c: &Classes, splits: &[SplitResult]) -> Vec<ArrayRef> {
    let mut rows: Vec<(&str, &str, String, Option<String>, f64)> = Vec::new();
    for s in splits.iter().filter(|s| !s.bags.is_empty()) {
        let from_fine: Vec<Vec<f64>> = s.preds.iter().map(|p| p.coarse_from_fine(&c.fine_to_coarse)).collect();
        let coarse_probs: Vec<Vec<f64>> = s.preds.iter().map(|p| p.coarse_probs.clone()).collect();
        let fine_probs: Vec<Vec<f64>> = s.preds.iter().map(|p| p.fine_probs.clone()).collect();
        let y_c: Vec<usize> = s.bags.iter().map(|b| b.coarse as usize).collect();
        let y_f: Vec<usize> = s.bags.iter().map(|b| b.fine as usize).collect();
        for (level, probs, y, names) in [
            ("coarse", &coarse_probs, &y_c, &c.coarse),
            ("fine", &fine_probs, &y_f, &c.fine),
            ("coarse_from_fine", &from_fine, &y_c, &c.coarse),
        ] {
            let y_pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
            let scored = Scored { y_true: y, y_pred: &y_pred, probs, n_classes: names.len() };
            for m in metrics::all(&scored) {
                let metric = match m.predicted {
                    Some(p) => format!("confusion[{}]", names[p]),
                    None => m.name.to_owned(),
                };
                rows.push((s.name, level, metric, m.class.map(|k| names[k].clone()), m.value));
            }
        }
    }
    vec![
        Arc::new(Int32Array::from(vec![fold; rows.len()])),
        table::string_col(rows.iter().map(|r| r.0)),
        table::string_col(rows.iter().map(|r| r.1)),
        table::string_col(rows.iter().map(|r| r.2.as_str())),
        Arc::new(rows.iter().map(|r| r.3.clone()).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| r.4.is_finite().then_some(r.4)).collect::<Float64Array>()),
    ]
}
