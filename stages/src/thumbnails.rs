//! `thumbnails`: each slide read once, at [`THUMBNAIL_SIDE`] pixels on its long side (at most), for
//! heatmaps to draw on. Each slide's thumbnail is an item of the workspace, so no fold, rerun or
//! retrained model reads a slide's overview again; a slide that cannot be read is listed and
//! its heatmaps drawn on a blank canvas, never a failed run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array};
use image::RgbImage;
use pipeline::{Context, Input, Output, Pending, Stage, StageError};
use schemas::artifacts::{THUMBNAIL_DIR, THUMBNAILS};
use serde::{Deserialize, Serialize};
use wsi::Slide;

use crate::error::{Error, Result};
use crate::table;
use crate::tile::{facts, quickhash, read_record, slide_files};

/// The long side of a thumbnail, in pixels, at most.
pub const THUMBNAIL_SIDE: f64 = 2048.0;

/// A slide's thumbnail, as its item records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Made {
    width: u64,
    height: u64,
    /// Level-0 pixels per thumbnail pixel.
    downsample: f64,
    mpp: Option<f64>,
}

/// The `thumbnails` stage over the slides in `dir`.
pub struct Thumbnails {
    pub dir: PathBuf,
}

impl Stage for Thumbnails {
    fn kind(&self) -> &str {
        "thumbnails"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "side": THUMBNAIL_SIDE })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::external("slides", &self.dir)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&THUMBNAILS).into(), (&THUMBNAIL_DIR).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.read(ctx)?)
    }
    /// How many slides have no thumbnail yet.
    fn pending(&self, p: &Pending) -> std::result::Result<Option<String>, StageError> {
        let (done, total) = crate::tile::slides_done(p)?;
        Ok(Some(format!("{} of {total} slide(s) to read ({done} read already)", total - done)))
    }
}

/// A thumbnail made now or by an earlier run: the slide, its item, what it recorded.
type Read<'a> = (&'a str, &'a Path, PathBuf, Made);

impl Thumbnails {
    fn read(&self, ctx: &Context) -> Result<()> {
        let files = slide_files(ctx.input("slides"))?;
        let bar = ctx.progress(files.len() as u64, "reading thumbnails");
        let outcomes = crate::par::map(&files, |(id, path)| {
            let outcome = if ctx.interrupted() { Err("interrupted".to_owned()) } else { one(ctx, path) };
            bar.inc(1);
            outcome.map(|(item, made)| (id.as_str(), path.as_path(), item, made))
        });
        bar.finish_and_clear();
        if ctx.interrupted() {
            return Err(Error::Interrupted("reading thumbnails".into()));
        }
        let dir = ctx.output(THUMBNAIL_DIR.file);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let (mut good, mut bad): (Vec<Read>, Vec<String>) = (Vec::new(), Vec::new());
        for ((_, path), outcome) in files.iter().zip(outcomes) {
            match outcome {
                Ok(read) => {
                    let to = dir.join(format!("{}.png", read.0));
                    std::fs::hard_link(read.2.join("thumbnail.png"), &to).map_err(|e| Error::io(&to, e))?;
                    good.push(read);
                }
                Err(e) => bad.push(format!("{}: {e}", path.display())),
            }
        }
        if !bad.is_empty() {
            ctx.warn(format!(
                "{} slide(s) could not be read; their heatmaps are drawn on a blank canvas: {}",
                bad.len(),
                pipeline::some_of(&bad, "; ")
            ));
        }
        table::write_output(
            ctx,
            &THUMBNAILS,
            vec![
                table::string_col(good.iter().map(|r| r.0)),
                table::string_col(good.iter().map(|r| r.1.to_string_lossy())),
                Arc::new(good.iter().map(|r| r.3.width as i64).collect::<Int64Array>()),
                Arc::new(good.iter().map(|r| r.3.height as i64).collect::<Int64Array>()),
                Arc::new(good.iter().map(|r| r.3.mpp).collect::<Float64Array>()),
                Arc::new(good.iter().map(|r| r.3.downsample).collect::<Float64Array>()),
            ],
        )
    }
}

/// One slide's thumbnail item, made unless an earlier run made it.
fn one(ctx: &Context, path: &Path) -> std::result::Result<(PathBuf, Made), String> {
    let slide = Slide::open(path).map_err(|e| e.to_string())?;
    let item = ctx
        .item(&facts(&quickhash(&slide), path), |dir| {
            let level0 = slide.levels()[0];
            let (image, downsample) = small(&slide)?;
            let png = dir.join("thumbnail.png");
            image.save(&png).map_err(|e| format!("{}: {e}", png.display()))?;
            let made = Made { width: level0.width, height: level0.height, downsample, mpp: slide.mpp() };
            std::fs::write(dir.join("thumbnail.json"), serde_json::to_vec(&made)?)?;
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let made = read_record(&item.dir, "thumbnail.json", "thumbnail")?;
    Ok((item.dir, made))
}

/// The slide at [`THUMBNAIL_SIDE`] pixels on its long side (at most), and its downsample: the
/// coarsest pyramid level at least half that size, read whole (a few megapixels at most) and
/// reduced; a slide without such a level is read block by block.
fn small(slide: &Slide) -> wsi::Result<(RgbImage, f64)> {
    let levels = slide.levels();
    let long = |l: &wsi::openslide::Level| l.width.max(l.height) as f64;
    let image = match levels.iter().rposition(|l| long(l) >= THUMBNAIL_SIDE / 2.0) {
        Some(i) if long(&levels[i]) <= 4.0 * THUMBNAIL_SIDE => {
            slide.read_rgb(0, 0, i, levels[i].width as u32, levels[i].height as u32)?
        }
        _ => wsi::grid::image_at(slide, (long(&levels[0]) / THUMBNAIL_SIDE).max(1.0))?.0,
    };
    let scale = (THUMBNAIL_SIDE / f64::from(image.width().max(image.height()))).min(1.0);
    let (w, h) =
        ((f64::from(image.width()) * scale).round() as u32, (f64::from(image.height()) * scale).round() as u32);
    let image = crate::pixels::resize(&image, w, h);
    Ok((image, levels[0].width as f64 / f64::from(w.max(1))))
}

/// A slide to draw on: its file, its resolution, and its thumbnail.
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub path: PathBuf,
    /// Microns per level-0 pixel, when the slide says.
    pub mpp: Option<f64>,
    /// Level-0 pixels per thumbnail pixel.
    pub downsample: f64,
    pub image: ThumbnailImage,
}

/// A thumbnail's pixels: a file `thumbnails` wrote, read when drawn, or read from the slide now.
#[derive(Debug, Clone)]
pub enum ThumbnailImage {
    File(PathBuf),
    Read(RgbImage),
}

impl Thumbnail {
    /// The thumbnail of the slide at `path`, read from it now.
    pub fn of_slide(path: &Path) -> Result<Thumbnail> {
        let slide = Slide::open(path)?;
        let (image, downsample) = small(&slide)?;
        Ok(Thumbnail { path: path.into(), mpp: slide.mpp(), downsample, image: ThumbnailImage::Read(image) })
    }

    /// Its pixels; none when its file cannot be read.
    pub fn pixels(&self) -> Option<std::borrow::Cow<'_, RgbImage>> {
        match &self.image {
            ThumbnailImage::File(png) => Some(std::borrow::Cow::Owned(image::open(png).ok()?.to_rgb8())),
            ThumbnailImage::Read(image) => Some(std::borrow::Cow::Borrowed(image)),
        }
    }
}

/// Every slide's [`Thumbnail`], from the `thumbnails` outputs `table` and `dir`.
pub fn read(table: &Path, dir: &Path) -> Result<std::collections::HashMap<String, Thumbnail>> {
    let t = table::read(table)?;
    let (ids, paths) = (table::strings(&t, "slide_id"), table::strings(&t, "path"));
    let (mpps, downsamples) = (table::f64s(&t, "mpp"), table::f64s(&t, "downsample"));
    Ok(ids
        .into_iter()
        .zip(paths)
        .zip(mpps.into_iter().zip(downsamples))
        .map(|((id, path), (mpp, downsample))| {
            let image = ThumbnailImage::File(dir.join(format!("{id}.png")));
            (id, Thumbnail { path: path.into(), mpp, downsample: downsample.unwrap_or(1.0), image })
        })
        .collect())
}
