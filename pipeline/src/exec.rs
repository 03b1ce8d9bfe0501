//! Running a DAG: cache lookups, bounded concurrency, atomic publication, a record of the run.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use chrono::{DateTime, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use petgraph::graph::NodeIndex;
use serde::Serialize;

use crate::dag::Dag;
use crate::error::{Error, Result};
use crate::executor::{Execution, Executor, InProcess, Job, RunEnv, Work};
use crate::explain::{key_parts, miss_reasons};
use crate::stage::{Input, Node};
use crate::store::{Lookup, Manifest, Record, Store};

/// How a node ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Executed,
    Cached,
    Failed,
    /// Not attempted because something upstream failed.
    Skipped,
    /// Stopped by an interruption of the run, or not started because of it.
    Interrupted,
}

impl Status {
    /// Lower-case name, as in the `runs` table and `--summary-json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Executed => "executed",
            Status::Cached => "cached",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Interrupted => "interrupted",
        }
    }
}

/// One node's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct NodeOutcome {
    pub id: String,
    #[serde(skip)]
    pub stage: String,
    pub status: Status,
    pub seconds: f64,
    /// Why it ran (executed), what failed (failed/skipped); none when cached.
    pub reason: Option<String>,
    #[serde(skip)]
    pub key: Option<String>,
    /// What the stage warned about when it made the outputs used (executed now or cached).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The scheduler job the node ran as in this run, if it ran as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
}

impl NodeOutcome {
    /// An outcome of `node` that took no time and has no cache key (yet).
    fn new(node: &Node, status: Status, reason: Option<String>) -> NodeOutcome {
        NodeOutcome {
            id: node.id.clone(),
            stage: node.stage_name.clone(),
            status,
            seconds: 0.0,
            reason,
            key: None,
            warnings: Vec::new(),
            job: None,
        }
    }
}

/// The outcome of a whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_id: String,
    #[serde(skip)]
    pub started_at: DateTime<Utc>,
    #[serde(skip)]
    pub ended_at: DateTime<Utc>,
    pub nodes: Vec<NodeOutcome>,
}

impl RunSummary {
    /// Whether any node failed.
    pub fn failed(&self) -> bool {
        self.nodes.iter().any(|n| n.status == Status::Failed)
    }

    /// Whether the run was interrupted before every node was done.
    pub fn interrupted(&self) -> bool {
        self.nodes.iter().any(|n| n.status == Status::Interrupted)
    }
}

/// What a run does beyond the defaults.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Nodes run at once, at least 1.
    pub jobs: usize,
    /// Stage names or node ids to run even when cached.
    pub force: Vec<String>,
    /// Re-hash every cached output instead of trusting unchanged size and mtime.
    pub verify: bool,
    /// Wait for the workspace lock instead of failing when another run holds it.
    pub wait: bool,
    /// Set (by a signal handler, say) to interrupt the run: no node starts after it is set,
    /// running stages that watch it stop, and finished nodes are published and recorded.
    pub interrupt: &'static AtomicBool,
    /// Where the stages of nodes that must run are run.
    pub executor: Arc<dyn Executor>,
}

/// The interrupt of runs that nothing interrupts.
static NEVER: AtomicBool = AtomicBool::new(false);

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: 1,
            force: Vec::new(),
            verify: false,
            wait: false,
            interrupt: &NEVER,
            executor: Arc::new(InProcess::default()),
        }
    }
}

/// Resolves names given with `flag` (`--force`, `target`: stage names or node ids) to nodes; an
/// unknown name is an error that lists the stages and suggests the nearest.
pub fn resolve(dag: &Dag, names: &[String], flag: &'static str) -> Result<Vec<NodeIndex>> {
    let mut out = Vec::new();
    for name in names {
        let matched = dag.matching(name);
        if matched.is_empty() {
            return Err(Error::UnknownNode { flag, name: name.clone(), known: dag.describe_names(name) });
        }
        out.extend(matched);
    }
    Ok(out)
}

/// A new run id: UTC time plus a short random suffix.
pub fn new_run_id() -> String {
    let now = Utc::now();
    let nonce = crate::digest::hash_bytes(format!("{}{:?}", std::process::id(), Instant::now()).as_bytes());
    format!("{}-{}", now.format("%Y%m%dT%H%M%SZ"), &nonce[..6])
}

/// Runs every node of `dag` that is not cached, holding the workspace lock throughout; each on a
/// thread of its own that hands it to the run's executor.
pub fn run(dag: &Dag, store: &Store, opts: &RunOptions) -> Result<RunSummary> {
    let _lock = store.lock(opts.wait)?;
    // First stop what an earlier driver left running, then clear what it left half-written.
    opts.executor.begin(store).map_err(Error::Executor)?;
    store.clear_staging()?;
    let forced = resolve(dag, &opts.force, "--force")?;
    let run_id = new_run_id();
    let started_at = Utc::now();
    let multi = MultiProgress::new();
    let overall = multi.add(ProgressBar::new(dag.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>24} {bar:30} {pos}/{len} nodes {msg}").expect("valid template"),
    );
    overall.set_prefix("workflow");

    let mut waiting: HashMap<NodeIndex, usize> = dag.order().iter().map(|&i| (i, dag.parents(i).count())).collect();
    let mut ready: VecDeque<NodeIndex> = dag.order().iter().copied().filter(|i| waiting[i] == 0).collect();
    let mut manifests: HashMap<NodeIndex, Arc<Manifest>> = HashMap::new();
    let mut outcomes: HashMap<NodeIndex, NodeOutcome> = HashMap::new();
    let jobs = opts.jobs.max(1);
    let env = RunEnv { store, opts, run_id: &run_id, progress: &multi };

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(NodeIndex, Result<(NodeOutcome, Option<Arc<Manifest>>)>)>();
        let mut running = 0usize;
        loop {
            while running < jobs {
                let Some(idx) = ready.pop_front() else { break };
                let node = dag.node(idx);
                let not_run = if opts.interrupt.load(Ordering::SeqCst) {
                    Some((Status::Interrupted, "the run was interrupted before it started".to_owned()))
                } else {
                    let bad = dag.parents(idx).find(|p| !manifests.contains_key(p));
                    bad.map(|bad| (Status::Skipped, format!("upstream {} did not succeed", dag.node(bad).id)))
                };
                if let Some((status, reason)) = not_run {
                    let outcome = NodeOutcome::new(node, status, Some(reason));
                    finish(dag, idx, outcome, &mut outcomes, &mut waiting, &mut ready, &overall);
                    continue;
                }
                let upstream: HashMap<NodeIndex, Arc<Manifest>> =
                    dag.parents(idx).map(|p| (p, manifests[&p].clone())).collect();
                let (tx, env) = (tx.clone(), &env);
                let force = forced.contains(&idx);
                overall.set_message(node.id.clone());
                scope.spawn(move || {
                    let result = run_node(dag, idx, &upstream, force, env);
                    let _ = tx.send((idx, result));
                });
                running += 1;
            }
            if running == 0 {
                break;
            }
            let (idx, result) = rx.recv().expect("a worker is running");
            running -= 1;
            let (outcome, manifest) = result?;
            if let Some(m) = manifest {
                manifests.insert(idx, m);
            }
            finish(dag, idx, outcome, &mut outcomes, &mut waiting, &mut ready, &overall);
        }
        Ok(())
    })?;
    overall.finish_and_clear();
    store.stat_cache().save()?;
    let nodes = dag.order().iter().map(|i| outcomes.remove(i).expect("every node has an outcome")).collect();
    Ok(RunSummary { run_id, started_at, ended_at: Utc::now(), nodes })
}

fn finish(
    dag: &Dag,
    idx: NodeIndex,
    outcome: NodeOutcome,
    outcomes: &mut HashMap<NodeIndex, NodeOutcome>,
    waiting: &mut HashMap<NodeIndex, usize>,
    ready: &mut VecDeque<NodeIndex>,
    overall: &ProgressBar,
) {
    match outcome.status {
        // The first line only: a stage's full message (a list of bad rows, say) is printed once,
        // at the end of the run.
        Status::Failed => {
            tracing::error!(node = %outcome.id, "failed: {}", first_line(outcome.reason.as_deref().unwrap_or("")))
        }
        Status::Skipped => {
            tracing::warn!(node = %outcome.id, "skipped: {}", outcome.reason.as_deref().unwrap_or(""))
        }
        Status::Executed => {
            tracing::info!(node = %outcome.id, seconds = outcome.seconds, "executed ({})", outcome.reason.as_deref().unwrap_or(""))
        }
        Status::Cached => tracing::debug!(node = %outcome.id, "cached"),
        Status::Interrupted => {
            tracing::warn!(node = %outcome.id, "interrupted: {}", outcome.reason.as_deref().unwrap_or(""))
        }
    }
    outcomes.insert(idx, outcome);
    overall.inc(1);
    for child in dag.children(idx) {
        let left = waiting.get_mut(&child).expect("child is a node");
        *left -= 1;
        if *left == 0 {
            ready.push_back(child);
        }
    }
}

/// Runs or reuses one node: [`prepare`], then the executor's [`Executor::execute`], then
/// [`publish`]. Stage failures become a `Failed` outcome (`Interrupted` when the run was
/// interrupted); only store errors are `Err`.
fn run_node(
    dag: &Dag,
    idx: NodeIndex,
    upstream: &HashMap<NodeIndex, Arc<Manifest>>,
    force: bool,
    env: &RunEnv,
) -> Result<(NodeOutcome, Option<Arc<Manifest>>)> {
    let start = Instant::now();
    let prepared = match prepare(dag, idx, env.store, upstream, force, env.opts.verify)? {
        Prepared::Cached(mut outcome, manifest) => {
            outcome.seconds = start.elapsed().as_secs_f64();
            return Ok((outcome, Some(manifest)));
        }
        Prepared::Unreadable(outcome) => return Ok((outcome, None)),
        Prepared::Run(work) => work,
    };
    tracing::info!(node = %prepared.node.id, "running ({})", prepared.why.join("; "));
    let execution = env.opts.executor.execute(&prepared, env);
    publish(env, prepared, execution, start)
}

/// What [`prepare`] found: the node's outputs are cached, its inputs cannot be read, or it must
/// run.
enum Prepared<'a> {
    Cached(NodeOutcome, Arc<Manifest>),
    Unreadable(NodeOutcome),
    Run(Work<'a>),
}

/// Looks node `idx` up in the cache (recording what it was found with); when it must run,
/// resolves its inputs and gives it an empty staging directory.
fn prepare<'a>(
    dag: &'a Dag,
    idx: NodeIndex,
    store: &Store,
    upstream: &HashMap<NodeIndex, Arc<Manifest>>,
    force: bool,
    verify: bool,
) -> Result<Prepared<'a>> {
    let node = dag.node(idx);
    let mut outcome = NodeOutcome::new(node, Status::Failed, None);
    let parts = match key_parts(dag, idx, store, upstream)? {
        Ok(parts) => parts,
        Err(unreadable) => {
            outcome.reason = Some(unreadable.join("; "));
            return Ok(Prepared::Unreadable(outcome));
        }
    };
    let key = parts.key();
    outcome.key = Some(key.clone());
    let why = match store.lookup(&key, verify)? {
        Lookup::Hit(manifest) if !force => {
            store.write_record(&node.id, &Record { key, parts })?;
            outcome.status = Status::Cached;
            outcome.warnings = manifest.warnings.clone();
            return Ok(Prepared::Cached(outcome, manifest));
        }
        Lookup::Hit(_) => vec!["forced".to_owned()],
        other => miss_reasons(store, &node.id, &parts, &other)?,
    };
    Ok(Prepared::Run(Work {
        node,
        key,
        parts,
        why,
        inputs: input_paths(dag, idx, store, upstream),
        staging: store.staging_dir(&node.id)?,
        force,
    }))
}

/// Holds what the stage wrote to what it declares and, when it holds, publishes it under the
/// node's key and records the node; a failure leaves nothing behind.
fn publish(
    env: &RunEnv,
    work: Work,
    execution: Execution,
    start: Instant,
) -> Result<(NodeOutcome, Option<Arc<Manifest>>)> {
    let node = work.node;
    let mut outcome = NodeOutcome::new(node, Status::Failed, Some(work.why.join("; ")));
    outcome.key = Some(work.key.clone());
    outcome.job = execution.job;
    let outputs = node.stage.outputs();
    let result = execution.result.and_then(|warnings| match crate::declared::mismatch(&work.staging, &outputs) {
        Some(message) => Err(message),
        None => Ok(warnings),
    });
    outcome.seconds = start.elapsed().as_secs_f64();
    let warnings = match result {
        Ok(warnings) => warnings,
        Err(message) => {
            let _ = std::fs::remove_dir_all(&work.staging);
            if env.opts.interrupt.load(Ordering::SeqCst) {
                outcome.status = Status::Interrupted;
            }
            outcome.reason = Some(message);
            return Ok((outcome, None));
        }
    };
    let manifest = Manifest {
        key: work.key.clone(),
        node: node.id.clone(),
        parts: work.parts.clone(),
        outputs: Default::default(),
        run_id: env.run_id.to_owned(),
        created_at: Utc::now().to_rfc3339(),
        seconds: outcome.seconds,
        engine_version: env!("CARGO_PKG_VERSION").to_owned(),
        warnings,
        dir_digests: Default::default(),
    };
    let names: Vec<&str> = outputs.iter().map(|o| o.name).collect();
    let manifest = env.store.publish(&work.staging, manifest, &names, work.force)?;
    env.store.write_record(&node.id, &Record { key: work.key, parts: work.parts })?;
    outcome.status = Status::Executed;
    outcome.warnings = manifest.warnings.clone();
    Ok((outcome, Some(Arc::new(manifest))))
}

/// Where each declared input of node `idx` is: external paths as given, artifacts in the
/// published outputs of `upstream` (which holds every parent).
pub(crate) fn input_paths(
    dag: &Dag,
    idx: NodeIndex,
    store: &Store,
    upstream: &HashMap<NodeIndex, Arc<Manifest>>,
) -> std::collections::BTreeMap<String, std::path::PathBuf> {
    dag.node(idx)
        .stage
        .inputs()
        .into_iter()
        .map(|input| {
            let path = match &input {
                Input::External { path, .. } => path.clone(),
                Input::Artifact { node: up, artifact, .. } => {
                    let up = dag.index_of(up.id()).expect("validated by Dag::new");
                    store.object_dir(&upstream[&up].key).join(artifact)
                }
            };
            (input.name().to_owned(), path)
        })
        .collect()
}

/// The first line of a (possibly multi-line) message.
pub fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("")
}

/// An error and its sources, joined with ": ". A source whose text the message already ends
/// with (an error that prints its own cause) is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("labels.csv: {source}")]
    struct Wraps {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_says_each_cause_once() {
        let e = Wraps { source: std::io::Error::other("no such file") };
        assert_eq!(error_chain(&e), "labels.csv: no such file");
    }
}
