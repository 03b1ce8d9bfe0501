//! HDF5 feature files: CLAM / TRIDENT (`features` N × D, `coords` N × 2 int64 pixels) and STAMP
//! (`feats` float16, `coords` float µm). Chunked and deflate-compressed datasets are assembled.

use hdf5_pure::{DType, Datatype, DatatypeByteOrder, File};

use super::{Array2, CoordUnit, Dtype, FeatureArrays, Geometry, array2};

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
    let geometry = match &coords {
        None => Geometry::default(),
        // STAMP names its features `feats` and gives coordinates in micrometres.
        Some(_) if !has("features") => Geometry { unit: CoordUnit::Microns, patch_size: None },
        Some(_) => {
            let attrs = file.dataset("coords").and_then(|d| d.attrs()).unwrap_or_default();
            Geometry { unit: CoordUnit::Pixels, patch_size: patch_size_level0(&attrs) }
        }
    };
    Ok(FeatureArrays { features, coords, geometry })
}

/// The patch side in level-0 pixels from the attributes of CLAM's or TRIDENT's `coords`:
/// `patch_size_level0`, or `patch_size` at `patch_level` scaled by `downsample` (level 0 when
/// no level is given).
fn patch_size_level0(attrs: &std::collections::HashMap<String, hdf5_pure::AttrValue>) -> Option<f64> {
    use hdf5_pure::AttrValue as A;
    let number = |name: &str| -> Option<f64> {
        match attrs.get(name)? {
            A::I64(v) => Some(*v as f64),
            A::I32(v) => Some(f64::from(*v)),
            A::U64(v) => Some(*v as f64),
            A::U32(v) => Some(f64::from(*v)),
            A::F64(v) => Some(*v),
            A::F32(v) => Some(f64::from(*v)),
            A::F64Array(v) => v.first().copied(),
            A::F32Array(v) => v.first().map(|x| f64::from(*x)),
            A::I64Array(v) => v.first().map(|x| *x as f64),
            _ => None,
        }
    };
    if let Some(size) = number("patch_size_level0") {
        return Some(size);
    }
    let size = number("patch_size")?;
    match number("patch_level") {
        None | Some(0.0) => Some(size),
        Some(_) => number("downsample").map(|d| size * d),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/features").join(name))
            .unwrap()
    }

    #[test]
    fn the_coordinates_unit_and_patch_size_are_read() {
        // h5py, no attributes: CLAM's pixels, patch size unknown.
        assert_eq!(
            parse(&fixture("clam.h5")).unwrap().geometry,
            Geometry { unit: CoordUnit::Pixels, patch_size: None }
        );
        // STAMP's `feats` with micrometre coordinates.
        assert_eq!(parse(&fixture("stamp.h5")).unwrap().geometry.unit, CoordUnit::Microns);
        // Written by extraction: the attributes CLAM and TRIDENT read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.h5");
        let attrs = PatchAttrs { patch_size: 256, patch_level: 1, patch_size_level0: 512 };
        write(&path, &[0.5; 6], (3, 2), &[0, 0, 512, 0, 0, 512], Some(attrs)).unwrap();
        let arrays = parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(arrays.geometry, Geometry { unit: CoordUnit::Pixels, patch_size: Some(512.0) });
    }

    #[test]
    fn clam_patch_sizes_at_a_level_are_scaled_to_level_0() {
        use hdf5_pure::AttrValue as A;
        let attrs = |pairs: Vec<(&str, A)>| pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let at_level_1 = attrs(vec![
            ("patch_size", A::I64(256)),
            ("patch_level", A::I64(1)),
            ("downsample", A::F64Array(vec![4.0, 4.0])),
        ]);
        assert_eq!(patch_size_level0(&at_level_1), Some(1024.0));
        assert_eq!(
            patch_size_level0(&attrs(vec![("patch_size", A::I64(256)), ("patch_level", A::I64(0))])),
            Some(256.0)
        );
        assert_eq!(
            patch_size_level0(&attrs(vec![("patch_size", A::I64(256)), ("patch_level", A::I64(2))])),
            None,
            "no downsample: unknown"
        );
    }
}
