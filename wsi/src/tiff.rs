//! Writing pyramidal tiled TIFF files that OpenSlide reads as `generic-tiff` slides: RGB,
//! deflate-compressed tiles, one directory per level (each half the size of the one before), and
//! the resolution in pixels per centimetre, from which OpenSlide derives `openslide.mpp-x`.
//! Images are written strip by strip ([`PyramidWriter`]), so their size is not bounded by memory.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use image::RgbImage;

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
    let mut writer = PyramidWriter::create(path, (image.width(), image.height()), mpp, tile, levels)?;
    let tile = writer.tile();
    for top in (0..image.height()).step_by(tile as usize) {
        let rows = tile.min(image.height() - top);
        writer.push(&image::imageops::crop_imm(image, 0, top, image.width(), rows).to_image())?;
    }
    writer.finish()
}

/// A pyramidal TIFF written strip by strip, so that an image larger than memory can be written:
/// level 0 arrives in strips of `tile` rows, top to bottom, and each coarser level (half the
/// size of the one before, by 2 × 2 means) is made and written as its strips fill. Memory holds
/// one strip per level.
pub struct PyramidWriter {
    path: std::path::PathBuf,
    out: BufWriter<std::fs::File>,
    tile: u32,
    mpp: Option<f64>,
    levels: Vec<LevelWriter>,
}

/// One level being written: its size, the rows not yet written as tiles, and the tiles written.
struct LevelWriter {
    width: u32,
    height: u32,
    /// Rows received and not yet written (fewer than `tile`, or the last ones).
    pending: Vec<u8>,
    /// Rows received so far.
    received: u32,
    /// Offsets and byte counts of the tiles written, row-major.
    offsets: Vec<u32>,
    counts: Vec<u32>,
}

impl PyramidWriter {
    /// Starts `path` for an image of `size` (width, height) at level 0, with `levels` levels at
    /// most (none smaller than one pixel).
    pub fn create(path: &Path, size: (u32, u32), mpp: Option<f64>, tile: u32, levels: usize) -> Result<PyramidWriter> {
        let io = |source: std::io::Error| Error::Io { path: path.to_path_buf(), source };
        let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
        // The header's first-directory offset is filled in by `finish`.
        out.write_all(b"II*\0\0\0\0\0").map_err(io)?;
        let mut dims = vec![size];
        while dims.len() < levels.max(1) {
            let (w, h) = dims[dims.len() - 1];
            if w < 2 || h < 2 {
                break;
            }
            dims.push((w / 2, h / 2));
        }
        let levels = dims
            .into_iter()
            .map(|(width, height)| LevelWriter {
                width,
                height,
                pending: Vec::new(),
                received: 0,
                offsets: Vec::new(),
                counts: Vec::new(),
            })
            .collect();
        Ok(PyramidWriter { path: path.to_path_buf(), out, tile: tile.max(16) & !1, mpp, levels })
    }

    /// The tile side used (even, at least 16).
    pub fn tile(&self) -> u32 {
        self.tile
    }

    /// Adds the next rows of level 0: the image's full width, `tile` rows (fewer for the last).
    pub fn push(&mut self, strip: &RgbImage) -> Result<()> {
        let io = |path: &Path, source: std::io::Error| Error::Io { path: path.to_path_buf(), source };
        let level0 = &self.levels[0];
        if strip.width() != level0.width || level0.received + strip.height() > level0.height {
            return Err(io(
                &self.path,
                std::io::Error::other(format!(
                    "a strip of {} × {} does not fit the {} × {} image at row {}",
                    strip.width(),
                    strip.height(),
                    level0.width,
                    level0.height,
                    level0.received
                )),
            ));
        }
        self.add(0, strip.as_raw().clone(), strip.height()).map_err(|e| io(&self.path, e))
    }

    /// Adds `rows` rows of pixels to level `index`, writing every full strip of tiles and
    /// passing its half-size rows on to the next level.
    fn add(&mut self, index: usize, pixels: Vec<u8>, rows: u32) -> std::io::Result<()> {
        let tile = self.tile;
        let level = &mut self.levels[index];
        level.pending.extend_from_slice(&pixels);
        level.received += rows;
        let row_bytes = level.width as usize * 3;
        loop {
            let level = &mut self.levels[index];
            let held = (level.pending.len() / row_bytes) as u32;
            let last = level.received == level.height;
            if held == 0 || (held < tile && !last) {
                return Ok(());
            }
            let take = held.min(tile);
            let strip: Vec<u8> = level.pending.drain(..take as usize * row_bytes).collect();
            let width = level.width;
            let (offsets, counts) = write_tiles(&mut self.out, &strip, width, take, tile)?;
            let level = &mut self.levels[index];
            level.offsets.extend(offsets);
            level.counts.extend(counts);
            if index + 1 < self.levels.len() {
                let (half, half_rows) = halve(&strip, width, take);
                self.add(index + 1, half, half_rows)?;
            }
        }
    }

    /// Writes every level's directory and closes the file.
    pub fn finish(mut self) -> Result<()> {
        let io = |source: std::io::Error| Error::Io { path: self.path.clone(), source };
        if let Some(level) = self.levels.iter().find(|l| l.received != l.height) {
            return Err(io(std::io::Error::other(format!(
                "{} of the image's {} rows were given",
                level.received, level.height
            ))));
        }
        let mut pointer = 4u64;
        for (index, level) in self.levels.iter().enumerate() {
            let mpp = self.mpp.map(|m| m * f64::from(self.levels[0].width) / f64::from(level.width));
            let (ifd, next) = write_directory(&mut self.out, level, mpp, self.tile, index > 0).map_err(io)?;
            let here = self.out.stream_position().map_err(io)?;
            self.out.seek(SeekFrom::Start(pointer)).map_err(io)?;
            self.out.write_all(&offset32(ifd).map_err(io)?.to_le_bytes()).map_err(io)?;
            self.out.seek(SeekFrom::Start(here)).map_err(io)?;
            pointer = next;
        }
        self.out.flush().map_err(io)
    }
}

/// The 2 × 2 means of `rows` rows of `width` RGB pixels: (pixels, rows), each half, rounded down.
fn halve(pixels: &[u8], width: u32, rows: u32) -> (Vec<u8>, u32) {
    let (w, h) = ((width / 2) as usize, rows / 2);
    let src = width as usize * 3;
    let mut out = vec![0u8; w * h as usize * 3];
    for y in 0..h as usize {
        let (top, bottom) = (&pixels[2 * y * src..], &pixels[(2 * y + 1) * src..]);
        for x in 0..w {
            for c in 0..3 {
                let at = 6 * x + c;
                let sum =
                    u16::from(top[at]) + u16::from(top[at + 3]) + u16::from(bottom[at]) + u16::from(bottom[at + 3]);
                out[(y * w + x) * 3 + c] = ((sum + 2) / 4) as u8;
            }
        }
    }
    (out, h)
}

fn offset32(at: u64) -> std::io::Result<u32> {
    u32::try_from(at).map_err(|_| std::io::Error::other("the file would exceed the 4 GB of a classic TIFF"))
}

/// Writes the tiles of one strip (`rows` rows of `width` RGB pixels, at most `tile`), padded
/// with white; returns their offsets and byte counts.
fn write_tiles<W: Write + Seek>(
    out: &mut W,
    strip: &[u8],
    width: u32,
    rows: u32,
    tile: u32,
) -> std::io::Result<(Vec<u32>, Vec<u32>)> {
    let (mut offsets, mut counts) = (Vec::new(), Vec::new());
    let mut raw = vec![0u8; (tile * tile * 3) as usize];
    for tx in 0..width.div_ceil(tile) {
        raw.fill(255);
        let across = tile.min(width - tx * tile) as usize;
        for row in 0..rows {
            let start = ((row * width + tx * tile) * 3) as usize;
            let dst = (row * tile * 3) as usize;
            raw[dst..dst + across * 3].copy_from_slice(&strip[start..start + across * 3]);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw)?;
        let bytes = z.finish()?;
        offsets.push(offset32(out.stream_position()?)?);
        counts.push(bytes.len() as u32);
        out.write_all(&bytes)?;
    }
    Ok((offsets, counts))
}

/// Writes one level's directory (its tiles are written); returns the directory's offset and
/// that of its next-directory pointer.
fn write_directory<W: Write + Seek>(
    out: &mut W,
    level: &LevelWriter,
    mpp: Option<f64>,
    tile: u32,
    reduced: bool,
) -> std::io::Result<(u64, u64)> {
    let (offsets, counts) = (&level.offsets, &level.counts);
    let mut tags = vec![
        longs(254, &[u32::from(reduced)]),
        longs(256, &[level.width]),
        longs(257, &[level.height]),
        shorts(258, &[8, 8, 8]),
        shorts(259, &[8]),
        shorts(262, &[2]),
        shorts(277, &[3]),
        shorts(284, &[1]),
        longs(322, &[tile]),
        longs(323, &[tile]),
        longs(324, offsets),
        longs(325, counts),
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
