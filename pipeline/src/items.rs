//! Per-item results that outlive a node's run: the work a stage does for each slide, cached by
//! what that slide's result depends on and published one by one. A run killed mid-cohort keeps
//! the slides it finished; a cohort with one new slide makes only that slide's item.
//!
//! Items live in `items/<key>/` of the workspace. A stage's outputs hard-link the item files they
//! use, so a published node never depends on an item directory staying there: `gc` removes the
//! items whose files no store object links.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::digest::hash_bytes;
use crate::stage::StageError;
use crate::store::canonical;

/// Where one stage's items are, and what their keys are salted with (the stage's kind, code
/// version and params).
#[derive(Debug, Clone)]
pub struct ItemCache {
    pub(crate) dir: PathBuf,
    pub(crate) staging: PathBuf,
    pub(crate) salt: serde_json::Value,
    /// Make every item again, replacing what earlier runs made (a node run with `--force`).
    pub(crate) remake: bool,
}

/// An item's directory, and whether this call made it.
#[derive(Debug, Clone)]
pub struct Item {
    pub dir: PathBuf,
    pub made: bool,
}

impl ItemCache {
    fn key(&self, facts: &serde_json::Value) -> String {
        let key_json = canonical(&serde_json::json!({ "stage": self.salt, "facts": facts }));
        hash_bytes(&serde_json::to_vec(&key_json).expect("serialises"))
    }

    /// Whether the item for `facts` was made.
    pub fn exists(&self, facts: &serde_json::Value) -> bool {
        self.dir.join(self.key(facts)).is_dir()
    }

    /// The item for `facts`, made by `make` into an empty directory when there is none yet.
    pub fn get_or_make(
        &self,
        facts: &serde_json::Value,
        make: impl FnOnce(&Path) -> Result<(), StageError>,
    ) -> Result<Item, StageError> {
        let key = self.key(facts);
        let dir = self.dir.join(&key);
        if dir.is_dir() && !self.remake {
            return Ok(Item { dir, made: false });
        }
        let nonce =
            hash_bytes(format!("{key}{:?}{:?}", std::thread::current().id(), std::time::Instant::now()).as_bytes());
        let staging = self.staging.join(format!("item-{}", &nonce[..16]));
        let io = |path: &Path, e: std::io::Error| -> StageError { format!("{}: {e}", path.display()).into() };
        fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        if let Err(e) = make(&staging) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        if self.remake && dir.is_dir() {
            let old = self.staging.join(format!("item-old-{}", &nonce[..16]));
            fs::rename(&dir, &old).map_err(|e| io(&dir, e))?;
            let _ = fs::remove_dir_all(&old);
        }
        match fs::rename(&staging, &dir) {
            Ok(()) => Ok(Item { dir, made: true }),
            // Another thread made the same item meanwhile: keep theirs.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                Ok(Item { dir, made: true })
            }
            Err(e) => Err(io(&dir, e)),
        }
    }
}

/// The item directories under `items` whose files no other path links (each has one link).
pub(crate) fn unlinked(items: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(items).into_iter().flatten().flatten() {
        let files: Vec<fs::Metadata> =
            fs::read_dir(entry.path()).into_iter().flatten().flatten().filter_map(|f| f.metadata().ok()).collect();
        if files.iter().all(|m| m.nlink() <= 1) {
            out.push(entry.path());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(root: &Path, params: serde_json::Value) -> ItemCache {
        ItemCache { dir: root.join("items"), staging: root.join("staging"), salt: params, remake: false }
    }

    #[test]
    fn an_item_is_made_once_and_keyed_by_its_facts_and_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let a = cache(dir.path(), serde_json::json!({"mpp": 0.5}));
        let facts = serde_json::json!({"slide": "s1", "hash": "abc"});
        let write = |d: &Path| -> Result<(), StageError> { Ok(fs::write(d.join("tiles.parquet"), b"x")?) };
        let first = a.get_or_make(&facts, write).unwrap();
        assert!(first.made && first.dir.join("tiles.parquet").is_file());
        assert!(a.exists(&facts) && !a.exists(&serde_json::json!({"slide": "s9"})));
        let again = a.get_or_make(&facts, |_| panic!("made twice")).unwrap();
        assert!(!again.made && again.dir == first.dir);
        let forced = ItemCache { remake: true, ..a.clone() };
        let remade = forced.get_or_make(&facts, |d| Ok(fs::write(d.join("tiles.parquet"), b"y")?)).unwrap();
        assert!(remade.made && fs::read(remade.dir.join("tiles.parquet")).unwrap() == b"y", "forced: made again");
        let other_slide = a.get_or_make(&serde_json::json!({"slide": "s2", "hash": "abc"}), write).unwrap();
        let other_params = cache(dir.path(), serde_json::json!({"mpp": 1.0})).get_or_make(&facts, write).unwrap();
        assert!(other_slide.made && other_params.made && other_slide.dir != other_params.dir);
    }

    #[test]
    fn a_failed_item_leaves_nothing_and_unlinked_items_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), serde_json::json!({}));
        let failed = c.get_or_make(&serde_json::json!(1), |d| {
            fs::write(d.join("half"), b"x")?;
            Err("bad slide".into())
        });
        assert_eq!(failed.unwrap_err().to_string(), "bad slide");
        assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
        let kept = c.get_or_make(&serde_json::json!(2), |d| Ok(fs::write(d.join("f"), b"x")?)).unwrap();
        let loose = c.get_or_make(&serde_json::json!(3), |d| Ok(fs::write(d.join("f"), b"x")?)).unwrap();
        fs::hard_link(kept.dir.join("f"), dir.path().join("object-file")).unwrap();
        assert_eq!(unlinked(&dir.path().join("items")), [loose.dir]);
    }
}
