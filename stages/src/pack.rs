//! `pack_features`: each slide's instances as one little-endian file (`features/<slide>.bin`, f32
//! or f16) with its coordinates (`coords/<slide>.bin`, f64 pairs, NaN where unknown), and every
//! slide's rows in `packed.parquet` (its offset in the slides' concatenation, its count and
//! what its coordinates measure), so training never parses feature files again.
//! A slide's files are an item of the workspace, keyed by its feature file's digest: a repack
//! parses only new and changed files and links the rest, writing exactly what a pack from
//! scratch writes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, Float64Array, Int64Array};
use arrow::datatypes::Float64Type;
use half::f16;
use pipeline::{Context, Input, NodeRef, Output, Pending, Stage, StageError};
use schemas::artifacts::{COORDS_DIR, FEATURE_INDEX, FEATURES_DIR, PACKED};
use schemas::workflow::PackDtype;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::{self, CoordUnit, Format, Geometry};
use crate::table;

/// The `pack_features` stage.
pub struct PackFeatures {
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
    /// 4: one file per slide, each an item.
    fn code_version(&self) -> &str {
        "4"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "dtype": self.dtype })
    }
    fn inputs(&self) -> Vec<Input> {
        // The index names every file with its digest: it is all the key needs (a file touched
        // but unchanged indexes the same, and packs nothing again).
        vec![Input::artifact("index", &self.index, &FEATURE_INDEX)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&FEATURES_DIR).into(), (&COORDS_DIR).into(), (&PACKED).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        self.pack(ctx)
    }
    /// How many indexed slides have no packed files yet with this dtype (new or changed files,
    /// or a new dtype), and which.
    fn pending(&self, p: &Pending) -> std::result::Result<Option<String>, StageError> {
        let files = indexed(p.input("index"))?;
        let new: Vec<String> = files.iter().filter(|f| !p.has_item(&f.item_facts())).map(|f| f.slide.clone()).collect();
        let (n, all) = (new.len(), files.len());
        Ok(Some(match n {
            0 => format!("all {all} slide(s) packed already with these settings; their files are linked again"),
            n => format!(
                "{n} of {all} slide(s) to pack ({} packed already with these settings): {}",
                all - n,
                pipeline::some_of(&new, ", ")
            ),
        }))
    }
}

/// A feature file as `features.parquet` lists it.
struct Indexed {
    slide: String,
    path: PathBuf,
    format: String,
    digest: String,
}

impl Indexed {
    /// What the slide's packed files depend on besides the stage's params.
    fn item_facts(&self) -> serde_json::Value {
        serde_json::json!({ "digest": self.digest, "format": self.format })
    }
}

/// The files of `features.parquet`, in its order.
fn indexed(index: &Path) -> Result<Vec<Indexed>> {
    let t = table::read(index)?;
    let (slides, paths) = (table::strings(&t, "slide_id"), table::strings(&t, "path"));
    let (formats, digests) = (table::strings(&t, "format"), table::strings(&t, "digest"));
    Ok(slides
        .into_iter()
        .zip(paths)
        .zip(formats.into_iter().zip(digests))
        .map(|((slide, path), (format, digest))| Indexed { slide, path: path.into(), format, digest })
        .collect())
}

/// What a slide's item records beside its two files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    rows: i64,
    dim: i64,
    has_coords: bool,
    coord_unit: String,
    patch_size: Option<f64>,
}

/// The files of a slide's item.
const FEATURES_FILE: &str = "features.bin";
const COORDS_FILE: &str = "coords.bin";
const META_FILE: &str = "meta.json";

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

impl PackFeatures {
    fn dtype(&self) -> &'static str {
        match self.dtype {
            PackDtype::F32 => "float32",
            PackDtype::F16 => "float16",
        }
    }

    fn pack(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let files = indexed(ctx.input("index"))?;
        let bar = ctx.progress(files.len() as u64, "packing features");
        let parsed = std::sync::atomic::AtomicUsize::new(0);
        let metas = crate::par::map(&files, |file| {
            if ctx.interrupted() {
                return Err(StageError::from("interrupted while packing"));
            }
            let item = ctx.item(&file.item_facts(), |dir| {
                parsed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(self.parse_into(&file.path, &file.format, dir)?)
            })?;
            bar.inc(1);
            let meta_path = item.dir.join(META_FILE);
            let meta = std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
            let meta = meta.ok_or_else(|| Error::BadFile {
                path: meta_path,
                message: "unreadable; remove its folder to pack the slide again".into(),
            })?;
            Ok::<_, StageError>((item.dir, meta))
        });
        bar.finish_and_clear();
        let metas = metas.into_iter().collect::<std::result::Result<Vec<_>, _>>()?;
        let parsed = parsed.into_inner();
        tracing::info!(node = %ctx.node_id(), "packed {} slide(s): {parsed} parsed, {} unchanged", files.len(), files.len() - parsed);
        let (feat_dir, coord_dir) = (ctx.output(FEATURES_DIR.file), ctx.output(COORDS_DIR.file));
        for dir in [&feat_dir, &coord_dir] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        for (file, (item, _)) in files.iter().zip(&metas) {
            let name = format!("{}.bin", file.slide);
            for (from, to) in [(FEATURES_FILE, feat_dir.join(&name)), (COORDS_FILE, coord_dir.join(&name))] {
                let source = item.join(from);
                std::fs::hard_link(&source, &to).map_err(|e| {
                    if source.exists() {
                        return Error::io(&to, e);
                    }
                    let message = format!("missing; remove {} to pack the slide again", item.display());
                    Error::BadFile { path: source.clone(), message }
                })?;
            }
        }
        let offsets = metas.iter().scan(0i64, |row, (_, m)| {
            let at = *row;
            *row += m.rows;
            Some(at)
        });
        let metas: Vec<&Meta> = metas.iter().map(|(_, m)| m).collect();
        table::write_output(
            ctx,
            &PACKED,
            vec![
                table::string_col(files.iter().map(|f| f.slide.as_str())),
                Arc::new(offsets.collect::<Int64Array>()),
                Arc::new(metas.iter().map(|m| m.rows).collect::<Int64Array>()),
                Arc::new(metas.iter().map(|m| m.dim).collect::<Int64Array>()),
                table::string_col(std::iter::repeat_n(self.dtype(), files.len())),
                Arc::new(metas.iter().map(|m| Some(m.has_coords)).collect::<BooleanArray>()),
                table::string_col(files.iter().map(|f| f.digest.as_str())),
                table::string_col(metas.iter().map(|m| m.coord_unit.as_str())),
                Arc::new(metas.iter().map(|m| m.patch_size).collect::<Float64Array>()),
            ],
        )?;
        Ok(())
    }

    /// Parses one feature file into a slide's item in `dir`: its rows, its coordinates and its
    /// [`Meta`].
    fn parse_into(&self, path: &Path, format: &str, dir: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let format = Format::of(path).filter(|f| f.name() == format).ok_or_else(|| Error::BadFile {
            path: path.into(),
            message: format!("indexed as {format}, which its name no longer says"),
        })?;
        let arrays =
            features::parse(format, &bytes).map_err(|message| Error::BadFile { path: path.into(), message })?;
        let values = arrays.features.to_f32();
        let feats = dir.join(FEATURES_FILE);
        match self.dtype {
            PackDtype::F32 => write_values(&feats, &values, f32::to_le_bytes)?,
            PackDtype::F16 => write_values(&feats, &values, |v| f16::from_f32(v).to_le_bytes())?,
        }
        let rows = arrays.features.rows;
        let xy = arrays.coords.as_ref().map(|c| c.to_f64()).unwrap_or_else(|| vec![f64::NAN; rows * 2]);
        write_values(&dir.join(COORDS_FILE), &xy, f64::to_le_bytes)?;
        let meta = Meta {
            rows: rows as i64,
            dim: arrays.features.cols as i64,
            has_coords: arrays.coords.is_some(),
            coord_unit: arrays.geometry.unit.name().into(),
            patch_size: arrays.geometry.patch_size,
        };
        let meta_path = dir.join(META_FILE);
        std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("meta serialises"))
            .map_err(|e| Error::io(&meta_path, e))
    }
}

/// Writes `values` to `path` one after another, each as `encode` gives its bytes, and syncs it.
fn write_values<T: Copy, const N: usize>(path: &Path, values: &[T], encode: impl Fn(T) -> [u8; N]) -> Result<()> {
    let err = |e| Error::io(path, e);
    let mut out = BufWriter::with_capacity(1 << 22, File::create(path).map_err(err)?);
    for v in values {
        out.write_all(&encode(*v)).map_err(err)?;
    }
    out.into_inner().map_err(|e| err(e.into_error()))?.sync_all().map_err(err)
}
