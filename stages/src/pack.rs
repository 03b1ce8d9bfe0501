//! `pack_features`: every slide's instances in one contiguous little-endian file
//! (`features.bin`, f32 or f16), coordinates in `coords.bin` (f64 pairs, NaN where unknown), and
//! per-slide row offsets in `packed.parquet`, so training never parses feature files again.
//! A repack copies the rows of every slide whose file is unchanged (same digest) from the node's
//! previous pack and parses only the new and changed files; the result is byte for byte what a
//! pack from scratch writes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, Float64Array, Int64Array};
use arrow::datatypes::Float64Type;
use half::f16;
use pipeline::{Context, Input, NodeRef, Output, Stage, StageError};
use schemas::artifacts::{COORDS_BIN, FEATURE_INDEX, FEATURES_BIN, PACKED};
use schemas::workflow::PackDtype;

use crate::error::{Error, Result};
use crate::features::{self, CoordUnit, Format, Geometry};
use crate::table;

/// The `pack_features` stage.
pub struct PackFeatures {
    /// The features directory (read again for the bytes; its listing is part of the key).
    pub features: crate::index::FeatureDir,
    pub dtype: PackDtype,
    /// The `index_features` node.
    pub index: NodeRef,
}

impl Stage for PackFeatures {
    fn kind(&self) -> &str {
        "pack_features"
    }
    /// 2: each slide's file digest in `packed.parquet`; unchanged slides copied from the last pack.
    /// 3: each slide's coordinate unit and patch size.
    fn code_version(&self) -> &str {
        "3"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "dtype": self.dtype })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![self.features.input("features_dir"), Input::artifact("index", &self.index, &FEATURE_INDEX)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&FEATURES_BIN).into(), (&COORDS_BIN).into(), (&PACKED).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.pack(ctx)?)
    }
}

/// A slide as an earlier pack wrote it.
struct Packed {
    digest: String,
    offset: i64,
    count: i64,
    dim: i64,
    has_coords: bool,
    geometry: Geometry,
}

/// The outputs of this node's previous pack, whose unchanged slides are copied, not parsed.
struct Previous {
    slides: HashMap<String, Packed>,
    features: File,
    coords: File,
}

impl Previous {
    /// The previous pack, if it exists, has digests (code version 2 on) and the same dtype.
    fn open(ctx: &Context, dtype: &str) -> Option<Previous> {
        let (features, coords, packed) = (
            ctx.previous_output(FEATURES_BIN.file)?,
            ctx.previous_output(COORDS_BIN.file)?,
            ctx.previous_output(PACKED.file)?,
        );
        let t = table::read(&packed).ok()?;
        t.column_by_name("digest")?;
        if table::strings(&t, "dtype").iter().any(|d| d != dtype) {
            return None;
        }
        let coords_col = t.column_by_name("has_coords")?.as_boolean().clone();
        let geometries = geometries(&t)?;
        let slides = table::strings(&t, "slide_id")
            .into_iter()
            .zip(table::strings(&t, "digest"))
            .zip(table::i64s(&t, "row_offset").into_iter().zip(table::i64s(&t, "n_instances")))
            .zip(table::i64s(&t, "dim").into_iter().zip(geometries))
            .enumerate()
            .map(|(i, (((slide, digest), (offset, count)), (dim, geometry)))| {
                (slide, Packed { digest, offset, count, dim, has_coords: coords_col.value(i), geometry })
            })
            .collect();
        Some(Previous { slides, features: File::open(features).ok()?, coords: File::open(coords).ok()? })
    }
}

/// Each slide's [`Geometry`] as `packed.parquet` (`t`) records it; none when the table lacks
/// its columns (a pack from before they were kept).
pub(crate) fn geometries(t: &arrow::array::RecordBatch) -> Option<Vec<Geometry>> {
    let sizes = t.column_by_name("patch_size")?.as_primitive::<Float64Type>();
    let units = t.column_by_name("coord_unit")?.as_string::<i32>();
    Some(
        units
            .iter()
            .zip(sizes.iter())
            .map(|(unit, patch_size)| Geometry { unit: CoordUnit::named(unit.unwrap_or_default()), patch_size })
            .collect(),
    )
}

/// Copies `len` bytes at `at` of `from` to the end of `to` (in the kernel where it can).
fn copy_range(from: &File, at: u64, len: u64, to: &mut BufWriter<File>) -> std::io::Result<()> {
    let mut from = from;
    from.seek(SeekFrom::Start(at))?;
    let copied = std::io::copy(&mut from.take(len), to)?;
    if copied != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the previous pack is shorter than its index",
        ));
    }
    Ok(())
}

/// How a pack made its slides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PackStats {
    /// Slides whose feature files were read and parsed.
    pub parsed: usize,
    /// Slides copied from the previous pack because their files did not change.
    pub reused: usize,
}

impl PackFeatures {
    fn dtype(&self) -> (&'static str, u64) {
        match self.dtype {
            PackDtype::F32 => ("float32", 4),
            PackDtype::F16 => ("float16", 2),
        }
    }

    fn pack(&self, ctx: &Context) -> Result<()> {
        let index = table::read(ctx.input("index"))?;
        let slides = table::strings(&index, "slide_id");
        let paths = table::strings(&index, "path");
        let formats = table::strings(&index, "format");
        let digests = table::strings(&index, "digest");
        let (dtype, width) = self.dtype();
        let previous = Previous::open(ctx, dtype);
        let feat_path = ctx.output(FEATURES_BIN.file);
        let coord_path = ctx.output(COORDS_BIN.file);
        let mut feats =
            BufWriter::with_capacity(1 << 22, File::create(&feat_path).map_err(|e| Error::io(&feat_path, e))?);
        let mut coords =
            BufWriter::with_capacity(1 << 20, File::create(&coord_path).map_err(|e| Error::io(&coord_path, e))?);
        let (mut offsets, mut counts, mut dims, mut has_coords) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut geometries = Vec::new();
        let mut stats = PackStats::default();
        let mut row = 0i64;
        let bar = ctx.progress(slides.len() as u64, "packing features");
        for (((slide, path), format), digest) in slides.iter().zip(&paths).zip(&formats).zip(&digests) {
            let unchanged =
                previous.as_ref().and_then(|p| Some((p, p.slides.get(slide).filter(|s| s.digest == *digest)?)));
            let (count, dim, with_coords, geometry) = match unchanged {
                Some((p, s)) => {
                    let (d, n) = (s.dim as u64, s.count as u64);
                    let from = |e| Error::io(&feat_path, e);
                    copy_range(&p.features, s.offset as u64 * d * width, n * d * width, &mut feats).map_err(from)?;
                    let from = |e| Error::io(&coord_path, e);
                    copy_range(&p.coords, s.offset as u64 * 16, n * 16, &mut coords).map_err(from)?;
                    stats.reused += 1;
                    (s.count, s.dim, s.has_coords, s.geometry)
                }
                None => {
                    stats.parsed += 1;
                    self.parse_into(Path::new(path), format, &mut feats, &feat_path, &mut coords, &coord_path)?
                }
            };
            offsets.push(row);
            counts.push(count);
            dims.push(dim);
            has_coords.push(Some(with_coords));
            geometries.push(geometry);
            row += count;
            bar.inc(1);
        }
        bar.finish_and_clear();
        tracing::info!(node = %ctx.node_id(), "packed {} slide(s): {} parsed, {} copied unchanged from the previous pack", slides.len(), stats.parsed, stats.reused);
        feats
            .into_inner()
            .map_err(|e| Error::io(&feat_path, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&feat_path, e))?;
        coords
            .into_inner()
            .map_err(|e| Error::io(&coord_path, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&coord_path, e))?;
        table::write_output(
            ctx,
            &PACKED,
            vec![
                table::string_col(&slides),
                Arc::new(Int64Array::from(offsets)),
                Arc::new(Int64Array::from(counts)),
                Arc::new(Int64Array::from(dims)),
                table::string_col(std::iter::repeat_n(dtype, slides.len())),
                Arc::new(has_coords.into_iter().collect::<BooleanArray>()),
                table::string_col(&digests),
                table::string_col(geometries.iter().map(|g| g.unit.name())),
                Arc::new(geometries.iter().map(|g| g.patch_size).collect::<Float64Array>()),
            ],
        )
    }

    /// Parses one feature file and appends its rows and coordinates: (rows, dim, has coords,
    /// what the coordinates measure).
    fn parse_into(
        &self,
        path: &Path,
        format: &str,
        feats: &mut BufWriter<File>,
        feat_path: &Path,
        coords: &mut BufWriter<File>,
        coord_path: &Path,
    ) -> Result<(i64, i64, bool, Geometry)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let format = Format::of(path).filter(|f| f.name() == format).ok_or_else(|| Error::BadFile {
            path: path.into(),
            message: format!("indexed as {format}, which its name no longer says"),
        })?;
        let arrays =
            features::parse(format, &bytes).map_err(|message| Error::BadFile { path: path.into(), message })?;
        let values = arrays.features.to_f32();
        let write_err = |e| Error::io(feat_path, e);
        match self.dtype {
            PackDtype::F32 => {
                for v in &values {
                    feats.write_all(&v.to_le_bytes()).map_err(write_err)?;
                }
            }
            PackDtype::F16 => {
                for v in &values {
                    feats.write_all(&f16::from_f32(*v).to_le_bytes()).map_err(write_err)?;
                }
            }
        }
        let with_coords = arrays.coords.is_some();
        let geometry = arrays.geometry;
        let xy = arrays.coords.map(|c| c.to_f64()).unwrap_or_else(|| vec![f64::NAN; arrays.features.rows * 2]);
        for v in xy {
            coords.write_all(&v.to_le_bytes()).map_err(|e| Error::io(coord_path, e))?;
        }
        Ok((arrays.features.rows as i64, arrays.features.cols as i64, with_coords, geometry))
    }
}
