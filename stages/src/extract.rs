//! `extract_features`: each slide's patches read with OpenSlide on a pool of threads, resized and
//! normalised, and encoded in batches by a TorchScript encoder (on CUDA when present), written as
//! one CLAM-layout `.h5` per slide, which CLAM, TRIDENT and the index stage all read. Each slide's
//! file is an item of the workspace: a new slide is the only one encoded, a killed run keeps the
//! slides it finished, and a new encoder file or new tiles encode again what they change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;

use arrow::array::Int64Array;
use pipeline::{Context, Input, NodeRef, Output, Pending, Resources, Stage, StageError};
use schemas::artifacts::{EXTRACTED, H5_DIR, SLIDES, TILES};
use schemas::workflow::{Encoder, EncoderDtype, OnBadFile, Slides};
use tch::{CModule, Device, Kind, Tensor};
use wsi::Slide;

use crate::error::{Error, Result};
use crate::features::h5::{self, PatchAttrs};
use crate::table;

/// The feature dimension, as a slide's item records it.
const DIM_FILE: &str = "dim";

/// The `extract_features` stage.
pub struct ExtractFeatures {
    pub encoder: Encoder,
    pub on_bad_slide: OnBadFile,
    /// The `tile_slides` node.
    pub tiles: NodeRef,
}

impl ExtractFeatures {
    /// The stage for the workflow's `[slides]` and `[encoder]`.
    pub fn new(slides: &Slides, encoder: &Encoder, tiles: NodeRef) -> ExtractFeatures {
        ExtractFeatures { encoder: encoder.clone(), on_bad_slide: slides.on_bad_slide, tiles }
    }
}

impl Stage for ExtractFeatures {
    fn kind(&self) -> &str {
        "extract_features"
    }
    /// Faster on a GPU unless set to run on the CPU.
    fn resources(&self) -> Resources {
        Resources { gpu: self.encoder.device != "cpu", in_driver: false }
    }
    fn code_version(&self) -> &str {
        "1"
    }
    /// What the features depend on besides the encoder file and the tiles (batch size, device
    /// and readers change how fast, not what; the precision changes what on CUDA).
    fn params(&self) -> serde_json::Value {
        let e = &self.encoder;
        serde_json::json!({ "input_size": e.input_size, "mean": e.mean, "std": e.std, "dtype": e.dtype })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::external("encoder", &self.encoder.model),
            Input::artifact("slides", &self.tiles, &SLIDES),
            Input::artifact("tiles", &self.tiles, &TILES),
        ]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&H5_DIR).into(), (&EXTRACTED).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        self.extract(ctx)
    }
    /// How many slides with patches are not encoded yet with this encoder and these tiles.
    fn pending(&self, p: &Pending) -> std::result::Result<Option<String>, StageError> {
        let slides = read_patches(p.input("slides"), p.input("tiles"))?;
        let encoder = p.stat_cache().file_digest(p.input("encoder"))?;
        let done = slides.iter().filter(|s| p.has_item(&facts(s, &encoder))).count();
        Ok(Some(format!(
            "{} of {} slide(s) to encode ({done} encoded already with this encoder and these tiles)",
            slides.len() - done,
            slides.len()
        )))
    }
}

/// What a slide's features depend on besides the stage's params: the slide's content hash, the
/// encoder file's digest, and where its patches are.
fn facts(slide: &SlidePatches, encoder_digest: &str) -> serde_json::Value {
    serde_json::json!({ "quickhash": slide.quickhash, "encoder": encoder_digest, "patches": patches_digest(slide) })
}

/// One slide's patches, as `tile_slides` laid them.
pub struct SlidePatches {
    pub id: String,
    pub path: PathBuf,
    pub quickhash: String,
    pub level: usize,
    pub read_size: u32,
    pub size: i64,
    /// Level-0 top-left corners.
    pub coords: Vec<[i64; 2]>,
}

/// The slides with patches in `slides.parquet` and `tiles.parquet`, in slide order.
pub fn read_patches(slides: &Path, tiles: &Path) -> Result<Vec<SlidePatches>> {
    let t = table::read(tiles)?;
    let (ids, xs, ys) = (table::strings(&t, "slide_id"), table::i64s(&t, "x"), table::i64s(&t, "y"));
    let mut coords: HashMap<String, Vec<[i64; 2]>> = HashMap::new();
    for ((id, x), y) in ids.into_iter().zip(xs).zip(ys) {
        coords.entry(id).or_default().push([x, y]);
    }
    let s = table::read(slides)?;
    let (ids, paths, hashes) =
        (table::strings(&s, "slide_id"), table::strings(&s, "path"), table::strings(&s, "quickhash"));
    let (levels, reads, sizes) = (table::i32s(&s, "level"), table::i64s(&s, "read_size"), table::i64s(&s, "size"));
    Ok((0..ids.len())
        .filter_map(|i| {
            let coords = coords.remove(&ids[i])?;
            Some(SlidePatches {
                id: ids[i].clone(),
                path: PathBuf::from(&paths[i]),
                quickhash: hashes[i].clone(),
                level: levels[i] as usize,
                read_size: reads[i] as u32,
                size: sizes[i],
                coords,
            })
        })
        .collect())
}

/// A loaded encoder and how to feed it.
pub struct LoadedEncoder {
    module: CModule,
    device: Device,
    config: Encoder,
}

impl LoadedEncoder {
    /// Loads `config.model` on its device; a file libtorch cannot load is an error naming it.
    /// `gpu`: the GPU the node was given, which `device = "auto"` takes.
    pub fn load(config: &Encoder, gpu: Option<usize>) -> Result<LoadedEncoder> {
        let device = crate::hmil::train::device(&config.device, gpu)?;
        let bad = |message: String| Error::BadFile { path: config.model.clone(), message };
        let mut module = CModule::load_on_device(&config.model, device).map_err(|e| {
            bad(format!(
                "encoder.model is not a TorchScript file libtorch can load (export it with torch.jit.trace or \
                 torch.jit.script, then torch.jit.save): {}",
                pipeline::first_line(&e.to_string())
            ))
        })?;
        module.set_eval();
        if device.is_cuda() && config.dtype == EncoderDtype::Bf16 {
            module.to(device, Kind::BFloat16, false);
        }
        Ok(LoadedEncoder { module, device, config: config.clone() })
    }

    /// Whether it runs on CUDA.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Features of a batch of preprocessed patches (`count` × 3 × side × side, see
    /// [`Preprocessor`]), as `count` rows of D values.
    pub fn encode(&self, pixels: &[f32], count: usize) -> Result<(Vec<f32>, usize)> {
        let side = i64::from(self.config.input_size);
        let bad = |message: String| Error::BadFile { path: self.config.model.clone(), message };
        let input = Tensor::from_slice(pixels).view([count as i64, 3, side, side]).to(self.device);
        let cuda = self.device.is_cuda();
        let output = tch::no_grad(|| match self.config.dtype {
            EncoderDtype::F16 if cuda => tch::autocast(true, || self.module.forward_ts(&[input])),
            EncoderDtype::Bf16 if cuda => self.module.forward_ts(&[input.to_kind(Kind::BFloat16)]),
            _ => self.module.forward_ts(&[input]),
        })
        .map_err(|e| {
            bad(format!("the encoder failed on a batch of {count} patches: {}", pipeline::first_line(&e.to_string())))
        })?;
        let shape = output.size();
        if shape.len() != 2 || shape[0] != count as i64 {
            return Err(bad(format!(
                "the encoder's output for {count} patches of {side} × {side} pixels has shape {shape:?}; \
                 expected ({count}, D): one feature vector per patch"
            )));
        }
        let output = output.to_kind(Kind::Float).to(Device::Cpu).contiguous();
        let values = Vec::<f32>::try_from(output.view([-1])).map_err(|e| bad(e.to_string()))?;
        Ok((values, shape[1] as usize))
    }
}

/// Turns patches into what the encoder takes: resized to `input_size` (bilinear, with SIMD),
/// channels first, each channel scaled to [0, 1] and normalised by `mean` and `std`. One per
/// reader thread, as it keeps its buffers.
pub struct Preprocessor<'a> {
    config: &'a Encoder,
    resizer: fast_image_resize::Resizer,
    /// Per channel: value for each byte, `(byte / 255 - mean) / std`.
    table: [[f32; 256]; 3],
}

impl<'a> Preprocessor<'a> {
    pub fn new(config: &'a Encoder) -> Preprocessor<'a> {
        let table = std::array::from_fn(|c| {
            std::array::from_fn(|v| ((v as f64 / 255.0 - config.mean[c]) / config.std[c]) as f32)
        });
        Preprocessor { config, resizer: fast_image_resize::Resizer::new(), table }
    }

    /// The encoder's input for one patch: 3 × side × side values.
    pub fn run(&mut self, patch: image::RgbImage) -> std::result::Result<Vec<f32>, String> {
        use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, images::Image};
        let side = self.config.input_size;
        let pixels = if patch.width() == side && patch.height() == side {
            patch.into_raw()
        } else {
            let (w, h) = (patch.width(), patch.height());
            let src = Image::from_vec_u8(w, h, patch.into_raw(), PixelType::U8x3).map_err(|e| e.to_string())?;
            let mut dst = Image::new(side, side, PixelType::U8x3);
            let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
            self.resizer.resize(&src, &mut dst, &options).map_err(|e| e.to_string())?;
            dst.into_vec()
        };
        let plane = (side * side) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, rgb) in pixels.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = self.table[c][rgb[c] as usize];
            }
        }
        Ok(out)
    }
}

/// Threads reading patches: as configured, or the cores (at most 8).
pub fn reader_count(config: &Encoder) -> usize {
    config.readers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)).max(1)
}

/// Reads and preprocesses every patch of `slide` on reader threads that keep a bounded queue
/// full, handing each to `take` (its index in `slide.coords`, its pixels) on this thread in the
/// order they are ready. An error from `take` or a reader stops the readers and is returned.
pub fn feed(
    slide: &SlidePatches,
    config: &Encoder,
    stop: &(dyn Fn() -> bool + Sync),
    mut take: impl FnMut(usize, Vec<f32>) -> Result<()>,
) -> Result<()> {
    let reader = Slide::open(&slide.path).map_err(|e| Error::Features(e.to_string()))?;
    let n = slide.coords.len();
    let next = AtomicUsize::new(0);
    let (tx, rx) = sync_channel::<(usize, std::result::Result<Vec<f32>, String>)>(2 * config.batch_size.max(1));
    std::thread::scope(|s| {
        for _ in 0..reader_count(config).min(n) {
            let (tx, next, reader) = (tx.clone(), &next, &reader);
            s.spawn(move || {
                let mut prepare = Preprocessor::new(config);
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n || stop() {
                        break;
                    }
                    let [x, y] = slide.coords[i];
                    let patch = reader
                        .read_rgb(x, y, slide.level, slide.read_size, slide.read_size)
                        .map_err(|e| e.to_string())
                        .and_then(|p| prepare.run(p));
                    if tx.send((i, patch)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Owned here, so that leaving early (an encoder error) drops it and wakes the readers.
        let rx = rx;
        for (i, patch) in rx.iter() {
            take(i, patch.map_err(Error::Features)?)?;
        }
        if stop() {
            return Err(Error::Interrupted(format!("while encoding {}", slide.id)));
        }
        Ok(())
    })
}

/// Reads, preprocesses and encodes every patch of `slide` (see [`feed`]), a batch at a time.
/// Returns the features in the order of `slide.coords`, and the dimension. `done` is called per
/// batch with its size; `stop` is checked per patch.
pub fn encode_slide(
    slide: &SlidePatches,
    encoder: &LoadedEncoder,
    done: &(dyn Fn(usize) + Sync),
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(Vec<f32>, usize)> {
    let n = slide.coords.len();
    let batch = encoder.config.batch_size.min(n).max(1);
    let (mut features, mut dim): (Vec<f32>, usize) = (Vec::new(), 0);
    let (mut rows, mut pixels) = (Vec::with_capacity(batch), Vec::new());
    let mut flush = |rows: &mut Vec<usize>, pixels: &mut Vec<f32>| -> Result<()> {
        let (values, d) = encoder.encode(pixels, rows.len())?;
        if features.is_empty() {
            dim = d;
            features = vec![0.0; n * d];
        }
        for (k, &row) in rows.iter().enumerate() {
            features[row * d..(row + 1) * d].copy_from_slice(&values[k * d..(k + 1) * d]);
        }
        done(rows.len());
        rows.clear();
        pixels.clear();
        Ok(())
    };
    feed(slide, &encoder.config, stop, |i, patch| {
        rows.push(i);
        pixels.extend_from_slice(&patch);
        if rows.len() == batch { flush(&mut rows, &mut pixels) } else { Ok(()) }
    })?;
    if !rows.is_empty() {
        flush(&mut rows, &mut pixels)?;
    }
    Ok((features, dim))
}

impl ExtractFeatures {
    fn extract(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let slides = read_patches(ctx.input("slides"), ctx.input("tiles"))?;
        let encoder_digest = ctx.file_digest(ctx.input("encoder"))?;
        let total: usize = slides.iter().map(|s| s.coords.len()).sum();
        let bar = ctx.progress(total as u64, "patches encoded");
        let mut encoder: Option<LoadedEncoder> = None;
        let (mut made, mut encoded, mut bad) = (0, Vec::new(), Vec::new());
        for slide in &slides {
            let item = ctx.item(&facts(slide, &encoder_digest), |dir| {
                if encoder.is_none() {
                    encoder = Some(LoadedEncoder::load(&self.encoder, ctx.gpu())?);
                }
                let encoder = encoder.as_ref().expect("loaded above");
                let (features, dim) = encode_slide(slide, encoder, &|k| bar.inc(k as u64), &|| ctx.interrupted())?;
                let coords: Vec<i64> = slide.coords.iter().flatten().copied().collect();
                let attrs = PatchAttrs {
                    patch_size: i64::from(slide.read_size),
                    patch_level: slide.level as i64,
                    patch_size_level0: slide.size,
                };
                let file = dir.join(format!("{}.h5", slide.id));
                h5::write(&file, &features, (slide.coords.len(), dim), &coords, Some(attrs))
                    .map_err(|message| Error::BadFile { path: file.clone(), message })?;
                std::fs::write(dir.join(DIM_FILE), dim.to_string())?;
                made += 1;
                Ok(())
            });
            match item {
                Ok(item) => {
                    if !item.made {
                        bar.inc(slide.coords.len() as u64);
                    }
                    encoded.push((slide, item.dir));
                }
                Err(e) if ctx.interrupted() => return Err(e),
                // A slide that cannot be read; an encoder that fails fails every slide.
                Err(e)
                    if self.on_bad_slide == OnBadFile::Skip
                        && e.downcast_ref::<Error>().is_some_and(|e| matches!(e, Error::Features(_))) =>
                {
                    bad.push(format!("{}: {e}", slide.path.display()));
                }
                Err(e) => return Err(e),
            }
        }
        bar.finish_and_clear();
        tracing::info!(node = %ctx.node_id(), "{}", crate::tile::made_note("encoded", made, slides.len()));
        if !bad.is_empty() {
            ctx.warn(format!(
                "skipped {} slide(s) whose patches could not be read: {}",
                bad.len(),
                pipeline::some_of(&bad, "; ")
            ));
        }
        let dir = ctx.output(H5_DIR.file);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut dims = Vec::new();
        for (slide, item) in &encoded {
            let name = format!("{}.h5", slide.id);
            let to = dir.join(&name);
            std::fs::hard_link(item.join(&name), &to).map_err(|e| Error::io(&to, e))?;
            let dim_file = item.join(DIM_FILE);
            let dim = std::fs::read_to_string(&dim_file).ok().and_then(|d| d.trim().parse::<i64>().ok());
            dims.push(dim.ok_or_else(|| Error::BadFile {
                path: dim_file,
                message: "unreadable; remove its folder to encode the slide again".into(),
            })?);
        }
        table::write_output(
            ctx,
            &EXTRACTED,
            vec![
                table::string_col(encoded.iter().map(|(s, _)| s.id.as_str())),
                Arc::new(encoded.iter().map(|(s, _)| s.coords.len() as i64).collect::<Int64Array>()),
                Arc::new(dims.into_iter().collect::<Int64Array>()),
            ],
        )?;
        Ok(())
    }
}

/// A digest of where a slide's patches are: their level, sizes and corners.
fn patches_digest(slide: &SlidePatches) -> String {
    let mut bytes = Vec::with_capacity(slide.coords.len() * 16 + 24);
    for v in [slide.level as i64, i64::from(slide.read_size), slide.size] {
        bytes.extend(v.to_le_bytes());
    }
    for [x, y] in &slide.coords {
        bytes.extend(x.to_le_bytes());
        bytes.extend(y.to_le_bytes());
    }
    pipeline::hash_bytes(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(input_size: u32) -> Encoder {
        serde_json::from_value(serde_json::json!({ "model": "e.ts", "input_size": input_size })).unwrap()
    }

    #[test]
    fn patches_are_resized_channels_first_and_normalised() {
        let config = config(8);
        let mut prepare = Preprocessor::new(&config);
        // A uniform patch stays uniform through resizing: every value is its channel's.
        let patch = image::RgbImage::from_pixel(16, 16, image::Rgb([255, 0, 128]));
        let out = prepare.run(patch).unwrap();
        assert_eq!(out.len(), 3 * 8 * 8);
        let expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128.0 / 255.0 - 0.406) / 0.225];
        for (c, want) in expected.into_iter().enumerate() {
            assert!(out[c * 64..(c + 1) * 64].iter().all(|v| (f64::from(*v) - want).abs() < 1e-5), "channel {c}");
        }
        // Of the input size already: taken as is, pixel by pixel.
        let gradient = image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([(x * 30) as u8, 0, 0]));
        let out = prepare.run(gradient).unwrap();
        assert!((f64::from(out[7]) - ((210.0 / 255.0 - 0.485) / 0.229)).abs() < 1e-5);
    }
}
