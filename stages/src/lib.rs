//! The stages of an HMIL workflow and how a workflow file becomes their DAG.

pub mod error;
pub mod features;
pub mod index;
pub mod labels;
pub mod pack;
pub mod rng;
pub mod splits;
pub mod synth;
mod table;

use std::sync::Arc;

use pipeline::Node;
use schemas::workflow::Workflow;

pub use error::{Error, Result};

/// Node ids of the preprocessing stages.
pub const INDEX: &str = "index_features";
/// See [`INDEX`].
pub const PACK: &str = "pack_features";
/// See [`INDEX`].
pub const JOIN: &str = "join_labels";
/// See [`INDEX`].
pub const SPLIT: &str = "split_folds";

/// The nodes of `wf`, ready for [`pipeline::Dag::new`].
pub fn nodes(wf: &Workflow) -> Vec<Node> {
    let d = &wf.dataset;
    vec![
        Node::new(
            INDEX,
            None,
            Arc::new(index::IndexFeatures {
                dir: d.features.clone(),
                on_bad_file: d.on_bad_file,
            }),
        ),
        Node::new(
            PACK,
            None,
            Arc::new(pack::PackFeatures {
                dir: d.features.clone(),
                dtype: d.pack_dtype,
                index_node: INDEX.into(),
            }),
        ),
        Node::new(
            JOIN,
            None,
            Arc::new(labels::JoinLabels {
                csv: d.labels.clone(),
                labels: wf.labels.clone(),
                index_node: INDEX.into(),
            }),
        ),
        Node::new(
            SPLIT,
            None,
            Arc::new(splits::SplitFolds {
                splits: wf.splits.clone(),
                seed: wf.workflow.seed,
                labels_node: JOIN.into(),
            }),
        ),
    ]
}
