//! `index_features`: one row per feature file (shape, dtype, digest), reading each file at most
//! once per version: facts of unchanged files (same path, size, mtime) come from the workspace.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array};
use pipeline::{Context, Input, NodeRef, Output, Pending, Resources, Stage, StageError};
use schemas::artifacts::{Blob, FEATURE_INDEX, SKIPPED};
use schemas::workflow::OnBadFile;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::{self, Format};
use crate::table;

/// What indexing learns about a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileFacts {
    pub n_instances: usize,
    pub dim: usize,
    pub dtype: String,
    pub has_coords: bool,
}

/// Parses a feature file's bytes into its facts.
pub fn facts(format: Format, bytes: &[u8]) -> std::result::Result<FileFacts, String> {
    let a = features::parse(format, bytes)?;
    Ok(FileFacts {
        n_instances: a.features.rows,
        dim: a.features.cols,
        dtype: a.features.dtype.name().into(),
        has_coords: a.coords.is_some(),
    })
}

/// Every feature file under `dir` (recursively), sorted, with its slide id (the file stem).
/// Two files for one slide is an error naming both.
pub fn feature_files(dir: &Path) -> Result<Vec<(String, PathBuf, Format)>> {
    let mut found = Vec::new();
    walk(dir, &mut found)?;
    let out = by_slide(found).map_err(|s| {
        Error::Features(format!(
            "slide {} has two feature files: {} and {}; point dataset.features at one kind of file",
            s.slide,
            s.first.display(),
            s.second.display()
        ))
    })?;
    if out.is_empty() {
        return Err(Error::Features(format!(
            "{}: no feature files (.pt, .pth, .h5, .hdf5, .safetensors, .npy) found",
            dir.display()
        )));
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Format)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if let Some(format) = Format::of(&path) {
            out.push((path, format));
        }
    }
    Ok(())
}

/// Two files found for one slide id.
pub(crate) struct SameSlide {
    pub slide: String,
    pub first: PathBuf,
    pub second: PathBuf,
}

/// Files found for slides, sorted by path, each with its slide id (the file stem); a slide id
/// two files share is an error naming both.
pub(crate) fn by_slide<T>(mut found: Vec<(PathBuf, T)>) -> std::result::Result<Vec<(String, PathBuf, T)>, SameSlide> {
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(found.len());
    for (path, kind) in found {
        let slide = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(first) = seen.insert(slide.clone(), path.clone()) {
            return Err(SameSlide { slide, first, second: path });
        }
        out.push((slide, path, kind));
    }
    Ok(out)
}

/// Where the feature files are: a folder the user gave, or a directory output of a node that
/// made them (`extract_features`).
#[derive(Debug, Clone)]
pub enum FeatureDir {
    External(PathBuf),
    Made { node: NodeRef, artifact: Blob },
}

impl FeatureDir {
    /// The directory as the input `name` of a stage.
    pub fn input(&self, name: &str) -> Input {
        match self {
            FeatureDir::External(dir) => Input::external(name, dir),
            FeatureDir::Made { node, artifact } => Input::artifact(name, node, artifact),
        }
    }
}

/// The `index_features` stage.
pub struct IndexFeatures {
    pub features: FeatureDir,
    pub on_bad_file: OnBadFile,
}

impl Stage for IndexFeatures {
    fn kind(&self) -> &str {
        "index_features"
    }
    /// Small: runs in the driver.
    fn resources(&self) -> Resources {
        Resources { gpu: false, in_driver: true }
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "on_bad_file": self.on_bad_file })
    }
    fn inputs(&self) -> Vec<Input> {
        vec![self.features.input("features")]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&FEATURE_INDEX).into(), (&SKIPPED).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        Ok(self.index(ctx)?)
    }
    /// The feature files new or changed since they were last indexed, by slide.
    fn pending(&self, p: &Pending) -> std::result::Result<Option<String>, StageError> {
        let files = feature_files(p.input("features"))?;
        let unseen: Vec<String> =
            files.iter().filter(|(_, path, _)| !p.stat_cache().knows(path, FACTS_KIND)).map(|f| f.0.clone()).collect();
        Ok(Some(match unseen.len() {
            0 => format!("all {} feature file(s) indexed already; only the listing changed", files.len()),
            n => format!("{n} of {} feature file(s) new or changed: {}", files.len(), pipeline::some_of(&unseen, ", ")),
        }))
    }
}

/// Under which name indexing facts are remembered per file version.
pub const FACTS_KIND: &str = "index_features/1";

/// One indexed file.
pub struct Row {
    pub slide: String,
    pub path: PathBuf,
    pub format: Format,
    pub bytes: u64,
    pub digest: String,
    pub facts: FileFacts,
}

/// Digests and facts of `files`, on all cores; `facts_of` supplies (digest, facts) of one file
/// (reading it only when needed), `done` is called after each file.
pub fn scan<F>(
    files: &[(String, PathBuf, Format)],
    facts_of: F,
    done: impl Fn() + Sync,
) -> Vec<std::result::Result<Row, (PathBuf, String)>>
where
    F: Fn(&Path, Format) -> std::result::Result<(String, FileFacts), String> + Sync,
{
    crate::par::map(files, |(slide, path, format)| {
        let row = facts_of(path, *format).map_err(|e| (path.clone(), e)).and_then(|(digest, facts)| {
            let bytes = std::fs::metadata(path).map_err(|e| (path.clone(), e.to_string()))?.len();
            Ok(Row { slide: slide.clone(), path: path.clone(), format: *format, bytes, digest, facts })
        });
        done();
        row
    })
}

impl IndexFeatures {
    fn index(&self, ctx: &Context) -> Result<()> {
        let files = feature_files(ctx.input("features"))?;
        let bar = ctx.progress(files.len() as u64, "indexing feature files");
        let results =
            scan(&files, |path, format| ctx.file_facts(path, FACTS_KIND, |b| facts(format, b)), || bar.inc(1));
        bar.finish_and_clear();
        let (rows, bad): (Vec<_>, Vec<_>) = results.into_iter().partition(std::result::Result::is_ok);
        let rows: Vec<Row> = rows.into_iter().map(std::result::Result::unwrap).collect();
        let bad: Vec<(PathBuf, String)> = bad.into_iter().map(|r| r.err().expect("partitioned")).collect();
        if !bad.is_empty() && self.on_bad_file == OnBadFile::Error {
            let list: Vec<String> = bad.iter().map(|(p, e)| format!("  {}: {e}", p.display())).collect();
            return Err(Error::Features(format!(
                "{} unreadable feature file(s) (set dataset.on_bad_file = \"skip\" to leave them out):\n{}",
                bad.len(),
                list.join("\n")
            )));
        }
        if !bad.is_empty() {
            let list: Vec<String> = bad.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect();
            ctx.warn(format!(
                "skipped {} unreadable feature file(s) (listed in skipped.parquet): {}",
                bad.len(),
                pipeline::some_of(&list, "; ")
            ));
        }
        if let Some(first) = rows.first()
            && let Some(odd) = rows.iter().find(|r| r.facts.dim != first.facts.dim)
        {
            return Err(Error::Features(format!(
                "feature dimensions differ: {} has {} but {} has {}",
                first.path.display(),
                first.facts.dim,
                odd.path.display(),
                odd.facts.dim
            )));
        }
        if rows.is_empty() {
            return Err(Error::Features("every feature file was unreadable".into()));
        }
        let i64col = |f: &dyn Fn(&Row) -> i64| -> ArrayRef { Arc::new(rows.iter().map(f).collect::<Int64Array>()) };
        table::write_output(
            ctx,
            &FEATURE_INDEX,
            vec![
                table::string_col(rows.iter().map(|r| r.slide.as_str())),
                table::string_col(rows.iter().map(|r| r.path.to_string_lossy())),
                table::string_col(rows.iter().map(|r| r.format.name())),
                i64col(&|r| r.facts.n_instances as i64),
                i64col(&|r| r.facts.dim as i64),
                table::string_col(rows.iter().map(|r| r.facts.dtype.as_str())),
                i64col(&|r| r.bytes as i64),
                Arc::new(rows.iter().map(|r| Some(r.facts.has_coords)).collect::<BooleanArray>()),
                table::string_col(rows.iter().map(|r| r.digest.as_str())),
            ],
        )?;
        table::write_output(
            ctx,
            &SKIPPED,
            vec![
                table::string_col(bad.iter().map(|(p, _)| p.to_string_lossy())),
                table::string_col(bad.iter().map(|(_, e)| e.as_str())),
            ],
        )
    }
}
