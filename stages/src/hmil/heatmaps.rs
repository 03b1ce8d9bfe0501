//! `heatmaps[fold=k]`: where the model looked. For each test slide of the fold, every instance's
//! attention for every class of both levels, recomputed from the checkpoint and the packed store,
//! as a percentile rank within the slide (as CLAM draws it). It is drawn with the viridis colour
//! map at the patch coordinates, over the slide (slide workflows) or a blank canvas (features
//! only): one PNG per slide, the coarse classes then the fine classes side by side, each with its
//! probability, under the slide's true and predicted labels. Every instance's attention is also
//! written as a table for SQL and figures of one's own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, Int32Array, Int64Array};
use arrow::datatypes::Float64Type;
use image::{Rgb, RgbImage};
use pipeline::{Context, Input, Stage, StageError};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use super::data::Bag;
use super::evaluate::load_checkpoint;
use super::infer::{argmax, predict};
use super::train::{Classes, Sources, device};
use crate::error::{Error, Result};
use crate::table;

/// The directory output: `<slide>.png` per test slide with coordinates.
pub const HEATMAP_DIR: &str = "heatmaps/";
/// Every instance's attention on the drawn slides.
pub const INSTANCE_ATTENTION: &str = "instance_attention.parquet";
/// Side of a panel's longer edge, in pixels.
const PANEL: f64 = 256.0;
/// Margins around and between panels, the banner's and titles' heights, the colour bar's column.
const GAP: u32 = 8;
const BANNER: u32 = 28;
const TITLE: u32 = 20;
const BAR: u32 = 48;

/// Where a picture's parts are: panels of `width` × `height` pixels, the colour bar at `bar_x`.
struct Layout {
    width: u32,
    height: u32,
    bar_x: u32,
}

impl Layout {
    /// Left edge of panel `k`.
    fn panel_x(&self, k: usize) -> u32 {
        GAP + k as u32 * (self.width + GAP)
    }
}
/// Opacity of the attention colour over the slide.
const ALPHA: f64 = 0.7;

/// The `heatmaps[fold=k]` stage.
pub struct HeatmapsFold {
    pub fold: usize,
    pub device: String,
    pub classes: Classes,
    pub sources: Sources,
    /// Node id of `train[fold=k]`.
    pub train_node: String,
    /// Node id of `tile_slides`, whose `slides.parquet` says where each slide's file is.
    pub slides_node: Option<String>,
}

impl Stage for HeatmapsFold {
    fn kind(&self) -> &str {
        "heatmaps"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "fold": self.fold, "classes": self.classes, "device": self.device })
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = self.sources.inputs();
        v.push(Input::artifact("checkpoint", &self.train_node, "model.safetensors"));
        if let Some(node) = &self.slides_node {
            v.push(Input::artifact("slides", node, crate::tile::SLIDES));
        }
        v
    }
    fn outputs(&self) -> Vec<String> {
        vec![HEATMAP_DIR.into(), INSTANCE_ATTENTION.into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.draw(ctx)?)
    }
}

/// One instance's attention: slide, level, class, instance, x, y, attention, percentile.
type Row<'a> = (&'a str, &'static str, &'a str, i64, f64, f64, f64, f64);

impl HeatmapsFold {
    fn draw(&self, ctx: &Context) -> Result<()> {
        let device = device(&self.device)?;
        let (store, bags) = Sources::load(ctx, self.fold, device)?;
        let (_vs, model) = load_checkpoint(ctx, &self.classes, store.dim, device)?;
        let sizes = patch_sizes(ctx.input("packed"))?;
        let files = match &self.slides_node {
            Some(_) => slide_paths(ctx.input("slides"))?,
            None => HashMap::new(),
        };
        let c = &self.classes;
        let dir = ctx.output(HEATMAP_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let bar = ctx.progress(bags.test.len() as u64, "drawing heatmaps");
        let (mut rows, mut without_coords): (Vec<Row>, Vec<&str>) = (Vec::new(), Vec::new());
        for bag in &bags.test {
            if ctx.interrupted() {
                return Err(Error::Interrupted(format!("drawing the heatmap of {}", bag.slide_id)));
            }
            let coords = store.coords(bag)?;
            if coords.iter().any(|(x, y)| !x.is_finite() || !y.is_finite()) {
                without_coords.push(&bag.slide_id);
                bar.inc(1);
                continue;
            }
            let pred = predict(&model, &store, std::slice::from_ref(bag), 1, usize::MAX, &c.fine_to_coarse)
                .pop()
                .expect("one prediction per bag");
            let mut panels = Vec::new();
            for (level, names, probs) in
                [("coarse", &c.coarse, &pred.coarse_probs), ("fine", &c.fine, &pred.fine_probs)]
            {
                for (class, sorted) in pred.top_attention[usize::from(level == "fine")].iter().enumerate() {
                    let ranks = percentiles(sorted);
                    for &(inst, score) in sorted {
                        let (x, y) = coords[inst];
                        rows.push((&bag.slide_id, level, &names[class], inst as i64, x, y, score, ranks[inst]));
                    }
                    panels.push(Panel { title: format!("{} {:.2}", names[class], probs[class]), values: ranks });
                }
            }
            let size = sizes.get(&bag.slide_id).copied().flatten().unwrap_or_else(|| spacing(&coords));
            let banner = banner(bag, c, &pred.fine_probs, &pred.coarse_probs);
            let background = |extent: (f64, f64), scale: f64| overview(files.get(&bag.slide_id), extent, scale);
            let picture = render(&coords, size, &panels, &banner, background)?;
            let png = dir.join(format!("{}.png", bag.slide_id));
            picture.save(&png).map_err(|e| Error::BadFile { path: png.clone(), message: e.to_string() })?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        // Files without coordinates at all (CLAM's pt_files, say) are a format, not a problem;
        // a cohort where only some slides lack them is worth a warning.
        if !without_coords.is_empty() && without_coords.len() < bags.test.len() {
            let names: Vec<String> = without_coords.iter().map(|s| s.to_string()).collect();
            ctx.warn(format!(
                "no heatmap for {} slide(s) whose features have no coordinates: {}",
                names.len(),
                pipeline::some_of(&names, ", ")
            ));
        }
        write_rows(&ctx.output(INSTANCE_ATTENTION), self.fold, &rows)
    }
}

/// "slide_007: true ADH / atypical, predicted FEA / atypical" (fine / coarse; the two heads
/// predict on their own, so they may disagree).
fn banner(bag: &Bag, c: &Classes, fine: &[f64], coarse: &[f64]) -> String {
    format!(
        "{}: true {} / {}, predicted {} / {} (fine / coarse)",
        bag.slide_id,
        c.fine[bag.fine as usize],
        c.coarse[bag.coarse as usize],
        c.fine[argmax(fine)],
        c.coarse[argmax(coarse)]
    )
}

/// Percentile rank (0–1, 1 the most attended) of each instance, from instances sorted by
/// attention, highest first; ties share the higher rank.
pub fn percentiles(sorted: &[(usize, f64)]) -> Vec<f64> {
    let n = sorted.len();
    let mut out = vec![0.0; n];
    let mut first_of_tie = 0;
    for (pos, &(inst, score)) in sorted.iter().enumerate() {
        if pos > 0 && score < sorted[pos - 1].1 {
            first_of_tie = pos;
        }
        out[inst] = if n > 1 { 1.0 - first_of_tie as f64 / (n - 1) as f64 } else { 1.0 };
    }
    out
}

/// The patch side where a file does not say it: the smallest step between distinct x (or y)
/// coordinates, or 1.
pub fn spacing(coords: &[(f64, f64)]) -> f64 {
    let step = |values: Vec<f64>| {
        let mut v = values;
        v.sort_by(f64::total_cmp);
        v.dedup();
        v.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min)
    };
    let s = step(coords.iter().map(|c| c.0).collect()).min(step(coords.iter().map(|c| c.1).collect()));
    if s.is_finite() && s > 0.0 { s } else { 1.0 }
}

/// One class's panel: its title and each instance's percentile.
pub struct Panel {
    pub title: String,
    pub values: Vec<f64>,
}

/// The heatmap picture: `panels` side by side, each the patches at `coords` (level-0 top-left
/// corners, `size` a side) coloured by value over `background(extent, scale)` (white when
/// none), under `banner`, with a colour bar.
pub fn render(
    coords: &[(f64, f64)],
    size: f64,
    panels: &[Panel],
    banner: &str,
    background: impl Fn((f64, f64), f64) -> Option<RgbImage>,
) -> Result<RgbImage> {
    let extent = coords.iter().fold((0.0f64, 0.0f64), |(w, h), (x, y)| (w.max(x + size), h.max(y + size)));
    let scale = extent.0.max(extent.1) / PANEL;
    let (pw, ph) = ((extent.0 / scale).ceil() as u32, (extent.1 / scale).ceil() as u32);
    let base = background(extent, scale)
        .map(|b| image::imageops::resize(&b, pw, ph, image::imageops::FilterType::Triangle))
        .unwrap_or_else(|| RgbImage::from_pixel(pw, ph, Rgb([255, 255, 255])));
    let width = panels.len() as u32 * (pw + GAP) + GAP + BAR;
    let layout = Layout { width: pw, height: ph, bar_x: width - BAR + 8 };
    let mut canvas = RgbImage::from_pixel(width, BANNER + TITLE + ph + 16, Rgb([255, 255, 255]));
    let side = (size / scale).ceil().max(1.0) as u32;
    for (k, panel) in panels.iter().enumerate() {
        let mut p = base.clone();
        for (&(x, y), &v) in coords.iter().zip(&panel.values) {
            let colour = ViridisRGB::get_color(v);
            let (x0, y0) = ((x / scale) as u32, (y / scale) as u32);
            for py in y0..(y0 + side).min(ph) {
                for px in x0..(x0 + side).min(pw) {
                    let under = p.get_pixel(px, py).0;
                    let over = [colour.0, colour.1, colour.2];
                    let mix = |i: usize| (ALPHA * f64::from(over[i]) + (1.0 - ALPHA) * f64::from(under[i])) as u8;
                    p.put_pixel(px, py, Rgb([mix(0), mix(1), mix(2)]));
                }
            }
        }
        image::imageops::replace(&mut canvas, &p, i64::from(layout.panel_x(k)), i64::from(BANNER + TITLE));
    }
    for py in 0..ph {
        let colour = ViridisRGB::get_color(1.0 - f64::from(py) / f64::from(ph.max(2) - 1));
        for px in layout.bar_x..layout.bar_x + 12 {
            canvas.put_pixel(px, BANNER + TITLE + py, Rgb([colour.0, colour.1, colour.2]));
        }
    }
    label(&mut canvas, panels, &layout, banner)?;
    Ok(canvas)
}

/// Writes the banner, each panel's title and the colour bar's ends onto `canvas`.
fn label(canvas: &mut RgbImage, panels: &[Panel], layout: &Layout, banner: &str) -> Result<()> {
    crate::report::register_font();
    let (w, h) = canvas.dimensions();
    let err = |e: &dyn std::fmt::Display| Error::Features(format!("drawing a heatmap: {e}"));
    {
        let root = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
        let font = |px: u32| ("sans-serif", px).into_font().color(&BLACK);
        root.draw_text(banner, &font(15), (GAP as i32, 6)).map_err(|e| err(&e))?;
        for (k, panel) in panels.iter().enumerate() {
            let x = layout.panel_x(k) as i32;
            root.draw_text(&panel.title, &font(13), (x, (BANNER + 3) as i32)).map_err(|e| err(&e))?;
        }
        let (x, y) = (layout.bar_x as i32, (BANNER + TITLE) as i32);
        root.draw_text("100%", &font(11), (x - 6, y - 13)).map_err(|e| err(&e))?;
        root.draw_text("0%", &font(11), (x, y + layout.height as i32 + 1)).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(())
}

/// The slide behind a heatmap, read at about `scale` level-0 pixels per pixel and cut to
/// `extent`; none without a slide file or when it cannot be read.
fn overview(path: Option<&std::path::PathBuf>, extent: (f64, f64), scale: f64) -> Option<RgbImage> {
    let slide = wsi::Slide::open(path?).ok()?;
    let (image, downsample) = wsi::grid::image_at(&slide, scale).ok()?;
    let (w, h) = ((extent.0 / downsample).ceil() as u32, (extent.1 / downsample).ceil() as u32);
    Some(image::imageops::crop_imm(&image, 0, 0, w.min(image.width()), h.min(image.height())).to_image())
}

/// Each slide's level-0 patch size, when its feature file said it (`packed.parquet`).
fn patch_sizes(packed: &Path) -> Result<HashMap<String, Option<f64>>> {
    let t = table::read(packed)?;
    let sizes = t
        .column_by_name("patch_size")
        .ok_or_else(|| Error::Table { path: packed.into(), message: "lacks column patch_size".into() })?
        .as_primitive::<Float64Type>()
        .clone();
    Ok(table::strings(&t, "slide_id")
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, sizes.is_valid(i).then(|| sizes.value(i))))
        .collect())
}

/// Each slide's file, from `slides.parquet`.
fn slide_paths(slides: &Path) -> Result<HashMap<String, std::path::PathBuf>> {
    let t = table::read(slides)?;
    Ok(table::strings(&t, "slide_id").into_iter().zip(table::strings(&t, "path").into_iter().map(Into::into)).collect())
}

fn write_rows(path: &Path, fold: usize, rows: &[Row]) -> Result<()> {
    table::write(
        path,
        schemas::tables::instance_attention(),
        vec![
            Arc::new(Int32Array::from(vec![fold as i32; rows.len()])),
            table::string_col(rows.iter().map(|r| r.0)),
            table::string_col(rows.iter().map(|r| r.1)),
            table::string_col(rows.iter().map(|r| r.2)),
            Arc::new(rows.iter().map(|r| r.3).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|r| r.4).collect::<Float64Array>()),
            Arc::new(rows.iter().map(|r| r.5).collect::<Float64Array>()),
            Arc::new(rows.iter().map(|r| r.6).collect::<Float64Array>()),
            Arc::new(rows.iter().map(|r| r.7).collect::<Float64Array>()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rank_within_the_slide_and_share_ties() {
        let sorted = [(2, 0.5), (0, 0.3), (3, 0.3), (1, 0.1), (4, 0.0)];
        assert_eq!(percentiles(&sorted), [0.75, 0.25, 1.0, 0.75, 0.0]);
        assert_eq!(spacing(&[(0.0, 0.0), (256.0, 0.0), (512.0, 256.0)]), 256.0);
    }

    #[test]
    fn the_hot_region_is_drawn_where_its_patches_are() {
        // A 4 × 4 grid of 256-pixel patches; attention high on the left column only.
        let coords: Vec<(f64, f64)> = (0..16).map(|i| (f64::from(i % 4) * 256.0, f64::from(i / 4) * 256.0)).collect();
        let values: Vec<f64> = coords.iter().map(|(x, _)| if *x == 0.0 { 1.0 } else { 0.0 }).collect();
        let panel = Panel { title: "IC 0.90".into(), values };
        let picture = render(&coords, 256.0, &[panel], "slide: true IC", |_, _| None).unwrap();
        // The panel starts at (8, 48) and is 256 pixels wide: 64 per patch.
        let at = |x: u32, y: u32| picture.get_pixel(8 + x, 48 + y).0;
        let (hot, cold) = (at(32, 100), at(200, 100));
        // Viridis: yellow at the top, purple at the bottom (blended with white).
        assert!(hot[0] > 200 && hot[1] > 200 && hot[2] < 120, "hot {hot:?}");
        assert!(cold[0] < 150 && cold[2] > 120, "cold {cold:?}");
    }
}
