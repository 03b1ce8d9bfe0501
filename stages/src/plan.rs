//! How a workflow file becomes its DAG. Preprocessing comes once (and once more per external
//! cohort, as `…[cohort=c]`); the per-fold nodes fan out over variant × seed × fold, each named
//! by its coordinates (`train[variant=abmil,seed=2,fold=3]`) and shown in its own folder of the
//! results. A workflow without `[variants]` or `[repeats]` leaves that dimension out of names
//! and folders, so its nodes are `train[fold=k]` under `folds/<k>/`, as they always were.
//!
//! Every node is made before the nodes that read it, and those keep its [`NodeRef`]: a plan
//! cannot name a node that does not exist or read an artifact by a misspelt file name.

use std::sync::Arc;

use pipeline::{Node, NodeRef};
use schemas::artifacts::{ALL_METRICS, ALL_PREDICTIONS, COORDS_DIR, FEATURES_DIR, H5_DIR};
use schemas::workflow::{Encoder, OnBadFile, PackDtype, Slides, Variant, Workflow};

use crate::hmil::train::{Classes, Sources};
use crate::index::FeatureDir;
use crate::{extract, hmil, index, labels, pack, report, splits, thumbnails, tile};

/// Stage names of the preprocessing nodes.
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
/// Stage name of the report, made last.
pub const REPORT: &str = "report";

/// The nodes of `wf`, ready for [`pipeline::Dag::new`]: preprocessing (and `thumbnails` of the
/// slides heatmaps draw on, when there are any), then `train`, `evaluate` and (for HMIL)
/// `heatmaps` per variant, seed and fold (see [`Coordinates`]), the external cohorts' nodes,
/// then `report` (which names `workflow_digest`). In the results folder, the labels, splits and
/// report are at the top, the feature index under `features/`, slides' pictures under
/// `slides/`, each run's model, evaluation and heatmaps under
/// `[variants/<name>/][seed_<s>/]folds/<k>/`, and each cohort's under `cohorts/<c>/`.
pub fn nodes(wf: &Workflow, workflow_digest: &str) -> Vec<Node> {
    let d = &wf.dataset;
    let classes = classes(wf);
    let mut nodes = Vec::new();
    let features = match (&wf.slides, &wf.encoder, &d.features) {
        (Some(slides), Some(encoder), _) => {
            let [tile, extract] = slide_nodes(slides, encoder);
            let made = FeatureDir::Made { node: extract.handle(), artifact: H5_DIR };
            nodes.extend([tile, extract]);
            made
        }
        (_, _, Some(dir)) => FeatureDir::External(dir.clone()),
        _ => unreachable!("validated: dataset.features, or [slides] with [encoder]"),
    };
    let [index, pack] = feature_nodes(&features, d.on_bad_file, d.pack_dtype, None);
    let join = labels::JoinLabels { csv: d.labels.clone(), labels: wf.labels.clone(), index: index.handle() };
    let join = Node::new(JOIN, None, Arc::new(join)).results_in("");
    let split = splits::SplitFolds { splits: wf.splits.clone(), seed: wf.workflow.seed, labels: join.handle() };
    let split = Node::new(SPLIT, None, Arc::new(split)).results_in("");
    let sources = Sources { pack: pack.handle(), labels: join.handle(), splits: split.handle() };
    nodes.extend([index, pack, join, split]);
    let thumbnails = wf.heatmap_slides().map(|dir| {
        let stage = thumbnails::Thumbnails { dir: dir.to_path_buf() };
        Node::new(THUMBNAILS, None, Arc::new(stage)).results_in("slides")
    });
    let thumbnails_node = thumbnails.as_ref().map(Node::handle);
    nodes.extend(thumbnails);
    let mut folds = Vec::new();
    for run in Coordinates::all(wf, fold_count(wf)) {
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
            train: train_node.handle(),
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
                train: train_node.handle(),
                thumbnails: thumbnails_node.clone(),
            };
            Node::new("heatmaps", Some(&label), Arc::new(stage)).results_in(&results)
        });
        folds.push(report::FoldNodes {
            variant: run.variant.name.clone(),
            seed: run.seed,
            fold,
            train: train_node.handle(),
            evaluate: evaluate.handle(),
            heatmaps: heatmaps.as_ref().map(Node::handle),
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
            .results_name(&ALL_METRICS, "metrics.parquet")
            .results_name(&ALL_PREDICTIONS, "predictions.parquet"),
    );
    nodes
}

/// Per external cohort: its own `index_features`, `pack_features` and `join_labels`
/// (`…[cohort=c]`), and an `external` node per variant and seed over the fold models of `folds`,
/// all shown under `cohorts/<c>/`. Returns the `external` nodes for the report.
fn cohort_nodes(
    wf: &Workflow,
    folds: &[report::FoldNodes],
    classes: &Classes,
    nodes: &mut Vec<Node>,
) -> Vec<report::ExternalNodes> {
    let d = &wf.dataset;
    let mut externals = Vec::new();
    for cohort in &wf.cohorts {
        let label = format!("cohort={}", cohort.name);
        let results = format!("cohorts/{}", cohort.name);
        let features = FeatureDir::External(cohort.features.clone());
        let [index, pack] = feature_nodes(&features, d.on_bad_file, d.pack_dtype, Some((&label, &results)));
        let join = labels::JoinLabels { csv: cohort.labels.clone(), labels: wf.labels.clone(), index: index.handle() };
        let join = Node::new(JOIN, Some(&label), Arc::new(join)).results_in(&results);
        // One training (variant and seed) per fold-0 coordinate.
        for run in Coordinates::all(wf, 1) {
            let (variant, seed) = (&run.variant, run.seed);
            let trains: Vec<NodeRef> =
                folds.iter().filter(|f| f.variant == variant.name && f.seed == seed).map(|f| f.train.clone()).collect();
            let stage = hmil::external::ExternalCohort {
                cohort: cohort.name.clone(),
                variant: variant.name.clone(),
                seed,
                device: variant.train.device.clone(),
                batch_size: wf.evaluate.batch_size,
                classes: classes.clone(),
                pack: pack.handle(),
                labels: join.handle(),
                trains,
            };
            let label = std::iter::once(label.clone()).chain(run.training()).collect::<Vec<_>>().join(",");
            let folder = format!("{results}/{}", run.training_folder());
            let node = Node::new("external", Some(&label), Arc::new(stage)).results_in(folder.trim_end_matches('/'));
            externals.push(report::ExternalNodes {
                cohort: cohort.name.clone(),
                variant: variant.name.clone(),
                seed,
                node: node.handle(),
            });
            nodes.push(node);
        }
        nodes.extend([index, pack, join]);
    }
    externals
}

/// `tile_slides` and `extract_features`: patches of the slides in `slides.dir`, and their features
/// (one CLAM `.h5` per slide), shown under `slides/` in the results folder.
pub fn slide_nodes(slides: &Slides, encoder: &Encoder) -> [Node; 2] {
    let tile = Node::new(TILE, None, Arc::new(tile::TileSlides::new(slides))).results_in("slides");
    let extract = extract::ExtractFeatures::new(slides, encoder, tile.handle());
    [tile, Node::new(EXTRACT, None, Arc::new(extract)).results_in("slides")]
}

/// `index_features` and `pack_features` over the feature files in `features`, shown under
/// `features/` in the results folder; for an external cohort, labelled `(label, folder)`:
/// `index_features[cohort=c]` under `<folder>/features/`.
pub fn feature_nodes(
    features: &FeatureDir,
    on_bad_file: OnBadFile,
    dtype: PackDtype,
    cohort: Option<(&str, &str)>,
) -> [Node; 2] {
    let (label, folder) = match cohort {
        Some((label, folder)) => (Some(label), format!("{folder}/features")),
        None => (None, "features".to_owned()),
    };
    let index = index::IndexFeatures { features: features.clone(), on_bad_file };
    let index = Node::new(INDEX, label, Arc::new(index)).results_in(&folder);
    let pack = pack::PackFeatures { dtype, index: index.handle() };
    let pack = Node::new(PACK, label, Arc::new(pack)).results_in(&folder);
    [index, pack.results_hide(&FEATURES_DIR).results_hide(&COORDS_DIR)]
}

/// The workflow's class hierarchy as the model sees it.
pub fn classes(wf: &Workflow) -> Classes {
    let h = &wf.labels.hierarchy;
    Classes {
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

/// One training run's place in the fan-out.
#[derive(Debug, Clone)]
pub struct Coordinates {
    pub variant: Variant,
    pub seed: u64,
    pub fold: usize,
    /// Whether names and folders mention the variant, the seed.
    shown: (bool, bool),
}

impl Coordinates {
    /// Every run of `wf`, variant by variant, seed by seed, fold by fold.
    pub fn all(wf: &Workflow, folds: usize) -> Vec<Coordinates> {
        let shown = wf.fans_out();
        let seeds = wf.seeds();
        wf.variants()
            .into_iter()
            .flat_map(|variant| {
                seeds.iter().flat_map(move |&seed| {
                    let variant = variant.clone();
                    (0..folds).map(move |fold| Coordinates { variant: variant.clone(), seed, fold, shown })
                })
            })
            .collect()
    }

    /// The node label: `variant=…,seed=…,fold=…`, without the dimensions the workflow lacks.
    pub fn label(&self) -> String {
        let mut parts = self.training();
        parts.push(format!("fold={}", self.fold));
        parts.join(",")
    }

    /// The run's folder in the results: `[variants/<name>/][seed_<s>/]folds/<k>`.
    pub fn results(&self) -> String {
        format!("{}folds/{}", self.training_folder(), self.fold)
    }

    /// The label parts naming the training (variant and seed) of every fold, as the workflow
    /// shows them: what a node over all of one training's folds is named by.
    pub fn training(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if self.shown.0 {
            parts.push(format!("variant={}", self.variant.name));
        }
        if self.shown.1 {
            parts.push(format!("seed={}", self.seed));
        }
        parts
    }

    /// The folder of [`Coordinates::training`]: `[variants/<name>/][seed_<s>/]`.
    pub fn training_folder(&self) -> String {
        let mut path = String::new();
        if self.shown.0 {
            path += &format!("variants/{}/", self.variant.name);
        }
        if self.shown.1 {
            path += &format!("seed_{}/", self.seed);
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const WF: &str = "[workflow]\nname = \"t\"\nseed = 9\n[dataset]\nfeatures = \"f\"\nlabels = \"l.csv\"\n\
                      [labels.hierarchy]\nbenign = [\"N\"]\nmalignant = [\"IC\"]\n";

    #[test]
    fn names_and_folders_mention_only_the_dimensions_the_workflow_has() {
        let plain = Workflow::parse(WF, Path::new("w.toml"), &[]).unwrap();
        let runs = Coordinates::all(&plain, 2);
        assert_eq!(runs.iter().map(Coordinates::label).collect::<Vec<_>>(), ["fold=0", "fold=1"]);
        assert_eq!((runs[1].results(), runs[1].seed), ("folds/1".into(), 9));

        let text = format!("{WF}[variants.hmil]\n[variants.abmil]\nmodel = \"abmil\"\n[repeats]\nseeds = [1, 2]\n");
        let wf = Workflow::parse(&text, Path::new("w.toml"), &[]).unwrap();
        let runs = Coordinates::all(&wf, 2);
        assert_eq!(runs.len(), 8);
        assert_eq!(runs[5].label(), "variant=abmil,seed=1,fold=1");
        assert_eq!(runs[5].results(), "variants/abmil/seed_1/folds/1");
        let seeds_only = Workflow::parse(&format!("{WF}[repeats]\nseeds = [4]\n"), Path::new("w.toml"), &[]).unwrap();
        assert_eq!(Coordinates::all(&seeds_only, 1)[0].label(), "seed=4,fold=0");
    }
}
