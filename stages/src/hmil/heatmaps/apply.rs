//! `hmil-flow heatmap`: a checkpoint's heatmaps and top tiles for slides outside any workflow,
//! from their feature files (which must hold coordinates) and, when given, the slides they came
//! from; and, with a level, one class's heatmap over each whole slide as a pyramidal TIFF.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use models::Batch;
use schemas::artifacts::{HEATMAP_DIR, HEATMAPS, INSTANCE_ATTENTION, TOP_TILES_DIR};
use schemas::workflow::MapKind;
use tch::{Device, Tensor};

use super::maps::SlideMaps;
use super::{Canvas, Drawing, Drawn, draw_slide, full_res, instance_columns, write_drawn};
use crate::error::{Error, Result};
use crate::features;
use crate::hmil::checkpoint;
use crate::hmil::infer::bag_outputs;
use crate::hmil::predict::{classes_for, feature_inputs};
use crate::hmil::train::Classes;
use crate::table;
use crate::thumbnails::Thumbnail;

/// What to draw, from what, and where.
pub struct Request<'a> {
    pub checkpoint: &'a Path,
    /// A feature file or a folder of them.
    pub features: &'a Path,
    /// A slide file, or a folder of slides matched to the feature files by slide id.
    pub slides: Option<&'a Path>,
    /// Class names for a checkpoint that does not carry them.
    pub classes: Option<Classes>,
    pub out: &'a Path,
    pub device: Device,
    pub map: MapKind,
    pub top_tiles: usize,
    /// With a level: each slide's heatmap at that pyramid level as a pyramidal TIFF, for the
    /// classes named (none: the predicted fine and coarse classes).
    pub full_res: Option<(usize, Vec<String>)>,
}

/// What was drawn.
#[derive(Debug, Default)]
pub struct Summary {
    pub drawn: usize,
    /// Slides whose features have no coordinates.
    pub without_coords: Vec<String>,
    /// Slides drawn on a blank canvas though slides were given (no file of that id).
    pub without_slide: Vec<String>,
    pub full_res: Vec<PathBuf>,
    /// Mean seconds per slide for the heatmap and top tiles.
    pub seconds_per_slide: f64,
}

/// Draws every feature file of `req`, writing `<out>/heatmaps/`, `<out>/top_tiles/`,
/// `instance_attention.parquet` and `heatmaps.parquet`; `progress` is told (done, total) slides.
pub fn heatmaps(req: &Request, progress: &dyn Fn(usize, usize)) -> Result<Summary> {
    let classes = classes_for(req.checkpoint, req.classes.clone())?;
    let files = feature_inputs(req.features)?;
    let slides = slide_files(req.slides)?;
    let (heatmaps, top_tiles) = (req.out.join(HEATMAP_DIR.file), req.out.join(TOP_TILES_DIR.file));
    for dir in [&heatmaps, &top_tiles] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let drawing = Drawing { heatmap_dir: &heatmaps, tiles_dir: &top_tiles, map: req.map, top_tiles: req.top_tiles };
    let mut values = table::Writer::create(&req.out.join(INSTANCE_ATTENTION.file), (INSTANCE_ATTENTION.schema)())?;
    let mut model = None;
    let mut summary = Summary::default();
    let mut drawn: Vec<Drawn> = Vec::new();
    let _guard = tch::no_grad_guard();
    for (done, (slide_id, path, format)) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let arrays =
            features::parse(*format, &bytes).map_err(|message| Error::BadFile { path: path.clone(), message })?;
        let Some(coords) = arrays.coords.as_ref().map(|c| c.to_f64()) else {
            summary.without_coords.push(slide_id.clone());
            continue;
        };
        let (n, d) = (arrays.features.rows as i64, arrays.features.cols as i64);
        if model.is_none() {
            let loaded = checkpoint::load(req.checkpoint, &classes, d, req.device)?;
            if !loaded.model.attends() {
                return Err(Error::Features(format!(
                    "{} is a {} network, which has no per-instance attention to draw",
                    req.checkpoint.display(),
                    loaded.model.name()
                )));
            }
            if req.map == MapKind::Evidence && loaded.model.is_flat() {
                return Err(Error::Features(format!(
                    "{} is a {} network, whose logits do not split into per-instance evidence: \
                     draw its attention with --map attention",
                    req.checkpoint.display(),
                    loaded.model.name()
                )));
            }
            model = Some(loaded);
        }
        let net = &model.as_ref().expect("built above").net;
        let x = Tensor::from_slice(&arrays.features.to_f32()).view([n, d]).to(req.device);
        let mut maps = None;
        bag_outputs(&net.forward(&Batch::new(x, vec![n]), false), &[n], |_, out| {
            maps = Some(SlideMaps::new(slide_id, &out, &classes, None));
        });
        let maps = maps.expect("one bag");
        let coords: Vec<(f64, f64)> = coords.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        let thumbnail = match slides.get(slide_id) {
            Some(file) => Some(Thumbnail::of_slide(file)?),
            None => {
                if req.slides.is_some() {
                    summary.without_slide.push(slide_id.clone());
                }
                None
            }
        };
        let canvas = Canvas { coords, geometry: arrays.geometry, thumbnail: thumbnail.as_ref() };
        let made = draw_slide(&maps, &canvas, &drawing)?;
        if let Some(problem) = &made.problem {
            return Err(Error::Features(format!("the top tiles of {problem}")));
        }
        values.write(instance_columns(None, &maps, &canvas.coords))?;
        if let (Some((level, wanted)), Some(_)) = (&req.full_res, &thumbnail) {
            summary.full_res.extend(whole_slide(&maps, &canvas, *level, wanted, req)?);
        }
        drawn.push(made);
        progress(done + 1, files.len());
    }
    values.close()?;
    write_drawn(&req.out.join(HEATMAPS.file), None, &drawn)?;
    summary.drawn = drawn.len();
    summary.seconds_per_slide = drawn.iter().map(|d| d.seconds).sum::<f64>() / drawn.len().max(1) as f64;
    Ok(summary)
}

/// Slide files by slide id: the one file given, or every slide in the folder given.
fn slide_files(slides: Option<&Path>) -> Result<HashMap<String, PathBuf>> {
    match slides {
        None => Ok(HashMap::new()),
        Some(dir) if dir.is_dir() => Ok(crate::tile::slide_files(dir)?.into_iter().collect()),
        Some(file) if file.is_file() => {
            let id = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(HashMap::from([(id, file.to_path_buf())]))
        }
        Some(missing) => Err(Error::BadFile { path: missing.into(), message: "no such slide file or folder".into() }),
    }
}

/// Writes `<out>/full_res/<slide>.<class>.level<L>.tif` for each class wanted (the predicted fine
/// and coarse classes when none is named); returns the files written.
fn whole_slide(
    maps: &SlideMaps,
    canvas: &Canvas,
    level: usize,
    wanted: &[String],
    req: &Request,
) -> Result<Vec<PathBuf>> {
    let chosen: Vec<&super::maps::ClassMap> = if wanted.is_empty() {
        maps.classes.iter().filter(|c| c.is_predicted).collect()
    } else {
        wanted
            .iter()
            .map(|w| {
                maps.classes.iter().find(|c| &c.class == w).ok_or_else(|| {
                    let names: Vec<&str> = maps.classes.iter().map(|c| c.class.as_str()).collect();
                    Error::Features(format!("--class {w}: the checkpoint's classes are {}", names.join(", ")))
                })
            })
            .collect::<Result<_>>()?
    };
    let Some(on) = canvas.slide() else {
        let path = canvas.thumbnail.map(|t| t.path.clone()).unwrap_or_default();
        let message = "its features are placed in micrometres, and the slide does not say its microns per pixel";
        return Err(Error::BadFile { path, message: message.into() });
    };
    let slide = wsi::Slide::open(&on.path)?;
    let dir = req.out.join("full_res");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut out = Vec::new();
    for class in chosen {
        let path = dir.join(format!("{}.{}.level{level}.tif", maps.slide_id, class.class));
        full_res::write(&slide, level, &canvas.placement(), class.percentiles(req.map), &path, &|_, _| {})?;
        out.push(path);
    }
    Ok(out)
}
