//! Writing pyramidal tiled TIFF files that OpenSlide reads as `generic-tiff` slides: RGB,
//! deflate-compressed tiles, one directory per level (each half the size of the one before), and
//! the resolution in pixels per centimetre, from which OpenSlide derives `openslide.mpp-x`.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use image::RgbImage;
use image::imageops::{FilterType, resize};

use crate::error::{Error, Result};

/// A tag of an image file directory whose values are written out of line (or inline when they
/// fit in four bytes).
struct Tag {
    id: u16,
    kind: u16,
    count: u32,
    bytes: Vec<u8>,
}

const SHORT: u16 = 3;
const LONG: u16 = 4;
const RATIONAL: u16 = 5;

fn shorts(id: u16, values: &[u16]) -> Tag {
    Tag { id, kind: SHORT, count: values.len() as u32, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

fn longs(id: u16, values: &[u32]) -> Tag {
    Tag { id, kind: LONG, count: values.len() as u32, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
}

fn rational(id: u16, value: f64) -> Tag {
    let denominator = 1000u32;
    let numerator = (value * f64::from(denominator)).round() as u32;
    Tag { id, kind: RATIONAL, count: 1, bytes: [numerator.to_le_bytes(), denominator.to_le_bytes()].concat() }
}

/// Writes `image` as a pyramid of `levels` levels in `tile`-pixel tiles, with `mpp` microns per
/// level-0 pixel (none: no resolution tags, as some scanners' exports lack them).
pub fn write_pyramid(path: &Path, image: &RgbImage, mpp: Option<f64>, tile: u32, levels: usize) -> Result<()> {
    let io = |source: std::io::Error| Error::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = BufWriter::new(file);
    out.write_all(b"II*\0\0\0\0\0").map_err(io)?;
    let mut next_pointer = 4u64;
    let mut level = image.clone();
    for index in 0..levels.max(1) {
        if index > 0 {
            let (w, h) = ((level.width() / 2).max(1), (level.height() / 2).max(1));
            level = resize(&level, w, h, FilterType::Triangle);
        }
        let (ifd, pointer) =
            write_level(&mut out, &level, mpp.map(|m| m * f64::from(1u32 << index)), tile, index > 0).map_err(io)?;
        let here = out.stream_position().map_err(io)?;
        out.seek(SeekFrom::Start(next_pointer)).map_err(io)?;
        out.write_all(&offset32(ifd).map_err(io)?.to_le_bytes()).map_err(io)?;
        out.seek(SeekFrom::Start(here)).map_err(io)?;
        next_pointer = pointer;
    }
    out.flush().map_err(io)
}

fn offset32(at: u64) -> std::io::Result<u32> {
    u32::try_from(at).map_err(|_| std::io::Error::other("the file would exceed the 4 GB of a classic TIFF"))
}

/// Writes one level's tiles and directory; returns the directory's offset and that of its
/// next-directory pointer.
fn write_level<W: Write + Seek>(
    out: &mut W,
    image: &RgbImage,
    mpp: Option<f64>,
    tile: u32,
    reduced: bool,
) -> std::io::Result<(u64, u64)> {
    let (across, down) = (image.width().div_ceil(tile), image.height().div_ceil(tile));
    let (mut offsets, mut counts) = (Vec::new(), Vec::new());
    let mut raw = vec![0u8; (tile * tile * 3) as usize];
    for ty in 0..down {
        for tx in 0..across {
            raw.fill(255);
            for row in 0..tile.min(image.height() - ty * tile) {
                let width = tile.min(image.width() - tx * tile) as usize;
                let start = (((ty * tile + row) * image.width() + tx * tile) * 3) as usize;
                let dst = (row * tile * 3) as usize;
                raw[dst..dst + width * 3].copy_from_slice(&image.as_raw()[start..start + width * 3]);
            }
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(&raw)?;
            let bytes = z.finish()?;
            offsets.push(offset32(out.stream_position()?)?);
            counts.push(bytes.len() as u32);
            out.write_all(&bytes)?;
        }
    }
    let mut tags = vec![
        longs(254, &[u32::from(reduced)]),
        longs(256, &[image.width()]),
        longs(257, &[image.height()]),
        shorts(258, &[8, 8, 8]),
        shorts(259, &[8]),
        shorts(262, &[2]),
        shorts(277, &[3]),
        shorts(284, &[1]),
        longs(322, &[tile]),
        longs(323, &[tile]),
        longs(324, &offsets),
        longs(325, &counts),
    ];
    if let Some(mpp) = mpp {
        let per_cm = 10_000.0 / mpp;
        tags.extend([rational(282, per_cm), rational(283, per_cm), shorts(296, &[3])]);
    }
    // Directory entries go in ascending tag order.
    tags.sort_by_key(|t| t.id);
    // Out-of-line values first, then the directory that points at them.
    let mut inline = Vec::new();
    for tag in &tags {
        if tag.bytes.len() > 4 {
            let at = offset32(out.stream_position()?)?;
            out.write_all(&tag.bytes)?;
            inline.push(at.to_le_bytes().to_vec());
        } else {
            let mut v = tag.bytes.clone();
            v.resize(4, 0);
            inline.push(v);
        }
    }
    if out.stream_position()? % 2 == 1 {
        out.write_all(&[0])?;
    }
    let ifd = out.stream_position()?;
    out.write_all(&(tags.len() as u16).to_le_bytes())?;
    for (tag, value) in tags.iter().zip(&inline) {
        out.write_all(&tag.id.to_le_bytes())?;
        out.write_all(&tag.kind.to_le_bytes())?;
        out.write_all(&tag.count.to_le_bytes())?;
        out.write_all(value)?;
    }
    let pointer = out.stream_position()?;
    out.write_all(&0u32.to_le_bytes())?;
    Ok((ifd, pointer))
}
