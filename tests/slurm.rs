//! The Slurm executor against a real single-node Slurm (`scripts/slurm-up` starts one, as root;
//! elsewhere these tests skip, saying how to enable them): the same results as a local run, no
//! job for a cached node, failures that say how Slurm saw them end, and a driver that is
//! interrupted or killed resumes without running a node twice at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

mod common;
use common::{BIN, hmil_flow};

/// One Slurm test of this process at a time: the cluster has one small node.
static CLUSTER: Mutex<()> = Mutex::new(());

/// Whether a local Slurm answers, started by `scripts/slurm-up` if need be (once per process).
/// Where it cannot be started (not root, no apt) the tests skip, saying so; where it was tried
/// and failed they fail, with the daemons' logs.
fn slurm() -> bool {
    static UP: OnceLock<Result<bool, String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-up");
        let out = Command::new(&script).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match out.status.code() {
            Some(0) => Ok(true),
            Some(2) => {
                eprintln!(
                    "SKIPPED: no local Slurm ({said}); run the tests as root on Debian, or start Slurm and put sbatch on PATH"
                );
                Ok(false)
            }
            _ => Err(said),
        }
    });
    match up {
        Ok(up) => *up,
        Err(said) => panic!("scripts/slurm-up could not start a local Slurm:\n{said}"),
    }
}

/// The cluster to oneself, and a small synthetic workflow in a new folder; none (and a message)
/// without a local Slurm.
fn cluster() -> Option<(MutexGuard<'static, ()>, tempfile::TempDir, PathBuf)> {
    let one = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path());
    Some((one, dir, wf))
}

/// A small synthetic workflow in `dir`.
fn setup(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let data_s = data.to_str().unwrap();
    hmil_flow(&["synth", "--out", data_s, "--scale", "0.15", "--mean-instances", "32", "--dim", "32", "--seed", "5"]);
    let wf = dir.join("flow.toml");
    fs::write(
        &wf,
        r#"[workflow]
name = "t"
seed = 3

[dataset]
features = "data/pt_files"
labels = "data/labels.csv"

[labels.hierarchy]
benign = ["N", "PB", "UDH"]
atypical = ["FEA", "ADH"]
malignant = ["DCIS", "IC"]

[splits]
folds = 2
val_frac = 0.15

[train]
epochs = 3
batch_size = 16
device = "cpu"
threads = 1

[executor.slurm]
poll_seconds = 0.2
"#,
    )
    .unwrap();
    wf
}

/// `run` arguments for workspace and results folder `name` under the workflow's folder.
fn args<'a>(wf: &'a Path, name: &str, extra: &[&'a str]) -> Vec<String> {
    let dir = wf.parent().unwrap();
    let mut v = vec![
        "run".to_owned(),
        wf.to_str().unwrap().to_owned(),
        "--set".into(),
        format!("workflow.workspace={}", dir.join(name).join("ws").display()),
        "--set".into(),
        format!("workflow.results={}", dir.join(name).join("results").display()),
        "--summary-json".into(),
        dir.join(name).join("summary.json").display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs the workflow; (success, node id → (status, reason)).
fn run(wf: &Path, name: &str, extra: &[&str]) -> (bool, Vec<(String, String, String)>) {
    let driver =
        Command::new(BIN).args(args(wf, name, extra)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    (finish(driver, wf, name), summary(wf, name))
}

/// Waits for a driver to end, at most [`PATIENCE`]: a run that takes longer is killed and the
/// test fails with what the cluster says (a job that never starts would otherwise hang the suite).
fn finish(mut driver: Child, wf: &Path, name: &str) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = driver.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = driver.kill();
            let _ = driver.wait();
            panic!("the run `{name}` did not end within {PATIENCE:?}\n{}", cluster_report(wf, name));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Longest a test waits for a run or a job.
const PATIENCE: Duration = Duration::from_secs(300);

/// What the cluster and the workspace's job logs say, for a test that timed out.
fn cluster_report(wf: &Path, name: &str) -> String {
    let sh = |line: &str| {
        let out = Command::new("sh").args(["-c", line]).output().unwrap();
        format!("$ {line}\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    };
    let attempts = wf.parent().unwrap().join(name).join("ws/attempts");
    [
        sh("squeue -a -o '%i %j %T %r %M %l'"),
        sh("sinfo -N -o '%N %T %c %m %E'"),
        sh("scontrol show node"),
        sh("tail -n 40 /var/log/slurm/slurmctld.log"),
        sh("tail -n 40 /var/log/slurm/slurmd.log"),
        sh(&format!("for f in {}/*/log.txt; do echo \"== $f\"; tail -n 15 \"$f\"; done", attempts.display())),
    ]
    .join("\n")
}

fn summary(wf: &Path, name: &str) -> Vec<(String, String, String)> {
    let path = wf.parent().unwrap().join(name).join("summary.json");
    let json: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    json["nodes"].as_array().unwrap().iter().map(|n| (text(&n["id"]), text(&n["status"]), text(&n["reason"]))).collect()
}

fn attempts(wf: &Path, name: &str) -> usize {
    fs::read_dir(wf.parent().unwrap().join(name).join("ws/attempts")).map_or(0, |d| d.count())
}

fn read(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap()).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Ids of the jobs of workspace `name` in `state` (read from its attempts' `job_id`: other
/// processes may use the cluster too).
fn jobs(wf: &Path, name: &str, state: &str) -> Vec<String> {
    let attempts = wf.parent().unwrap().join(name).join("ws/attempts");
    let ours: Vec<String> = fs::read_dir(attempts)
        .map(|d| d.flatten().filter_map(|e| fs::read_to_string(e.path().join("job_id")).ok()).collect())
        .unwrap_or_default();
    let out = Command::new("squeue").args(["--noheader", "--format=%i", "--states", state]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|id| ours.iter().any(|o| o == id))
        .map(str::to_owned)
        .collect()
}

fn wait_for(wf: &Path, name: &str, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", cluster_report(wf, name));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn(wf: &Path, name: &str) -> Child {
    Command::new(BIN)
        .args(args(wf, name, &["--executor", "slurm"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn slurm_gives_the_local_results_and_a_second_run_submits_nothing() {
    let Some((_one, dir, wf)) = cluster() else { return };
    assert!(run(&wf, "local", &[]).0);
    let (ok, nodes) = run(&wf, "slurm", &["--executor", "slurm"]);
    assert!(ok, "{nodes:?}");
    // pack, and train, evaluate and heatmaps per fold, as jobs; index, join, split and report
    // in the driver.
    assert_eq!(attempts(&wf, "slurm"), 7);
    let metrics = |name: &str| read(&dir.path().join(name).join("results/metrics.parquet"));
    assert_eq!(metrics("slurm"), metrics("local"), "the same metrics, bit for bit");
    // Each job is in the runs table and in `status`.
    let workspace = format!("workflow.workspace={}", dir.path().join("slurm/ws").display());
    let wf_s = wf.to_str().unwrap();
    let sql = "SELECT job_state, count(*) AS n FROM runs WHERE job_id IS NOT NULL GROUP BY job_state";
    let jobs = hmil_flow(&["query", wf_s, sql, "--set", &workspace, "--format", "csv"]);
    assert_eq!(jobs.trim(), "job_state,n\nCOMPLETED,7", "{jobs}");
    let status = hmil_flow(&["status", wf_s, "--set", &workspace]);
    assert_eq!(status.matches("last run: executed as Slurm job ").count(), 7, "{status}");
    let (ok, again) = run(&wf, "slurm", &["--executor", "slurm"]);
    assert!(ok && again.iter().all(|n| n.1 == "cached"), "{again:?}");
    assert_eq!(attempts(&wf, "slurm"), 7, "no job for a cached node");
    // gc keeps the folders (logs) of the jobs a kept run ran, and removes the others.
    let kept = hmil_flow(&["gc", wf_s, "--set", &workspace, "--keep-runs", "2"]);
    assert!(kept.contains(" 0 cluster job folder(s)") && attempts(&wf, "slurm") == 7, "{kept}");
    let removed = hmil_flow(&["gc", wf_s, "--set", &workspace, "--keep-runs", "1"]);
    assert!(removed.contains(" 7 cluster job folder(s)") && attempts(&wf, "slurm") == 0, "{removed}");
}

#[test]
fn a_failed_or_cancelled_job_fails_its_node_saying_why_and_skips_its_dependants() {
    let Some((_one, dir, wf)) = cluster() else { return };
    // The stage fails in the job: its message comes back with the job and its log. (A GPU
    // stage asks for a GPU by default, which this cluster has not: sbatch would refuse it.)
    let no_gpu = "executor.slurm.resources.train.gpus=0";
    let (ok, nodes) = run(&wf, "bad", &["--executor", "slurm", "--set", "train.device=\"cuda:99\"", "--set", no_gpu]);
    assert!(!ok);
    let train = nodes.iter().find(|n| n.0 == "train[fold=0]").unwrap();
    assert_eq!(train.1, "failed");
    assert!(train.2.contains("cuda:99 is not available") && train.2.contains("Slurm job"), "{}", train.2);
    let log = train.2.rsplit("log ").next().unwrap().trim_end_matches(')');
    assert!(Path::new(log).is_file(), "the job's log stays: {log}");
    assert!(nodes.iter().any(|n| n.0 == "evaluate[fold=0]" && n.1 == "skipped"), "{nodes:?}");

    // A job whose program exits non-zero before it can say why (here: a setting only the jobs
    // see): Slurm's state and exit code, and the end of its log.
    let bad_env = r#"executor.slurm.extra=["--export=ALL,HMIL_FLOW_SET=train.bogus=1"]"#;
    let (ok, nodes) = run(&wf, "crashed", &["--executor", "slurm", "--set", bad_env]);
    assert!(!ok);
    let pack = nodes.iter().find(|n| n.0 == "pack_features").unwrap();
    assert!(pack.2.contains("ended FAILED with exit code 1") && pack.2.contains("bogus"), "{}", pack.2);

    // A job cancelled while it runs: the node says so, and what needs it is skipped.
    let driver = spawn(&wf, "cancelled");
    wait_for(&wf, "cancelled", "a running job", || !jobs(&wf, "cancelled", "RUNNING").is_empty());
    let victim = jobs(&wf, "cancelled", "RUNNING")[0].clone();
    Command::new("scancel").arg(&victim).status().unwrap();
    assert!(!finish(driver, &wf, "cancelled"));
    let nodes = summary(&wf, "cancelled");
    let failed: Vec<_> = nodes.iter().filter(|n| n.1 == "failed").collect();
    assert_eq!(failed.len(), 1, "{nodes:?}");
    assert!(failed[0].2.contains(&format!("Slurm job {victim} ended CANCELLED")), "{}", failed[0].2);
    let workspace = format!("workflow.workspace={}", dir.path().join("cancelled/ws").display());
    let status = hmil_flow(&["status", wf.to_str().unwrap(), "--set", &workspace]);
    assert!(status.contains(&format!("last run: failed as Slurm job {victim} (CANCELLED)")), "{status}");
    assert!(nodes.iter().any(|n| n.0 == "report" && n.1 == "skipped"), "{nodes:?}");
}

#[test]
fn an_interrupted_or_killed_driver_resumes_without_duplicating_a_node() {
    let Some((_one, dir, wf)) = cluster() else { return };
    // Ctrl-C: the run's jobs are cancelled and its nodes recorded as interrupted.
    let driver = spawn(&wf, "ws");
    wait_for(&wf, "ws", "a running job", || !jobs(&wf, "ws", "RUNNING").is_empty());
    Command::new("kill").args(["-INT", &driver.id().to_string()]).status().unwrap();
    assert!(!finish(driver, &wf, "ws"));
    assert!(summary(&wf, "ws").iter().any(|n| n.1 == "interrupted"));
    wait_for(&wf, "ws", "the jobs to be cancelled", || jobs(&wf, "ws", "PENDING,RUNNING").is_empty());

    // SIGKILL: the jobs outlive the driver; the next run cancels them and submits their nodes again.
    let mut driver = spawn(&wf, "ws");
    wait_for(&wf, "ws", "a running job", || !jobs(&wf, "ws", "RUNNING").is_empty());
    Command::new("kill").args(["-KILL", &driver.id().to_string()]).status().unwrap();
    driver.wait().unwrap();
    let orphans = jobs(&wf, "ws", "PENDING,RUNNING");
    assert!(!orphans.is_empty(), "the killed driver's jobs are still there");
    let (ok, nodes) = run(&wf, "ws", &["--executor", "slurm"]);
    assert!(ok, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.1 == "executed" || n.1 == "cached"), "{nodes:?}");
    assert!(jobs(&wf, "ws", "PENDING,RUNNING").is_empty());
    let (ok, local) = run(&wf, "local", &[]);
    assert!(ok);
    let metrics = |name: &str| read(&dir.path().join(name).join("results/metrics.parquet"));
    assert_eq!(metrics("ws"), metrics("local"), "{local:?}");
}

#[test]
fn a_node_over_its_time_fails_as_timeout() {
    let Some((_one, _dir, wf)) = cluster() else { return };
    // Slurm's shortest limit is a minute, and it ends the job within about a minute more.
    let settings = ["--set", "train.epochs=100000000", "--set", "executor.slurm.resources.train.time=\"0:01\""];
    let mut extra = vec!["train[fold=0]", "--executor", "slurm"];
    extra.extend(settings);
    let (ok, nodes) = run(&wf, "slow", &extra);
    assert!(!ok);
    let train = nodes.iter().find(|n| n.0 == "train[fold=0]").unwrap();
    assert!(train.2.contains("ended TIMEOUT") && train.2.contains("TimeLimit"), "{}", train.2);
    assert!(train.2.contains(r#"raise executor.slurm.resources.train.time (it asked for "0:01")"#), "{}", train.2);
    // The end of the job's log: the training's last epochs (Slurm's own "DUE TO TIME LIMIT" line
    // is usually among them, but not always).
    let (_, tail) = train.2.split_once("log.txt ends:\n").unwrap_or_else(|| panic!("no log in: {}", train.2));
    assert!(tail.lines().any(|l| l.contains("INFO epoch ") && l.contains("node=\"train[fold=0]\"")), "{tail}");
}
