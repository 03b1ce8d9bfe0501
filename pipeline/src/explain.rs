//! Freshness: which nodes would rerun, and why, without running anything.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use petgraph::graph::NodeIndex;

use crate::dag::Dag;
use crate::error::Result;
use crate::exec::input_paths;
use crate::stage::{Input, Pending};
use crate::store::{InputDigest, KeyParts, Lookup, Manifest, Record, Store};

/// Whether a node's published outputs can be reused.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    /// Outputs for the current key are published and intact.
    Fresh,
    /// The node would run, for these reasons.
    Stale(Vec<String>),
}

/// Freshness of one node.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: String,
    pub stage: String,
    pub freshness: Freshness,
    /// The cache key, when every input is known.
    pub key: Option<String>,
    /// Warnings recorded with the published outputs, when fresh.
    pub warnings: Vec<String>,
    /// How the newest run ran the node, when it ran it as a scheduler job: the node's status
    /// there, and the job.
    pub last_job: Option<(String, crate::executor::Job)>,
}

/// How many items a message names before it counts the rest.
const NAMED: usize = 3;

/// `items` joined with `sep`, or the first few and a count of the rest, for messages that may
/// concern hundreds of inputs, files or slides.
pub fn some_of(items: &[String], sep: &str) -> String {
    if items.len() <= NAMED {
        return items.join(sep);
    }
    format!("{}{sep}… and {} more", items[..NAMED].join(sep), items.len() - NAMED)
}

/// Digest of an external input: a file's content, or a directory's listing.
pub(crate) fn external_digest(store: &Store, path: &Path) -> Result<String> {
    if path.is_dir() { store.stat_cache().dir_digest(path) } else { store.stat_cache().file_digest(path) }
}

/// The key parts of a node given its upstream manifests, or the inputs that cannot be known yet.
pub(crate) fn key_parts(
    dag: &Dag,
    idx: NodeIndex,
    store: &Store,
    upstream: &HashMap<NodeIndex, Arc<Manifest>>,
) -> Result<Result<KeyParts, Vec<String>>> {
    let stage = &dag.node(idx).stage;
    let mut inputs = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut rerunning: Vec<String> = Vec::new();
    for input in stage.inputs() {
        let digest = match &input {
            Input::External { path, .. } => match external_digest(store, path) {
                Ok(d) => d,
                Err(e) => {
                    unknown.push(format!("input {} is unreadable: {e}", input.describe()));
                    continue;
                }
            },
            Input::Artifact { node, artifact, .. } => {
                let up = dag.index_of(node.id()).expect("validated by Dag::new");
                match upstream.get(&up).and_then(|m| m.artifact_digest(artifact)) {
                    Some(digest) => digest,
                    None => {
                        if !rerunning.iter().any(|r| r == node.id()) {
                            rerunning.push(node.to_string());
                        }
                        continue;
                    }
                }
            }
        };
        inputs.insert(input.name().to_owned(), InputDigest { describe: input.describe(), digest });
    }
    if !rerunning.is_empty() {
        unknown.push(format!("upstream {} will rerun", some_of(&rerunning, ", ")));
    }
    if !unknown.is_empty() {
        return Ok(Err(unknown));
    }
    Ok(Ok(KeyParts {
        kind: stage.kind().to_owned(),
        code_version: stage.code_version().to_owned(),
        params: stage.params(),
        inputs,
    }))
}

/// Why `now` differs from the node's last record (`"never run"` without one).
pub fn reasons(
    prev: Option<&Record>,
    now_params: &serde_json::Value,
    now_code: &str,
    now_inputs: Option<&BTreeMap<String, InputDigest>>,
) -> Vec<String> {
    let Some(prev) = prev else {
        return vec!["never run".into()];
    };
    let mut out = Vec::new();
    if prev.parts.code_version != now_code {
        out.push(format!("code version changed ({}→{})", prev.parts.code_version, now_code));
    }
    let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &prev.parts.params, &mut old);
    flatten("", now_params, &mut new);
    for (k, v) in &new {
        match old.get(k) {
            Some(o) if o == v => {}
            Some(o) => out.push(format!("param {k} {o}→{v}")),
            None => out.push(format!("param {k} added (={v})")),
        }
    }
    out.extend(old.keys().filter(|k| !new.contains_key(*k)).map(|k| format!("param {k} removed")));
    if let Some(now_inputs) = now_inputs {
        let (mut changed, mut added) = (Vec::new(), Vec::new());
        for (name, d) in now_inputs {
            match prev.parts.inputs.get(name) {
                Some(p) if p.digest == d.digest => {}
                Some(_) => changed.push(d.describe.clone()),
                None => added.push(d.describe.clone()),
            }
        }
        let removed: Vec<String> = prev
            .parts
            .inputs
            .iter()
            .filter(|(n, _)| !now_inputs.contains_key(*n))
            .map(|(_, d)| d.describe.clone())
            .collect();
        for (what, items) in [("changed", changed), ("added", added), ("removed", removed)] {
            match items.len() {
                0 => {}
                1 => out.push(format!("input {} {what}", items[0])),
                n => out.push(format!("{n} inputs {what}: {}", some_of(&items, ", "))),
            }
        }
    }
    out
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// Why a node whose key is known but not published would run.
pub(crate) fn miss_reasons(store: &Store, id: &str, parts: &KeyParts, lookup: &Lookup) -> Result<Vec<String>> {
    let prev = store.record(id)?;
    let mut out = reasons(prev.as_ref(), &parts.params, &parts.code_version, Some(&parts.inputs));
    if let Lookup::Damaged(why) = lookup {
        out.push(why.clone());
    } else if out.is_empty() {
        out.push("output missing".into());
    }
    Ok(out)
}

/// Freshness of every node, in topological order. `forced` nodes are stale whatever the cache holds.
pub fn status(dag: &Dag, store: &Store, forced: &[NodeIndex], verify: bool) -> Result<Vec<NodeStatus>> {
    let mut manifests = HashMap::new();
    let mut out = Vec::with_capacity(dag.len());
    let mut last_jobs = crate::runlog::last_jobs(store)?;
    for &idx in dag.order() {
        let node = dag.node(idx);
        let mut warnings = Vec::new();
        let (freshness, key) = match key_parts(dag, idx, store, &manifests)? {
            Ok(parts) => {
                let key = parts.key();
                let lookup = store.lookup(&key, verify)?;
                let freshness = match lookup {
                    Lookup::Hit(m) if !forced.contains(&idx) => {
                        warnings = m.warnings.clone();
                        manifests.insert(idx, m);
                        Freshness::Fresh
                    }
                    Lookup::Hit(_) => Freshness::Stale(vec!["forced".into()]),
                    other => {
                        let mut why = miss_reasons(store, &node.id, &parts, &other)?;
                        let pending = Pending {
                            inputs: input_paths(dag, idx, store, &manifests),
                            items: store.item_cache(&*node.stage, false),
                            stat_cache: store.stat_cache(),
                        };
                        match node.stage.pending(&pending) {
                            Ok(note) => why.extend(note),
                            Err(e) => why.push(format!("(cannot tell what is done already: {e})")),
                        }
                        Freshness::Stale(why)
                    }
                };
                (freshness, Some(key))
            }
            Err(unknown) => {
                let prev = store.record(&node.id)?;
                let stage = &node.stage;
                let mut why: Vec<String> = match prev {
                    Some(p) => reasons(Some(&p), &stage.params(), stage.code_version(), None),
                    None => vec!["never run".into()],
                };
                why.extend(unknown);
                (Freshness::Stale(why), None)
            }
        };
        let last_job = last_jobs.remove(&node.id);
        out.push(NodeStatus {
            id: node.id.clone(),
            stage: node.stage_name.clone(),
            freshness,
            key,
            warnings,
            last_job,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(params: serde_json::Value, digest: &str) -> Record {
        let mut inputs = BTreeMap::new();
        inputs.insert("labels".into(), InputDigest { describe: "labels.csv".into(), digest: digest.into() });
        let parts = KeyParts { kind: "k".into(), code_version: "1".into(), params, inputs };
        Record { key: parts.key(), parts }
    }

    #[test]
    fn names_each_difference() {
        let prev = record(serde_json::json!({"epochs": 200, "opt": {"lr": 0.001}}), "a");
        let now = record(serde_json::json!({"epochs": 100, "opt": {"lr": 0.001}, "seed": 1}), "b");
        let why = reasons(Some(&prev), &now.parts.params, "2", Some(&now.parts.inputs));
        assert_eq!(
            why,
            ["code version changed (1→2)", "param epochs 200→100", "param seed added (=1)", "input labels.csv changed"]
        );
        assert_eq!(reasons(None, &now.parts.params, "1", None), ["never run"]);
        let many = |n: usize, digest: &str| {
            (0..n)
                .map(|k| {
                    let d = InputDigest {
                        describe: format!("metrics.parquet of evaluate[fold={k}]"),
                        digest: digest.into(),
                    };
                    (format!("metrics{k}"), d)
                })
                .collect::<BTreeMap<_, _>>()
        };
        let mut prev = prev.clone();
        prev.parts.inputs = many(40, "a");
        let why = reasons(Some(&prev), &prev.parts.params, "1", Some(&many(40, "b")));
        assert_eq!(
            why,
            ["40 inputs changed: metrics.parquet of evaluate[fold=0], metrics.parquet of evaluate[fold=1], \
              metrics.parquet of evaluate[fold=10], … and 37 more"]
        );
        assert!(reasons(Some(&prev), &prev.parts.params, "1", Some(&prev.parts.inputs)).is_empty());
    }
}
