//! Slides through OpenSlide: pyramids this crate writes, a tifffile pyramid, real Aperio files,
//! and files OpenSlide refuses. Skipped, with a message, where libopenslide cannot be loaded.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use wsi::{GridSpec, Slide, TissueParams, tile};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

macro_rules! needs_openslide {
    () => {
        if !wsi::openslide::available() {
            eprintln!("skipped: libopenslide is not available here (run `. scripts/env.sh`)");
            return;
        }
    };
}

/// Level 0 of the drawn slide: white, with a rectangle and an ellipse of textured tissue.
fn tissue_at(x: f64, y: f64) -> bool {
    let rectangle = (1024.0..5120.0).contains(&x) && (1024.0..4096.0).contains(&y);
    let ellipse = ((x - 6400.0) / 1000.0).powi(2) + ((y - 4400.0) / 800.0).powi(2) <= 1.0;
    rectangle || ellipse
}

fn drawn_slide(dir: &Path) -> PathBuf {
    let image = RgbImage::from_fn(8192, 6144, |x, y| {
        if tissue_at(f64::from(x) + 0.5, f64::from(y) + 0.5) {
            let t = ((x / 8 + y / 8) % 3 * 15) as u8;
            Rgb([200 + t / 2, 100 + t, 160 + t])
        } else {
            Rgb([248, 248, 246])
        }
    });
    let path = dir.join("drawn.tif");
    wsi::tiff::write_pyramid(&path, &image, Some(0.5), 256, 4).unwrap();
    path
}

#[test]
fn a_written_pyramid_reads_back_with_its_resolution() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let slide = Slide::open(&drawn_slide(dir.path())).unwrap();
    let levels = slide.levels();
    assert_eq!(levels.len(), 4);
    assert_eq!((levels[0].width, levels[0].height, levels[3].width), (8192, 6144, 1024));
    assert_eq!(levels[3].downsample, 8.0);
    assert!((slide.mpp().unwrap() - 0.5).abs() < 1e-3, "{:?}", slide.mpp());
    let corner = slide.read_rgb(0, 0, 0, 4, 4).unwrap();
    assert_eq!(corner.get_pixel(0, 0), &Rgb([248, 248, 246]));
    let inside = slide.read_rgb(2000, 2000, 1, 4, 4).unwrap();
    assert!(inside.get_pixel(0, 0).0[1] < 160, "tissue is pink: {:?}", inside.get_pixel(0, 0));
}

#[test]
fn the_patch_grid_covers_the_drawn_tissue_and_no_background() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let slide = Slide::open(&drawn_slide(dir.path())).unwrap();
    let spec = GridSpec { mpp: 1.0, patch_size: 128, mpp_fallback: None };
    let tissue = TissueParams { min_area: 4.0, ..TissueParams::default() };
    let tiling = tile(&slide, &spec, &tissue).unwrap();
    assert_eq!((tiling.grid.level, tiling.grid.size0, tiling.grid.read_size), (1, 256, 128));
    // Intersection over union of the patches' union and the drawn tissue, on an 8-pixel raster.
    let size = f64::from(tiling.grid.size0);
    let covered: std::collections::HashSet<[i64; 2]> = tiling.grid.patches.iter().copied().collect();
    let (mut both, mut either) = (0u64, 0u64);
    for y in (0..6144).step_by(8) {
        for x in (0..8192).step_by(8) {
            let (cx, cy) = (f64::from(x) + 4.0, f64::from(y) + 4.0);
            let patch = [(cx / size).floor() as i64 * 256, (cy / size).floor() as i64 * 256];
            let (truth, grid) = (tissue_at(cx, cy), covered.contains(&patch));
            both += u64::from(truth && grid);
            either += u64::from(truth || grid);
        }
    }
    let iou = both as f64 / either as f64;
    assert!(iou >= 0.95, "IoU {iou:.3}");
    for &[x, y] in &tiling.grid.patches {
        let corners = [(x, y), (x + 255, y), (x, y + 255), (x + 255, y + 255), (x + 128, y + 128)];
        assert!(
            corners.iter().any(|&(cx, cy)| tissue_at(cx as f64, cy as f64)),
            "patch at ({x}, {y}) lies on background"
        );
    }
    let picture = wsi::qc::picture(&slide, &tiling).unwrap();
    assert_eq!((picture.width(), picture.height()), (1024, 768), "8192 wide: 8 level-0 pixels per pixel");
}

#[test]
fn a_tifffile_pyramid_is_segmented_where_its_tissue_is() {
    needs_openslide!();
    let slide = Slide::open(&fixture("tifffile_slide.tif")).unwrap();
    assert_eq!(slide.levels().len(), 3);
    let spec = GridSpec { mpp: 1.0, patch_size: 128, mpp_fallback: None };
    let tiling = tile(&slide, &spec, &TissueParams { min_area: 1.0, ..TissueParams::default() }).unwrap();
    // 1 µm patches of 128 px: 256 level-0 px, read as 128 from level 1; the 1024-px square holds 16.
    assert_eq!((tiling.grid.level, tiling.grid.size0, tiling.grid.read_size), (1, 256, 128));
    let mut patches = tiling.grid.patches.clone();
    patches.sort();
    let expected: Vec<[i64; 2]> = (0..4).flat_map(|i| (0..4).map(move |j| [512 + 256 * i, 256 + 256 * j])).collect();
    assert_eq!(patches, expected);
}

#[test]
fn a_real_aperio_slide_is_read_and_tiled() {
    needs_openslide!();
    let slide = Slide::open(&fixture("default.svs")).unwrap();
    assert_eq!((slide.levels()[0].width, slide.levels()[0].height), (2220, 2967));
    assert!((slide.mpp().unwrap() - 0.499).abs() < 1e-6);
    assert_eq!(slide.property("openslide.vendor").as_deref(), Some("aperio"));
    let spec = GridSpec { mpp: 0.5, patch_size: 256, mpp_fallback: None };
    let tiling = tile(&slide, &spec, &TissueParams { min_area: 1.0, ..TissueParams::default() }).unwrap();
    let all = (2220 / 255) * (2967 / 255);
    let kept = tiling.grid.patches.len();
    assert!(kept > 0 && kept <= all, "{kept} of {all} patches on tissue");
}

#[test]
fn files_openslide_refuses_are_errors_naming_them() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.svs");
    std::fs::write(&text, "not a slide").unwrap();
    let truncated = dir.path().join("truncated.tif");
    let whole = std::fs::read(drawn_slide(dir.path())).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    for path in [text, fixture("unopenable.tiff"), dir.path().join("missing.svs")] {
        let err = Slide::open(&path).err().unwrap_or_else(|| panic!("{} opened", path.display())).to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
    }
    // A file cut short opens (its directories are at its end, or it fails then) or fails to read.
    let read = Slide::open(&truncated).and_then(|s| {
        let l = s.levels()[0];
        s.read_rgb(0, 0, 0, l.width as u32, l.height as u32)
    });
    assert!(read.unwrap_err().to_string().contains("truncated.tif"));
    let unreadable = Slide::open(&fixture("unreadable.svs")).unwrap();
    let err = unreadable.read_rgb(0, 0, 0, 16, 16).unwrap_err().to_string();
    assert!(err.contains("unreadable.svs"), "{err}");
}

#[test]
fn a_slide_without_resolution_needs_a_fallback() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.tif");
    let image = RgbImage::from_fn(1024, 1024, |x, _| if x < 512 { Rgb([200, 100, 160]) } else { Rgb([250, 250, 250]) });
    wsi::tiff::write_pyramid(&path, &image, None, 256, 2).unwrap();
    let slide = Slide::open(&path).unwrap();
    assert_eq!(slide.mpp(), None);
    let spec = GridSpec { mpp: 0.5, patch_size: 128, mpp_fallback: None };
    let tissue = TissueParams { min_area: 0.5, ..TissueParams::default() };
    let err = tile(&slide, &spec, &tissue).err().expect("no mpp").to_string();
    assert!(err.contains("bare.tif") && err.contains("mpp_fallback"), "{err}");
    let with_fallback = GridSpec { mpp_fallback: Some(0.25), ..spec };
    let tiling = tile(&slide, &with_fallback, &tissue).unwrap();
    assert_eq!((tiling.mpp, tiling.grid.size0), (0.25, 256));
}

#[test]
fn a_pyramid_written_strip_by_strip_reads_back_level_by_level() {
    needs_openslide!();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strips.tif");
    // Odd sizes, so that the last strip, the last tile column and each halving are partial.
    let (w, h) = (1000u32, 741u32);
    let colour = |x: u32, y: u32| Rgb([(x % 251) as u8, (y % 241) as u8, ((x / 7 + y / 5) % 256) as u8]);
    let mut writer = wsi::tiff::PyramidWriter::create(&path, (w, h), Some(0.25), 128, 3).unwrap();
    let tile = writer.tile();
    for top in (0..h).step_by(tile as usize) {
        let rows = tile.min(h - top);
        writer.push(&RgbImage::from_fn(w, rows, |x, y| colour(x, top + y))).unwrap();
    }
    writer.finish().unwrap();
    let slide = Slide::open(&path).unwrap();
    let dims: Vec<(u64, u64)> = slide.levels().iter().map(|l| (l.width, l.height)).collect();
    assert_eq!(dims, [(1000, 741), (500, 370), (250, 185)]);
    assert!((slide.mpp().unwrap() - 0.25).abs() < 1e-3);
    let level0 = slide.read_rgb(0, 0, 0, w, h).unwrap();
    assert!(level0.enumerate_pixels().all(|(x, y, p)| *p == colour(x, y)), "level 0 is the image");
    // Level 1: the rounded mean of each 2 × 2 block of level 0.
    let level1 = slide.read_rgb(0, 0, 1, 500, 370).unwrap();
    for (x, y) in [(0, 0), (499, 369), (250, 63), (37, 64)] {
        let block = [(0, 0), (1, 0), (0, 1), (1, 1)].map(|(dx, dy)| colour(2 * x + dx, 2 * y + dy));
        let mean = [0, 1, 2].map(|c| ((block.iter().map(|p| u16::from(p.0[c])).sum::<u16>() + 2) / 4) as u8);
        assert_eq!(level1.get_pixel(x, y).0, mean, "({x}, {y})");
    }
}

#[test]
fn a_pyramid_refuses_strips_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.tif");
    let mut writer = wsi::tiff::PyramidWriter::create(&path, (64, 64), None, 32, 2).unwrap();
    let err = writer.push(&RgbImage::new(63, 32)).unwrap_err().to_string();
    assert!(err.contains("bad.tif") && err.contains("63 × 32"), "{err}");
    writer.push(&RgbImage::new(64, 32)).unwrap();
    let err = writer.finish().unwrap_err().to_string();
    assert!(err.contains("32 of the image's 64 rows"), "{err}");
}
