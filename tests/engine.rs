//! The engine's promises, shown with small test-only stages: caching, precise invalidation,
//! damage detection, resuming after a kill, and safety under concurrent runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pipeline::{Context, Dag, Error, Freshness, Input, Node, Output, RunOptions, Stage, StageError, Status, Store};
use schemas::artifacts::Blob;

/// Each test stage's one output.
const OUT: Blob = Blob { file: "out.txt" };

/// Concatenates its inputs and a `tag` parameter into `out.txt`; optionally waits for a file first.
struct Concat {
    inputs: Vec<Input>,
    tag: String,
    wait_for: Option<PathBuf>,
}

impl Stage for Concat {
    fn kind(&self) -> &str {
        "concat"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "tag": self.tag })
    }
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&OUT).into()]
    }
    fn run(&self, ctx: &Context) -> Result<(), StageError> {
        let mut text = String::new();
        for input in &self.inputs {
            text.push_str(&fs::read_to_string(ctx.input(input.name()))?);
        }
        text.push_str(&self.tag);
        // Write part of the output before waiting, so a kill leaves a partial file behind.
        fs::write(ctx.output(OUT.file), &text[..text.len() / 2])?;
        if let Some(flag) = &self.wait_for {
            while !flag.exists() {
                if ctx.interrupted() {
                    return Err("stopped while waiting".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        fs::write(ctx.output(OUT.file), text)?;
        Ok(())
    }
}

fn node(name: &str, inputs: Vec<Input>, tag: &str, wait: Option<PathBuf>) -> Node {
    Node::new(name, None, Arc::new(Concat { inputs, tag: tag.into(), wait_for: wait }))
}

/// Two sources (files a.txt, b.txt) → ab → abc, and b → bd; `c` and `d` in parallel branches.
fn workflow(dir: &Path, tag_ab: &str, wait_for: Option<PathBuf>) -> Dag {
    Dag::new(nodes(dir, tag_ab, wait_for)).unwrap()
}

/// The nodes of [`workflow`].
fn nodes(dir: &Path, tag_ab: &str, wait_for: Option<PathBuf>) -> Vec<Node> {
    let ab = node(
        "ab",
        vec![Input::external("a", dir.join("a.txt")), Input::external("b", dir.join("b.txt"))],
        tag_ab,
        None,
    );
    let abc = node("abc", vec![Input::artifact("ab", &ab.handle(), &OUT)], "c", wait_for);
    vec![ab, abc, node("bd", vec![Input::external("b", dir.join("b.txt"))], "d", None)]
}

const RUN_OF: pipeline::RunOf = pipeline::RunOf { workflow: "test", digest: "digest", settings: "{\"tag\": \"x\"}" };

fn setup() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "A").unwrap();
    fs::write(dir.path().join("b.txt"), "B").unwrap();
    let store = Store::open(&dir.path().join(".hmil-flow")).unwrap();
    (dir, store)
}

fn statuses(summary: &pipeline::RunSummary) -> Vec<(String, Status)> {
    summary.nodes.iter().map(|n| (n.id.clone(), n.status)).collect()
}

fn status_of(summary: &pipeline::RunSummary, id: &str) -> Status {
    summary.nodes.iter().find(|n| n.id == id).unwrap().status
}

fn output(store: &Store, summary: &pipeline::RunSummary, id: &str) -> String {
    let key = summary.nodes.iter().find(|n| n.id == id).unwrap().key.clone().unwrap();
    fs::read_to_string(store.object_dir(&key).join("out.txt")).unwrap()
}

#[test]
fn second_run_executes_nothing() {
    let (dir, store) = setup();
    let dag = workflow(dir.path(), "x", None);
    let first = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert!(first.nodes.iter().all(|n| n.status == Status::Executed), "{first:?}");
    assert_eq!(output(&store, &first, "abc"), "ABxc");
    let second = pipeline::run(&dag, &store, &RunOptions { jobs: 3, ..Default::default() }).unwrap();
    assert!(second.nodes.iter().all(|n| n.status == Status::Cached), "{second:?}");
    assert!(pipeline::status(&dag, &store, &[], false).unwrap().iter().all(|s| s.freshness == Freshness::Fresh));
}

#[test]
fn changed_input_reruns_exactly_its_downstream() {
    let (dir, store) = setup();
    let dag = workflow(dir.path(), "x", None);
    pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    fs::write(dir.path().join("a.txt"), "A2").unwrap();
    let status = pipeline::status(&dag, &store, &[], false).unwrap();
    assert_eq!(status[0].freshness, Freshness::Stale(vec!["input a.txt changed".into()]));
    assert_eq!(status[1].freshness, Freshness::Stale(vec!["upstream ab will rerun".into()]));
    assert_eq!(status[2].freshness, Freshness::Fresh);
    let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert_eq!(
        statuses(&summary),
        [("ab".into(), Status::Executed), ("abc".into(), Status::Executed), ("bd".into(), Status::Cached)]
    );
    assert_eq!(summary.nodes[0].reason.as_deref(), Some("input a.txt changed"));
    assert_eq!(summary.nodes[1].reason.as_deref(), Some("input out.txt of ab changed"));
    assert_eq!(output(&store, &summary, "abc"), "A2Bxc");
}

#[test]
fn changed_param_reruns_node_and_dependents_and_reverting_hits_cache() {
    let (dir, store) = setup();
    pipeline::run(&workflow(dir.path(), "x", None), &store, &RunOptions::default()).unwrap();
    let dag = workflow(dir.path(), "y", None);
    let status = pipeline::status(&dag, &store, &[], false).unwrap();
    assert_eq!(status[0].freshness, Freshness::Stale(vec!["param tag \"x\"→\"y\"".into()]));
    let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert_eq!(
        statuses(&summary),
        [("ab".into(), Status::Executed), ("abc".into(), Status::Executed), ("bd".into(), Status::Cached)]
    );
    let back = pipeline::run(&workflow(dir.path(), "x", None), &store, &RunOptions::default()).unwrap();
    assert!(back.nodes.iter().all(|n| n.status == Status::Cached), "{back:?}");
}

#[test]
fn unchanged_output_stops_propagation_and_force_reruns() {
    let (dir, store) = setup();
    let dag = workflow(dir.path(), "x", None);
    pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    let forced = pipeline::run(&dag, &store, &RunOptions { force: vec!["ab".into()], ..Default::default() }).unwrap();
    assert_eq!(status_of(&forced, "ab"), Status::Executed);
    assert_eq!(forced.nodes[0].reason.as_deref(), Some("forced"));
    // Same bytes out, so its dependent stays cached.
    assert_eq!(status_of(&forced, "abc"), Status::Cached);
    let err = pipeline::run(&dag, &store, &RunOptions { force: vec!["nope".into()], ..Default::default() });
    assert!(matches!(&err, Err(Error::UnknownNode { known, .. }) if known.contains("ab, abc, bd")), "{err:?}");
}

#[test]
fn damaged_output_is_detected_and_recomputed() {
    let (dir, store) = setup();
    let dag = workflow(dir.path(), "x", None);
    let first = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    let key = first.nodes[1].key.clone().unwrap();
    let path = store.object_dir(&key).join("out.txt");
    fs::write(&path, "garbage").unwrap();
    let status = pipeline::status(&dag, &store, &[], false).unwrap();
    assert_eq!(status[1].freshness, Freshness::Stale(vec!["output out.txt does not match its digest".into()]));
    let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert_eq!(status_of(&summary, "abc"), Status::Executed);
    assert_eq!(fs::read_to_string(&path).unwrap(), "ABxc");
    fs::remove_file(&path).unwrap();
    let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert_eq!(summary.nodes[1].reason.as_deref(), Some("output out.txt is missing"));
}

#[test]
fn failure_skips_dependents_but_not_independent_nodes() {
    let (dir, store) = setup();
    fs::remove_file(dir.path().join("a.txt")).unwrap();
    let summary = pipeline::run(&workflow(dir.path(), "x", None), &store, &RunOptions::default()).unwrap();
    assert!(summary.failed());
    assert_eq!(
        statuses(&summary),
        [("ab".into(), Status::Failed), ("abc".into(), Status::Skipped), ("bd".into(), Status::Executed)]
    );
    assert!(summary.nodes[0].reason.as_deref().unwrap().contains("a.txt"), "{summary:?}");
}

/// Child side of `killed_run_resumes`: runs a workflow whose `abc` waits forever.
#[test]
#[ignore = "helper: started as a child process by killed_run_resumes"]
fn child_run_blocks_in_abc() {
    let dir = PathBuf::from(std::env::var("ENGINE_TEST_DIR").unwrap());
    let store = Store::open(&dir.join(".hmil-flow")).unwrap();
    let never = dir.join("never-created");
    pipeline::run(&workflow(&dir, "x", Some(never)), &store, &RunOptions::default()).unwrap();
}

#[test]
fn killed_run_resumes() {
    let (dir, store) = setup();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_run_blocks_in_abc", "--ignored", "--nocapture"])
        .env("ENGINE_TEST_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until `abc` is midway: its partial output sits in staging.
    let staging = dir.path().join(".hmil-flow/staging");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        let found = fs::read_dir(&staging).unwrap().flatten().map(|e| e.path().join("out.txt")).find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "child never reached abc");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(partial.exists(), "the killed stage left its partial output in staging");

    let dag = workflow(dir.path(), "x", None);
    let status = pipeline::status(&dag, &store, &[], false).unwrap();
    assert_eq!(status[0].freshness, Freshness::Fresh, "ab finished before the kill");
    assert!(matches!(status[1].freshness, Freshness::Stale(_)), "the partial abc is not accepted");
    let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
    assert_eq!(status_of(&summary, "ab"), Status::Cached);
    assert_eq!(status_of(&summary, "abc"), Status::Executed);
    assert_eq!(output(&store, &summary, "abc"), "ABxc");
    assert!(!partial.exists(), "staging left by the killed run is cleared");
}

#[test]
fn concurrent_runs_are_refused_or_serialised() {
    let (dir, store) = setup();
    let flag = dir.path().join("release");
    let store = Arc::new(store);
    let blocking = {
        let (dir, store, flag) = (dir.path().to_path_buf(), store.clone(), flag.clone());
        std::thread::spawn(move || pipeline::run(&workflow(&dir, "x", Some(flag)), &store, &RunOptions::default()))
    };
    // Wait for the first run to hold the lock (it is inside `abc`).
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.record("ab").unwrap().is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = Store::open(&dir.path().join(".hmil-flow")).unwrap();
    let refused = pipeline::run(&workflow(dir.path(), "x", None), &second, &RunOptions::default());
    assert!(matches!(&refused, Err(Error::Locked { holder, .. }) if holder.starts_with("pid")), "{refused:?}");
    let waiting = {
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let store = Store::open(&dir.join(".hmil-flow")).unwrap();
            pipeline::run(&workflow(&dir, "x", None), &store, &RunOptions { wait: true, ..Default::default() })
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    fs::write(&flag, "").unwrap();
    let first = blocking.join().unwrap().unwrap();
    let after = waiting.join().unwrap().unwrap();
    assert!(first.nodes.iter().all(|n| n.status == Status::Executed));
    assert!(after.nodes.iter().all(|n| n.status == Status::Cached), "the waiting run reuses the first's outputs");
    let verified = pipeline::status(&workflow(dir.path(), "x", None), &store, &[], true).unwrap();
    assert!(verified.iter().all(|s| s.freshness == Freshness::Fresh), "{verified:?}");
}

#[test]
fn runs_are_recorded_as_parquet() {
    let (dir, store) = setup();
    let summary = pipeline::run(&workflow(dir.path(), "x", None), &store, &RunOptions::default()).unwrap();
    pipeline::write_runs(&store, &summary, RUN_OF).unwrap();
    let path = store.runs_dir().join(format!("{}.parquet", summary.run_id));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    assert!(text.contains("executed") && text.contains("abc") && text.contains(&summary.run_id), "{text}");
    assert!(text.contains(r#"{"tag": "x"}"#), "the settings are recorded: {text}");
}

#[test]
fn interrupted_run_keeps_finished_nodes_and_records_the_rest() {
    let (dir, store) = setup();
    // `workflow` plus abcd after abc, whose wait only an interruption ends.
    let dag = |wait: Option<PathBuf>| {
        let mut all = nodes(dir.path(), "x", wait);
        let abc = all[1].handle();
        all.push(node("abcd", vec![Input::artifact("abc", &abc, &OUT)], "d", None));
        Dag::new(all).unwrap()
    };
    let interrupt: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let interrupter = {
        let staging = dir.path().join(".hmil-flow/staging");
        let records = dir.path().join(".hmil-flow/nodes");
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            // abc has started once its partial output is in staging; bd, which runs beside it,
            // has finished once its record is published (on a busy machine it may start later).
            let abc_started =
                || fs::read_dir(&staging).is_ok_and(|d| d.flatten().any(|e| e.path().join("out.txt").exists()));
            let bd_done = || {
                fs::read_dir(&records)
                    .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("bd-")))
            };
            while !(abc_started() && bd_done()) {
                assert!(Instant::now() < deadline, "abc never started, or bd never finished");
                std::thread::sleep(Duration::from_millis(10));
            }
            interrupt.store(true, Ordering::SeqCst);
        })
    };
    let opts = RunOptions { interrupt, ..Default::default() };
    let summary = pipeline::run(&dag(Some(dir.path().join("never-created"))), &store, &opts).unwrap();
    interrupter.join().unwrap();
    assert!(summary.interrupted() && !summary.failed());
    assert_eq!(status_of(&summary, "ab"), Status::Executed);
    assert_eq!(status_of(&summary, "bd"), Status::Executed);
    assert_eq!(status_of(&summary, "abc"), Status::Interrupted);
    assert_eq!(status_of(&summary, "abcd"), Status::Interrupted);
    let reason = |id: &str| summary.nodes.iter().find(|n| n.id == id).unwrap().reason.clone().unwrap();
    assert_eq!(reason("abc"), "stopped while waiting");
    assert_eq!(reason("abcd"), "the run was interrupted before it started");
    pipeline::write_runs(&store, &summary, RUN_OF).unwrap();
    assert!(store.runs_dir().join(format!("{}.parquet", summary.run_id)).is_file(), "the interrupted run is recorded");

    let again = pipeline::run(&dag(None), &store, &RunOptions::default()).unwrap();
    let got: Vec<Status> = ["ab", "bd", "abc", "abcd"].iter().map(|id| status_of(&again, id)).collect();
    assert_eq!(got, [Status::Cached, Status::Cached, Status::Executed, Status::Executed]);
    assert_eq!(output(&store, &again, "abcd"), "ABxcd");
}

/// Declares a table of one Int64 column `n`, and writes `n` as strings.
struct MisdeclaredTable;

const TABLE: schemas::artifacts::Table = schemas::artifacts::Table { file: "t.parquet", schema: one_int };

fn one_int() -> arrow::datatypes::SchemaRef {
    Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "n",
        arrow::datatypes::DataType::Int64,
        false,
    )]))
}

impl Stage for MisdeclaredTable {
    fn kind(&self) -> &str {
        "misdeclared"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&TABLE).into()]
    }
    fn run(&self, ctx: &Context) -> Result<(), StageError> {
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Utf8, false)]));
        let column = Arc::new(arrow::array::StringArray::from(vec!["1"]));
        let batch = arrow::array::RecordBatch::try_new(schema.clone(), vec![column])?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(fs::File::create(ctx.output(TABLE.file))?, schema, None)?;
        writer.write(&batch)?;
        writer.close()?;
        Ok(())
    }
}

#[test]
fn a_table_unlike_its_declared_schema_fails_its_node_and_is_not_published() {
    let (dir, store) = setup();
    let dag = Dag::new(vec![Node::new("m", None, Arc::new(MisdeclaredTable))]).unwrap();
    for _ in 0..2 {
        let summary = pipeline::run(&dag, &store, &RunOptions::default()).unwrap();
        let outcome = &summary.nodes[0];
        assert_eq!(outcome.status, Status::Failed, "never cached: it fails on every run");
        let why = outcome.reason.as_deref().unwrap();
        assert!(why.contains("t.parquet") && why.contains("column 1 is `n` Utf8, not `n` Int64"), "{why}");
    }
    let objects = fs::read_dir(dir.path().join(".hmil-flow/objects")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(objects, 0, "nothing published");
}

/// Which GPU a node was given, and when it started and ended.
type GpuLog = Arc<std::sync::Mutex<Vec<(Option<usize>, Instant, Instant)>>>;

/// Records which GPU it was given and when it ran. Every one has the same key, so runs of
/// several at once also show that the first to finish publishes and the others reuse it.
struct OnGpu {
    wants_gpu: bool,
    log: GpuLog,
}

impl Stage for OnGpu {
    fn kind(&self) -> &str {
        "on_gpu"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&OUT).into()]
    }
    fn resources(&self) -> pipeline::Resources {
        pipeline::Resources { gpu: self.wants_gpu, in_driver: false }
    }
    fn run(&self, ctx: &Context) -> Result<(), StageError> {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(150));
        fs::write(ctx.output(OUT.file), ctx.node_id())?;
        self.log.lock().unwrap().push((ctx.gpu(), start, Instant::now()));
        Ok(())
    }
}

#[test]
fn nodes_run_at_once_get_a_gpu_each_and_never_share_one() {
    let (_dir, store) = setup();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log_b: GpuLog = Arc::new(std::sync::Mutex::new(Vec::new()));
    let node = |id: &str, wants_gpu: bool| Node::new(id, None, Arc::new(OnGpu { wants_gpu, log: log.clone() }));
    let mut nodes: Vec<Node> = (0..5).map(|k| node(&format!("train{k}"), true)).collect();
    nodes.push(node("cpu", false));
    let opts = RunOptions { jobs: 6, executor: Arc::new(pipeline::InProcess::with_gpus(|| 2)), ..Default::default() };
    let summary = pipeline::run(&Dag::new(nodes).unwrap(), &store, &opts).unwrap();
    assert!(!summary.failed());
    let log = log.lock().unwrap();
    assert_eq!(log.iter().filter(|r| r.0.is_none()).count(), 1, "the CPU node gets no GPU: {log:?}");
    let on_gpu: Vec<_> = log.iter().filter_map(|r| r.0.map(|g| (g, r.1, r.2))).collect();
    assert_eq!(on_gpu.len(), 5);
    assert!(on_gpu.iter().all(|r| r.0 < 2));
    for (i, a) in on_gpu.iter().enumerate() {
        for b in &on_gpu[i + 1..] {
            assert!(a.0 != b.0 || a.2 <= b.1 || b.2 <= a.1, "two nodes on GPU {} at once", a.0);
        }
    }
    assert!(on_gpu.iter().any(|r| r.0 == 0) && on_gpu.iter().any(|r| r.0 == 1), "both GPUs used");
    drop(log);

    // Without GPUs, a node that would like one runs all the same.
    let (_dir, store) = setup();
    let none = RunOptions { jobs: 2, executor: Arc::new(pipeline::InProcess::with_gpus(|| 0)), ..Default::default() };
    let ids = ["gpu_a", "gpu_b"];
    let dag = Dag::new(
        ids.iter().map(|id| Node::new(id, None, Arc::new(OnGpu { wants_gpu: true, log: log_b.clone() }))).collect(),
    )
    .unwrap();
    assert!(!pipeline::run(&dag, &store, &none).unwrap().failed());
    assert!(log_b.lock().unwrap().iter().all(|r| r.0.is_none()));
}
