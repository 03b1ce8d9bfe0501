//! The `runs` table: every run appends one Parquet file under the workspace's `runs/`; `gc` reads
//! back what recent runs used.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result, io};
use crate::exec::RunSummary;
use crate::executor::Job;
use crate::store::Store;

/// Which workflow a run ran, and with what.
#[derive(Debug, Clone, Copy)]
pub struct RunOf<'a> {
    /// The workflow's name.
    pub workflow: &'a str,
    /// Digest of the workflow file's text and its overrides.
    pub digest: &'a str,
    /// The effective settings (after overrides), as JSON, so runs can be told apart in SQL.
    pub settings: &'a str,
}

/// Writes `summary` as `runs/<run_id>.parquet` (atomically), for `hmil-flow query`.
pub fn write_runs(store: &Store, summary: &RunSummary, of: RunOf) -> Result<()> {
    let n = summary.nodes.len();
    let strings =
        |f: &dyn Fn(usize) -> Option<String>| -> ArrayRef { Arc::new((0..n).map(f).collect::<StringArray>()) };
    let ts = |t: chrono::DateTime<chrono::Utc>| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from(vec![t.timestamp_millis(); n]).with_timezone("+00:00"))
    };
    let nodes = &summary.nodes;
    let columns = vec![
        strings(&|_| Some(summary.run_id.clone())),
        strings(&|_| Some(of.workflow.to_owned())),
        strings(&|_| Some(of.digest.to_owned())),
        strings(&|_| Some(of.settings.to_owned())),
        ts(summary.started_at),
        ts(summary.ended_at),
        strings(&|i| Some(nodes[i].id.clone())),
        strings(&|i| Some(nodes[i].stage.clone())),
        strings(&|i| Some(nodes[i].status.as_str().to_owned())),
        strings(&|i| nodes[i].reason.clone()),
        strings(&|i| nodes[i].key.clone()),
        Arc::new(nodes.iter().map(|n| n.seconds).collect::<Float64Array>()),
        strings(&|i| nodes[i].job.as_ref().map(|j| j.id.clone())),
        strings(&|i| nodes[i].job.as_ref().map(|j| j.state.clone())),
    ];
    let path = store.runs_dir().join(format!("{}.parquet", summary.run_id));
    let table_err = |message: String| Error::Table { path: path.clone(), message };
    let batch = RecordBatch::try_new(schemas::runs::schema(), columns).map_err(|e| table_err(e.to_string()))?;
    let tmp = store.runs_dir().join(format!(".{}.tmp", summary.run_id));
    let file = fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| table_err(e.to_string()))?;
    writer.write(&batch).map_err(|e| table_err(e.to_string()))?;
    writer.close().map_err(|e| table_err(e.to_string()))?;
    fs::rename(&tmp, &path).map_err(io(&path))
}

/// The workspace's run files, oldest first (run ids begin with their UTC start time).
fn run_files(store: &Store) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(store.runs_dir())
        .map_err(io(store.runs_dir()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every batch of the run file at `path`.
fn batches(path: &PathBuf) -> Result<Vec<RecordBatch>> {
    let table_err = |e: &dyn std::fmt::Display| Error::Table { path: path.clone(), message: e.to_string() };
    let file = fs::File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| table_err(&e))?
        .build()
        .map_err(|e| table_err(&e))?;
    reader.map(|b| b.map_err(|e| table_err(&e))).collect()
}

/// Per node, how the newest run ran it as a scheduler job (its status there, and the job), for
/// the nodes it ran as one.
pub(crate) fn last_jobs(store: &Store) -> Result<HashMap<String, (String, Job)>> {
    let mut jobs = HashMap::new();
    let Some(path) = run_files(store)?.pop() else { return Ok(jobs) };
    for batch in batches(&path)? {
        let text = |name: &str| batch.column_by_name(name).and_then(|c| c.as_string_opt::<i32>().cloned());
        // Runs recorded before jobs were kept have no job columns.
        let (Some(node), Some(status), Some(id), Some(state)) =
            (text("node_id"), text("status"), text("job_id"), text("job_state"))
        else {
            continue;
        };
        for i in (0..batch.num_rows()).filter(|&i| !id.is_null(i)) {
            let job = Job { id: id.value(i).to_owned(), state: state.value(i).to_owned() };
            jobs.insert(node.value(i).to_owned(), (status.value(i).to_owned(), job));
        }
    }
    Ok(jobs)
}

/// The cache keys that the newest `runs` runs of the workspace executed or found cached.
pub fn recent_keys(store: &Store, runs: usize) -> Result<HashSet<String>> {
    recent_values(store, runs, "cache_key")
}

/// The cluster jobs that the newest `runs` runs of the workspace ran nodes as.
pub fn recent_jobs(store: &Store, runs: usize) -> Result<HashSet<String>> {
    recent_values(store, runs, "job_id")
}

/// The values of text column `name` in the newest `runs` runs (none in runs without it).
fn recent_values(store: &Store, runs: usize, name: &str) -> Result<HashSet<String>> {
    let mut values = HashSet::new();
    for path in run_files(store)?.iter().rev().take(runs) {
        for batch in batches(path)? {
            let Some(column) = batch.column_by_name(name) else { continue };
            let column = column
                .as_string_opt::<i32>()
                .ok_or_else(|| Error::Table { path: path.clone(), message: format!("{name} is not text") })?;
            values.extend(column.iter().flatten().map(str::to_owned));
        }
    }
    Ok(values)
}
