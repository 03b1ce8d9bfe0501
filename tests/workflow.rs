//! The whole HMIL workflow through the `hmil-flow` binary on a small synthetic BRACS-shaped
//! dataset: it learns, reruns nothing when nothing changed, and after a change reruns exactly
//! what depends on it.

use std::fs;
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Float64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

mod common;
use common::{BIN, executed, hmil_flow, hmil_flow_fails, run};
use std::process::Command;

/// The current output `file` of node `id`, found through the node's record.
fn artifact(dir: &Path, id: &str, file: &str) -> PathBuf {
    let ws = dir.join(".hmil-flow");
    for entry in fs::read_dir(ws.join("nodes")).unwrap().flatten() {
        let record: serde_json::Value = serde_json::from_slice(&fs::read(entry.path()).unwrap()).unwrap();
        let manifest = ws.join("objects").join(record["key"].as_str().unwrap()).join("manifest.json");
        let manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
        if manifest["node"] == id {
            return manifest_dir(&ws, &record).join(file);
        }
    }
    panic!("no record of {id}");
}

fn manifest_dir(ws: &Path, record: &serde_json::Value) -> PathBuf {
    ws.join("objects").join(record["key"].as_str().unwrap())
}

fn read(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(fs::File::open(path).unwrap()).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// Mean over folds of a test-split summary metric at one level.
fn mean_test_metric(dir: &Path, folds: usize, level: &str, metric: &str) -> f64 {
    let mut values = Vec::new();
    for fold in 0..folds {
        let m = read(&artifact(dir, &format!("evaluate[fold={fold}]"), "metrics.parquet"));
        let col = |n: &str| m.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (split, lvl, name, class) =
            (col("split"), col("level"), col("metric"), m.column_by_name("class").unwrap().clone());
        let value = m.column_by_name("value").unwrap().as_primitive::<Float64Type>();
        for i in 0..m.num_rows() {
            if split.value(i) == "test" && lvl.value(i) == level && name.value(i) == metric && class.is_null(i) {
                values.push(value.value(i));
            }
        }
    }
    assert_eq!(values.len(), folds);
    values.iter().sum::<f64>() / folds as f64
}

fn setup(dir: &Path, epochs: usize) -> PathBuf {
    let data = dir.join("data");
    hmil_flow(&[
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--scale",
        "0.2",
        "--mean-instances",
        "48",
        "--dim",
        "48",
        "--seed",
        "3",
    ]);
    let wf = dir.join("flow.toml");
    fs::write(
        &wf,
        format!(
            r#"[workflow]
name = "test"
seed = 11

[dataset]
features = "data/pt_files"
labels = "data/labels.csv"

[labels.hierarchy]
benign = ["N", "PB", "UDH"]
atypical = ["FEA", "ADH"]
malignant = ["DCIS", "IC"]

[splits]
folds = 3
val_frac = 0.15

[train]
epochs = {epochs}
batch_size = 16
lr = 1e-3
device = "cpu"
threads = 1
"#
        ),
    )
    .unwrap();
    wf
}

#[test]
fn learns_caches_and_reruns_exactly_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 25);
    let wf_s = wf.to_str().unwrap();
    let results = dir.path().join("results/test");

    // A target runs what it needs and nothing else: the folds, to check before any training.
    let status = hmil_flow(&["status", wf_s, "train[fold=1]"]);
    let ids: Vec<&str> = status.lines().map(|l| l.split_whitespace().nth(1).unwrap().trim_end_matches(':')).collect();
    assert_eq!(ids, ["index_features", "pack_features", "join_labels", "split_folds", "train[fold=1]"], "{status}");
    let planned = hmil_flow(&["run", wf_s, "split_folds", "--dry-run"]);
    assert_eq!(planned.lines().count(), 3, "index_features, join_labels, split_folds: {planned}");
    let folds_only = run(&wf, &["split_folds"]);
    let said = hmil_flow(&["run", wf_s, "split_folds"]);
    assert!(said.contains("(not made yet: pack_features, train[fold=0], evaluate[fold=0], … and 8 more)"), "{said}");
    assert_eq!(folds_only.keys().collect::<Vec<_>>(), ["index_features", "join_labels", "split_folds"]);
    assert!(results.join("splits.parquet").is_file() && !results.join("report.md").exists());

    let first = run(&wf, &[]);
    assert_eq!(first.len(), 4 + 3 * 3 + 1);
    let ran: Vec<&str> = first.iter().filter(|(_, s)| *s == "cached").map(|(id, _)| id.as_str()).collect();
    assert_eq!(ran, ["index_features", "join_labels", "split_folds"], "{first:?}");
    assert_eq!(executed(&first).len(), first.len() - 3, "{first:?}");

    // The results folder holds the current outputs under readable names, as links into the store.
    let report_md = fs::read_to_string(results.join("report.md")).unwrap();
    assert_eq!(report_md, fs::read_to_string(artifact(dir.path(), "report", "report.md")).unwrap());
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let model = artifact(dir.path(), "train[fold=2]", "model.safetensors");
    assert_eq!(inode(&results.join("folds/2/model.safetensors")), inode(&model), "a link, not a copy");
    for file in ["labels.parquet", "splits.parquet", "predictions.parquet", "roc.png", "folds/0/history.parquet"] {
        assert!(results.join(file).is_file(), "{file}");
    }
    // The packed store's per-slide files stay in the store.
    assert!(results.join("features/packed.parquet").is_file());
    assert!(!results.join("features/features").exists() && !results.join("features/coords").exists());
    // How far each fine class's attention sits inside its coarse class's: one cosine per test
    // slide and fine class, in [0, 1].
    let agreement = hmil_flow(&[
        "query",
        wf_s,
        "SELECT count(*) AS n, min(agreement) >= 0 AND max(agreement) <= 1.000001 AS in_range, \
         count(DISTINCT fine_class) AS classes FROM agreement WHERE current AND split = 'test'",
        "--format",
        "csv",
    ]);
    let test_slides = hmil_flow(&[
        "query",
        wf_s,
        "SELECT count(*) AS n FROM predictions WHERE current AND split = 'test'",
        "--format",
        "csv",
    ]);
    let n: usize = test_slides.lines().nth(1).unwrap().parse().unwrap();
    assert_eq!(agreement.lines().nth(1), Some(format!("{},true,7", n * 7).as_str()), "{agreement}");
    let folds = read(&results.join("metrics.parquet")).column_by_name("fold").unwrap().clone();
    let folds: Vec<i32> = folds.as_primitive::<arrow::datatypes::Int32Type>().values().to_vec();
    assert!((0..3).all(|k| folds.contains(&k)), "every fold's metrics in one table");

    // The run ends with the headline metrics and the report's path; --quiet keeps the last line.
    let said = hmil_flow(&["run", wf_s]);
    let last = format!("report: {}", results.join("report.md").display());
    assert!(said.contains("test split, mean ± sd over 3 folds:") && said.contains("  fine     0."), "{said}");
    assert_eq!(said.lines().last(), Some(last.as_str()), "{said}");
    let quiet = Command::new(BIN).args(["run", wf_s, "--quiet"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&quiet.stdout), format!("{last}\n"));

    // It learns: fine-level macro AUC on held-out test slides well above chance (0.5).
    let auc = mean_test_metric(dir.path(), 3, "fine", "auc_macro");
    eprintln!("test fine macro AUC {auc:.3}");
    assert!(auc > 0.7, "test fine macro AUC {auc}");

    // The report: tables over folds and plots.
    let report = fs::read_to_string(artifact(dir.path(), "report", "report.md")).unwrap();
    assert!(
        report.contains("| fine | ") && report.contains(" ± ") && report.contains("## Confusion (fine"),
        "{report}"
    );
    for png in ["roc.png", "confusion.png", "curves.png"] {
        let bytes = fs::read(artifact(dir.path(), "report", png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "{png}");
    }

    // SQL over the artifacts.
    let csv = hmil_flow(&[
        "query",
        wf_s,
        "SELECT fold, value FROM metrics WHERE split = 'test' AND level = 'fine' AND metric = 'auc_macro' AND current ORDER BY fold",
        "--format",
        "csv",
    ]);
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("fold,value\n0,"), "{csv}");
    let schema = hmil_flow(&["query", wf_s, "--schema"]);
    for table in [
        "features\n",
        "labels\n",
        "splits\n",
        "history\n",
        "predictions\n",
        "metrics\n",
        "attention\n",
        "runs\n",
        "dropped\n",
    ] {
        assert!(schema.contains(table), "{table} missing from\n{schema}");
    }
    let bad = Command::new(BIN).args(["query", wf_s, "SELECT nope FROM metrics"]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("nope") && !err.contains("backtrace"), "{err}");

    // The folds as CLAM split files, one per fold, for other tools.
    let clam = dir.path().join("clam_splits");
    let said = hmil_flow(&["export-splits", wf_s, "--out", clam.to_str().unwrap()]);
    assert!(said.contains("wrote 3 CLAM split file(s)"), "{said}");
    let fold0 = fs::read_to_string(clam.join("splits_0.csv")).unwrap();
    assert!(fold0.starts_with(",train,val,test\n0,"), "{fold0}");

    // Nothing changed: nothing runs.
    let again = run(&wf, &[]);
    assert!(again.values().all(|s| s == "cached"), "{again:?}");

    // One slide's label changes (a single-slide case, so no case conflict).
    let csv_path = dir.path().join("data/labels.csv");
    let csv = fs::read_to_string(&csv_path).unwrap();
    let line = csv.lines().find(|l| l.starts_with("case_0001,")).unwrap().to_owned();
    fs::write(&csv_path, csv.replace(&line, &line.replace(",N", ",PB"))).unwrap();
    let status = hmil_flow(&["status", wf.to_str().unwrap()]);
    assert!(status.contains("stale  join_labels: input labels.csv changed"), "{status}");
    assert!(status.contains("fresh  index_features") && status.contains("fresh  pack_features"), "{status}");
    assert!(status.contains("stale  train[fold=0]: upstream"), "{status}");
    let stale = Command::new(BIN).args(["export-splits", wf_s, "--out", clam.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success() && err.contains("split_folds is not up to date"), "{err}");
    let after_label = run(&wf, &[]);
    assert_eq!(after_label["index_features"], "cached");
    assert_eq!(after_label["pack_features"], "cached");
    let new_report = fs::read_to_string(results.join("report.md")).unwrap();
    assert_eq!(new_report, fs::read_to_string(artifact(dir.path(), "report", "report.md")).unwrap());
    assert_ne!(new_report, report_md, "the results folder shows the report of the new labels");
    let mut expected = vec!["join_labels", "split_folds", "report"];
    expected.extend([
        "evaluate[fold=0]",
        "evaluate[fold=1]",
        "evaluate[fold=2]",
        "heatmaps[fold=0]",
        "heatmaps[fold=1]",
        "heatmaps[fold=2]",
        "train[fold=0]",
        "train[fold=1]",
        "train[fold=2]",
    ]);
    expected.sort();
    assert_eq!(executed(&after_label), expected);

    // An evaluation-only setting: only evaluation reruns.
    let eval_only = run(&wf, &["--set", "evaluate.attention_top_k=4"]);
    assert_eq!(executed(&eval_only), ["evaluate[fold=0]", "evaluate[fold=1]", "evaluate[fold=2]", "report"]);

    // Epochs: training and evaluation rerun, the splits do not.
    let status = hmil_flow(&["status", wf.to_str().unwrap(), "--set", "train.epochs=3"]);
    assert!(status.contains("stale  train[fold=1]: param train.epochs 25→3"), "{status}");
    let fewer = run(&wf, &["--set", "train.epochs=3"]);
    assert_eq!(fewer["split_folds"], "cached");
    assert_eq!(executed(&fewer).len(), 10, "train, evaluate and heatmaps of 3 folds, and the report: {fewer:?}");

    // Runs stay queryable side by side: fine macro AUC per fold, two training settings.
    let per_run = hmil_flow(&[
        "query",
        wf_s,
        "SELECT r.run_id, COUNT(*) AS folds FROM metrics m JOIN runs r ON r.cache_key = m.cache_key \
         WHERE m.split = 'test' AND m.level = 'fine' AND m.metric = 'auc_macro' AND r.status = 'executed' GROUP BY r.run_id",
        "--format",
        "json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(per_run.trim()).unwrap();
    assert!(rows.as_array().unwrap().len() >= 3, "{per_run}");

    // gc keeps every current object and removes the rest: the outputs of the old labels, the
    // three-epoch models, and an orphan.
    let orphan = dir.path().join(".hmil-flow/objects/0123456789abcdef");
    fs::create_dir_all(&orphan).unwrap();
    fs::write(orphan.join("out.bin"), [0u8; 100]).unwrap();
    let objects = || fs::read_dir(dir.path().join(".hmil-flow/objects")).unwrap().count();
    let before = objects();
    let planned = hmil_flow(&["gc", wf_s, "--keep-runs", "0", "--dry-run"]);
    assert_eq!(objects(), before, "a dry run removes nothing");
    assert!(planned.contains("100 B  0123456789abcdef  ?"), "{planned}");
    assert!(planned.contains("  join_labels\n") && planned.contains("  train[fold=0]\n"), "{planned}");
    let removed = hmil_flow(&["gc", wf_s, "--keep-runs", "0"]);
    assert_eq!(removed.replace("removed", "would remove"), planned);
    assert_eq!(objects(), 4 + 3 * 3 + 1, "{removed}");
    let after_gc = run(&wf, &[]);
    assert!(after_gc.values().all(|s| s == "cached"), "{after_gc:?}");
}

#[test]
fn same_seed_gives_identical_splits_and_cpu_results() {
    let digests = |dir: &Path| {
        ["split_folds/splits.parquet", "train[fold=1]/model.safetensors", "evaluate[fold=1]/predictions.parquet"].map(
            |p| {
                let (id, file) = p.split_once('/').unwrap();
                fs::read(artifact(dir, id, file)).unwrap()
            },
        )
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [a.path(), b.path()] {
        let wf = setup(dir, 3);
        run(&wf, &[]);
    }
    assert!(digests(a.path()) == digests(b.path()), "two runs of the same workflow differ");
}

#[test]
fn ctrl_c_stops_training_keeps_finished_stages_and_a_rerun_goes_on() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 1_000_000);
    let summary = dir.path().join("summary.json");
    let mut child = Command::new(BIN)
        .args(["run", wf.to_str().unwrap(), "-v", "--summary-json", summary.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once a fold's training is running, press Ctrl-C; keep draining the log after.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|l| l.contains("train[fold=") && l.contains("running"));
    assert!(started, "training never started");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let log: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{log:#?}");

    let json: serde_json::Value = serde_json::from_slice(&fs::read(&summary).unwrap()).unwrap();
    let node = |id: &str| json["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap().clone();
    let stopped: Vec<String> = (0..3)
        .map(|k| node(&format!("train[fold={k}]")))
        .inspect(|n| assert_eq!(n["status"], "interrupted", "{n}"))
        .map(|n| n["reason"].as_str().unwrap().to_owned())
        .filter(|r| r.starts_with("stopped in epoch"))
        .collect();
    assert_eq!(stopped.len(), 1, "one fold was training when Ctrl-C came: {json}");
    assert_eq!(node("report")["status"], "interrupted");
    assert_eq!(node("pack_features")["status"], "executed");
    let sql = "SELECT count(*) AS n FROM runs WHERE status = 'interrupted'";
    let recorded = hmil_flow(&["query", wf.to_str().unwrap(), sql, "--format", "csv"]);
    assert_eq!(recorded.trim(), "n\n10", "3 train, 3 evaluate, 3 heatmaps and the report are recorded as interrupted");

    // A rerun (with a training that ends) reuses every stage that finished.
    let short = fs::read_to_string(&wf).unwrap().replace("epochs = 1000000", "epochs = 1");
    fs::write(&wf, short).unwrap();
    let statuses = run(&wf, &[]);
    for id in ["index_features", "pack_features", "join_labels", "split_folds"] {
        assert_eq!(statuses[id], "cached", "{statuses:?}");
    }
    assert_eq!(statuses["report"], "executed");
}

/// Test metrics of the current results: one `fold` line per fold, after the CSV header.
fn current_folds(wf: &str, set: &[&str]) -> Vec<String> {
    let sql = "SELECT fold, workflow FROM metrics WHERE split = 'test' AND level = 'fine' \
               AND metric = 'auc_macro' AND current ORDER BY fold";
    let mut args = vec!["query", wf, sql, "--format", "csv"];
    for s in set {
        args.extend(["--set", s]);
    }
    hmil_flow(&args).lines().skip(1).map(str::to_owned).collect()
}

#[test]
fn current_means_this_workflow_with_these_settings() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 2);
    let wf_s = wf.to_str().unwrap();
    run(&wf, &[]);
    run(&wf, &["--set", "splits.folds=4"]);
    assert!(run(&wf, &[]).values().all(|s| s == "cached"));
    assert_eq!(current_folds(wf_s, &[]), ["0,test", "1,test", "2,test"], "folds 3 of the 4-fold run are not current");
    assert_eq!(current_folds(wf_s, &["splits.folds=4"]).len(), 4, "query --set loads that workflow");

    // A second workflow in the same folder shares the workspace, not the current results.
    let other = dir.path().join("other.toml");
    let text = fs::read_to_string(&wf)
        .unwrap()
        .replace("name = \"test\"", "name = \"other\"")
        .replace("seed = 11", "seed = 12");
    fs::write(&other, text).unwrap();
    run(&other, &[]);
    assert_eq!(current_folds(wf_s, &[]), ["0,test", "1,test", "2,test"]);
    assert_eq!(current_folds(other.to_str().unwrap(), &[]), ["0,other", "1,other", "2,other"]);
    let whose =
        hmil_flow(&["query", wf_s, "SELECT DISTINCT workflow FROM metrics ORDER BY workflow", "--format", "csv"]);
    assert_eq!(whose, "workflow\nother\ntest\n");

    // The runs table keeps the settings each run used.
    let sql = "SELECT count(DISTINCT run_id) AS n FROM runs WHERE settings LIKE '%\"folds\":4%'";
    assert_eq!(hmil_flow(&["query", wf_s, sql, "--format", "csv"]), "n\n1\n");

    // Output formats: by the file's extension, JSON with nulls and a final newline.
    let out = dir.path().join("auc.csv");
    hmil_flow(&[
        "query",
        wf_s,
        "SELECT fold FROM metrics WHERE current ORDER BY fold LIMIT 1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(fs::read_to_string(&out).unwrap(), "fold\n0\n");
    let json = hmil_flow(&["query", wf_s, "SELECT class FROM metrics WHERE class IS NULL LIMIT 1", "--format", "json"]);
    assert_eq!(json, "[{\"class\":null}]\n");

    // Read-only, and an unknown table lists the tables.
    let (out, err) = hmil_flow_fails(&["query", wf_s, "DROP TABLE metrics"]);
    assert!(err.contains("queries are read-only") && !out.contains("no rows"), "{out}{err}");
    let (_, err) = hmil_flow_fails(&["query", wf_s, "SELECT * FROM metricz"]);
    assert!(
        err.contains("the tables are: agreement, all_folds_metrics, all_folds_predictions, attention, ")
            && err.contains(" metrics, ")
            && err.ends_with("runs\n"),
        "{err}"
    );
    let (_, err) = hmil_flow_fails(&["query", dir.path().join("nope.toml").to_str().unwrap(), "SELECT 1"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(!err.contains('\x1b'), "no colour codes into a pipe: {err:?}");

    // A checkpoint alone is enough to predict: its classes and hierarchy are in its metadata.
    let ckpt = artifact(dir.path(), "train[fold=0]", "model.safetensors");
    let out = dir.path().join("new.parquet");
    let feats = dir.path().join("data/pt_files");
    hmil_flow(&[
        "predict",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--features",
        feats.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let p = read(&out);
    let benign = p.column_by_name("prob_coarse_from_fine_benign").unwrap().as_primitive::<Float64Type>();
    assert!(benign.values().iter().all(|&v| v > 0.0 && v < 1.0), "{benign:?}");
    let named = p.column_by_name("coarse_from_fine_pred").unwrap().as_string::<i32>();
    assert!(named.iter().all(|c| ["benign", "atypical", "malignant"].contains(&c.unwrap())));
}

#[test]
fn a_run_without_a_terminal_logs_progress_and_says_each_problem_once() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 2);
    let wf_s = wf.to_str().unwrap();
    let out = Command::new(BIN).args(["run", wf_s]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("train[fold=0]") && err.contains("running (never run)"), "node starts: {err}");
    assert!(err.contains("epoch 2/2: loss "), "epochs: {err}");

    // The dag shows the files the workflow reads.
    let dag = hmil_flow(&["dag", wf_s]);
    assert!(dag.contains("    ← labels: ") && dag.contains("labels.csv"), "{dag}");

    // An unknown --force names the stages.
    let (_, err) = hmil_flow_fails(&["run", wf_s, "--force", "trian"]);
    assert!(
        err.contains("its stages are: index_features, pack_features") && err.contains("did you mean `train`?"),
        "{err}"
    );

    // A label outside the hierarchy: the problem list is printed once, at the end.
    let labels = dir.path().join("data/labels.csv");
    let csv = fs::read_to_string(&labels).unwrap();
    let line = csv.lines().find(|l| l.starts_with("case_0001,")).unwrap().to_owned();
    fs::write(&labels, csv.replace(&line, &line.replace(",N", ",XX"))).unwrap();
    let (out, err) = hmil_flow_fails(&["run", wf_s]);
    let text = format!("{out}{err}");
    assert_eq!(text.matches("label `XX` is not in labels.hierarchy").count(), 1, "{text}");
    assert!(err.contains("error: join_labels failed: 1 label problem(s)"), "{err}");
    assert!(out.ends_with(&format!("once fixed, rerun it with: hmil-flow run {wf_s} join_labels\n")), "{out}");

    // Under --log-format json every line on stderr is JSON, the final error too.
    let (_, err) = hmil_flow_fails(&["--log-format", "json", "run", wf_s]);
    for line in err.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line}");
    }
    assert!(err.contains("join_labels failed"), "{err}");
}

#[test]
fn imported_splits_say_what_they_leave_out_and_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 1);
    let wf_s = wf.to_str().unwrap();
    run(&wf, &[]);
    let clam = dir.path().join("clam");
    hmil_flow(&["export-splits", wf_s, "--out", clam.to_str().unwrap()]);
    // Each fold's file loses its last row.
    for k in 0..3 {
        let path = clam.join(format!("splits_{k}.csv"));
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text.lines().collect();
        fs::write(&path, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    }
    let set = ["--set", "splits.method=import", "--set", "splits.dir=clam", "--set", "splits.folds=5"];
    let mut args = vec!["run", wf_s];
    args.extend(set);
    let out = Command::new(BIN).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: split_folds: splits.folds = 5 is not used: method \"import\" takes its 3 fold(s)"),
        "{err}"
    );
    assert!(err.contains("warning: split_folds: the folds use "), "{err}");
    let mut args = vec!["status", wf_s];
    args.extend(set);
    let status = hmil_flow(&args);
    assert!(status.contains("fresh  split_folds\n       warning: splits.folds = 5 is not used"), "{status}");
    assert!(status.contains("slide(s) are in no fold"), "{status}");
}

#[test]
fn init_writes_a_workflow_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 1);
    let (features, labels) = (dir.path().join("data/pt_files"), dir.path().join("data/labels.csv"));
    let out = dir.path().join("mine.toml");
    let args = |hierarchy: Option<&str>| {
        let mut a = vec!["init", "--features", features.to_str().unwrap(), "--labels", labels.to_str().unwrap()];
        a.extend(["--out", out.to_str().unwrap(), "--force"]);
        a.extend(hierarchy.map(|h| ["--hierarchy", h]).into_iter().flatten());
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let said = hmil_flow(&args(None).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(said.contains("dimension 48") && said.contains("columns slide `slide_id`, label `label`"), "{said}");
    assert!(said.contains("group them under [labels.hierarchy]"), "{said}");
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains("features = \"data/pt_files\"") && text.contains("N = [\"N\"]"), "{text}");

    let bad = args(Some("benign=N,PB;malignant=IC"));
    let (_, err) = hmil_flow_fails(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--hierarchy lacks the label(s) UDH, FEA, ADH, DCIS"), "{err}");

    let good = args(Some("benign=N,PB,UDH;atypical=FEA,ADH;malignant=DCIS,IC"));
    let said = hmil_flow(&good.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        said.contains("checked: ") && said.ends_with(&format!("next: hmil-flow run {}\n", out.display())),
        "{said}"
    );
    assert!(!said.contains("group them under"), "{said}");
    let ran = run(&out, &["--set", "train.epochs=1", "--set", "train.device=cpu", "--set", "splits.folds=2"]);
    assert_eq!(ran["report"], "executed", "{ran:?}");
    assert!(dir.path().join("results/mine/report.md").is_file());
}

#[test]
fn the_panda_workflow_runs_on_a_panda_shaped_cohort() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("panda");
    let d = data.to_str().unwrap();
    hmil_flow(&["synth", "--preset", "panda", "--out", d, "--scale", "0.002", "--mean-instances", "8", "--dim", "8"]);
    let wf = concat!(env!("CARGO_MANIFEST_DIR"), "/workflows/panda.toml");
    let results = dir.path().join("results");
    let settings = [
        format!("dataset.features={d}/pt_files"),
        format!("dataset.labels={d}/train.csv"),
        format!("workflow.workspace={}", dir.path().join("ws").display()),
        format!("workflow.results={}", results.display()),
        "train.epochs=1".into(),
        "train.device=cpu".into(),
        "splits.folds=2".into(),
    ];
    let mut args = vec!["run", wf];
    for s in &settings {
        args.extend(["--set", s.as_str()]);
    }
    let said = hmil_flow(&args);
    let last = format!("report: {}", results.join("report.md").display());
    assert!(said.lines().any(|l| l == last), "{said}");
    let report = fs::read_to_string(results.join("report.md")).unwrap();
    assert!(report.contains("| low_grade |") && report.contains("| 5 |"), "{report}");
}

#[test]
fn bench_pack_times_a_full_pack_and_one_added_slide() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 1);
    let said = hmil_flow(&["bench", "pack", dir.path().join("data/pt_files").to_str().unwrap()]);
    for line in ["full pack ", "one slide added ", "x the full pack)", "x the added file (", "peak RSS "] {
        assert!(said.contains(line), "{line}: {said}");
    }
    assert!(said.contains(" slides, a 0.00 GB store"), "{said}");
}

#[test]
fn variants_and_seeds_share_preprocessing_and_a_new_variant_trains_alone() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 6);
    let base = fs::read_to_string(&wf).unwrap().replace("folds = 3", "folds = 2");
    let two = format!("{base}\n[variants.hmil]\n[variants.abmil]\nmodel = \"abmil\"\n[repeats]\nseeds = [1, 2]\n");
    fs::write(&wf, &two).unwrap();
    let wf_s = wf.to_str().unwrap();
    let results = dir.path().join("results/test");

    let first = run(&wf, &[]);
    // 4 preprocessing nodes; 2 variants × 2 seeds × 2 folds of train and evaluate; heatmaps for
    // HMIL's 4 runs (a flat model has no evidence to draw); the report.
    assert_eq!(first.len(), 4 + 8 * 2 + 4 + 1, "{first:?}");
    for id in ["train[variant=abmil,seed=2,fold=1]", "heatmaps[variant=hmil,seed=1,fold=0]"] {
        assert_eq!(first.get(id).map(String::as_str), Some("executed"), "{id}: {first:?}");
    }
    assert!(!first.contains_key("heatmaps[variant=abmil,seed=1,fold=0]"));
    assert!(results.join("variants/abmil/seed_2/folds/1/model.safetensors").is_file());
    let report = fs::read_to_string(results.join("report.md")).unwrap();
    for section in
        ["## Comparison of variants", "## Against hmil", "not independent", "| abmil | fine | auc_macro |", "## Pooled"]
    {
        assert!(report.contains(section), "{section}:\n{report}");
    }
    assert!(results.join("comparison.png").is_file());

    // Every run's metrics in one table, by variant and seed; the comparison, by variant.
    let metrics = read(&results.join("metrics.parquet"));
    let variant = metrics.column_by_name("variant").unwrap().as_string::<i32>().clone();
    let seed = metrics.column_by_name("seed").unwrap().as_primitive::<arrow::datatypes::Int64Type>().clone();
    let mut runs: Vec<(String, i64)> =
        (0..metrics.num_rows()).map(|i| (variant.value(i).to_owned(), seed.value(i))).collect();
    runs.dedup();
    runs.sort();
    runs.dedup();
    assert_eq!(runs, [("abmil".into(), 1), ("abmil".into(), 2), ("hmil".into(), 1), ("hmil".into(), 2)]);
    let answer = hmil_flow(&[
        "query",
        wf_s,
        "SELECT variant, count(*) AS runs FROM all_folds_metrics WHERE current AND split = 'test' \
         AND level = 'fine' AND metric = 'auc_macro' AND class IS NULL GROUP BY variant ORDER BY variant",
        "--format",
        "csv",
    ]);
    assert_eq!(answer.trim(), "variant,runs\nabmil,4\nhmil,4", "{answer}");
    let compared = hmil_flow(&[
        "query",
        wf_s,
        "SELECT DISTINCT variant FROM comparison WHERE current AND difference IS NOT NULL",
        "--format",
        "csv",
    ]);
    assert_eq!(compared.trim(), "variant\nabmil", "{compared}");
    // Pooled over folds and seeds, with a bootstrap interval around it, at every level.
    let pooled = hmil_flow(&[
        "query",
        wf_s,
        "SELECT variant, count(*) AS n FROM comparison WHERE current AND pooled_low <= pooled \
         AND pooled <= pooled_high AND metric = 'balanced_accuracy' GROUP BY variant ORDER BY variant",
        "--format",
        "csv",
    ]);
    assert_eq!(pooled.trim(), "variant,n\nabmil,3\nhmil,3", "{pooled}");
    // Every node's table names its run's variant and seed too.
    let per_node = hmil_flow(&[
        "query",
        wf_s,
        "SELECT variant, seed, count(DISTINCT fold) AS folds FROM history WHERE current GROUP BY variant, seed \
         ORDER BY variant, seed",
        "--format",
        "csv",
    ]);
    assert_eq!(per_node.trim(), "variant,seed,folds\nabmil,1,2\nabmil,2,2\nhmil,1,2\nhmil,2,2", "{per_node}");

    // A third variant trains and evaluates only its own runs; the others' results stay as they were.
    let models_before: Vec<Vec<u8>> = ["hmil", "abmil"]
        .iter()
        .map(|v| fs::read(results.join(format!("variants/{v}/seed_1/folds/0/model.safetensors"))).unwrap())
        .collect();
    fs::write(&wf, format!("{two}[variants.meanpool]\nmodel = \"meanpool\"\n")).unwrap();
    let third = run(&wf, &[]);
    let mut expected: Vec<String> = ["train", "evaluate"]
        .iter()
        .flat_map(|k| {
            (1..=2).flat_map(move |s| (0..2).map(move |f| format!("{k}[variant=meanpool,seed={s},fold={f}]")))
        })
        .collect();
    expected.push("report".into());
    expected.sort();
    assert_eq!(executed(&third), expected.iter().map(String::as_str).collect::<Vec<_>>());
    let models_after: Vec<Vec<u8>> = ["hmil", "abmil"]
        .iter()
        .map(|v| fs::read(results.join(format!("variants/{v}/seed_1/folds/0/model.safetensors"))).unwrap())
        .collect();
    assert_eq!(models_before, models_after, "bit-identical models");
    let after = read(&results.join("metrics.parquet"));
    let kept = |m: &RecordBatch| {
        let v = m.column_by_name("variant").unwrap().as_string::<i32>().clone();
        let values = m.column_by_name("value").unwrap().as_primitive::<Float64Type>().clone();
        (0..m.num_rows()).filter(|&i| v.value(i) != "meanpool").map(|i| values.value(i).to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(kept(&metrics), kept(&after), "the same metrics, bit for bit");

    // Changing one variant's setting retrains that variant alone.
    fs::write(&wf, format!("{two}[variants.meanpool]\nmodel = \"meanpool\"\nlr = 0.002\n")).unwrap();
    let changed = run(&wf, &[]);
    assert_eq!(executed(&changed), expected.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn an_external_cohort_is_predicted_by_every_fold_model_and_their_ensemble() {
    let dir = tempfile::tempdir().unwrap();
    let wf = setup(dir.path(), 15);
    // The same synthetic classes (the seed draws them first), other slides: a second site.
    let site_b = dir.path().join("site_b");
    let site_b_s = site_b.to_str().unwrap();
    hmil_flow(&["synth", "--out", site_b_s, "--scale", "0.1", "--mean-instances", "40", "--dim", "48", "--seed", "3"]);
    let text = fs::read_to_string(&wf).unwrap().replace("folds = 3", "folds = 2");
    let cohort = "[[cohorts]]\nname = \"site_b\"\nfeatures = \"site_b/pt_files\"\nlabels = \"site_b/labels.csv\"\n";
    fs::write(&wf, format!("{text}\n{cohort}")).unwrap();

    let first = run(&wf, &[]);
    for id in ["index_features[cohort=site_b]", "pack_features[cohort=site_b]", "join_labels[cohort=site_b]"] {
        assert_eq!(first.get(id).map(String::as_str), Some("executed"), "{id}: {first:?}");
    }
    assert_eq!(first.get("external[cohort=site_b]").map(String::as_str), Some("executed"), "{first:?}");
    let results = dir.path().join("results/test");
    let m = read(&results.join("cohorts/site_b/external_metrics.parquet"));
    let col = |n: &str| m.column_by_name(n).unwrap().as_string::<i32>().clone();
    let (cohort, split, level, metric) = (col("cohort"), col("split"), col("level"), col("metric"));
    let fold = m.column_by_name("fold").unwrap().as_primitive::<arrow::datatypes::Int32Type>().clone();
    let value = m.column_by_name("value").unwrap().as_primitive::<Float64Type>().clone();
    let class = m.column_by_name("class").unwrap().clone();
    let auc = |which: &str| -> Vec<(i32, f64)> {
        (0..m.num_rows())
            .filter(|&i| split.value(i) == which && level.value(i) == "fine" && metric.value(i) == "auc_macro")
            .filter(|&i| class.is_null(i) && cohort.value(i) == "site_b")
            .map(|i| (fold.value(i), value.value(i)))
            .collect()
    };
    let (folds, ensemble) = (auc("external"), auc("ensemble"));
    assert_eq!(folds.iter().map(|f| f.0).collect::<Vec<_>>(), [0, 1], "one row per fold model");
    assert_eq!(ensemble.len(), 1);
    assert_eq!(ensemble[0].0, -1);
    assert!(ensemble[0].1 > 0.6, "the fold models carry over to the second site: {ensemble:?} (folds {folds:?})");
    let report = fs::read_to_string(results.join("report.md")).unwrap();
    assert!(report.contains("## External cohorts") && report.contains("**site_b**"), "{report}");

    // A label of the cohort changes: only the cohort's labels, its predictions and the report
    // run again.
    let labels = site_b.join("labels.csv");
    let csv = fs::read_to_string(&labels).unwrap();
    let last = csv.lines().last().unwrap().to_owned();
    let (row, label) = last.rsplit_once(',').unwrap();
    let relabelled = format!("{row},{}", if label == "N" { "PB" } else { "N" });
    fs::write(&labels, csv.replace(&last, &relabelled)).unwrap();
    let again = run(&wf, &[]);
    assert_eq!(executed(&again), ["external[cohort=site_b]", "join_labels[cohort=site_b]", "report"], "{again:?}");
}

#[test]
fn a_step_memory_budget_runs_batches_in_chunks_with_the_results_of_whole_batches() {
    // The same data and workflow twice: whole mini-batches, and steps of at most 100 instances
    // (each batch of 16 bags of ~48 instances runs in about eight chunks).
    let (whole, chunked) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut logs = Vec::new();
    for (dir, extra) in [(whole.path(), vec![]), (chunked.path(), vec!["--set", "train.max_instances_per_chunk=100"])] {
        let wf = setup(dir, 3);
        let mut args = vec!["run", wf.to_str().unwrap(), "--jobs", "2", "evaluate[fold=1]"];
        args.extend(extra);
        logs.push(hmil_flow(&args));
    }
    assert!(!logs[0].contains("run in chunks"), "{}", logs[0]);
    assert!(logs[1].contains("run in chunks of bags of at most train.max_instances_per_chunk = 100"), "{}", logs[1]);
    // All but one of about eight chunks a step run forward twice.
    let said = logs[1].split_once(" of an epoch's instances run forward twice");
    let share = said.and_then(|(before, _)| before.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(share.is_some_and(|s| (0.6..1.0).contains(&s)), "{share:?} in {}", logs[1]);
    // Three epochs of Adam from the same start: the probabilities agree to float rounding.
    let probs = |dir: &Path| {
        let p = read(&artifact(dir, "evaluate[fold=1]", "predictions.parquet"));
        let schema = p.schema();
        let columns: Vec<usize> =
            (0..p.num_columns()).filter(|&i| schema.field(i).name().starts_with("prob_")).collect();
        columns.iter().flat_map(|&i| p.column(i).as_primitive::<Float64Type>().values().to_vec()).collect::<Vec<f64>>()
    };
    let (a, b) = (probs(whole.path()), probs(chunked.path()));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "chunked training moved a test probability by {worst}");
    // How memory is used is not part of the cache key: the chunked workspace unchunked is cached.
    let wf = chunked.path().join("flow.toml");
    let again = run(&wf, &["evaluate[fold=1]"]);
    assert!(executed(&again).is_empty(), "{again:?}");
}
