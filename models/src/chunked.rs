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
//! than one pass. Of that, the stem (the first layer, the largest product of every model), and
//! the model's product after it where it has one (HMIL's folded layers), are computed once where
//! memory allows: the first pass keeps their outputs of chunks up to a bound (the product's
//! through the activations the model applies to them, which the second pass thus skips too), and
//! the second pass over such a chunk starts from them and back-propagates into those layers by
//! their closed forms. Before both passes over a chunk the random generator is seeded alike, so
//! the second pass draws the dropout masks the first one saw.

use std::ops::Range;

use tch::{Kind, Tensor, nn};

use crate::ops::Joint;
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

/// What a step keeps, between its passes, of the runs it runs twice: room in bytes (4 a float,
/// an upper estimate under bf16), and the floats per instance of the stem outputs and of the
/// outputs of the model's product after them (0 where it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cache {
    /// Room when the step's chunks fill the budget.
    pub bytes: i64,
    pub stem: i64,
    pub product: i64,
    /// Bytes of a chunk's activations per instance, with which a step may trade chunk size for
    /// room (see [`Cache::sized`]); 0: chunks fill the budget.
    pub activation: i64,
    /// The most room a step takes to keep the outputs of all it runs twice.
    pub most: i64,
}

impl Cache {
    /// `bytes` for the outputs of `model`'s stem and product, with chunks that fill the budget.
    pub fn of(model: &dyn MilModel, bytes: i64) -> Cache {
        let _no_graph = tch::no_grad_guard();
        let (stem, product) = (model.stem().ws.size()[0], model.product().map_or(0, |p| p.width()));
        Cache { bytes, stem, product, activation: 0, most: bytes }
    }

    /// The chunk budget and the room of a step over bags of `lengths` under `budget`. Where the
    /// outputs of the instances past one full chunk do not fit in [`Cache::bytes`], the step
    /// runs smaller chunks, down to a quarter of the budget, to keep them in the memory that full
    /// chunks and that room would take: an instance kept costs a few floats, and its second pass
    /// skips the model's largest products. Where even so they do not fit, it keeps them all, up to
    /// [`Cache::most`] bytes: the room grows with the step's instances.
    pub fn sized(self, lengths: &[i64], budget: i64) -> (i64, Cache) {
        let n: i64 = lengths.iter().sum();
        let (kept, active) = (4 * (self.stem + self.product), self.activation);
        if n <= budget || active <= kept || kept.saturating_mul(n - budget) <= self.bytes {
            return (budget, self);
        }
        let total = active.saturating_mul(budget).saturating_add(self.bytes);
        let chunk = ((total - kept * n) / (active - kept)).clamp((budget / 4).max(1), budget);
        let room = (total - active * chunk).max(kept * (n - chunk)).min(self.most.max(self.bytes));
        (chunk, Cache { bytes: room, ..self })
    }
}

/// What a run keeps from the first pass to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    /// Its stem outputs: the second pass starts after the stem.
    Stem,
    /// Those and its product's outputs: the second pass starts after the product.
    Product,
}

/// What each run keeps: the `kept` one (whose graph is kept) nothing; the others their stem
/// outputs, in order, while they fit in the cache, and then, in order, in the room left, their
/// product's outputs as well. The stem goes first: it reads the features, the widest input.
fn keeps(runs: &[Range<usize>], lengths: &[i64], kept: usize, cache: Cache) -> Vec<Keep> {
    let size = |i: usize| lengths[runs[i].clone()].iter().sum::<i64>();
    let mut room = cache.bytes;
    let mut keeps: Vec<Keep> = (0..runs.len())
        .map(|i| {
            let bytes = 4 * cache.stem * size(i);
            if i != kept && bytes <= room {
                room -= bytes;
                Keep::Stem
            } else {
                Keep::Nothing
            }
        })
        .collect();
    if cache.product > 0 {
        for (i, keep) in keeps.iter_mut().enumerate() {
            let bytes = 4 * cache.product * size(i);
            if *keep == Keep::Stem && bytes <= room {
                room -= bytes;
                *keep = Keep::Product;
            }
        }
    }
    keeps
}

/// What a step's second pass runs again, in instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recomputed {
    /// Instances run forward twice: all but the kept run's, none when the step is one run.
    pub instances: i64,
    /// Of those, the ones whose second pass starts from their kept stem outputs.
    pub past_stem: i64,
    /// Of those, the ones whose second pass starts from their kept product outputs.
    pub past_product: i64,
}

impl std::iter::Sum for Recomputed {
    fn sum<I: Iterator<Item = Recomputed>>(steps: I) -> Recomputed {
        steps.fold(Recomputed::default(), |a, b| Recomputed {
            instances: a.instances + b.instances,
            past_stem: a.past_stem + b.past_stem,
            past_product: a.past_product + b.past_product,
        })
    }
}

/// What a step over bags of `lengths` under `budget`, keeping what fits in `cache`, runs
/// forward twice.
pub fn recomputed(lengths: &[i64], budget: i64, cache: Cache) -> Recomputed {
    let (budget, cache) = cache.sized(lengths, budget);
    let runs = plan(lengths, budget);
    if runs.len() < 2 {
        return Recomputed::default();
    }
    let largest = kept(&runs, lengths);
    let size = |i: usize| lengths[runs[i].clone()].iter().sum::<i64>();
    let keeps = keeps(&runs, lengths, largest, cache);
    let past = |of: &dyn Fn(Keep) -> bool| (0..runs.len()).filter(|&i| of(keeps[i])).map(size).sum();
    Recomputed {
        instances: lengths.iter().sum::<i64>() - size(largest),
        past_stem: past(&|k| k != Keep::Nothing),
        past_product: past(&|k| k == Keep::Product),
    }
}

/// How a step runs: its chunks of bags and what they are made of.
pub struct Chunks<'a> {
    /// Instances of each bag of the batch, in order.
    pub lengths: &'a [i64],
    /// Instances a chunk may hold (see [`plan`]); a step may run smaller ones to keep more (see
    /// [`Cache::sized`]).
    pub budget: i64,
    /// The batch of a run of bags (called twice per run but the largest when there are several).
    pub batch: &'a dyn Fn(Range<usize>) -> Batch,
    /// Mixed precision (bf16 autocast) for the forward passes.
    pub bf16: bool,
    /// Seeds the random generator before each pass over run `i` with `seed + i` (several runs only).
    pub seed: i64,
    /// What a step may keep from the first pass to the second.
    pub cache: Cache,
}

/// One training step: back-propagates the batch's loss into the model's variables (whose
/// gradients the caller zeroes before and applies after) and returns the bags' rows (without a
/// graph) and the loss terms. With one run this is a plain forward and backward pass.
pub fn step(model: &dyn MilModel, chunks: &Chunks, targets: &Targets, schedule: Schedule) -> (PerBag, Terms) {
    let forward = |batch: &Batch| tch::autocast(chunks.bf16, || model.per_bag(batch, schedule));
    let (budget, cache) = chunks.cache.sized(chunks.lengths, chunks.budget);
    let runs = plan(chunks.lengths, budget);
    if let [run] = runs.as_slice() {
        let rows = forward(&(chunks.batch)(run.clone()));
        let terms = tch::autocast(chunks.bf16, || model.loss(&rows, targets, schedule));
        terms.total.backward();
        return (detached(&rows), terms);
    }
    // 1. The rows of every run, without a graph but for the largest run's (the first of equals),
    //    which is kept so that it need not run again; and the stem (and product) outputs of the
    //    other runs, as they fit in the cache.
    let seeded = |i: usize, batch: &Batch| {
        tch::manual_seed(chunks.seed + i as i64);
        forward(batch)
    };
    let largest = kept(&runs, chunks.lengths);
    let keeps = keeps(&runs, chunks.lengths, largest, cache);
    let mut saved: Vec<Option<Saved>> = runs.iter().map(|_| None).collect();
    let mut parts: Vec<Option<PerBag>> = Vec::with_capacity(runs.len());
    // The product without a graph, for the runs that keep its outputs.
    let product = {
        let _no_graph = tch::no_grad_guard();
        keeps.contains(&Keep::Product).then(|| model.product()).flatten()
    };
    {
        let _no_graph = tch::no_grad_guard();
        for (i, run) in runs.iter().enumerate() {
            if i == largest {
                parts.push(None);
                continue;
            }
            let mut batch = (chunks.batch)(run.clone());
            if keeps[i] != Keep::Nothing {
                let h = tch::autocast(chunks.bf16, || batch.stem(model.stem()));
                let z = match (keeps[i], &product) {
                    (Keep::Product, Some(p)) => Some(p.activate(tch::autocast(chunks.bf16, || p.forward(&h)))),
                    _ => None,
                };
                saved[i] = Some(Saved { stem: h.shallow_clone(), product: z.as_ref().map(Tensor::shallow_clone) });
                batch = batch.with_stem(h);
                if let Some(z) = z {
                    batch = batch.with_product(z);
                }
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
    //    kept outputs where there are some; past those, by the layers' closed forms.
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
    let mut product_grads = ProductGrads::default();
    for i in (0..runs.len()).filter(|&i| i != largest) {
        let batch = (chunks.batch)(runs[i].clone());
        let Some(Saved { stem, product: z }) = saved[i].take() else {
            back(seeded(i, &batch), &runs[i]);
            continue;
        };
        let x = batch.x.shallow_clone();
        let h = stem.set_requires_grad(true);
        let z = z.map(|z| z.set_requires_grad(true));
        let mut batch = batch.with_stem(h.shallow_clone());
        if let Some(z) = &z {
            batch = batch.with_product(z.shallow_clone());
        }
        back(seeded(i, &batch), &runs[i]);
        let mut grad = h.grad();
        if let (Some(z), Some(p)) = (&z, &product) {
            // The gradient at the activated outputs, made in place the one at the product's.
            let into_y = z.grad();
            if into_y.defined() {
                p.activation_backward(z, &into_y);
            }
            let into_h = product_grads.add(p, &h, &into_y, chunks.bf16);
            grad = match (grad.defined(), into_h) {
                (_, None) => grad,
                (false, Some(g)) => g,
                (true, Some(g)) => grad + g,
            };
        }
        if grad.defined() {
            stem_backward(model.stem(), &x, &h, &grad, chunks.bf16);
        }
    }
    product_grads.backward(model);
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

/// The outputs a run keeps from the first pass to the second.
struct Saved {
    stem: Tensor,
    product: Option<Tensor>,
}

/// The gradients of the model's product's weight and bias over the runs that kept its outputs.
#[derive(Default)]
struct ProductGrads(Option<(Tensor, Tensor)>);

impl ProductGrads {
    /// Adds a run's: `grad` at the outputs of `product` on `h` gives `gradᵀ h` and the column sums;
    /// returns the gradient at `h`, `grad · W`, as the product's own backward pass would.
    fn add(&mut self, product: &Joint, h: &Tensor, grad: &Tensor, bf16: bool) -> Option<Tensor> {
        if !grad.defined() {
            return None;
        }
        let _no_graph = tch::no_grad_guard();
        let dw = tch::autocast(bf16, || grad.tr().matmul(h)).to_kind(Kind::Float);
        let db = grad.sum_dim_intlist([0].as_slice(), false, Kind::Float);
        self.0 = Some(match self.0.take() {
            None => (dw, db),
            Some((w, b)) => (w + dw, b + db),
        });
        Some(tch::autocast(bf16, || grad.matmul(&product.weight)))
    }

    /// Back-propagates the sums into the variables the product is made of, through a surrogate
    /// whose gradients they are.
    fn backward(self, model: &dyn MilModel) {
        let (Some((dw, db)), Some(p)) = (self.0, model.product()) else { return };
        ((&p.weight * dw).sum(Kind::Float) + (&p.bias * db).sum(Kind::Float)).backward();
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
        // be kept, and the next 2 as well when 10 may. Stem outputs of 1 float, products of 2.
        let cache = |stems: i64, products: i64| Cache {
            bytes: 4 * (stems + 2 * products),
            stem: 1,
            product: 2,
            activation: 0,
            most: 0,
        };
        let twice = |past_stem, past_product| Recomputed { instances: 11, past_stem, past_product };
        let lengths = [3, 4, 2, 9, 1, 1];
        assert_eq!(recomputed(&lengths, 7, cache(0, 0)), twice(0, 0));
        assert_eq!(recomputed(&lengths, 7, cache(8, 0)), twice(7, 0));
        assert_eq!(recomputed(&lengths, 7, cache(10, 0)), twice(9, 0));
        // Every stem first, then products in order, in the room left: the first 7 instances'
        // when 7 fit; when 4 do, not those but the next two runs' (2 each).
        assert_eq!(recomputed(&lengths, 7, cache(11, 7)), twice(11, 7));
        assert_eq!(recomputed(&lengths, 7, cache(11, 4)), twice(11, 4));
        assert_eq!(recomputed(&lengths, 7, Cache { product: 0, ..cache(11, 7) }), twice(11, 0));
        assert_eq!(recomputed(&[3, 4, 2], 9, cache(10, 10)), Recomputed::default());
        let steps = [recomputed(&lengths, 7, cache(8, 0)), recomputed(&lengths, 7, cache(11, 7))];
        assert_eq!(steps.into_iter().sum::<Recomputed>(), Recomputed { instances: 22, past_stem: 18, past_product: 7 });
        // Of equal runs the first keeps its graph.
        assert_eq!(kept(&plan(&[2, 1, 1, 2], 2), &[2, 1, 1, 2]), 0);
        assert_eq!(plan(&[3, 4], 100), vec![0..2]);
        assert_eq!(plan(&[], 5), Vec::<Range<usize>>::new());
    }

    #[test]
    fn a_large_step_runs_smaller_chunks_to_keep_more_then_keeps_all() {
        // Kept outputs of 3 floats (12 bytes) an instance against 40 bytes of activations;
        // chunks of 10 instances and room for 2 instances' outputs: 424 bytes in all.
        let cache = Cache { bytes: 24, stem: 1, product: 2, activation: 40, most: 1000 };
        // Within one chunk, or with what the rest keeps fitting in the room: as it was.
        assert_eq!(cache.sized(&[4, 6], 10), (10, cache));
        assert_eq!(cache.sized(&[6, 6], 10), (10, cache));
        // 16 instances: chunks of 8, whose 320 bytes leave 104 for the other 8 (96).
        let (chunk, room) = cache.sized(&[4, 4, 4, 4], 10);
        assert_eq!((chunk, room.bytes), (8, 104));
        assert_eq!(recomputed(&[4, 4, 4, 4], 10, cache), Recomputed { instances: 8, past_stem: 8, past_product: 8 });
        // 40 instances: chunks of a quarter of the budget, and all the rest kept, up to `most`.
        assert_eq!(cache.sized(&[4; 10], 10).0, 2);
        assert_eq!(cache.sized(&[4; 10], 10).1.bytes, 12 * 38);
        assert_eq!(Cache { most: 300, ..cache }.sized(&[4; 10], 10).1.bytes, 300);
        // Without activations to trade, chunks fill the budget.
        let fixed = Cache { activation: 0, ..cache };
        assert_eq!(fixed.sized(&[4; 10], 10), (10, fixed));
    }

    /// The instances of the seven bags of [`after_one_step`].
    const LENGTHS: [i64; 7] = [5, 9, 3, 12, 7, 4, 6];

    /// Every variable of a model after one SGD step over a batch of seven bags, run in runs of
    /// at most `budget` instances; by [`step`] (keeping what fits in `cache_bytes`), or by the
    /// `reference`: every run forward with a graph (seeded as `step` seeds
    /// it), their rows joined, and one backward pass.
    fn after_one_step(
        model: ModelKind,
        dropout: f64,
        budget: i64,
        cache_bytes: i64,
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
        let lengths = LENGTHS.to_vec();
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
        let cache = Cache::of(&*net, cache_bytes);
        let chunks = Chunks { lengths: &lengths, budget, batch: &batch, bf16: false, seed: 99, cache };
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
        // alignment reads per-instance attention); with nothing kept, the stem outputs of the
        // runs that fit in 16 instances', all stem outputs and some of HMIL's product outputs
        // (256 and 776 floats an instance), and all.
        let some = 4 * (256 * 40 + 776 * 8);
        for model in [ModelKind::Hmil, ModelKind::Abmil, ModelKind::Meanpool, ModelKind::Transmil] {
            let whole = after_one_step(model, 0.0, 1000, 0, false);
            for budget in [1, 12, 20] {
                if model == ModelKind::Hmil {
                    let r = recomputed(
                        &LENGTHS,
                        budget,
                        Cache { bytes: some, stem: 256, product: 776, activation: 0, most: 0 },
                    );
                    assert!(r.past_stem == r.instances && 0 < r.past_product && r.past_product < r.instances, "{r:?}");
                }
                for cache in [0, 4 * 256 * 16, some, i64::MAX] {
                    let (diff, name) = max_difference(&whole, &after_one_step(model, 0.0, budget, cache, false));
                    assert!(
                        diff < 1e-6,
                        "{}: runs of {budget} instances, {cache} bytes kept, move {name} by {diff} more",
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
