//! HMIL: the model, its loss, metrics, and the per-fold `train`, `evaluate` and `heatmaps` stages.

pub mod checkpoint;
pub mod data;
pub mod evaluate;
pub mod heatmaps;
pub mod infer;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod predict;
pub mod train;
