//! Bags for training and evaluation: the packed feature store loaded once per process and
//! device (shared by every fold; memory-mapped on the CPU), labels, and fold membership.

use std::borrow::Borrow;
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
    features_dir: PathBuf,
    device: Device,
    x: Held,
    /// The files' memory maps, which CPU tensors view: they live as long as the tensors, here.
    _maps: Vec<Mmap>,
}

/// Where a store's rows are.
#[derive(Debug)]
enum Held {
    /// On the CPU: each slide's rows (in `packed.parquet`'s order), a view of its mapped file.
    Slides(Vec<Tensor>),
    /// On a GPU: every slide's rows, one after another.
    Whole(Tensor),
}

impl Held {
    fn shallow_clone(&self) -> Held {
        match self {
            Held::Slides(s) => Held::Slides(s.iter().map(Tensor::shallow_clone).collect()),
            Held::Whole(x) => Held::Whole(x.shallow_clone()),
        }
    }
}

/// Stores already loaded, by (features directory, device).
static RESIDENT: Mutex<Vec<Resident>> = Mutex::new(Vec::new());

/// One labelled bag.
#[derive(Debug, Clone)]
pub struct Bag {
    pub slide_id: String,
    pub case_id: String,
    pub fine: i64,
    pub coarse: i64,
    /// First row in the slides' concatenation and number of instances.
    pub start: i64,
    pub len: i64,
}

/// A slide's place in the store: its position in `packed.parquet`, first row and row count.
#[derive(Debug, Clone, Copy)]
struct Rows {
    slot: usize,
    start: i64,
    len: i64,
}

/// Every instance of every slide: on the CPU views of the slides' files memory-mapped read-only
/// (the page cache holds them, never a second buffer); for a GPU one copy made from those maps
/// on the GPU, or the maps themselves, from which batches are streamed (see [`StoreMode`]).
pub struct Store {
    /// Instances × D, float32 or float16 as packed.
    x: Held,
    /// Where batches go (the GPU while `x` stays on the CPU: streamed).
    device: Device,
    pub dim: i64,
    rows: HashMap<String, Rows>,
    coords_dir: PathBuf,
}

impl Store {
    /// Loads the slides' files of `features_dir` (once per process and device) and their rows
    /// (`packed`), for batches on `device`; `mode` says whether a GPU holds the store or batches
    /// stream to it.
    pub fn load(
        features_dir: &Path,
        packed: &Path,
        coords_dir: &Path,
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
        let on_device = resident.iter().any(|r| r.features_dir == features_dir && r.device == device);
        let holder = match device {
            Device::Cuda(_) if !on_device && stream(mode, bytes, device) => Device::Cpu,
            _ => device,
        };
        let x = match resident.iter().find(|r| r.features_dir == features_dir && r.device == holder) {
            Some(r) => r.x.shallow_clone(),
            None => {
                let (mut views, mut maps) = (Vec::with_capacity(slides.len()), Vec::new());
                for (slide, &rows) in slides.iter().zip(&counts) {
                    let (view, map) = map_slide(&features_dir.join(format!("{slide}.bin")), rows, dim, kind)?;
                    views.push(view);
                    maps.extend(map);
                }
                let x = if holder == Device::Cpu {
                    Held::Slides(views)
                } else {
                    let whole = Tensor::empty([total, dim], (kind, holder));
                    for (view, (&start, &rows)) in views.iter().zip(offsets.iter().zip(&counts)) {
                        whole.narrow(0, start, rows).copy_(view);
                    }
                    maps.clear();
                    Held::Whole(whole)
                };
                let features_dir = features_dir.to_path_buf();
                resident.push(Resident { features_dir, device: holder, x: x.shallow_clone(), _maps: maps });
                x
            }
        };
        let rows = slides
            .into_iter()
            .zip(offsets.into_iter().zip(counts))
            .enumerate()
            .map(|(slot, (slide, (start, len)))| (slide, Rows { slot, start, len }))
            .collect();
        Ok(Store { x, device, dim, rows, coords_dir: coords_dir.to_path_buf() })
    }

    /// (first row, instances) of a slide.
    pub fn rows(&self, slide: &str) -> Option<(i64, i64)> {
        self.rows.get(slide).map(|r| (r.start, r.len))
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
        let x = match &self.x {
            Held::Whole(x) => {
                let rows: Vec<i64> = bags.iter().flat_map(|b| b.start..b.start + b.len).collect();
                x.index_select(0, &Tensor::from_slice(&rows).to(x.device()))
            }
            Held::Slides(slides) => {
                let parts: Vec<&Tensor> = bags.iter().map(|b| &slides[self.rows[&b.slide_id].slot]).collect();
                if self.device == Device::Cpu {
                    joined_f32(&parts, self.dim)
                } else {
                    let x = Tensor::cat(&parts, 0);
                    x.pin_memory(self.device).to_device_(self.device, x.kind(), true, false)
                }
            }
        };
        // Float32 already (no copy) where the rows were joined on the CPU.
        Batch::new(x.to_kind(Kind::Float), bags.iter().map(|b| b.len).collect())
    }

    /// Coordinates (x, y) of a bag's instances (NaN where the file had none).
    pub fn coords(&self, bag: &Bag) -> Result<Vec<(f64, f64)>> {
        let path = self.coords_dir.join(format!("{}.bin", bag.slide_id));
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.len() as i64 != bag.len * 16 {
            return Err(Error::BadFile {
                path,
                message: format!("holds {} bytes, the index says {}", bytes.len(), bag.len * 16),
            });
        }
        Ok(bytes
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

/// The rows of `parts` (CPU tensors of `dim` columns) one after another, as float32: copied and
/// converted in one pass, where joining an f16 store's rows and converting them after would
/// write every value twice.
pub fn joined_f32<T: Borrow<Tensor>>(parts: &[T], dim: i64) -> Tensor {
    let total = parts.iter().map(|p| p.borrow().size()[0]).sum();
    let x = Tensor::empty([total, dim], (Kind::Float, Device::Cpu));
    let mut at = 0;
    for part in parts {
        let part = part.borrow();
        let n = part.size()[0];
        x.narrow(0, at, n).copy_(part);
        at += n;
    }
    x
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

/// A CPU tensor of `rows` × `dim` over a slide's file mapped read-only, and the map it views
/// (none for an empty slide). A file whose size the index does not predict is an error.
fn map_slide(file_path: &Path, rows: i64, dim: i64, kind: Kind) -> Result<(Tensor, Option<Mmap>)> {
    let file = std::fs::File::open(file_path).map_err(|e| Error::io(file_path, e))?;
    let bytes = file.metadata().map_err(|e| Error::io(file_path, e))?.len() as i64;
    let expected = rows * dim * kind.elt_size_in_bytes() as i64;
    if bytes != expected {
        return Err(Error::BadFile {
            path: file_path.into(),
            message: format!("holds {bytes} bytes, the index says {expected}"),
        });
    }
    if bytes == 0 {
        return Ok((Tensor::zeros([0, dim], (kind, Device::Cpu)), None));
    }
    // SAFETY: published store files are never written again (a new pack links new items), so
    // the mapped bytes do not change under the tensor.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(file_path, e))?;
    // SAFETY: the map is page-aligned, holds exactly rows × dim values of `kind`, and is kept
    // alive beside every tensor that views it (see `Resident`); the view is only read.
    let x = unsafe { Tensor::from_blob(map.as_ptr(), &[rows, dim], &[], kind, Device::Cpu) };
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

    /// A packed store of three slides (2, 0 and 3 instances of dimension 4) in `dir`: its
    /// features directory, `packed.parquet`, and every row as one tensor.
    fn write_store(dir: &Path, kind: Kind) -> (PathBuf, PathBuf, Tensor) {
        let values = Tensor::arange(5 * 4, (Kind::Float, Device::Cpu)).reshape([5, 4]).to_kind(kind) / 7.0;
        let bytes_per = kind.elt_size_in_bytes();
        let mut bytes = vec![0u8; 5 * 4 * bytes_per];
        values.copy_data_u8(&mut bytes, 20);
        let features = dir.join(format!("features-{kind:?}"));
        std::fs::create_dir_all(&features).unwrap();
        for (slide, rows) in [("a", 0..2), ("empty", 2..2), ("b", 2..5)] {
            let part = &bytes[rows.start * 4 * bytes_per..rows.end * 4 * bytes_per];
            std::fs::write(features.join(format!("{slide}.bin")), part).unwrap();
        }
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
        (features, packed, Tensor::from_data_size(&bytes, &[5, 4], kind))
    }

    #[test]
    fn the_mapped_store_gives_the_batches_a_copy_of_the_files_gives() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [Kind::Float, Kind::Half] {
            let (features, packed, copied) = write_store(dir.path(), kind);
            let store =
                Store::load(&features, &packed, &dir.path().join("coords"), Device::Cpu, StoreMode::Auto).unwrap();
            let bag = |id: &str| {
                let (start, len) = store.rows(id).unwrap();
                Bag { slide_id: id.into(), case_id: id.into(), fine: 0, coarse: 0, start, len }
            };
            let (a, b, empty) = (bag("a"), bag("b"), bag("empty"));
            let batch = store.batch(&[&b, &empty, &a]);
            let rows = Tensor::from_slice(&[2i64, 3, 4, 0, 1]);
            let expected = copied.index_select(0, &rows).to_kind(Kind::Float);
            assert!(batch.x.equal(&expected), "{kind:?}: the batch differs from the files' rows");
            assert_eq!(store.rows("empty"), Some((2, 0)));
        }
    }

    #[test]
    fn a_slide_file_of_the_wrong_size_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (features, packed, _) = write_store(dir.path(), Kind::Float);
        std::fs::write(features.join("b.bin"), [0u8; 12]).unwrap();
        let err = Store::load(&features, &packed, &dir.path().join("coords"), Device::Cpu, StoreMode::Auto)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("features-Float/b.bin: holds 12 bytes, the index says 48"), "{err}");
        let coords = dir.path().join("coords");
        std::fs::create_dir_all(&coords).unwrap();
        std::fs::write(coords.join("a.bin"), [0u8; 16]).unwrap();
        let store = Store {
            x: Held::Slides(Vec::new()),
            device: Device::Cpu,
            dim: 4,
            rows: HashMap::new(),
            coords_dir: coords,
        };
        let bag = Bag { slide_id: "a".into(), case_id: "a".into(), fine: 0, coarse: 0, start: 0, len: 2 };
        let err = store.coords(&bag).unwrap_err().to_string();
        assert!(err.contains("coords/a.bin: holds 16 bytes, the index says 32"), "{err}");
    }
}
