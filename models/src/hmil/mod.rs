//! HMIL (Jin et al. 2025). A mini-batch of bags is one pass over the concatenated instances:
//! attention is a per-bag segment softmax (scatter max, index_add sums), computed once; class
//! logits are attention-weighted sums of per-instance classifier scores (equal to the classifier
//! applied to the class-wise bag embeddings, without materialising them). The layers that read
//! the same instance features run as one matrix product, so the backward pass computes that
//! input's gradient once instead of summing one per layer; and since the feature extractor's
//! second layer (256 → D) feeds only those layers, it is folded into that product: the
//! extracted features are never formed, and an instance costs about a third of the products.

pub mod loss;

use tch::nn;
use tch::{Device, Tensor};

use crate::ops::{
    Activation, Batch, GatedAttention, Joint, group_matrix, joint_linear, linear_config, segment_softmax, segment_sum,
};
use crate::{Config, Dims, MilModel, Output, PerBag, Schedule, Targets, Terms};

/// Hidden sizes fixed by the published model.
const HIDDEN: i64 = 256;
const FINE_ATTN_HIDDEN: i64 = 64;
/// The hidden sizes (feature extractor and coarse attention, fine attention), as checkpoints record them.
pub const HIDDEN_SIZES: (i64, i64) = (HIDDEN, FINE_ATTN_HIDDEN);

/// The HMIL network; parameter names are those of the published PyTorch model.
#[derive(Debug)]
pub struct Hmil {
    pub dims: Dims,
    fe0: nn::Linear,
    fe2: nn::Linear,
    reducer: nn::Linear,
    coarse_attention: GatedAttention,
    fine_attention: GatedAttention,
    coarse_classifier: nn::Linear,
    fine_classifier: nn::Linear,
    /// Dropout probability after tanh/sigmoid in the attention (0 disables it).
    dropout: f64,
    /// n_f × n_c one-hot fine→coarse map.
    groups: Tensor,
    loss: schemas::workflow::Loss,
    align_weight: f64,
}

/// A forward pass and the reduced instance features (T × 256) the fine bag embeddings are made of.
pub struct Forward {
    pub out: Output,
    h2: Tensor,
}

impl Hmil {
    /// Creates the network's variables under `p`.
    pub fn new(p: &nn::Path, config: &Config) -> Hmil {
        let (dims, d) = (config.dims, config.dims.input);
        Hmil {
            dims,
            fe0: nn::linear(p / "feature_extractor" / "0", d, HIDDEN, linear_config()),
            fe2: nn::linear(p / "feature_extractor" / "2", HIDDEN, d, linear_config()),
            reducer: nn::linear(p / "feature_reducer" / "0", d, HIDDEN, linear_config()),
            coarse_attention: GatedAttention::new(&(p / "coarse_attention" / "0"), d, HIDDEN, dims.n_coarse),
            fine_attention: GatedAttention::new(&(p / "fine_attention" / "0"), HIDDEN, FINE_ATTN_HIDDEN, dims.n_fine),
            coarse_classifier: nn::linear(p / "coarse_classifier", d, 1, linear_config()),
            fine_classifier: nn::linear(p / "fine_classifier", HIDDEN, 1, linear_config()),
            dropout: config.dropout,
            groups: group_matrix(&config.fine_to_coarse, dims.n_coarse, p.device()),
            loss: config.loss,
            align_weight: config.align_weight,
        }
    }

    /// One pass over a batch of bags, keeping what the contrastive loss needs.
    pub fn forward_parts(&self, batch: &Batch, train: bool) -> Forward {
        let (seg, bags) = (&batch.seg, batch.bags());
        // h1 = fe2(relu(fe0 x)) is read only by linear layers, which are folded into fe2: h1
        // (T × D) is never formed. classifier(A·h) = A·(classifier h): each instance's
        // classifier score (without the bias, added once per bag) is weighted by its attention.
        let [h2, tanh, sigmoid, s1] = batch.product(&self.folded(), &self.fe0);
        let coarse = &self.coarse_attention;
        let a1 = segment_softmax(&coarse.gated(&tanh, &sigmoid, self.dropout, train), seg, bags);
        let fine = &self.fine_attention;
        let [a, b, s2] = joint_linear(&h2, [(&fine.a, true), (&fine.b, true), (&self.fine_classifier, false)]);
        let a2 = segment_softmax(&fine.scores(&a, &b, self.dropout, train), seg, bags);
        let coarse_logits = segment_sum(&(&a1 * &s1), seg, bags) + self.coarse_classifier.bs.as_ref().expect("bias");
        let fine_logits = segment_sum(&(&a2 * &s2), seg, bags) + self.fine_classifier.bs.as_ref().expect("bias");
        let out = Output { coarse_logits, fine_logits, attention: Some([a1, a2]), scores: Some([s1, s2]) };
        Forward { out, h2 }
    }

    /// The layers that read the extracted features (the reducer, the coarse attention's gates
    /// with their activations, the coarse classifier without its bias) folded into the
    /// extractor's second layer: one product of the stem output.
    fn folded(&self) -> Joint {
        let coarse = &self.coarse_attention;
        Joint::through(
            &self.fe2,
            &[(&self.reducer, true), (&coarse.a, true), (&coarse.b, true), (&self.coarse_classifier, false)],
        )
        .with_activations([Activation::Identity, Activation::Tanh, Activation::Sigmoid, Activation::Identity])
    }

    /// The device the network's variables are on.
    pub fn device(&self) -> Device {
        self.fe0.ws.device()
    }
}

impl MilModel for Hmil {
    fn stem(&self) -> &nn::Linear {
        &self.fe0
    }

    fn product(&self) -> Option<Joint> {
        Some(self.folded())
    }

    fn forward(&self, batch: &Batch, train: bool) -> Output {
        self.forward_parts(batch, train).out
    }

    /// The logits, then the fine contrastive views when the epoch weighs them, then the
    /// attention agreement when it is weighed.
    fn per_bag(&self, batch: &Batch, schedule: Schedule) -> PerBag {
        let cfg = self.objective(schedule);
        let f = self.forward_parts(batch, true);
        let mut extra = Vec::new();
        if cfg.contrastive > 0.0 {
            extra.push(f.fine_views(&batch.lengths));
        }
        if cfg.align_weight > 0.0 {
            extra.push(loss::attention_agreement(&f.out, &batch.seg, batch.bags(), cfg.groups));
        }
        PerBag { coarse_logits: f.out.coarse_logits, fine_logits: f.out.fine_logits, extra }
    }

    fn loss(&self, bags: &PerBag, targets: &Targets, schedule: Schedule) -> Terms {
        loss::terms(bags, targets, &self.objective(schedule))
    }
}

impl Hmil {
    /// The loss settings of an epoch.
    fn objective(&self, s: Schedule) -> loss::Objective<'_> {
        let (w_coarse, w_con) = loss::weights(self.loss.curriculum, s.epoch, s.epochs);
        loss::Objective {
            coarse_ce: if self.loss.coarse_ce { w_coarse } else { 0.0 },
            regulariser: self.loss.regulariser,
            contrastive: if self.loss.contrastive { w_con } else { 0.0 },
            tau: loss::tau(s.epoch, s.epochs),
            align_weight: self.align_weight,
            groups: &self.groups,
        }
    }
}

impl Forward {
    /// HMIL's fine attention (T × n_f).
    pub fn fine_attention(&self) -> &Tensor {
        &self.out.attention.as_ref().expect("HMIL attends")[1]
    }

    /// Fine class-wise bag embeddings `A2·h2` (B × n_f × 256), each row L2-normalised: the
    /// contrastive views. One small product per bag, on views of the batch's rows.
    pub fn fine_views(&self, lengths: &[i64]) -> Tensor {
        let a2 = self.fine_attention().split_with_sizes(lengths, 0);
        let h2 = self.h2.split_with_sizes(lengths, 0);
        let m2 = Tensor::stack(&a2.iter().zip(&h2).map(|(a, h)| a.tr().matmul(h)).collect::<Vec<_>>(), 0);
        let norm = m2.norm_scalaropt_dim(2, [-1].as_slice(), true).clamp_min(1e-12);
        m2 / norm
    }
}

#[cfg(test)]
pub mod tests {
    use std::path::PathBuf;

    use schemas::workflow::Loss;
    use tch::{Device, Kind, nn};

    use super::*;

    /// The PyTorch fixture: a state_dict, a two-bag batch, and what PyTorch computed.
    pub fn fixture() -> (nn::VarStore, Hmil, Batch, Vec<(String, Tensor)>) {
        fixture_on(Device::Cpu, Loss::default())
    }

    /// [`fixture`] with these loss settings.
    pub(crate) fn fixture_with(loss: Loss) -> (nn::VarStore, Hmil, Batch, Vec<(String, Tensor)>) {
        fixture_on(Device::Cpu, loss)
    }

    fn fixture_on(device: Device, loss: Loss) -> (nn::VarStore, Hmil, Batch, Vec<(String, Tensor)>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hmil");
        let mut vs = nn::VarStore::new(device);
        let config = Config {
            model: schemas::workflow::ModelKind::Hmil,
            dims: Dims { input: 16, n_coarse: 3, n_fine: 7 },
            fine_to_coarse: vec![0, 0, 0, 1, 1, 2, 2],
            dropout: 0.0,
            loss,
            align_weight: 0.0,
        };
        let model = {
            let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
            Hmil::new(&vs.root(), &config)
        };
        vs.load(dir.join("state_dict.safetensors")).unwrap();
        let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let get = |n: &str| expected.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let lengths = Vec::try_from(get("seg").bincount::<Tensor>(None, 2)).unwrap();
        let batch = Batch::new(get("x").to(device), lengths);
        (vs, model, batch, expected)
    }

    pub fn get(expected: &[(String, Tensor)], name: &str) -> Tensor {
        expected.iter().find(|(k, _)| k == name).unwrap().1.shallow_clone()
    }

    #[test]
    fn pytorch_state_dict_loads_by_name_and_gives_the_same_logits() {
        let (_vs, model, batch, expected) = fixture();
        let out = model.forward(&batch, false);
        for (name, got) in [("coarse_logits", &out.coarse_logits), ("fine_logits", &out.fine_logits)] {
            let diff = (got - get(&expected, name)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
    }

    #[test]
    fn cuda_forward_and_gradients_match_cpu() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: needs CUDA, and no GPU is available");
            return;
        }
        let run = |device: Device| {
            let (vs, model, batch, expected) = fixture_on(device, Loss::default());
            let out = model.forward(&batch, false);
            let fine = get(&expected, "fine").to(device);
            out.fine_logits.cross_entropy_for_logits(&fine).backward();
            let mut grads: Vec<(String, Tensor)> =
                vs.variables().into_iter().map(|(k, v)| (k, v.grad().to(Device::Cpu))).collect();
            grads.sort_by(|a, b| a.0.cmp(&b.0));
            (out.coarse_logits.to(Device::Cpu), out.fine_logits.to(Device::Cpu), grads)
        };
        let (cpu, gpu) = (run(Device::Cpu), run(Device::Cuda(0)));
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-4;
        assert!(close(&cpu.0, &gpu.0) && close(&cpu.1, &gpu.1), "logits differ between CPU and CUDA");
        for ((name, g_cpu), (_, g_gpu)) in cpu.2.iter().zip(&gpu.2) {
            assert!(close(g_cpu, g_gpu), "gradient of {name} differs between CPU and CUDA");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // Directional derivatives of the loss along the gradient and along a fixed random
        // direction, over every parameter at once, against central differences.
        let (vs, model, batch, expected) = fixture();
        let fine = get(&expected, "fine");
        let coarse = get(&expected, "coarse");
        let loss_of = |m: &Hmil| {
            let out = m.forward(&batch, false);
            out.fine_logits.cross_entropy_for_logits(&fine) + out.coarse_logits.cross_entropy_for_logits(&coarse)
        };
        loss_of(&model).backward();
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let grads: Vec<Tensor> = vars.iter().map(|(_, v)| v.grad().copy()).collect();
        let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(5);
        let random: Vec<Tensor> = vars.iter().map(|(_, v)| v.randn_like()).collect();
        let _g = tch::no_grad_guard();
        for (label, dir) in [("gradient", &grads), ("random", &random)] {
            let norm = dir.iter().map(|d| d.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
            let analytic =
                grads.iter().zip(dir).map(|(g, d)| (g * d).sum(Kind::Double).double_value(&[])).sum::<f64>() / norm;
            let h = 1e-2;
            let shift = |sign: f64| {
                for ((_, v), d) in vars.iter().zip(dir) {
                    let mut v = v.shallow_clone();
                    let _ = v.g_add_(&(d * (sign * h / norm)));
                }
            };
            shift(1.0);
            let up = loss_of(&model).double_value(&[]);
            shift(-2.0);
            let down = loss_of(&model).double_value(&[]);
            shift(1.0);
            let numeric = (up - down) / (2.0 * h);
            assert!((numeric - analytic).abs() < 2e-3 + 1e-2 * analytic.abs(), "{label}: {numeric} vs {analytic}");
        }
    }
}
