//! ABMIL (Ilse et al. 2018): one gated attention over a bag's embedded instances and a
//! classifier of the attention-weighted mean, on the fine classes. Parameter names are CLAM's
//! (`CLAM_SB` without its instance-clustering loss is this model): `attention_net.0` embeds,
//! `attention_net.3` attends, `classifiers` classifies.

use tch::Tensor;
use tch::nn::{self, Module};

use crate::ops::{
    Batch, GatedAttention, coarse_from_fine, group_matrix, joint_linear, linear_config, per_class, segment_softmax,
    segment_sum,
};
use crate::{Config, Dims, MilModel, Output};

/// Embedding width and attention width (CLAM's "small" sizes).
const EMBED: i64 = 512;
const ATTENTION: i64 = 256;

/// The ABMIL network.
#[derive(Debug)]
pub struct Abmil {
    pub dims: Dims,
    embed: nn::Linear,
    attention: GatedAttention,
    classifier: nn::Linear,
    dropout: f64,
    groups: Tensor,
}

impl Abmil {
    /// Creates the network's variables under `p`.
    pub fn new(p: &nn::Path, config: &Config) -> Abmil {
        let dims = config.dims;
        let net = p / "attention_net";
        Abmil {
            dims,
            embed: nn::linear(&net / "0", dims.input, EMBED, linear_config()),
            attention: GatedAttention::new(&(&net / "3"), EMBED, ATTENTION, 1),
            classifier: nn::linear(p / "classifiers", EMBED, dims.n_fine, linear_config()),
            dropout: config.dropout,
            groups: group_matrix(&config.fine_to_coarse, dims.n_coarse, p.device()),
        }
    }
}

impl MilModel for Abmil {
    fn stem(&self) -> &nn::Linear {
        &self.embed
    }

    fn forward(&self, batch: &Batch, train: bool) -> Output {
        let (seg, bags) = (&batch.seg, batch.bags());
        let h = batch.stem(&self.embed).dropout(self.dropout, train);
        let [a, b] = joint_linear(&h, [(&self.attention.a, true), (&self.attention.b, true)]);
        let attention = segment_softmax(&self.attention.scores(&a, &b, self.dropout, train), seg, bags);
        let fine_logits = self.classifier.forward(&segment_sum(&(&h * &attention), seg, bags));
        Output {
            coarse_logits: coarse_from_fine(&fine_logits, &self.groups),
            fine_logits,
            attention: Some([per_class(&attention, self.dims.n_coarse), per_class(&attention, self.dims.n_fine)]),
            scores: None,
        }
    }
}
