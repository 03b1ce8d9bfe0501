//! `tile_slides`: per slide, the tissue mask and the patch grid at the target resolution, and a
//! QC picture of both. Each slide's tiling is an item of the workspace, so a changed, added or
//! removed slide is the only one tiled again, and a run killed mid-cohort keeps what it tiled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array};
use pipeline::{Context, Input, Output, Pending, Stage, StageError};
use schemas::artifacts::{QC_DIR, SKIPPED, SLIDES, TILES};
use schemas::workflow::{OnBadFile, Slides, TissueMethod};
use serde::{Deserialize, Serialize};
use wsi::{GridSpec, Slide, Threshold, TissueParams};

use crate::error::{Error, Result};
use crate::table;

/// File extensions of the slide formats OpenSlide reads.
pub const SLIDE_EXTENSIONS: &[&str] =
    &["svs", "tif", "tiff", "ndpi", "vms", "vmu", "scn", "mrxs", "svslide", "bif", "czi", "dcm"];

/// Every slide file under `dir` (recursively, hidden entries left out), sorted, with its slide
/// id (the file stem). Two files with one stem are an error naming both.
pub fn slide_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if path
                .extension()
                .is_some_and(|e| SLIDE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut paths = Vec::new();
    walk(dir, &mut paths)?;
    let out: Vec<(String, PathBuf)> = crate::index::by_slide(paths.into_iter().map(|p| (p, ())).collect())
        .map_err(|s| {
            Error::Features(format!(
                "slide {} has two files: {} and {}; keep one of them in slides.dir",
                s.slide,
                s.first.display(),
                s.second.display()
            ))
        })?
        .into_iter()
        .map(|(id, path, ())| (id, path))
        .collect();
    if out.is_empty() {
        return Err(Error::Features(format!(
            "{}: no slide files (.{}) found; point slides.dir at the folder of slides",
            dir.display(),
            SLIDE_EXTENSIONS.join(" .")
        )));
    }
    Ok(out)
}

/// How one slide was tiled, as its item records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlideTiling {
    pub width: u64,
    pub height: u64,
    pub mpp: f64,
    pub level: usize,
    pub read_size: u32,
    pub size: u32,
    pub patches: Vec<[i64; 2]>,
}

/// The `tile_slides` stage.
pub struct TileSlides {
    pub dir: PathBuf,
    pub spec: GridSpec,
    pub tissue: TissueParams,
    pub on_bad_slide: OnBadFile,
}

impl TileSlides {
    /// The stage for the workflow's `[slides]`.
    pub fn new(slides: &Slides) -> TileSlides {
        let t = &slides.tissue;
        TileSlides {
            dir: slides.dir.clone(),
            spec: GridSpec {
                mpp: slides.target_mpp(),
                patch_size: slides.patch_size,
                mpp_fallback: slides.mpp_fallback,
            },
            tissue: TissueParams {
                threshold: match t.method {
                    TissueMethod::Saturation => Threshold::Fixed(t.threshold),
                    TissueMethod::Otsu => Threshold::Otsu,
                },
                median: t.median,
                close: t.close,
                min_area: t.min_area,
                min_hole_area: t.min_hole_area,
                max_holes: t.max_holes,
            },
            on_bad_slide: slides.on_bad_slide,
        }
    }
}

impl Stage for TileSlides {
    fn kind(&self) -> &str {
        "tile_slides"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    /// What a slide's tiling depends on (`on_bad_slide` only decides what a failure does, so it
    /// is left out: changing it re-tiles nothing).
    fn params(&self) -> serde_json::Value {
        let t = &self.tissue;
        serde_json::json!({
            "mpp": self.spec.mpp,
            "patch_size": self.spec.patch_size,
            "mpp_fallback": self.spec.mpp_fallback,
            "tissue": {
                "threshold": match t.threshold { Threshold::Fixed(v) => serde_json::json!(v), Threshold::Otsu => "otsu".into() },
                "median": t.median, "close": t.close, "min_area": t.min_area,
                "min_hole_area": t.min_hole_area, "max_holes": t.max_holes,
            },
        })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::external("slides", &self.dir)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&SLIDES).into(), (&TILES).into(), (&SKIPPED).into(), (&QC_DIR).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        self.tile(ctx)
    }
    /// How many slides are not tiled yet (slides OpenSlide cannot open count as to tile).
    fn pending(&self, p: &Pending) -> std::result::Result<Option<String>, StageError> {
        let (done, total) = slides_done(p)?;
        Ok(Some(format!("{} of {total} slide(s) to tile ({done} tiled already with these settings)", total - done)))
    }
}

/// Of the slides in a stage's input `slides`, how many have their item already (each keyed by
/// [`facts`]), and how many there are.
pub(crate) fn slides_done(p: &Pending) -> Result<(usize, usize)> {
    let files = slide_files(p.input("slides"))?;
    let done = files
        .iter()
        .filter(|(_, path)| Slide::open(path).is_ok_and(|s| p.has_item(&facts(&quickhash(&s), path))))
        .count();
    Ok((done, files.len()))
}

/// OpenSlide's hash of the slide's metadata and lowest-resolution level.
pub(crate) fn quickhash(slide: &Slide) -> String {
    slide.property("openslide.quickhash-1").unwrap_or_default()
}

/// What a slide's tiling depends on besides the stage's params: its `quickhash` and the file's
/// size.
pub(crate) fn facts(quickhash: &str, path: &Path) -> serde_json::Value {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    serde_json::json!({ "quickhash": quickhash, "bytes": bytes })
}

/// A slide tiled, now or by an earlier run.
struct Tiled<'a> {
    id: &'a str,
    path: &'a Path,
    /// The item directory holding its `qc.png`.
    item: PathBuf,
    quickhash: String,
    tiling: SlideTiling,
}

impl TileSlides {
    fn tile(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let files = slide_files(ctx.input("slides"))?;
        let bar = ctx.progress(files.len() as u64, "tiling slides");
        let made = AtomicUsize::new(0);
        let outcomes = crate::par::map(&files, |(id, path)| {
            let outcome =
                if ctx.interrupted() { Err("interrupted".into()) } else { self.tile_one(ctx, id, path, &made) };
            bar.inc(1);
            outcome
        });
        bar.finish_and_clear();
        if ctx.interrupted() {
            return Err(Error::Interrupted(format!("after tiling {} slide(s)", made.load(Ordering::SeqCst))).into());
        }
        tracing::info!(node = %ctx.node_id(), "{}", made_note("tiled", made.load(Ordering::SeqCst), files.len()));
        let mut bad = Vec::new();
        let mut good = Vec::new();
        for ((_, path), outcome) in files.iter().zip(outcomes) {
            match outcome {
                Ok(tiled) => good.push(tiled),
                Err(e) => bad.push((path.clone(), e)),
            }
        }
        if !bad.is_empty() && self.on_bad_slide == OnBadFile::Error {
            let list: Vec<String> = bad.iter().map(|(p, e)| format!("  {}: {e}", p.display())).collect();
            return Err(Error::Features(format!(
                "{} slide(s) could not be tiled (set slides.on_bad_slide = \"skip\" to leave them out):\n{}",
                bad.len(),
                list.join("\n")
            ))
            .into());
        }
        if !bad.is_empty() {
            let list: Vec<String> = bad.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect();
            ctx.warn(format!(
                "skipped {} slide(s) (listed in skipped.parquet): {}",
                bad.len(),
                pipeline::some_of(&list, "; ")
            ));
        }
        let empty: Vec<&Tiled> = good.iter().filter(|t| t.tiling.patches.is_empty()).collect();
        if !empty.is_empty() {
            let names: Vec<String> = empty.iter().map(|t| t.id.to_owned()).collect();
            ctx.warn(format!(
                "no tissue found on {} slide(s), which get no features (see qc/<slide>.png): {}",
                names.len(),
                pipeline::some_of(&names, ", ")
            ));
        }
        bad.extend(empty.iter().map(|t| (t.path.to_path_buf(), "no tissue found".to_owned())));
        let qc = ctx.output(QC_DIR.file);
        std::fs::create_dir_all(&qc).map_err(|e| Error::io(&qc, e))?;
        for t in &good {
            let to = qc.join(format!("{}.png", t.id));
            std::fs::hard_link(t.item.join("qc.png"), &to).map_err(|e| Error::io(&to, e))?;
        }
        write_slides(&ctx.output(SLIDES.file), &good)?;
        write_tiles(&ctx.output(TILES.file), &good)?;
        table::write_output(
            ctx,
            &SKIPPED,
            vec![
                table::string_col(bad.iter().map(|(p, _)| p.to_string_lossy())),
                table::string_col(bad.iter().map(|(_, e)| e.as_str())),
            ],
        )?;
        Ok(())
    }

    /// Tiles one slide, or takes its tiling from an earlier run; an error says why it could not.
    fn tile_one<'a>(
        &self,
        ctx: &Context,
        id: &'a str,
        path: &'a Path,
        made: &AtomicUsize,
    ) -> std::result::Result<Tiled<'a>, String> {
        let slide = Slide::open(path).map_err(|e| strip(&e.to_string(), path))?;
        let quickhash = quickhash(&slide);
        let item = ctx
            .item(&facts(&quickhash, path), |dir| {
                let tiling = wsi::tile(&slide, &self.spec, &self.tissue)?;
                let picture = wsi::qc::picture(&slide, &tiling)?;
                let png = dir.join("qc.png");
                picture.save(&png).map_err(|e| format!("{}: {e}", png.display()))?;
                let level0 = slide.levels()[0];
                let record = SlideTiling {
                    width: level0.width,
                    height: level0.height,
                    mpp: tiling.mpp,
                    level: tiling.grid.level,
                    read_size: tiling.grid.read_size,
                    size: tiling.grid.size0,
                    patches: tiling.grid.patches,
                };
                std::fs::write(dir.join("tiling.json"), serde_json::to_vec(&record)?)?;
                made.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .map_err(|e| strip(&e.to_string(), path))?;
        let tiling: SlideTiling = read_record(&item.dir, "tiling.json", "tiling")?;
        Ok(Tiled { id, path, item: item.dir, quickhash, tiling })
    }
}

/// The JSON record `name` that a per-slide item keeps of its `what` (tiling, thumbnail); an
/// unreadable one is an error saying which item folder to remove.
pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    what: &str,
) -> std::result::Result<T, String> {
    std::fs::read(dir.join(name))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("its {what} in {} is unreadable ({e}); remove that folder", dir.display()))
}

/// "tiled 1 of 13 slide(s); 12 were tiled before": what a stage with per-slide items did.
pub fn made_note(verb: &str, made: usize, total: usize) -> String {
    match total - made.min(total) {
        0 => format!("{verb} {made} of {total} slide(s)"),
        before => format!("{verb} {made} of {total} slide(s); {before} were {verb} before"),
    }
}

/// `message` without a leading `path: `, which the list of bad slides already shows.
fn strip(message: &str, path: &Path) -> String {
    message.strip_prefix(&format!("{}: ", path.display())).unwrap_or(message).to_owned()
}

fn write_slides(path: &Path, good: &[Tiled]) -> Result<()> {
    let i64s = |f: &dyn Fn(&SlideTiling) -> i64| -> ArrayRef {
        Arc::new(good.iter().map(|t| f(&t.tiling)).collect::<Int64Array>())
    };
    table::write(
        path,
        (SLIDES.schema)(),
        vec![
            table::string_col(good.iter().map(|t| t.id)),
            table::string_col(good.iter().map(|t| t.path.to_string_lossy())),
            table::string_col(good.iter().map(|t| t.quickhash.as_str())),
            i64s(&|t| t.width as i64),
            i64s(&|t| t.height as i64),
            Arc::new(good.iter().map(|t| t.tiling.mpp).collect::<Float64Array>()),
            Arc::new(good.iter().map(|t| t.tiling.level as i32).collect::<Int32Array>()),
            i64s(&|t| i64::from(t.read_size)),
            i64s(&|t| i64::from(t.size)),
            i64s(&|t| t.patches.len() as i64),
        ],
    )
}

fn write_tiles(path: &Path, good: &[Tiled]) -> Result<()> {
    let rows = || good.iter().flat_map(|t| t.tiling.patches.iter().map(move |p| (t.id, p, &t.tiling)));
    let ids: Vec<&str> = rows().map(|r| r.0).collect();
    table::write(
        path,
        (TILES.schema)(),
        vec![
            table::string_col(ids),
            Arc::new(rows().map(|r| r.1[0]).collect::<Int64Array>()),
            Arc::new(rows().map(|r| r.1[1]).collect::<Int64Array>()),
            Arc::new(rows().map(|r| r.2.level as i32).collect::<Int32Array>()),
            Arc::new(rows().map(|r| i64::from(r.2.size)).collect::<Int64Array>()),
        ],
    )
}
