//! The results folder: a workflow's current outputs under readable names, as hard links into the
//! store (symbolic links where the store is on another file system), never second copies.
//!
//! The folder is a symbolic link to a hidden sibling directory, `.<name>.<run id>`. A refresh
//! fills a new sibling and renames a new link over the old one, so a reader sees the old folder
//! or the new one, never a mix; the old sibling is removed afterwards. Removing the folder loses
//! nothing: the store keeps every file.

use std::fs;
use std::path::{Path, PathBuf};

use crate::dag::Dag;
use crate::error::{Error, Result, io};
use crate::explain::{Freshness, NodeStatus};
use crate::store::{Store, is_directory};

/// Points the results folder `dir` at the outputs of every node that `status` (of the whole
/// `dag`) finds fresh, each under its node's `results` folder. Returns the nodes without current
/// outputs (not run yet, or failed), whose files the folder lacks.
pub fn refresh_results(dir: &Path, dag: &Dag, store: &Store, status: &[NodeStatus]) -> Result<Vec<String>> {
    let (parent, name) = split(dir)?;
    let previous = current_target(dir, &name)?;
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_leftovers(&parent, &name, previous.as_deref());
    let nonce = crate::exec::new_run_id();
    let target_name = format!(".{name}.{nonce}");
    let target = parent.join(&target_name);
    let (mut missing, mut linked) = (Vec::new(), std::collections::HashSet::new());
    for s in status {
        let (Freshness::Fresh, Some(key)) = (&s.freshness, &s.key) else {
            missing.push(s.id.clone());
            continue;
        };
        let node = dag.node(dag.index_of(&s.id).expect("a status is of a node of the DAG"));
        for output in node.stage.outputs() {
            let artifact = output.name;
            if node.results_hidden.iter().any(|h| h == artifact) {
                continue;
            }
            let relative = node.results_path(artifact);
            if !linked.insert(relative.clone()) {
                let _ = fs::remove_dir_all(&target);
                return Err(Error::ResultsFolder {
                    path: dir.to_path_buf(),
                    message: format!(
                        "would hold two files named {} (internal: two nodes share a folder)",
                        relative.display()
                    ),
                });
            }
            let from = store.object_dir(key).join(artifact);
            if is_directory(artifact) {
                fs::create_dir_all(target.join(&relative)).map_err(io(&target))?;
                for entry in fs::read_dir(&from).map_err(io(&from))?.flatten() {
                    link(&entry.path(), &target.join(&relative).join(entry.file_name()))?;
                }
            } else {
                link(&from, &target.join(&relative))?;
            }
        }
    }
    fs::create_dir_all(&target).map_err(io(&target))?;
    let new_link = parent.join(format!(".{name}.{nonce}.link"));
    std::os::unix::fs::symlink(&target_name, &new_link).map_err(io(&new_link))?;
    fs::rename(&new_link, dir).map_err(io(dir))?;
    if let Some(old) = previous {
        let _ = fs::remove_dir_all(parent.join(old));
    }
    Ok(missing)
}

/// Whether `file` is a hidden directory (or link, `….link`) that a refresh of folder `name` made:
/// `.<name>.<run id>`, where a run id is `YYYYMMDDTHHMMSSZ-xxxxxx`. Exact, so that the folder
/// `demo` never takes the directories of a neighbour named `demo.v2`.
fn made_for(file: &str, name: &str) -> bool {
    let Some(rest) = file.strip_prefix('.').and_then(|f| f.strip_prefix(name)).and_then(|f| f.strip_prefix('.')) else {
        return false;
    };
    let id = rest.strip_suffix(".link").unwrap_or(rest).as_bytes();
    id.len() == 23
        && id.iter().enumerate().all(|(i, &c)| match i {
            8 => c == b'T',
            15 => c == b'Z',
            16 => c == b'-',
            0..8 | 9..15 => c.is_ascii_digit(),
            _ => c.is_ascii_hexdigit(),
        })
}

/// Removes what refreshes killed part-way left beside the folder, keeping its current `target`.
fn remove_leftovers(parent: &Path, name: &str, target: Option<&Path>) {
    for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
        let file = entry.file_name();
        if made_for(&file.to_string_lossy(), name) && target != Some(Path::new(&file)) {
            let path = entry.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

/// The folder's parent directory and name.
fn split(dir: &Path) -> Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::ResultsFolder { path: dir.to_path_buf(), message: "is not a folder name".into() })?;
    let parent = dir.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    Ok((parent, name))
}

/// The hidden directory the folder links to now, if any; an error if `dir` is something else
/// (a directory or link the user made), which a refresh must not replace.
fn current_target(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let Ok(meta) = fs::symlink_metadata(dir) else { return Ok(None) };
    let not_ours = |message: &str| Error::ResultsFolder { path: dir.to_path_buf(), message: message.into() };
    if !meta.file_type().is_symlink() {
        return Err(not_ours("exists and is not a results folder made by hmil-flow"));
    }
    let target = fs::read_link(dir).map_err(io(dir))?;
    let ours = target.parent() == Some(Path::new("")) && made_for(&target.to_string_lossy(), name);
    if !ours {
        return Err(not_ours(&format!("links to {}, not to a results folder made by hmil-flow", target.display())));
    }
    Ok(Some(target))
}

/// Links `to` to the store file `from`: a hard link, or a symbolic one across file systems.
fn link(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().expect("a file in a folder");
    fs::create_dir_all(dir).map_err(io(dir))?;
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    let absolute = fs::canonicalize(from).map_err(io(from))?;
    std::os::unix::fs::symlink(absolute, to).map_err(io(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_the_user_made_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("demo");
        fs::create_dir(&mine).unwrap();
        let err = current_target(&mine, "demo").unwrap_err().to_string();
        assert!(err.contains("is not a results folder made by hmil-flow; move it away"), "{err}");
        let elsewhere = dir.path().join("other");
        std::os::unix::fs::symlink("/tmp", &elsewhere).unwrap();
        assert!(current_target(&elsewhere, "other").unwrap_err().to_string().contains("links to /tmp"));
        let ours = ".x.20261125T171508Z-da7cc5";
        std::os::unix::fs::symlink(ours, dir.path().join("x")).unwrap();
        assert_eq!(current_target(&dir.path().join("x"), "x").unwrap(), Some(PathBuf::from(ours)));
    }

    #[test]
    fn a_neighbour_with_a_longer_name_is_not_taken_for_ours() {
        assert!(made_for(".demo.20261125T171508Z-da7cc5", "demo"));
        assert!(made_for(".demo.20261125T171508Z-da7cc5.link", "demo"));
        assert!(!made_for(".demo.v2.20261125T171508Z-da7cc5", "demo"));
        assert!(!made_for(".demo.20261125T171508Z-da7cc5x", "demo"));
        assert!(!made_for(".demo.notes", "demo"));
        let dir = tempfile::tempdir().unwrap();
        let neighbour = dir.path().join(".demo.v2.20261125T171508Z-da7cc5");
        fs::create_dir(&neighbour).unwrap();
        remove_leftovers(dir.path(), "demo", None);
        assert!(neighbour.is_dir(), "refreshing demo leaves demo.v2 alone");
        remove_leftovers(dir.path(), "demo.v2", None);
        assert!(!neighbour.exists(), "a leftover of demo.v2 is removed by demo.v2's refresh");
    }
}
