//! Tissue segmentation in the manner of CLAM's `segmentTissue`, on a low-resolution image of the
//! slide: HSV saturation, median blur, a fixed or Otsu threshold, a morphological close, then
//! contours with their holes, kept by area. Areas are in units of a 512 × 512 level-0 patch, as
//! CLAM counts them.

use image::{GrayImage, Luma, RgbImage};
use imageproc::contours::{BorderType, Contour, find_contours};
use imageproc::distance_transform::Norm;
use imageproc::point::Point;

/// CLAM's reference patch side, in level-0 pixels, that areas are counted in.
const REFERENCE_PATCH: f64 = 512.0;

/// How saturation is thresholded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Tissue where the (median-blurred) saturation is above this value (0–255).
    Fixed(u8),
    /// Otsu's threshold of the blurred saturation.
    Otsu,
}

/// The segmentation's knobs, with CLAM's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TissueParams {
    pub threshold: Threshold,
    /// Side of the median filter (odd; 0 or 1: none).
    pub median: u32,
    /// Side of the square closing element (0: none).
    pub close: u32,
    /// Least tissue area (holes taken out) of a kept region, in reference patches.
    pub min_area: f64,
    /// Least area of a kept hole, in reference patches.
    pub min_hole_area: f64,
    /// The most holes kept per region, largest first.
    pub max_holes: usize,
}

impl Default for TissueParams {
    fn default() -> Self {
        TissueParams {
            threshold: Threshold::Fixed(8),
            median: 7,
            close: 4,
            min_area: 100.0,
            min_hole_area: 16.0,
            max_holes: 8,
        }
    }
}

/// HSV saturation as OpenCV computes it for 8-bit images: (max − min) / max × 255.
pub fn saturation(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let s = if max == 0 { 0 } else { (u32::from(max - min) * 255 + u32::from(max) / 2) / u32::from(max) };
        Luma([s as u8])
    })
}

/// The tissue mask (255 = tissue) of `rgb`, an image of the slide at `downsample` level-0
/// pixels per pixel.
pub fn segment(rgb: &RgbImage, downsample: f64, params: &TissueParams) -> GrayImage {
    let mut sat = saturation(rgb);
    if params.median > 1 {
        let r = params.median / 2;
        sat = imageproc::filter::median_filter(&sat, r, r);
    }
    let level = match params.threshold {
        Threshold::Fixed(t) => t,
        Threshold::Otsu => imageproc::contrast::otsu_level(&sat),
    };
    let mut mask = imageproc::contrast::threshold(&sat, level, imageproc::contrast::ThresholdType::Binary);
    if params.close > 1 {
        mask = imageproc::morphology::close(&mask, Norm::LInf, (params.close / 2) as u8);
    }
    let unit = REFERENCE_PATCH * REFERENCE_PATCH / (downsample * downsample);
    fill_kept(&mask, params.min_area * unit, params.min_hole_area * unit, params.max_holes)
}

/// Area enclosed by a contour (shoelace formula).
fn area(points: &[Point<i32>]) -> f64 {
    let n = points.len();
    let twice: i64 = (0..n)
        .map(|i| {
            let (a, b) = (points[i], points[(i + 1) % n]);
            i64::from(a.x) * i64::from(b.y) - i64::from(b.x) * i64::from(a.y)
        })
        .sum();
    twice.abs() as f64 / 2.0
}

/// A mask of the regions of `mask` whose area without holes is above `min_area`, with their
/// largest `max_holes` holes above `min_hole` cut out.
fn fill_kept(mask: &GrayImage, min_area: f64, min_hole: f64, max_holes: usize) -> GrayImage {
    let contours: Vec<Contour<i32>> = find_contours(mask);
    let depth = |mut i: usize| {
        let mut d = 0;
        while let Some(p) = contours[i].parent {
            d += 1;
            i = p;
        }
        d
    };
    let mut outers: Vec<usize> =
        (0..contours.len()).filter(|&i| contours[i].border_type == BorderType::Outer).collect();
    outers.sort_by_key(|&i| depth(i));
    let mut out = GrayImage::new(mask.width(), mask.height());
    for outer in outers {
        let mut holes: Vec<(usize, f64)> = (0..contours.len())
            .filter(|&h| contours[h].parent == Some(outer) && contours[h].border_type == BorderType::Hole)
            .map(|h| (h, area(&contours[h].points)))
            .collect();
        let tissue = area(&contours[outer].points) - holes.iter().map(|(_, a)| a).sum::<f64>();
        if tissue <= min_area || tissue <= 0.0 {
            continue;
        }
        fill(&mut out, &contours[outer].points, 255);
        holes.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (h, a) in holes.into_iter().take(max_holes) {
            if a > min_hole {
                fill(&mut out, &contours[h].points, 0);
            }
        }
    }
    out
}

fn fill(image: &mut GrayImage, points: &[Point<i32>], value: u8) {
    let mut poly = points.to_vec();
    while poly.len() > 1 && poly.first() == poly.last() {
        poly.pop();
    }
    if poly.len() >= 3 {
        imageproc::drawing::draw_polygon_mut(image, &poly, Luma([value]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// White with a pink rectangle, and a white hole in it.
    fn drawn() -> RgbImage {
        RgbImage::from_fn(200, 160, |x, y| {
            let inside = (40..160).contains(&x) && (30..130).contains(&y);
            let hole = (80..110).contains(&x) && (60..90).contains(&y);
            if inside && !hole { Rgb([220, 120, 180]) } else { Rgb([250, 250, 248]) }
        })
    }

    fn params() -> TissueParams {
        TissueParams { min_area: 0.5, min_hole_area: 0.05, ..TissueParams::default() }
    }

    #[test]
    fn finds_the_tissue_and_its_hole() {
        // 16 level-0 pixels per pixel: one reference patch is 32 × 32 pixels here.
        let mask = segment(&drawn(), 16.0, &params());
        let at = |x, y| mask.get_pixel(x, y).0[0];
        assert_eq!((at(100, 40), at(50, 120)), (255, 255), "tissue");
        assert_eq!((at(10, 10), at(180, 150)), (0, 0), "background");
        assert_eq!(at(95, 75), 0, "the hole is cut out");
        let tissue = mask.pixels().filter(|p| p.0[0] == 255).count() as f64;
        let truth = (120.0 * 100.0) - 30.0 * 30.0;
        assert!((tissue / truth - 1.0).abs() < 0.05, "{tissue} vs {truth}");
    }

    #[test]
    fn small_regions_and_holes_are_dropped() {
        let large = TissueParams { min_area: 20.0, ..params() };
        assert!(segment(&drawn(), 16.0, &large).pixels().all(|p| p.0[0] == 0), "11 patches < 20");
        let big_holes = TissueParams { min_hole_area: 2.0, ..params() };
        assert_eq!(
            segment(&drawn(), 16.0, &big_holes).get_pixel(95, 75).0[0],
            255,
            "a hole under 2 patches stays tissue"
        );
    }

    #[test]
    fn otsu_separates_without_a_fixed_level() {
        let mask = segment(&drawn(), 16.0, &TissueParams { threshold: Threshold::Otsu, ..params() });
        assert_eq!((mask.get_pixel(100, 40).0[0], mask.get_pixel(10, 10).0[0]), (255, 0));
    }
}
