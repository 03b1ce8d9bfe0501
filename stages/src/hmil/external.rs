//! `external[cohort=c]` (with variants and seeds, `external[cohort=c,variant=v,seed=s]`): every
//! fold model of one variant and seed predicts every labelled slide of an external cohort, and so
//! does their ensemble (the mean of the fold models' probabilities). The cohort is never used for
//! any choice: models are selected on their folds' validation slides. Predictions and metrics
//! have the definitions of `evaluate`'s, with the cohort, variant and seed first; split
//! `external` rows are a fold model's, split `ensemble` rows (fold −1) the ensemble's.

use arrow::array::RecordBatch;
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{EXTERNAL_METRICS, EXTERNAL_PREDICTIONS, METRICS, MODEL};
use schemas::workflow::StoreMode;

use super::checkpoint;
use super::data::{Store, labelled_bags};
use super::evaluate::{SplitResult, metric_columns, prediction_columns};
use super::infer::{BagPrediction, predict};
use super::train::{Classes, device, store_inputs};
use crate::error::{Error, Result};
use crate::table;

/// The fold number of the ensemble's rows.
pub const ENSEMBLE_FOLD: i32 = -1;

/// The `external` stage.
pub struct ExternalCohort {
    pub cohort: String,
    pub variant: String,
    pub seed: u64,
    pub device: String,
    pub batch_size: usize,
    pub classes: Classes,
    /// The cohort's `pack_features` and `join_labels` nodes.
    pub pack: NodeRef,
    pub labels: NodeRef,
    /// The variant's and seed's `train` nodes, by fold.
    pub trains: Vec<NodeRef>,
}

impl Stage for ExternalCohort {
    fn kind(&self) -> &str {
        "external"
    }
    /// Faster on a GPU unless set to run on the CPU.
    fn resources(&self) -> Resources {
        Resources { gpu: self.device != "cpu", in_driver: false }
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "cohort": self.cohort, "variant": self.variant, "seed": self.seed, "device": self.device,
            "batch_size": self.batch_size, "classes": self.classes, "folds": self.trains.len(),
        })
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = store_inputs(&self.pack, &self.labels);
        v.extend(
            self.trains.iter().enumerate().map(|(k, node)| Input::artifact(&format!("checkpoint{k}"), node, &MODEL)),
        );
        v
    }
    fn outputs(&self) -> Vec<Output> {
        let (fine, coarse) = self.classes.names();
        vec![
            Output::table(&EXTERNAL_PREDICTIONS, (EXTERNAL_PREDICTIONS.schema)(&fine, &coarse)),
            (&EXTERNAL_METRICS).into(),
        ]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.predict(ctx)?)
    }
}

impl ExternalCohort {
    fn predict(&self, ctx: &Context) -> Result<()> {
        let device = device(&self.device, ctx.gpu())?;
        let store =
            Store::load(ctx.input("features"), ctx.input("packed"), ctx.input("coords"), device, StoreMode::Auto)?;
        let bags = labelled_bags(ctx.input("labels"), &store)?;
        if bags.is_empty() {
            return Err(Error::Features(format!(
                "cohort {}: no labelled slide has features; check its labels' slide ids against its feature files",
                self.cohort
            )));
        }
        let c = &self.classes;
        let bar = ctx.progress(self.trains.len() as u64, "fold models");
        let mut per_fold = Vec::new();
        for k in 0..self.trains.len() {
            if ctx.interrupted() {
                return Err(Error::Interrupted(format!("after {k} fold model(s)")));
            }
            let model = checkpoint::load(ctx.input(&format!("checkpoint{k}")), c, store.dim, device)?;
            per_fold.push(predict(&*model.net, &store, &bags, self.batch_size, 0, &c.fine_to_coarse));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let ensemble = mean_probabilities(&per_fold);
        let mut runs: Vec<(i32, SplitResult)> = per_fold
            .into_iter()
            .enumerate()
            .map(|(k, preds)| (k as i32, SplitResult { name: "external", bags: &bags, preds }))
            .collect();
        runs.push((ENSEMBLE_FOLD, SplitResult { name: "ensemble", bags: &bags, preds: ensemble }));
        let tag = |batch: RecordBatch| table::tag_run(&batch, Some(&self.cohort), &self.variant, self.seed);
        let mut predictions = Vec::new();
        let mut metrics = Vec::new();
        for (fold, split) in &runs {
            let (schema, columns) = prediction_columns(*fold, c, std::slice::from_ref(split));
            predictions.push(tag(batch(schema, columns)?)?);
            metrics.push(tag(batch((METRICS.schema)(), metric_columns(*fold, c, std::slice::from_ref(split)))?)?);
        }
        table::write_all(&ctx.output(EXTERNAL_PREDICTIONS.file), &predictions)?;
        table::write_all(&ctx.output(EXTERNAL_METRICS.file), &metrics)
    }
}

fn batch(schema: arrow::datatypes::SchemaRef, columns: Vec<arrow::array::ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|e| Error::Features(format!("external predictions: {e}")))
}

/// Per bag, the mean of the fold models' probabilities at each level.
fn mean_probabilities(per_fold: &[Vec<BagPrediction>]) -> Vec<BagPrediction> {
    let n = per_fold.len() as f64;
    let mean = |of: &dyn Fn(&BagPrediction) -> &Vec<f64>, bag: usize| -> Vec<f64> {
        let mut sum = vec![0.0; of(&per_fold[0][bag]).len()];
        for fold in per_fold {
            for (s, p) in sum.iter_mut().zip(of(&fold[bag])) {
                *s += p / n;
            }
        }
        sum
    };
    (0..per_fold.first().map_or(0, Vec::len))
        .map(|bag| BagPrediction {
            coarse_probs: mean(&|p| &p.coarse_probs, bag),
            fine_probs: mean(&|p| &p.fine_probs, bag),
            top_attention: [Vec::new(), Vec::new()],
            agreement: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ensemble_is_the_mean_of_the_fold_models_probabilities() {
        let pred = |fine: [f64; 2], coarse: [f64; 2]| BagPrediction {
            coarse_probs: coarse.to_vec(),
            fine_probs: fine.to_vec(),
            top_attention: [Vec::new(), Vec::new()],
            agreement: Vec::new(),
        };
        let folds = vec![vec![pred([0.9, 0.1], [0.6, 0.4])], vec![pred([0.3, 0.7], [0.2, 0.8])]];
        let e = mean_probabilities(&folds);
        assert_eq!(e.len(), 1);
        assert!((e[0].fine_probs[0] - 0.6).abs() < 1e-12 && (e[0].coarse_probs[1] - 0.6).abs() < 1e-12);
    }
}
