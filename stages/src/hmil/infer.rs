//! Running a trained network over bags: class probabilities and the most attended instances.

use tch::{Kind, Tensor};

use super::data::{Bag, Store};
use super::model::Hmil;

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

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
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

/// Evaluates `bags` in batches of `batch_size` (no gradients, no dropout), keeping the `top_k`
/// most attended instances per class and each fine class's agreement with its coarse class.
pub fn predict(
    model: &Hmil,
    store: &Store,
    bags: &[Bag],
    batch_size: usize,
    top_k: usize,
    fine_to_coarse: &[usize],
) -> Vec<BagPrediction> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(bags.len());
    for chunk in bags.chunks(batch_size.max(1)) {
        let refs: Vec<&Bag> = chunk.iter().collect();
        let batch = store.batch(&refs);
        let o = model.forward(&batch, false);
        let coarse = rows(&o.coarse_logits.softmax(-1, Kind::Float));
        let fine = rows(&o.fine_logits.softmax(-1, Kind::Float));
        let attention = [rows(&o.coarse_attention), rows(&o.fine_attention)];
        let mut start = 0;
        for (i, bag) in chunk.iter().enumerate() {
            let len = bag.len as usize;
            let top_attention = [0, 1].map(|level| {
                let a = &attention[level][start..start + len];
                (0..a[0].len())
                    .map(|class| {
                        let mut idx: Vec<(usize, f64)> = a.iter().map(|r| r[class]).enumerate().collect();
                        idx.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
                        idx.truncate(top_k);
                        idx
                    })
                    .collect()
            });
            let rows = |level: usize| &attention[level][start..start + len];
            let agreement = hierarchy_agreement(rows(0), rows(1), fine_to_coarse);
            out.push(BagPrediction {
                coarse_probs: coarse[i].clone(),
                fine_probs: fine[i].clone(),
                top_attention,
                agreement,
            });
            start += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
