//! Synthetic whole-slide images: pyramidal tiled TIFFs that OpenSlide reads (0.5 µm per pixel,
//! recorded as the TIFF resolution), with blobs of tissue on a white background. Most of the
//! tissue looks alike in every class; one lesion, an ellipse inside the first blob, carries the
//! class: its colour the coarse class, its texture the fine class. `labels.csv` names each
//! slide's class and `lesions.csv` where its lesion is, so that a heatmap can be checked against
//! the truth.

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

/// Where a slide's class signal is: an ellipse, in level-0 pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lesion {
    pub cx: f64,
    pub cy: f64,
    pub rx: f64,
    pub ry: f64,
}

impl Lesion {
    /// Whether the level-0 point (`x`, `y`) lies in the lesion.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        ((x - self.cx) / self.rx).powi(2) + ((y - self.cy) / self.ry).powi(2) <= 1.0
    }
}

/// The header of `lesions.csv`.
pub const LESIONS_HEADER: &str = "slide_id,cx,cy,rx,ry";

/// Writes `out/slides/<slide>.tif`, `out/labels.csv` (case_id, slide_id, label: one slide per
/// case) and `out/lesions.csv` (slide_id and its lesion's centre and radii in level-0 pixels).
pub fn generate_slides(out: &Path, opts: &SlideOptions, progress: &dyn Fn(usize, usize)) -> Result<SynthSummary> {
    let dir = out.join("slides");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let csv_path = out.join("labels.csv");
    let mut csv = String::from("case_id,slide_id,label\n");
    let mut lesions = format!("{LESIONS_HEADER}\n");
    let total = opts.per_class * SLIDE_CLASSES.len();
    let mut rng = Rng::new(opts.seed, 7);
    let mut instances = 0;
    for i in 0..total {
        let class = i % SLIDE_CLASSES.len();
        let slide = format!("slide_{:03}", i + 1);
        let (image, lesion) = draw(class, opts.width, opts.height, &mut rng);
        lesions.push_str(&format!("{slide},{:.1},{:.1},{:.1},{:.1}\n", lesion.cx, lesion.cy, lesion.rx, lesion.ry));
        instances += image.pixels().filter(|p| p.0 != BACKGROUND.0).count() / (256 * 256);
        wsi::tiff::write_pyramid(&dir.join(format!("{slide}.tif")), &image, Some(SLIDE_MPP), 256, 4)
            .map_err(|e| Error::Features(e.to_string()))?;
        csv.push_str(&format!("case_{:03},{slide},{}\n", i + 1, SLIDE_CLASSES[class].0));
        progress(i + 1, total);
    }
    for (path, text) in [(csv_path, csv), (out.join("lesions.csv"), lesions)] {
        let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        file.write_all(text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    }
    Ok(SynthSummary { slides: total, cases: total, instances })
}

/// The white of the glass around the tissue.
pub const BACKGROUND: Rgb<u8> = Rgb([247, 247, 245]);

/// Every slide's lesion, from the `lesions.csv` that [`generate_slides`] wrote.
pub fn read_lesions(path: &Path) -> Result<std::collections::HashMap<String, Lesion>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad =
        |line: usize| Error::BadFile { path: path.into(), message: format!("line {line}: expected {LESIONS_HEADER}") };
    let mut out = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let v: Vec<f64> = f.iter().skip(1).filter_map(|x| x.parse().ok()).collect();
        if f.len() != 5 || v.len() != 4 {
            return Err(bad(i + 1));
        }
        out.insert(f[0].to_owned(), Lesion { cx: v[0], cy: v[1], rx: v[2], ry: v[3] });
    }
    Ok(out)
}

/// The look of tissue: a base colour and the amplitude of its grain.
#[derive(Debug, Clone, Copy)]
struct Look {
    colour: [f64; 3],
    grain: f64,
}

/// Tissue outside the lesion, alike in every class: pale pink, of a grain between the lesions'.
const STROMA: Look = Look { colour: [240.0, 190.0, 215.0], grain: 35.0 };

/// The lesion of `class`: pink (benign) or purple (malignant), smooth (the first fine class of
/// each) or coarsely grained (the second).
fn lesion_look(class: usize) -> Look {
    let malignant = SLIDE_CLASSES[class].1 == "malignant";
    Look {
        colour: if malignant { [165.0, 95.0, 185.0] } else { [215.0, 120.0, 175.0] },
        grain: if class % 2 == 1 { 70.0 } else { 10.0 },
    }
}

/// A slide of `class` and its lesion: two or three elliptic pieces of tissue that look alike in
/// every class, and in the first of them a lesion (55–70% of its radii) that carries
/// the class.
pub fn draw(class: usize, width: u32, height: u32, rng: &mut Rng) -> (RgbImage, Lesion) {
    let (w, h) = (f64::from(width), f64::from(height));
    let pieces: Vec<Lesion> = (0..2 + (rng.uniform() * 2.0) as usize)
        .map(|_| {
            let (rx, ry) = (w * (0.12 + 0.08 * rng.uniform()), h * (0.17 + 0.1 * rng.uniform()));
            Lesion { cx: rx + (w - 2.0 * rx) * rng.uniform(), cy: ry + (h - 2.0 * ry) * rng.uniform(), rx, ry }
        })
        .collect();
    let first = pieces[0];
    let (rx, ry) = (first.rx * (0.55 + 0.15 * rng.uniform()), first.ry * (0.55 + 0.15 * rng.uniform()));
    let (dx, dy) = ((first.rx - rx) * (rng.uniform() - 0.5), (first.ry - ry) * (rng.uniform() - 0.5));
    let lesion = Lesion { cx: first.cx + dx, cy: first.cy + dy, rx, ry };
    let look = lesion_look(class);
    let seed = rng.next_u64();
    let image = RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (f64::from(x), f64::from(y));
        let look = if lesion.contains(fx, fy) {
            look
        } else if pieces.iter().any(|p| p.contains(fx, fy)) {
            STROMA
        } else {
            return BACKGROUND;
        };
        // Grain: a value per 6 × 6 cell.
        let cell = (u64::from(x / 6) * 0x9E37_79B9) ^ (u64::from(y / 6) * 0x85EB_CA6B) ^ seed;
        let noise = (cell.wrapping_mul(0xC2B2_AE35).rotate_left(17) % 1000) as f64 / 1000.0 - 0.5;
        Rgb(look.colour.map(|c| (c + look.grain * noise).clamp(0.0, 255.0) as u8))
    });
    (image, lesion)
}
