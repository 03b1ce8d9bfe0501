//! `index_features` through the engine: bad files fail or are skipped by policy, mixed
//! dimensions fail, and an unchanged re-index reads no feature bytes.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use pipeline::{Dag, Node, RunOptions, Status, Store};
use schemas::workflow::OnBadFile;
use stages::index::IndexFeatures;
use stages::synth::write_pt;

fn index_dag(dir: &Path, on_bad_file: OnBadFile) -> Dag {
    Dag::new(vec![Node::new(
        "index_features",
        None,
        Arc::new(IndexFeatures { features: stages::index::FeatureDir::External(dir.into()), on_bad_file }),
    )])
    .unwrap()
}

fn features(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for (i, rows) in [3usize, 5, 4].iter().enumerate() {
        let values: Vec<f32> = (0..rows * 8).map(|v| v as f32).collect();
        write_pt(&dir.join(format!("s{i}.pt")), &values, *rows, 8).unwrap();
    }
}

fn run(dag: &Dag, store: &Store, force: bool) -> pipeline::RunSummary {
    let force = if force { vec!["index_features".to_owned()] } else { Vec::new() };
    pipeline::run(dag, store, &RunOptions { force, ..Default::default() }).unwrap()
}

#[test]
fn bad_file_fails_naming_it_or_is_skipped_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    features(&dir);
    fs::write(dir.join("broken.pt"), b"PK\x03\x04 not really").unwrap();
    let store = Store::open(&tmp.path().join("ws")).unwrap();
    let failed = run(&index_dag(&dir, OnBadFile::Error), &store, false);
    let reason = failed.nodes[0].reason.clone().unwrap();
    assert_eq!(failed.nodes[0].status, Status::Failed);
    assert!(reason.contains("broken.pt") && reason.contains("on_bad_file"), "{reason}");
    let ok = run(&index_dag(&dir, OnBadFile::Skip), &store, false);
    assert_eq!(ok.nodes[0].status, Status::Executed);
    let key = ok.nodes[0].key.clone().unwrap();
    let skipped = fs::read(store.object_dir(&key).join("skipped.parquet")).unwrap();
    assert!(skipped.windows(9).any(|w| w == b"broken.pt"));
}

#[test]
fn mixed_dimensions_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    features(&dir);
    write_pt(&dir.join("odd.pt"), &[0.0; 12], 3, 4).unwrap();
    let store = Store::open(&tmp.path().join("ws")).unwrap();
    let failed = run(&index_dag(&dir, OnBadFile::Error), &store, false);
    let reason = failed.nodes[0].reason.clone().unwrap();
    assert!(reason.contains("feature dimensions differ") && reason.contains("odd.pt"), "{reason}");
}

#[test]
fn unchanged_reindex_reads_no_feature_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    features(&dir);
    let store = Store::open(&tmp.path().join("ws")).unwrap();
    let dag = index_dag(&dir, OnBadFile::Error);
    let first = run(&dag, &store, false);
    // Overwrite a file with different bytes of the same size, then restore its mtime: a reader
    // would see new content (and a new digest); an index that trusts (path, size, mtime) does not.
    let path = dir.join("s1.pt");
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 30;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    let second = run(&dag, &store, true);
    assert_eq!(second.nodes[0].status, Status::Executed);
    assert_eq!(first.nodes[0].key, second.nodes[0].key, "same listing, same key");
    let a = fs::read(store.object_dir(first.nodes[0].key.as_ref().unwrap()).join("features.parquet")).unwrap();
    assert!(!a.is_empty());
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(store.object_dir(second.nodes[0].key.as_ref().unwrap()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["run_id"], second.run_id, "re-executed");
    // The features table still carries the first digest: the file was not read again.
    let table = fs::read(store.object_dir(second.nodes[0].key.as_ref().unwrap()).join("features.parquet")).unwrap();
    assert_eq!(table, a, "identical index output");
}

#[test]
fn status_names_the_feature_files_that_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    features(&dir);
    let store = Store::open(&tmp.path().join("ws")).unwrap();
    let dag = index_dag(&dir, OnBadFile::Error);
    run(&dag, &store, false);
    store.stat_cache().save().unwrap();
    write_pt(&dir.join("s1.pt"), &[1.0; 16], 2, 8).unwrap();
    write_pt(&dir.join("s9.pt"), &[1.0; 16], 2, 8).unwrap();
    let status = pipeline::status(&dag, &store, &[], false).unwrap();
    let pipeline::Freshness::Stale(why) = &status[0].freshness else { panic!("{:?}", status[0].freshness) };
    assert!(why.iter().any(|w| w == "2 of 4 feature file(s) new or changed: s1, s9"), "{why:?}");
}
