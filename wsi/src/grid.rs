//! From a slide to its patches: a low-resolution overview to segment, and the grid of patches at
//! the target resolution whose area is at least half tissue.

use image::imageops::{FilterType, resize};
use image::{GrayImage, RgbImage};
use imageproc::integral_image::{integral_image, sum_image_pixels};

use crate::error::{Error, Result};
use crate::openslide::{Level, Slide, level_for};
use crate::tissue::{TissueParams, segment};

/// Level-0 pixels per overview pixel, as CLAM segments (on the level nearest this downsample).
pub const OVERVIEW_DOWNSAMPLE: f64 = 64.0;

/// Overview blocks are read this many overview pixels at a time, when no level is coarse enough.
const BLOCK: u32 = 64;

/// Where patches come from and how big they are.
#[derive(Debug, Clone, PartialEq)]
pub struct GridSpec {
    /// Microns per pixel of the patches.
    pub mpp: f64,
    /// Patch side in pixels at that resolution.
    pub patch_size: u32,
    /// Microns per level-0 pixel of slides that do not say.
    pub mpp_fallback: Option<f64>,
}

/// The patches of one slide.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// The level patches are read from.
    pub level: usize,
    /// Patch side in level-0 pixels (also the grid step: patches do not overlap).
    pub size0: u32,
    /// Patch side in pixels of `level`, resized to `patch_size` after reading.
    pub read_size: u32,
    /// Top-left corners in level-0 pixels, row by row.
    pub patches: Vec<[i64; 2]>,
}

/// A slide's overview, tissue mask and patches.
pub struct Tiling {
    pub overview: RgbImage,
    /// Level-0 pixels per overview (and mask) pixel.
    pub downsample: f64,
    pub mask: GrayImage,
    pub grid: Grid,
    /// Microns per level-0 pixel used (the slide's, or the fallback).
    pub mpp: f64,
}

/// Segments `slide` and lays its patch grid.
pub fn tile(slide: &Slide, spec: &GridSpec, tissue: &TissueParams) -> Result<Tiling> {
    let mpp = slide.mpp().or(spec.mpp_fallback).ok_or_else(|| Error::NoMpp { path: slide.path().to_path_buf() })?;
    let (overview, downsample) = overview(slide)?;
    let mask = segment(&overview, downsample, tissue);
    let grid = grid(slide.levels(), mpp, spec, &mask, downsample);
    Ok(Tiling { overview, downsample, mask, grid, mpp })
}

/// An RGB image of the whole slide at about [`OVERVIEW_DOWNSAMPLE`], and its exact downsample.
pub fn overview(slide: &Slide) -> Result<(RgbImage, f64)> {
    image_at(slide, OVERVIEW_DOWNSAMPLE)
}

/// An RGB image of the whole slide at about `downsample` level-0 pixels per pixel, and its exact
/// downsample. The level nearest that downsample is read whole when it is at least half as
/// coarse; otherwise a finer level is read block by block and each block sampled down (as a
/// coarser level would be, without blurring tissue into the background), so memory stays
/// bounded.
pub fn image_at(slide: &Slide, downsample: f64) -> Result<(RgbImage, f64)> {
    let levels = slide.levels();
    let index = slide.level_for_downsample(downsample);
    let level = levels[index];
    if level.downsample >= downsample / 2.0 {
        let image = slide.read_rgb(0, 0, index, level.width as u32, level.height as u32)?;
        return Ok((image, levels[0].width as f64 / level.width as f64));
    }
    let (w0, h0) = (levels[0].width, levels[0].height);
    let (w, h) = ((w0 as f64 / downsample).ceil() as u32, (h0 as f64 / downsample).ceil() as u32);
    let mut out = RgbImage::new(w, h);
    let side = (f64::from(BLOCK) * downsample / level.downsample).ceil() as u32;
    for by in (0..h).step_by(BLOCK as usize) {
        for bx in (0..w).step_by(BLOCK as usize) {
            let (x0, y0) = ((f64::from(bx) * downsample) as i64, (f64::from(by) * downsample) as i64);
            let block = slide.read_rgb(x0, y0, index, side, side)?;
            let small = resize(&block, BLOCK, BLOCK, FilterType::Nearest);
            image::imageops::replace(&mut out, &small, i64::from(bx), i64::from(by));
        }
    }
    Ok((out, downsample))
}

/// The patches of a slide with `levels` at `mpp` microns per level-0 pixel whose footprint on
/// `mask` (at `downsample` level-0 pixels per pixel) is at least half tissue.
pub fn grid(levels: &[Level], mpp: f64, spec: &GridSpec, mask: &GrayImage, downsample: f64) -> Grid {
    let scale = spec.mpp / mpp;
    let size0 = (f64::from(spec.patch_size) * scale).round().max(1.0) as u32;
    let level = level_for(levels, scale);
    let read_size = (f64::from(size0) / levels[level].downsample).round().max(1.0) as u32;
    let integral: image::ImageBuffer<image::Luma<u32>, Vec<u32>> = integral_image(mask);
    let (mw, mh) = (mask.width(), mask.height());
    let mut patches = Vec::new();
    let step = i64::from(size0);
    let (w0, h0) = (levels[0].width as i64, levels[0].height as i64);
    // The mask pixel a level-0 coordinate falls in (`end`: the last one before it).
    let to_mask = |v: i64, end: bool, limit: u32| {
        let m = v as f64 / downsample;
        let m = if end { m.ceil() as i64 - 1 } else { m.floor() as i64 };
        m.clamp(0, i64::from(limit) - 1) as u32
    };
    for y in (0..=h0 - step).step_by(size0 as usize) {
        for x in (0..=w0 - step).step_by(size0 as usize) {
            let (left, right) = (to_mask(x, false, mw), to_mask(x + step, true, mw));
            let (top, bottom) = (to_mask(y, false, mh), to_mask(y + step, true, mh));
            let area = f64::from((right - left + 1) * (bottom - top + 1)) * 255.0;
            let tissue = f64::from(sum_image_pixels(&integral, left, top, right, bottom)[0]);
            if tissue * 2.0 >= area {
                patches.push([x, y]);
            }
        }
    }
    Grid { level, size0, read_size, patches }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    fn levels() -> Vec<Level> {
        [1.0, 4.0, 16.0]
            .map(|d| Level { width: (4096.0 / d) as u64, height: (2048.0 / d) as u64, downsample: d })
            .to_vec()
    }

    #[test]
    fn patch_size_and_level_follow_the_target_resolution() {
        let mask = GrayImage::from_pixel(64, 32, Luma([255]));
        let spec = GridSpec { mpp: 0.5, patch_size: 256, mpp_fallback: None };
        // 0.25 µm slide, 0.5 µm patches: 512 level-0 pixels, read from level 0 (4× is too coarse).
        let g = grid(&levels(), 0.25, &spec, &mask, 64.0);
        assert_eq!((g.level, g.size0, g.read_size), (0, 512, 512));
        assert_eq!(g.patches.len(), 8 * 4);
        // 0.125 µm slide: 1024 level-0 pixels, read as 256 from level 1.
        let g = grid(&levels(), 0.125, &spec, &mask, 64.0);
        assert_eq!((g.level, g.size0, g.read_size, g.patches.len()), (1, 1024, 256, 4 * 2));
    }

    #[test]
    fn only_patches_at_least_half_on_tissue_are_kept() {
        // Tissue in the mask's left 20 columns: level-0 x < 1280.
        let mask = GrayImage::from_fn(64, 32, |x, _| Luma([if x < 20 { 255 } else { 0 }]));
        let spec = GridSpec { mpp: 0.25, patch_size: 512, mpp_fallback: None };
        let g = grid(&levels(), 0.25, &spec, &mask, 64.0);
        let xs: std::collections::BTreeSet<i64> = g.patches.iter().map(|p| p[0]).collect();
        // 0–512 and 512–1024 are all tissue, 1024–1536 is half tissue, 1536– is none.
        assert_eq!(xs.into_iter().collect::<Vec<_>>(), [0, 512, 1024]);
    }
}
