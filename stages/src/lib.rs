//! The stages of an HMIL workflow and how a workflow file becomes their DAG.

pub mod bench;
pub mod error;
pub mod extract;
pub mod features;
pub mod hmil;
pub mod index;
pub mod init;
pub mod labels;
pub mod pack;
mod par;
pub mod pixels;
pub mod plan;
pub mod report;
pub mod rng;
pub mod splits;
pub mod stats;
pub mod synth;
pub mod synth_slides;
mod table;
pub mod thumbnails;
pub mod tile;

use std::sync::Arc;

use pipeline::Node;
use schemas::workflow::{Encoder, OnBadFile, PackDtype, Slides, Workflow};

use index::FeatureDir;

pub use error::{Error, Result};

/// Node ids of the preprocessing stages.
pub const TILE: &str = "tile_slides";
/// See [`TILE`].
pub const EXTRACT: &str = "extract_features";
/// See [`TILE`].
pub const THUMBNAILS: &str = "thumbnails";
/// See [`TILE`].
pub const INDEX: &str = "index_features";
/// See [`TILE`].
pub const PACK: &str = "pack_features";
/// See [`TILE`].
pub const JOIN: &str = "join_labels";
/// See [`TILE`].
pub const SPLIT: &str = "split_folds";
/// Node id of the report, made last.
pub const REPORT: &str = "report";

/// The nodes of `wf`, ready for [`pipeline::Dag::new`]: preprocessing (and `thumbnails` of the
/// slides heatmaps draw on, when there are any), then `train`, `evaluate` and (for HMIL)
/// `heatmaps` per variant, seed and fold (see [`plan::Coordinates`]), then `report` (which names
/// `workflow_digest`). In the results folder, the labels, splits and report are at the top, the
/// feature index under `features/`, slides' pictures under `slides/`, and each run's model,
/// evaluation and heatmaps under `[variants/<name>/][seed_<s>/]folds/<k>/`.
pub fn nodes(wf: &Workflow, workflow_digest: &str) -> Vec<Node> {
    let d = &wf.dataset;
    let classes = classes(wf);
    let sources = hmil::train::Sources { pack_node: PACK.into(), labels_node: JOIN.into(), splits_node: SPLIT.into() };
    let mut nodes = match (&wf.slides, &wf.encoder, &d.features) {
        (Some(slides), Some(encoder), _) => {
            let made = FeatureDir::Made { node: EXTRACT.into(), artifact: extract::H5_DIR.into() };
            let mut nodes = slide_nodes(slides, encoder);
            nodes.extend(feature_nodes(&made, d.on_bad_file, d.pack_dtype));
            nodes
        }
        (_, _, Some(dir)) => feature_nodes(&FeatureDir::External(dir.clone()), d.on_bad_file, d.pack_dtype),
        _ => unreachable!("validated: dataset.features, or [slides] with [encoder]"),
    };
    nodes.extend([
        Node::new(
            JOIN,
            None,
            Arc::new(labels::JoinLabels { csv: d.labels.clone(), labels: wf.labels.clone(), index_node: INDEX.into() }),
        )
        .results_in(""),
        Node::new(
            SPLIT,
            None,
            Arc::new(splits::SplitFolds {
                splits: wf.splits.clone(),
                seed: wf.workflow.seed,
                labels_node: JOIN.into(),
            }),
        )
        .results_in(""),
    ]);
    let thumbnails = wf.heatmap_slides().map(|dir| {
        let stage = thumbnails::Thumbnails { dir: dir.to_path_buf() };
        Node::new(THUMBNAILS, None, Arc::new(stage)).results_in("slides")
    });
    let thumbnails_node = thumbnails.as_ref().map(|n| n.id.clone());
    nodes.extend(thumbnails);
    let mut folds = Vec::new();
    for run in plan::Coordinates::all(wf, fold_count(wf)) {
        let (label, results, fold, train) = (run.label(), run.results(), run.fold, &run.variant.train);
        let train_node = Node::new(
            "train",
            Some(&label),
            Arc::new(hmil::train::TrainFold {
                fold,
                config: train.clone(),
                seed: run.seed,
                classes: classes.clone(),
                sources: sources.clone(),
            }),
        )
        .results_in(&results);
        let evaluate = hmil::evaluate::EvaluateFold {
            fold,
            config: wf.evaluate.clone(),
            device: train.device.clone(),
            classes: classes.clone(),
            sources: sources.clone(),
            train_node: train_node.id.clone(),
        };
        let evaluate = Node::new("evaluate", Some(&label), Arc::new(evaluate)).results_in(&results);
        // A flat model's logits do not split into evidence; its attention, if any, is in
        // attention.parquet.
        let heatmaps = (!train.model.is_flat()).then(|| {
            let stage = hmil::heatmaps::HeatmapsFold {
                fold,
                device: train.device.clone(),
                classes: classes.clone(),
                sources: sources.clone(),
                map: wf.heatmaps.map,
                top_tiles: wf.heatmaps.top_tiles,
                train_node: train_node.id.clone(),
                thumbnails_node: thumbnails_node.clone(),
            };
            Node::new("heatmaps", Some(&label), Arc::new(stage)).results_in(&results)
        });
        folds.push(report::FoldNodes {
            variant: run.variant.name.clone(),
            seed: run.seed,
            fold,
            train: train_node.id.clone(),
            evaluate: evaluate.id.clone(),
            heatmaps: heatmaps.as_ref().map(|n| n.id.clone()),
            results,
        });
        nodes.extend([train_node, evaluate].into_iter().chain(heatmaps));
    }
    let externals = cohort_nodes(wf, &folds, &classes, &mut nodes);
    let report = report::Report {
        workflow: wf.workflow.name.clone(),
        workflow_digest: workflow_digest.to_owned(),
        device: wf.train.device.clone(),
        classes,
        folds,
        compare_to: wf.report.compare_to.clone().unwrap_or_else(|| wf.variants()[0].name.clone()),
        externals,
    };
    nodes.push(
        Node::new(REPORT, None, Arc::new(report))
            .results_in("")
            .results_name(report::ALL_METRICS, "metrics.parquet")
            .results_name(report::ALL_PREDICTIONS, "predictions.parquet"),
    );
    nodes
}

/// Per external cohort: its own `index_features`, `pack_features` and `join_labels`
/// (`…[cohort=c]`), and an `external` node per variant and seed over the fold models of `folds`,
/// all shown under `cohorts/<c>/`. Returns the `external` nodes for the report.
fn cohort_nodes(
    wf: &Workflow,
    folds: &[report::FoldNodes],
    classes: &hmil::train::Classes,
    nodes: &mut Vec<Node>,
) -> Vec<report::ExternalNodes> {
    let d = &wf.dataset;
    let mut externals = Vec::new();
    for cohort in &wf.cohorts {
        let label = format!("cohort={}", cohort.name);
        let results = format!("cohorts/{}", cohort.name);
        let index = Node::new(
            "index_features",
            Some(&label),
            Arc::new(index::IndexFeatures {
                features: FeatureDir::External(cohort.features.clone()),
                on_bad_file: d.on_bad_file,
            }),
        )
        .results_in(format!("{results}/features"));
        let pack = pack::PackFeatures {
            features: FeatureDir::External(cohort.features.clone()),
            dtype: d.pack_dtype,
            index_node: index.id.clone(),
        };
        let pack = Node::new("pack_features", Some(&label), Arc::new(pack)).results_in(format!("{results}/features"));
        let join =
            labels::JoinLabels { csv: cohort.labels.clone(), labels: wf.labels.clone(), index_node: index.id.clone() };
        let join = Node::new("join_labels", Some(&label), Arc::new(join)).results_in(&results);
        // One training (variant and seed) per fold-0 coordinate.
        for run in plan::Coordinates::all(wf, 1) {
            let (variant, seed) = (&run.variant, run.seed);
            let train_nodes: Vec<String> =
                folds.iter().filter(|f| f.variant == variant.name && f.seed == seed).map(|f| f.train.clone()).collect();
            let stage = hmil::external::ExternalCohort {
                cohort: cohort.name.clone(),
                variant: variant.name.clone(),
                seed,
                device: variant.train.device.clone(),
                batch_size: wf.evaluate.batch_size,
                classes: classes.clone(),
                pack_node: pack.id.clone(),
                labels_node: join.id.clone(),
                train_nodes,
            };
            let label = std::iter::once(label.clone()).chain(run.training()).collect::<Vec<_>>().join(",");
            let folder = format!("{results}/{}", run.training_folder());
            let node = Node::new("external", Some(&label), Arc::new(stage)).results_in(folder.trim_end_matches('/'));
            externals.push(report::ExternalNodes {
                cohort: cohort.name.clone(),
                variant: variant.name.clone(),
                seed,
                node: node.id.clone(),
            });
            nodes.push(node);
        }
        nodes.extend([index, pack, join]);
    }
    externals
}

/// `tile_slides` and `extract_features`: patches of the slides in `slides.dir`, and their features
/// (one CLAM `.h5` per slide), shown under `slides/` in the results folder.
pub fn slide_nodes(slides: &Slides, encoder: &Encoder) -> Vec<Node> {
    let tile = tile::TileSlides::new(slides);
    let extract = extract::ExtractFeatures::new(slides, encoder, TILE);
    vec![
        Node::new(TILE, None, Arc::new(tile)).results_in("slides"),
        Node::new(EXTRACT, None, Arc::new(extract)).results_in("slides"),
    ]
}

/// `index_features` and `pack_features` over the feature files in `features`, shown under
/// `features/` in the results folder.
pub fn feature_nodes(features: &FeatureDir, on_bad_file: OnBadFile, dtype: PackDtype) -> Vec<Node> {
    let index = index::IndexFeatures { features: features.clone(), on_bad_file };
    let pack = pack::PackFeatures { features: features.clone(), dtype, index_node: INDEX.into() };
    vec![
        Node::new(INDEX, None, Arc::new(index)).results_in("features"),
        Node::new(PACK, None, Arc::new(pack)).results_in("features"),
    ]
}

/// The workflow's class hierarchy as the model sees it.
pub fn classes(wf: &Workflow) -> hmil::train::Classes {
    let h = &wf.labels.hierarchy;
    hmil::train::Classes {
        coarse: h.coarse().into_iter().map(str::to_owned).collect(),
        fine: h.fine().into_iter().map(str::to_owned).collect(),
        fine_to_coarse: h.fine_to_coarse(),
    }
}

/// How many folds the workflow trains: as configured, or as many `splits_{k}.csv` as the
/// import directory holds.
fn fold_count(wf: &Workflow) -> usize {
    match (&wf.splits.method, &wf.splits.dir) {
        (schemas::workflow::SplitMethod::Import, Some(dir)) => std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_prefix("splits_")
                            .and_then(|r| r.strip_suffix(".csv"))
                            .is_some_and(|k| k.parse::<usize>().is_ok())
                    })
                    .count()
            })
            .unwrap_or(0),
        _ => wf.splits.folds(),
    }
}
