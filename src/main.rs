//! `hmil-flow`: the command line over the pipeline engine and the HMIL stages.

mod cli;
mod interrupt;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use cli::{Bench, Cli, Command, ExecutorArg, FeatureFormat, LogFormat, OutputFormat, WorkflowArgs};
use pipeline::{Dag, Freshness, GarbageKind, InProcess, RunOptions, SlurmExecutor, Store};
use schemas::workflow::{ExecutorKind, Setting, Workflow};

fn main() -> ExitCode {
    stages::hmil::memory::retain_freed_memory();
    interrupt::quiet_on_closed_pipe();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            say_error(&pipeline::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// Whether log lines, and so the messages that end a command, are JSON.
static JSON_LOG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Tells the user of an error: an `error:` line, or a JSON log line under `--log-format json`.
fn say_error(message: &str) {
    if JSON_LOG.get() == Some(&true) {
        tracing::error!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}

/// Tells the user of something to look at: a `warning:` line, or a JSON log line.
fn say_warning(message: &str) {
    if JSON_LOG.get() == Some(&true) {
        tracing::warn!("{message}");
    } else {
        eprintln!("warning: {message}");
    }
}

/// Logs to stderr. Without `-v`, warnings only when progress bars show on a terminal; with no
/// terminal (a log file, a cluster job) the bars are hidden, so node starts and ends and epochs
/// are logged instead. Colour only on a terminal.
fn init_tracing(verbose: u8, format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let default = match verbose {
        0 if terminal => "warn",
        0 | 1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HMIL_FLOW_LOG").unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(terminal);
    let _ = JSON_LOG.set(matches!(format, LogFormat::Json));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// A workflow file read with its settings applied.
struct Parsed {
    path: PathBuf,
    /// Digest of the file's text and the settings applied to it.
    digest: String,
    workflow: Workflow,
}

fn parse(args: &WorkflowArgs) -> Result<Parsed> {
    let path = &args.workflow;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let settings = settings(&args.set)?;
    let workflow = Workflow::parse(&text, path, &settings)?;
    let texts: Vec<&str> = settings.iter().map(|s| s.text.as_str()).collect();
    let digest = pipeline::hash_bytes(format!("{text}\0{}", texts.join("\0")).as_bytes());
    Ok(Parsed { path: path.clone(), digest, workflow })
}

/// A loaded workflow: its file, digest, typed contents, DAG and store.
struct Loaded {
    path: PathBuf,
    digest: String,
    workflow: Workflow,
    dag: Dag,
    store: Store,
}

impl Parsed {
    /// Its DAG, and its store (created if missing).
    fn load(self) -> Result<Loaded> {
        let Parsed { path, digest, workflow } = self;
        let dag = Dag::new(stages::nodes(&workflow, &digest))?;
        let store = Store::open(&workflow.workflow.workspace)?;
        Ok(Loaded { path, digest, workflow, dag, store })
    }
}

fn load(args: &WorkflowArgs) -> Result<Loaded> {
    parse(args)?.load()
}

/// Checks that every `[executor.slurm.resources.<stage>]` names a stage of the workflow.
fn check_stages<'a>(dag: &Dag, names: impl Iterator<Item = &'a String>) -> Result<()> {
    for name in names {
        if dag.matching(name).is_empty() {
            bail!("[executor.slurm.resources.{name}] names no stage of this workflow; {}", dag.describe_names(name));
        }
    }
    Ok(())
}

/// Settings from `HMIL_FLOW_SET` (whitespace-separated, quotes group), then from `--set`.
fn settings(set: &[String]) -> Result<Vec<Setting>> {
    let mut out = Setting::from_env(&std::env::var("HMIL_FLOW_SET").unwrap_or_default())?;
    out.extend(set.iter().map(|s| Setting::cli(s)));
    Ok(out)
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { wf, targets, dry_run, quiet, force, jobs, executor, summary_json, wait, verify } => {
            let l = load(&wf)?;
            l.workflow.check_paths()?;
            let part = part_of(&l.dag, &targets)?;
            let dag = part.as_ref().unwrap_or(&l.dag);
            if dry_run {
                let forced = pipeline::resolve(dag, &force, "--force")?;
                print_status(&pipeline::status(dag, &l.store, &forced, verify)?);
                return Ok(ExitCode::SUCCESS);
            }
            interrupt::catch();
            let mut opts = RunOptions { force, verify, wait, interrupt: &interrupt::REQUESTED, ..Default::default() };
            let kind = match executor {
                Some(ExecutorArg::Local) => ExecutorKind::Local,
                Some(ExecutorArg::Slurm) => ExecutorKind::Slurm,
                None => l.workflow.executor.kind,
            };
            opts.jobs = jobs.unwrap_or(1);
            // Nodes that run at once get a GPU each.
            opts.executor = Arc::new(InProcess::with_gpus(|| tch::Cuda::device_count().max(0) as usize));
            if kind == ExecutorKind::Slurm {
                let slurm = &l.workflow.executor.slurm;
                check_stages(&l.dag, slurm.resources.keys())?;
                let exe = std::env::current_exe().context("finding this program for the jobs to run")?;
                let workflow = std::fs::canonicalize(&wf.workflow).context("finding the workflow file")?;
                let mut command = vec![exe.display().to_string(), "exec-node".into(), workflow.display().to_string()];
                command.extend(wf.set.iter().flat_map(|s| ["--set".to_owned(), s.clone()]));
                opts.executor = Arc::new(SlurmExecutor::new(slurm.clone(), command, &l.store)?);
                opts.jobs = jobs.unwrap_or(slurm.max_jobs);
            }
            let summary = pipeline::run(dag, &l.store, &opts)?;
            let settings = serde_json::to_string(&l.workflow)?;
            let of = pipeline::RunOf { workflow: &l.workflow.workflow.name, digest: &l.digest, settings: &settings };
            pipeline::write_runs(&l.store, &summary, of)?;
            if let Some(file) = summary_json {
                let json = serde_json::to_string_pretty(&summary)?;
                std::fs::write(&file, json).with_context(|| format!("writing {}", file.display()))?;
            }
            return finish_run(&l, &wf, &summary, quiet);
        }
        Command::ExecNode { wf, attempt } => {
            // The job's CPUs, not the node's (a stage's own setting, like train.threads, wins).
            if let Some(n) = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|n| n.parse::<i32>().ok()) {
                tch::set_num_threads(n);
            }
            let l = load(&wf)?;
            pipeline::run_attempt(&l.dag, &l.store, &attempt)?;
        }
        Command::Status { wf, targets, verify } => {
            let l = load(&wf)?;
            l.workflow.check_paths()?;
            let part = part_of(&l.dag, &targets)?;
            print_status(&pipeline::status(part.as_ref().unwrap_or(&l.dag), &l.store, &[], verify)?);
        }
        Command::Gc { wf, keep_runs, dry_run } => gc(&wf, keep_runs, dry_run)?,
        Command::Init { features, slides, encoder, labels, out, hierarchy, name, force } => {
            let look = match (&features, &slides, &encoder) {
                (_, Some(dir), Some(encoder)) => stages::init::Look::Slides { dir, encoder },
                (Some(dir), _, _) => stages::init::Look::Features(dir),
                _ => bail!("give --features DIR, or --slides DIR with --encoder FILE"),
            };
            init(look, &labels, &out, hierarchy.as_deref(), name.as_deref(), force)?
        }
        Command::Query { wf, sql, schema, format, out } => query(&wf, sql.as_deref(), schema, format, out.as_deref())?,
        Command::Predict { checkpoint, features, workflow, out, device } => {
            let classes = match workflow {
                Some(path) => Some(stages::classes(&Workflow::load(&path, &settings(&[])?)?)),
                None => None,
            };
            let device = stages::hmil::train::device(&device, None)?;
            let n = stages::hmil::predict::predict(&checkpoint, &features, classes, &out, device)?;
            println!("predicted {n} slide(s) into {}", out.display());
        }
        Command::Heatmap { checkpoint, features, slides, workflow, out, map, top_tiles, full_res, classes, device } => {
            let map = match map {
                cli::Map::Evidence => schemas::workflow::MapKind::Evidence,
                cli::Map::Attention => schemas::workflow::MapKind::Attention,
            };
            let request = stages::hmil::heatmaps::apply::Request {
                checkpoint: &checkpoint,
                features: &features,
                slides: slides.as_deref(),
                classes: match workflow {
                    Some(path) => Some(stages::classes(&Workflow::load(&path, &settings(&[])?)?)),
                    None => None,
                },
                out: &out,
                device: stages::hmil::train::device(&device, None)?,
                map,
                top_tiles,
                full_res: full_res.map(|level| (level, classes)),
            };
            heatmap(&request)?
        }
        Command::ExportSplits { wf, out } => {
            let l = load(&wf)?;
            l.workflow.check_paths()?;
            let status = pipeline::status(&l.dag, &l.store, &[], false)?;
            let node = status.iter().find(|s| s.stage == "split_folds").context("the workflow has no split_folds")?;
            let key = match (&node.freshness, &node.key) {
                (Freshness::Fresh, Some(key)) => key,
                (Freshness::Stale(why), _) => {
                    bail!("{} is not up to date ({}); run the workflow first", node.id, why.join("; "))
                }
                _ => bail!("{} has no result yet; run the workflow first", node.id),
            };
            let rows = stages::splits::read(&l.store.object_dir(key).join(schemas::artifacts::SPLITS.file))?;
            let folds = stages::splits::export_clam(&rows, &out)?;
            println!("wrote {folds} CLAM split file(s) into {}", out.display());
        }
        Command::Dag { wf, dot } => {
            let l = load(&wf)?;
            print!("{}", if dot { l.dag.to_dot() } else { l.dag.to_text() });
        }
        Command::Synth { slides: Some(dir), scale, seed, .. } => synth_slides(&dir, scale, seed)?,
        Command::Synth { out: Some(out), preset, scale, mean_instances, dim, seed, format, .. } => {
            let format = match format {
                FeatureFormat::Pt => stages::synth::SynthFormat::Pt,
                FeatureFormat::H5 => stages::synth::SynthFormat::H5,
            };
            let Some(preset) = stages::synth::Preset::named(&preset) else {
                bail!("unknown preset `{preset}` (known: bracs, panda)");
            };
            let opts = stages::synth::SynthOptions { preset, format, scale, mean_instances, dim, seed };
            synth(&out, &opts)?
        }
        Command::Synth { .. } => bail!("give --out DIR (feature files) or --slides DIR (slides)"),
        Command::Bench { what } => bench(what)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The part of `dag` that `targets` need, or `None` for the whole of it.
fn part_of(dag: &Dag, targets: &[String]) -> Result<Option<Dag>> {
    if targets.is_empty() {
        return Ok(None);
    }
    Ok(Some(dag.with_ancestors(&pipeline::resolve(dag, targets, "target")?)))
}

/// Ends a run: the results folder refreshed, each node's line and warnings, then the headline
/// metrics and the report's path, or what failed and the command that reruns it.
fn finish_run(l: &Loaded, wf: &WorkflowArgs, summary: &pipeline::RunSummary, quiet: bool) -> Result<ExitCode> {
    use pipeline::Status;
    // First, so that the folder is current even if printing stops (a closed pipe, say).
    let results = l.workflow.workflow.results.as_deref().expect("resolved when loaded");
    let status = pipeline::status(&l.dag, &l.store, &[], false)?;
    let missing = pipeline::refresh_results(results, &l.dag, &l.store, &status)?;
    if !quiet {
        for n in &summary.nodes {
            let mut reason = pipeline::first_line(n.reason.as_deref().unwrap_or("")).to_owned();
            if let Some(job) = &n.job {
                reason += &format!(" [Slurm job {} {}]", job.id, job.state);
            }
            let line = format!("{:<9} {:>8.2}s  {:<28} {reason}", n.status.as_str(), n.seconds, n.id);
            println!("{}", line.trim_end());
        }
    }
    for n in &summary.nodes {
        for w in &n.warnings {
            say_warning(&format!("{}: {w}", n.id));
        }
    }
    let count = |s: Status| summary.nodes.iter().filter(|n| n.status == s).count();
    let (failed, interrupted) = (count(Status::Failed), count(Status::Interrupted));
    if !quiet {
        println!(
            "run {} of {}: {} node(s), {failed} failed, {interrupted} interrupted",
            summary.run_id,
            l.path.display(),
            summary.nodes.len()
        );
    }
    if failed > 0 {
        for n in summary.nodes.iter().filter(|n| n.status == Status::Failed) {
            say_error(&format!("{} failed: {}", n.id, n.reason.as_deref().unwrap_or("")));
            println!("once fixed, rerun it with: {}", rerun_command(wf, &n.id));
        }
        return Ok(ExitCode::FAILURE);
    }
    if interrupted > 0 {
        say_warning("interrupted: finished nodes are kept; run it again to go on");
        return Ok(ExitCode::from(130));
    }
    let report = status.iter().any(|s| s.stage == stages::REPORT && s.freshness == Freshness::Fresh);
    if report {
        if !quiet {
            print!("{}", stages::report::headline(&results.join("metrics.parquet"))?);
        }
        println!("report: {}", results.join(schemas::artifacts::REPORT.file).display());
    } else {
        println!("results so far: {} (not made yet: {})", results.display(), pipeline::some_of(&missing, ", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The command line that reruns node `id` of the workflow with the same settings.
fn rerun_command(wf: &WorkflowArgs, id: &str) -> String {
    let quote = |s: &str| {
        if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut words =
        vec!["hmil-flow".to_owned(), "run".to_owned(), quote(&wf.workflow.display().to_string()), quote(id)];
    for setting in &wf.set {
        words.extend(["--set".to_owned(), quote(setting)]);
    }
    words.join(" ")
}

fn print_status(status: &[pipeline::NodeStatus]) {
    for s in status {
        match &s.freshness {
            Freshness::Fresh => println!("fresh  {}", s.id),
            Freshness::Stale(why) => println!("stale  {}: {}", s.id, why.join("; ")),
        }
        if let Some((status, job)) = &s.last_job {
            println!("       last run: {status} as Slurm job {} ({})", job.id, job.state);
        }
        for w in &s.warnings {
            println!("       warning: {w}");
        }
    }
}

/// Runs `write` with a progress callback (slides done, slides in all) that drives a bar.
fn with_synth_bar<T>(write: impl FnOnce(&dyn Fn(usize, usize)) -> Result<T>) -> Result<T> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "synth {bar:30} {pos}/{len} slides [{elapsed_precise}<{eta_precise}]",
    )?);
    let out = write(&|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    out
}

fn heatmap(request: &stages::hmil::heatmaps::apply::Request) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "heatmap {bar:30} {pos}/{len} slides [{elapsed_precise}<{eta_precise}]",
    )?);
    let summary = stages::hmil::heatmaps::apply::heatmaps(request, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if !summary.without_coords.is_empty() {
        say_warning(&format!(
            "no heatmap for {} slide(s) whose features have no coordinates: {}",
            summary.without_coords.len(),
            pipeline::some_of(&summary.without_coords, ", ")
        ));
    }
    if !summary.without_slide.is_empty() {
        say_warning(&format!(
            "no slide file for {} slide(s), drawn on a blank canvas: {}",
            summary.without_slide.len(),
            pipeline::some_of(&summary.without_slide, ", ")
        ));
    }
    println!(
        "drew {} slide(s) into {} ({:.2} s per slide)",
        summary.drawn,
        request.out.display(),
        summary.seconds_per_slide
    );
    for path in &summary.full_res {
        println!("full resolution: {}", path.display());
    }
    Ok(())
}

fn synth_slides(dir: &Path, scale: f64, seed: u64) -> Result<()> {
    if scale.is_nan() || scale <= 0.0 {
        bail!("--scale must be positive");
    }
    let opts = stages::synth_slides::SlideOptions {
        per_class: ((6.0 * scale).round() as usize).max(1),
        seed,
        ..Default::default()
    };
    let summary = with_synth_bar(|progress| Ok(stages::synth_slides::generate_slides(dir, &opts, progress)?))?;
    println!(
        "wrote {} slides ({} × {} pixels at {} µm per pixel), labels.csv and lesions.csv to {}",
        summary.slides,
        opts.width,
        opts.height,
        stages::synth_slides::SLIDE_MPP,
        dir.display()
    );
    Ok(())
}

fn synth(out: &Path, opts: &stages::synth::SynthOptions) -> Result<()> {
    if opts.scale.is_nan() || opts.scale <= 0.0 || opts.mean_instances == 0 || opts.dim == 0 {
        bail!("--scale, --mean-instances and --dim must be positive");
    }
    let summary = with_synth_bar(|progress| Ok(stages::synth::generate(out, opts, progress)?))?;
    println!(
        "wrote {} slides of {} cases ({} instances, dim {}) to {}",
        summary.slides,
        summary.cases,
        summary.instances,
        opts.dim,
        out.display()
    );
    Ok(())
}

fn bench(what: Bench) -> Result<()> {
    match what {
        Bench::Index { dir } => {
            let scratch = tempfile_dir()?;
            let r = stages::bench::index(&dir, &scratch)?;
            let _ = std::fs::remove_dir_all(&scratch);
            let mb = r.bytes as f64 / 1e6;
            println!("{} files, {mb:.1} MB; best of {} alternating tries", r.files, stages::bench::REPEATS);
            for (cache, (plain, index)) in [("in page cache", r.warm), ("evicted (cold)", r.cold)] {
                println!("{cache}:");
                println!("  plain read        {plain:>8.3}s  {:>8.1} MB/s", mb / plain);
                println!(
                    "  first index       {index:>8.3}s  {:>8.1} MB/s  ({:.0}% of plain read)",
                    mb / index,
                    100.0 * plain / index
                );
            }
            println!("unchanged reindex   {:>8.3}s  files read: {}", r.reindex_s, r.reindex_files_read);
        }
        Bench::Pack { dir } => {
            let scratch = tempfile_dir()?;
            let r = stages::bench::pack(&dir, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            let r = r?;
            println!("{} slides, a {:.2} GB store", r.slides, gb(r.store_bytes));
            println!("full pack         {:>8.2}s", r.full_s);
            println!("one slide added   {:>8.2}s  ({:.3}x the full pack)", r.added_s, r.added_s / r.full_s);
            println!(
                "  read while indexing and packing again: {:.1} MB, {:.2}x the added file ({:.1} MB)",
                r.added_read_bytes as f64 / 1e6,
                r.added_read_bytes as f64 / r.added_file_bytes as f64,
                r.added_file_bytes as f64 / 1e6
            );
            print_peak_rss(r.peak_rss_bytes, r.store_bytes, "the store");
        }
        Bench::Extract {
            slides,
            synthetic,
            encoder,
            mpp,
            patch_size,
            input_size,
            batch_size,
            readers,
            device,
            dtype,
        } => {
            let scratch = tempfile_dir()?;
            let result = bench_extract(
                &scratch,
                slides.ok_or(synthetic),
                encoder,
                (mpp, patch_size),
                (input_size, batch_size),
                readers,
                device,
                &dtype,
            );
            let _ = std::fs::remove_dir_all(&scratch);
            result?;
        }
        Bench::Epoch {
            slides,
            instances,
            dim,
            epochs,
            batch_size,
            threads,
            device,
            model,
            max_instances_per_chunk,
            store_dtype,
            against_preset,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t as i32);
            }
            let device = stages::hmil::train::device(&device, None)?;
            let setup = stages::bench::EpochSetup {
                model,
                slides,
                instances,
                dim,
                epochs,
                batch_size,
                device,
                max_instances_per_chunk,
                half: store_dtype == "f16",
            };
            if !against_preset {
                let r = stages::bench::epoch(&setup)?;
                print_epochs(&r);
                let features = format!("the {:.2} GB of resident {store_dtype} features", gb(r.features_bytes));
                print_peak_rss(r.peak_rss_bytes, r.features_bytes, &features);
                return Ok(());
            }
            let (r, preset) = stages::bench::epoch_against(&setup, &setup.preset())?;
            print!("preset: ");
            print_epochs(&preset);
            print_epochs(&r);
            let c = stages::bench::Against::of(&r, &preset);
            let pairs: Vec<String> = c.ratios.iter().map(|x| format!("{x:.2}x")).collect();
            println!("per instance, epoch by epoch against the preset's: {}", pairs.join(" "));
            println!(
                "against the preset  {:.2}x per instance: the median of {} pair(s){} ({:.2}–{:.2}x)",
                c.median,
                c.counted,
                if c.counted < c.ratios.len() { " past the first, which faults in the heap" } else { "" },
                c.range.0,
                c.range.1
            );
            let features = format!(
                "the {:.2} GB of resident {store_dtype} features and the preset's {:.2} GB of f32",
                gb(r.features_bytes),
                gb(preset.features_bytes)
            );
            print_peak_rss(r.peak_rss_bytes, r.features_bytes + preset.features_bytes, &features);
        }
    }
    Ok(())
}

/// `bench extract`: on `slides`, or on that many synthetic slides written under `scratch`.
#[allow(clippy::too_many_arguments)]
fn bench_extract(
    scratch: &Path,
    slides: std::result::Result<PathBuf, usize>,
    model: PathBuf,
    (mpp, patch_size): (f64, u32),
    (input_size, batch_size): (u32, usize),
    readers: Option<usize>,
    device: String,
    dtype: &str,
) -> Result<()> {
    let dir = match slides {
        Ok(dir) => dir,
        Err(count) => {
            let per_class = count.div_ceil(stages::synth_slides::SLIDE_CLASSES.len()).max(1);
            let opts = stages::synth_slides::SlideOptions { per_class, ..Default::default() };
            stages::synth_slides::generate_slides(scratch, &opts, &|_, _| {})?;
            scratch.join("slides")
        }
    };
    let dtype = match dtype {
        "f32" => schemas::workflow::EncoderDtype::F32,
        "f16" => schemas::workflow::EncoderDtype::F16,
        "bf16" => schemas::workflow::EncoderDtype::Bf16,
        other => bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    let encoder: schemas::workflow::Encoder = serde_json::from_value(serde_json::json!({
        "model": model, "input_size": input_size, "batch_size": batch_size, "device": device,
        "readers": readers, "dtype": dtype,
    }))?;
    let spec = wsi::GridSpec { mpp, patch_size, mpp_fallback: None };
    let tissue = wsi::TissueParams { min_area: 0.5, ..Default::default() };
    let r = stages::bench::extract(&dir, &encoder, &spec, &tissue)?;
    println!(
        "{} slides, {} patches of {patch_size} px at {mpp} µm, resized to {input_size}; {} on {}, batches of {batch_size}; {} reader threads",
        r.slides,
        r.patches,
        model.display(),
        r.device,
        r.readers
    );
    println!("read + preprocess  {:>9.1} patches/s", r.read_pps);
    println!("encoder forward    {:>9.1} patches/s  (reader/encoder {:.2})", r.encode_pps, r.read_pps / r.encode_pps);
    println!(
        "whole extraction   {:>9.1} patches/s  ({:.2}x the slower of the two)",
        r.whole_pps,
        r.whole_pps / r.read_pps.min(r.encode_pps)
    );
    Ok(())
}

/// `bytes` in GB (10^9).
fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// What `bench epoch` measured of one setup, but the peak RSS.
fn print_epochs(r: &stages::bench::EpochReport) {
    let epochs = r.epoch_s.len();
    println!(
        "{}: {} slides, {} instances, dim {}, {} on {} ({} threads)",
        r.model.name(),
        r.slides,
        r.instances,
        r.dim,
        if epochs == 1 { "1 epoch".into() } else { format!("{epochs} epochs") },
        r.device,
        r.threads
    );
    let (low, high) = r.matmul_gflops;
    println!(
        "training FLOPs per instance {:.2} M; fp32 matmul {low:.1}–{high:.1} GFLOP/s between epochs",
        r.flops_per_instance / 1e6,
    );
    println!("matmul floor      {:>8.2}s per epoch", r.floor_s);
    for (i, s) in r.epoch_s.iter().enumerate() {
        println!("epoch {i}           {s:>8.2}s  ({:.2}x the floor)", s / r.floor_s);
    }
    println!("step memory       {}", r.step_budget);
    if r.recomputed > 0.0 {
        println!(
            "recomputed        {:.2} of the instances ran forward twice (every chunk of a step but its largest; a larger train.max_instances_per_chunk trades memory for fewer), {:.2} from their first layer's kept outputs, {:.2} from the kept outputs of the product after it",
            r.recomputed, r.past_stem, r.past_product
        );
    }
}

/// The bench line of the peak RSS, as a multiple of `size` bytes (`what`).
fn print_peak_rss(peak: u64, size: u64, what: &str) {
    println!("peak RSS          {:>8.2} GB  ({:.2}x {what})", gb(peak), peak as f64 / size as f64);
}

/// A fresh scratch directory under the system temp dir.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("hmil-flow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The cache keys of the workflow's nodes as they stand now (what `status` computes): the rows
/// `query` marks current.
fn current_keys(l: &Loaded) -> Result<HashSet<String>> {
    if let Err(e) = l.workflow.check_paths() {
        say_warning(&format!("no result is current: {e}"));
    }
    let status = pipeline::status(&l.dag, &l.store, &[], false)?;
    Ok(status.into_iter().filter(|s| s.freshness == Freshness::Fresh).filter_map(|s| s.key).collect())
}

fn query(
    wf: &WorkflowArgs,
    sql: Option<&str>,
    schema: bool,
    format: Option<OutputFormat>,
    out: Option<&Path>,
) -> Result<()> {
    let parsed = parse(wf)?;
    let workspace = &parsed.workflow.workflow.workspace;
    if !workspace.join("objects").is_dir() {
        return Err(query::Error::NoWorkspace(workspace.clone()).into());
    }
    let l = parsed.load()?;
    let ws = query::Workspace::open(l.store.root(), &current_keys(&l)?)?;
    if schema {
        for (name, schema) in ws.tables() {
            let cols: Vec<String> = schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect();
            println!("{name}\n  {}", cols.join("\n  "));
        }
        return Ok(());
    }
    let Some(sql) = sql else { bail!("give a SQL statement, or --schema to list the tables") };
    let answer = match ws.sql(sql) {
        Ok(b) => b,
        Err(query::Error::Sql(message)) => bail!("{message}"),
        Err(e) => return Err(e.into()),
    };
    let format = match (format, out.and_then(query::Format::of_path)) {
        (Some(OutputFormat::Table), _) => query::Format::Table,
        (Some(OutputFormat::Csv), _) => query::Format::Csv,
        (Some(OutputFormat::Json), _) => query::Format::Json,
        (Some(OutputFormat::Parquet), _) => query::Format::Parquet,
        (None, Some(by_extension)) => by_extension,
        (None, None) => query::Format::Table,
    };
    match out {
        Some(path) => {
            let mut file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            query::write(&answer, format, &mut file, path)?;
        }
        None => {
            if format == query::Format::Parquet {
                bail!("--format parquet needs --out FILE");
            }
            query::write(&answer, format, &mut std::io::stdout().lock(), Path::new("<stdout>"))?;
        }
    }
    Ok(())
}

/// Removes (or, with `dry_run`, lists) the store objects that no current node of the workflow
/// and none of the newest `keep_runs` runs uses.
fn gc(wf: &WorkflowArgs, keep_runs: usize, dry_run: bool) -> Result<()> {
    let l = load(wf)?;
    let mut keep = current_keys(&l)?;
    let current = keep.len();
    keep.extend(pipeline::recent_keys(&l.store, keep_runs)?);
    let jobs = pipeline::recent_jobs(&l.store, keep_runs)?;
    let garbage = pipeline::collect_garbage(&l.store, &keep, &jobs, dry_run)?;
    for g in &garbage {
        let (key, what) = match g.kind {
            GarbageKind::Object => (&g.key[..16.min(g.key.len())], g.node.as_deref().unwrap_or("?")),
            GarbageKind::Item => (&g.key[..16.min(g.key.len())], "(per-slide item)"),
            GarbageKind::Attempt => (g.key.as_str(), "(cluster job's folder)"),
        };
        println!("{:>10}  {key}  {what}", human_bytes(g.bytes));
    }
    let total = human_bytes(garbage.iter().map(|g| g.bytes).sum());
    let count = |kind| garbage.iter().filter(|g| g.kind == kind).count();
    let (objects, items, attempts) =
        (count(GarbageKind::Object), count(GarbageKind::Item), count(GarbageKind::Attempt));
    let (verb, root) = (if dry_run { "would remove" } else { "removed" }, l.store.root());
    println!(
        "{verb} {objects} object(s), {items} per-slide item(s) and {attempts} cluster job folder(s), {total}, from {}; kept {current} current and what the last {keep_runs} run(s) used",
        root.display()
    );
    Ok(())
}

/// `bytes` in B, KB, MB, GB or TB (powers of 1000), to one decimal.
fn human_bytes(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KB", "MB", "GB"] {
        if value < 999.95 {
            return if unit == "B" { format!("{bytes} B") } else { format!("{value:.1} {unit}") };
        }
        value /= 1000.0;
    }
    format!("{value:.1} TB")
}

/// Writes a workflow for `features` and `labels` to `out`, then checks it as `run --dry-run`
/// would and says what is missing.
fn init(
    look: stages::init::Look,
    labels: &Path,
    out: &Path,
    hierarchy: Option<&str>,
    name: Option<&str>,
    force: bool,
) -> Result<()> {
    if out.exists() && !force {
        bail!("{} exists; pass --force to replace it, or --out another file", out.display());
    }
    let survey = stages::init::survey(look, labels)?;
    let hierarchy = hierarchy.map(stages::init::parse_hierarchy).transpose()?;
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = name.map(str::to_owned).or(stem).unwrap_or_else(|| "workflow".into());
    match &survey.source {
        stages::init::Source::Features { dim, .. } => {
            println!("features: {} file(s), dimension {dim}", survey.formats_text())
        }
        stages::init::Source::Slides { mpp, .. } => println!(
            "slides: {} file(s); the first at {}",
            survey.formats_text(),
            mpp.map_or("an unknown resolution (set mpp_fallback)".into(), |m| format!("{m:.3} µm per pixel"))
        ),
    }
    println!(
        "labels: {} slides of {} cases; columns slide `{}`, label `{}`, case `{}`; classes: {}",
        survey.slides,
        survey.cases,
        survey.slide_column,
        survey.label_column,
        survey.case_column.as_deref().unwrap_or("(none: one slide per case)"),
        survey.classes_text()
    );
    let no_file = match survey.source {
        stages::init::Source::Features { .. } => "have no feature file",
        stages::init::Source::Slides { .. } => "have no slide file",
    };
    for (what, slides) in [(no_file, &survey.without_features), ("have no label", &survey.without_label)] {
        if !slides.is_empty() {
            say_warning(&format!("{} slide(s) {what}: {}", slides.len(), pipeline::some_of(slides, ", ")));
        }
    }
    if let Some(h) = &hierarchy {
        let (missing, unused) = survey.compare(h);
        if !missing.is_empty() {
            bail!("--hierarchy lacks the label(s) {}; add each under a coarse class", missing.join(", "));
        }
        if !unused.is_empty() {
            say_warning(&format!("--hierarchy class(es) without slides: {}", unused.join(", ")));
        }
    }
    std::fs::write(out, survey.draft(&name, out, hierarchy.as_ref()))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    let l = load(&WorkflowArgs { workflow: out.to_path_buf(), set: Vec::new() })
        .with_context(|| format!("checking {}", out.display()))?;
    l.workflow.check_paths()?;
    let status = pipeline::status(&l.dag, &l.store, &[], false)?;
    let stale = status.iter().filter(|s| s.freshness != Freshness::Fresh).count();
    println!("checked: {} node(s), {stale} to run; {} fold(s)", status.len(), l.workflow.splits.folds());
    if hierarchy.is_none() {
        say_warning("each class is its own coarse class: group them under [labels.hierarchy], or pass --hierarchy");
    }
    println!("next: hmil-flow run {}", out.display());
    Ok(())
}
