//! `pack_features` through the engine: a repack after a slide is added parses only the new file,
//! links the others' packed files, and writes what a pack from scratch writes; a packed slide
//! that lost its rows is named, with what to remove.

use std::fs;
use std::path::{Path, PathBuf};

use pipeline::{Dag, RunOptions, RunSummary, Status, Store};
use schemas::workflow::{OnBadFile, PackDtype};
use stages::synth::write_pt;

/// The index and pack nodes of the features in `dir`.
fn nodes(dir: &Path) -> [pipeline::Node; 2] {
    let features = stages::index::FeatureDir::External(dir.to_path_buf());
    stages::feature_nodes(&features, OnBadFile::Error, PackDtype::F32, None)
}

fn dag(dir: &Path) -> Dag {
    Dag::new(nodes(dir).into()).unwrap()
}

fn slide(dir: &Path, name: &str, rows: usize, seed: f32) {
    let values: Vec<f32> = (0..rows * 6).map(|v| v as f32 * seed).collect();
    write_pt(&dir.join(name), &values, rows, 6).unwrap();
}

/// The reasons `status` gives for the pack node being stale.
fn pack_status(dir: &Path, store: &Store) -> Vec<String> {
    let status = pipeline::status(&dag(dir), store, &[], false).unwrap();
    match &status[1].freshness {
        pipeline::Freshness::Stale(why) => why.clone(),
        fresh => panic!("pack_features is {fresh:?}"),
    }
}

/// Runs index and pack; returns the run and the directory of the pack's outputs.
fn pack(dir: &Path, store: &Store) -> (RunSummary, PathBuf) {
    let summary = pipeline::run(&dag(dir), store, &RunOptions::default()).unwrap();
    let node = &summary.nodes[1];
    assert_eq!(node.status, Status::Executed, "{:?}", node.reason);
    let key = node.key.clone().unwrap();
    (summary, store.object_dir(&key))
}

#[test]
fn a_repack_parses_only_new_files_and_equals_a_pack_from_scratch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    fs::create_dir_all(&dir).unwrap();
    for (i, rows) in [3usize, 5, 4].iter().enumerate() {
        slide(&dir, &format!("s{i}.pt"), *rows, i as f32 + 0.5);
    }
    let incremental = Store::open(&tmp.path().join("ws")).unwrap();
    pack(&dir, &incremental);

    // An unchanged file becomes garbage of the same size and mtime: indexing trusts its recorded
    // digest, so only a repack that parsed it again could notice.
    let victim = dir.join("s1.pt");
    let (original, mtime) = (fs::read(&victim).unwrap(), fs::metadata(&victim).unwrap().modified().unwrap());
    let keep_mtime = |bytes: &[u8]| {
        fs::write(&victim, bytes).unwrap();
        fs::File::options().write(true).open(&victim).unwrap().set_modified(mtime).unwrap();
    };
    keep_mtime(&vec![0xAB; original.len()]);
    slide(&dir, "s3.pt", 2, 9.0);
    // With the new file indexed, status names the one slide a pack would parse.
    let [index, _] = nodes(&dir);
    let index_only = Dag::new(vec![index]).unwrap();
    pipeline::run(&index_only, &incremental, &RunOptions::default()).unwrap();
    let why = pack_status(&dir, &incremental);
    assert!(why.iter().any(|w| w == "1 of 4 slide(s) to pack (3 packed already with these settings): s3"), "{why:?}");
    let (_, repacked) = pack(&dir, &incremental);
    keep_mtime(&original);

    let scratch = Store::open(&tmp.path().join("scratch")).unwrap();
    let (_, full) = pack(&dir, &scratch);
    assert_eq!(files(&repacked), files(&full));
    let sizes: Vec<u64> = ["s0", "s1", "s2", "s3"]
        .iter()
        .map(|s| fs::metadata(full.join(format!("features/{s}.bin"))).unwrap().len())
        .collect();
    assert_eq!(sizes, [3 * 6 * 4, 5 * 6 * 4, 4 * 6 * 4, 2 * 6 * 4]);
}

#[test]
fn a_packed_slide_missing_its_rows_is_named_with_the_folder_to_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("feats");
    fs::create_dir_all(&dir).unwrap();
    slide(&dir, "s0.pt", 3, 0.5);
    let store = Store::open(&tmp.path().join("ws")).unwrap();
    pack(&dir, &store);
    // The kept slide item loses its rows (as one cleared while a job still wrote it did).
    let items = tmp.path().join("ws/items");
    let rows = walk(&items).into_iter().find(|p| p.ends_with("features.bin")).expect("a packed slide item");
    fs::remove_file(&rows).unwrap();
    let item = rows.parent().unwrap().to_path_buf();

    slide(&dir, "s1.pt", 2, 9.0);
    let summary = pipeline::run(&dag(&dir), &store, &RunOptions::default()).unwrap();
    let node = &summary.nodes[1];
    assert_eq!(node.status, Status::Failed);
    let said = node.reason.clone().unwrap_or_default();
    let expected = format!("{}: missing; remove {} to pack the slide again", rows.display(), item.display());
    assert!(said.contains(&expected), "{said}");
    // Doing as it says packs both slides.
    fs::remove_dir_all(&item).unwrap();
    let (_, object) = pack(&dir, &store);
    assert_eq!(fs::metadata(object.join("features/s0.bin")).unwrap().len(), 3 * 6 * 4);
}

/// Every file under `dir`, at any depth.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Every file of a pack's outputs by path, with its bytes.
fn files(object: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("packed.parquet".to_owned(), fs::read(object.join("packed.parquet")).unwrap())];
    for dir in ["features", "coords"] {
        let mut names: Vec<String> =
            fs::read_dir(object.join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        for name in names {
            let path = format!("{dir}/{name}");
            out.push((path.clone(), fs::read(object.join(&path)).unwrap()));
        }
    }
    assert_eq!(out.len(), 9, "the table and two files for each of 4 slides");
    out
}
