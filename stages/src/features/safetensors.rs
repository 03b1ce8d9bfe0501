//! `.safetensors`: tensors `features` (N × D) and optionally `coords` (N × 2); a file holding a
//! single tensor under another name is taken as the features.

use safetensors::{Dtype as St, SafeTensors};

use super::{Array2, Dtype, FeatureArrays, array2};

fn dtype(d: St) -> Result<Dtype, String> {
    Ok(match d {
        St::F32 => Dtype::F32,
        St::F16 => Dtype::F16,
        St::BF16 => Dtype::BF16,
        St::F64 => Dtype::F64,
        St::I64 => Dtype::I64,
        St::I32 => Dtype::I32,
        other => return Err(format!("unsupported safetensors dtype {other:?}")),
    })
}

/// Parses a `.safetensors` file's bytes.
pub fn parse(bytes: &[u8]) -> Result<FeatureArrays<'_>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let get = |name: &str, what: &str| -> Result<Array2<'_>, String> {
        let t = st.tensor(name).map_err(|e| e.to_string())?;
        // The view's data borrows `st`; re-slice `bytes` so the array outlives it.
        let (offset, len) = (t.data().as_ptr() as usize - bytes.as_ptr() as usize, t.data().len());
        array2(dtype(t.dtype())?, t.shape(), &bytes[offset..offset + len], what)
    };
    let names = st.names();
    let features = if names.iter().any(|n| *n == "features") {
        get("features", "features")?
    } else if names.len() == 1 {
        get(names[0], "features")?
    } else {
        return Err(format!(
            "no tensor named `features` (found: {})",
            names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    };
    let coords = if names.iter().any(|n| *n == "coords") { Some(get("coords", "coords")?) } else { None };
    Ok(FeatureArrays { features, coords, geometry: super::Geometry::default() })
}
