//! PyTorch `torch.save` files (the zip format written since PyTorch 1.6): a tensor, or a dict
//! with `features` (and optionally `coords`). Storages are read in place from the archive.

use std::io::Cursor;

use super::pickle::{self, TensorRef, Value};
use super::{Array2, FeatureArrays, array2};

/// Parses a `.pt` file's bytes.
pub fn parse(bytes: &[u8]) -> Result<FeatureArrays<'_>, String> {
    if bytes.starts_with(b"\x80\x02\x8a\x0a") || bytes.starts_with(b"\x80\x02\x8a\n") {
        return Err("legacy (pre-1.6) torch.save format; re-save it with a current PyTorch".into());
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a torch.save zip archive: {e}"))?;
    let pkl_name = zip
        .file_names()
        .map(str::to_owned)
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or("no data.pkl in the archive: not a torch.save file")?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    if let Ok(order) = entry(&mut zip, bytes, &format!("{prefix}byteorder"))
        && order != b"little"
    {
        return Err(format!("byte order {:?} is not supported", String::from_utf8_lossy(order)));
    }
    let value = pickle::load(entry(&mut zip, bytes, &pkl_name)?)?;
    let (features, coords) = match value {
        Value::Tensor(t) => (t, None),
        Value::Dict(items) => {
            let get = |key: &str| items.iter().find(|(k, _)| *k == Value::Str(key.into())).map(|(_, v)| v.clone());
            let features = match get("features").or_else(|| get("feats")) {
                Some(Value::Tensor(t)) => t,
                Some(_) => return Err("`features` is not a tensor".into()),
                None => return Err("the dict has no `features` tensor".into()),
            };
            let coords = match get("coords") {
                Some(Value::Tensor(t)) => Some(t),
                Some(_) => return Err("`coords` is not a tensor".into()),
                None => None,
            };
            (features, coords)
        }
        _ => return Err("the file holds neither a tensor nor a dict of tensors".into()),
    };
    let features = view(&mut zip, bytes, &prefix, &features, "features")?;
    let coords = coords.map(|c| view(&mut zip, bytes, &prefix, &c, "coords")).transpose()?;
    Ok(FeatureArrays { features, coords, geometry: super::Geometry::default() })
}

/// The bytes of a stored (uncompressed) archive entry, borrowed from the file.
fn entry<'a>(zip: &mut zip::ZipArchive<Cursor<&'a [u8]>>, bytes: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    let file = zip.by_name(name).map_err(|_| format!("archive entry {name} is missing"))?;
    if file.compression() != zip::CompressionMethod::Stored {
        return Err(format!("archive entry {name} is compressed; torch.save writes it stored"));
    }
    let start = file.data_start() as usize;
    let end = start + file.size() as usize;
    bytes.get(start..end).ok_or_else(|| format!("archive entry {name} runs past the end of the file: truncated?"))
}

fn view<'a>(
    zip: &mut zip::ZipArchive<Cursor<&'a [u8]>>,
    bytes: &'a [u8],
    prefix: &str,
    t: &TensorRef,
    what: &str,
) -> Result<Array2<'a>, String> {
    let storage = entry(zip, bytes, &format!("{prefix}data/{}", t.storage))?;
    let contiguous: Vec<usize> = (0..t.shape.len()).map(|i| t.shape[i + 1..].iter().product()).collect();
    if t.shape.len() == 2 && t.shape[0] > 1 && t.stride != contiguous {
        return Err(format!("{what} tensor is not contiguous (stride {:?}); save it with .contiguous()", t.stride));
    }
    let start = t
        .offset
        .checked_mul(t.dtype.size())
        .filter(|&s| s <= storage.len())
        .ok_or_else(|| format!("{what} storage offset is out of range"))?;
    array2(t.dtype, &t.shape, &storage[start..], what)
}
