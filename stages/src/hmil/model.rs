//! The HMIL network. A mini-batch of bags is one pass over the concatenated instances: attention
//! is a per-bag segment softmax (scatter max, index_add sums), computed once; class logits are
//! attention-weighted sums of per-instance classifier scores (equal to the classifier applied to
//! the class-wise bag embeddings, without materialising them). The layers that read the same
//! instance features run as one matrix product, so the backward pass computes that input's
//! gradient once instead of summing one per layer.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sizes of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Instance feature dimension D.
    pub input: i64,
    pub n_coarse: i64,
    pub n_fine: i64,
}

/// Hidden sizes fixed by the published model.
const HIDDEN: i64 = 256;
const FINE_ATTN_HIDDEN: i64 = 64;
/// The hidden sizes (feature extractor and coarse attention, fine attention), as checkpoints record them.
pub const HIDDEN_SIZES: (i64, i64) = (HIDDEN, FINE_ATTN_HIDDEN);

/// Class-wise gated attention: `W_c(tanh(W_a h) ⊙ sigmoid(W_b h))`, one score per class.
#[derive(Debug)]
struct GatedAttention {
    a: nn::Linear,
    b: nn::Linear,
    c: nn::Linear,
}

impl GatedAttention {
    fn new(p: &nn::Path, input: i64, hidden: i64, classes: i64) -> GatedAttention {
        let p = p / "0";
        GatedAttention {
            a: nn::linear(&p / "attention_a" / "0", input, hidden, linear_config()),
            b: nn::linear(&p / "attention_b" / "0", input, hidden, linear_config()),
            c: nn::linear(&p / "attention_c", hidden, classes, linear_config()),
        }
    }

    /// Raw scores (T × classes) from the pre-activations of the two gates.
    fn scores(&self, a: &Tensor, b: &Tensor, dropout: f64, train: bool) -> Tensor {
        let a = a.tanh().dropout(dropout, train);
        let b = b.sigmoid().dropout(dropout, train);
        self.c.forward(&(a * b))
    }
}

/// `h·Wᵀ + b` of several linear layers reading the same `h`, as one product split back into
/// each layer's output (views). A layer paired with `false` is applied without its bias. The
/// product's width is padded with zero rows to a multiple of 8 floats: rows of an odd width
/// (769) made it a third slower.
fn joint_linear<const N: usize>(h: &Tensor, layers: [(&nn::Linear, bool); N]) -> [Tensor; N] {
    let options = (layers[0].0.ws.kind(), layers[0].0.ws.device());
    let mut sizes: Vec<i64> = layers.iter().map(|(l, _)| l.ws.size()[0]).collect();
    let width: i64 = sizes.iter().sum();
    let pad = (8 - width % 8) % 8;
    let mut weights: Vec<Tensor> = layers.iter().map(|(l, _)| l.ws.shallow_clone()).collect();
    let mut biases: Vec<Tensor> = layers
        .iter()
        .zip(&sizes)
        .map(|((l, with_bias), &n)| match (&l.bs, with_bias) {
            (Some(b), true) => b.shallow_clone(),
            _ => Tensor::zeros([n], options),
        })
        .collect();
    if pad > 0 {
        weights.push(Tensor::zeros([pad, h.size()[1]], options));
        biases.push(Tensor::zeros([pad], options));
        sizes.push(pad);
    }
    let mut parts = h.linear(&Tensor::cat(&weights, 0), Some(Tensor::cat(&biases, 0))).split_with_sizes(&sizes, 1);
    parts.truncate(N);
    parts.try_into().expect("one part per layer")
}

fn linear_config() -> nn::LinearConfig {
    nn::LinearConfig { ws_init: nn::init::DEFAULT_KAIMING_NORMAL, bs_init: Some(nn::Init::Const(0.0)), bias: true }
}

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
    pub dropout: f64,
}

/// A batch of bags: concatenated instances and the bag each belongs to.
pub struct Batch {
    /// T × D instance features (float32).
    pub x: Tensor,
    /// T bag indices in `0..bags` (int64), non-decreasing.
    pub seg: Tensor,
    /// Instances of each bag, in order.
    pub lengths: Vec<i64>,
}

impl Batch {
    /// A batch whose `x` holds bags of `lengths` instances one after another.
    pub fn new(x: Tensor, lengths: Vec<i64>) -> Batch {
        let seg: Vec<i64> =
            lengths.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i as i64, n as usize)).collect();
        let seg = Tensor::from_slice(&seg).to(x.device());
        Batch { x, seg, lengths }
    }

    /// Number of bags.
    pub fn bags(&self) -> i64 {
        self.lengths.len() as i64
    }
}

/// What a forward pass yields.
pub struct Output {
    /// B × n_c.
    pub coarse_logits: Tensor,
    /// B × n_f.
    pub fine_logits: Tensor,
    /// T × n_c coarse attention (softmax over each bag's instances).
    pub coarse_attention: Tensor,
    /// T × n_f fine attention.
    pub fine_attention: Tensor,
    /// T × 1 each instance's coarse classifier score (without its bias): a bag's coarse logit of
    /// class k is the sum over its instances of coarse attention k times this score, plus the bias.
    pub coarse_scores: Tensor,
    /// T × 1 each instance's fine classifier score (without its bias), likewise.
    pub fine_scores: Tensor,
    /// T × 256 reduced instance features, for the fine bag embeddings.
    h2: Tensor,
}

impl Hmil {
    /// Creates the network's variables under `p` (Kaiming-normal weights, zero biases).
    pub fn new(p: &nn::Path, dims: Dims, dropout: f64) -> Hmil {
        let d = dims.input;
        Hmil {
            dims,
            fe0: nn::linear(p / "feature_extractor" / "0", d, HIDDEN, linear_config()),
            fe2: nn::linear(p / "feature_extractor" / "2", HIDDEN, d, linear_config()),
            reducer: nn::linear(p / "feature_reducer" / "0", d, HIDDEN, linear_config()),
            coarse_attention: GatedAttention::new(&(p / "coarse_attention"), d, HIDDEN, dims.n_coarse),
            fine_attention: GatedAttention::new(&(p / "fine_attention"), HIDDEN, FINE_ATTN_HIDDEN, dims.n_fine),
            coarse_classifier: nn::linear(p / "coarse_classifier", d, 1, linear_config()),
            fine_classifier: nn::linear(p / "fine_classifier", HIDDEN, 1, linear_config()),
            dropout,
        }
    }

    /// One pass over a batch of bags.
    pub fn forward(&self, batch: &Batch, train: bool) -> Output {
        let (seg, bags) = (&batch.seg, batch.bags());
        let h1 = self.fe2.forward(&self.fe0.forward(&batch.x).relu());
        // classifier(A·h) = A·(classifier h): each instance's classifier score (without the bias,
        // added once per bag) is weighted by its attention.
        let coarse = &self.coarse_attention;
        let [h2, a, b, s1] = joint_linear(
            &h1,
            [(&self.reducer, true), (&coarse.a, true), (&coarse.b, true), (&self.coarse_classifier, false)],
        );
        let a1 = segment_softmax(&coarse.scores(&a, &b, self.dropout, train), seg, bags);
        let fine = &self.fine_attention;
        let [a, b, s2] = joint_linear(&h2, [(&fine.a, true), (&fine.b, true), (&self.fine_classifier, false)]);
        let a2 = segment_softmax(&fine.scores(&a, &b, self.dropout, train), seg, bags);
        let coarse_logits = segment_sum(&(&a1 * &s1), seg, bags) + self.coarse_classifier.bs.as_ref().expect("bias");
        let fine_logits = segment_sum(&(&a2 * &s2), seg, bags) + self.fine_classifier.bs.as_ref().expect("bias");
        Output {
            coarse_logits,
            fine_logits,
            coarse_attention: a1,
            fine_attention: a2,
            coarse_scores: s1,
            fine_scores: s2,
            h2,
        }
    }
}

impl Output {
    /// Fine class-wise bag embeddings `A2·h2` (B × n_f × 256), each row L2-normalised: the
    /// contrastive views. One small product per bag, on views of the batch's rows.
    pub fn fine_views(&self, lengths: &[i64]) -> Tensor {
        let a2 = self.fine_attention.split_with_sizes(lengths, 0);
        let h2 = self.h2.split_with_sizes(lengths, 0);
        let m2 = Tensor::stack(&a2.iter().zip(&h2).map(|(a, h)| a.tr().matmul(h)).collect::<Vec<_>>(), 0);
        let norm = m2.norm_scalaropt_dim(2, [-1].as_slice(), true).clamp_min(1e-12);
        m2 / norm
    }
}

/// Softmax of `scores` (T × C) over the instances of each bag, in float32 (under bf16 autocast
/// too: a bag's sum runs over thousands of instances).
pub fn segment_softmax(scores: &Tensor, seg: &Tensor, bags: i64) -> Tensor {
    let scores = scores.to_kind(Kind::Float);
    // Bags are contiguous runs of `seg`, so a segment max by run length shifts each bag.
    let lengths = seg.bincount::<Tensor>(None, bags);
    let max = Tensor::segment_reduce(&scores.detach(), "max", Some(&lengths), None, None, 0, false, f64::NEG_INFINITY);
    let e = (&scores - max.index_select(0, seg)).exp();
    let sum = segment_sum(&e, seg, bags);
    e / sum.index_select(0, seg)
}

/// Per-bag sums of the rows of `values` (T × C) → B × C.
pub fn segment_sum(values: &Tensor, seg: &Tensor, bags: i64) -> Tensor {
    let size = values.size();
    Tensor::zeros([bags, size[1]], (values.kind(), values.device())).index_add(0, seg, values)
}

/// The fine→coarse group matrix (n_f × n_c, one-hot rows).
pub fn group_matrix(fine_to_coarse: &[usize], n_coarse: i64, device: tch::Device) -> Tensor {
    let n_fine = fine_to_coarse.len() as i64;
    let idx: Vec<i64> = fine_to_coarse.iter().map(|&c| c as i64).collect();
    Tensor::zeros([n_fine, n_coarse], (Kind::Float, device)).scatter_value(
        1,
        &Tensor::from_slice(&idx).view([-1, 1]).to(device),
        1.0,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use tch::{Device, nn};

    use super::*;

    /// The PyTorch fixture: a state_dict, a two-bag batch, and what PyTorch computed.
    pub(crate) fn fixture() -> (nn::VarStore, Hmil, Batch, Vec<(String, Tensor)>) {
        fixture_on(Device::Cpu)
    }

    fn fixture_on(device: Device) -> (nn::VarStore, Hmil, Batch, Vec<(String, Tensor)>) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hmil");
        let mut vs = nn::VarStore::new(device);
        let model = Hmil::new(&vs.root(), Dims { input: 16, n_coarse: 3, n_fine: 7 }, 0.0);
        vs.load(dir.join("state_dict.safetensors")).unwrap();
        let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
        let get = |n: &str| expected.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let lengths = Vec::try_from(get("seg").bincount::<Tensor>(None, 2)).unwrap();
        let batch = Batch::new(get("x").to(device), lengths);
        (vs, model, batch, expected)
    }

    pub(crate) fn get(expected: &[(String, Tensor)], name: &str) -> Tensor {
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
            let (vs, model, batch, expected) = fixture_on(device);
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
    fn segment_softmax_and_sum_by_hand() {
        let scores = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 5.0, 5.0]).view([5, 1]);
        let seg = Tensor::from_slice(&[0i64, 0, 0, 1, 1]);
        let a: Vec<f32> = Vec::try_from(segment_softmax(&scores, &seg, 2).view([-1])).unwrap();
        let z = 1.0 + 1f32.exp() + 2f32.exp();
        let expected = [1.0 / z, 1f32.exp() / z, 2f32.exp() / z, 0.5, 0.5];
        for (g, e) in a.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{a:?}");
        }
        let sums: Vec<f32> = Vec::try_from(segment_sum(&scores, &seg, 2).view([-1])).unwrap();
        assert_eq!(sums, [3.0, 10.0]);
    }

    #[test]
    fn segment_softmax_of_bf16_scores_is_float32() {
        let scores = Tensor::randn([3000, 2], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let a = segment_softmax(&scores, &Tensor::zeros([3000], (Kind::Int64, Device::Cpu)), 1);
        assert_eq!(a.kind(), Kind::Float);
        let total = a.sum_dim_intlist([0].as_slice(), false, Kind::Double);
        let err = (total - 1.0).abs().max().double_value(&[]);
        assert!(err < 1e-5, "a bag's attention sums to 1 ± {err}");
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
        let mut rng = crate::rng::Rng::new(5, 0);
        let random: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| {
                let r: Vec<f32> = (0..v.numel()).map(|_| rng.normal() as f32).collect();
                Tensor::from_slice(&r).view(v.size().as_slice())
            })
            .collect();
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
