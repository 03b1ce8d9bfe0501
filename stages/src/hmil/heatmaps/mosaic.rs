//! The top-tiles mosaic of one slide: for each class, the patches that score highest and lowest
//! on the map, cut from the slide, each with its percentile and value.

use std::collections::HashMap;

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use wsi::Slide;

use super::maps::{MapKind, Placement, SlideMaps};
use crate::error::{Error, Result};
use crate::hmil::infer::ranked;

/// Side of a tile in the mosaic, in pixels.
pub const TILE: u32 = 112;
/// Heights of a tile's caption and of the header row; width of the class labels; gaps.
const CAPTION: u32 = 14;
const HEADER: u32 = 22;
const LABEL: u32 = 160;
const GAP: u32 = 4;
const SEPARATOR: u32 = 20;

/// The instances a class's row shows: its `k` highest values, highest first, then its `k` lowest,
/// lowest last (fewer when the slide has fewer than 2k patches, never one twice).
pub fn chosen(values: &[f64], k: usize) -> (Vec<usize>, Vec<usize>) {
    let order: Vec<usize> = ranked(values.iter().copied(), usize::MAX).into_iter().map(|(i, _)| i).collect();
    let top = k.min(order.len());
    let bottom = k.min(order.len() - top);
    (order[..top].to_vec(), order[order.len() - bottom..].to_vec())
}

/// The mosaic of `maps` ranked by `kind`, `k` tiles at each end per class, cut from `slide` where
/// `placement` puts the patches (level-0 pixels). Each patch is read once, at the finest level
/// a tile needs.
pub fn mosaic(slide: &Slide, placement: &Placement, maps: &SlideMaps, kind: MapKind, k: usize) -> Result<RgbImage> {
    let rows: Vec<(Vec<usize>, Vec<usize>)> = maps.classes.iter().map(|c| chosen(c.values(kind), k)).collect();
    let level = slide.level_for_downsample(placement.size / f64::from(TILE));
    let downsample = slide.levels()[level].downsample;
    let side = (placement.size / downsample).round().max(1.0) as u32;
    let mut tiles: HashMap<usize, RgbImage> = HashMap::new();
    for &i in rows.iter().flat_map(|(top, bottom)| top.iter().chain(bottom)) {
        if let std::collections::hash_map::Entry::Vacant(e) = tiles.entry(i) {
            let (x, y) = placement.corners[i];
            let patch = slide.read_rgb(x as i64, y as i64, level, side, side)?;
            e.insert(crate::pixels::resize(&patch, TILE, TILE));
        }
    }
    let cell = TILE + GAP;
    let width = LABEL + 2 * k as u32 * cell + SEPARATOR;
    let height = HEADER + rows.len() as u32 * (TILE + CAPTION + GAP) + GAP;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let x_of = |column: usize, bottom: bool| {
        LABEL + column as u32 * cell + if bottom { k as u32 * cell + SEPARATOR } else { 0 }
    };
    let y_of = |row: usize| HEADER + row as u32 * (TILE + CAPTION + GAP);
    // Each row's tiles and their left edges; the bottom block is right-aligned, so that its last
    // tile is the lowest scoring.
    let cells: Vec<Vec<(u32, usize)>> = rows
        .iter()
        .map(|(top, bottom)| {
            let top = top.iter().enumerate().map(|(c, &i)| (x_of(c, false), i));
            top.chain(bottom.iter().enumerate().map(|(c, &i)| (x_of(k - bottom.len() + c, true), i))).collect()
        })
        .collect();
    for (r, row) in cells.iter().enumerate() {
        for &(x, i) in row {
            image::imageops::replace(&mut canvas, &tiles[&i], i64::from(x), i64::from(y_of(r)));
        }
    }
    let err = |e: &dyn std::fmt::Display| Error::Features(format!("drawing the top tiles of {}: {e}", maps.slide_id));
    crate::report::register_font();
    let root = BitMapBackend::with_buffer(canvas.as_mut(), (width, height)).into_drawing_area();
    let font = |px: u32| ("sans-serif", px).into_font().color(&BLACK);
    let text =
        |s: &str, px: u32, x: u32, y: u32| root.draw_text(s, &font(px), (x as i32, y as i32)).map_err(|e| err(&e));
    text(&format!("{}: highest {}", maps.slide_id, kind.name()), 14, LABEL, 4)?;
    text(&format!("lowest {}", kind.name()), 14, x_of(0, true), 4)?;
    for (r, (class, row)) in maps.classes.iter().zip(&cells).enumerate() {
        text(&format!("{}: {} {:.2}", class.level, class.class, class.prob), 13, 6, y_of(r) + TILE / 2 - 14)?;
        text(&class.marks(), 12, 6, y_of(r) + TILE / 2 + 2)?;
        let (values, percentiles) = (class.values(kind), class.percentiles(kind));
        for &(x, i) in row {
            let value = match kind {
                MapKind::Evidence => format!("{:+.1e}", values[i]),
                MapKind::Attention => format!("{:.1e}", values[i]),
            };
            text(&format!("{:.0}% {value}", percentiles[i] * 100.0), 10, x, y_of(r) + TILE + 1)?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    drop(root);
    Ok(canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_shows_the_highest_then_the_lowest_never_one_twice() {
        let values = [0.5, 0.9, 0.1, 0.7, 0.3];
        assert_eq!(chosen(&values, 2), (vec![1, 3], vec![4, 2]));
        assert_eq!(chosen(&values, 3), (vec![1, 3, 0], vec![4, 2]), "five patches: three and two");
        assert_eq!(chosen(&values[..1], 4), (vec![0], vec![]));
        assert_eq!(chosen(&values, 0), (vec![], vec![]));
    }
}
