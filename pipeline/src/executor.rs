//! Where a node's stage runs once the engine has decided it must: the seam between deciding
//! (cache lookup, inputs, staging; [`crate::run`]) and doing. [`InProcess`] runs the stage on
//! the calling thread; an executor that runs it elsewhere (a cluster job) writes the same
//! outputs into the same staging directory and reports the same way, and the engine publishes
//! them alike.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

use indicatif::MultiProgress;

use crate::exec::{RunOptions, error_chain};
use crate::stage::{Context, Node};
use crate::store::{KeyParts, Store};

/// A node that must run: its key and why, where its inputs are, and the empty directory its
/// declared outputs are to be written into.
pub struct Work<'a> {
    pub node: &'a Node,
    pub key: String,
    pub parts: KeyParts,
    /// Why it runs, as `status` would say.
    pub why: Vec<String>,
    /// Each declared input by name.
    pub inputs: BTreeMap<String, PathBuf>,
    pub staging: PathBuf,
    /// Run with `--force`: remake its items too.
    pub force: bool,
}

/// How an execution ended.
#[derive(Debug, Clone)]
pub struct Execution {
    /// The stage's warnings, or why it failed (one message, which the engine shows and records).
    pub result: std::result::Result<Vec<String>, String>,
    /// The scheduler job it ran as, if any.
    pub job: Option<Job>,
}

/// A scheduler job a node ran as.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Job {
    /// The scheduler's id for it (a Slurm job id).
    pub id: String,
    /// The state it ended in, as the scheduler names it (`COMPLETED`, `FAILED`, `TIMEOUT`, …).
    pub state: String,
}

impl Execution {
    /// An execution in this process.
    pub fn here(result: std::result::Result<Vec<String>, String>) -> Execution {
        Execution { result, job: None }
    }
}

/// The run a node executes in.
pub struct RunEnv<'a> {
    pub store: &'a Store,
    pub opts: &'a RunOptions,
    pub run_id: &'a str,
    pub progress: &'a MultiProgress,
}

/// Runs a prepared node's stage to its end.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// Called once the run holds the workspace, before any node runs.
    fn begin(&self, _store: &Store) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Runs `work`'s stage, its outputs written into `work.staging`; blocks until it has ended.
    fn execute(&self, work: &Work, env: &RunEnv) -> Execution;
}

/// Runs stages in this process, on the calling thread; a panic is the node's failure. A stage
/// that wants a GPU gets one of the machine's to itself (see [`Context::gpu`]) while it runs,
/// waiting for one to be free, so that nodes run at once never share a GPU by accident.
#[derive(Default)]
pub struct InProcess {
    /// How many GPUs the machine has, asked when a node first wants one (asking starts the GPU
    /// driver, which a run with nothing to do on a GPU should not pay for).
    count: Option<Box<dyn Fn() -> usize + Send + Sync>>,
    /// Once counted: how many GPUs there are, and those not in use; and a signal when one is
    /// given back.
    free: Mutex<Option<(usize, Vec<usize>)>>,
    returned: Condvar,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("free", &self.free).finish_non_exhaustive()
    }
}

impl InProcess {
    /// For a machine whose GPUs (numbered from 0) `count` counts.
    pub fn with_gpus(count: impl Fn() -> usize + Send + Sync + 'static) -> InProcess {
        InProcess { count: Some(Box::new(count)), ..Default::default() }
    }

    /// A free GPU, once there is one (given back when the guard drops); none on a machine
    /// without GPUs.
    fn take_gpu(&self) -> Option<GpuGuard<'_>> {
        let count = self.count.as_ref()?;
        let mut pool = self.free.lock().expect("gpu lock");
        loop {
            let (total, free) = pool.get_or_insert_with(|| {
                let n = count();
                (n, (0..n).rev().collect())
            });
            if *total == 0 {
                return None;
            }
            if let Some(gpu) = free.pop() {
                return Some(GpuGuard { pool: self, gpu });
            }
            pool = self.returned.wait(pool).expect("gpu lock");
        }
    }
}

/// A GPU held by a running node.
struct GpuGuard<'a> {
    pool: &'a InProcess,
    gpu: usize,
}

impl Drop for GpuGuard<'_> {
    fn drop(&mut self) {
        if let Some((_, free)) = self.pool.free.lock().expect("gpu lock").as_mut() {
            free.push(self.gpu);
        }
        self.pool.returned.notify_one();
    }
}

impl Executor for InProcess {
    fn execute(&self, work: &Work, env: &RunEnv) -> Execution {
        let held = if work.node.stage.resources().gpu { self.take_gpu() } else { None };
        let ctx = Context {
            gpu: held.as_ref().map(|g| g.gpu),
            node_id: &work.node.id,
            run_id: env.run_id,
            inputs: work.inputs.clone(),
            out_dir: &work.staging,
            progress: env.progress,
            stat_cache: env.store.stat_cache(),
            interrupt: env.opts.interrupt,
            warnings: Default::default(),
            items: env.store.item_cache(&*work.node.stage, work.force),
        };
        Execution::here(match catch_unwind(AssertUnwindSafe(|| work.node.stage.run(&ctx))) {
            Ok(Ok(())) => Ok(ctx.warnings.into_inner().expect("warnings lock")),
            Ok(Err(e)) => Err(error_chain(&*e)),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                tracing::debug!(node = %work.node.id, "panic: {message}");
                // Native libraries append long backtraces; the first line says what went wrong.
                Err(format!("the stage panicked: {}", message.lines().next().unwrap_or("")))
            }
        })
    }
}
