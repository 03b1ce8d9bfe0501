//! Training steps whose memory is bounded by an instance budget, with the gradients of one pass
//! over the whole batch (the gradient cache of Gao et al. 2021). A batch's loss couples its bags
//! (HMIL's contrastive term compares every bag with every other), so summing the gradients of
//! per-chunk losses would be wrong. Instead a step
//! 1. runs every chunk of bags forward without a graph, keeping only its [`PerBag`] rows;
//! 2. takes the loss of all the rows, as leaves, and its gradient with respect to them;
//! 3. runs every chunk forward again with a graph and back-propagates its rows' gradients.
//!
//! Only one chunk's activations are alive at a time. The largest chunk keeps its graph from the
//! first pass and is not run again, so a step costs the forward pass of the other chunks more
//! than one pass. Of that, the stem (the first layer, the largest product of every model) is
//! computed once where memory allows: the first pass keeps the stem outputs of chunks up to a
//! bound, and the second pass over such a chunk starts from them and back-propagates into the
//! stem by its closed form. Before both passes over a chunk the random generator is seeded
//! alike, so the second pass draws the dropout masks the first one saw.

use std::ops::Range;

use tch::{Kind, Tensor, nn};

use crate::{Batch, MilModel, PerBag, Schedule, Targets, Terms};

/// Consecutive runs of bags (by their instance counts) of at most `budget` instances each; a
/// bag larger than the budget is a run of its own (a bag's attention needs all its instances).
pub fn plan(lengths: &[i64], budget: i64) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, &n) in lengths.iter().enumerate() {
        if i > start && used + n > budget {
            runs.push(start..i);
            (start, used) = (i, 0);
        }
        used += n;
    }
    if start < lengths.len() {
        runs.push(start..lengths.len());
    }
    runs
}

/// The run of `runs` that keeps its graph from the first pass: the largest (the first of equals).
fn kept(runs: &[Range<usize>], lengths: &[i64]) -> usize {
    let instances = |i: usize| lengths[runs[i].clone()].iter().sum::<i64>();
    (0..runs.len()).rev().max_by_key(|&i| instances(i)).unwrap_or(0)
}

/// Which runs keep their stem outputs from the first pass: those but the `kept` one, in order,
/// while their instances fit in `stem_cache`.
fn stems_kept(runs: &[Range<usize>], lengths: &[i64], kept: usize, stem_cache: i64) -> Vec<bool> {
    let mut room = stem_cache;
    (0..runs.len())
        .map(|i| {
            let n = lengths[runs[i].clone()].iter().sum::<i64>();
            let fits = i != kept && n <= room;
            if fits {
                room -= n;
            }
            fits
        })
        .collect()
}

/// What a step's second pass runs again, in instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recomputed {
    /// Instances run forward twice: all but the kept run's, none when the step is one run.
    pub instances: i64,
    /// Of those, the ones whose second pass starts from their kept stem outputs.
    pub past_stem: i64,
}

impl std::iter::Sum for Recomputed {
    fn sum<I: Iterator<Item = Recomputed>>(steps: I) -> Recomputed {
        steps.fold(Recomputed::default(), |a, b| Recomputed {
            instances: a.instances + b.instances,
            past_stem: a.past_stem + b.past_stem,
        })
    }
}

/// What a step over bags of `lengths` under `budget`, keeping up to `stem_cache` stem outputs,
/// runs forward twice.
pub fn recomputed(lengths: &[i64], budget: i64, stem_cache: i64) -> Recomputed {
    let runs = plan(lengths, budget);
    if runs.len() < 2 {
        return Recomputed::default();
    }
    let largest = kept(&runs, lengths);
    let size = |i: usize| lengths[runs[i].clone()].iter().sum::<i64>();
    let stems = stems_kept(&runs, lengths, largest, stem_cache);
    Recomputed {
        instances: lengths.iter().sum::<i64>() - size(largest),
        past_stem: (0..runs.len()).filter(|&i| stems[i]).map(size).sum(),
    }
}

/// How a step runs: its chunks of bags and what they are made of.
pub struct Chunks<'a> {
    /// Instances of each bag of the batch, in order.
    pub lengths: &'a [i64],
    /// Instances a chunk may hold (see [`plan`]).
    pub budget: i64,
    /// The batch of a run of bags (called twice per run but the largest when there are several).
    pub batch: &'a dyn Fn(Range<usize>) -> Batch,
    /// Mixed precision (bf16 autocast) for the forward passes.
    pub bf16: bool,
    /// Seeds the random generator before each pass over run `i` with `seed + i` (several runs only).
    pub seed: i64,
    /// Instances whose stem outputs a step may keep from the first pass to the second.
    pub stem_cache: i64,
}

/// One training step: back-propagates the batch's loss into the model's variables (whose
/// gradients the caller zeroes before and applies after) and returns the bags' rows (without a
/// graph) and the loss terms. With one run this is a plain forward and backward pass.
pub fn step(model: &dyn MilModel, chunks: &Chunks, targets: &Targets, schedule: Schedule) -> (PerBag, Terms) {
    let forward = |batch: &Batch| tch::autocast(chunks.bf16, || model.per_bag(batch, schedule));
    let runs = plan(chunks.lengths, chunks.budget);
    if let [run] = runs.as_slice() {
        let rows = forward(&(chunks.batch)(run.clone()));
        let terms = tch::autocast(chunks.bf16, || model.loss(&rows, targets, schedule));
        terms.total.backward();
        return (detached(&rows), terms);
    }
    // 1. The rows of every run, without a graph but for the largest run's (the first of equals),
    //    which is kept so that it need not run again; and the stem outputs of the other runs, in
    //    order, while they fit in the cache.
    let seeded = |i: usize, batch: &Batch| {
        tch::manual_seed(chunks.seed + i as i64);
        forward(batch)
    };
    let largest = kept(&runs, chunks.lengths);
    let keep_stem = stems_kept(&runs, chunks.lengths, largest, chunks.stem_cache);
    let mut stems: Vec<Option<Tensor>> = runs.iter().map(|_| None).collect();
    let mut parts: Vec<Option<PerBag>> = Vec::with_capacity(runs.len());
    {
        let _no_graph = tch::no_grad_guard();
        for (i, run) in runs.iter().enumerate() {
            if i == largest {
                parts.push(None);
                continue;
            }
            let mut batch = (chunks.batch)(run.clone());
            if keep_stem[i] {
                let h = tch::autocast(chunks.bf16, || batch.stem(model.stem()));
                stems[i] = Some(h.shallow_clone());
                batch = batch.with_stem(h);
            }
            parts.push(Some(seeded(i, &batch)));
        }
    }
    let kept = seeded(largest, &(chunks.batch)(runs[largest].clone()));
    parts[largest] = Some(detached(&kept));
    let parts: Vec<PerBag> = parts.into_iter().map(|p| p.expect("every run's rows")).collect();
    let leaves: Vec<Tensor> = PerBag::cat(&parts).tensors().into_iter().map(|t| t.set_requires_grad(true)).collect();
    drop(parts);
    // 2. The loss and its gradient with respect to the rows.
    let rows = PerBag::from_tensors(leaves.iter().map(Tensor::shallow_clone).collect());
    let terms = tch::autocast(chunks.bf16, || model.loss(&rows, targets, schedule));
    terms.total.backward();
    let grads: Vec<Option<Tensor>> = leaves.iter().map(|l| Some(l.grad()).filter(Tensor::defined)).collect();
    // 3. Each run's rows back-propagate their share of those gradients: the largest run's
    //    through the graph kept, the others' through a second pass with a graph, from their
    //    stem outputs where those were kept.
    let back = |part: PerBag, run: &Range<usize>| {
        let (start, len) = (run.start as i64, run.len() as i64);
        let surrogate = part
            .tensors()
            .into_iter()
            .zip(&grads)
            .filter_map(|(t, g)| g.as_ref().map(|g| (t * g.narrow(0, start, len)).sum(Kind::Float)))
            .reduce(|a, b| a + b);
        if let Some(s) = surrogate {
            s.backward();
        }
    };
    back(kept, &runs[largest]);
    for i in (0..runs.len()).filter(|&i| i != largest) {
        let batch = (chunks.batch)(runs[i].clone());
        match stems[i].take() {
            None => back(seeded(i, &batch), &runs[i]),
            Some(h) => {
                let x = batch.x.shallow_clone();
                let h = h.set_requires_grad(true);
                back(seeded(i, &batch.with_stem(h.shallow_clone())), &runs[i]);
                let grad = h.grad();
                if grad.defined() {
                    stem_backward(model.stem(), &x, &h, &grad, chunks.bf16);
                }
            }
        }
    }
    (detached(&rows), detach_terms(terms))
}

/// Back-propagates `grad`, the gradient at the stem output `h = relu(layer x)`, into the
/// layer's variables as its own backward pass would: `(grad ⊙ [h > 0])ᵀ x` and the column sums,
/// through a surrogate whose gradients they are.
fn stem_backward(layer: &nn::Linear, x: &Tensor, h: &Tensor, grad: &Tensor, bf16: bool) {
    let (dw, db) = {
        let _no_graph = tch::no_grad_guard();
        // relu's own backward: one pass, no mask tensor.
        let g = h.threshold_backward(grad, 0.0);
        let dw = tch::autocast(bf16, || g.tr().matmul(x));
        (dw.to_kind(layer.ws.kind()), g.sum_dim_intlist([0].as_slice(), false, layer.ws.kind()))
    };
    let weight = (&layer.ws * dw).sum(Kind::Float);
    match &layer.bs {
        Some(b) => (weight + (b * db).sum(Kind::Float)).backward(),
        None => weight.backward(),
    }
}

fn detached(rows: &PerBag) -> PerBag {
    PerBag::from_tensors(rows.tensors().into_iter().map(Tensor::detach).collect())
}

fn detach_terms(t: Terms) -> Terms {
    Terms {
        total: t.total.detach(),
        named: t.named.into_iter().map(|(n, v)| (n, v.detach())).collect(),
        schedule: t.schedule,
    }
}

#[cfg(test)]
mod tests {
    use schemas::workflow::{Loss, ModelKind};
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Kind};

    use super::*;
    use crate::{Config, Dims};

    #[test]
    fn runs_fill_the_budget_a_large_bag_runs_alone_and_the_largest_keeps_its_graph() {
        assert_eq!(plan(&[3, 4, 2, 9, 1, 1], 7), vec![0..2, 2..3, 3..4, 4..6]);
        // The 9-instance bag keeps its graph; the other 11 instances run forward twice, the
        // first 7 (not the next 2, nor the last 2) from their stem outputs when 8 of those may
        // be kept, and the next 2 as well when 10 may.
        assert_eq!(recomputed(&[3, 4, 2, 9, 1, 1], 7, 0), Recomputed { instances: 11, past_stem: 0 });
        assert_eq!(recomputed(&[3, 4, 2, 9, 1, 1], 7, 8), Recomputed { instances: 11, past_stem: 7 });
        assert_eq!(recomputed(&[3, 4, 2, 9, 1, 1], 7, 10), Recomputed { instances: 11, past_stem: 9 });
        assert_eq!(recomputed(&[3, 4, 2], 9, 10), Recomputed::default());
        let steps = [recomputed(&[3, 4, 2, 9, 1, 1], 7, 8), recomputed(&[3, 4, 2, 9, 1, 1], 7, 10)];
        assert_eq!(steps.into_iter().sum::<Recomputed>(), Recomputed { instances: 22, past_stem: 16 });
        // Of equal runs the first keeps its graph.
        assert_eq!(kept(&plan(&[2, 1, 1, 2], 2), &[2, 1, 1, 2]), 0);
        assert_eq!(plan(&[3, 4], 100), vec![0..2]);
        assert_eq!(plan(&[], 5), Vec::<Range<usize>>::new());
    }

    /// Every variable of a model after one SGD step over a batch of seven bags, run in runs of
    /// at most `budget` instances; by [`step`] (keeping the stem outputs of up to `stem_cache`
    /// instances), or by the `reference`: every run forward with a graph (seeded as `step` seeds
    /// it), their rows joined, and one backward pass.
    fn after_one_step(
        model: ModelKind,
        dropout: f64,
        budget: i64,
        stem_cache: i64,
        reference: bool,
    ) -> Vec<(String, Tensor)> {
        let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        let config = Config {
            model,
            dims: Dims { input: 12, n_coarse: 3, n_fine: 7 },
            fine_to_coarse: vec![0, 0, 0, 1, 1, 2, 2],
            dropout,
            loss: Loss::default(),
            align_weight: 0.5,
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let net = crate::build(&vs.root(), &config);
        // Weights and features from a fixed sequence, not from the global generator.
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (_, v)) in vars.iter_mut().enumerate() {
            let _no_graph = tch::no_grad_guard();
            let scale = if v.dim() > 1 { (1.0 / v.size()[1] as f64).sqrt() } else { 0.1 };
            v.copy_(&(wave(v.numel() as i64, i as f64).view(v.size().as_slice()) * scale));
        }
        let mut opt = nn::Sgd::default().build(&vs, 0.5).unwrap();
        let lengths = vec![5i64, 9, 3, 12, 7, 4, 6];
        let x = wave(lengths.iter().sum::<i64>() * 12, 7.0).view([-1, 12]).relu();
        let starts: Vec<i64> = lengths.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
        let batch = |run: Range<usize>| {
            let rows = starts[run.start]..starts[run.end - 1] + lengths[run.end - 1];
            Batch::new(x.narrow(0, rows.start, rows.end - rows.start), lengths[run].to_vec())
        };
        let fine = Tensor::from_slice(&[0i64, 3, 3, 5, 0, 6, 1]);
        let coarse = Tensor::from_slice(&[0i64, 1, 1, 2, 0, 2, 0]);
        let targets = Targets { coarse: &coarse, fine: &fine, class_weights: None };
        let runs = plan(&lengths, budget);
        let chunks = Chunks { lengths: &lengths, budget, batch: &batch, bf16: false, seed: 99, stem_cache };
        let at = Schedule { epoch: 4, epochs: 10 };
        opt.zero_grad();
        if reference {
            let parts: Vec<PerBag> = runs
                .iter()
                .enumerate()
                .map(|(i, run)| {
                    tch::manual_seed(99 + i as i64);
                    net.per_bag(&batch(run.clone()), at)
                })
                .collect();
            net.loss(&PerBag::cat(&parts), &targets, at).total.backward();
        } else {
            let (rows, terms) = step(&*net, &chunks, &targets, at);
            assert_eq!(rows.fine_logits.size(), [7, 7]);
            assert!(terms.total.double_value(&[]).is_finite());
        }
        opt.step();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// `n` values in [−1.7, 1.7] that look random enough: sines of a scrambled index.
    fn wave(n: i64, phase: f64) -> Tensor {
        (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 12.9898 + phase * 78.233).sin().to_kind(Kind::Float) * 1.7
    }

    fn max_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> (f64, String) {
        a.iter()
            .zip(b)
            .map(|((name, x), (_, y))| ((x - y).abs().max().double_value(&[]), name.clone()))
            .fold((0.0, String::new()), |m, d| if d.0 > m.0 { d } else { m })
    }

    #[test]
    fn chunked_steps_give_the_parameters_of_one_pass() {
        // Every model, and HMIL with every loss term on (the contrastive term couples the bags;
        // alignment reads per-instance attention); with no stem output kept, those of the runs
        // that fit in 16 instances, and all.
        for model in [ModelKind::Hmil, ModelKind::Abmil, ModelKind::Meanpool, ModelKind::Transmil] {
            let whole = after_one_step(model, 0.0, 1000, 0, false);
            for budget in [1, 12, 20] {
                for cache in [0, 16, i64::MAX] {
                    let (diff, name) = max_difference(&whole, &after_one_step(model, 0.0, budget, cache, false));
                    assert!(
                        diff < 1e-6,
                        "{}: runs of {budget} instances, {cache} stems kept, move {name} by {diff} more",
                        model.name()
                    );
                }
            }
        }
    }

    #[test]
    fn with_dropout_the_second_pass_sees_the_masks_of_the_first() {
        // Each run draws its own masks (so they depend on the runs); the step's gradient is that
        // of the masks its rows were computed with: one backward pass through the same runs.
        for model in [ModelKind::Hmil, ModelKind::Abmil] {
            for (budget, cache) in [(1, 0), (12, 0), (12, i64::MAX)] {
                let chunked = after_one_step(model, 0.4, budget, cache, false);
                let (diff, name) = max_difference(&chunked, &after_one_step(model, 0.4, budget, 0, true));
                assert!(diff < 1e-6, "runs of {budget}: {name} differs by {diff} from one pass with the same masks");
            }
        }
        let (diff, _) = max_difference(
            &after_one_step(ModelKind::Hmil, 0.4, 1, 0, false),
            &after_one_step(ModelKind::Hmil, 0.0, 1, 0, false),
        );
        assert!(diff > 1e-3, "dropout is on");
    }
}
