//! The QC picture of a slide's tiling: the slide with the tissue outlined and the kept patches
//! drawn, to look at before trusting a run.

use image::{GrayImage, Rgb, RgbImage};
use imageproc::drawing::draw_hollow_rect_mut;
use imageproc::rect::Rect;

use crate::error::Result;
use crate::grid::{Tiling, image_at};
use crate::openslide::Slide;

/// The long side the picture aims at, in pixels (the overview's, when that is larger).
const PICTURE_SIDE: f64 = 1024.0;

const OUTLINE: Rgb<u8> = Rgb([0, 170, 60]);
const PATCH: Rgb<u8> = Rgb([40, 70, 220]);

/// The slide, about [`PICTURE_SIDE`] pixels on its long side (never coarser than the overview
/// the mask was made on), with background faded, the tissue's border in green and each kept
/// patch as a blue square.
pub fn picture(slide: &Slide, tiling: &Tiling) -> Result<RgbImage> {
    let level0 = slide.levels()[0];
    let wanted = (level0.width.max(level0.height) as f64 / PICTURE_SIDE).clamp(1.0, tiling.downsample);
    let (mut out, downsample) = if wanted >= tiling.downsample {
        (tiling.overview.clone(), tiling.downsample)
    } else {
        image_at(slide, wanted)?
    };
    let scale = downsample / tiling.downsample;
    let mask = &tiling.mask;
    let on = |x: i64, y: i64| {
        let (mx, my) = ((x as f64 * scale) as i64, (y as f64 * scale) as i64);
        x >= 0 && y >= 0 && in_mask(mask, mx, my)
    };
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (x, y) = (i64::from(x), i64::from(y));
        if !on(x, y) {
            p.0 = p.0.map(|c| 255 - (255 - c) / 3);
        } else if [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !on(x + dx, y + dy)) {
            *p = OUTLINE;
        }
    }
    let side = (f64::from(tiling.grid.size0) / downsample).round().max(1.0) as u32;
    for [x, y] in &tiling.grid.patches {
        let (px, py) = ((*x as f64 / downsample) as i32, (*y as f64 / downsample) as i32);
        draw_hollow_rect_mut(&mut out, Rect::at(px, py).of_size(side, side), PATCH);
    }
    Ok(out)
}

fn in_mask(mask: &GrayImage, x: i64, y: i64) -> bool {
    x >= 0
        && y >= 0
        && x < i64::from(mask.width())
        && y < i64::from(mask.height())
        && mask.get_pixel(x as u32, y as u32).0[0] > 0
}
