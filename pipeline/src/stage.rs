//! What a stage is: declared inputs and outputs, parameters, a code version, and `run`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use schemas::artifacts::{Artifact, Blob, Table};

use crate::digest::StatCache;
use crate::items::{Item, ItemCache};

/// The error a stage reports; each stage crate converts its own error enum into it.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// One unit of cached work. Implementations must be deterministic in their inputs and params.
pub trait Stage: Send + Sync {
    /// The kind of stage, e.g. `join_labels`; part of the cache key.
    fn kind(&self) -> &str;
    /// Changes whenever the stage's code would write different outputs; part of the cache key.
    fn code_version(&self) -> &str;
    /// Parameters as JSON (object keys are canonicalised by the engine); part of the cache key.
    fn params(&self) -> serde_json::Value;
    /// The files this stage reads.
    fn inputs(&self) -> Vec<Input>;
    /// The files this stage writes (each into [`Context::output`]).
    fn outputs(&self) -> Vec<Output>;
    /// Does the work.
    fn run(&self, ctx: &Context) -> Result<(), StageError>;
    /// What the stage's work needs where it runs; by default a CPU, anywhere.
    fn resources(&self) -> Resources {
        Resources::default()
    }
    /// For `status`, when the node would run with inputs it can read: how much of its per-item
    /// work is done already ("1 of 13 slide(s) to tile"), or nothing to add.
    fn pending(&self, _: &Pending) -> Result<Option<String>, StageError> {
        Ok(None)
    }
}

/// What a stage's work needs, for an executor that runs it elsewhere (a Slurm job).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// It runs faster on a GPU (one, by default).
    pub gpu: bool,
    /// Small bookkeeping that runs in the driver itself: not worth a job's start-up.
    pub in_driver: bool,
}

/// What [`Stage::pending`] sees: the node's inputs as they stand and its items.
pub struct Pending<'a> {
    pub(crate) inputs: BTreeMap<String, PathBuf>,
    pub(crate) items: ItemCache,
    pub(crate) stat_cache: &'a StatCache,
}

impl Pending<'_> {
    /// Path of the declared input `name` (see [`Context::input`]).
    pub fn input(&self, name: &str) -> &Path {
        self.inputs.get(name).unwrap_or_else(|| panic!("pending reads undeclared input `{name}`"))
    }

    /// Whether the item for `facts` was made (see [`Context::item`]).
    pub fn has_item(&self, facts: &serde_json::Value) -> bool {
        self.items.exists(facts)
    }

    /// The workspace's digest cache (see [`Context::file_facts`]).
    pub fn stat_cache(&self) -> &StatCache {
        self.stat_cache
    }
}

/// A declared input, addressed by the name the stage uses for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file or directory outside the store. Files are digested by content (cached on size and
    /// mtime); directories by their listing (paths, sizes, mtimes), so no bytes are read.
    External { name: String, path: PathBuf },
    /// An output of another node.
    Artifact { name: String, node: NodeRef, artifact: &'static str },
}

impl Input {
    /// An external file or directory.
    pub fn external(name: &str, path: impl Into<PathBuf>) -> Input {
        Input::External { name: name.into(), path: path.into() }
    }

    /// The output `artifact` of `node`.
    pub fn artifact(name: &str, node: &NodeRef, artifact: &impl Artifact) -> Input {
        Input::Artifact { name: name.into(), node: node.clone(), artifact: artifact.file() }
    }

    /// The name the stage reads this input by.
    pub fn name(&self) -> &str {
        match self {
            Input::External { name, .. } | Input::Artifact { name, .. } => name,
        }
    }

    /// How a person would name this input in a reason ("labels.csv", "splits.parquet of split_folds").
    pub fn describe(&self) -> String {
        match self {
            Input::External { path, .. } => {
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into())
            }
            Input::Artifact { node, artifact, .. } => format!("{artifact} of {node}"),
        }
    }
}

/// A declared output: a file name (a directory when it ends in `/`) and, for a Parquet table,
/// the schema the engine holds the written file to before publishing it.
#[derive(Debug, Clone)]
pub struct Output {
    pub name: &'static str,
    pub schema: Option<SchemaRef>,
}

impl Output {
    /// A table whose schema the stage computes (a [`schemas::artifacts::ClassTable`]'s, for
    /// the workflow's classes).
    pub fn table(artifact: &impl Artifact, schema: SchemaRef) -> Output {
        Output { name: artifact.file(), schema: Some(schema) }
    }
}

impl From<&Table> for Output {
    fn from(table: &Table) -> Output {
        Output::table(table, (table.schema)())
    }
}

impl From<&Blob> for Output {
    fn from(blob: &Blob) -> Output {
        Output { name: blob.file, schema: None }
    }
}

/// A handle on a node of the DAG being built, got from the node itself ([`Node::handle`]), which
/// a stage that reads the node's outputs keeps instead of spelling the node's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeRef(pub(crate) String);

impl NodeRef {
    /// The node's id.
    pub fn id(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stage instance in the DAG: a unique id such as `train[fold=3]` and the stage name it expands
/// from (`train`), which `--force`, targets and reports use.
#[derive(Clone)]
pub struct Node {
    pub id: String,
    pub stage_name: String,
    pub stage: Arc<dyn Stage>,
    /// The folder of the results folder its outputs appear in (`""` for the top); by default
    /// `stage` or `stage/label`.
    pub results: String,
    /// Outputs shown there under another name: (output, name).
    pub results_names: Vec<(String, String)>,
    /// Outputs the results folder leaves out (the store's own files, such as packed features).
    pub results_hidden: Vec<String>,
}

impl Node {
    /// A node named `stage_name`, or `stage_name[label]` when it is one of a fan-out.
    pub fn new(stage_name: &str, label: Option<&str>, stage: Arc<dyn Stage>) -> Node {
        let (id, results) = match label {
            Some(l) => (format!("{stage_name}[{l}]"), format!("{stage_name}/{l}")),
            None => (stage_name.to_owned(), stage_name.to_owned()),
        };
        Node {
            id,
            stage_name: stage_name.to_owned(),
            stage,
            results,
            results_names: Vec::new(),
            results_hidden: Vec::new(),
        }
    }

    /// The handle by which other nodes' stages read this node's outputs.
    pub fn handle(&self) -> NodeRef {
        NodeRef(self.id.clone())
    }

    /// The node with its outputs shown in folder `dir` of the results folder (`""`: the top).
    pub fn results_in(mut self, dir: impl Into<String>) -> Node {
        self.results = dir.into();
        self
    }

    /// The node with its output `output` left out of the results folder (a run links every
    /// file of the folder again, so outputs of thousands of files nobody opens stay out).
    pub fn results_hide(mut self, output: &impl Artifact) -> Node {
        self.results_hidden.push(output.file().to_owned());
        self
    }

    /// The node with its output `output` shown as `name` in the results folder.
    pub fn results_name(mut self, output: &impl Artifact, name: &str) -> Node {
        self.results_names.push((output.file().to_owned(), name.to_owned()));
        self
    }

    /// Where output `output` appears in the results folder.
    pub fn results_path(&self, output: &str) -> PathBuf {
        let name = self.results_names.iter().find(|(o, _)| o == output).map_or(output, |(_, n)| n.as_str());
        Path::new(&self.results).join(name)
    }
}

/// What a running stage sees: where its inputs are, where to write, and progress reporting.
pub struct Context<'a> {
    pub(crate) node_id: &'a str,
    pub(crate) run_id: &'a str,
    pub(crate) inputs: BTreeMap<String, PathBuf>,
    pub(crate) out_dir: &'a Path,
    pub(crate) progress: &'a MultiProgress,
    pub(crate) stat_cache: &'a StatCache,
    pub(crate) interrupt: &'a AtomicBool,
    pub(crate) warnings: Mutex<Vec<String>>,
    pub(crate) items: ItemCache,
    pub(crate) gpu: Option<usize>,
}

impl Context<'_> {
    /// The GPU this node has to itself while it runs (a stage that wants one, run by an
    /// executor that hands them out); a stage set to run on "auto" uses it.
    pub fn gpu(&self) -> Option<usize> {
        self.gpu
    }

    /// The id of the node being run.
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    /// The id of the run executing the node (outputs that name it are tied to that run).
    pub fn run_id(&self) -> &str {
        self.run_id
    }

    /// Whether the run is being interrupted: a long stage checks this between steps and, when
    /// set, returns an error saying where it stopped (its outputs are then discarded).
    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// Records a warning about this node's result: it is logged now, kept in the node's manifest,
    /// and shown again by every run that reuses the result and by `status`.
    pub fn warn(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!(node = %self.node_id, "{message}");
        self.warnings.lock().expect("warnings lock").push(message);
    }

    /// Path of the declared input `name`.
    ///
    /// # Panics
    /// If the stage did not declare `name`: that is a bug in the stage.
    pub fn input(&self, name: &str) -> &Path {
        self.inputs.get(name).unwrap_or_else(|| panic!("stage of `{}` reads undeclared input `{name}`", self.node_id))
    }

    /// The item of this stage (with its code version and params) for `facts`, made by `make` into
    /// an empty directory unless an earlier run made it (and the node is not run with `--force`,
    /// which makes every item again). Items outlive runs, so a run killed
    /// mid-cohort keeps the slides it finished, and a changed cohort remakes only what changed.
    /// `facts` must name everything else the item depends on (the slide's content hash, the
    /// encoder's digest); outputs should hard-link the item files they publish.
    pub fn item(
        &self,
        facts: &serde_json::Value,
        make: impl FnOnce(&Path) -> Result<(), StageError>,
    ) -> Result<Item, StageError> {
        self.items.get_or_make(facts, make)
    }

    /// Path to write the declared output `name` to (a staging location, published atomically).
    /// A declared output whose name ends in `/` is a directory: create it and write its files.
    pub fn output(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// A progress bar of `len` steps shown while the stage runs (hidden when stderr is no terminal).
    pub fn progress(&self, len: u64, message: &str) -> ProgressBar {
        let bar = self.progress.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>24} {bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                .expect("valid template"),
        );
        bar.set_prefix(self.node_id.to_owned());
        bar.set_message(message.to_owned());
        bar
    }

    /// Digest of a file's content, as the engine digests external inputs: read only when its
    /// size or mtime changed since the workspace last saw it.
    pub fn file_digest(&self, path: &Path) -> crate::Result<String> {
        self.stat_cache.file_digest(path)
    }

    /// Digest of a file and facts `compute` derives from its bytes, both remembered across runs
    /// while the file's size and mtime are unchanged (then the file is not read at all).
    pub fn file_facts<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        kind: &str,
        compute: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<(String, T), String> {
        self.stat_cache.file_facts(path, kind, compute)
    }
}
