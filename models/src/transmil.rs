//! TransMIL (Shao et al. 2021): instances embedded to 512, a class token, two Transformer layers
//! with Nyström self-attention (Xiong et al. 2021: 256 landmarks, 8 heads of 64, an iterative
//! Moore–Penrose pseudo-inverse and a depth-wise convolution of the values as residual), a
//! positional encoding by depth-wise convolutions over the instances laid on a square (PPEG)
//! between them, and a classifier of the class token, on the fine classes. Parameter names are
//! the published implementation's (`_fc1.0`, `cls_token`, `layer{1,2}.norm`,
//! `layer{1,2}.attn.{to_qkv,to_out.0,res_conv}`, `pos_layer.proj{,1,2}`, `norm`, `_fc2`).
//!
//! Self-attention over a bag depends on the bag's length (landmarks, the square), so bags are
//! run one by one, as the published model runs them. The model has no per-instance attention to
//! report.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::ops::{Batch, coarse_from_fine, group_matrix, linear_config};
use crate::{Config, Dims, MilModel, Output};

const DIM: i64 = 512;
const HEADS: i64 = 8;
const DIM_HEAD: i64 = 64;
const LANDMARKS: i64 = 256;
const PINV_ITERATIONS: usize = 6;
const RESIDUAL_KERNEL: i64 = 33;

/// Nyström self-attention with a convolutional residual of the values.
#[derive(Debug)]
struct NystromAttention {
    to_qkv: nn::Linear,
    to_out: nn::Linear,
    res_conv: Tensor,
}

impl NystromAttention {
    fn new(p: &nn::Path) -> NystromAttention {
        let inner = HEADS * DIM_HEAD;
        NystromAttention {
            to_qkv: nn::linear(p / "to_qkv", DIM, 3 * inner, nn::LinearConfig { bias: false, ..linear_config() }),
            to_out: nn::linear(p / "to_out" / "0", inner, DIM, linear_config()),
            res_conv: (p / "res_conv").var(
                "weight",
                &[HEADS, 1, RESIDUAL_KERNEL, 1],
                nn::init::DEFAULT_KAIMING_UNIFORM,
            ),
        }
    }

    /// `x` is 1 × n × 512.
    fn forward(&self, x: &Tensor, dropout: f64, train: bool) -> Tensor {
        let n = x.size()[1];
        // Pad at the front so that the sequence splits evenly into the landmarks.
        let padding = (LANDMARKS - n % LANDMARKS) % LANDMARKS;
        let x = if padding > 0 { x.constant_pad_nd([0, 0, padding, 0]) } else { x.shallow_clone() };
        let padded = n + padding;
        let heads = |t: &Tensor| t.view([1, padded, HEADS, DIM_HEAD]).transpose(1, 2);
        let qkv = self.to_qkv.forward(&x).chunk(3, -1);
        let (q, k, v) = (heads(&qkv[0]) * (DIM_HEAD as f64).powf(-0.5), heads(&qkv[1]), heads(&qkv[2]));
        // Landmarks: means of consecutive runs of l = ceil(n / m) rows.
        let l = (n + LANDMARKS - 1) / LANDMARKS;
        let landmarks = |t: &Tensor| {
            t.view([1, HEADS, LANDMARKS, l, DIM_HEAD]).sum_dim_intlist([3].as_slice(), false, Kind::Float) / l as f64
        };
        let (q_l, k_l) = (landmarks(&q), landmarks(&k));
        let attn1 = q.matmul(&k_l.transpose(-1, -2)).softmax(-1, Kind::Float);
        let attn2 = q_l.matmul(&k_l.transpose(-1, -2)).softmax(-1, Kind::Float);
        let attn3 = q_l.matmul(&k.transpose(-1, -2)).softmax(-1, Kind::Float);
        let out = attn1.matmul(&pinv(&attn2)).matmul(&attn3.matmul(&v));
        let residual = v.conv2d(&self.res_conv, None::<Tensor>, [1, 1], [RESIDUAL_KERNEL / 2, 0], [1, 1], HEADS);
        let out = (out + residual).transpose(1, 2).reshape([1, padded, HEADS * DIM_HEAD]);
        let out = self.to_out.forward(&out).dropout(dropout, train);
        out.narrow(1, padding, n)
    }
}

/// The iterative Moore–Penrose pseudo-inverse of the landmark attention (Razavi et al.), scaled
/// by the largest row and column sums over every head.
fn pinv(x: &Tensor) -> Tensor {
    let abs = x.abs();
    let col = abs.sum_dim_intlist([-1].as_slice(), false, Kind::Float).max();
    let row = abs.sum_dim_intlist([-2].as_slice(), false, Kind::Float).max();
    let mut z = x.transpose(-1, -2) / (col * row);
    let eye = Tensor::eye(x.size()[3], (Kind::Float, x.device())).unsqueeze(0);
    for _ in 0..PINV_ITERATIONS {
        let xz = x.matmul(&z);
        let inner = &eye * 7.0 - &xz;
        let inner = &eye * 15.0 - xz.matmul(&inner);
        let inner = &eye * 13.0 - xz.matmul(&inner);
        z = z.matmul(&inner) * 0.25;
    }
    z
}

/// A pre-norm Transformer layer: `x + attention(norm(x))`.
#[derive(Debug)]
struct TransLayer {
    norm: nn::LayerNorm,
    attn: NystromAttention,
}

impl TransLayer {
    fn new(p: &nn::Path) -> TransLayer {
        TransLayer {
            norm: nn::layer_norm(p / "norm", vec![DIM], Default::default()),
            attn: NystromAttention::new(&(p / "attn")),
        }
    }

    fn forward(&self, x: &Tensor, dropout: f64, train: bool) -> Tensor {
        x + self.attn.forward(&self.norm.forward(x), dropout, train)
    }
}

/// PPEG: the instance tokens laid row by row on a side × side square, plus their depth-wise
/// convolutions of sizes 7, 5 and 3; the class token passes through.
#[derive(Debug)]
struct Ppeg {
    convs: [nn::Conv2D; 3],
}

impl Ppeg {
    fn new(p: &nn::Path) -> Ppeg {
        let conv = |name: &str, k: i64| {
            nn::conv2d(p / name, DIM, DIM, k, nn::ConvConfig { padding: k / 2, groups: DIM, ..Default::default() })
        };
        Ppeg { convs: [conv("proj", 7), conv("proj1", 5), conv("proj2", 3)] }
    }

    fn forward(&self, x: &Tensor, side: i64) -> Tensor {
        let cls = x.narrow(1, 0, 1);
        let feat = x.narrow(1, 1, side * side).transpose(1, 2).reshape([1, DIM, side, side]);
        let sum = self.convs.iter().fold(feat.shallow_clone(), |acc, c| acc + c.forward(&feat));
        Tensor::cat(&[cls, sum.flatten(2, 3).transpose(1, 2)], 1)
    }
}

/// The TransMIL network.
#[derive(Debug)]
pub struct TransMil {
    pub dims: Dims,
    fc1: nn::Linear,
    cls_token: Tensor,
    layer1: TransLayer,
    pos_layer: Ppeg,
    layer2: TransLayer,
    norm: nn::LayerNorm,
    fc2: nn::Linear,
    dropout: f64,
    groups: Tensor,
}

impl TransMil {
    /// Creates the network's variables under `p`.
    pub fn new(p: &nn::Path, config: &Config) -> TransMil {
        let dims = config.dims;
        TransMil {
            dims,
            fc1: nn::linear(p / "_fc1" / "0", dims.input, DIM, linear_config()),
            cls_token: p.var("cls_token", &[1, 1, DIM], nn::Init::Randn { mean: 0.0, stdev: 1.0 }),
            layer1: TransLayer::new(&(p / "layer1")),
            pos_layer: Ppeg::new(&(p / "pos_layer")),
            layer2: TransLayer::new(&(p / "layer2")),
            norm: nn::layer_norm(p / "norm", vec![DIM], Default::default()),
            fc2: nn::linear(p / "_fc2", DIM, dims.n_fine, linear_config()),
            dropout: config.dropout,
            groups: group_matrix(&config.fine_to_coarse, dims.n_coarse, p.device()),
        }
    }

    /// The fine logits of one bag from its stem output (`h`: n × 512).
    fn bag(&self, h: &Tensor, train: bool) -> Tensor {
        let n = h.size()[0];
        let h = h.unsqueeze(0);
        // Fill the square by repeating the first instances, as published.
        let side = (n as f64).sqrt().ceil() as i64;
        let extra = side * side - n;
        let h = Tensor::cat(&[self.cls_token.shallow_clone(), h.shallow_clone(), h.narrow(1, 0, extra)], 1);
        let h = self.layer1.forward(&h, self.dropout, train);
        let h = self.pos_layer.forward(&h, side);
        let h = self.layer2.forward(&h, self.dropout, train);
        self.fc2.forward(&self.norm.forward(&h).select(1, 0)).squeeze_dim(0)
    }
}

impl MilModel for TransMil {
    fn stem(&self) -> &nn::Linear {
        &self.fc1
    }

    fn forward(&self, batch: &Batch, train: bool) -> Output {
        let bags = batch.stem(&self.fc1).split_with_sizes(&batch.lengths, 0);
        let fine_logits = Tensor::stack(&bags.iter().map(|h| self.bag(h, train)).collect::<Vec<_>>(), 0);
        Output {
            coarse_logits: coarse_from_fine(&fine_logits, &self.groups),
            fine_logits,
            attention: None,
            scores: None,
        }
    }
}
