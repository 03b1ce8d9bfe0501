//! `hmil-flow`: the command line over the pipeline engine and the HMIL stages.

mod cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use cli::{Cli, Command, LogFormat, WorkflowArgs};
use pipeline::{Dag, Freshness, RunOptions, Store};
use schemas::workflow::Workflow;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HMIL_FLOW_LOG").unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// A loaded workflow: its file, digest, typed contents, DAG and store.
struct Loaded {
    path: PathBuf,
    digest: String,
    workflow: Workflow,
    dag: Dag,
    store: Store,
}

fn load(args: &WorkflowArgs) -> Result<Loaded> {
    let path = &args.workflow;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let workflow = Workflow::parse(&text, path, &args.set)?;
    let digest = pipeline::hash_bytes(format!("{text}\0{}", args.set.join("\0")).as_bytes());
    let dag = Dag::new(stages::nodes(&workflow))?;
    let store = Store::open(&workflow.workflow.workspace)?;
    Ok(Loaded { path: path.clone(), digest, workflow, dag, store })
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { wf, dry_run, force, jobs, summary_json, wait, verify } => {
            let l = load(&wf)?;
            if dry_run {
                let forced = pipeline::resolve_force(&l.dag, &force)?;
                print_status(&pipeline::status(&l.dag, &l.store, &forced, verify)?);
                return Ok(ExitCode::SUCCESS);
            }
            let opts = RunOptions { jobs, force, verify, wait };
            let summary = pipeline::run(&l.dag, &l.store, &opts)?;
            pipeline::write_runs(&l.store, &summary, &l.workflow.workflow.name, &l.digest)?;
            for n in &summary.nodes {
                println!(
                    "{:<9} {:>8.2}s  {:<28} {}",
                    n.status.as_str(),
                    n.seconds,
                    n.id,
                    n.reason.as_deref().unwrap_or("")
                );
            }
            if let Some(file) = summary_json {
                let json = serde_json::to_string_pretty(&summary)?;
                std::fs::write(&file, json).with_context(|| format!("writing {}", file.display()))?;
            }
            let failed = summary.nodes.iter().filter(|n| n.status == pipeline::Status::Failed).count();
            println!(
                "run {} of {}: {} node(s), {failed} failed",
                summary.run_id,
                l.path.display(),
                summary.nodes.len()
            );
            if failed > 0 {
                for n in summary.nodes.iter().filter(|n| n.status == pipeline::Status::Failed) {
                    eprintln!("error: {} failed: {}", n.id, n.reason.as_deref().unwrap_or(""));
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status { wf, verify } => {
            let l = load(&wf)?;
            print_status(&pipeline::status(&l.dag, &l.store, &[], verify)?);
        }
        Command::Dag { wf, dot } => {
            let l = load(&wf)?;
            print!("{}", if dot { l.dag.to_dot() } else { l.dag.to_text() });
        }
        Command::Synth { out, preset, scale, mean_instances, dim, seed } => {
            synth(&out, &preset, scale, mean_instances, dim, seed)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(status: &[pipeline::NodeStatus]) {
    for s in status {
        match &s.freshness {
            Freshness::Fresh => println!("fresh  {}", s.id),
            Freshness::Stale(why) => println!("stale  {}: {}", s.id, why.join("; ")),
        }
    }
}

fn synth(out: &Path, preset: &str, scale: f64, mean_instances: usize, dim: usize, seed: u64) -> Result<()> {
    if preset != "bracs" {
        bail!("unknown preset `{preset}` (known: bracs)");
    }
    if !(scale > 0.0) || mean_instances == 0 || dim == 0 {
        bail!("--scale, --mean-instances and --dim must be positive");
    }
    let opts = stages::synth::SynthOptions { scale, mean_instances, dim, seed };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "synth {bar:30} {pos}/{len} slides [{elapsed_precise}<{eta_precise}]",
    )?);
    let summary = stages::synth::generate(out, &opts, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {} slides of {} cases ({} instances, dim {dim}) to {}",
        summary.slides,
        summary.cases,
        summary.instances,
        out.display()
    );
    Ok(())
}
