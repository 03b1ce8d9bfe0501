//! Bags for training and evaluation: the packed feature store loaded once per process and
//! device (shared by every fold), labels, and fold membership.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::model::Batch;
use crate::error::{Error, Result};
use crate::splits::Part;
use crate::table;

/// Stores already on a device, by (features.bin path, device).
static RESIDENT: Mutex<Vec<((PathBuf, Device), Tensor)>> = Mutex::new(Vec::new());

/// One labelled bag.
#[derive(Debug, Clone)]
pub struct Bag {
    pub slide_id: String,
    pub case_id: String,
    pub fine: i64,
    pub coarse: i64,
    /// First row in the store and number of instances.
    pub start: i64,
    pub len: i64,
}

/// Every instance of every slide, resident on one device.
pub struct Store {
    /// Instances × D, float32 or float16 as packed.
    x: Tensor,
    pub dim: i64,
    rows: HashMap<String, (i64, i64)>,
    coords_path: PathBuf,
}

impl Store {
    /// Loads `features.bin` (once per process and device) and the row offsets.
    pub fn load(features_bin: &Path, packed: &Path, coords_bin: &Path, device: Device) -> Result<Store> {
        let index = table::read(packed)?;
        let slides = table::strings(&index, "slide_id");
        let offsets = table::i64s(&index, "row_offset");
        let counts = table::i64s(&index, "n_instances");
        let dims = table::i64s(&index, "dim");
        let dtype = table::strings(&index, "dtype");
        let dim = *dims.first().ok_or_else(|| Error::Features("the packed store holds no slide".into()))?;
        let kind = if dtype.first().map(String::as_str) == Some("float16") { Kind::Half } else { Kind::Float };
        let total: i64 = counts.iter().sum();
        let key = (features_bin.to_path_buf(), device);
        let mut resident = RESIDENT.lock().expect("feature cache poisoned");
        let x = match resident.iter().find(|(k, _)| *k == key) {
            Some((_, x)) => x.shallow_clone(),
            None => {
                let bytes = std::fs::read(features_bin).map_err(|e| Error::io(features_bin, e))?;
                let expected = total * dim * if kind == Kind::Half { 2 } else { 4 };
                if bytes.len() as i64 != expected {
                    return Err(Error::BadFile {
                        path: features_bin.into(),
                        message: format!("holds {} bytes, the index says {expected}", bytes.len()),
                    });
                }
                let x = Tensor::from_data_size(&bytes, &[total, dim], kind).to(device);
                resident.push((key, x.shallow_clone()));
                x
            }
        };
        let rows = slides.into_iter().zip(offsets.into_iter().zip(counts)).collect();
        Ok(Store { x, dim, rows, coords_path: coords_bin.to_path_buf() })
    }

    /// (first row, instances) of a slide.
    pub fn rows(&self, slide: &str) -> Option<(i64, i64)> {
        self.rows.get(slide).copied()
    }

    /// The device the features live on.
    pub fn device(&self) -> Device {
        self.x.device()
    }

    /// The concatenated instances of `bags` (as float32) with their segment ids.
    pub fn batch(&self, bags: &[&Bag]) -> Batch {
        let device = self.x.device();
        let rows: Vec<i64> = bags.iter().flat_map(|b| b.start..b.start + b.len).collect();
        let x = self.x.index_select(0, &Tensor::from_slice(&rows).to(device)).to_kind(Kind::Float);
        Batch::new(x, bags.iter().map(|b| b.len).collect())
    }

    /// Coordinates (x, y) of a bag's instances (NaN where the file had none).
    pub fn coords(&self, bag: &Bag) -> Result<Vec<(f64, f64)>> {
        use std::io::{Read, Seek, SeekFrom};
        let path = &self.coords_path;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        f.seek(SeekFrom::Start(bag.start as u64 * 16)).map_err(|e| Error::io(path, e))?;
        let mut buf = vec![0u8; bag.len as usize * 16];
        f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        Ok(buf
            .chunks_exact(16)
            .map(|c| {
                (
                    f64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    f64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                )
            })
            .collect())
    }
}

/// The bags of one fold, by split.
pub struct FoldBags {
    pub train: Vec<Bag>,
    pub val: Vec<Bag>,
    pub test: Vec<Bag>,
}

/// Reads labels and splits and returns fold `fold`'s bags (each split sorted by slide id).
pub fn fold_bags(labels: &Path, splits: &Path, fold: usize, store: &Store) -> Result<FoldBags> {
    let l = table::read(labels)?;
    let label_of: HashMap<String, (String, i64, i64)> = table::strings(&l, "slide_id")
        .into_iter()
        .zip(table::strings(&l, "case_id"))
        .zip(table::i32s(&l, "fine_idx").into_iter().zip(table::i32s(&l, "coarse_idx")))
        .map(|((s, c), (f, k))| (s, (c, f as i64, k as i64)))
        .collect();
    let mut out = FoldBags { train: Vec::new(), val: Vec::new(), test: Vec::new() };
    for a in crate::splits::read(splits)?.into_iter().filter(|a| a.fold == fold) {
        let slide = a.slide_id;
        let (case_id, fine, coarse) = label_of
            .get(&slide)
            .cloned()
            .ok_or_else(|| Error::Splits(format!("{}: slide {slide} of fold {fold} has no label", splits.display())))?;
        let (start, len) = store.rows(&slide).ok_or_else(|| {
            Error::Splits(format!("{}: slide {slide} of fold {fold} has no packed features", splits.display()))
        })?;
        let bag = Bag { slide_id: slide, case_id, fine, coarse, start, len };
        match a.part {
            Part::Train => out.train.push(bag),
            Part::Val => out.val.push(bag),
            Part::Test => out.test.push(bag),
        }
    }
    if out.train.is_empty() {
        return Err(Error::Splits(format!("fold {fold} has no training slides")));
    }
    Ok(out)
}
