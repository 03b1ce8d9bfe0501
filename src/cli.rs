//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Cached, queryable HMIL workflows: WSI patch features to cross-validated results.
#[derive(Parser)]
#[command(name = "hmil-flow", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug); `HMIL_FLOW_LOG` takes a tracing filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log line formats.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where nodes run.
#[derive(Clone, Copy, ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

/// Query result formats.
#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
    Parquet,
}

/// A workflow file and overrides of its settings.
#[derive(Args)]
pub struct WorkflowArgs {
    /// The workflow TOML file (its relative paths are relative to it).
    pub workflow: PathBuf,
    /// Override a setting, e.g. `--set dataset.features=/data/pt_files` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run every stage that is not cached, then refresh the results folder and print the
    /// headline metrics.
    Run {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// Run only these stages (e.g. `split_folds`) or nodes (`'train[fold=0]'`), and what they need.
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
        /// Show what would run, and why, without running it.
        #[arg(long)]
        dry_run: bool,
        /// Print only the last line: where the report is, or what failed.
        #[arg(long, short)]
        quiet: bool,
        /// Rerun a stage (by name, e.g. `train`, or node id, e.g. `train[fold=3]`) even if cached.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Nodes run at once (default: 1 on this machine; with Slurm, executor.slurm.max_jobs).
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Where nodes run: here, or each as a Slurm job (default: the workflow's executor.kind).
        #[arg(long, value_enum)]
        executor: Option<ExecutorArg>,
        /// Write `{"run_id", "nodes": [{"id", "status", "seconds", "reason"}]}` to this file.
        #[arg(long, value_name = "FILE")]
        summary_json: Option<PathBuf>,
        /// Wait for another run on the same workspace to finish instead of failing.
        #[arg(long)]
        wait: bool,
        /// Re-hash every cached output instead of trusting unchanged size and mtime.
        #[arg(long)]
        verify: bool,
    },
    /// Say for every node whether it is fresh, and why it would rerun.
    Status {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// Only these stages or nodes, and what they need.
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
        /// Re-hash every cached output.
        #[arg(long)]
        verify: bool,
    },
    /// Run SQL over every artifact and run record of the workflow's workspace.
    Query {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// One SQL statement, e.g. `SELECT fold, value FROM metrics WHERE metric = 'auc_macro'`.
        #[arg(required_unless_present = "schema")]
        sql: Option<String>,
        /// List the tables and their columns instead.
        #[arg(long)]
        schema: bool,
        /// Output format; by default the `--out` file's extension (.csv, .json, .parquet), else a table.
        #[arg(long, value_enum)]
        format: Option<OutputFormat>,
        /// Write to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Apply a trained checkpoint to new slides.
    Predict {
        /// A `model.safetensors` (published HMIL parameter names).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A feature file or a directory of them.
        #[arg(long)]
        features: PathBuf,
        /// Take class names and the hierarchy from this workflow.
        #[arg(long)]
        workflow: Option<PathBuf>,
        /// Output Parquet file.
        #[arg(long, default_value = "predictions.parquet")]
        out: PathBuf,
        /// `cpu`, `cuda:N` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Draw a checkpoint's heatmaps and top tiles for slides outside any workflow: one feature
    /// file (with patch coordinates) or a folder of them, over the slides they came from when
    /// given, or a blank canvas.
    Heatmap {
        /// A `model.safetensors` (published HMIL parameter names).
        #[arg(long)]
        checkpoint: PathBuf,
        /// A feature file or a directory of them (CLAM, TRIDENT or STAMP `.h5`: they hold coordinates).
        #[arg(long)]
        features: PathBuf,
        /// The slide, or a folder of slides matched to the feature files by slide id (file stem).
        #[arg(long, alias = "slide")]
        slides: Option<PathBuf>,
        /// Take class names and the hierarchy from this workflow.
        #[arg(long)]
        workflow: Option<PathBuf>,
        /// Output folder: `heatmaps/`, `top_tiles/`, `instance_attention.parquet`, `heatmaps.parquet`.
        #[arg(long, default_value = "heatmaps")]
        out: PathBuf,
        /// What panels colour and tiles are ranked by.
        #[arg(long, value_enum, default_value_t = Map::Evidence)]
        map: Map,
        /// Patches per class at each end of the top-tiles mosaic (0: no mosaic).
        #[arg(long, default_value_t = 8)]
        top_tiles: usize,
        /// Also draw each slide's heatmap at this pyramid level of the slide, as a pyramidal TIFF
        /// a slide viewer opens (`full_res/<slide>.<class>.level<L>.tif`).
        #[arg(long, value_name = "LEVEL", requires = "slides")]
        full_res: Option<usize>,
        /// The classes to draw with --full-res (repeatable; default: the predicted fine and coarse classes).
        #[arg(long = "class", value_name = "NAME", requires = "full_res")]
        classes: Vec<String>,
        /// `cpu`, `cuda:N` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Write the workflow's current folds as CLAM `splits_{k}.csv` files.
    ExportSplits {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// Directory to write `splits_0.csv`, `splits_1.csv`, … into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove store objects that no current node of the workflow and no recent run uses.
    Gc {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// Also keep what the newest N runs of the workspace made or used (other workflows
        /// sharing it, say).
        #[arg(long, value_name = "N", default_value_t = 3)]
        keep_runs: usize,
        /// List what would be removed, and its size, without removing it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a commented workflow for a features directory (or slides and an encoder) and a label CSV, then check it.
    Init {
        /// Directory of per-slide feature files.
        #[arg(long, required_unless_present = "slides", conflicts_with = "slides")]
        features: Option<PathBuf>,
        /// Directory of slides, to tile and encode (instead of --features; needs --encoder).
        #[arg(long, requires = "encoder")]
        slides: Option<PathBuf>,
        /// The TorchScript encoder for --slides.
        #[arg(long)]
        encoder: Option<PathBuf>,
        /// Label CSV (a slide column, a label column, and a case column if cases have several slides).
        #[arg(long)]
        labels: PathBuf,
        /// The workflow file to write.
        #[arg(long, default_value = "workflow.toml")]
        out: PathBuf,
        /// Coarse classes and their fine classes, e.g. `benign=N,PB,UDH;atypical=FEA,ADH;malignant=DCIS,IC`.
        #[arg(long)]
        hierarchy: Option<String>,
        /// The workflow's name (default: the output file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Run one node's attempt (what a Slurm job does; see `--executor slurm`).
    #[command(hide = true)]
    ExecNode {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// The attempt's folder, with the driver's request.
        #[arg(long)]
        attempt: PathBuf,
    },
    /// Print the workflow's DAG.
    Dag {
        #[command(flatten)]
        wf: WorkflowArgs,
        /// Graphviz dot instead of text.
        #[arg(long)]
        dot: bool,
    },
    /// Measure: feature indexing against plain reads, or a training epoch against the matmul floor.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Write a synthetic dataset in CLAM layout (pt_files/ or h5_files/, and a label CSV), or
    /// with --slides, synthetic whole-slide images (pyramidal TIFF) and their labels.
    Synth {
        /// Output directory of feature files.
        #[arg(long, required_unless_present = "slides", conflicts_with = "slides")]
        out: Option<PathBuf>,
        /// Output directory of slides: `slides/<slide>.tif` (OpenSlide reads them) and
        /// `labels.csv`, four classes in two coarse groups, `--scale` × 6 slides per class.
        #[arg(long)]
        slides: Option<PathBuf>,
        /// Dataset shape to imitate: `bracs` (labels.csv) or `panda` (train.csv with PANDA's columns).
        #[arg(long, default_value = "bracs")]
        preset: String,
        /// Multiplies the preset's slide counts.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Median instances per slide.
        #[arg(long, default_value_t = 1000)]
        mean_instances: usize,
        /// Feature dimension.
        #[arg(long, default_value_t = 1024)]
        dim: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// `pt` (`pt_files/*.pt`, torch.save) or `h5` (`h5_files/*.h5`, CLAM: features + coords).
        #[arg(long, value_enum, default_value_t = FeatureFormat::Pt)]
        format: FeatureFormat,
    },
}

/// What heatmaps colour.
#[derive(Clone, Copy, ValueEnum)]
pub enum Map {
    /// Each patch's share of the class's logit above the mean logit: evidence for the class.
    Evidence,
    /// The class's attention, as CLAM draws it (it may sit on evidence against the class).
    Attention,
}

/// Feature file formats `synth` writes.
#[derive(Clone, Copy, ValueEnum)]
pub enum FeatureFormat {
    Pt,
    H5,
}

#[derive(Subcommand)]
pub enum Bench {
    /// Index a directory of feature files: plain read vs first index vs unchanged re-index.
    Index {
        /// The features directory.
        dir: PathBuf,
    },
    /// Pack a directory of feature files from scratch, then again after one slide is added.
    Pack {
        /// The features directory (only read).
        dir: PathBuf,
    },
    /// Extract features from slides: patches/s of reading and preprocessing alone, of the
    /// encoder's forward alone, and of the whole extraction, side by side.
    Extract {
        /// A folder of slides (default: synthetic slides written to a scratch folder).
        #[arg(long)]
        slides: Option<PathBuf>,
        /// How many synthetic slides to write without --slides (a multiple of 4).
        #[arg(long, default_value_t = 8)]
        synthetic: usize,
        /// The TorchScript encoder.
        #[arg(long, default_value = "workflows/encoders/colour-texture.ts")]
        encoder: PathBuf,
        /// Microns per pixel of the patches.
        #[arg(long, default_value_t = 0.5)]
        mpp: f64,
        #[arg(long, default_value_t = 256)]
        patch_size: u32,
        #[arg(long, default_value_t = 224)]
        input_size: u32,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Reader threads (default: the cores, at most 8).
        #[arg(long)]
        readers: Option<usize>,
        /// `cpu`, `cuda:N` or `auto`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, f16 or bf16 (on CUDA).
        #[arg(long, default_value = "f16")]
        dtype: String,
    },
    /// Time training epochs on synthetic bags resident on the device, beside the matmul floor,
    /// and report the peak RSS beside the size of the features.
    Epoch {
        #[arg(long, default_value_t = stages::bench::PRESET_SLIDES)]
        slides: usize,
        /// Median instances per slide.
        #[arg(long, default_value_t = stages::bench::PRESET_INSTANCES)]
        instances: usize,
        #[arg(long, default_value_t = 1024)]
        dim: i64,
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        /// Bags per training step (TransMIL is published with 1: a step holds every bag's
        /// attention graph).
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// CPU threads for libtorch (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// `cpu`, `cuda:N` or `auto`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The network: hmil, abmil, meanpool or transmil.
        #[arg(long, default_value = "hmil", value_parser = model_kind)]
        model: schemas::workflow::ModelKind,
        /// Instances a step runs at once, as `train.max_instances_per_chunk` (default: as
        /// training chooses it from free memory).
        #[arg(long)]
        max_instances_per_chunk: Option<u64>,
        /// How the resident features are held: f32, or f16 as a packed f16 store holds them.
        #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
        store_dtype: String,
        /// Alternate each epoch with one of the preset (545 slides of about 1,000 instances,
        /// f32, with the same network and settings), both resident, and compare their times per
        /// instance pair by pair: the machine's drift falls on both alike.
        #[arg(long)]
        against_preset: bool,
    },
}

/// A model name as the workflow's `train.model` takes it.
fn model_kind(name: &str) -> Result<schemas::workflow::ModelKind, String> {
    serde_json::from_value(serde_json::Value::String(name.into()))
        .map_err(|_| format!("`{name}`: expected hmil, abmil, meanpool or transmil"))
}
