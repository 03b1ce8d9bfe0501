//! The content-addressed store: published outputs by cache key, per-node records, staging, lock.
//!
//! Layout under the workspace directory:
//! - `objects/<key>/` — a node's outputs and `manifest.json`, published by one atomic rename;
//! - `items/<key>/` — per-slide work of a stage, kept across runs (see [`crate::items`]);
//! - `nodes/<node id>.json` — what each node last ran with, to explain why it would rerun;
//! - `staging/` — where running stages write; anything left here by a killed run is discarded;
//! - `attempts/<node>-<time>/` — nodes run as cluster jobs (see [`crate::SlurmExecutor`]);
//! - `runs/<run id>.parquet` — the `runs` table; `stat-cache.json` — file digests;
//! - `run.lock` — the workspace lock (see [`crate::lock`]).

use std::collections::{BTreeMap, HashMap};
use std::fs;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::digest::{Stat, StatCache, hash_bytes, hash_file};
use crate::error::{Error, Result, io};
use crate::fsutil::write_atomic;
use crate::lock::WorkspaceLock;

/// Everything a cache key is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub kind: String,
    pub code_version: String,
    pub params: serde_json::Value,
    /// Input name → (description, digest).
    pub inputs: BTreeMap<String, InputDigest>,
}

/// Digest of one input, with how a person would name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputDigest {
    pub describe: String,
    pub digest: String,
}

impl KeyParts {
    /// The cache key: BLAKE3 of the canonical JSON of the parts (object keys sorted).
    pub fn key(&self) -> String {
        let canonical =
            serde_json::to_vec(&canonical(&serde_json::to_value(self).expect("serialises"))).expect("serialises");
        hash_bytes(&canonical)
    }
}

/// `value` with every object's keys in sorted order.
pub fn canonical(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, serde_json::Value> = map.iter().map(|(k, v)| (k, canonical(v))).collect();
            serde_json::to_value(sorted).expect("serialises")
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// One published output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    pub digest: String,
    pub stat: Stat,
}

/// Written beside a node's outputs: what made them and what they must hash to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub node: String,
    pub parts: KeyParts,
    pub outputs: BTreeMap<String, OutputRecord>,
    pub run_id: String,
    pub created_at: String,
    pub seconds: f64,
    pub engine_version: String,
    /// What the stage warned about while making these outputs (see `Context::warn`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Each directory output's digest, once asked for (every downstream key asks).
    #[serde(skip)]
    pub(crate) dir_digests: OnceLock<BTreeMap<String, String>>,
}

impl Manifest {
    /// The digest of output `name`: a file's, or for a directory output the digest of its files'
    /// names and digests. None when the manifest lacks it.
    pub fn artifact_digest(&self, name: &str) -> Option<String> {
        if !is_directory(name) {
            return self.outputs.get(name).map(|o| o.digest.clone());
        }
        // A directory without files digests as an empty listing.
        let digest = self.dir_digests.get_or_init(|| self.directory_digests()).get(name).cloned();
        Some(digest.unwrap_or_else(|| hash_bytes(b"")))
    }

    /// The digest of each directory output: of the listing "<file>\t<digest>\n" of its files.
    fn directory_digests(&self) -> BTreeMap<String, String> {
        let mut hashers: BTreeMap<&str, blake3::Hasher> = BTreeMap::new();
        for (file, o) in &self.outputs {
            let Some(slash) = file.find('/') else { continue };
            let hasher = hashers.entry(&file[..=slash]).or_default();
            for part in [file.as_str(), "\t", &o.digest, "\n"] {
                hasher.update(part.as_bytes());
            }
        }
        hashers.into_iter().map(|(dir, h)| (dir.to_owned(), h.finalize().to_hex().to_string())).collect()
    }
}

/// A name no other call makes: `tag`, this process and thread, and the time, hashed.
fn nonce(tag: &str) -> String {
    let (pid, thread) = (std::process::id(), std::thread::current().id());
    hash_bytes(format!("{tag}{pid}{thread:?}{:?}", std::time::Instant::now()).as_bytes())
}

/// `node_id` as part of a file name: letters, digits and `-_=.,` kept, anything else `_`.
pub(crate) fn file_name_of(node_id: &str) -> String {
    node_id.chars().map(|c| if c.is_ascii_alphanumeric() || "-_=.,".contains(c) { c } else { '_' }).collect()
}

/// Whether a declared output is a directory of files (its name ends in `/`), such as one
/// feature file per slide; each of its files is digested and checked on its own.
pub fn is_directory(output: &str) -> bool {
    output.ends_with('/')
}

/// What a node last ran (or was found cached) with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub parts: KeyParts,
}

/// Outcome of looking a key up.
#[derive(Debug)]
pub enum Lookup {
    /// Published and every output checks out.
    Hit(Arc<Manifest>),
    /// Nothing published under this key.
    Missing,
    /// Published, but an output is gone or its bytes changed.
    Damaged(String),
}

/// The content-addressed store of one workspace.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    stat_cache: StatCache,
    /// Objects this process found intact, by key: checking a published object stats every file,
    /// thousands for a packed cohort, so a run checks each once.
    intact: Mutex<HashMap<String, Arc<Manifest>>>,
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["objects", "items", "nodes", "staging", "runs"] {
            fs::create_dir_all(root.join(sub)).map_err(io(root.join(sub)))?;
        }
        let stat_cache = StatCache::load(root.join("stat-cache.json"));
        Ok(Store { root: root.to_path_buf(), stat_cache, intact: Mutex::default() })
    }

    /// The workspace directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The digest cache shared by all stages of this workspace.
    pub fn stat_cache(&self) -> &StatCache {
        &self.stat_cache
    }

    /// Directory holding the outputs published under `key`.
    pub fn object_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    /// Where `stage` (with its current code version and params) keeps its per-item work; with
    /// `remake`, every item it asks for is made again.
    pub fn item_cache(&self, stage: &dyn crate::Stage, remake: bool) -> crate::items::ItemCache {
        crate::items::ItemCache {
            remake,
            dir: self.root.join("items"),
            staging: self.root.join("staging"),
            salt: serde_json::json!({
                "kind": stage.kind(),
                "code_version": stage.code_version(),
                "params": stage.params(),
            }),
        }
    }

    /// Where the folders of nodes run as cluster jobs are (see [`crate::SlurmExecutor`]).
    pub fn attempts_dir(&self) -> PathBuf {
        self.root.join("attempts")
    }

    /// Directory of the `runs` table.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// Looks `key` up and checks its outputs against the manifest. A file whose size or mtime
    /// changed is re-hashed; with `verify` every file is re-hashed. Without `verify`, an object
    /// found intact is not checked again by this process.
    pub fn lookup(&self, key: &str, verify: bool) -> Result<Lookup> {
        if !verify && let Some(manifest) = self.intact.lock().expect("lookup memo poisoned").get(key) {
            return Ok(Lookup::Hit(Arc::clone(manifest)));
        }
        let dir = self.object_dir(key);
        let manifest_path = dir.join("manifest.json");
        let Ok(bytes) = fs::read(&manifest_path) else {
            return Ok(Lookup::Missing);
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) else {
            return Ok(Lookup::Damaged("its manifest is unreadable".into()));
        };
        for (name, rec) in &manifest.outputs {
            let path = dir.join(name);
            let Ok(stat) = Stat::of(&path) else {
                return Ok(Lookup::Damaged(format!("output {name} is missing")));
            };
            if (verify || stat != rec.stat) && hash_file(&path)? != rec.digest {
                return Ok(Lookup::Damaged(format!("output {name} does not match its digest")));
            }
        }
        let manifest = Arc::new(manifest);
        if !verify {
            self.intact.lock().expect("lookup memo poisoned").insert(key.to_owned(), Arc::clone(&manifest));
        }
        Ok(Lookup::Hit(manifest))
    }

    /// A fresh, empty staging directory for one stage execution.
    pub fn staging_dir(&self, node_id: &str) -> Result<PathBuf> {
        let dir = self.root.join("staging").join(&nonce(node_id)[..16]);
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Removes whatever earlier, interrupted runs left in staging.
    pub fn clear_staging(&self) -> Result<()> {
        let dir = self.root.join("staging");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io(&dir))
    }

    /// Digests the outputs in `staging` (each file of a directory output, see [`is_directory`]),
    /// writes the manifest, and publishes the directory under the manifest's key with one rename.
    /// An intact object already under that key stands (another node of the same key, the same
    /// work, published first) unless `replace`, as for a forced rerun; a damaged one is replaced.
    pub fn publish(&self, staging: &Path, mut manifest: Manifest, outputs: &[&str], replace: bool) -> Result<Manifest> {
        for &name in outputs {
            let files = if is_directory(name) {
                let dir = staging.join(name);
                let mut files: Vec<String> = fs::read_dir(&dir)
                    .map_err(io(&dir))?
                    .flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| format!("{name}{}", e.file_name().to_string_lossy()))
                    .collect();
                files.sort();
                files
            } else {
                vec![name.to_owned()]
            };
            for file in files {
                let path = staging.join(&file);
                let meta = fs::metadata(&path).map_err(io(&path))?;
                let digest = self.stat_cache.linked_digest(&path, &meta)?;
                manifest.outputs.insert(file, OutputRecord { digest, stat: Stat::of_metadata(&meta) });
            }
        }
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        write_atomic(&staging.join("manifest.json"), &json)?;
        let target = self.object_dir(&manifest.key);
        if replace {
            self.move_aside(&target)?;
        }
        // A rename onto an object fails (it is never empty): another node of this key published
        // first, and its intact outputs stand, or a damaged object is in the way once.
        let mut in_the_way = false;
        while let Err(e) = fs::rename(staging, &target) {
            if let Some(published) = self.published_instead(&manifest.key, staging)? {
                return Ok(published);
            }
            if in_the_way {
                return Err(Error::Io { path: target, source: e });
            }
            self.move_aside(&target)?;
            in_the_way = true;
        }
        // Renaming the directory keeps the files' mtimes, so the recorded stats still hold; what
        // this process found under the key before is gone.
        self.intact.lock().expect("lookup memo poisoned").remove(&manifest.key);
        Ok(manifest)
    }

    /// Moves the object at `target` out of the store, if one is there, and deletes it.
    fn move_aside(&self, target: &Path) -> Result<()> {
        let aside = self.root.join("staging").join(format!("replaced-{}", &nonce("aside")[..16]));
        match fs::rename(target, &aside) {
            Ok(()) => {
                let _ = fs::remove_dir_all(&aside);
                Ok(())
            }
            // Not there, or another node of this key took it aside first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io { path: target.to_path_buf(), source: e }),
        }
    }

    /// The intact object already published under `key`, checked afresh, having discarded
    /// `staging`; `None` when there is none.
    fn published_instead(&self, key: &str, staging: &Path) -> Result<Option<Manifest>> {
        self.intact.lock().expect("lookup memo poisoned").remove(key);
        let Lookup::Hit(published) = self.lookup(key, false)? else {
            return Ok(None);
        };
        let _ = fs::remove_dir_all(staging);
        Ok(Some(Arc::unwrap_or_clone(published)))
    }

    fn record_path(&self, node_id: &str) -> PathBuf {
        let safe = file_name_of(node_id);
        self.root.join("nodes").join(format!("{safe}-{}.json", &hash_bytes(node_id.as_bytes())[..8]))
    }

    /// The last record of `node_id`, if it ever ran.
    pub fn record(&self, node_id: &str) -> Result<Option<Record>> {
        let path = self.record_path(node_id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| Error::Record { path, source }),
            Err(_) => Ok(None),
        }
    }

    /// Remembers what `node_id` now corresponds to.
    pub fn write_record(&self, node_id: &str, record: &Record) -> Result<()> {
        write_atomic(&self.record_path(node_id), &serde_json::to_vec_pretty(record).expect("serialises"))
    }

    /// Takes the workspace's lock for a run (see [`crate::lock`]), waiting for it when `wait`.
    pub fn lock(&self, wait: bool) -> Result<WorkspaceLock> {
        crate::lock::acquire(&self.root.join("run.lock"), &self.root, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: serde_json::Value) -> KeyParts {
        KeyParts { kind: "k".into(), code_version: "1".into(), params: p, inputs: BTreeMap::new() }
    }

    /// The manifest of a node `n` with these parts, before publication.
    fn manifest(parts: KeyParts) -> Manifest {
        Manifest {
            key: parts.key(),
            node: "n".into(),
            parts,
            outputs: BTreeMap::new(),
            run_id: "r".into(),
            created_at: String::new(),
            seconds: 0.0,
            engine_version: "t".into(),
            warnings: Vec::new(),
            dir_digests: Default::default(),
        }
    }

    #[test]
    fn key_ignores_object_key_order() {
        let a = parts(serde_json::json!({"a": 1, "b": {"x": 1, "y": 2}}));
        let b = parts(serde_json::json!({"b": {"y": 2, "x": 1}, "a": 1}));
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), parts(serde_json::json!({"a": 2, "b": {"x": 1, "y": 2}})).key());
    }

    /// A store in `dir` with one object, `out.txt`, published under the returned parts.
    fn published_out_txt(dir: &Path) -> (Store, KeyParts) {
        let store = Store::open(dir).unwrap();
        let stage = store.staging_dir("n").unwrap();
        fs::write(stage.join("out.txt"), b"payload").unwrap();
        let p = parts(serde_json::json!({}));
        store.publish(&stage, manifest(p.clone()), &["out.txt"], false).unwrap();
        (store, p)
    }

    #[test]
    fn publish_then_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (store, p) = published_out_txt(dir.path());
        assert!(matches!(store.lookup(&p.key(), true).unwrap(), Lookup::Hit(_)));
        let out = store.object_dir(&p.key()).join("out.txt");
        fs::write(&out, b"tampered").unwrap();
        assert!(matches!(store.lookup(&p.key(), false).unwrap(), Lookup::Damaged(m) if m.contains("out.txt")));
        fs::remove_file(&out).unwrap();
        assert!(matches!(store.lookup(&p.key(), false).unwrap(), Lookup::Damaged(m) if m.contains("missing")));
        assert!(matches!(store.lookup("nope", false).unwrap(), Lookup::Missing));
    }

    #[test]
    fn an_object_found_intact_is_checked_once_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let (store, p) = published_out_txt(dir.path());
        assert!(matches!(store.lookup(&p.key(), false).unwrap(), Lookup::Hit(_)));
        fs::remove_file(store.object_dir(&p.key()).join("out.txt")).unwrap();
        assert!(matches!(store.lookup(&p.key(), false).unwrap(), Lookup::Hit(_)), "not statted again");
        assert!(matches!(store.lookup(&p.key(), true).unwrap(), Lookup::Damaged(_)), "verify checks again");
        let next = Store::open(dir.path()).unwrap();
        assert!(matches!(next.lookup(&p.key(), false).unwrap(), Lookup::Damaged(m) if m.contains("missing")));
    }

    /// Publishes `body` as `out.txt` under `p`, replacing what stands when `replace`.
    fn publish_out_txt(store: &Store, p: &KeyParts, body: &str, replace: bool) -> Manifest {
        let stage = store.staging_dir("n").unwrap();
        fs::write(stage.join("out.txt"), body).unwrap();
        store.publish(&stage, manifest(p.clone()), &["out.txt"], replace).unwrap()
    }

    #[test]
    fn nodes_of_one_key_publishing_at_once_all_get_the_one_that_stands() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for round in 0..20 {
            let body = format!("round {round}");
            let p = parts(serde_json::json!(round));
            let published: Vec<Manifest> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6).map(|_| s.spawn(|| publish_out_txt(&store, &p, &body, false))).collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let Lookup::Hit(stands) = store.lookup(&p.key(), true).unwrap() else { panic!("round {round}") };
            assert!(published.iter().all(|m| m.outputs == stands.outputs), "round {round}");
        }
        assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0, "nothing left in staging");
        let p = parts(serde_json::json!("same work"));
        publish_out_txt(&store, &p, "first", false);
        let kept = publish_out_txt(&store, &p, "second", false);
        assert_eq!(fs::read_to_string(store.object_dir(&p.key()).join("out.txt")).unwrap(), "first");
        let replaced = publish_out_txt(&store, &p, "second", true);
        assert_ne!(kept.outputs, replaced.outputs);
        assert_eq!(fs::read_to_string(store.object_dir(&p.key()).join("out.txt")).unwrap(), "second");
        match store.lookup(&p.key(), false).unwrap() {
            Lookup::Hit(m) => assert_eq!(m.outputs, replaced.outputs, "the lookup memo forgot the replaced one"),
            other => panic!("{other:?}"),
        }
        fs::write(store.object_dir(&p.key()).join("out.txt"), "tampered").unwrap();
        publish_out_txt(&store, &p, "third", false);
        assert_eq!(fs::read_to_string(store.object_dir(&p.key()).join("out.txt")).unwrap(), "third", "damage replaced");
    }

    #[test]
    fn a_directory_output_is_digested_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let publish = |files: &[(&str, &str)], params: serde_json::Value| {
            let stage = store.staging_dir("n").unwrap();
            fs::create_dir(stage.join("h5")).unwrap();
            for (name, body) in files {
                fs::write(stage.join("h5").join(name), body).unwrap();
            }
            store.publish(&stage, manifest(parts(params)), &["h5/"], false).unwrap()
        };
        let a = publish(&[("s1.h5", "one"), ("s2.h5", "two")], serde_json::json!(1));
        assert_eq!(a.outputs.keys().collect::<Vec<_>>(), ["h5/s1.h5", "h5/s2.h5"]);
        let b = publish(&[("s1.h5", "one"), ("s2.h5", "2")], serde_json::json!(2));
        let c = publish(&[("s1.h5", "one"), ("s2.h5", "two")], serde_json::json!(3));
        assert_ne!(a.artifact_digest("h5/"), b.artifact_digest("h5/"));
        assert_eq!(a.artifact_digest("h5/"), c.artifact_digest("h5/"));
        fs::write(store.object_dir(&a.key).join("h5/s2.h5"), "changed").unwrap();
        assert!(matches!(store.lookup(&a.key, false).unwrap(), Lookup::Damaged(m) if m.contains("h5/s2.h5")));
    }

    #[test]
    fn second_lock_is_refused_with_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _held = store.lock(false).unwrap();
        let err = store.lock(false).unwrap_err().to_string();
        assert!(err.contains("in use by another run (pid"), "{err}");
    }
}
