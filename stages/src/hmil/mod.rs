//! Training and using the models (see the `models` crate): metrics, checkpoints, and the per-fold `train`, `evaluate` and `heatmaps` stages.

pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod external;
pub mod heatmaps;
pub mod infer;
pub mod memory;
pub mod metrics;
pub mod predict;
pub mod train;
