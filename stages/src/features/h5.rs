//! HDF5 feature files: CLAM / TRIDENT (`features` N × D, `coords` N × 2 int64 pixels) and STAMP
//! (`feats` float16, `coords` float µm). Chunked and deflate-compressed datasets are assembled.

use hdf5_pure::{DType, Datatype, DatatypeByteOrder, File};

use super::{Array2, Dtype, FeatureArrays, array2};

fn dtype(ds: &hdf5_pure::Dataset, name: &str) -> Result<Dtype, String> {
    let err = |e: hdf5_pure::Error| format!("dataset `{name}`: {e}");
    Ok(match ds.dtype().map_err(err)? {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::Other(t) => match *t {
            Datatype::FloatingPoint { size: 2, byte_order: DatatypeByteOrder::LittleEndian, .. } => Dtype::F16,
            other => return Err(format!("dataset `{name}` has an unsupported type {other:?}")),
        },
        other => return Err(format!("dataset `{name}` has an unsupported type {other}")),
    })
}

fn read(file: &File, name: &str, what: &str) -> Result<Array2<'static>, String> {
    let ds = file.dataset(name).map_err(|e| format!("dataset `{name}`: {e}"))?;
    let dtype = dtype(&ds, name)?;
    let shape: Vec<usize> =
        ds.shape().map_err(|e| format!("dataset `{name}`: {e}"))?.into_iter().map(|d| d as usize).collect();
    let raw = ds.read_raw().map_err(|e| format!("dataset `{name}`: {e}"))?;
    array2(dtype, &shape, raw, what)
}

/// Parses an HDF5 file's bytes.
pub fn parse(bytes: &[u8]) -> Result<FeatureArrays<'static>, String> {
    let file = File::from_bytes(bytes.to_vec()).map_err(|e| format!("not a readable HDF5 file: {e}"))?;
    let names = file.root().datasets().map_err(|e| format!("HDF5: {e}"))?;
    let has = |n: &str| names.iter().any(|d| d.trim_start_matches('/') == n);
    let features = match ["features", "feats"].into_iter().find(|n| has(n)) {
        Some(n) => read(&file, n, "features")?,
        None => return Err(format!("no `features` or `feats` dataset (found: {})", names.join(", "))),
    };
    let coords = if has("coords") { Some(read(&file, "coords", "coords")?) } else { None };
    Ok(FeatureArrays { features, coords })
}

/// Where a CLAM `.h5`'s patches were read: written as attributes of `coords`, as CLAM
/// (`patch_size`, `patch_level`) and TRIDENT (`patch_size_level0`) do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchAttrs {
    pub patch_size: i64,
    pub patch_level: i64,
    pub patch_size_level0: i64,
}

/// Writes a CLAM `.h5`: `features` (rows × cols float32) and `coords` (rows × 2 int64, level-0
/// top-left corners), with `attrs` on `coords` when given.
pub fn write(
    path: &std::path::Path,
    features: &[f32],
    (rows, cols): (usize, usize),
    coords: &[i64],
    attrs: Option<PatchAttrs>,
) -> Result<(), String> {
    let mut file = hdf5_pure::FileBuilder::new();
    file.create_dataset("features").with_f32_data(features).with_shape(&[rows as u64, cols as u64]);
    let c = file.create_dataset("coords");
    c.with_i64_data(coords).with_shape(&[rows as u64, 2]);
    if let Some(a) = attrs {
        use hdf5_pure::AttrValue::I64;
        c.set_attr("patch_size", I64(a.patch_size));
        c.set_attr("patch_level", I64(a.patch_level));
        c.set_attr("patch_size_level0", I64(a.patch_size_level0));
    }
    file.write(path).map_err(|e| e.to_string())
}
