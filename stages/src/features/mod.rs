//! Readers of per-slide feature files: PyTorch `.pt` (torch.save), HDF5 (CLAM, TRIDENT, STAMP),
//! `.safetensors` and `.npy`. Each reader works on the file's bytes, so a file is read once.

pub mod h5;
mod npy;
mod pickle;
mod pt;
mod safetensors;

use std::borrow::Cow;
use std::path::Path;

use half::{bf16, f16};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// Lower-case name as in PyTorch (`float32`, `float16`, …).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "float64",
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::I16 => "int16",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::Bool => "bool",
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

/// File formats the readers understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pt,
    H5,
    Safetensors,
    Npy,
}

impl Format {
    /// The format a file name's extension announces, if any.
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "pt" | "pth" => Some(Format::Pt),
            "h5" | "hdf5" => Some(Format::H5),
            "safetensors" => Some(Format::Safetensors),
            "npy" => Some(Format::Npy),
            _ => None,
        }
    }

    /// Short name, as in `features.parquet`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Pt => "pt",
            Format::H5 => "h5",
            Format::Safetensors => "safetensors",
            Format::Npy => "npy",
        }
    }
}

/// A typed, row-major 2-D array: a view into a file's bytes, or assembled from them (HDF5 chunks).
#[derive(Debug, Clone)]
pub struct Array2<'a> {
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    /// Exactly `rows * cols * dtype.size()` little-endian bytes.
    pub bytes: Cow<'a, [u8]>,
}

impl Array2<'_> {
    /// Converts every element to `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        let b = &self.bytes;
        let at = |i: usize, w: usize| &b[i * w..(i + 1) * w];
        (0..n)
            .map(|i| match self.dtype {
                Dtype::F32 => f32::from_le_bytes(at(i, 4).try_into().expect("4 bytes")),
                Dtype::F64 => f64::from_le_bytes(at(i, 8).try_into().expect("8 bytes")) as f32,
                Dtype::F16 => f16::from_le_bytes(at(i, 2).try_into().expect("2 bytes")).to_f32(),
                Dtype::BF16 => bf16::from_le_bytes(at(i, 2).try_into().expect("2 bytes")).to_f32(),
                Dtype::I64 => i64::from_le_bytes(at(i, 8).try_into().expect("8 bytes")) as f32,
                Dtype::I32 => i32::from_le_bytes(at(i, 4).try_into().expect("4 bytes")) as f32,
                Dtype::I16 => i16::from_le_bytes(at(i, 2).try_into().expect("2 bytes")) as f32,
                Dtype::I8 => at(i, 1)[0] as i8 as f32,
                Dtype::U8 | Dtype::Bool => at(i, 1)[0] as f32,
            })
            .collect()
    }

    /// Converts every element to `f64` (for coordinates).
    pub fn to_f64(&self) -> Vec<f64> {
        match self.dtype {
            Dtype::I64 => {
                self.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64).collect()
            }
            Dtype::F64 => {
                self.bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
            }
            _ => self.to_f32().into_iter().map(f64::from).collect(),
        }
    }
}

/// What a feature file's coordinates measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CoordUnit {
    /// The file does not say (no coordinates, or a format without a convention).
    #[default]
    Unknown,
    /// Level-0 pixels (CLAM, TRIDENT).
    Pixels,
    /// Micrometres (STAMP).
    Microns,
}

impl CoordUnit {
    /// As `packed.parquet` writes it: `px`, `um`, or empty.
    pub fn name(self) -> &'static str {
        match self {
            CoordUnit::Unknown => "",
            CoordUnit::Pixels => "px",
            CoordUnit::Microns => "um",
        }
    }

    /// The unit [`CoordUnit::name`] writes as `name` (unknown for anything else).
    pub fn named(name: &str) -> CoordUnit {
        [CoordUnit::Pixels, CoordUnit::Microns].into_iter().find(|u| u.name() == name).unwrap_or_default()
    }
}

/// Where a file's patches are: the unit of its coordinates and, when the file says, the side of
/// a patch in that unit, so that heatmaps land where the patches were.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Geometry {
    pub unit: CoordUnit,
    pub patch_size: Option<f64>,
}

/// The arrays of one feature file: features (N × D) and optional coordinates (N × 2), and what
/// the coordinates measure.
#[derive(Debug, Clone)]
pub struct FeatureArrays<'a> {
    pub features: Array2<'a>,
    pub coords: Option<Array2<'a>>,
    pub geometry: Geometry,
}

/// Finds the features (and coordinates) in a file's bytes, checking shapes and types.
pub fn parse(format: Format, bytes: &[u8]) -> Result<FeatureArrays<'_>, String> {
    let arrays = match format {
        Format::Pt => pt::parse(bytes)?,
        Format::H5 => h5::parse(bytes)?,
        Format::Safetensors => safetensors::parse(bytes)?,
        Format::Npy => FeatureArrays { features: npy::parse(bytes)?, coords: None, geometry: Geometry::default() },
    };
    let f = &arrays.features;
    if !f.dtype.is_float() {
        return Err(format!("features have dtype {}, expected a floating-point type", f.dtype.name()));
    }
    if f.rows == 0 {
        return Err("features have no instances (0 rows)".into());
    }
    if let Some(c) = arrays.coords.as_ref().filter(|c| c.cols != 2 || c.rows != f.rows) {
        return Err(format!("coords have shape ({}, {}), expected ({}, 2)", c.rows, c.cols, f.rows));
    }
    Ok(arrays)
}

/// Builds an [`Array2`] over `bytes` from a shape, checking that the sizes agree.
pub(crate) fn array2<'a>(
    dtype: Dtype,
    shape: &[usize],
    bytes: impl Into<Cow<'a, [u8]>>,
    what: &str,
) -> Result<Array2<'a>, String> {
    let bytes = bytes.into();
    let (rows, cols) = match *shape {
        [r, c] => (r, c),
        [r] if what == "features" => {
            return Err(format!("features are 1-D ({r}), expected (instances, dim)"));
        }
        _ => {
            return Err(format!("{what} have shape {shape:?}, expected 2 dimensions"));
        }
    };
    let need = rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size())).ok_or("shape overflows")?;
    if bytes.len() < need {
        return Err(format!(
            "{what} need {need} bytes for shape ({rows}, {cols}) but the file holds {}: truncated?",
            bytes.len()
        ));
    }
    let bytes = match bytes {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..need]),
        Cow::Owned(mut v) => {
            v.truncate(need);
            Cow::Owned(v)
        }
    };
    Ok(Array2 { dtype, rows, cols, bytes })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/features").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn expected(n: usize, d: usize) -> Vec<f32> {
        (0..n * d).map(|i| i as f32 / 8.0).collect()
    }

    /// Values as f32, stored dtype, coords as f64.
    type Read = (Vec<f32>, Dtype, Option<Vec<f64>>);

    fn read(name: &str) -> Result<Read, String> {
        let bytes = fixture(name);
        let format = Format::of(Path::new(name)).unwrap();
        let a = parse(format, &bytes)?;
        Ok((a.features.to_f32(), a.features.dtype, a.coords.map(|c| c.to_f64())))
    }

    const COORDS: [f64; 10] = [0.0, 0.0, 0.0, 256.0, 256.0, 0.0, 256.0, 256.0, 512.0, 0.0];

    #[test]
    fn reads_torch_save_tensors_of_each_float_dtype() {
        for (name, dtype) in [("f32.pt", Dtype::F32), ("f16.pt", Dtype::F16), ("bf16.pt", Dtype::BF16)] {
            let (values, got, coords) = read(name).unwrap();
            assert_eq!(values, expected(5, 4), "{name}");
            assert_eq!(got, dtype);
            assert!(coords.is_none());
        }
    }

    #[test]
    fn reads_torch_save_dict_with_coords_and_storage_offsets() {
        let (values, _, coords) = read("dict.pt").unwrap();
        assert_eq!(values, expected(5, 4));
        assert_eq!(coords.unwrap(), COORDS);
        let (values, _, _) = read("offset.pt").unwrap();
        assert_eq!(values, (20..40).map(|i| i as f32 / 8.0).collect::<Vec<_>>());
    }

    #[test]
    fn reads_clam_and_stamp_h5() {
        let (values, dtype, coords) = read("clam.h5").unwrap();
        assert_eq!((values, dtype), (expected(5, 4), Dtype::F32));
        assert_eq!(coords.unwrap(), COORDS);
        let (values, dtype, coords) = read("stamp.h5").unwrap();
        assert_eq!((values, dtype), (expected(5, 4), Dtype::F16));
        assert_eq!(coords.unwrap(), COORDS.map(|c| c * 0.5));
        assert!(parse(Format::H5, &fixture("f32.pt")).unwrap_err().contains("HDF5"));
    }

    #[test]
    fn reads_safetensors_and_npy() {
        let (values, _, coords) = read("st.safetensors").unwrap();
        assert_eq!(values, expected(5, 4));
        assert_eq!(coords.unwrap(), COORDS);
        assert_eq!(read("f32.npy").unwrap().0, expected(5, 4));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        for (name, needle) in [
            ("truncated.pt", "not a torch.save zip archive"),
            ("transposed.pt", "not contiguous"),
            ("no_features.pt", "no `features` tensor"),
            ("one_d.pt", "1-D"),
        ] {
            let err = read(name).unwrap_err();
            assert!(err.contains(needle), "{name}: {err}");
        }
        assert!(parse(Format::Pt, b"").is_err());
        assert!(parse(Format::Safetensors, &fixture("f32.pt")).unwrap_err().contains("safetensors"));
    }
}
