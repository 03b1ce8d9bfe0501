//! Mean pooling: a classifier of the mean of a bag's embedded instances, on the fine classes.
//! The baseline that tells whether attention helps at all. Parameters: `fc.0` embeds,
//! `classifier` classifies.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::ops::{Batch, coarse_from_fine, group_matrix, linear_config, segment_sum};
use crate::{Config, Dims, MilModel, Output};

/// Embedding width.
const EMBED: i64 = 512;

/// The mean-pooling network.
#[derive(Debug)]
pub struct MeanPool {
    pub dims: Dims,
    embed: nn::Linear,
    classifier: nn::Linear,
    dropout: f64,
    groups: Tensor,
}

impl MeanPool {
    /// Creates the network's variables under `p`.
    pub fn new(p: &nn::Path, config: &Config) -> MeanPool {
        let dims = config.dims;
        MeanPool {
            dims,
            embed: nn::linear(p / "fc" / "0", dims.input, EMBED, linear_config()),
            classifier: nn::linear(p / "classifier", EMBED, dims.n_fine, linear_config()),
            dropout: config.dropout,
            groups: group_matrix(&config.fine_to_coarse, dims.n_coarse, p.device()),
        }
    }
}

impl MilModel for MeanPool {
    fn stem(&self) -> &nn::Linear {
        &self.embed
    }

    fn forward(&self, batch: &Batch, train: bool) -> Output {
        let (seg, bags) = (&batch.seg, batch.bags());
        let h = batch.stem(&self.embed).dropout(self.dropout, train);
        // Each instance weighs 1/n of its bag.
        let lengths = Tensor::from_slice(&batch.lengths).to_device(h.device()).to_kind(Kind::Float);
        let weight = lengths.index_select(0, seg).reciprocal().unsqueeze(1);
        let fine_logits = self.classifier.forward(&segment_sum(&(&h * &weight), seg, bags));
        Output {
            coarse_logits: coarse_from_fine(&fine_logits, &self.groups),
            fine_logits,
            attention: None,
            scores: None,
        }
    }
}
