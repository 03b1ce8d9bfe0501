//! The QC picture of a slide's tiling: its overview with the tissue outlined and the kept patches
//! drawn, to look at before trusting a run.

use image::{GrayImage, Rgb, RgbImage};
use imageproc::drawing::draw_hollow_rect_mut;
use imageproc::rect::Rect;

use crate::grid::Tiling;

const OUTLINE: Rgb<u8> = Rgb([0, 170, 60]);
const PATCH: Rgb<u8> = Rgb([40, 70, 220]);

/// The overview with background pixels faded, the tissue's border in green and each kept patch
/// as a blue square.
pub fn picture(tiling: &Tiling) -> RgbImage {
    let mask = &tiling.mask;
    let mut out = tiling.overview.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        if !on(mask, x as i64, y as i64) {
            p.0 = p.0.map(|c| 255 - (255 - c) / 3);
        } else if [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !on(mask, x as i64 + dx, y as i64 + dy)) {
            *p = OUTLINE;
        }
    }
    let side = (f64::from(tiling.grid.size0) / tiling.downsample).round().max(1.0) as u32;
    for [x, y] in &tiling.grid.patches {
        let (px, py) = ((*x as f64 / tiling.downsample) as i32, (*y as f64 / tiling.downsample) as i32);
        draw_hollow_rect_mut(&mut out, Rect::at(px, py).of_size(side, side), PATCH);
    }
    out
}

fn on(mask: &GrayImage, x: i64, y: i64) -> bool {
    x >= 0 && y >= 0 && x < i64::from(mask.width()) && y < i64::from(mask.height()) && mask.get_pixel(x as u32, y as u32).0[0] > 0
}
