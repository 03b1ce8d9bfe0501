//! One class's heatmap over a whole slide at one of its pyramid levels, written as a pyramidal
//! tiled TIFF (OpenSlide, QuPath and other slide viewers open it) strip by strip, so that a
//! large slide is drawn in bounded memory.

use std::path::Path;

use plotters::style::colors::colormaps::ViridisRGB;
use wsi::Slide;
use wsi::tiff::PyramidWriter;

use super::draw::blend;
use super::maps::Placement;
use crate::error::{Error, Result};

/// Opacity of the colour over the slide: lower than the small panels', so the tissue shows.
const ALPHA: f64 = 0.45;
/// Side of the output's tiles.
const TILE: u32 = 512;
/// The coarsest level written is the first at most this many pixels on its long side.
const SMALLEST: u32 = 1024;

/// Writes `values` (0–1 per patch of `placement`, level-0 pixels) over `slide` at pyramid level
/// `level` to `path`, with the slide's resolution scaled to that level; `progress` is told each
/// strip done and the number of strips.
pub fn write(
    slide: &Slide,
    level: usize,
    placement: &Placement,
    values: &[f64],
    path: &Path,
    progress: &dyn Fn(u32, u32),
) -> Result<()> {
    let levels = slide.levels();
    let at = levels.get(level).ok_or_else(|| {
        Error::Features(format!("{}: has levels 0 to {}, not level {level}", slide.path().display(), levels.len() - 1))
    })?;
    let (width, height, downsample) = (at.width as u32, at.height as u32, at.downsample);
    let mut pyramid = 1;
    while (width.max(height) >> (pyramid - 1)) > SMALLEST {
        pyramid += 1;
    }
    let mpp = slide.mpp().map(|m| m * downsample);
    // Written under another name and renamed when whole, so an interrupted run leaves no TIFF
    // that looks finished.
    let partial = path.with_extension("tif.partial");
    let mut writer = PyramidWriter::create(&partial, (width, height), mpp, TILE, pyramid)?;
    let tile = writer.tile();
    let strips = height.div_ceil(tile);
    // The patches each strip crosses, in pixels of the level.
    let mut by_strip: Vec<Vec<(f64, f64, [u8; 3])>> = vec![Vec::new(); strips as usize];
    let side = placement.size / downsample;
    for (&(x, y), &v) in placement.corners.iter().zip(values) {
        let (px, py) = (x / downsample, y / downsample);
        if py + side <= 0.0 || py >= f64::from(height) {
            continue;
        }
        let c = ViridisRGB::get_color(v);
        let first = (py.max(0.0) / f64::from(tile)) as u32;
        let last = (((py + side).min(f64::from(height)) - 1e-9) / f64::from(tile)) as u32;
        for s in first..=last.min(strips - 1) {
            by_strip[s as usize].push((px, py, [c.0, c.1, c.2]));
        }
    }
    for (s, patches) in by_strip.iter().enumerate() {
        let top = s as u32 * tile;
        let rows = tile.min(height - top);
        let mut strip = slide.read_rgb(0, (f64::from(top) * downsample) as i64, level, width, rows)?;
        for &(px, py, colour) in patches {
            let (x0, x1) = (px.max(0.0) as u32, ((px + side).min(f64::from(width))).max(0.0) as u32);
            let (y0, y1) = (
                (py - f64::from(top)).max(0.0) as u32,
                ((py + side - f64::from(top)).min(f64::from(rows))).max(0.0) as u32,
            );
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = strip.get_pixel_mut(x, y);
                    p.0 = blend(colour, p.0, ALPHA);
                }
            }
        }
        writer.push(&strip)?;
        progress(s as u32 + 1, strips);
    }
    writer.finish()?;
    std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))
}
