//! Bags for training and evaluation: the packed feature store loaded once per process and
//! device (shared by every fold; memory-mapped on the CPU), labels, and fold membership.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::Mmap;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::splits::Part;
use crate::table;
use models::Batch;
use schemas::workflow::StoreMode;

/// A loaded store, kept for the rest of the process so that every fold reuses it.
struct Resident {
    features_bin: PathBuf,
    device: Device,
    x: Tensor,
    /// The file's memory map, which a CPU tensor views: it lives as long as the tensor, here.
    _map: Option<Mmap>,
}

/// Stores already loaded, by (features.bin path, device).
static RESIDENT: Mutex<Vec<Resident>> = Mutex::new(Vec::new());

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

/// Every instance of every slide: on the CPU a view of `features.bin` memory-mapped read-only
/// (the page cache holds it, never a second buffer); for a GPU a copy made from that map on the
/// GPU, or the map itself, from which batches are streamed (see [`StoreMode`]).
pub struct Store {
    /// Instances × D, float32 or float16 as packed.
    x: Tensor,
    /// Where batches go (the GPU while `x` stays on the CPU: streamed).
    device: Device,
    pub dim: i64,
    rows: HashMap<String, (i64, i64)>,
    coords_path: PathBuf,
}

impl Store {
    /// Loads `features.bin` (once per process and device) and the row offsets, for batches on
    /// `device`; `mode` says whether a GPU holds the store or batches stream to it.
    pub fn load(
        features_bin: &Path,
        packed: &Path,
        coords_bin: &Path,
        device: Device,
        mode: StoreMode,
    ) -> Result<Store> {
        let index = table::read(packed)?;
        let slides = table::strings(&index, "slide_id");
        let offsets = table::i64s(&index, "row_offset");
        let counts = table::i64s(&index, "n_instances");
        let dims = table::i64s(&index, "dim");
        let dtype = table::strings(&index, "dtype");
        let dim = *dims.first().ok_or_else(|| Error::Features("the packed store holds no slide".into()))?;
        let kind = if dtype.first().map(String::as_str) == Some("float16") { Kind::Half } else { Kind::Float };
        let total: i64 = counts.iter().sum();
        let bytes = (total * dim * kind.elt_size_in_bytes() as i64) as u64;
        let mut resident = RESIDENT.lock().expect("feature cache poisoned");
        // A store the GPU already holds is used as it is (deciding again would read a free
        // memory that the store itself now takes).
        let on_device = resident.iter().any(|r| r.features_bin == features_bin && r.device == device);
        let holder = match device {
            Device::Cuda(_) if !on_device && stream(mode, bytes, device) => Device::Cpu,
            _ => device,
        };
        let x = match resident.iter().find(|r| r.features_bin == features_bin && r.device == holder) {
            Some(r) => r.x.shallow_clone(),
            None => {
                let (view, map) = map_store(features_bin, total, dim, kind)?;
                let (x, map) = if holder == Device::Cpu { (view, map) } else { (view.to(holder), None) };
                let features_bin = features_bin.to_path_buf();
                resident.push(Resident { features_bin, device: holder, x: x.shallow_clone(), _map: map });
                x
            }
        };
        let rows = slides.into_iter().zip(offsets.into_iter().zip(counts)).collect();
        Ok(Store { x, device, dim, rows, coords_path: coords_bin.to_path_buf() })
    }

    /// (first row, instances) of a slide.
    pub fn rows(&self, slide: &str) -> Option<(i64, i64)> {
        self.rows.get(slide).copied()
    }

    /// The device batches are made on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The concatenated instances of `bags` (as float32) with their segment ids. A streamed
    /// store gathers them on the CPU into pinned memory and queues their copy to the GPU without
    /// waiting for it, so the gathering overlaps the GPU's work on the previous chunk (the copy
    /// itself runs in turn with that work, on the same CUDA stream).
    pub fn batch(&self, bags: &[&Bag]) -> Batch {
        let rows: Vec<i64> = bags.iter().flat_map(|b| b.start..b.start + b.len).collect();
        let held = self.x.device();
        let x = self.x.index_select(0, &Tensor::from_slice(&rows).to(held));
        let x = if held == self.device {
            x
        } else {
            x.pin_memory(self.device).to_device_(self.device, x.kind(), true, false)
        };
        Batch::new(x.to_kind(Kind::Float), bags.iter().map(|b| b.len).collect())
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

/// Whether batches stream to GPU `device` from host memory rather than the store living there:
/// as `mode` says, or (`auto`) when the store takes more than half the GPU's free memory. The
/// choice and its reason are logged.
fn stream(mode: StoreMode, bytes: u64, device: Device) -> bool {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (stream, why) = match mode {
        StoreMode::Device => (false, "train.store = \"device\"".to_owned()),
        StoreMode::Stream => (true, "train.store = \"stream\"".to_owned()),
        StoreMode::Auto => match super::memory::free_bytes(device) {
            Some(free) => (
                bytes > free / 2,
                format!(
                    "the store takes {:.1} GiB, the GPU has {:.1} GiB free; train.store overrides",
                    gib(bytes),
                    gib(free)
                ),
            ),
            None => (false, "the GPU's free memory is unknown; train.store = \"stream\" streams".to_owned()),
        },
    };
    let how = if stream { "streamed from pinned host memory" } else { "held on the GPU" };
    tracing::info!("the feature store is {how} ({why})");
    stream
}

/// A CPU tensor of `total` × `dim` over `features_bin` mapped read-only, and the map it views
/// (none for an empty store). A file whose size the index does not predict is an error.
fn map_store(features_bin: &Path, total: i64, dim: i64, kind: Kind) -> Result<(Tensor, Option<Mmap>)> {
    let file = std::fs::File::open(features_bin).map_err(|e| Error::io(features_bin, e))?;
    let bytes = file.metadata().map_err(|e| Error::io(features_bin, e))?.len() as i64;
    let expected = total * dim * if kind == Kind::Half { 2 } else { 4 };
    if bytes != expected {
        return Err(Error::BadFile {
            path: features_bin.into(),
            message: format!("holds {bytes} bytes, the index says {expected}"),
        });
    }
    if bytes == 0 {
        return Ok((Tensor::zeros([0, dim], (kind, Device::Cpu)), None));
    }
    // SAFETY: published store files are never written again (a new pack is a new object), so
    // the mapped bytes do not change under the tensor.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(features_bin, e))?;
    // SAFETY: the map is page-aligned, holds exactly total × dim values of `kind`, and is kept
    // alive beside every tensor that views it (see `Resident`); the view is only read.
    let x = unsafe { Tensor::from_blob(map.as_ptr(), &[total, dim], &[], kind, Device::Cpu) };
    Ok((x, Some(map)))
}

/// The bags of one fold, by split.
pub struct FoldBags {
    pub train: Vec<Bag>,
    pub val: Vec<Bag>,
    pub test: Vec<Bag>,
}

/// A labelled slide: its id, and its case, fine and coarse class index.
type Labelled = (String, (String, i64, i64));

/// Each labelled slide of `labels.parquet`.
fn labels_of(labels: &Path) -> Result<Vec<Labelled>> {
    let l = table::read(labels)?;
    Ok(table::strings(&l, "slide_id")
        .into_iter()
        .zip(table::strings(&l, "case_id"))
        .zip(table::i32s(&l, "fine_idx").into_iter().zip(table::i32s(&l, "coarse_idx")))
        .map(|((s, c), (f, k))| (s, (c, f as i64, k as i64)))
        .collect())
}

/// Every labelled slide of `labels` as a bag of `store` (an external cohort: all of it is tested).
pub fn labelled_bags(labels: &Path, store: &Store) -> Result<Vec<Bag>> {
    labels_of(labels)?
        .into_iter()
        .map(|(slide, (case_id, fine, coarse))| {
            let (start, len) = store
                .rows(&slide)
                .ok_or_else(|| Error::Splits(format!("{}: slide {slide} has no packed features", labels.display())))?;
            Ok(Bag { slide_id: slide, case_id, fine, coarse, start, len })
        })
        .collect()
}

/// Reads labels and splits and returns fold `fold`'s bags (each split sorted by slide id).
pub fn fold_bags(labels: &Path, splits: &Path, fold: usize, store: &Store) -> Result<FoldBags> {
    let label_of: HashMap<String, (String, i64, i64)> = labels_of(labels)?.into_iter().collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A packed store of three slides (2, 0 and 3 instances of dimension 4) in `dir`.
    fn write_store(dir: &Path, kind: Kind) -> (PathBuf, PathBuf, Tensor) {
        let values = Tensor::arange(5 * 4, (Kind::Float, Device::Cpu)).reshape([5, 4]).to_kind(kind) / 7.0;
        let bytes_per = if kind == Kind::Half { 2 } else { 4 };
        let mut bytes = vec![0u8; 5 * 4 * bytes_per];
        values.copy_data_u8(&mut bytes, 20);
        let bin = dir.join(format!("features-{kind:?}.bin"));
        std::fs::write(&bin, &bytes).unwrap();
        let packed = dir.join(format!("packed-{kind:?}.parquet"));
        let dtype = if kind == Kind::Half { "float16" } else { "float32" };
        table::write(
            &packed,
            schemas::tables::packed(),
            vec![
                table::string_col(["a", "empty", "b"]),
                Arc::new(arrow::array::Int64Array::from(vec![0, 2, 2])),
                Arc::new(arrow::array::Int64Array::from(vec![2, 0, 3])),
                Arc::new(arrow::array::Int64Array::from(vec![4, 4, 4])),
                table::string_col([dtype; 3]),
                Arc::new(arrow::array::BooleanArray::from(vec![false; 3])),
                table::string_col(["d1", "d2", "d3"]),
                table::string_col(["", "", ""]),
                Arc::new(arrow::array::Float64Array::from(vec![None; 3])),
            ],
        )
        .unwrap();
        (bin, packed, Tensor::from_data_size(&bytes, &[5, 4], kind))
    }

    #[test]
    fn the_mapped_store_gives_the_batches_a_copy_of_the_file_gives() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [Kind::Float, Kind::Half] {
            let (bin, packed, copied) = write_store(dir.path(), kind);
            let store =
                Store::load(&bin, &packed, &dir.path().join("coords.bin"), Device::Cpu, StoreMode::Auto).unwrap();
            let bag = |id: &str| {
                let (start, len) = store.rows(id).unwrap();
                Bag { slide_id: id.into(), case_id: id.into(), fine: 0, coarse: 0, start, len }
            };
            let (a, b) = (bag("a"), bag("b"));
            let batch = store.batch(&[&b, &a]);
            let rows = Tensor::from_slice(&[2i64, 3, 4, 0, 1]);
            let expected = copied.index_select(0, &rows).to_kind(Kind::Float);
            assert!(batch.x.equal(&expected), "{kind:?}: the batch differs from the file's rows");
            assert_eq!(store.rows("empty"), Some((2, 0)));
        }
    }

    #[test]
    fn a_store_of_the_wrong_size_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, packed, _) = write_store(dir.path(), Kind::Float);
        std::fs::write(&bin, [0u8; 12]).unwrap();
        let err = Store::load(&bin, &packed, &dir.path().join("coords.bin"), Device::Cpu, StoreMode::Auto)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("features-Float.bin: holds 12 bytes, the index says 80"), "{err}");
    }
}
