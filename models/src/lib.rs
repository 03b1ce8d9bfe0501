//! The MIL networks hmil-flow trains, behind one trait. Each model is one module: how it is
//! built (its parameters under the names of its reference implementation, so published PyTorch
//! weights load), its forward pass over a batch of bags, and its loss. Every model predicts both
//! levels of the class hierarchy: HMIL directly, flat models through the fine probabilities
//! summed per coarse class. What is shared (batches, segment operations) is in [`ops`].

pub mod abmil;
pub mod chunked;
pub mod hmil;
pub mod meanpool;
pub mod ops;
pub mod transmil;

use schemas::workflow::{Loss, ModelKind};
use tch::{Tensor, nn};

pub use ops::Batch;

/// Sizes of a network's input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Instance feature dimension D.
    pub input: i64,
    pub n_coarse: i64,
    pub n_fine: i64,
}

/// How to build a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub model: ModelKind,
    pub dims: Dims,
    /// The coarse class of each fine class.
    pub fine_to_coarse: Vec<usize>,
    /// Dropout in the attention (HMIL, ABMIL) or after the embedding (mean pooling); 0 disables it.
    pub dropout: f64,
    /// HMIL's loss terms and curriculum.
    pub loss: Loss,
    /// Weight of HMIL's attention-alignment term.
    pub align_weight: f64,
}

/// What a forward pass yields, at both levels of the hierarchy.
pub struct Output {
    /// B × n_c. A flat model's are the logarithms of its fine probabilities summed per coarse
    /// class, so that their softmax is those sums.
    pub coarse_logits: Tensor,
    /// B × n_f.
    pub fine_logits: Tensor,
    /// Each instance's attention for each class (softmax over each bag's instances): T × n_c
    /// and T × n_f. A model with one attention for all classes repeats it per class; `None` for
    /// a model without per-instance attention (mean pooling, TransMIL).
    pub attention: Option<[Tensor; 2]>,
    /// HMIL's per-instance classifier scores (T × 1 coarse, T × 1 fine, without the bias): a
    /// class's logit is the sum over instances of its attention times the score. `None` for models
    /// whose logits do not decompose so.
    pub scores: Option<[Tensor; 2]>,
}

/// A training forward pass reduced to what its loss reads, bag by bag: every tensor's first
/// dimension is the batch's bags, so a batch can run in chunks of bags whose rows are joined
/// (see [`chunked`]).
pub struct PerBag {
    /// B × n_c and B × n_f, as in [`Output`].
    pub coarse_logits: Tensor,
    pub fine_logits: Tensor,
    /// What else the model's loss reads per bag (HMIL: its contrastive views and the agreement
    /// of its attention), in the model's own order.
    pub extra: Vec<Tensor>,
}

impl PerBag {
    /// Every tensor, logits first.
    pub fn tensors(&self) -> Vec<&Tensor> {
        [&self.coarse_logits, &self.fine_logits].into_iter().chain(&self.extra).collect()
    }

    /// The rows of `parts` (runs of consecutive bags, in order) as one batch's.
    pub fn cat(parts: &[PerBag]) -> PerBag {
        let width = parts[0].tensors().len();
        PerBag::from_tensors(
            (0..width).map(|k| Tensor::cat(&parts.iter().map(|p| p.tensors()[k]).collect::<Vec<_>>(), 0)).collect(),
        )
    }

    /// A `PerBag` of these tensors, in the order of [`PerBag::tensors`].
    pub fn from_tensors(mut t: Vec<Tensor>) -> PerBag {
        let extra = t.split_off(2);
        let fine_logits = t.pop().expect("fine logits");
        let coarse_logits = t.pop().expect("coarse logits");
        PerBag { coarse_logits, fine_logits, extra }
    }
}

/// A batch's labels.
pub struct Targets<'a> {
    /// B coarse class indices (int64).
    pub coarse: &'a Tensor,
    /// B fine class indices (int64).
    pub fine: &'a Tensor,
    /// Per-class weights of the cross-entropy terms (coarse, fine), or none.
    pub class_weights: Option<(&'a Tensor, &'a Tensor)>,
}

/// Where training stands, for losses that follow a schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub epoch: usize,
    pub epochs: usize,
}

/// A training step's loss: the total that is minimised and its named terms.
pub struct Terms {
    pub total: Tensor,
    /// Each term by name (`ce_fine`, `con`, …), as `history` records them (`loss_<name>`).
    pub named: Vec<(&'static str, Tensor)>,
    /// The schedule's values in this epoch by name (`weight_con`, `tau`, …).
    pub schedule: Vec<(&'static str, f64)>,
}

/// A MIL network over bags of instance features.
pub trait MilModel: Send {
    /// The first layer, `relu(stem x)` of each instance alone, which every model begins with:
    /// the rest of the model reads it as [`Batch::stem`] gives it.
    fn stem(&self) -> &nn::Linear;
    /// The product that alone reads the stem output, where the model has one (HMIL's folded
    /// layers): the rest of the model reads its layers' outputs, each through its activation, as
    /// [`Batch::product`] gives them.
    fn product(&self) -> Option<ops::Joint> {
        None
    }
    /// Class logits and attention of every bag of `batch`; `train` turns dropout on.
    fn forward(&self, batch: &Batch, train: bool) -> Output;
    /// A training forward pass (dropout on), bag by bag; by default the logits alone.
    fn per_bag(&self, batch: &Batch, _schedule: Schedule) -> PerBag {
        let out = self.forward(batch, true);
        PerBag { coarse_logits: out.coarse_logits, fine_logits: out.fine_logits, extra: Vec::new() }
    }
    /// The loss of a batch from the [`PerBag`] rows of all its bags; by default a flat model's:
    /// the fine cross-entropy alone.
    fn loss(&self, bags: &PerBag, targets: &Targets, _schedule: Schedule) -> Terms {
        ops::flat_terms(bags, targets)
    }
    /// A training forward pass over `batch` and its loss.
    fn step(&self, batch: &Batch, targets: &Targets, schedule: Schedule) -> (PerBag, Terms) {
        let bags = self.per_bag(batch, schedule);
        let terms = self.loss(&bags, targets, schedule);
        (bags, terms)
    }
}

/// Creates the model of `config` with its variables under `p` (PyTorch's default initialisation;
/// see each model for its parameter names).
pub fn build(p: &nn::Path, config: &Config) -> Box<dyn MilModel> {
    match config.model {
        ModelKind::Hmil => Box::new(hmil::Hmil::new(p, config)),
        ModelKind::Abmil => Box::new(abmil::Abmil::new(p, config)),
        ModelKind::Meanpool => Box::new(meanpool::MeanPool::new(p, config)),
        ModelKind::Transmil => Box::new(transmil::TransMil::new(p, config)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tch::{Device, Kind, Tensor, nn};

    use super::*;

    /// Held by a test while it seeds and draws from libtorch's global generator (tests run on
    /// several threads).
    pub(crate) static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Loads `tests/fixtures/baselines/<model>.safetensors` (written by PyTorch from the papers'
    /// descriptions; see make_baselines.py) and checks the fine logits and attention of the
    /// batch of `tests/fixtures/hmil`, and that the coarse prediction is the fine one summed.
    fn matches_pytorch(model: ModelKind) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let fine_to_coarse = vec![0, 0, 0, 1, 1, 2, 2];
        let config = Config {
            model,
            dims: Dims { input: 16, n_coarse: 3, n_fine: 7 },
            fine_to_coarse: fine_to_coarse.clone(),
            dropout: 0.0,
            loss: Loss::default(),
            align_weight: 0.0,
        };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = {
            let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
            build(&vs.root(), &config)
        };
        vs.load(dir.join(format!("baselines/{}.safetensors", model.name()))).unwrap();
        vs.float();
        let read = |path: PathBuf| Tensor::read_safetensors(path).unwrap();
        let expected = read(dir.join(format!("baselines/{}_expected.safetensors", model.name())));
        // The model's own batch where the fixture has one, else HMIL's.
        let own = expected.iter().any(|(k, _)| k == "x");
        let batch = read(if own {
            dir.join(format!("baselines/{}_expected.safetensors", model.name()))
        } else {
            dir.join("hmil/expected.safetensors")
        });
        let get = |set: &[(String, Tensor)], n: &str| set.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let seg = get(&batch, "seg");
        let bags = seg.max().int64_value(&[]) + 1;
        let lengths = Vec::try_from(seg.bincount::<Tensor>(None, bags)).unwrap();
        let out = net.forward(&Batch::new(get(&batch, "x"), lengths), false);
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&out.fine_logits, &get(&expected, "fine_logits")) < 1e-5, "{} fine logits", model.name());
        assert_eq!(out.fine_logits.size()[0], bags);
        if let Some([_, fine]) = &out.attention {
            let attention = get(&expected, "attention").unsqueeze(1).expand([-1, 7], false);
            assert!(diff(fine, &attention) < 1e-6, "{} attention", model.name());
        }
        assert_eq!(out.attention.is_some(), model == ModelKind::Abmil, "only ABMIL of the flat models attends");
        let groups = ops::group_matrix(&fine_to_coarse, 3, Device::Cpu);
        let summed = out.fine_logits.softmax(-1, Kind::Float).matmul(&groups);
        assert!(diff(&out.coarse_logits.softmax(-1, Kind::Float), &summed) < 1e-6);
        assert!(out.scores.is_none());
    }

    #[test]
    fn cuda_every_model_matches_cpu() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: needs CUDA, and no GPU is available");
            return;
        }
        let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        for model in [ModelKind::Hmil, ModelKind::Abmil, ModelKind::Meanpool, ModelKind::Transmil] {
            let config = Config {
                model,
                dims: Dims { input: 16, n_coarse: 3, n_fine: 7 },
                fine_to_coarse: vec![0, 0, 0, 1, 1, 2, 2],
                dropout: 0.0,
                loss: Loss::default(),
                align_weight: 0.0,
            };
            tch::manual_seed(3);
            let cpu = nn::VarStore::new(Device::Cpu);
            let on_cpu = build(&cpu.root(), &config);
            let mut gpu = nn::VarStore::new(Device::Cuda(0));
            let on_gpu = build(&gpu.root(), &config);
            gpu.copy(&cpu).unwrap();
            let x = Tensor::randn([300 + 7 + 40, 16], (Kind::Float, Device::Cpu));
            let lengths = vec![300, 7, 40];
            let a = on_cpu.forward(&Batch::new(x.shallow_clone(), lengths.clone()), false);
            let b = on_gpu.forward(&Batch::new(x.to(Device::Cuda(0)), lengths), false);
            for (name, a, b) in
                [("fine", &a.fine_logits, &b.fine_logits), ("coarse", &a.coarse_logits, &b.coarse_logits)]
            {
                let diff = (a - b.to(Device::Cpu)).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{} {name} logits differ by {diff} between CPU and CUDA", model.name());
            }
            eprintln!("{}: CPU and CUDA agree", model.name());
        }
    }

    #[test]
    fn abmil_loads_clam_names_and_matches_pytorch() {
        matches_pytorch(ModelKind::Abmil);
    }

    #[test]
    fn meanpool_matches_pytorch() {
        matches_pytorch(ModelKind::Meanpool);
    }

    #[test]
    fn transmil_loads_its_published_names_and_matches_pytorch() {
        matches_pytorch(ModelKind::Transmil);
    }
}
