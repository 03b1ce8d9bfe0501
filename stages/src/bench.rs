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
    /// largest; see [`chunked::step`]), and the share that did so from their kept stem outputs.
    pub recomputed: f64,
    pub past_stem: f64,
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

/// Times training epochs as `setup` says, with each step run as training runs it (in chunks of
/// bags when a mini-batch has more instances than a step may hold).
pub fn epoch(setup: &EpochSetup) -> Result<EpochReport> {
    let EpochSetup { model: kind, slides, instances, dim, epochs, batch_size, device, .. } = *setup;
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
    let fine: Vec<i64> = (0..slides).map(|i| (i % 7) as i64).collect();
    let f2c = [0usize, 0, 0, 1, 1, 2, 2];
    let names = |n: usize| (0..n).map(|i| i.to_string()).collect();
    let classes = Classes { coarse: names(3), fine: names(7), fine_to_coarse: f2c.to_vec() };
    let vs = nn::VarStore::new(device);
    let model = build_model(&vs, &model_config(kind, &classes, dim), 1);
    let mut opt = nn::Adam::default().build(&vs, 1e-4).map_err(|e| Error::Features(e.to_string()))?;
    let starts: Vec<i64> = lens.iter().scan(0, |s, &l| Some(std::mem::replace(s, *s + l))).collect();
    let mut epoch_s = Vec::new();
    let mut gflops = Vec::new();
    let stem_cache = memory::stem_cache(budget, kind, dim, model.stem().ws.size()[0]);
    let mut recomputed = Vec::new();
    for e in 0..epochs {
        gflops.push(matmul_throughput(dim, device));
        let start = Instant::now();
        let mut order: Vec<usize> = (0..slides).collect();
        rng.shuffle(&mut order);
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
            recomputed.push(chunked::recomputed(&lengths, budget, stem_cache));
            let chunks = Chunks { lengths: &lengths, budget, batch: &batch, bf16: false, seed: b as i64, stem_cache };
            let y_f = Tensor::from_slice(&chunk.iter().map(|&i| fine[i]).collect::<Vec<_>>()).to(device);
            let y_c =
                Tensor::from_slice(&chunk.iter().map(|&i| f2c[fine[i] as usize] as i64).collect::<Vec<_>>()).to(device);
            // Past the first epoch, so that HMIL's contrastive term is computed.
            let at = Schedule { epoch: e + 1, epochs: epochs + 1 };
            opt.zero_grad();
            chunked::step(&*model, &chunks, &Targets { coarse: &y_c, fine: &y_f, class_weights: None }, at);
            opt.step();
        }
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        epoch_s.push(start.elapsed().as_secs_f64());
    }
    let recomputed: chunked::Recomputed = recomputed.into_iter().sum();
    let (first, rest) = macs_per_instance(kind, dim as f64, 3.0, 7.0);
    // Training FLOPs: forward and backward (the first layer's input needs no gradient).
    let flops: f64 = lens
        .iter()
        .map(|&n| 2.0 * (2.0 * first * n as f64 + 3.0 * (rest * tokens(kind, n) + macs_per_bag(kind))))
        .sum();
    let flops_per_instance = flops / total as f64;
    gflops.push(matmul_throughput(dim, device));
    let matmul_gflops = gflops.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &g| (lo.min(g), hi.max(g)));
    Ok(EpochReport {
        model: kind,
        slides,
        instances: total,
        dim,
        threads: tch::get_num_threads() as usize,
        device: format!("{device:?}"),
        flops_per_instance,
        matmul_gflops,
        floor_s: flops_per_instance * total as f64 / (matmul_gflops.1 * 1e9),
        epoch_s,
        features_bytes: (total * dim * if setup.half { 2 } else { 4 }) as u64,
        peak_rss_bytes: peak_rss_bytes(),
        step_budget,
        recomputed: recomputed.instances as f64 / (total * epochs as i64).max(1) as f64,
        past_stem: recomputed.past_stem as f64 / (total * epochs as i64).max(1) as f64,
    })
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
