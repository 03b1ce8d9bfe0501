//! An attempt: one execution of a node away from the driver (in a Slurm job). The driver writes
//! `request.json` into the attempt's folder; the job rebuilds the DAG from the same workflow,
//! checks that the node's cache key is still the one requested, runs the stage into the
//! attempt's `outputs/` folder, and writes `done.json` last (write, fsync, rename). That file is
//! the truth about the attempt; the scheduler only says whether the job is alive and why it died.
//! The job never writes the store: the driver publishes what it made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressDrawTarget};
use serde::{Deserialize, Serialize};

use crate::dag::Dag;
use crate::error::{Error, Result, io};
use crate::exec::{RunOptions, input_paths};
use crate::executor::{Executor, InProcess, RunEnv, Work};
use crate::explain::key_parts;
use crate::fsutil::write_atomic;
use crate::store::{Lookup, Store};

/// What the driver asks of an attempt.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub node: String,
    pub key: String,
    pub staging: PathBuf,
    pub force: bool,
    pub run_id: String,
}

/// How an attempt ended, as it says itself.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Done {
    pub warnings: Vec<String>,
    /// Why it failed; none when it succeeded.
    pub failure: Option<String>,
    pub seconds: f64,
}

pub(crate) const REQUEST: &str = "request.json";
pub(crate) const DONE: &str = "done.json";
/// The job's standard output and error.
pub(crate) const LOG: &str = "log.txt";
/// The id of the job that ran the attempt, as the driver got it from the scheduler.
pub(crate) const JOB_ID: &str = "job_id";

impl Request {
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(REQUEST), &serde_json::to_vec_pretty(self).expect("request serialises"))
    }
}

impl Done {
    /// The attempt's `done.json`, once it is there.
    pub(crate) fn read(dir: &Path) -> Option<Done> {
        serde_json::from_slice(&std::fs::read(dir.join(DONE)).ok()?).ok()
    }
}

/// Runs the attempt in `dir` (in the job): the node's stage into the requested outputs folder,
/// then `done.json`. A failure is recorded there too, and returned.
pub fn run_attempt(dag: &Dag, store: &Store, dir: &Path) -> Result<()> {
    let start = Instant::now();
    let path = dir.join(REQUEST);
    let request: Request = serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)
        .map_err(|e| Error::Attempt(format!("{}: {e}", path.display())))?;
    let outcome = execute(dag, store, &request);
    let failure = outcome.as_ref().err().cloned();
    let done = Done {
        warnings: outcome.unwrap_or_default(),
        failure: failure.clone(),
        seconds: start.elapsed().as_secs_f64(),
    };
    write_atomic(&dir.join(DONE), &serde_json::to_vec_pretty(&done).expect("done serialises"))?;
    failure.map_or(Ok(()), |f| Err(Error::Attempt(f)))
}

fn execute(dag: &Dag, store: &Store, request: &Request) -> std::result::Result<Vec<String>, String> {
    let idx = dag.index_of(&request.node).ok_or_else(|| {
        format!("the workflow has no node `{}` any more; it changed after the node was submitted", request.node)
    })?;
    let mut upstream = HashMap::new();
    for parent in dag.parents(idx) {
        let id = &dag.node(parent).id;
        let published =
            store.record(id).map_err(|e| e.to_string())?.and_then(|record| match store.lookup(&record.key, false) {
                Ok(Lookup::Hit(manifest)) => Some(manifest),
                _ => None,
            });
        upstream.insert(parent, published.ok_or_else(|| format!("upstream {id} has no published outputs"))?);
    }
    let parts = key_parts(dag, idx, store, &upstream).map_err(|e| e.to_string())?.map_err(|why| why.join("; "))?;
    if parts.key() != request.key {
        return Err(format!(
            "the node's inputs or settings changed after it was submitted (key {} now, {} then); run the workflow again",
            &parts.key()[..12],
            &request.key[..12.min(request.key.len())]
        ));
    }
    std::fs::create_dir_all(&request.staging).map_err(|e| format!("{}: {e}", request.staging.display()))?;
    let work = Work {
        node: dag.node(idx),
        key: request.key.clone(),
        parts,
        why: Vec::new(),
        inputs: input_paths(dag, idx, store, &upstream),
        staging: request.staging.clone(),
        force: request.force,
    };
    // The job's log is a file: progress bars would only fill it.
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
    let opts = RunOptions::default();
    let env = RunEnv { store, opts: &opts, run_id: &request.run_id, progress: &progress };
    // Slurm gives the job its GPUs (CUDA_VISIBLE_DEVICES): a stage on "auto" takes the first.
    InProcess::default().execute(&work, &env).result
}
