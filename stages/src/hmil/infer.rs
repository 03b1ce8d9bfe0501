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

/// Evaluates `bags` in batches of `batch_size` (no gradients, no dropout), keeping the `top_k`
/// most attended instances per class.
pub fn predict(model: &Hmil, store: &Store, bags: &[Bag], batch_size: usize, top_k: usize) -> Vec<BagPrediction> {
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
            out.push(BagPrediction { coarse_probs: coarse[i].clone(), fine_probs: fine[i].clone(), top_attention });
            start += len;
        }
    }
    out
}
