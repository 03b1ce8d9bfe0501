//! Nodes as Slurm jobs. The driver submits each node that must run (and is no driver-side
//! bookkeeping) with `sbatch` as one job that runs an attempt (see [`crate::run_attempt`]) and
//! writes only into the attempt's folder, watches all of the workspace's jobs with one `squeue`
//! per interval, and publishes what the job made once the job says it is done. A job that ends without saying so failed, and the node's
//! reason says how Slurm saw it end (exit code, TIMEOUT, OUT_OF_MEMORY, CANCELLED, NODE_FAIL)
//! with the end of its log, which stays in the attempt's folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use schemas::workflow::{JobResources, Slurm};

use crate::attempt::{Done, JOB_ID, LOG, Request};
use crate::error::{Error, Result, io};
use crate::executor::{Execution, Executor, InProcess, Job, RunEnv, Work};
use crate::store::Store;

/// The folder of an attempt the job writes the node's outputs into: a job writes only into its
/// attempt's folder, so one left running by a killed driver cannot touch a later run's staging.
const OUTPUTS: &str = "outputs";

/// How long a finished job's `done.json` may take to appear (a shared file system's delay).
const GRACE: Duration = Duration::from_secs(20);
/// How long a run waits for the jobs an earlier driver left to end once cancelled (Slurm's
/// KillWait, 30 s by default, and more).
const CANCEL_WAIT: Duration = Duration::from_secs(180);
/// How often a waiting node looks for its job's `done.json`.
const TICK: Duration = Duration::from_millis(100);

/// Runs nodes as Slurm jobs of one workspace.
#[derive(Debug)]
pub struct SlurmExecutor {
    config: Slurm,
    /// What a job runs, followed by `--attempt <folder>`: this program's `exec-node` for the
    /// same workflow and settings.
    command: Vec<String>,
    /// The name of the workspace's jobs, by which they are watched and cancelled.
    job_name: String,
    /// Jobs submitted and not yet ended (at most `max_jobs`).
    slots: (Mutex<usize>, Condvar),
    queue: Mutex<Queue>,
}

/// The workspace's jobs as `squeue` last listed them: id → (state, reason).
#[derive(Debug, Default)]
struct Queue {
    listed: Option<Instant>,
    states: HashMap<String, (String, String)>,
}

/// How long a job may wait in the queue before the log says why it waits.
const PENDING_NOTE: Duration = Duration::from_secs(60);

impl SlurmExecutor {
    /// An executor for the workspace `store` whose jobs run `command --attempt <folder>`.
    pub fn new(config: Slurm, command: Vec<String>, store: &Store) -> Result<SlurmExecutor> {
        let found = Command::new("sbatch").arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Err(Error::Executor(
                "the Slurm executor needs sbatch, squeue and scancel on PATH (run on the cluster's login node)".into(),
            ));
        }
        let root = std::fs::canonicalize(store.root()).map_err(io(store.root()))?;
        let job_name = format!("hmil-flow-{}", &crate::hash_bytes(root.to_string_lossy().as_bytes())[..10]);
        Ok(SlurmExecutor { config, command, job_name, slots: Default::default(), queue: Default::default() })
    }

    /// Writes the attempt's request and submits it: the job id, the attempt's folder, and when.
    fn submit_attempt(&self, work: &Work, env: &RunEnv) -> std::result::Result<(String, PathBuf, Instant), String> {
        let dir = attempt_dir(env.store, &work.node.id).map_err(|e| e.to_string())?;
        let request = Request {
            node: work.node.id.clone(),
            key: work.key.clone(),
            staging: dir.join(OUTPUTS),
            force: work.force,
            run_id: env.run_id.to_owned(),
        };
        request.write(&dir).map_err(|e| e.to_string())?;
        let submitted = Instant::now();
        let id = self.submit(work, &dir)?;
        // Which job ran the attempt, for whoever reads its folder.
        let _ = std::fs::write(dir.join(JOB_ID), &id);
        tracing::info!(node = %work.node.id, "submitted as Slurm job {id} ({})", dir.display());
        Ok((id, dir, submitted))
    }

    fn slot(&self) -> Slot<'_> {
        let (count, freed) = &self.slots;
        let mut n = count.lock().expect("slots lock");
        while *n >= self.config.max_jobs {
            n = freed.wait(n).expect("slots lock");
        }
        *n += 1;
        Slot(self)
    }

    /// Submits the attempt in `dir` for `work`; the job's id.
    fn submit(&self, work: &Work, dir: &Path) -> std::result::Result<String, String> {
        let script = dir.join("job.sh");
        let mut line: Vec<String> = self.command.iter().map(|a| quote(a)).collect();
        line.extend(["--attempt".into(), quote(&dir.to_string_lossy())]);
        let text = format!("#!/bin/sh\n# {}\nexec {}\n", work.node.id, line.join(" "));
        std::fs::write(&script, text).map_err(|e| format!("{}: {e}", script.display()))?;
        let r = self.resources(work);
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={}", self.job_name),
            format!("--output={}", dir.join(LOG).display()),
            "--no-requeue".into(),
            format!("--cpus-per-task={}", r.cpus.unwrap_or(1)),
        ];
        let options =
            [("partition", &self.config.partition), ("account", &self.config.account), ("qos", &self.config.qos)];
        args.extend(options.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("--{k}={v}"))));
        args.extend(r.mem.map(|m| format!("--mem={m}")));
        args.extend(r.time.map(|t| format!("--time={t}")));
        args.extend(r.gpus.filter(|&g| g > 0).map(|g| format!("--gres=gpu:{g}")));
        args.extend(self.config.extra.iter().cloned());
        let out = Command::new("sbatch").args(&args).arg(&script).output().map_err(|e| format!("sbatch: {e}"))?;
        if !out.status.success() {
            return Err(format!("sbatch refused the job: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_owned();
        if id.is_empty() {
            return Err("sbatch printed no job id".into());
        }
        Ok(id)
    }

    /// The node's job resources: the workflow's for its stage, over the stage's defaults (one
    /// CPU, and one GPU for a stage that wants one).
    fn resources(&self, work: &Work) -> JobResources {
        let mut r = self.config.resources.get(&work.node.stage_name).cloned().unwrap_or_default();
        if r.gpus.is_none() && work.node.stage.resources().gpu {
            r.gpus = Some(1);
        }
        r
    }

    /// The workspace's jobs in the queue, with their states and reasons, in one `squeue`; none
    /// when squeue answers with an error.
    fn list(&self) -> std::io::Result<Option<HashMap<String, (String, String)>>> {
        let out = Command::new("squeue")
            .args(["--noheader", "--format=%i %T %r", &format!("--name={}", self.job_name)])
            .output()?;
        Ok(out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let mut fields = l.splitn(3, ' ');
                    let (id, state) = (fields.next()?, fields.next()?);
                    Some((id.to_owned(), (state.to_owned(), fields.next().unwrap_or("").trim().to_owned())))
                })
                .collect()
        }))
    }

    /// Slurm's state of job `id` and the reason it is in it, or none once it has left the
    /// queue. The queue is listed once per poll interval for every node waiting, and again when
    /// `id` was submitted after the last listing.
    fn state(&self, id: &str, submitted: Instant) -> Option<(String, String)> {
        let mut q = self.queue.lock().expect("queue lock");
        let stale = q.listed.is_none_or(|t| t < submitted || t.elapsed().as_secs_f64() >= self.config.poll_seconds);
        if stale {
            match self.list() {
                Ok(Some(states)) => {
                    q.states = states;
                    q.listed = Some(Instant::now());
                }
                // A busy controller: keep what was last seen, and try again next time.
                _ => tracing::warn!("squeue failed; the jobs are looked at again shortly"),
            }
        }
        q.states.get(id).filter(|s| !ENDED.contains(&s.0.as_str())).cloned()
    }

    /// Waits for job `id` of the attempt in `dir` to end.
    fn wait(&self, work: &Work, id: &str, dir: &Path, submitted: Instant, env: &RunEnv) -> Execution {
        let ended_as =
            |state: &str, result| Execution { result, job: Some(Job { id: id.to_owned(), state: state.into() }) };
        let mut ended: Option<Instant> = None;
        // Said once per reason: why the job has waited in the queue so long.
        let mut told = String::new();
        loop {
            // The job writes done.json last and exits: its state is Slurm's for that exit.
            if let Some(done) = Done::read(dir) {
                return match done.failure {
                    None => ended_as("COMPLETED", Ok(done.warnings)),
                    Some(f) => {
                        ended_as("FAILED", Err(format!("{f} (Slurm job {id}; log {})", dir.join(LOG).display())))
                    }
                };
            }
            if env.opts.interrupt.load(Ordering::SeqCst) {
                cancel(&[id]);
                return ended_as("CANCELLED", Err(format!("the run was interrupted; Slurm job {id} was cancelled")));
            }
            match (ended, self.state(id, submitted)) {
                (_, Some((state, reason))) => {
                    ended = None;
                    if state == "PENDING" && submitted.elapsed() > PENDING_NOTE && reason != told {
                        tracing::warn!(
                            "Slurm job {id} ({}) has waited {:.0} s in the queue: {reason} (see squeue -j {id}; sinfo)",
                            dir.file_name().unwrap_or_default().to_string_lossy(),
                            submitted.elapsed().as_secs_f64()
                        );
                        told = reason;
                    }
                }
                (None, None) => ended = Some(Instant::now()),
                (Some(t), None) if t.elapsed() > GRACE => {
                    let (state, why) =
                        why_ended(id, dir, |state| fix(&work.node.stage_name, self.resources(work), state));
                    return ended_as(&state, Err(why));
                }
                (Some(_), None) => {}
            }
            std::thread::sleep(TICK);
        }
    }
}

/// Job states after which a job does nothing more.
const ENDED: [&str; 9] =
    ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"];

/// A job slot, given back when dropped.
struct Slot<'a>(&'a SlurmExecutor);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let (count, freed) = &self.0.slots;
        *count.lock().expect("slots lock") -= 1;
        freed.notify_one();
    }
}

impl Executor for SlurmExecutor {
    /// Cancels jobs an earlier driver of this workspace left behind (killed before it could) and
    /// waits for them to end: their nodes are submitted again, never run twice at once, and
    /// nothing they were writing changes after the run starts.
    fn begin(&self, _: &Store) -> std::result::Result<(), String> {
        let listed = self.list().map_err(|e| format!("squeue: {e}"))?;
        let mut stale: Vec<String> = listed.unwrap_or_default().into_keys().collect();
        stale.sort();
        if !stale.is_empty() {
            tracing::warn!(
                "cancelling {} Slurm job(s) an earlier run of this workspace left: {}",
                stale.len(),
                stale.join(" ")
            );
            cancel(&stale.iter().map(String::as_str).collect::<Vec<_>>());
            // scancel only asks: this run clears what those jobs left half-written once none of
            // them can write any more.
            let start = Instant::now();
            loop {
                let alive = |q: &HashMap<String, (String, String)>| {
                    stale.iter().filter(|id| q.get(*id).is_some_and(|s| !ENDED.contains(&s.0.as_str()))).count()
                };
                match self.list().map_err(|e| format!("squeue: {e}"))? {
                    Some(q) if alive(&q) == 0 => break,
                    _ if start.elapsed() > CANCEL_WAIT => {
                        return Err(format!(
                            "the cancelled Slurm job(s) {} have not ended after {} s; run again once squeue no longer lists them",
                            stale.join(" "),
                            CANCEL_WAIT.as_secs()
                        ));
                    }
                    _ => std::thread::sleep(TICK * 5),
                }
            }
        }
        Ok(())
    }

    fn execute(&self, work: &Work, env: &RunEnv) -> Execution {
        if work.node.stage.resources().in_driver {
            return InProcess::default().execute(work, env);
        }
        let _slot = self.slot();
        match self.submit_attempt(work, env) {
            Ok((id, dir, submitted)) => {
                let mut execution = self.wait(work, &id, &dir, submitted, env);
                // The outputs move into the node's staging folder for the driver to publish; a
                // failed attempt's are removed (its log and request stay).
                let made = dir.join(OUTPUTS);
                if execution.result.is_ok() {
                    let moved = std::fs::remove_dir(&work.staging).and_then(|_| std::fs::rename(&made, &work.staging));
                    if let Err(e) = moved {
                        execution.result = Err(format!("moving {} to {}: {e}", made.display(), work.staging.display()));
                    }
                } else {
                    let _ = std::fs::remove_dir_all(&made);
                }
                execution
            }
            Err(why) => Execution::here(Err(why)),
        }
    }
}

/// A new folder for an attempt of `node`, under the workspace's `attempts/`, kept after the run.
fn attempt_dir(store: &Store, node: &str) -> Result<PathBuf> {
    let safe = crate::store::file_name_of(node);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let dir = store.attempts_dir().join(format!("{safe}-{stamp}"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

fn cancel(ids: &[&str]) {
    if let Err(e) = Command::new("scancel").args(ids).output() {
        tracing::warn!("scancel {}: {e}", ids.join(" "));
    }
}

/// How job `id` ended without saying it was done: Slurm's state, and a message with the state,
/// exit code and reason (from `scontrol`, or `sacct` once the controller has forgotten the job),
/// what to change (`fix`, given the state) and the end of its log.
fn why_ended(id: &str, dir: &Path, fix: impl Fn(&str) -> Option<String>) -> (String, String) {
    let field = |text: &str, key: &str| {
        text.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).map(str::to_owned)
    };
    let shown = Command::new("scontrol").args(["show", "job", "--oneliner", id]).output().ok();
    let shown = shown.filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let (state, exit, reason) = match shown {
        Some(t) => (field(&t, "JobState"), field(&t, "ExitCode"), field(&t, "Reason").filter(|r| r != "None")),
        None => {
            let out = Command::new("sacct").args(["-n", "-P", "-X", "-o", "State,ExitCode", "-j", id]).output().ok();
            let text = out.filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let mut parts = text.as_deref().and_then(|t| t.lines().next()).unwrap_or("").split('|');
            (parts.next().map(str::to_owned), parts.next().map(str::to_owned), None)
        }
    };
    let state = state.filter(|s| !s.is_empty()).unwrap_or_else(|| "UNKNOWN".into());
    let mut why = format!("Slurm job {id} ended {state}");
    if let Some(code) = exit {
        let (code, signal) = code.split_once(':').unwrap_or((&code, "0"));
        why += &match signal {
            "0" => format!(" with exit code {code}"),
            "9" => " killed by signal 9 (SIGKILL: out of memory, or cancelled)".into(),
            s => format!(" killed by signal {s}"),
        };
    }
    if let Some(r) = reason {
        why += &format!(" ({r})");
    }
    why += " before the node was done";
    if let Some(f) = fix(&state) {
        why += &format!(": {f}");
    }
    let log = dir.join(LOG);
    let tail: Vec<String> = std::fs::read_to_string(&log)
        .map(|t| t.lines().rev().take(8).map(str::to_owned).collect::<Vec<_>>().into_iter().rev().collect())
        .unwrap_or_default();
    why += &if tail.is_empty() {
        format!("; its log {} is empty", log.display())
    } else {
        format!("; its log {} ends:\n{}", log.display(), tail.join("\n"))
    };
    (state, why)
}

/// What to change when a job of `stage` that asked for `r` ended `state` for want of a
/// resource: the setting that asks Slurm for more, and what it asked for.
fn fix(stage: &str, r: JobResources, state: &str) -> Option<String> {
    let (key, asked, default) = match state {
        "TIMEOUT" => ("time", r.time, "the partition's default limit"),
        "OUT_OF_MEMORY" => ("mem", r.mem, "the cluster's default"),
        _ => return None,
    };
    let asked = asked.map_or(default.to_owned(), |a| format!("\"{a}\""));
    Some(format!("raise executor.slurm.resources.{stage}.{key} (it asked for {asked})"))
}

/// `arg` quoted for a POSIX shell.
fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_the_shell() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn a_job_out_of_time_or_memory_says_which_setting_to_raise() {
        let r = |time: Option<&str>, mem: Option<&str>| JobResources {
            time: time.map(str::to_owned),
            mem: mem.map(str::to_owned),
            ..Default::default()
        };
        assert_eq!(
            fix("train", r(Some("0:01"), None), "TIMEOUT").as_deref(),
            Some(r#"raise executor.slurm.resources.train.time (it asked for "0:01")"#)
        );
        assert_eq!(
            fix("extract", r(None, None), "OUT_OF_MEMORY").as_deref(),
            Some("raise executor.slurm.resources.extract.mem (it asked for the cluster's default)")
        );
        assert_eq!(fix("train", r(None, Some("8G")), "FAILED"), None);
    }
}
