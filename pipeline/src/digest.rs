//! Content digests and a stat cache that avoids re-reading unchanged files. File contents are
//! digested with XXH3-128 (SIMD chosen at run time, so hashing keeps up with reading); cache keys and other
//! short canonical strings with BLAKE3.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::UNIX_EPOCH;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, io};

/// Hex BLAKE3 digest of a canonical byte string (cache keys, ids).
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Streams a whole file through XXH3-128 and returns its hex digest (artifacts such as packed
/// features can be far larger than memory).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = twox_hash::XxHash3_128::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.write(&buf[..n]);
    }
    Ok(format!("{:032x}", hasher.finish_128()))
}

/// Reads a whole (feature-file sized) file, digests it, and hands `use_bytes` its bytes and
/// digest. A file whose size or mtime changes while it is read is an error rather than a digest
/// of a mix of versions.
fn with_file_bytes<T>(path: &Path, use_bytes: impl FnOnce(&[u8], String) -> T) -> std::io::Result<T> {
    let before = Stat::of_metadata(&fs::metadata(path)?);
    let bytes = fs::read(path)?;
    if Stat::of_metadata(&fs::metadata(path)?) != before {
        return Err(std::io::Error::other("the file changed while it was being read"));
    }
    Ok(use_bytes(&bytes, content_digest(&bytes)))
}

/// Hex XXH3-128 digest of content held in memory (equal to [`hash_file`] of that content).
fn content_digest(bytes: &[u8]) -> String {
    format!("{:032x}", twox_hash::XxHash3_128::oneshot(bytes))
}

/// Size and modification time of a file, the pair a cached digest is trusted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub bytes: u64,
    pub mtime_ns: i128,
}

impl Stat {
    /// Stats `path` (following links).
    pub fn of(path: &Path) -> Result<Stat> {
        fs::metadata(path).map(|meta| Stat::of_metadata(&meta)).map_err(io(path))
    }

    /// The stat of already-read metadata.
    pub fn of_metadata(meta: &fs::Metadata) -> Stat {
        let mtime_ns =
            meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i128);
        Stat { bytes: meta.len(), mtime_ns }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stat: Stat,
    digest: String,
    /// Facts stages derived from the same bytes, by kind (e.g. a feature file's shape).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    facts: BTreeMap<String, serde_json::Value>,
}

/// A digest remembered while the file keeps its size and mtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Linked {
    stat: Stat,
    digest: String,
}

/// What the cache remembers.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Memory {
    /// By canonical path.
    files: BTreeMap<PathBuf, Entry>,
    /// Files with several links, by "device:inode" (see [`StatCache::linked_digest`]).
    links: BTreeMap<String, Linked>,
}

/// Digests of files keyed by path, reused while (size, mtime) are unchanged.
///
/// Persisted as JSON in the workspace so that a rerun reads no bytes of files it has seen.
#[derive(Debug)]
pub struct StatCache {
    path: PathBuf,
    /// Read from `path` when first needed (a fully cached run needs none of it).
    memory: OnceLock<Mutex<Memory>>,
    /// Whether anything was learnt since it was read, so that [`StatCache::save`] writes.
    learnt: AtomicBool,
}

impl StatCache {
    /// The cache kept at `path`; a missing or unreadable cache starts empty.
    pub fn load(path: PathBuf) -> StatCache {
        StatCache { path, memory: OnceLock::new(), learnt: AtomicBool::new(false) }
    }

    /// What the cache remembers, read on first use.
    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        let memory = self.memory.get_or_init(|| {
            let bytes = fs::read(&self.path).unwrap_or_default();
            // Earlier versions saved the files alone.
            Mutex::new(
                serde_json::from_slice(&bytes)
                    .or_else(|_| serde_json::from_slice(&bytes).map(|files| Memory { files, links: BTreeMap::new() }))
                    .unwrap_or_default(),
            )
        });
        memory.lock().expect("stat cache poisoned")
    }

    /// [`StatCache::memory`], to be changed.
    fn learn(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.learnt.store(true, Ordering::SeqCst);
        self.memory()
    }

    /// Digest of a file about to be published, of metadata `meta`: one linked from elsewhere too
    /// (an item's file), whose inode keeps its size and mtime since it was digested, is not read
    /// again.
    pub fn linked_digest(&self, path: &Path, meta: &fs::Metadata) -> Result<String> {
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() <= 1 {
            return hash_file(path);
        }
        let (key, stat) = (format!("{}:{}", meta.dev(), meta.ino()), Stat::of_metadata(meta));
        if let Some(known) = self.memory().links.get(&key)
            && known.stat == stat
        {
            return Ok(known.digest.clone());
        }
        let digest = hash_file(path)?;
        self.learn().links.insert(key, Linked { stat, digest: digest.clone() });
        Ok(digest)
    }

    /// Digest of the file's content, read only if the file is new or its size or mtime changed.
    pub fn file_digest(&self, path: &Path) -> Result<String> {
        let key = fs::canonicalize(path).map_err(io(path))?;
        let stat = Stat::of(&key)?;
        if let Some(e) = self.memory().files.get(&key)
            && e.stat == stat
        {
            return Ok(e.digest.clone());
        }
        let digest = hash_file(&key)?;
        let entry = Entry { stat, digest: digest.clone(), facts: BTreeMap::new() };
        self.learn().files.insert(key, entry);
        Ok(digest)
    }

    /// Digest of a file and facts `compute` derives from its bytes, remembered under `kind`:
    /// while the file's size and mtime are unchanged, neither reads the file again.
    /// Errors (unreadable file, or `compute`'s own) are messages; nothing is remembered then.
    pub fn file_facts<T: Serialize + DeserializeOwned>(
        &self,
        path: &Path,
        kind: &str,
        compute: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
    ) -> std::result::Result<(String, T), String> {
        let key = fs::canonicalize(path).map_err(|e| e.to_string())?;
        let stat = Stat::of(&key).map_err(|e| e.to_string())?;
        if let Some(e) = self.memory().files.get(&key)
            && e.stat == stat
            && let Some(facts) = e.facts.get(kind)
            && let Ok(facts) = serde_json::from_value(facts.clone())
        {
            return Ok((e.digest.clone(), facts));
        }
        let (digest, facts) =
            with_file_bytes(&key, |bytes, digest| compute(bytes).map(|f| (digest, f))).map_err(|e| e.to_string())??;
        let value = serde_json::to_value(&facts).map_err(|e| e.to_string())?;
        let mut memory = self.learn();
        let entry =
            memory.files.entry(key).or_insert_with(|| Entry { stat, digest: digest.clone(), facts: BTreeMap::new() });
        if entry.stat != stat || entry.digest != digest {
            *entry = Entry { stat, digest: digest.clone(), facts: BTreeMap::new() };
        }
        entry.facts.insert(kind.to_owned(), value);
        Ok((digest, facts))
    }

    /// Whether facts of `kind` are remembered for the file as it is now (same size and mtime),
    /// so that [`StatCache::file_facts`] would not read it.
    pub fn knows(&self, path: &Path, kind: &str) -> bool {
        let Ok(key) = fs::canonicalize(path) else { return false };
        let Ok(stat) = Stat::of(&key) else { return false };
        self.memory().files.get(&key).is_some_and(|e| e.stat == stat && e.facts.contains_key(kind))
    }

    /// Digest of a directory's listing: every file's relative path, size and mtime, no content.
    pub fn dir_digest(&self, dir: &Path) -> Result<String> {
        let mut files = Vec::new();
        list_files(dir, dir, &mut files)?;
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hasher = blake3::Hasher::new();
        for (rel, stat) in files {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(&[0]);
            hasher.update(&stat.bytes.to_le_bytes());
            hasher.update(&stat.mtime_ns.to_le_bytes());
        }
        Ok(hasher.finalize().to_hex().to_string())
    }

    /// Writes the cache back atomically, when it learnt anything.
    pub fn save(&self) -> Result<()> {
        if !self.learnt.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let json = serde_json::to_vec(&*self.memory()).expect("stat cache serialises");
        crate::fsutil::write_atomic(&self.path, &json)
    }
}

/// Every file under `dir` (following links), relative to `root`, with its stat.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Stat)>) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            list_files(root, &path, out)?;
        } else {
            out.push((path.strip_prefix(root).expect("walk stays under root").to_path_buf(), Stat::of_metadata(&meta)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_digest_matches_whole_file_digest() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.bin");
        // Longer than the read buffer and not a multiple of it.
        let bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        fs::write(&f, &bytes).unwrap();
        assert_eq!(hash_file(&f).unwrap(), content_digest(&bytes));
        assert_eq!(with_file_bytes(&f, |b, d| (b.len(), d)).unwrap(), (bytes.len(), content_digest(&bytes)));
    }

    #[test]
    fn unchanged_file_is_not_reread() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"hello").unwrap();
        let cache = StatCache::load(dir.path().join("cache.json"));
        let d1 = cache.file_digest(&f).unwrap();
        assert_eq!(d1, content_digest(b"hello"));
        // Swap the cached digest: a hit must return it without reading the file.
        let key = fs::canonicalize(&f).unwrap();
        cache.learn().files.get_mut(&key).unwrap().digest = "sentinel".into();
        assert_eq!(cache.file_digest(&f).unwrap(), "sentinel");
        cache.save().unwrap();
        let reloaded = StatCache::load(dir.path().join("cache.json"));
        assert_eq!(reloaded.file_digest(&f).unwrap(), "sentinel");
        fs::write(&f, b"hello, world").unwrap();
        assert_eq!(reloaded.file_digest(&f).unwrap(), content_digest(b"hello, world"));
    }

    #[test]
    fn a_linked_file_is_read_once_per_version_and_the_old_cache_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (item, linked) = (dir.path().join("item.bin"), dir.path().join("out.bin"));
        fs::write(&item, b"rows").unwrap();
        fs::hard_link(&item, &linked).unwrap();
        let cache_path = dir.path().join("cache.json");
        fs::write(
            &cache_path,
            serde_json::to_vec(&BTreeMap::from([(
                item.clone(),
                Entry { stat: Stat::of(&item).unwrap(), digest: "old".into(), facts: BTreeMap::new() },
            )]))
            .unwrap(),
        )
        .unwrap();
        let linked_digest = |cache: &StatCache, path: &Path| cache.linked_digest(path, &fs::metadata(path).unwrap());
        let cache = StatCache::load(cache_path.clone());
        assert_eq!(cache.file_digest(&item).unwrap(), "old", "a cache saved before links were kept loads");
        assert_eq!(linked_digest(&cache, &linked).unwrap(), content_digest(b"rows"));
        // Swap the remembered digest: linking the file again must return it without reading.
        cache.learn().links.values_mut().for_each(|l| l.digest = "sentinel".into());
        cache.save().unwrap();
        let again = dir.path().join("again.bin");
        fs::hard_link(&item, &again).unwrap();
        let reloaded = StatCache::load(cache_path);
        assert_eq!(linked_digest(&reloaded, &again).unwrap(), "sentinel");
        assert_eq!(reloaded.file_digest(&item).unwrap(), "old");
        fs::write(&item, b"other rows").unwrap();
        assert_eq!(linked_digest(&reloaded, &again).unwrap(), content_digest(b"other rows"));
        let single = dir.path().join("single.bin");
        fs::write(&single, b"one link").unwrap();
        assert_eq!(linked_digest(&reloaded, &single).unwrap(), content_digest(b"one link"));
        assert!(reloaded.memory().links.len() == 1, "a file with one link is not remembered");
    }

    #[test]
    fn facts_are_computed_once_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        fs::write(&f, b"four").unwrap();
        let cache = StatCache::load(dir.path().join("cache.json"));
        let calls = std::cell::Cell::new(0);
        let len = |b: &[u8]| {
            calls.set(calls.get() + 1);
            Ok(b.len())
        };
        assert_eq!(cache.file_facts(&f, "len", len).unwrap(), (content_digest(b"four"), 4));
        assert_eq!(cache.file_facts(&f, "len", len).unwrap().1, 4);
        assert_eq!(calls.get(), 1);
        assert!(cache.file_facts(&f, "other", |_| Err::<u8, _>("bad".into())).is_err());
        assert_eq!(cache.file_facts(&f, "len", len).unwrap().1, 4, "a failure forgets nothing");
        fs::write(&f, b"fives").unwrap();
        assert_eq!(cache.file_facts(&f, "len", len).unwrap().1, 5);
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn dir_digest_tracks_listing() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/x"), b"1").unwrap();
        let cache = StatCache::load(dir.path().join("c.json"));
        let a = cache.dir_digest(&dir.path().join("sub")).unwrap();
        assert_eq!(a, cache.dir_digest(&dir.path().join("sub")).unwrap());
        fs::write(dir.path().join("sub/y"), b"2").unwrap();
        assert_ne!(a, cache.dir_digest(&dir.path().join("sub")).unwrap());
    }
}
