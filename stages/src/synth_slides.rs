//! Synthetic whole-slide images: pyramidal tiled TIFFs that OpenSlide reads (0.5 µm per pixel,
//! recorded as the TIFF resolution), with blobs of tissue on a white background whose colour
//! carries the coarse class and whose texture the fine class; plus `labels.csv`.

use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::synth::SynthSummary;

/// Fine class, coarse class.
pub const SLIDE_CLASSES: [(&str, &str); 4] =
    [("normal", "benign"), ("hyperplasia", "benign"), ("in_situ", "malignant"), ("invasive", "malignant")];

/// Microns per level-0 pixel of the synthetic slides.
pub const SLIDE_MPP: f64 = 0.5;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SlideOptions {
    pub per_class: usize,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
}

impl Default for SlideOptions {
    fn default() -> Self {
        SlideOptions { per_class: 6, width: 3072, height: 2048, seed: 0 }
    }
}

/// Writes `out/slides/<slide>.tif` and `out/labels.csv` (case_id, slide_id, label: one slide per
/// case).
pub fn generate_slides(out: &Path, opts: &SlideOptions, progress: &dyn Fn(usize, usize)) -> Result<SynthSummary> {
    let dir = out.join("slides");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let csv_path = out.join("labels.csv");
    let mut csv = String::from("case_id,slide_id,label\n");
    let total = opts.per_class * SLIDE_CLASSES.len();
    let mut rng = Rng::new(opts.seed, 7);
    let mut instances = 0;
    for i in 0..total {
        let class = i % SLIDE_CLASSES.len();
        let slide = format!("slide_{:03}", i + 1);
        let image = draw(class, opts.width, opts.height, &mut rng);
        instances += image.pixels().filter(|p| p.0 != BACKGROUND.0).count() / (256 * 256);
        wsi::tiff::write_pyramid(&dir.join(format!("{slide}.tif")), &image, Some(SLIDE_MPP), 256, 4)
            .map_err(|e| Error::Features(e.to_string()))?;
        csv.push_str(&format!("case_{:03},{slide},{}\n", i + 1, SLIDE_CLASSES[class].0));
        progress(i + 1, total);
    }
    let mut file = std::fs::File::create(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    file.write_all(csv.as_bytes()).map_err(|e| Error::io(&csv_path, e))?;
    Ok(SynthSummary { slides: total, cases: total, instances })
}

/// The white of the glass around the tissue.
pub const BACKGROUND: Rgb<u8> = Rgb([247, 247, 245]);

/// A slide of `class`: two or three elliptic pieces of tissue, pink (benign) or purple
/// (malignant), smooth (the first fine class of each) or coarsely grained (the second).
pub fn draw(class: usize, width: u32, height: u32, rng: &mut Rng) -> RgbImage {
    let malignant = SLIDE_CLASSES[class].1 == "malignant";
    let grained = class % 2 == 1;
    let base: [f64; 3] = if malignant { [165.0, 95.0, 185.0] } else { [225.0, 140.0, 185.0] };
    let (w, h) = (f64::from(width), f64::from(height));
    let pieces: Vec<[f64; 4]> = (0..2 + (rng.uniform() * 2.0) as usize)
        .map(|_| {
            let (rx, ry) = (w * (0.10 + 0.08 * rng.uniform()), h * (0.14 + 0.1 * rng.uniform()));
            [rx + (w - 2.0 * rx) * rng.uniform(), ry + (h - 2.0 * ry) * rng.uniform(), rx, ry]
        })
        .collect();
    let seed = rng.next_u64();
    RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (f64::from(x), f64::from(y));
        let inside = pieces.iter().any(|[cx, cy, rx, ry]| ((fx - cx) / rx).powi(2) + ((fy - cy) / ry).powi(2) <= 1.0);
        if !inside {
            return BACKGROUND;
        }
        // Grain: a value per 6 × 6 cell, strong for grained classes, faint otherwise.
        let cell = (u64::from(x / 6) * 0x9E37_79B9) ^ (u64::from(y / 6) * 0x85EB_CA6B) ^ seed;
        let noise = (cell.wrapping_mul(0xC2B2_AE35).rotate_left(17) % 1000) as f64 / 1000.0 - 0.5;
        let amplitude = if grained { 70.0 } else { 12.0 };
        Rgb(base.map(|c| (c + amplitude * noise).clamp(0.0, 255.0) as u8))
    })
}
