//! Garbage collection: removing the store objects that nothing keeps, so a workspace does not
//! grow without bound as labels and settings change.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use crate::error::{Result, io};
use crate::items::unlinked;
use crate::store::{Manifest, Store};

/// A store object that nothing keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub key: String,
    /// The node that made it, as its manifest says (none when the manifest is unreadable).
    pub node: Option<String>,
    /// Bytes of its files.
    pub bytes: u64,
    pub kind: GarbageKind,
}

/// What a [`Garbage`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GarbageKind {
    /// A node's published outputs.
    Object,
    /// A per-slide item (see `Context::item`).
    Item,
    /// The folder of a node's run as a cluster job (its log, request and job id).
    Attempt,
}

/// The objects of `store` whose keys are not in `keep`, largest first, then the per-slide items
/// nothing links any more; removed unless `dry_run`.
/// Holds the workspace lock, so no run publishes meanwhile. Each object is first renamed into
/// staging, so an interrupted collection leaves no half-removed object behind.
pub fn collect_garbage(
    store: &Store,
    keep: &HashSet<String>,
    keep_jobs: &HashSet<String>,
    dry_run: bool,
) -> Result<Vec<Garbage>> {
    let _lock = store.lock(false)?;
    let objects = store.root().join("objects");
    let mut garbage = Vec::new();
    for entry in fs::read_dir(&objects).map_err(io(&objects))?.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&key) {
            continue;
        }
        let dir = entry.path();
        let node = fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Manifest>(&bytes).ok())
            .map(|m| m.node);
        garbage.push(Garbage { bytes: size(&dir), key, node, kind: GarbageKind::Object });
    }
    garbage.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.key.cmp(&b.key)));
    if !dry_run {
        for g in &garbage {
            remove(store, &objects.join(&g.key), &g.key)?;
        }
    }
    // Per-slide items whose files no object links (after the removals above; a dry run lists
    // only those unlinked already).
    for dir in unlinked(&store.root().join("items")) {
        let key = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        garbage.push(Garbage { bytes: size(&dir), node: None, key: key.clone(), kind: GarbageKind::Item });
        if !dry_run {
            remove(store, &dir, &key)?;
        }
    }
    // Cluster jobs' folders, but those of the jobs in `keep_jobs` (whose logs may be wanted).
    for entry in fs::read_dir(store.attempts_dir()).into_iter().flatten().flatten() {
        let job = fs::read_to_string(entry.path().join(crate::attempt::JOB_ID)).unwrap_or_default();
        if keep_jobs.contains(job.trim()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        garbage.push(Garbage { bytes: size(&entry.path()), node: None, key: name.clone(), kind: GarbageKind::Attempt });
        if !dry_run {
            remove(store, &entry.path(), &name)?;
        }
    }
    Ok(garbage)
}

/// Renames `dir` into staging, then removes it.
fn remove(store: &Store, dir: &Path, key: &str) -> Result<()> {
    let trash = store.root().join("staging").join(format!("gc-{key}"));
    fs::rename(dir, &trash).map_err(io(dir))?;
    fs::remove_dir_all(&trash).map_err(io(&trash))
}

/// Bytes of the files under `path` (links not followed).
fn size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).into_iter().flatten().flatten().map(|e| size(&e.path())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_is_kept_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (key, bytes) in [("kept", 3), ("small", 5), ("large", 50)] {
            let object = store.object_dir(key);
            fs::create_dir_all(&object).unwrap();
            fs::write(object.join("out.bin"), vec![0u8; bytes]).unwrap();
        }
        let keep: HashSet<String> = ["kept".to_owned()].into();
        let planned = collect_garbage(&store, &keep, &HashSet::new(), true).unwrap();
        let named: Vec<(&str, u64)> = planned.iter().map(|g| (g.key.as_str(), g.bytes)).collect();
        assert_eq!(named, [("large", 50), ("small", 5)]);
        assert!(store.object_dir("large").is_dir(), "a dry run removes nothing");
        assert_eq!(collect_garbage(&store, &keep, &HashSet::new(), false).unwrap(), planned);
        assert!(!store.object_dir("large").exists() && !store.object_dir("small").exists());
        assert!(store.object_dir("kept").join("out.bin").is_file());
    }

    #[test]
    fn an_item_goes_with_the_last_object_that_links_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let items = store.root().join("items");
        for item in ["linked", "loose"] {
            fs::create_dir_all(items.join(item)).unwrap();
            fs::write(items.join(item).join("slide.h5"), b"features").unwrap();
        }
        for key in ["old", "kept"] {
            fs::create_dir_all(store.object_dir(key)).unwrap();
        }
        fs::hard_link(items.join("linked/slide.h5"), store.object_dir("old").join("slide.h5")).unwrap();
        let only_old: HashSet<String> = ["kept".to_owned()].into();
        let planned: Vec<String> =
            collect_garbage(&store, &only_old, &HashSet::new(), true).unwrap().into_iter().map(|g| g.key).collect();
        assert_eq!(planned, ["old", "loose"], "a dry run lists the items unlinked already");
        let removed: Vec<String> =
            collect_garbage(&store, &only_old, &HashSet::new(), false).unwrap().into_iter().map(|g| g.key).collect();
        assert_eq!(removed, ["old", "linked", "loose"], "removing `old` leaves `linked` unlinked");
        assert_eq!(fs::read_dir(&items).unwrap().count(), 0);
    }

    #[test]
    fn the_folders_of_jobs_no_kept_run_ran_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let attempts = store.attempts_dir();
        for (name, job) in [("train-1", Some("41")), ("train-2", Some("42")), ("pack-1", None)] {
            fs::create_dir_all(attempts.join(name)).unwrap();
            if let Some(job) = job {
                fs::write(attempts.join(name).join(crate::attempt::JOB_ID), job).unwrap();
            }
        }
        let jobs: HashSet<String> = ["42".to_owned()].into();
        let removed = collect_garbage(&store, &HashSet::new(), &jobs, false).unwrap();
        let mut names: Vec<(&str, GarbageKind)> = removed.iter().map(|g| (g.key.as_str(), g.kind)).collect();
        names.sort();
        assert_eq!(names, [("pack-1", GarbageKind::Attempt), ("train-1", GarbageKind::Attempt)]);
        assert!(attempts.join("train-2").is_dir(), "a kept run's job keeps its log");
    }
}
