//! `heatmaps[fold=k]`: where the model looked, and what it found there. For each test slide of
//! the fold, every instance's attention and evidence for every class of both levels, recomputed
//! from the checkpoint and the packed store (see [`crate::hmil::infer::evidence`]). Per slide:
//! a picture of one panel per class (coarse, then fine grouped under their coarse class), each
//! patch coloured by its percentile rank within the slide over the slide's thumbnail (or a blank
//! canvas for features without slides), and a mosaic of each class's highest and lowest scoring
//! patches cut from the slide. Every instance's values are kept as a table for SQL.

pub mod apply;
pub mod draw;
pub mod full_res;
pub mod maps;
pub mod mosaic;

use schemas::workflow::StoreMode;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use image::RgbImage;
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{HEATMAP_DIR, HEATMAPS, INSTANCE_ATTENTION, MODEL, THUMBNAIL_DIR, THUMBNAILS, TOP_TILES_DIR};
use schemas::workflow::MapKind;

use self::maps::{Placement, SlideMaps};
use super::evaluate::load_checkpoint;
use super::infer::forward_bags;
use super::train::{Classes, Sources, device};
use crate::error::{Error, Result};
use crate::features::{CoordUnit, Geometry};
use crate::table;
use crate::thumbnails::{self, Thumbnail};

/// Slides run through the network, then drawn on every core, at a time.
const CHUNK: usize = 16;

/// The `heatmaps[fold=k]` stage.
pub struct HeatmapsFold {
    pub fold: usize,
    pub device: String,
    pub classes: Classes,
    pub sources: Sources,
    pub map: MapKind,
    pub top_tiles: usize,
    /// The `train` node of this fold.
    pub train: NodeRef,
    /// The `thumbnails` node, when the workflow has slides to draw on.
    pub thumbnails: Option<NodeRef>,
}

impl Stage for HeatmapsFold {
    fn kind(&self) -> &str {
        "heatmaps"
    }
    /// Faster on a GPU unless set to run on the CPU.
    fn resources(&self) -> Resources {
        Resources { gpu: self.device != "cpu", in_driver: false }
    }
    /// 2: evidence, mosaics, thumbnails, panels cut to the patches' box.
    fn code_version(&self) -> &str {
        "2"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "fold": self.fold, "classes": self.classes, "device": self.device,
            "map": self.map, "top_tiles": self.top_tiles,
        })
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = self.sources.inputs();
        v.push(Input::artifact("checkpoint", &self.train, &MODEL));
        if let Some(node) = &self.thumbnails {
            v.push(Input::artifact("thumbnails", node, &THUMBNAILS));
            v.push(Input::artifact("thumbnail_dir", node, &THUMBNAIL_DIR));
        }
        v
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&HEATMAP_DIR).into(), (&TOP_TILES_DIR).into(), (&INSTANCE_ATTENTION).into(), (&HEATMAPS).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.draw(ctx)?)
    }
}

/// What the pictures of a slide are drawn from besides its maps.
pub struct Canvas<'a> {
    /// The feature file's coordinates.
    pub coords: Vec<(f64, f64)>,
    /// Their unit, and the patch side when the file said it.
    pub geometry: Geometry,
    /// The slide, when there is one to draw on.
    pub thumbnail: Option<&'a Thumbnail>,
}

impl Canvas<'_> {
    /// The slide the patches can be placed on: none without one, or when the coordinates are
    /// micrometres and the slide does not say its resolution.
    pub fn slide(&self) -> Option<&Thumbnail> {
        self.thumbnail.filter(|t| self.geometry.unit != CoordUnit::Microns || t.mpp.is_some())
    }

    /// Where the patches lie: on [`Canvas::slide`] in its level-0 pixels, else in the file's unit.
    pub fn placement(&self) -> Placement {
        Placement::new(self.coords.clone(), self.geometry, self.slide().and_then(|t| t.mpp))
    }
}

/// Where to write a slide's pictures and what to draw.
pub struct Drawing<'a> {
    pub heatmap_dir: &'a Path,
    pub tiles_dir: &'a Path,
    pub map: MapKind,
    /// Patches per class at each end of the mosaic (0: none).
    pub top_tiles: usize,
}

/// A slide drawn: its pictures (relative to the output folder), its background, and the time.
pub struct Drawn {
    pub slide_id: String,
    pub heatmap: String,
    pub top_tiles: Option<String>,
    pub background: &'static str,
    pub seconds: f64,
    /// Why there is no mosaic although there is a slide.
    pub problem: Option<String>,
}

impl HeatmapsFold {
    fn draw(&self, ctx: &Context) -> Result<()> {
        let device = device(&self.device, ctx.gpu())?;
        let (store, bags) = Sources::load(ctx, self.fold, device, StoreMode::Auto)?;
        let model = load_checkpoint(ctx, &self.classes, store.dim, device)?;
        let geometry = geometry(ctx.input("packed"))?;
        let thumbs = match &self.thumbnails {
            Some(_) => thumbnails::read(ctx.input("thumbnails"), ctx.input("thumbnail_dir"))?,
            None => HashMap::new(),
        };
        let (heatmaps, top_tiles) = (ctx.output(HEATMAP_DIR.file), ctx.output(TOP_TILES_DIR.file));
        for dir in [&heatmaps, &top_tiles] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let drawing =
            Drawing { heatmap_dir: &heatmaps, tiles_dir: &top_tiles, map: self.map, top_tiles: self.top_tiles };
        let mut values = table::Writer::create(&ctx.output(INSTANCE_ATTENTION.file), (INSTANCE_ATTENTION.schema)())?;
        let (mut drawn, mut without_coords) = (Vec::new(), Vec::new());
        let bar = ctx.progress(bags.test.len() as u64, "drawing heatmaps");
        for chunk in bags.test.chunks(CHUNK) {
            if ctx.interrupted() {
                return Err(Error::Interrupted(format!("drawing heatmaps, {} slide(s) drawn", drawn.len())));
            }
            let mut maps = Vec::new();
            forward_bags(&*model.net, &store, chunk, CHUNK, |i, out| {
                let bag = &chunk[i];
                let truth = Some((bag.fine as usize, bag.coarse as usize));
                maps.push(SlideMaps::new(&bag.slide_id, &out, &self.classes, truth));
            });
            let mut jobs = Vec::new();
            for (bag, maps) in chunk.iter().zip(maps) {
                let coords = store.coords(bag)?;
                if coords.is_empty() || coords.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
                    without_coords.push(bag.slide_id.clone());
                    continue;
                }
                let geometry = geometry.get(&bag.slide_id).copied().unwrap_or_default();
                jobs.push((maps, Canvas { coords, geometry, thumbnail: thumbs.get(&bag.slide_id) }));
            }
            let results = crate::par::map(&jobs, |(maps, canvas)| draw_slide(maps, canvas, &drawing));
            for ((maps, canvas), result) in jobs.iter().zip(results) {
                values.write(instance_columns(Some(self.fold), maps, &canvas.coords))?;
                drawn.push(result?);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        values.close()?;
        // Files without coordinates at all (CLAM's pt_files, say) are a format, not a problem;
        // a cohort where only some slides lack them is worth a warning.
        if !without_coords.is_empty() && without_coords.len() < bags.test.len() {
            ctx.warn(format!(
                "no heatmap for {} slide(s) whose features have no coordinates: {}",
                without_coords.len(),
                pipeline::some_of(&without_coords, ", ")
            ));
        }
        let problems: Vec<String> = drawn.iter().filter_map(|d| d.problem.clone()).collect();
        if !problems.is_empty() {
            ctx.warn(format!("no top tiles for {} slide(s): {}", problems.len(), pipeline::some_of(&problems, "; ")));
        }
        write_drawn(&ctx.output(HEATMAPS.file), Some(self.fold), &drawn)
    }
}

/// Draws a slide's heatmap and, where its slide can be read, its top tiles.
pub fn draw_slide(maps: &SlideMaps, canvas: &Canvas, to: &Drawing) -> Result<Drawn> {
    let start = Instant::now();
    let (thumbnail, placement) = (canvas.slide(), canvas.placement());
    let panels: Vec<draw::Panel> =
        maps.classes.iter().map(|c| draw::Panel { title: c.title(), values: c.percentiles(to.map) }).collect();
    let banner = format!("{}: {}; colour: {} percentile in the slide", maps.slide_id, maps.verdict, to.map.name());
    let mut background = "blank";
    let picture = draw::render(&placement, &panels, &banner, |layout| {
        let image = cut(thumbnail?, layout.extent())?;
        background = "slide";
        Some(image)
    })?;
    let heatmap = format!("{}.png", maps.slide_id);
    let png = to.heatmap_dir.join(&heatmap);
    picture.save(&png).map_err(|e| Error::BadFile { path: png.clone(), message: e.to_string() })?;
    let (mut top_tiles, mut problem) = (None, None);
    if let Some(t) = thumbnail.filter(|_| to.top_tiles > 0) {
        let made = wsi::Slide::open(&t.path)
            .map_err(Error::from)
            .and_then(|slide| mosaic::mosaic(&slide, &placement, maps, to.map, to.top_tiles));
        match made {
            Ok(image) => {
                let name = format!("{}.png", maps.slide_id);
                let png = to.tiles_dir.join(&name);
                image.save(&png).map_err(|e| Error::BadFile { path: png.clone(), message: e.to_string() })?;
                top_tiles = Some(name);
            }
            Err(e) => problem = Some(format!("{}: {e}", maps.slide_id)),
        }
    }
    Ok(Drawn {
        slide_id: maps.slide_id.clone(),
        heatmap,
        top_tiles,
        background,
        seconds: start.elapsed().as_secs_f64(),
        problem,
    })
}

/// The part of `thumbnail` under the level-0 box `extent` (left, top, right, bottom), padded
/// with white where the box leaves the slide.
fn cut(thumbnail: &Thumbnail, extent: (f64, f64, f64, f64)) -> Option<RgbImage> {
    let image = thumbnail.pixels()?;
    let d = thumbnail.downsample;
    let (l, t) = ((extent.0 / d).floor() as i64, (extent.1 / d).floor() as i64);
    let (w, h) =
        (((extent.2 - extent.0) / d).ceil().max(1.0) as u32, ((extent.3 - extent.1) / d).ceil().max(1.0) as u32);
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, image.as_ref(), -l, -t);
    Some(out)
}

/// Each slide's coordinate unit and patch side (when its file said), from `packed.parquet`.
fn geometry(packed: &Path) -> Result<HashMap<String, Geometry>> {
    let t = table::read(packed)?;
    let geometries = crate::pack::geometries(&t)
        .ok_or_else(|| Error::Table { path: packed.into(), message: "lacks column patch_size or coord_unit".into() })?;
    Ok(table::strings(&t, "slide_id").into_iter().zip(geometries).collect())
}

/// The `instance_attention` rows of one slide: every instance for every class.
pub fn instance_columns(fold: Option<usize>, maps: &SlideMaps, coords: &[(f64, f64)]) -> Vec<ArrayRef> {
    let n = coords.len();
    let rows = maps.classes.len() * n;
    let each = |f: &dyn Fn(&maps::ClassMap, usize) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(maps.classes.iter().flat_map(|c| (0..n).map(move |i| f(c, i))).collect::<Vec<_>>()))
    };
    vec![
        Arc::new(Int32Array::from(vec![fold.map(|f| f as i32); rows])),
        table::string_col(std::iter::repeat_n(maps.slide_id.as_str(), rows)),
        table::string_col(maps.classes.iter().flat_map(|c| std::iter::repeat_n(c.level, n))),
        table::string_col(maps.classes.iter().flat_map(|c| std::iter::repeat_n(c.class.as_str(), n))),
        Arc::new(Int64Array::from(maps.classes.iter().flat_map(|_| 0..n as i64).collect::<Vec<_>>())),
        each(&|_, i| coords[i].0),
        each(&|_, i| coords[i].1),
        each(&|c, i| c.attention[i]),
        each(&|c, i| c.attention_percentile[i]),
        each(&|c, i| c.evidence[i]),
        each(&|c, i| c.evidence_percentile[i]),
    ]
}

/// Writes `heatmaps.parquet`: the pictures of each slide drawn, under the folders named by
/// [`HEATMAP_DIR`] and [`TOP_TILES_DIR`].
pub fn write_drawn(path: &Path, fold: Option<usize>, drawn: &[Drawn]) -> Result<()> {
    let under = |dir: &str, name: &str| format!("{dir}{name}");
    table::write(
        path,
        (HEATMAPS.schema)(),
        vec![
            Arc::new(Int32Array::from(vec![fold.map(|f| f as i32); drawn.len()])),
            table::string_col(drawn.iter().map(|d| d.slide_id.as_str())),
            table::string_col(drawn.iter().map(|d| under(HEATMAP_DIR.file, &d.heatmap))),
            Arc::new(
                drawn
                    .iter()
                    .map(|d| d.top_tiles.as_ref().map(|t| under(TOP_TILES_DIR.file, t)))
                    .collect::<StringArray>(),
            ),
            table::string_col(drawn.iter().map(|d| d.background)),
            Arc::new(drawn.iter().map(|d| d.seconds).collect::<Float64Array>()),
        ],
    )
}
