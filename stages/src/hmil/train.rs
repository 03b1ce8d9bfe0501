//! `train[fold=k]`: trains a model (HMIL or a baseline, any [`MilModel`]) on a fold's training
//! bags, keeps the checkpoint that scores best on its validation bags (ties broken by the lower
//! validation loss; the test bags are never looked at), and records every epoch.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Float64Array, Int32Array};
use models::chunked::{self, Chunks};
use models::{Dims, MilModel, Schedule, Targets};
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{COORDS_DIR, FEATURES_DIR, HISTORY, LABELS, MODEL, PACKED, SPLITS};
use schemas::workflow::{Balance, Loss, ModelKind, SelectMetric, StoreMode, Train};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::data::{Bag, FoldBags, Store, fold_bags};
use super::infer::{argmax, predict, rows};
use super::metrics::binary_auc;
use super::{checkpoint, memory};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::table;

/// Where the shared inputs of the per-fold stages come from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub pack: NodeRef,
    pub labels: NodeRef,
    pub splits: NodeRef,
}

impl Sources {
    /// The packed store, labels and splits as declared inputs.
    pub fn inputs(&self) -> Vec<Input> {
        let mut v = store_inputs(&self.pack, &self.labels);
        v.push(Input::artifact("splits", &self.splits, &SPLITS));
        v
    }

    /// Loads the store for `device` (held there or streamed, as `mode` says) and the fold's bags.
    pub fn load(ctx: &Context, fold: usize, device: Device, mode: StoreMode) -> Result<(Store, FoldBags)> {
        let store = Store::load(ctx.input("features"), ctx.input("packed"), ctx.input("coords"), device, mode)?;
        let bags = fold_bags(ctx.input("labels"), ctx.input("splits"), fold, &store)?;
        Ok((store, bags))
    }
}

/// The packed store of `pack` and the labels of `labels`, as declared inputs.
pub fn store_inputs(pack: &NodeRef, labels: &NodeRef) -> Vec<Input> {
    vec![
        Input::artifact("features", pack, &FEATURES_DIR),
        Input::artifact("coords", pack, &COORDS_DIR),
        Input::artifact("packed", pack, &PACKED),
        Input::artifact("labels", labels, &LABELS),
    ]
}

/// The class hierarchy as the model needs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Classes {
    pub coarse: Vec<String>,
    pub fine: Vec<String>,
    pub fine_to_coarse: Vec<usize>,
}

impl Classes {
    /// The fine and the coarse class names, as a class table's schema takes them.
    pub fn names(&self) -> (Vec<&str>, Vec<&str>) {
        (self.fine.iter().map(String::as_str).collect(), self.coarse.iter().map(String::as_str).collect())
    }
}

/// Resolves `auto` / `cpu` / `cuda:N`; `auto` is `gpu` when the node was given one (see
/// [`pipeline::Context::gpu`]), else the first GPU if there is one, else the CPU.
pub fn device(spec: &str, gpu: Option<usize>) -> Result<Device> {
    match spec {
        "auto" => Ok(gpu.map_or_else(Device::cuda_if_available, Device::Cuda)),
        "cpu" => Ok(Device::Cpu),
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Features(format!("bad device {other}")))?;
            if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
                return Err(Error::Features(format!("device {other} is not available on this machine")));
            }
            Ok(Device::Cuda(n))
        }
    }
}

/// The `train[fold=k]` stage.
pub struct TrainFold {
    pub fold: usize,
    pub config: Train,
    pub seed: u64,
    pub classes: Classes,
    pub sources: Sources,
}

impl Stage for TrainFold {
    fn kind(&self) -> &str {
        "train"
    }
    /// Faster on a GPU unless set to run on the CPU.
    fn resources(&self) -> Resources {
        Resources { gpu: self.config.device != "cpu", in_driver: false }
    }
    /// 2: one joint product per shared input (same model, different float summation order).
    /// 3: the checkpoint carries its classes, hierarchy and configuration.
    /// 4: an epoch that ties the best validation score is kept when its validation loss is lower.
    /// 5: any model; `history.parquet` in long form.
    fn code_version(&self) -> &str {
        "5"
    }
    fn params(&self) -> serde_json::Value {
        let mut config = serde_json::to_value(&self.config).expect("serialises");
        // The checkpoint is an input (by content), not a path parameter; how memory is used
        // leaves the results as they are.
        let config_map = config.as_object_mut().expect("object");
        for key in ["init_from", "max_instances_per_chunk", "store"] {
            config_map.remove(key);
        }
        serde_json::json!({ "fold": self.fold, "seed": self.seed, "train": config, "classes": self.classes })
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = self.sources.inputs();
        if let Some(init) = &self.config.init_from {
            v.push(Input::external("init_from", init));
        }
        v
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&MODEL).into(), (&HISTORY).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.train(ctx)?)
    }
}

/// The network of `model` for `classes` over `dim`-wide features, as inference uses it (no
/// dropout; the loss settings are those of training, see [`TrainFold`]).
pub fn model_config(model: ModelKind, classes: &Classes, dim: i64) -> models::Config {
    models::Config {
        model,
        dims: Dims { input: dim, n_coarse: classes.coarse.len() as i64, n_fine: classes.fine.len() as i64 },
        fine_to_coarse: classes.fine_to_coarse.clone(),
        dropout: 0.0,
        loss: Loss::default(),
        align_weight: 0.0,
    }
}

/// Builds the network with deterministic, seeded weights (independent of libtorch's global
/// generator, so folds trained side by side stay reproducible): Kaiming-normal by fan-in for
/// layer weights, ones for normalisation weights, zeros for biases, standard normal otherwise
/// (TransMIL's class token).
pub fn build_model(vs: &nn::VarStore, config: &models::Config, seed: u64) -> Box<dyn MilModel> {
    let model = models::build(&vs.root(), config);
    let mut rng = Rng::new(seed, 0x1417);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let _guard = tch::no_grad_guard();
    for (name, mut t) in vars {
        let size = t.size();
        let n = size.iter().product::<i64>() as usize;
        let values: Vec<f32> = match (name.rsplit('.').next(), size.len()) {
            (Some("bias"), _) => vec![0.0; n],
            (Some("weight"), 1) => vec![1.0; n],
            (Some("weight"), _) => {
                let std = (2.0 / size[1..].iter().product::<i64>() as f64).sqrt();
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
            _ => (0..n).map(|_| rng.normal() as f32).collect(),
        };
        t.copy_(&Tensor::from_slice(&values).view(size.as_slice()).to(t.device()));
    }
    model
}

/// The best epoch so far: its validation (score, loss) and a copy of its weights.
type Best = ((f64, f64), Vec<(String, Tensor)>);

/// Whether an epoch with validation (score, loss) beats the best so far: a higher score, or the
/// same score with a lower loss. A small validation set saturates AUC or accuracy within a few
/// epochs, while the model is still barely trained; the first epoch to reach the ceiling is not
/// the one to keep.
fn better((score, loss): (f64, f64), best: Option<(f64, f64)>) -> bool {
    match best {
        None => true,
        Some((b, _)) if b.is_nan() => !score.is_nan(),
        Some((b, best_loss)) => score > b || (score == b && loss < best_loss),
    }
}

/// Accuracy and one-vs-rest macro AUC of probabilities against labels.
fn acc_auc(probs: &[Vec<f64>], y: &[i64]) -> (f64, f64) {
    if y.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let acc = probs.iter().zip(y).filter(|(p, t)| argmax(p) as i64 == **t).count() as f64 / y.len() as f64;
    let aucs: Vec<f64> = (0..probs[0].len())
        .map(|c| {
            binary_auc(
                &y.iter().map(|&t| t == c as i64).collect::<Vec<_>>(),
                &probs.iter().map(|p| p[c]).collect::<Vec<_>>(),
            )
        })
        .filter(|a| a.is_finite())
        .collect();
    let auc = if aucs.len() >= 2 { aucs.iter().sum::<f64>() / aucs.len() as f64 } else { f64::NAN };
    (acc, auc)
}

/// Mean cross-entropy of probabilities.
fn mean_nll(probs: &[Vec<f64>], y: &[i64]) -> f64 {
    probs.iter().zip(y).map(|(p, &t)| -(p[t as usize].max(1e-12)).ln()).sum::<f64>() / y.len().max(1) as f64
}

/// Every epoch's values, in long form.
#[derive(Default)]
struct History {
    rows: Vec<(i32, String, f64)>,
}

impl History {
    fn push(&mut self, epoch: usize, name: &str, value: f64) {
        self.rows.push((epoch as i32, name.to_owned(), value));
    }

    fn write(&self, path: &Path, fold: usize) -> Result<()> {
        let n = self.rows.len();
        table::write(
            path,
            (HISTORY.schema)(),
            vec![
                Arc::new(Int32Array::from(vec![fold as i32; n])),
                Arc::new(Int32Array::from_iter_values(self.rows.iter().map(|r| r.0))),
                table::string_col(self.rows.iter().map(|r| r.1.as_str())),
                Arc::new(self.rows.iter().map(|r| r.2.is_finite().then_some(r.2)).collect::<Float64Array>()),
            ],
        )
    }
}

/// Per-bag probabilities of a batch's logits, on the CPU.
fn probs(t: &Tensor) -> Vec<Vec<f64>> {
    rows(&t.detach().softmax(-1, Kind::Double))
}

/// What one epoch of training saw: each loss term's mean over bags (`loss` the total), the
/// schedule's values, and the training bags' accuracy and AUC at both levels.
struct EpochTrain {
    losses: Vec<(String, f64)>,
    schedule: Vec<(&'static str, f64)>,
    coarse: (f64, f64),
    fine: (f64, f64),
}

/// The network's validation loss, accuracy and AUC at both levels.
struct Validation {
    loss: f64,
    coarse: (f64, f64),
    fine: (f64, f64),
}

impl TrainFold {
    fn train(&self, ctx: &Context) -> Result<()> {
        let cfg = &self.config;
        if let Some(t) = cfg.threads {
            tch::set_num_threads(t as i32);
        }
        let device = device(&cfg.device, ctx.gpu())?;
        let (store, bags) = Sources::load(ctx, self.fold, device, cfg.store)?;
        let config = models::Config {
            dropout: cfg.dropout,
            loss: cfg.loss,
            align_weight: cfg.align_weight,
            ..model_config(cfg.model, &self.classes, store.dim)
        };
        let mut vs = nn::VarStore::new(device);
        let model = build_model(&vs, &config, self.seed.wrapping_add(self.fold as u64));
        if cfg.init_from.is_some() {
            let path = ctx.input("init_from");
            vs.load(path)
                .map_err(|e| Error::BadFile { path: path.into(), message: format!("cannot load checkpoint: {e}") })?;
            vs.float();
        }
        let mut opt = nn::Adam { wd: cfg.weight_decay, ..Default::default() }
            .build(&vs, cfg.lr)
            .map_err(|e| Error::Features(format!("optimiser: {e}")))?;
        let weights = (cfg.balance == Balance::LossWeights).then(|| class_weights(&bags.train, config.dims, device));
        if bags.val.is_empty() {
            ctx.warn("no validation slides: the last epoch's checkpoint is kept (set splits.val_frac > 0)");
        }
        let (budget, cache) = self.step_budget(&bags.train, store.dim, &*model, device);
        let mut best: Option<Best> = None;
        let (mut lr, mut since_best, mut plateau_wait, mut best_val_loss) = (cfg.lr, 0usize, 0usize, f64::INFINITY);
        let mut history = History::default();
        let bar = ctx.progress(cfg.epochs as u64, "epochs");
        for epoch in 0..cfg.epochs {
            let start = Instant::now();
            let step = Step { ctx, model: &*model, store: &store, weights: weights.as_ref(), epoch, budget, cache };
            let train = self.train_epoch(&step, &mut opt, &bags.train)?;
            let val = self.validate(&*model, &store, &bags.val);
            let score = match cfg.select {
                SelectMetric::FineAuc => val.fine.1,
                SelectMetric::FineAccuracy => val.fine.0,
                SelectMetric::CoarseAuc => val.coarse.1,
                SelectMetric::Loss => -val.loss,
            };
            if bags.val.is_empty() || better((score, val.loss), best.as_ref().map(|b| b.0)) {
                let snapshot = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
                best = Some(((score, val.loss), snapshot));
                since_best = 0;
            } else {
                since_best += 1;
            }
            let loss = train.losses[0].1;
            history.push(epoch, "lr", lr);
            for (name, value) in &train.losses {
                history.push(epoch, name, *value);
            }
            for (name, value) in &train.schedule {
                history.push(epoch, name, *value);
            }
            for (name, value) in [
                ("train_acc_coarse", train.coarse.0),
                ("train_acc_fine", train.fine.0),
                ("train_auc_coarse", train.coarse.1),
                ("train_auc_fine", train.fine.1),
                ("val_loss", val.loss),
                ("val_acc_coarse", val.coarse.0),
                ("val_acc_fine", val.fine.0),
                ("val_auc_coarse", val.coarse.1),
                ("val_auc_fine", val.fine.1),
                ("seconds", start.elapsed().as_secs_f64()),
            ] {
                history.push(epoch, name, value);
            }
            bar.set_message(format!("loss {loss:.3} val fine AUC {:.3}", val.fine.1));
            bar.inc(1);
            // Shown without -v when no progress bar is (stderr is a log file or a job's output).
            tracing::info!(
                node = ctx.node_id(),
                "epoch {}/{}: loss {loss:.4}, validation fine macro AUC {:.3}",
                epoch + 1,
                cfg.epochs,
                val.fine.1
            );
            if let Some(p) = cfg.plateau.filter(|_| !val.loss.is_nan()) {
                if val.loss < best_val_loss {
                    best_val_loss = val.loss;
                    plateau_wait = 0;
                } else {
                    plateau_wait += 1;
                    if plateau_wait > p.patience {
                        lr = (lr * p.factor).max(p.min_lr);
                        opt.set_lr(lr);
                        plateau_wait = 0;
                    }
                }
            }
            if cfg.early_stopping.is_some_and(|patience| since_best > patience) {
                tracing::info!(fold = self.fold, epoch, "early stopping");
                break;
            }
        }
        bar.finish_and_clear();
        if let Some((_, snapshot)) = best {
            let mut vars = vs.variables();
            let _guard = tch::no_grad_guard();
            for (name, t) in snapshot {
                vars.get_mut(&name).expect("same variables").copy_(&t);
            }
        }
        let info = checkpoint::Info::new(cfg.model, &self.classes, store.dim, cfg.dropout);
        checkpoint::save(&vs, &info, &ctx.output(MODEL.file))?;
        history.write(&ctx.output(HISTORY.file), self.fold)?;
        Ok(())
    }

    /// One pass over the training bags in this epoch's order, a step per mini-batch.
    fn train_epoch(&self, step: &Step, opt: &mut nn::Optimizer, train: &[Bag]) -> Result<EpochTrain> {
        let cfg = &self.config;
        let device = step.store.device();
        let order = self.epoch_order(train, step.epoch);
        let mut sums: Vec<(String, f64)> = Vec::new();
        let mut schedule = Vec::new();
        let (mut coarse_probs, mut fine_probs, mut y_c, mut y_f) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (b, chunk) in order.chunks(cfg.batch_size).enumerate() {
            if step.ctx.interrupted() {
                return Err(Error::Interrupted(format!(
                    "in epoch {} of {}, batch {}",
                    step.epoch + 1,
                    cfg.epochs,
                    b + 1
                )));
            }
            let refs: Vec<&Bag> = chunk.iter().map(|&i| &train[i]).collect();
            let coarse = Tensor::from_slice(&refs.iter().map(|b| b.coarse).collect::<Vec<_>>()).to(device);
            let fine = Tensor::from_slice(&refs.iter().map(|b| b.fine).collect::<Vec<_>>()).to(device);
            let targets = Targets { coarse: &coarse, fine: &fine, class_weights: step.weights.map(|(a, b)| (a, b)) };
            let at = Schedule { epoch: step.epoch, epochs: cfg.epochs };
            let lengths: Vec<i64> = refs.iter().map(|b| b.len).collect();
            let seed =
                Rng::new(self.seed, ((self.fold as u64) << 40) | ((step.epoch as u64) << 20) | b as u64).next_u64();
            let chunks = Chunks {
                lengths: &lengths,
                budget: step.budget,
                cache: step.cache,
                batch: &|run| step.store.batch(&refs[run]),
                bf16: cfg.bf16 && device.is_cuda(),
                seed: (seed >> 2) as i64,
            };
            opt.zero_grad();
            let (out, terms) = chunked::step(step.model, &chunks, &targets, at);
            opt.step();
            if sums.is_empty() {
                sums = std::iter::once("loss".to_owned())
                    .chain(terms.named.iter().map(|(name, _)| format!("loss_{name}")))
                    .map(|name| (name, 0.0))
                    .collect();
                schedule = terms.schedule.clone();
            }
            let n = refs.len() as f64;
            for (sum, t) in sums.iter_mut().zip(std::iter::once(&terms.total).chain(terms.named.iter().map(|t| &t.1))) {
                sum.1 += t.double_value(&[]) * n;
            }
            coarse_probs.extend(probs(&out.coarse_logits));
            fine_probs.extend(probs(&out.fine_logits));
            y_c.extend(refs.iter().map(|b| b.coarse));
            y_f.extend(refs.iter().map(|b| b.fine));
        }
        let n_train = order.len().max(1) as f64;
        for sum in &mut sums {
            sum.1 /= n_train;
        }
        Ok(EpochTrain {
            losses: sums,
            schedule,
            coarse: acc_auc(&coarse_probs, &y_c),
            fine: acc_auc(&fine_probs, &y_f),
        })
    }

    /// The instances a step runs at once and what it may keep between its passes (logged when
    /// some mini-batch will run in chunks).
    fn step_budget(&self, train: &[Bag], dim: i64, model: &dyn MilModel, device: Device) -> (i64, chunked::Cache) {
        let (budget, why) = memory::step_budget(self.config.max_instances_per_chunk, self.config.model, dim, device);
        let Some(budget) = budget else {
            tracing::info!(fold = self.fold, "training steps run whole mini-batches ({why})");
            return (i64::MAX, chunked::Cache::of(model, 0));
        };
        let cache = memory::cache(model, self.config.model, budget, dim, device);
        let mut lengths: Vec<i64> = train.iter().map(|b| b.len).collect();
        // Of mini-batches as the bags come (an epoch's shuffle changes it little).
        let twice: chunked::Recomputed =
            lengths.chunks(self.config.batch_size.max(1)).map(|b| chunked::recomputed(b, budget, cache)).sum();
        let total = lengths.iter().sum::<i64>().max(1) as f64;
        let share = |n: i64| n as f64 / total;
        let (again, past_stem, past_product) =
            (share(twice.instances), share(twice.past_stem), share(twice.past_product));
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        let largest: i64 = lengths.iter().take(self.config.batch_size).sum();
        if largest > budget {
            tracing::info!(
                fold = self.fold,
                "mini-batches of up to {largest} instances run in chunks of bags of at most {why}, with the gradients of one pass; \
                 about {again:.2} of an epoch's instances run forward twice, {past_stem:.2} of them from their first layer's outputs \
                 and {past_product:.2} from the product's after it (a larger train.max_instances_per_chunk trades memory for fewer)"
            );
        }
        (budget, cache)
    }

    /// The network on the validation bags.
    fn validate(&self, model: &dyn MilModel, store: &Store, val: &[Bag]) -> Validation {
        let preds = predict(model, store, val, self.config.batch_size, 0, &self.classes.fine_to_coarse);
        let vc: Vec<Vec<f64>> = preds.iter().map(|p| p.coarse_probs.clone()).collect();
        let vf: Vec<Vec<f64>> = preds.iter().map(|p| p.fine_probs.clone()).collect();
        let y_c: Vec<i64> = val.iter().map(|b| b.coarse).collect();
        let y_f: Vec<i64> = val.iter().map(|b| b.fine).collect();
        let loss = if preds.is_empty() { f64::NAN } else { mean_nll(&vc, &y_c) + mean_nll(&vf, &y_f) };
        Validation { loss, coarse: acc_auc(&vc, &y_c), fine: acc_auc(&vf, &y_f) }
    }

    /// This epoch's bag order: a seeded shuffle, or class-balanced draws with replacement.
    fn epoch_order(&self, train: &[Bag], epoch: usize) -> Vec<usize> {
        let mut rng = Rng::new(self.seed, ((self.fold as u64) << 32) | (1 << 20) | epoch as u64);
        match self.config.balance {
            Balance::Sampling => {
                let mut count = std::collections::HashMap::new();
                for b in train {
                    *count.entry(b.fine).or_insert(0usize) += 1;
                }
                let weights: Vec<f64> = train.iter().map(|b| 1.0 / count[&b.fine] as f64).collect();
                let total: f64 = weights.iter().sum();
                (0..train.len())
                    .map(|_| {
                        let mut u = rng.uniform() * total;
                        weights
                            .iter()
                            .position(|w| {
                                u -= w;
                                u < 0.0
                            })
                            .unwrap_or(train.len() - 1)
                    })
                    .collect()
            }
            _ => {
                let mut order: Vec<usize> = (0..train.len()).collect();
                rng.shuffle(&mut order);
                order
            }
        }
    }
}

/// What a training step works with, besides the optimiser.
struct Step<'a> {
    ctx: &'a Context<'a>,
    model: &'a dyn MilModel,
    store: &'a Store,
    weights: Option<&'a (Tensor, Tensor)>,
    epoch: usize,
    /// Instances a step runs at once.
    budget: i64,
    /// What a step may keep between its passes.
    cache: chunked::Cache,
}

/// Inverse-frequency class weights (coarse, fine), normalised to mean 1 over present classes.
fn class_weights(train: &[Bag], dims: Dims, device: Device) -> (Tensor, Tensor) {
    let weights = |n: i64, of: &dyn Fn(&Bag) -> i64| {
        let mut count = vec![0.0f32; n as usize];
        for b in train {
            count[of(b) as usize] += 1.0;
        }
        let present = count.iter().filter(|&&c| c > 0.0).count() as f32;
        let w: Vec<f32> =
            count.iter().map(|&c| if c > 0.0 { train.len() as f32 / (present * c) } else { 0.0 }).collect();
        Tensor::from_slice(&w).to(device)
    };
    (weights(dims.n_coarse, &|b| b.coarse), weights(dims.n_fine, &|b| b.fine))
}

#[cfg(test)]
mod tests {
    use super::better;

    #[test]
    fn a_tied_score_is_kept_only_with_a_lower_loss() {
        assert!(better((0.8, 1.0), None));
        assert!(better((0.9, 2.0), Some((0.8, 0.1))), "a higher score wins whatever its loss");
        assert!(!better((0.7, 0.1), Some((0.8, 1.0))));
        // AUC saturated at 1.0 from an early epoch: later epochs that fit better are kept.
        assert!(better((1.0, 0.03), Some((1.0, 0.99))));
        assert!(!better((1.0, 0.5), Some((1.0, 0.03))));
        assert!(better((0.5, 1.0), Some((f64::NAN, 1.0))) && !better((f64::NAN, 0.1), Some((f64::NAN, 1.0))));
    }
}
