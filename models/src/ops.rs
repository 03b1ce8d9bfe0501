//! What every model shares: batches of bags as concatenated instances, per-bag (segment)
//! softmax and sums, linear layers fused into one product, and the step from fine to coarse
//! predictions that flat models take.

use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

/// Class-wise gated attention (Ilse et al. 2018, with CLAM's parameter names):
/// `W_c(tanh(W_a h) ⊙ sigmoid(W_b h))`, one score per class.
#[derive(Debug)]
pub struct GatedAttention {
    pub a: nn::Linear,
    pub b: nn::Linear,
    pub c: nn::Linear,
}

impl GatedAttention {
    /// `attention_a.0`, `attention_b.0` and `attention_c` under `p`.
    pub fn new(p: &nn::Path, input: i64, hidden: i64, classes: i64) -> GatedAttention {
        GatedAttention {
            a: nn::linear(p / "attention_a" / "0", input, hidden, linear_config()),
            b: nn::linear(p / "attention_b" / "0", input, hidden, linear_config()),
            c: nn::linear(p / "attention_c", hidden, classes, linear_config()),
        }
    }

    /// Raw scores (T × classes) from the pre-activations of the two gates.
    pub fn scores(&self, a: &Tensor, b: &Tensor, dropout: f64, train: bool) -> Tensor {
        self.gated(&a.tanh(), &b.sigmoid(), dropout, train)
    }

    /// Raw scores from the two gates' activations, `tanh(W_a h)` and `sigmoid(W_b h)`.
    pub fn gated(&self, tanh: &Tensor, sigmoid: &Tensor, dropout: f64, train: bool) -> Tensor {
        self.c.forward(&(tanh.dropout(dropout, train) * sigmoid.dropout(dropout, train)))
    }
}

/// A batch of bags: concatenated instances and the bag each belongs to.
pub struct Batch {
    /// T × D instance features (float32).
    pub x: Tensor,
    /// T bag indices in `0..bags` (int64), non-decreasing.
    pub seg: Tensor,
    /// Instances of each bag, in order.
    pub lengths: Vec<i64>,
    /// The model's stem output on `x` (see [`MilModel::stem`](crate::MilModel::stem)) when it
    /// was computed before, as a training step's second pass over a chunk reuses it.
    pub stem: Option<Tensor>,
    /// The output of the model's [`product`](crate::MilModel::product) on the stem output, each
    /// layer's through its activation, when it was computed before (as `stem`).
    pub product: Option<Tensor>,
}

impl Batch {
    /// A batch whose `x` holds bags of `lengths` instances one after another.
    pub fn new(x: Tensor, lengths: Vec<i64>) -> Batch {
        let seg: Vec<i64> =
            lengths.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i as i64, n as usize)).collect();
        let seg = Tensor::from_slice(&seg).to(x.device());
        Batch { x, seg, lengths, stem: None, product: None }
    }

    /// This batch with its stem output already computed.
    pub fn with_stem(self, stem: Tensor) -> Batch {
        Batch { stem: Some(stem), ..self }
    }

    /// `relu(layer x)`: the model's stem output, computed now unless the batch carries it.
    pub fn stem(&self, layer: &nn::Linear) -> Tensor {
        match &self.stem {
            Some(h) => h.shallow_clone(),
            None => layer.forward(&self.x).relu(),
        }
    }

    /// This batch with the activated output of the product after its stem already computed.
    pub fn with_product(self, product: Tensor) -> Batch {
        Batch { product: Some(product), ..self }
    }

    /// The outputs of `joint`'s layers on the stem output of `stem`, each through its
    /// activation: computed now unless the batch carries them.
    pub fn product<const N: usize>(&self, joint: &Joint, stem: &nn::Linear) -> [Tensor; N] {
        match &self.product {
            Some(z) => joint.split(z),
            None => joint.outputs(&self.stem(stem)),
        }
    }

    /// Number of bags.
    pub fn bags(&self) -> i64 {
        self.lengths.len() as i64
    }
}

/// `h·Wᵀ + b` of several linear layers reading the same `h`, as one product split back into
/// each layer's output (views). A layer paired with `false` is applied without its bias. The
/// product's width is padded with zero rows to a multiple of 8 floats: rows of an odd width
/// (769) made it a third slower.
pub fn joint_linear<const N: usize>(h: &Tensor, layers: [(&nn::Linear, bool); N]) -> [Tensor; N] {
    let joint = Joint::of(&layers);
    joint.split(&joint.forward(h))
}

/// Linear layers that read the same input, as one product: their stacked weight and bias (with
/// a graph to the layers' variables), the columns of each layer's output and the activation the
/// model applies to it.
pub struct Joint {
    pub weight: Tensor,
    pub bias: Tensor,
    sizes: Vec<i64>,
    activations: Vec<Activation>,
}

/// The elementwise function a layer's output goes through before the model reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Tanh,
    Sigmoid,
}

impl Joint {
    /// The layers applied to `h` (see [`joint_linear`]).
    pub fn of<const N: usize>(layers: &[(&nn::Linear, bool); N]) -> Joint {
        let (weight, bias, sizes) = stacked(layers);
        Joint { weight, bias, activations: vec![Activation::Identity; sizes.len()], sizes }
    }

    /// The layers applied to `inner`'s output `g = h·Vᵀ + c`, as one product of `h`: the stacked
    /// layers are multiplied into `inner` (`W·(V·h + c) + b = (W·V)·h + (W·c + b)`), so when
    /// `inner` widens (HMIL's 256 → D) each instance costs one product of `h`'s width instead of
    /// two of `g`'s, forward and backward. Equal to applying the layers to `g` up to rounding.
    pub fn through<const N: usize>(inner: &nn::Linear, layers: &[(&nn::Linear, bool); N]) -> Joint {
        let outer = Joint::of(layers);
        let inner_bias = inner.bs.as_ref().expect("a layer with a bias");
        Joint { bias: outer.weight.matmul(inner_bias) + &outer.bias, weight: outer.weight.matmul(&inner.ws), ..outer }
    }

    /// This product with its layers' outputs going through `activations` (padding through none).
    pub fn with_activations<const N: usize>(mut self, activations: [Activation; N]) -> Joint {
        self.activations[..N].copy_from_slice(&activations);
        self
    }

    /// The first `N` layers' outputs on `h`, each through its activation.
    pub fn outputs<const N: usize>(&self, h: &Tensor) -> [Tensor; N] {
        let mut parts = self.split::<N>(&self.forward(h));
        for (part, activation) in parts.iter_mut().zip(&self.activations) {
            *part = match activation {
                Activation::Identity => continue,
                Activation::Tanh => part.tanh(),
                Activation::Sigmoid => part.sigmoid(),
            };
        }
        parts
    }

    /// `y`, the product's output, with each layer's columns through its activation in place:
    /// what [`outputs`](Joint::outputs) gives, as one tensor (without a graph).
    pub fn activate(&self, y: Tensor) -> Tensor {
        for (mut part, activation) in self.split_all(&y).into_iter().zip(&self.activations) {
            let _ = match activation {
                Activation::Identity => continue,
                Activation::Tanh => part.tanh_(),
                Activation::Sigmoid => part.sigmoid_(),
            };
        }
        y
    }

    /// Turns `grad`, the gradient at the activated output `z` (see [`activate`](Joint::activate)),
    /// in place into the gradient at the product's output, as the activations' backward passes do.
    pub fn activation_backward(&self, z: &Tensor, grad: &Tensor) {
        let _no_graph = tch::no_grad_guard();
        let parts = self.split_all(z).into_iter().zip(self.split_all(grad));
        for ((z, g), activation) in parts.zip(&self.activations) {
            let _ = match activation {
                Activation::Identity => continue,
                Activation::Tanh => Tensor::tanh_backward_grad_input(&g, &g, &z),
                Activation::Sigmoid => Tensor::sigmoid_backward_grad_input(&g, &g, &z),
            };
        }
    }

    /// The product's output on `h` (T × [`width`](Joint::width)).
    pub fn forward(&self, h: &Tensor) -> Tensor {
        h.linear(&self.weight, Some(&self.bias))
    }

    /// Columns of the output, padding included.
    pub fn width(&self) -> i64 {
        self.sizes.iter().sum()
    }

    /// The first `N` layers' outputs in `y`, the product's output (views).
    pub fn split<const N: usize>(&self, y: &Tensor) -> [Tensor; N] {
        let mut parts = self.split_all(y);
        parts.truncate(N);
        parts.try_into().expect("one part per layer")
    }

    /// Every layer's columns of `y`, padding included (views).
    fn split_all(&self, y: &Tensor) -> Vec<Tensor> {
        y.split_with_sizes(&self.sizes, 1)
    }
}

/// The weights and biases of `layers` stacked (zero rows padding the width to a multiple of 8)
/// and each layer's rows.
fn stacked<const N: usize>(layers: &[(&nn::Linear, bool); N]) -> (Tensor, Tensor, Vec<i64>) {
    let options = (layers[0].0.ws.kind(), layers[0].0.ws.device());
    let inputs = layers[0].0.ws.size()[1];
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
        weights.push(Tensor::zeros([pad, inputs], options));
        biases.push(Tensor::zeros([pad], options));
        sizes.push(pad);
    }
    (Tensor::cat(&weights, 0), Tensor::cat(&biases, 0), sizes)
}

pub fn linear_config() -> nn::LinearConfig {
    nn::LinearConfig { ws_init: nn::init::DEFAULT_KAIMING_NORMAL, bs_init: Some(nn::Init::Const(0.0)), bias: true }
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

/// Cross-entropy of `logits` against class indices `y`, weighted per class by `weights`.
pub fn cross_entropy(logits: &Tensor, y: &Tensor, weights: Option<&Tensor>) -> Tensor {
    logits.cross_entropy_loss::<&Tensor>(y, weights, Reduction::Mean, -100, 0.0)
}

/// Coarse logits of a flat model: the logarithms of its fine probabilities summed per coarse
/// class (`groups` is n_f × n_c one-hot), whose softmax is those sums.
pub fn coarse_from_fine(fine_logits: &Tensor, groups: &Tensor) -> Tensor {
    fine_logits.softmax(-1, Kind::Float).matmul(groups).clamp_min(f64::from(f32::MIN_POSITIVE)).log()
}

/// The loss of a flat model: the fine cross-entropy alone.
pub fn flat_terms(bags: &crate::PerBag, targets: &crate::Targets) -> crate::Terms {
    let ce = cross_entropy(&bags.fine_logits, targets.fine, targets.class_weights.map(|w| w.1));
    crate::Terms { total: ce.shallow_clone(), named: vec![("ce_fine", ce)], schedule: Vec::new() }
}

/// One attention per instance (T × 1) as a per-class attention (T × `classes`).
pub fn per_class(attention: &Tensor, classes: i64) -> Tensor {
    attention.expand([-1, classes], false)
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

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
        let scores = {
            let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
            Tensor::randn([3000, 2], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
        };
        let a = segment_softmax(&scores, &Tensor::zeros([3000], (Kind::Int64, Device::Cpu)), 1);
        assert_eq!(a.kind(), Kind::Float);
        let total = a.sum_dim_intlist([0].as_slice(), false, Kind::Double);
        let err = (total - 1.0).abs().max().double_value(&[]);
        assert!(err < 1e-5, "a bag's attention sums to 1 ± {err}");
    }

    #[test]
    fn layers_folded_through_an_inner_layer_give_its_outputs_and_gradients() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        let p = vs.root();
        let config = || nn::LinearConfig { bs_init: Some(nn::Init::Uniform { lo: -1.0, up: 1.0 }), ..linear_config() };
        let inner = nn::linear(&p / "inner", 6, 20, config());
        let (a, b) = (nn::linear(&p / "a", 20, 5, config()), nn::linear(&p / "b", 20, 2, config()));
        let h = Tensor::randn([9, 6], (Kind::Float, Device::Cpu));
        let outputs = |folded: bool| {
            let layers = [(&a, true), (&b, false)];
            let [ya, yb] = if folded {
                let joint = Joint::through(&inner, &layers);
                joint.split(&joint.forward(&h))
            } else {
                joint_linear(&inner.forward(&h), layers)
            };
            assert_eq!((ya.size(), yb.size()), (vec![9, 5], vec![9, 2]));
            for mut v in vs.trainable_variables() {
                v.zero_grad();
            }
            (ya.sin().sum(Kind::Float) + yb.cos().sum(Kind::Float)).backward();
            let grad = |t: &Tensor| if t.grad().defined() { t.grad().copy() } else { t.zeros_like() };
            let grads: Vec<Tensor> =
                [&inner, &a, &b].iter().flat_map(|l| [grad(&l.ws), grad(l.bs.as_ref().unwrap())]).collect();
            (ya.detach(), yb.detach(), grads)
        };
        let (plain, folded) = (outputs(false), outputs(true));
        let close = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]) < 1e-5;
        assert!(close(&plain.0, &folded.0) && close(&plain.1, &folded.1), "outputs differ");
        for (i, (x, y)) in plain.2.iter().zip(&folded.2).enumerate() {
            assert!(close(x, y), "gradient {i} differs: {x:?} vs {y:?}");
        }
        // The unbiased layer's bias has no gradient in either.
        assert_eq!(plain.2[5].abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn activated_outputs_and_their_backward_are_the_activations_own() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _rng = crate::tests::GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        let p = vs.root();
        let (a, b, c) = (
            nn::linear(&p / "a", 6, 3, linear_config()),
            nn::linear(&p / "b", 6, 4, linear_config()),
            nn::linear(&p / "c", 6, 2, linear_config()),
        );
        let joint = Joint::of(&[(&a, true), (&b, true), (&c, true)]).with_activations([
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Identity,
        ]);
        let h = Tensor::randn([5, 6], (Kind::Float, Device::Cpu)) * 3.0;
        // By autograd, through each layer's own activation.
        let y = joint.forward(&h).detach().set_requires_grad(true);
        let [ta, sb, yc] = joint.split(&y);
        let weights = [
            Tensor::randn([5, 3], (Kind::Float, Device::Cpu)),
            Tensor::randn([5, 4], (Kind::Float, Device::Cpu)),
            Tensor::randn([5, 2], (Kind::Float, Device::Cpu)),
        ];
        let parts = [ta.tanh(), sb.sigmoid(), yc];
        parts.iter().zip(&weights).map(|(t, w)| (t * w).sum(Kind::Float)).reduce(|x, y| x + y).unwrap().backward();
        // Activated in place, and the gradient at the activations turned into the product's.
        let z = {
            let _no_graph = tch::no_grad_guard();
            joint.activate(joint.forward(&h))
        };
        let split: [Tensor; 3] = joint.split(&z);
        let outputs: [Tensor; 3] = joint.outputs(&h);
        let close = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]) < 1e-6;
        for ((s, o), part) in split.iter().zip(&outputs).zip(&parts) {
            assert!(close(s, part) && close(o, part), "{s:?} vs {part:?}");
        }
        let grad = Tensor::cat(
            &[&weights[0], &weights[1], &weights[2], &Tensor::zeros([5, 7], (Kind::Float, Device::Cpu))],
            1,
        );
        joint.activation_backward(&z, &grad);
        assert!(close(&grad, &y.grad()), "{grad:?} vs {:?}", y.grad());
    }

    #[test]
    fn coarse_from_fine_gives_the_summed_probabilities() {
        let fine = Tensor::from_slice(&[1.0f32, 2.0, 0.5, -1.0]).view([1, 4]);
        let groups = group_matrix(&[0, 1, 1, 0], 2, Device::Cpu);
        let got: Vec<f32> =
            Vec::try_from(coarse_from_fine(&fine, &groups).softmax(-1, Kind::Float).view([-1])).unwrap();
        let p: Vec<f32> = Vec::try_from(fine.softmax(-1, Kind::Float).view([-1])).unwrap();
        let want = [p[0] + p[3], p[1] + p[2]];
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} vs {want:?}");
    }
}
