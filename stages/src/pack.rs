//! `pack_features`: every slide's instances in one contiguous little-endian file
//! (`features.bin`, f32 or f16), coordinates in `coords.bin` (f64 pairs, NaN where unknown), and
//! per-slide row offsets in `packed.parquet`, so training never parses feature files again.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{BooleanArray, Int64Array};
use half::f16;
use pipeline::{Context, Input, Stage, StageError};
use schemas::workflow::PackDtype;

use crate::error::{Error, Result};
use crate::features::{self, Format};
use crate::table;

/// The `pack_features` stage.
pub struct PackFeatures {
    /// The features directory (read again for the bytes; its listing is part of the key).
    pub dir: PathBuf,
    pub dtype: PackDtype,
    /// Node id of `index_features`.
    pub index_node: String,
}

impl Stage for PackFeatures {
    fn kind(&self) -> &str {
        "pack_features"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "dtype": self.dtype })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::external("features_dir", &self.dir), Input::artifact("index", &self.index_node, "features.parquet")]
    }
    fn outputs(&self) -> Vec<String> {
        vec!["features.bin".into(), "coords.bin".into(), "packed.parquet".into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.pack(ctx)?)
    }
}

impl PackFeatures {
    fn pack(&self, ctx: &Context) -> Result<()> {
        let index = table::read(ctx.input("index"))?;
        let slides = table::strings(&index, "slide_id");
        let paths = table::strings(&index, "path");
        let formats = table::strings(&index, "format");
        let feat_path = ctx.output("features.bin");
        let coord_path = ctx.output("coords.bin");
        let mut feats =
            BufWriter::with_capacity(1 << 22, File::create(&feat_path).map_err(|e| Error::io(&feat_path, e))?);
        let mut coords =
            BufWriter::with_capacity(1 << 20, File::create(&coord_path).map_err(|e| Error::io(&coord_path, e))?);
        let (mut offsets, mut counts, mut dims, mut has_coords) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut row = 0i64;
        let bar = ctx.progress(slides.len() as u64, "packing features");
        for (path, format) in paths.iter().zip(&formats) {
            let path = PathBuf::from(path);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let format = Format::of(&path).filter(|f| f.name() == format).ok_or_else(|| Error::BadFile {
                path: path.clone(),
                message: format!("indexed as {format}, which its name no longer says"),
            })?;
            let arrays =
                features::parse(format, &bytes).map_err(|message| Error::BadFile { path: path.clone(), message })?;
            let values = arrays.features.to_f32();
            let write_err = |e| Error::io(&feat_path, e);
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
            let xy = arrays.coords.map(|c| c.to_f64()).unwrap_or_else(|| vec![f64::NAN; arrays.features.rows * 2]);
            for v in xy {
                coords.write_all(&v.to_le_bytes()).map_err(|e| Error::io(&coord_path, e))?;
            }
            offsets.push(row);
            counts.push(arrays.features.rows as i64);
            dims.push(arrays.features.cols as i64);
            has_coords.push(Some(with_coords));
            row += arrays.features.rows as i64;
            bar.inc(1);
        }
        bar.finish_and_clear();
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
        let dtype = match self.dtype {
            PackDtype::F32 => "float32",
            PackDtype::F16 => "float16",
        };
        table::write(
            &ctx.output("packed.parquet"),
            schemas::tables::packed(),
            vec![
                table::string_col(&slides),
                Arc::new(Int64Array::from(offsets)),
                Arc::new(Int64Array::from(counts)),
                Arc::new(Int64Array::from(dims)),
                table::string_col(std::iter::repeat_n(dtype, slides.len())),
                Arc::new(has_coords.into_iter().collect::<BooleanArray>()),
            ],
        )
    }
}
