//! The workflow file: typed, strict (unknown keys and wrong types are errors naming key and
//! line), with paths resolved relative to the file and `--set key=value` overrides.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// A whole workflow file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    pub workflow: Meta,
    pub dataset: Dataset,
    /// Whole-slide images to make the features from, instead of `dataset.features`.
    pub slides: Option<Slides>,
    /// The TorchScript encoder that turns patches into features (with `[slides]`).
    pub encoder: Option<Encoder>,
    pub labels: Labels,
    #[serde(default)]
    pub splits: Splits,
    #[serde(default)]
    pub train: Train,
    #[serde(default)]
    pub evaluate: Evaluate,
    #[serde(default)]
    pub heatmaps: Heatmaps,
    /// `[variants.<name>]`: models and settings trained side by side over the same folds, each
    /// a table of `[train]` keys that override `[train]` (see [`Workflow::variants`]).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub variants: toml::Table,
    #[serde(default)]
    pub repeats: Repeats,
    #[serde(default)]
    pub report: ReportConfig,
    /// `[[cohorts]]`: external test sets every fold model predicts, never used for any choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cohorts: Vec<Cohort>,
    /// `[executor]`: where nodes that must run are run (never part of what they compute).
    #[serde(default)]
    pub executor: Executor,
}

/// `[executor]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Executor {
    pub kind: ExecutorKind,
    pub slurm: Slurm,
}

/// Where nodes run: on this machine (threads of this process), or each as a Slurm job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    #[default]
    Local,
    Slurm,
}

/// `[executor.slurm]`: how jobs are submitted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Slurm {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Jobs submitted at once, at most.
    pub max_jobs: usize,
    /// Seconds between two looks at the queue.
    pub poll_seconds: f64,
    /// sbatch options passed through verbatim, e.g. `--constraint=a100`.
    pub extra: Vec<String>,
    /// `[executor.slurm.resources.<stage>]`: a stage's jobs' resources, over the defaults.
    pub resources: std::collections::BTreeMap<String, JobResources>,
}

impl Default for Slurm {
    fn default() -> Self {
        Slurm {
            partition: None,
            account: None,
            qos: None,
            max_jobs: 50,
            poll_seconds: 10.0,
            extra: Vec::new(),
            resources: Default::default(),
        }
    }
}

/// What one job asks Slurm for; unset keys take the stage's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobResources {
    pub cpus: Option<u32>,
    /// Slurm's `--mem`, e.g. `"64G"`.
    pub mem: Option<String>,
    /// Slurm's `--time`, e.g. `"04:00:00"`.
    pub time: Option<String>,
    pub gpus: Option<u32>,
}

/// One external cohort: its feature files and labels (the same columns and classes as the
/// workflow's).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    pub name: String,
    pub features: PathBuf,
    pub labels: PathBuf,
}

/// `[repeats]`: training repeated with other seeds over the same folds.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Repeats {
    /// Training seeds (weights, bag order, dropout); the splits stay those of `workflow.seed`.
    /// Empty: `workflow.seed` alone.
    pub seeds: Vec<u64>,
}

/// `[report]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    /// The variant the others are compared with; default the first.
    pub compare_to: Option<String>,
}

/// One trained configuration: its name and its `[train]` settings.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub train: Train,
}

/// `[workflow]`: name, seed, where the cache lives.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    /// Directory of the cache and run records; default `.hmil-flow` beside the workflow file.
    #[serde(default = "default_workspace")]
    pub workspace: PathBuf,
    /// The results folder: the current outputs under readable names; default `results/<name>`
    /// beside the workflow file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<PathBuf>,
}

fn default_workspace() -> PathBuf {
    PathBuf::from(".hmil-flow")
}

/// What to do with a feature file that cannot be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadFile {
    #[default]
    Error,
    Skip,
}

/// Storage type of the packed feature store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PackDtype {
    #[default]
    F32,
    F16,
}

/// `[dataset]`: where the features and the label file are.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// A directory of per-slide feature files (`.pt`, `.h5`, `.safetensors`, `.npy`), searched
    /// recursively; not set when `[slides]` makes the features.
    pub features: Option<PathBuf>,
    /// The label CSV.
    pub labels: PathBuf,
    #[serde(default)]
    pub on_bad_file: OnBadFile,
    #[serde(default)]
    pub pack_dtype: PackDtype,
}

/// `[slides]`: a folder of whole-slide images, tiled at a target resolution.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Slides {
    /// Searched recursively for files OpenSlide reads (.svs .tif .tiff .ndpi .mrxs .scn .bif …).
    pub dir: PathBuf,
    /// Microns per pixel of the patches (0.5 when neither this nor `magnification` is set).
    pub mpp: Option<f64>,
    /// Objective magnification of the patches instead of `mpp` (20 means 0.5 µm per pixel).
    pub magnification: Option<f64>,
    /// Patch side in pixels at the target resolution.
    #[serde(default = "default_patch_size")]
    pub patch_size: u32,
    /// Microns per level-0 pixel of slides whose files do not say.
    pub mpp_fallback: Option<f64>,
    /// What to do with a slide OpenSlide cannot read: stop, or list it in `skipped.parquet`.
    #[serde(default)]
    pub on_bad_slide: OnBadFile,
    #[serde(default)]
    pub tissue: Tissue,
}

fn default_patch_size() -> u32 {
    256
}

impl Slides {
    /// Microns per pixel of the patches.
    pub fn target_mpp(&self) -> f64 {
        match (self.mpp, self.magnification) {
            (Some(mpp), _) => mpp,
            (None, Some(mag)) => 10.0 / mag,
            (None, None) => 0.5,
        }
    }
}

/// How the tissue threshold is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TissueMethod {
    /// Saturation above `threshold`.
    #[default]
    Saturation,
    /// Otsu's threshold of the saturation.
    Otsu,
}

/// `[slides.tissue]`: CLAM's tissue segmentation and its defaults; areas are in 512 × 512
/// level-0 patches.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tissue {
    pub method: TissueMethod,
    pub threshold: u8,
    pub median: u32,
    pub close: u32,
    pub min_area: f64,
    pub min_hole_area: f64,
    pub max_holes: usize,
}

impl Default for Tissue {
    fn default() -> Self {
        Tissue {
            method: TissueMethod::Saturation,
            threshold: 8,
            median: 7,
            close: 4,
            min_area: 100.0,
            min_hole_area: 16.0,
            max_holes: 8,
        }
    }
}

/// Precision of the encoder's forward pass on CUDA (the CPU computes in float32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderDtype {
    F32,
    #[default]
    F16,
    Bf16,
}

/// `[encoder]`: a TorchScript patch encoder and how patches are fed to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Encoder {
    /// A TorchScript file (`torch.jit.save`) mapping (B, 3, H, W) float images to (B, D).
    pub model: PathBuf,
    #[serde(default = "default_input_size")]
    pub input_size: u32,
    #[serde(default = "imagenet_mean")]
    pub mean: [f64; 3],
    #[serde(default = "imagenet_std")]
    pub std: [f64; 3],
    #[serde(default = "default_encoder_batch")]
    pub batch_size: usize,
    /// `auto`, `cpu`, or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub dtype: EncoderDtype,
    /// Threads reading and decoding patches (default: the cores, at most 8).
    pub readers: Option<usize>,
}

fn default_input_size() -> u32 {
    224
}
fn imagenet_mean() -> [f64; 3] {
    [0.485, 0.456, 0.406]
}
fn imagenet_std() -> [f64; 3] {
    [0.229, 0.224, 0.225]
}
fn default_encoder_batch() -> usize {
    256
}
fn default_device() -> String {
    "auto".into()
}

/// What to do with slides that have labels but no features (or the reverse), or bad labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    #[default]
    Error,
    Drop,
}

/// `[labels]`: CSV column names, policy, and the fine→coarse hierarchy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    #[serde(default = "default_case_column")]
    pub case_column: String,
    #[serde(default = "default_slide_column")]
    pub slide_column: String,
    #[serde(default = "default_label_column")]
    pub label_column: String,
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Coarse class → its fine classes, in declared order (that order numbers the classes).
    pub hierarchy: Hierarchy,
}

fn default_case_column() -> String {
    "case_id".into()
}
fn default_slide_column() -> String {
    "slide_id".into()
}
fn default_label_column() -> String {
    "label".into()
}

/// Coarse classes with their fine classes, in declared order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy(pub Vec<(String, Vec<String>)>);

impl Hierarchy {
    /// Fine class names in order.
    pub fn fine(&self) -> Vec<&str> {
        self.0.iter().flat_map(|(_, f)| f.iter().map(String::as_str)).collect()
    }

    /// Coarse class names in order.
    pub fn coarse(&self) -> Vec<&str> {
        self.0.iter().map(|(c, _)| c.as_str()).collect()
    }

    /// For each fine class index, its coarse class index.
    pub fn fine_to_coarse(&self) -> Vec<usize> {
        self.0.iter().enumerate().flat_map(|(c, (_, f))| std::iter::repeat_n(c, f.len())).collect()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.0.len() < 2 {
            return Err("needs at least two coarse classes".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (coarse, fine) in &self.0 {
            if fine.is_empty() {
                return Err(format!("coarse class `{coarse}` has no fine class"));
            }
            if let Some(dup) = fine.iter().find(|f| !seen.insert(f.as_str())) {
                return Err(format!("fine class `{dup}` is listed twice"));
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Hierarchy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Hierarchy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of coarse class = [fine classes]")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Hierarchy, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Vec<String>>()? {
                    out.push(entry);
                }
                Ok(Hierarchy(out))
            }
        }
        d.deserialize_map(Ordered)
    }
}

/// How folds are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitMethod {
    /// Stratified k-fold, grouped by case; each case is tested exactly once.
    #[default]
    Kfold,
    /// CLAM-style repeated sampling; test sets may overlap across folds.
    MonteCarlo,
    /// CLAM `splits_{k}.csv` files from `dir`.
    Import,
}

/// `[splits]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Splits {
    #[serde(default)]
    pub method: SplitMethod,
    /// How many folds `kfold` and `monte_carlo` make (5 when not set); `import` takes as many
    /// as there are files. Read it through [`Splits::folds`].
    pub folds: Option<usize>,
    /// Fraction of each class's cases held out for validation.
    #[serde(default = "default_frac")]
    pub val_frac: f64,
    /// `monte_carlo` only: fraction of each class's cases tested per fold.
    #[serde(default = "default_frac")]
    pub test_frac: f64,
    /// `import` only: directory with `splits_0.csv` …
    pub dir: Option<PathBuf>,
}

fn default_frac() -> f64 {
    0.1
}

impl Splits {
    /// Folds `kfold` and `monte_carlo` make: as set, or 5.
    pub fn folds(&self) -> usize {
        self.folds.unwrap_or(5)
    }
}

impl Default for Splits {
    fn default() -> Self {
        Splits {
            method: SplitMethod::Kfold,
            folds: None,
            val_frac: default_frac(),
            test_frac: default_frac(),
            dir: None,
        }
    }
}

/// How bags are weighted against class imbalance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    None,
    /// Draw training bags with probability inversely proportional to their fine class's size.
    Sampling,
    /// Weight the cross-entropy terms by inverse class frequency.
    LossWeights,
}

/// The validation metric that picks the checkpoint kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectMetric {
    #[default]
    FineAuc,
    FineAccuracy,
    CoarseAuc,
    Loss,
}

/// `[train.plateau]`: ReduceLROnPlateau on the validation loss.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plateau {
    pub factor: f64,
    pub patience: usize,
    #[serde(default)]
    pub min_lr: f64,
}

/// The network a variant trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Hierarchical MIL (Jin et al. 2025): class-wise attention at the coarse and fine levels.
    #[default]
    Hmil,
    /// Flat gated-attention MIL (Ilse et al. 2018) on the fine classes.
    Abmil,
    /// Flat MIL on the fine classes: the mean of the bag's embedded instances.
    Meanpool,
    /// TransMIL (Shao et al. 2021): Nyström self-attention and a convolutional positional
    /// encoding over the instances, on the fine classes.
    Transmil,
}

impl ModelKind {
    /// As the workflow names it.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Hmil => "hmil",
            ModelKind::Abmil => "abmil",
            ModelKind::Meanpool => "meanpool",
            ModelKind::Transmil => "transmil",
        }
    }

    /// Whether the model predicts the fine classes alone (its coarse prediction is the fine
    /// probabilities summed per coarse class).
    pub fn is_flat(self) -> bool {
        self != ModelKind::Hmil
    }

    /// Whether the model weighs instances by attention (what `attention.parquet`,
    /// `agreement.parquet` and attention heatmaps show).
    pub fn attends(self) -> bool {
        matches!(self, ModelKind::Hmil | ModelKind::Abmil)
    }
}

/// How HMIL's curriculum moves weight from the coarse cross-entropy to the contrastive loss
/// over training: `alpha` weighs the first and `1 − alpha` the second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Curriculum {
    /// `alpha = 1 − (e/E)²`, as published.
    #[default]
    Quadratic,
    /// `alpha = 1 − e/E`.
    Linear,
    /// No trade-off: both terms at full weight in every epoch.
    None,
}

/// `[train.loss]`: HMIL's loss terms, each of which can be switched off for an ablation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Loss {
    /// Cross-entropy of the coarse logits.
    pub coarse_ce: bool,
    /// Cross-entropy of the fine probabilities summed per coarse class.
    pub regulariser: bool,
    /// Supervised contrastive loss over the fine class-wise bag embeddings.
    pub contrastive: bool,
    pub curriculum: Curriculum,
}

impl Default for Loss {
    fn default() -> Self {
        Loss { coarse_ce: true, regulariser: true, contrastive: true, curriculum: Curriculum::Quadratic }
    }
}

/// `[train]`: the model and its optimisation (defaults are HMIL's published ones).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Train {
    pub model: ModelKind,
    /// HMIL's loss terms (flat models train on the fine cross-entropy alone).
    pub loss: Loss,
    pub epochs: usize,
    /// Bags per mini-batch.
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Dropout after tanh/sigmoid in the attention (0 disables it).
    pub dropout: f64,
    /// Weight of the attention-alignment loss (computed but unused by the published code).
    pub align_weight: f64,
    /// `auto`, `cpu`, or `cuda:N`.
    pub device: String,
    /// bfloat16 autocast on CUDA.
    pub bf16: bool,
    pub select: SelectMetric,
    pub balance: Balance,
    pub plateau: Option<Plateau>,
    /// Stop after this many epochs without a better validation score.
    pub early_stopping: Option<usize>,
    /// A safetensors checkpoint (published parameter names) to start from.
    pub init_from: Option<PathBuf>,
    /// CPU threads for libtorch (default: all cores).
    pub threads: Option<usize>,
    /// Instances a training step runs through the network at once: a mini-batch with more runs
    /// in chunks of bags with the gradients of one pass (see `models::chunked`). Default: as many
    /// as half the free memory holds (of the GPU, or of the machine on the CPU), and at most
    /// 1.5 GiB of activations on the CPU. Chunks change only float rounding (and, with dropout,
    /// which masks are drawn), so this is not part of the cache key.
    pub max_instances_per_chunk: Option<u64>,
    /// Where a GPU reads the packed features from: `auto` (the GPU when the store fits beside
    /// training, else streamed), `device`, or `stream` (batches copied from pinned host memory).
    /// The CPU always reads the memory-mapped file. Not part of the cache key.
    pub store: StoreMode,
}

/// `train.store`: where a GPU reads the packed features from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    #[default]
    Auto,
    Device,
    Stream,
}

impl Default for Train {
    fn default() -> Self {
        Train {
            model: ModelKind::Hmil,
            loss: Loss::default(),
            epochs: 200,
            batch_size: 64,
            lr: 1e-4,
            weight_decay: 0.0,
            dropout: 0.0,
            align_weight: 0.0,
            device: default_device(),
            bf16: false,
            select: SelectMetric::FineAuc,
            balance: Balance::None,
            plateau: None,
            early_stopping: None,
            init_from: None,
            threads: None,
            max_instances_per_chunk: None,
            store: StoreMode::Auto,
        }
    }
}

/// `[evaluate]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Evaluate {
    /// Instances per slide and class kept in `attention.parquet`.
    pub attention_top_k: usize,
    /// Bags per forward pass.
    pub batch_size: usize,
}

impl Default for Evaluate {
    fn default() -> Self {
        Evaluate { attention_top_k: 16, batch_size: 64 }
    }
}

/// What heatmap panels colour and top tiles are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    /// Each instance's share of the class's logit above the mean of the classes' logits: where
    /// the model found evidence for the class.
    Evidence,
    /// The class's attention (as CLAM draws it): where the class's logit reads, for or against.
    Attention,
}

impl MapKind {
    /// As the workflow and the command line name it.
    pub fn name(self) -> &'static str {
        match self {
            MapKind::Evidence => "evidence",
            MapKind::Attention => "attention",
        }
    }
}

/// `[heatmaps]`: what each fold draws for its test slides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heatmaps {
    pub map: MapKind,
    /// Patches per class at each end (highest, lowest) of a slide's top-tiles mosaic; 0: none.
    pub top_tiles: usize,
    /// With `dataset.features`: the slides the features were made from (matched by slide id,
    /// the file stem), to draw on and cut tiles from.
    pub slides: Option<PathBuf>,
}

impl Default for Heatmaps {
    fn default() -> Self {
        Heatmaps { map: MapKind::Evidence, top_tiles: 8, slides: None }
    }
}

/// A `key=value` setting applied over the workflow file, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub text: String,
    /// `--set` or `HMIL_FLOW_SET`, for messages.
    pub from: &'static str,
}

impl Setting {
    /// A setting given with `--set`.
    pub fn cli(text: &str) -> Setting {
        Setting { text: text.to_owned(), from: "--set" }
    }

    /// The settings in the value of `HMIL_FLOW_SET`: separated by whitespace, except inside
    /// single or double quotes, which are removed (`dataset.features="/data/my slides"`).
    pub fn from_env(value: &str) -> Result<Vec<Setting>> {
        let mut out = Vec::new();
        let (mut word, mut quote, mut started) = (String::new(), None, false);
        for c in value.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => word.push(c),
                (None, '"' | '\'') => (quote, started) = (Some(c), true),
                (None, c) if c.is_whitespace() => {
                    if started || !word.is_empty() {
                        out.push(Setting { text: std::mem::take(&mut word), from: "HMIL_FLOW_SET" });
                    }
                    started = false;
                }
                (None, c) => word.push(c),
            }
        }
        if let Some(q) = quote {
            return Err(Error::Override {
                from: "HMIL_FLOW_SET",
                setting: value.to_owned(),
                message: format!("unclosed {q} quote"),
            });
        }
        if started || !word.is_empty() {
            out.push(Setting { text: word, from: "HMIL_FLOW_SET" });
        }
        Ok(out)
    }

    /// The dotted key this setting sets.
    fn key(&self) -> &str {
        self.text.split_once('=').map_or(self.text.as_str(), |(k, _)| k).trim()
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Override { from: self.from, setting: self.text.clone(), message: message.into() }
    }
}

impl Workflow {
    /// Reads, validates and resolves a workflow file, applying `key=value` overrides.
    pub fn load(path: &Path, overrides: &[Setting]) -> Result<Workflow> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::parse(&text, path, overrides)
    }

    /// Like [`Workflow::load`] for text read already from `path`.
    pub fn parse(text: &str, path: &Path, overrides: &[Setting]) -> Result<Workflow> {
        let parse_err = |e: toml::de::Error| Error::Parse { path: path.into(), message: e.to_string() };
        // Parse the text as written first, so errors carry its line numbers.
        let mut wf: Workflow = toml::from_str(text).map_err(parse_err)?;
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
            // One at a time, so an error names the setting that caused it.
            for o in overrides {
                apply_override(&mut table, o)?;
                wf = table.clone().try_into().map_err(|e: toml::de::Error| o.error(e.message()))?;
            }
        }
        wf.validate().map_err(|(key, message)| {
            let origin = overrides
                .iter()
                .rev()
                .find(|o| o.key() == key)
                .map_or_else(String::new, |o| format!(" (from {} {})", o.from, o.text));
            Error::Invalid { path: path.into(), key, message, origin }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        wf.resolve(base);
        Ok(wf)
    }

    /// Checks that the dataset paths exist, naming the key to set when one does not.
    pub fn check_paths(&self) -> Result<()> {
        let (source_key, source) = self.feature_source();
        let mut required = vec![(source_key, source), ("dataset.labels", self.dataset.labels.as_path())];
        if let Some(e) = &self.encoder {
            required.push(("encoder.model", e.model.as_path()));
        }
        if let Some(dir) = &self.heatmaps.slides {
            required.push(("heatmaps.slides", dir.as_path()));
        }
        for c in &self.cohorts {
            required.push(("cohorts.features", c.features.as_path()));
            required.push(("cohorts.labels", c.labels.as_path()));
        }
        for (key, path) in required {
            if !path.exists() {
                return Err(Error::MissingPath { key: key.into(), path: path.to_path_buf() });
            }
        }
        let features = absolute(source);
        let results = self.workflow.results.as_deref().unwrap_or(Path::new(""));
        for (key, path) in [("workflow.workspace", self.workflow.workspace.as_path()), ("workflow.results", results)] {
            if absolute(path).starts_with(&features) {
                let (key, path, features) = (key.into(), path.to_path_buf(), source.to_path_buf());
                return Err(Error::InsideFeatures { key, path, source_key: source_key.into(), features });
            }
        }
        Ok(())
    }

    /// The variants to train, in the order the file gives them: each `[variants.<name>]` table
    /// laid over `[train]` (nested tables such as `loss` key by key). Without `[variants]`, one
    /// variant named for `train.model`.
    pub fn variants(&self) -> Vec<Variant> {
        if self.variants.is_empty() {
            return vec![Variant { name: self.train.model.name().into(), train: self.train.clone() }];
        }
        self.variants
            .iter()
            .map(|(name, value)| Variant {
                name: name.clone(),
                train: self.variant_train(value).expect("variants are checked when the workflow is loaded"),
            })
            .collect()
    }

    /// `[train]` with `overrides` (a variant's table) laid over it.
    fn variant_train(&self, overrides: &toml::Value) -> std::result::Result<Train, String> {
        let Some(overrides) = overrides.as_table() else {
            return Err("must be a table of [train] keys, e.g. `model = \"abmil\"`".into());
        };
        let mut base = toml::Table::try_from(&self.train).map_err(|e| e.to_string())?;
        merge(&mut base, overrides);
        base.try_into().map_err(|e: toml::de::Error| e.message().to_owned())
    }

    /// The training seeds: `[repeats] seeds`, or `workflow.seed`.
    pub fn seeds(&self) -> Vec<u64> {
        if self.repeats.seeds.is_empty() { vec![self.workflow.seed] } else { self.repeats.seeds.clone() }
    }

    /// Whether nodes are named by variant, by seed: when the workflow has `[variants]`, `[repeats]`.
    pub fn fans_out(&self) -> (bool, bool) {
        (!self.variants.is_empty(), !self.repeats.seeds.is_empty())
    }

    /// The folder of slides heatmaps are drawn on: `slides.dir`, or `heatmaps.slides`.
    pub fn heatmap_slides(&self) -> Option<&Path> {
        self.slides.as_ref().map(|s| s.dir.as_path()).or(self.heatmaps.slides.as_deref())
    }

    /// Where the features come from: `slides.dir` with `[slides]`, else `dataset.features`,
    /// with its key (validation makes sure one is set).
    pub fn feature_source(&self) -> (&'static str, &Path) {
        match (&self.slides, &self.dataset.features) {
            (Some(s), _) => ("slides.dir", &s.dir),
            (None, Some(f)) => ("dataset.features", f),
            (None, None) => unreachable!("validate requires dataset.features or [slides]"),
        }
    }

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((key.to_owned(), message));
        self.labels.hierarchy.validate().or_else(|m| bad("labels.hierarchy", m))?;
        let name = &self.workflow.name;
        if name.trim().is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return bad(
                "workflow.name",
                format!("`{name}` names the results folder: give a name without `/` or a leading `.`"),
            );
        }
        match (&self.dataset.features, &self.slides, &self.encoder) {
            (None, None, _) => {
                return bad(
                    "dataset.features",
                    "set the folder of feature files, or add [slides] and [encoder]".into(),
                );
            }
            (Some(_), Some(_), _) => {
                return bad(
                    "dataset.features",
                    "is set beside [slides]: the features come from one or the other".into(),
                );
            }
            (None, Some(_), None) => return bad("encoder", "[slides] needs an [encoder] (a TorchScript file)".into()),
            (Some(_), None, Some(_)) => return bad("encoder", "[encoder] is only read with [slides]".into()),
            (None, Some(_), _) if self.heatmaps.slides.is_some() => {
                return bad(
                    "heatmaps.slides",
                    "is for workflows from features; with [slides], heatmaps are drawn on slides.dir".into(),
                );
            }
            _ => {}
        }
        if let Some(sl) = &self.slides {
            if sl.mpp.is_some() && sl.magnification.is_some() {
                return bad("slides.magnification", "is set beside slides.mpp: give one".into());
            }
            if !(sl.target_mpp().is_finite() && sl.target_mpp() > 0.0) {
                return bad("slides.mpp", format!("{} is not a positive resolution", sl.target_mpp()));
            }
            if sl.patch_size < 8 {
                return bad("slides.patch_size", format!("{} pixels is too small a patch", sl.patch_size));
            }
            if sl.mpp_fallback.is_some_and(|m| m.is_nan() || m <= 0.0) {
                return bad("slides.mpp_fallback", "must be positive microns per pixel".into());
            }
        }
        if let Some(e) = &self.encoder {
            if e.batch_size == 0 {
                return bad("encoder.batch_size", "must be at least 1".into());
            }
            if e.input_size < 8 {
                return bad("encoder.input_size", format!("{} pixels is too small an input", e.input_size));
            }
            if !valid_device(&e.device) {
                return bad("encoder.device", format!("`{}`: expected \"auto\", \"cpu\" or \"cuda:N\"", e.device));
            }
        }
        let s = &self.splits;
        if s.folds() < 1 || (s.method == SplitMethod::Kfold && s.folds() < 2) {
            return bad("splits.folds", format!("{} folds: kfold needs at least 2, other methods 1", s.folds()));
        }
        for (key, v) in [("splits.val_frac", s.val_frac), ("splits.test_frac", s.test_frac)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("{v} is not in [0, 1)"));
            }
        }
        let t = &self.train;
        for (key, value) in [("train.epochs", t.epochs), ("train.batch_size", t.batch_size)] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if t.lr.is_nan() || t.lr <= 0.0 {
            return bad("train.lr", format!("{} is not a positive learning rate", t.lr));
        }
        if !(0.0..1.0).contains(&t.dropout) {
            return bad("train.dropout", format!("{} is not in [0, 1)", t.dropout));
        }
        if t.max_instances_per_chunk == Some(0) {
            return bad("train.max_instances_per_chunk", "must be at least 1".into());
        }
        if !valid_device(&t.device) {
            return bad("train.device", format!("`{}`: expected \"auto\", \"cpu\" or \"cuda:N\"", t.device));
        }
        for (name, value) in &self.variants {
            let key = format!("variants.{name}");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return bad(
                    &key,
                    "name a variant with letters, digits, `_` and `-` (it names folders and nodes)".into(),
                );
            }
            if value.get("init_from").is_some() {
                return bad(&format!("{key}.init_from"), "set init_from in [train], for every variant".into());
            }
            if let Err(m) = self.variant_train(value) {
                return bad(&key, m);
            }
        }
        for (i, c) in self.cohorts.iter().enumerate() {
            let key = format!("cohorts[{i}].name");
            if c.name.is_empty() || !c.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return bad(&key, format!("`{}`: name a cohort with letters, digits, `_` and `-`", c.name));
            }
            if self.cohorts[..i].iter().any(|o| o.name == c.name) {
                return bad(&key, format!("`{}` names two cohorts", c.name));
            }
        }
        let sl = &self.executor.slurm;
        if sl.max_jobs == 0 {
            return bad("executor.slurm.max_jobs", "must be at least 1".into());
        }
        if !(sl.poll_seconds.is_finite() && sl.poll_seconds > 0.0) {
            return bad(
                "executor.slurm.poll_seconds",
                format!("{} is not a positive number of seconds", sl.poll_seconds),
            );
        }
        for (stage, r) in &sl.resources {
            if r.cpus == Some(0) {
                return bad(&format!("executor.slurm.resources.{stage}.cpus"), "must be at least 1".into());
            }
        }
        let mut seeds = self.repeats.seeds.clone();
        seeds.sort_unstable();
        if seeds.windows(2).any(|w| w[0] == w[1]) {
            return bad("repeats.seeds", format!("{:?} repeats a seed", self.repeats.seeds));
        }
        if let Some(to) = &self.report.compare_to {
            let names: Vec<String> = self.variants().into_iter().map(|v| v.name).collect();
            if !names.contains(to) {
                return bad("report.compare_to", format!("`{to}` is not a variant; the variants are {names:?}"));
            }
        }
        if self.evaluate.batch_size == 0 {
            return bad("evaluate.batch_size", "must be at least 1".into());
        }
        if s.method == SplitMethod::Import && s.dir.is_none() {
            return bad("splits.dir", "method \"import\" needs the directory of splits_{k}.csv files".into());
        }
        Ok(())
    }

    fn resolve(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.workflow.workspace);
        let results = self.workflow.results.get_or_insert_with(|| Path::new("results").join(&self.workflow.name));
        join(results);
        if let Some(features) = &mut self.dataset.features {
            join(features);
        }
        if let Some(slides) = &mut self.slides {
            join(&mut slides.dir);
        }
        if let Some(encoder) = &mut self.encoder {
            join(&mut encoder.model);
        }
        join(&mut self.dataset.labels);
        if let Some(dir) = &mut self.splits.dir {
            join(dir);
        }
        if let Some(file) = &mut self.train.init_from {
            join(file);
        }
        if let Some(dir) = &mut self.heatmaps.slides {
            join(dir);
        }
        for c in &mut self.cohorts {
            join(&mut c.features);
            join(&mut c.labels);
        }
    }
}

/// Lays `over` onto `base`: tables key by key, other values replaced.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Whether `device` is `auto`, `cpu` or `cuda:N`.
fn valid_device(device: &str) -> bool {
    device == "auto" || device == "cpu" || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok())
}

/// `path` with its longest existing ancestor resolved (links followed) and the rest appended,
/// so that paths not yet made compare with existing ones.
fn absolute(path: &Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(resolved) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(resolved, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Sets `a.b.c=value` in `table`; the value is read as TOML, or else taken as a string.
fn apply_override(table: &mut toml::Table, setting: &Setting) -> Result<()> {
    let bad = |message: &str| setting.error(message);
    let (key, raw) = setting.text.split_once('=').ok_or_else(|| bad("expected key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|l| !l.is_empty()).ok_or_else(|| bad("empty key"))?;
    let mut cur = table;
    for part in parts {
        cur = cur
            .entry(part)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{part}` is not a table")))?;
    }
    cur.insert(last.to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[workflow]
name = "t"

[dataset]
features = "feats"
labels = "labels.csv"

[labels.hierarchy]
benign = ["N", "PB", "UDH"]
atypical = ["FEA", "ADH"]
malignant = ["DCIS", "IC"]
"#;

    #[test]
    fn loads_with_defaults_and_resolves_paths() {
        let wf = Workflow::parse(MINIMAL, Path::new("/w/flow.toml"), &[]).unwrap();
        assert_eq!(wf.dataset.features.as_deref().unwrap(), Path::new("/w/feats"));
        assert_eq!(wf.workflow.workspace, Path::new("/w/.hmil-flow"));
        assert_eq!(wf.labels.hierarchy.fine(), ["N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC"]);
        assert_eq!(wf.labels.hierarchy.coarse(), ["benign", "atypical", "malignant"]);
        assert_eq!(wf.labels.hierarchy.fine_to_coarse(), [0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(wf.splits.folds(), 5);
    }

    #[test]
    fn results_or_workspace_inside_the_features_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("feats")).unwrap();
        std::fs::write(dir.path().join("labels.csv"), "").unwrap();
        let flow = dir.path().join("flow.toml");
        assert!(Workflow::parse(MINIMAL, &flow, &[]).unwrap().check_paths().is_ok());
        let inside = Workflow::parse(MINIMAL, &flow, &[Setting::cli("workflow.results=feats/results/t")]).unwrap();
        let err = inside.check_paths().unwrap_err().to_string();
        assert!(err.contains("workflow.results = ") && err.contains("is inside dataset.features"), "{err}");
        let everything = Workflow::parse(MINIMAL, &flow, &[Setting::cli("dataset.features=.")]).unwrap();
        let err = everything.check_paths().unwrap_err().to_string();
        assert!(err.starts_with("workflow.workspace = "), "{err}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("labels = \"labels.csv\"", "labels = \"labels.csv\"\nfeaturez = 1");
        let err = Workflow::parse(&text, Path::new("f.toml"), &[]).unwrap_err().to_string();
        assert!(err.contains("featurez") && err.contains("line 8"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = format!("{MINIMAL}\n[splits]\nfolds = \"ten\"\n");
        let err = Workflow::parse(&text, Path::new("f.toml"), &[]).unwrap_err().to_string();
        assert!(err.contains("line 15") && err.contains("folds"), "{err}");
    }

    #[test]
    fn overrides_apply_and_are_validated() {
        let wf = Workflow::parse(
            MINIMAL,
            Path::new("/w/f.toml"),
            &[Setting::cli("dataset.features=/data/x"), Setting::cli("splits.folds=10")],
        )
        .unwrap();
        assert_eq!(wf.dataset.features.as_deref().unwrap(), Path::new("/data/x"));
        assert_eq!(wf.splits.folds(), 10);
        let err =
            Workflow::parse(MINIMAL, Path::new("f.toml"), &[Setting::cli("splits.fold=3")]).unwrap_err().to_string();
        assert!(err.starts_with("--set splits.fold=3: ") && err.contains("fold"), "{err}");
        let err =
            Workflow::parse(MINIMAL, Path::new("f.toml"), &[Setting::cli("splits.folds=1")]).unwrap_err().to_string();
        assert!(err.contains("splits.folds") && err.ends_with("(from --set splits.folds=1)"), "{err}");
    }

    #[test]
    fn each_zero_is_reported_under_its_own_key() {
        for key in ["train.batch_size", "train.epochs"] {
            let err = Workflow::parse(MINIMAL, Path::new("f.toml"), &[Setting::cli(&format!("{key}=0"))])
                .unwrap_err()
                .to_string();
            assert_eq!(err, format!("f.toml: `{key}`: must be at least 1 (from --set {key}=0)"));
        }
    }

    #[test]
    fn environment_settings_say_where_they_came_from_and_take_quotes() {
        let set = Setting::from_env(r#"  dataset.features="/data/my slides"   train.lr=3e-4 x='a "b"' "#).unwrap();
        let texts: Vec<&str> = set.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["dataset.features=/data/my slides", "train.lr=3e-4", r#"x=a "b""#]);
        let wf = Workflow::parse(MINIMAL, Path::new("/w/f.toml"), &set[..2]).unwrap();
        assert_eq!(wf.dataset.features.as_deref().unwrap(), Path::new("/data/my slides"));
        let err = Workflow::parse(MINIMAL, Path::new("f.toml"), &Setting::from_env("train.epoch=3").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("HMIL_FLOW_SET train.epoch=3: "), "{err}");
        let err = Setting::from_env("a=\"b").unwrap_err().to_string();
        assert!(err.contains("unclosed \" quote"), "{err}");
    }

    #[test]
    fn hierarchy_rejects_repeated_fine_class() {
        let text = MINIMAL.replace("\"DCIS\", \"IC\"", "\"DCIS\", \"N\"");
        let err = Workflow::parse(&text, Path::new("f.toml"), &[]).unwrap_err().to_string();
        assert!(err.contains("labels.hierarchy") && err.contains("`N`"), "{err}");
    }

    #[test]
    fn variants_lay_their_keys_over_train_and_say_what_is_wrong() {
        let text = format!(
            "{MINIMAL}\n[train]\nepochs = 7\nlr = 0.001\n[variants.hmil]\n[variants.flat]\nmodel = \"abmil\"\nlr = 0.01\n\
             [variants.no_con]\nloss = {{ contrastive = false }}\n[repeats]\nseeds = [3, 1]\n"
        );
        let wf = Workflow::parse(&text, Path::new("f.toml"), &[]).unwrap();
        let v = wf.variants();
        assert_eq!(v.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["hmil", "flat", "no_con"]);
        assert_eq!((v[0].train.model, v[0].train.lr, v[0].train.epochs), (ModelKind::Hmil, 0.001, 7));
        assert_eq!((v[1].train.model, v[1].train.lr, v[1].train.epochs), (ModelKind::Abmil, 0.01, 7));
        assert_eq!(v[2].train.loss, Loss { contrastive: false, ..Loss::default() }, "one key of a nested table");
        assert_eq!((wf.seeds(), wf.fans_out()), (vec![3, 1], (true, true)));

        let plain = Workflow::parse(MINIMAL, Path::new("f.toml"), &[]).unwrap();
        assert_eq!(plain.variants().len(), 1);
        assert_eq!((plain.seeds(), plain.fans_out()), (vec![plain.workflow.seed], (false, false)));

        let bad = |extra: &str| {
            Workflow::parse(&format!("{MINIMAL}\n{extra}"), Path::new("f.toml"), &[]).unwrap_err().to_string()
        };
        let err = bad("[variants.x]\nmodle = \"abmil\"\n");
        assert!(err.contains("`variants.x`") && err.contains("modle"), "{err}");
        let err = bad("[variants.x]\nmodel = \"transformer\"\n");
        assert!(err.contains("`variants.x`") && err.contains("transformer"), "{err}");
        let err = bad("[variants.\"a/b\"]\n");
        assert!(err.contains("letters, digits"), "{err}");
        let err = bad("[variants.a]\n[report]\ncompare_to = \"b\"\n");
        assert!(err.contains("`b` is not a variant") && err.contains("[\"a\"]"), "{err}");
        let err = bad("[repeats]\nseeds = [1, 2, 1]\n");
        assert!(err.contains("repeats a seed"), "{err}");
    }
}
