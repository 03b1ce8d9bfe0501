//! Running a trained network over bags: class probabilities and the most attended instances.

use models::{MilModel, Output};
use tch::{Kind, Tensor};

use super::data::{Bag, Store};

/// What the network says about one bag.
#[derive(Debug, Clone)]
pub struct BagPrediction {
    pub coarse_probs: Vec<f64>,
    pub fine_probs: Vec<f64>,
    /// Per level (0 coarse, 1 fine) and class: the top instances as (index in bag, attention).
    pub top_attention: [Vec<Vec<(usize, f64)>>; 2],
    /// Per fine class: see [`hierarchy_agreement`].
    pub agreement: Vec<f64>,
}

impl BagPrediction {
    /// Coarse probabilities obtained by summing fine probabilities over each coarse group.
    pub fn coarse_from_fine(&self, fine_to_coarse: &[usize]) -> Vec<f64> {
        let mut out = vec![0.0; self.coarse_probs.len()];
        for (f, &c) in fine_to_coarse.iter().enumerate() {
            out[c] += self.fine_probs[f];
        }
        out
    }
}

/// Index of the largest value.
pub fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// A B × C tensor's rows, as doubles on the CPU.
pub fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let size = t.size();
    let flat: Vec<f64> = Vec::try_from(t.contiguous().view([-1])).expect("double tensor");
    flat.chunks(size[1] as usize).map(<[f64]>::to_vec).collect()
}

/// Per fine class, the cosine between its attention over a bag's instances and its coarse class's
/// (`fine_to_coarse`): 1 when the fine evidence sits on the same instances, in the same
/// proportions, as the coarse evidence; 0 when they share none. `coarse` and `fine` hold one row
/// per instance, one column per class.
pub fn hierarchy_agreement(coarse: &[Vec<f64>], fine: &[Vec<f64>], fine_to_coarse: &[usize]) -> Vec<f64> {
    fine_to_coarse
        .iter()
        .enumerate()
        .map(|(f, &c)| {
            let (mut dot, mut ff, mut cc) = (0.0, 0.0, 0.0);
            for (a, b) in fine.iter().zip(coarse) {
                dot += a[f] * b[c];
                ff += a[f] * a[f];
                cc += b[c] * b[c];
            }
            if ff > 0.0 && cc > 0.0 { dot / (ff.sqrt() * cc.sqrt()) } else { f64::NAN }
        })
        .collect()
}

/// What the network says about one bag, instance by instance.
pub struct BagOutput<'a> {
    pub coarse_probs: &'a [f64],
    pub fine_probs: &'a [f64],
    /// Per level (0 coarse, 1 fine): one row per instance, one column per class.
    pub attention: Option<[&'a [Vec<f64>]; 2]>,
    /// Per level: each instance's classifier score (see [`evidence`]); HMIL's alone.
    pub scores: Option<[&'a [f64]; 2]>,
}

impl BagOutput<'_> {
    /// Per level: one row per instance, one column per class; see [`evidence`]. `None` for a
    /// model without per-instance scores.
    pub fn evidence(&self) -> Option<[Vec<Vec<f64>>; 2]> {
        let (attention, scores) = (self.attention?, self.scores?);
        Some([0, 1].map(|level| evidence(attention[level], scores[level])))
    }
}

/// Each instance's share of each class's logit above the mean of the classes' logits. A class's
/// logit is `Σ_i a_ik·s_i + b`: attention `a_ik` weighting one classifier score `s_i` shared by
/// every class. So attention says where a class's logit reads, not whether what it reads there
/// raises or lowers it: a class may attend most to the instances that argue against it. The
/// share `e_ik = (a_ik − ā_i)(s_i − s̄)`, with `ā_i` the instance's mean attention over classes and
/// `s̄` the mean score over the bag, sums over instances to exactly `logit_k − mean_j logit_j`
/// (the bias cancels), and is positive where the instance moves the model towards class `k`.
/// `attention` holds one row per instance, one column per class.
pub fn evidence(attention: &[Vec<f64>], scores: &[f64]) -> Vec<Vec<f64>> {
    let n = scores.len().max(1) as f64;
    let mean_score = scores.iter().sum::<f64>() / n;
    attention
        .iter()
        .zip(scores)
        .map(|(row, &s)| {
            let mean = row.iter().sum::<f64>() / row.len().max(1) as f64;
            row.iter().map(|&a| (a - mean) * (s - mean_score)).collect()
        })
        .collect()
}

/// Runs the network over `bags` in batches of `batch_size` (no gradients, no dropout) and hands
/// `each` every bag's index and output.
pub fn forward_bags(
    model: &dyn MilModel,
    store: &Store,
    bags: &[Bag],
    batch_size: usize,
    mut each: impl FnMut(usize, BagOutput),
) {
    let _guard = tch::no_grad_guard();
    let mut done = 0;
    for chunk in bags.chunks(batch_size.max(1)) {
        let refs: Vec<&Bag> = chunk.iter().collect();
        let batch = store.batch(&refs);
        bag_outputs(&model.forward(&batch, false), &batch.lengths, |i, out| each(done + i, out));
        done += chunk.len();
    }
}

/// Hands `each` the output of every bag of a forward pass over bags of `lengths` instances.
pub fn bag_outputs(o: &Output, lengths: &[i64], mut each: impl FnMut(usize, BagOutput)) {
    let coarse = rows(&o.coarse_logits.softmax(-1, Kind::Float));
    let fine = rows(&o.fine_logits.softmax(-1, Kind::Float));
    let attention = o.attention.as_ref().map(|a| a.each_ref().map(rows));
    let scores = o.scores.as_ref().map(|s| s.each_ref().map(column));
    let mut start = 0;
    for (i, &len) in lengths.iter().enumerate() {
        let range = start..start + len as usize;
        each(
            i,
            BagOutput {
                coarse_probs: &coarse[i],
                fine_probs: &fine[i],
                attention: attention.as_ref().map(|a| [&a[0][range.clone()], &a[1][range.clone()]]),
                scores: scores.as_ref().map(|s| [&s[0][range.clone()], &s[1][range]]),
            },
        );
        start += len as usize;
    }
}

/// A T × 1 tensor's values.
fn column(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).to_device(tch::Device::Cpu).contiguous().view([-1])).expect("double tensor")
}

/// Instances sorted by `value` of each, highest first (ties by instance), cut to `top_k`.
pub fn ranked(values: impl Iterator<Item = f64>, top_k: usize) -> Vec<(usize, f64)> {
    let mut idx: Vec<(usize, f64)> = values.enumerate().collect();
    idx.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    idx.truncate(top_k);
    idx
}

/// Evaluates `bags` in batches of `batch_size` (no gradients, no dropout), keeping the `top_k`
/// most attended instances per class and each fine class's agreement with its coarse class.
pub fn predict(
    model: &dyn MilModel,
    store: &Store,
    bags: &[Bag],
    batch_size: usize,
    top_k: usize,
    fine_to_coarse: &[usize],
) -> Vec<BagPrediction> {
    let mut out = Vec::with_capacity(bags.len());
    forward_bags(model, store, bags, batch_size, |_, o| {
        // A model without attention has no top instances and no agreement to report.
        let top_attention = [0, 1].map(|level| match o.attention {
            Some(a) => {
                let a = a[level];
                (0..a.first().map_or(0, Vec::len)).map(|class| ranked(a.iter().map(|r| r[class]), top_k)).collect()
            }
            None => Vec::new(),
        });
        out.push(BagPrediction {
            coarse_probs: o.coarse_probs.to_vec(),
            fine_probs: o.fine_probs.to_vec(),
            top_attention,
            agreement: o.attention.map_or_else(Vec::new, |a| hierarchy_agreement(a[0], a[1], fine_to_coarse)),
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::hmil::checkpoint::{Loaded, load};
    use crate::hmil::train::Classes;

    /// The PyTorch HMIL of `tests/fixtures/hmil` and its two-bag batch.
    fn hmil_fixture() -> (Loaded, models::Batch) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hmil");
        let names = |n: usize| (0..n).map(|i| i.to_string()).collect();
        let classes = Classes { coarse: names(3), fine: names(7), fine_to_coarse: vec![0, 0, 0, 1, 1, 2, 2] };
        let model = load(&dir.join("state_dict.safetensors"), &classes, 16, tch::Device::Cpu).unwrap();
        let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let get = |n: &str| expected.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let lengths = Vec::try_from(get("seg").bincount::<Tensor>(None, 2)).unwrap();
        (model, models::Batch::new(get("x"), lengths))
    }

    #[test]
    fn evidence_sums_to_each_logit_above_the_mean_logit() {
        // The PyTorch fixture's two bags: each class's evidence, summed over the bag's
        // instances, is its logit minus the mean of the bag's logits.
        let (model, batch) = hmil_fixture();
        let out = model.net.forward(&batch, false);
        let attention = out.attention.as_ref().expect("HMIL attends").each_ref().map(rows);
        let scores = out.scores.as_ref().expect("HMIL's scores").each_ref().map(column);
        let logits = [rows(&out.coarse_logits), rows(&out.fine_logits)];
        let mut start = 0;
        for (bag, &len) in batch.lengths.iter().enumerate() {
            let range = start..start + len as usize;
            for level in 0..2 {
                let e = evidence(&attention[level][range.clone()], &scores[level][range.clone()]);
                let l = &logits[level][bag];
                let mean = l.iter().sum::<f64>() / l.len() as f64;
                for (class, logit) in l.iter().enumerate() {
                    let total: f64 = e.iter().map(|r| r[class]).sum();
                    assert!((total - (logit - mean)).abs() < 1e-5, "bag {bag} level {level} class {class}");
                }
            }
            start += len as usize;
        }
        // An instance the class attends to more than the others do, scoring above the bag's
        // mean, argues for it; one it attends to more but scoring below, against it.
        let e = evidence(&[vec![0.6, 0.2], vec![0.3, 0.3], vec![0.1, 0.5]], &[2.0, 1.0, 0.0]);
        assert!(e[0][0] > 0.0 && e[0][1] < 0.0 && e[1][0] == 0.0 && e[2][1] < 0.0 && e[2][0] > 0.0, "{e:?}");
    }

    #[test]
    fn agreement_is_the_cosine_of_fine_and_coarse_attention() {
        // Three instances; coarse class 0 attends to the first two, class 1 to the third.
        let coarse = vec![vec![0.5, 0.0], vec![0.5, 0.0], vec![0.0, 1.0]];
        // Fine 0 (under coarse 0) on the first two alike; fine 1 (under coarse 0) on the third;
        // fine 2 (under coarse 1) on the first alone.
        let fine = vec![vec![0.5, 0.0, 1.0], vec![0.5, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
        let a = hierarchy_agreement(&coarse, &fine, &[0, 0, 1]);
        assert!((a[0] - 1.0).abs() < 1e-12 && a[1].abs() < 1e-12 && a[2].abs() < 1e-12, "{a:?}");
        let half = hierarchy_agreement(&[vec![1.0], vec![1.0]], &[vec![1.0], vec![0.0]], &[0]);
        assert!((half[0] - 0.5f64.sqrt()).abs() < 1e-12, "{half:?}");
    }
}
