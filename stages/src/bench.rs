//! Benchmarks shipped with the tool (`hmil-flow bench …`): feature indexing against plain reads,
//! a training epoch against the machine's matrix-multiply floor, and feature extraction against
//! its reader and its encoder alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use models::chunked::{self, Chunks};
use models::{Batch, Schedule, Targets};
use schemas::workflow::ModelKind;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::hmil::train::{Classes, build_model, model_config};
use crate::hmil::{data, memory};
use crate::index::{FACTS_KIND, FileFacts, facts, feature_files, scan};
use crate::rng::Rng;

/// Tries per measurement of [`index`]; the best is kept.
pub const REPEATS: usize = 5;

/// Indexing throughput against plain reading, and the cost of an unchanged re-index.
#[derive(Debug)]
pub struct IndexReport {
    pub files: usize,
    pub bytes: u64,
    /// Page cache holding the files: (plain read, first index) seconds.
    pub warm: (f64, f64),
    /// Files evicted from the page cache before each try, as on first contact with a dataset.
    pub cold: (f64, f64),
    pub reindex_s: f64,
    /// Files whose bytes the unchanged re-index read.
    pub reindex_files_read: usize,
}

/// Times plain reading of every feature file under `dir` against indexing them with an empty
/// digest cache (reading, hashing, parsing), both on all cores, then an unchanged re-index.
/// Plain and index tries alternate, [`REPEATS`] of each, and the best of each is kept; once with
/// the files in the page cache, once with them evicted before every try.
pub fn index(dir: &Path, scratch: &Path) -> Result<IndexReport> {
    let files = feature_files(dir)?;
    let check = |rows: Vec<std::result::Result<_, (std::path::PathBuf, String)>>| match rows
        .into_iter()
        .find(std::result::Result::is_err)
    {
        Some(Err((path, message))) => Err(Error::BadFile { path, message }),
        _ => Ok(()),
    };
    let bytes = AtomicUsize::new(0);
    // Plain reading on the same threads as indexing: each file read whole, nothing else.
    let plain = || -> Result<()> {
        check(scan(
            &files,
            |path, _| {
                let n = std::fs::read(path).map_err(|e| e.to_string())?.len();
                bytes.fetch_add(n, Ordering::Relaxed);
                Ok((String::new(), FileFacts { n_instances: 0, dim: 0, dtype: String::new(), has_coords: false }))
            },
            || {},
        ))
    };
    let reads = AtomicUsize::new(0);
    let index = |cache: &pipeline::StatCache| -> Result<()> {
        check(scan(
            &files,
            |path, format| {
                cache.file_facts(path, FACTS_KIND, |b| {
                    reads.fetch_add(1, Ordering::Relaxed);
                    facts(format, b)
                })
            },
            || {},
        ))
    };
    let evict = || -> Result<()> {
        for (_, path, _) in &files {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).map_err(|e| Error::io(path, e.into()))?;
        }
        Ok(())
    };
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let cache_file = scratch.join("bench-stat-cache.json");
    let measure = |cold: bool| -> Result<(f64, f64)> {
        let (mut best_plain, mut best_index) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..REPEATS {
            if cold {
                evict()?;
            }
            best_plain = best_plain.min(time(&plain)?);
            if cold {
                evict()?;
            }
            // An empty digest cache each time: every file is read, hashed and parsed.
            let cache = pipeline::StatCache::load(cache_file.clone());
            best_index = best_index.min(time(&|| index(&cache))?);
        }
        Ok((best_plain, best_index))
    };
    plain()?;
    let total = bytes.swap(0, Ordering::Relaxed) as u64;
    let warm = measure(false)?;
    let cold = measure(true)?;
    let cache = pipeline::StatCache::load(cache_file);
    index(&cache)?;
    reads.store(0, Ordering::Relaxed);
    let reindex_s = time(&|| index(&cache))?;
    Ok(IndexReport {
        files: files.len(),
        bytes: total,
        warm,
        cold,
        reindex_s,
        reindex_files_read: reads.load(Ordering::Relaxed),
    })
}

/// One training epoch against the floor the machine's fp32 matmul throughput sets.
#[derive(Debug)]
pub struct EpochReport {
    pub model: ModelKind,
    pub slides: usize,
    pub instances: i64,
    pub dim: i64,
    pub threads: usize,
    pub device: String,
    /// Training FLOPs per instance (forward and backward of every layer): the epoch's FLOPs
    /// divided by its instances.
    pub flops_per_instance: f64,
    /// fp32 matmul throughput, GFLOP/s, measured before every epoch and after the last: the
    /// lowest and the highest (the floor uses the highest).
    pub matmul_gflops: (f64, f64),
    pub floor_s: f64,
    pub epoch_s: Vec<f64>,
    /// Bytes of the resident features, and the process's peak resident set size after the
    /// last epoch.
    pub features_bytes: u64,
    pub peak_rss_bytes: u64,
    /// The instances a step ran at once, and why.
    pub step_budget: String,
    /// The share of the epochs' instances that ran forward twice (in chunks of a step but its
    /// largest; see [`chunked::step`]), and the shares that did so from their kept stem outputs
    /// and from their kept product outputs.
    pub recomputed: f64,
    pub past_stem: f64,
    pub past_product: f64,
}

/// The peak resident set size of this process so far, in bytes (0 where unknown).
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    // Linux reports kilobytes.
    usage.ru_maxrss.max(0) as u64 * 1024
}

/// Multiply–accumulates per instance of every linear layer (forward): the first layer's (whose
/// input needs no gradient) and the rest's.
fn macs_per_instance(model: ModelKind, d: f64, n_coarse: f64, n_fine: f64) -> (f64, f64) {
    match model {
        // The feature extractor's second layer folded into the four layers that read it
        // (256 → 256 + 2 × 256 + 1), the coarse attention's output, the fine attention's two
        // gates and output, and the fine classifier. The per-pass product of the folded weights
        // (769 × D × 256) does not grow with instances and is left out.
        ModelKind::Hmil => {
            let rest = 256.0 * 769.0 + 256.0 * n_coarse + 2.0 * 256.0 * 64.0 + 64.0 * n_fine + 256.0;
            (d * 256.0, rest)
        }
        // Gated attention 512 → 2 × 256 → 1, and the weighted sum.
        ModelKind::Abmil => (d * 512.0, 2.0 * 512.0 * 256.0 + 256.0 + 512.0),
        ModelKind::Meanpool => (d * 512.0, 512.0),
        // Per token (padded to whole landmarks): two layers of Nyström attention (q, k, v and
        // out: 4 × 512²; the products with the landmarks: 3 × 256 × 512 and 8 heads × 256²) and
        // the PPEG's depth-wise 7², 5², 3² convolutions; see `macs_per_bag` for the rest.
        ModelKind::Transmil => {
            (d * 512.0, 2.0 * (4.0 * 512.0 * 512.0 + 3.0 * 256.0 * 512.0 + 8.0 * 256.0 * 256.0) + 83.0 * 512.0)
        }
    }
}

/// Multiply–accumulates per bag that do not grow with its instances: TransMIL's pseudo-inverse
/// of the landmark attention (2 layers × 6 iterations × 4 products of 256² × 256, 8 heads).
fn macs_per_bag(model: ModelKind) -> f64 {
    match model {
        ModelKind::Transmil => 2.0 * 6.0 * 4.0 * 256f64.powi(3) * 8.0,
        _ => 0.0,
    }
}

/// The tokens a bag of `n` instances costs: TransMIL pads its sequence to whole landmarks.
fn tokens(model: ModelKind, n: i64) -> f64 {
    match model {
        ModelKind::Transmil => ((n + 1 + 255) / 256).max(1) as f64 * 256.0,
        _ => n as f64,
    }
}

/// What [`epoch`] trains.
#[derive(Debug, Clone)]
pub struct EpochSetup {
    pub model: ModelKind,
    /// Synthetic bags of about `instances` instances each (lognormal) of dimension `dim`.
    pub slides: usize,
    pub instances: usize,
    pub dim: i64,
    pub epochs: usize,
    /// Bags per step.
    pub batch_size: usize,
    /// Where the features are resident and the network trains.
    pub device: Device,
    /// As `train.max_instances_per_chunk`.
    pub max_instances_per_chunk: Option<u64>,
    /// Features held as f16 (as an f16 store holds them), else f32.
    pub half: bool,
}

impl EpochSetup {
    /// The 1,000-instance preset ([`PRESET_SLIDES`] slides of about [`PRESET_INSTANCES`]
    /// instances, f32 features) with this setup's network, dimension, epochs, batch size, device
    /// and step budget.
    pub fn preset(&self) -> EpochSetup {
        EpochSetup { slides: PRESET_SLIDES, instances: PRESET_INSTANCES, half: false, ..self.clone() }
    }
}

/// Slides and median instances per slide of the preset `bench epoch` runs by default (BRACS's
/// slide count at about 1,000 instances each).
pub const PRESET_SLIDES: usize = 545;
pub const PRESET_INSTANCES: usize = 1000;

/// Times training epochs as `setup` says, with each step run as training runs it (in chunks of
/// bags when a mini-batch has more instances than a step may hold).
pub fn epoch(setup: &EpochSetup) -> Result<EpochReport> {
    let mut trainer = Trainer::new(setup)?;
    let mut gflops = Vec::new();
    let mut epoch_s = Vec::new();
    for _ in 0..setup.epochs {
        gflops.push(matmul_throughput(setup.dim, setup.device));
        epoch_s.push(trainer.epoch());
    }
    gflops.push(matmul_throughput(setup.dim, setup.device));
    Ok(trainer.report(epoch_s, &gflops))
}

/// [`epoch`] of `setup` and of `preset` (its [`preset`](EpochSetup::preset)) at once, their epochs alternating (the preset's first):
/// what the machine's speed does over the minutes both take falls on both alike, so that the
/// time per instance of each pair of epochs compares them. Both sets of features are resident
/// throughout; the peak RSS is that of both.
pub fn epoch_against(setup: &EpochSetup, preset: &EpochSetup) -> Result<(EpochReport, EpochReport)> {
    let mut trainers = [Trainer::new(preset)?, Trainer::new(setup)?];
    let mut gflops = Vec::new();
    let mut epoch_s = [Vec::new(), Vec::new()];
    for _ in 0..setup.epochs.max(preset.epochs) {
        gflops.push(matmul_throughput(setup.dim, setup.device));
        for (trainer, times) in trainers.iter_mut().zip(&mut epoch_s) {
            times.push(trainer.epoch());
        }
    }
    gflops.push(matmul_throughput(setup.dim, setup.device));
    let [preset_trainer, trainer] = trainers;
    let [preset_s, setup_s] = epoch_s;
    Ok((trainer.report(setup_s, &gflops), preset_trainer.report(preset_s, &gflops)))
}

/// A setup's epoch time per instance against its preset's, pair of epochs by pair.
#[derive(Debug, PartialEq)]
pub struct Against {
    /// Of each pair, in order.
    pub ratios: Vec<f64>,
    /// The pairs the median and range are of: those past the first (whose epochs fault in
    /// the heap), or the only one.
    pub counted: usize,
    pub median: f64,
    pub range: (f64, f64),
}

impl Against {
    /// The ratios of `setup`'s epochs to `preset`'s, each per instance, as
    /// [`epoch_against`] measured them.
    pub fn of(setup: &EpochReport, preset: &EpochReport) -> Against {
        let per = |s: f64, n: i64| s / n.max(1) as f64;
        let ratios: Vec<f64> = setup
            .epoch_s
            .iter()
            .zip(&preset.epoch_s)
            .map(|(&s, &p)| per(s, setup.instances) / per(p, preset.instances))
            .collect();
        let mut counted: Vec<f64> = ratios.iter().skip(usize::from(ratios.len() > 1)).copied().collect();
        counted.sort_by(f64::total_cmp);
        let n = counted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => counted[n / 2],
            _ => (counted[n / 2 - 1] + counted[n / 2]) / 2.0,
        };
        let range = (counted.first().copied().unwrap_or(f64::NAN), counted.last().copied().unwrap_or(f64::NAN));
        Against { ratios, counted: n, median, range }
    }
}

/// Synthetic bags resident on a device, a network and its optimiser: what [`epoch`] trains.
struct Trainer {
    setup: EpochSetup,
    rng: Rng,
    lens: Vec<i64>,
    starts: Vec<i64>,
    x: Tensor,
    fine: Vec<i64>,
    budget: i64,
    step_budget: String,
    cache: chunked::Cache,
    /// Holds the variables `model` and `opt` use.
    _vs: nn::VarStore,
    model: Box<dyn models::MilModel>,
    opt: nn::Optimizer,
    recomputed: Vec<chunked::Recomputed>,
    epochs_run: usize,
}

/// The fine class → coarse class map of the synthetic bags.
const FINE_TO_COARSE: [usize; 7] = [0, 0, 0, 1, 1, 2, 2];

impl Trainer {
    fn new(setup: &EpochSetup) -> Result<Trainer> {
        let EpochSetup { model: kind, slides, instances, dim, device, .. } = *setup;
        let mut rng = Rng::new(1, 0);
        let lens: Vec<i64> = (0..slides)
            .map(|_| ((instances as f64).ln() + 0.5 * rng.normal() - 0.125).exp().round().max(8.0) as i64)
            .collect();
        let total: i64 = lens.iter().sum();
        let store_kind = if setup.half { Kind::Half } else { Kind::Float };
        // Drawn in blocks into one buffer, so that no second copy of the features is ever whole
        // and the setup does not leave freed blocks in the heap for the peak RSS to count.
        let x = Tensor::empty([total, dim], (store_kind, device));
        let block = Tensor::empty([(1 << 16).min(total), dim], (Kind::Float, device));
        for start in (0..total).step_by(1 << 16) {
            let n = (total - start).min(1 << 16);
            let mut drawn = block.narrow(0, 0, n);
            x.narrow(0, start, n).copy_(&drawn.normal_(0.0, 1.0).relu_());
        }
        drop(block);
        let (budget, step_budget) = memory::step_budget(setup.max_instances_per_chunk, kind, dim, device);
        let budget = budget.unwrap_or(i64::MAX);
        let names = |n: usize| (0..n).map(|i| i.to_string()).collect();
        let classes = Classes { coarse: names(3), fine: names(7), fine_to_coarse: FINE_TO_COARSE.to_vec() };
        let vs = nn::VarStore::new(device);
        let model = build_model(&vs, &model_config(kind, &classes, dim), 1);
        let opt = nn::Adam::default().build(&vs, 1e-4).map_err(|e| Error::Features(e.to_string()))?;
        let starts: Vec<i64> = lens.iter().scan(0, |s, &l| Some(std::mem::replace(s, *s + l))).collect();
        let cache = memory::cache(&*model, kind, budget, dim, device);
        Ok(Trainer {
            setup: setup.clone(),
            rng,
            lens,
            starts,
            x,
            fine: (0..slides).map(|i| (i % 7) as i64).collect(),
            budget,
            step_budget,
            cache,
            _vs: vs,
            model,
            opt,
            recomputed: Vec::new(),
            epochs_run: 0,
        })
    }

    /// Trains one epoch and returns its seconds.
    fn epoch(&mut self) -> f64 {
        let EpochSetup { slides, dim, epochs, batch_size, device, .. } = self.setup;
        let (x, lens, starts, fine) = (&self.x, &self.lens, &self.starts, &self.fine);
        let start = Instant::now();
        let mut order: Vec<usize> = (0..slides).collect();
        self.rng.shuffle(&mut order);
        for (b, chunk) in order.chunks(batch_size.max(1)).enumerate() {
            let batch = |run: std::ops::Range<usize>| {
                let bags = &chunk[run];
                let x = if device == Device::Cpu {
                    let parts: Vec<Tensor> = bags.iter().map(|&i| x.narrow(0, starts[i], lens[i])).collect();
                    data::joined_f32(&parts, dim)
                } else {
                    let rows: Vec<i64> = bags.iter().flat_map(|&i| starts[i]..starts[i] + lens[i]).collect();
                    x.index_select(0, &Tensor::from_slice(&rows).to(device)).to_kind(Kind::Float)
                };
                Batch::new(x, bags.iter().map(|&i| lens[i]).collect())
            };
            let lengths: Vec<i64> = chunk.iter().map(|&i| lens[i]).collect();
            self.recomputed.push(chunked::recomputed(&lengths, self.budget, self.cache));
            let chunks = Chunks {
                lengths: &lengths,
                budget: self.budget,
                batch: &batch,
                bf16: false,
                seed: b as i64,
                cache: self.cache,
            };
            let y_f = Tensor::from_slice(&chunk.iter().map(|&i| fine[i]).collect::<Vec<_>>()).to(device);
            let y_c =
                Tensor::from_slice(&chunk.iter().map(|&i| FINE_TO_COARSE[fine[i] as usize] as i64).collect::<Vec<_>>())
                    .to(device);
            // Past the first epoch, so that HMIL's contrastive term is computed.
            let at = Schedule { epoch: self.epochs_run + 1, epochs: epochs + 1 };
            self.opt.zero_grad();
            chunked::step(&*self.model, &chunks, &Targets { coarse: &y_c, fine: &y_f, class_weights: None }, at);
            self.opt.step();
        }
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        self.epochs_run += 1;
        start.elapsed().as_secs_f64()
    }

    /// The report of the epochs run, which took `epoch_s`, with the matmul throughputs
    /// `gflops` measured between them.
    fn report(self, epoch_s: Vec<f64>, gflops: &[f64]) -> EpochReport {
        let EpochSetup { model: kind, slides, dim, .. } = self.setup;
        let total: i64 = self.lens.iter().sum();
        let recomputed: chunked::Recomputed = self.recomputed.into_iter().sum();
        let (first, rest) = macs_per_instance(kind, dim as f64, 3.0, 7.0);
        // Training FLOPs: forward and backward (the first layer's input needs no gradient).
        let flops: f64 = self
            .lens
            .iter()
            .map(|&n| 2.0 * (2.0 * first * n as f64 + 3.0 * (rest * tokens(kind, n) + macs_per_bag(kind))))
            .sum();
        let flops_per_instance = flops / total as f64;
        let matmul_gflops = gflops.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &g| (lo.min(g), hi.max(g)));
        let instance_epochs = (total * self.epochs_run as i64).max(1) as f64;
        EpochReport {
            model: kind,
            slides,
            instances: total,
            dim,
            threads: tch::get_num_threads() as usize,
            device: format!("{:?}", self.setup.device),
            flops_per_instance,
            matmul_gflops,
            floor_s: flops_per_instance * total as f64 / (matmul_gflops.1 * 1e9),
            epoch_s,
            features_bytes: (total * dim * if self.setup.half { 2 } else { 4 }) as u64,
            peak_rss_bytes: peak_rss_bytes(),
            step_budget: self.step_budget,
            recomputed: recomputed.instances as f64 / instance_epochs,
            past_stem: recomputed.past_stem as f64 / instance_epochs,
            past_product: recomputed.past_product as f64 / instance_epochs,
        }
    }
}

/// Best fp32 GFLOP/s of the model's dominant product (16384 instances × D by D × 256).
fn matmul_throughput(dim: i64, device: Device) -> f64 {
    let a = Tensor::randn([16384, dim], (Kind::Float, device));
    let b = Tensor::randn([dim, 256], (Kind::Float, device));
    let flops = 2.0 * 16384.0 * dim as f64 * 256.0;
    let mut best = 0.0f64;
    for _ in 0..10 {
        let start = Instant::now();
        let c = a.matmul(&b);
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let _ = c.double_value(&[0, 0]);
        best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A full pack against a repack after one slide is added, with the peak memory of the process.
#[derive(Debug)]
pub struct PackReport {
    pub slides: usize,
    /// Bytes of the packed features (every slide's file).
    pub store_bytes: u64,
    pub full_s: f64,
    pub added_s: f64,
    /// Bytes the process read while indexing and packing again with the slide added, and the
    /// added file's size.
    pub added_read_bytes: u64,
    pub added_file_bytes: u64,
    /// Peak resident set size of the process after both packs.
    pub peak_rss_bytes: u64,
}

/// Packs the feature files under `dir` from scratch (through links in `scratch`, so `dir` is
/// only read), then adds a slide (the first file's features plus one, in its format when that
/// is `.pt` or `.h5`, else as `.pt`) and packs again, as a workflow would.
pub fn pack(dir: &Path, scratch: &Path) -> Result<PackReport> {
    let files = feature_files(dir)?;
    let feats = scratch.join("features");
    for (_, path, _) in &files {
        let relative = path.strip_prefix(dir).unwrap_or(path);
        let link = feats.join(relative);
        let parent = link.parent().expect("a file in a folder");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let target = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io(&link, e))?;
    }
    let dag = pipeline::Dag::new(Vec::from(crate::feature_nodes(
        &crate::index::FeatureDir::External(feats.clone()),
        Default::default(),
        Default::default(),
        None,
    )))
    .map_err(|e| Error::Features(e.to_string()))?;
    let store = pipeline::Store::open(&scratch.join("ws")).map_err(|e| Error::Features(e.to_string()))?;
    let run = || -> Result<(f64, std::path::PathBuf)> {
        let summary = pipeline::run(&dag, &store, &Default::default()).map_err(|e| Error::Features(e.to_string()))?;
        let node = &summary.nodes[1];
        match (node.status, &node.key) {
            (pipeline::Status::Executed, Some(key)) => Ok((node.seconds, store.object_dir(key))),
            _ => Err(Error::Features(format!(
                "pack_features {}: {}",
                node.status.as_str(),
                node.reason.clone().unwrap_or_default()
            ))),
        }
    };
    let (full_s, object) = run()?;
    let packed = object.join(schemas::artifacts::FEATURES_DIR.file);
    let mut store_bytes = 0;
    for entry in std::fs::read_dir(&packed).map_err(|e| Error::io(&packed, e))? {
        store_bytes += entry.and_then(|e| e.metadata()).map_err(|e| Error::io(&packed, e))?.len();
    }
    let added = add_slide(&files[0].1, files[0].2, &feats)?;
    let added_file_bytes = std::fs::metadata(&added).map_err(|e| Error::io(&added, e))?.len();
    let read_before = bytes_read();
    let (added_s, _) = run()?;
    let added_read_bytes = bytes_read() - read_before;
    Ok(PackReport {
        slides: files.len(),
        store_bytes,
        full_s,
        added_s,
        added_read_bytes,
        added_file_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Writes a new slide into `dir` from the feature file `like` (of `format`): its features plus
/// one, so that its digest is new. Returns its path.
fn add_slide(like: &Path, format: crate::features::Format, dir: &Path) -> Result<PathBuf> {
    use crate::features::Format;
    let bytes = std::fs::read(like).map_err(|e| Error::io(like, e))?;
    let arrays = crate::features::parse(format, &bytes)
        .map_err(|message| Error::BadFile { path: like.to_path_buf(), message })?;
    let (rows, cols) = (arrays.features.rows, arrays.features.cols);
    let values: Vec<f32> = arrays.features.to_f32().iter().map(|v| v + 1.0).collect();
    let path = match format {
        Format::H5 => dir.join("zz-added-slide.h5"),
        _ => dir.join("zz-added-slide.pt"),
    };
    match format {
        Format::H5 => crate::synth::write_h5(&path, &values, rows, cols)?,
        _ => crate::synth::write_pt(&path, &values, rows, cols)?,
    }
    Ok(path)
}

/// Bytes this process has read through system calls so far (`rchar` of `/proc/self/io`; 0 where
/// the system does not say), whether from the disk or the page cache.
fn bytes_read() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| io.lines().find_map(|l| l.strip_prefix("rchar:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// Extraction throughput in patches per second: reading and preprocessing alone (all reader
/// threads), the encoder's forward alone (on preprocessed batches already in memory), and the
/// whole extraction, which the slower of the first two bounds.
#[derive(Debug)]
pub struct ExtractReport {
    pub slides: usize,
    pub patches: usize,
    pub readers: usize,
    pub device: String,
    pub read_pps: f64,
    pub encode_pps: f64,
    pub whole_pps: f64,
}

/// Tiles the slides under `dir` as `spec` and `tissue` say, then times reading, encoding and the
/// whole extraction of their patches with the encoder `config` names (after one warm-up batch).
pub fn extract(
    dir: &Path,
    config: &schemas::workflow::Encoder,
    spec: &wsi::GridSpec,
    tissue: &wsi::TissueParams,
) -> Result<ExtractReport> {
    use crate::extract::{LoadedEncoder, SlidePatches, encode_slide, feed};
    let mut slides = Vec::new();
    for (id, path) in crate::tile::slide_files(dir)? {
        let slide = wsi::Slide::open(&path).map_err(|e| Error::Features(e.to_string()))?;
        let tiling = wsi::tile(&slide, spec, tissue).map_err(|e| Error::Features(e.to_string()))?;
        if tiling.grid.patches.is_empty() {
            continue;
        }
        slides.push(SlidePatches {
            id,
            path,
            quickhash: String::new(),
            level: tiling.grid.level,
            read_size: tiling.grid.read_size,
            size: i64::from(tiling.grid.size0),
            coords: tiling.grid.patches,
        });
    }
    let patches: usize = slides.iter().map(|s| s.coords.len()).sum();
    if patches == 0 {
        return Err(Error::Features(format!("{}: no patches on tissue to read", dir.display())));
    }
    let encoder = LoadedEncoder::load(config, None)?;
    let side = config.input_size as usize;
    let batch = config.batch_size.min(patches).max(1);
    let pixels = vec![0.1f32; batch * 3 * side * side];
    encoder.encode(&pixels, batch)?;

    let start = Instant::now();
    for slide in &slides {
        feed(slide, config, &|| false, |_, _| Ok(()))?;
    }
    let read_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut left = patches;
    while left > 0 {
        let b = batch.min(left);
        encoder.encode(&pixels[..b * 3 * side * side], b)?;
        left -= b;
    }
    let encode_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for slide in &slides {
        encode_slide(slide, &encoder, &|_| {}, &|| false)?;
    }
    let whole_s = start.elapsed().as_secs_f64();
    let rate = |s: f64| patches as f64 / s;
    Ok(ExtractReport {
        slides: slides.len(),
        patches,
        readers: crate::extract::reader_count(config),
        device: format!("{:?}", encoder.device()),
        read_pps: rate(read_s),
        encode_pps: rate(encode_s),
        whole_pps: rate(whole_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(slides: usize, instances: usize, half: bool) -> EpochSetup {
        EpochSetup {
            model: ModelKind::Hmil,
            slides,
            instances,
            dim: 16,
            epochs: 3,
            batch_size: 4,
            device: Device::Cpu,
            max_instances_per_chunk: Some(60),
            half,
        }
    }

    #[test]
    fn alternating_with_the_preset_trains_each_as_it_trains_alone() {
        let (setup, preset) = (tiny(10, 40, true), tiny(12, 10, false));
        let (r, p) = epoch_against(&setup, &preset).unwrap();
        for (report, alone) in [(&r, epoch(&setup).unwrap()), (&p, epoch(&preset).unwrap())] {
            assert_eq!(report.epoch_s.len(), 3);
            assert_eq!((report.slides, report.instances), (alone.slides, alone.instances));
            assert_eq!(
                (report.recomputed, report.past_stem, report.past_product),
                (alone.recomputed, alone.past_stem, alone.past_product)
            );
            assert_eq!(report.features_bytes, alone.features_bytes);
        }
        // Steps of bags of about 40 instances under a budget of 60 run in chunks; the preset's don't.
        assert!(r.recomputed > 0.3 && p.recomputed == 0.0, "{} {}", r.recomputed, p.recomputed);
        assert_eq!(r.features_bytes, r.instances as u64 * 16 * 2);
    }

    #[test]
    fn against_the_preset_is_per_instance_and_leaves_out_the_first_pair() {
        let report = |instances: i64, epoch_s: Vec<f64>| EpochReport {
            instances,
            epoch_s,
            ..epoch(&tiny(2, 8, false)).unwrap()
        };
        let preset = report(100, vec![1.0, 1.0, 2.0, 1.0]);
        let setup = report(300, vec![9.0, 3.3, 6.0, 3.6]);
        let c = Against::of(&setup, &preset);
        let expect = [3.0, 1.1, 1.0, 1.2];
        assert!(c.ratios.iter().zip(expect).all(|(a, b)| (a - b).abs() < 1e-12), "{c:?}");
        assert_eq!(c.counted, 3);
        assert!((c.median - 1.1).abs() < 1e-12 && c.range == (1.0, 1.2), "{c:?}");
        // An even count: the mean of the middle two; one pair: itself.
        let c = Against::of(&report(300, vec![9.0, 3.3, 3.6]), &report(100, vec![1.0, 1.0, 1.0]));
        assert!((c.median - 1.15).abs() < 1e-12, "{c:?}");
        let c = Against::of(&report(300, vec![6.0]), &report(100, vec![1.0]));
        assert_eq!((c.counted, c.median), (1, 2.0));
    }
}
