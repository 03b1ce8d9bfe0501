//! The `runs` table: one row per node per `hmil-flow run`, kept under the workspace's `runs/`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Arrow schema of the `runs` table.
pub fn schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into()));
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("workflow", DataType::Utf8, false),
        Field::new("workflow_digest", DataType::Utf8, false),
        // JSON of the effective workflow; runs recorded before it was kept have none.
        Field::new("settings", DataType::Utf8, true),
        Field::new("run_started_at", ts(), false),
        Field::new("run_ended_at", ts(), false),
        Field::new("node_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, true),
        Field::new("cache_key", DataType::Utf8, true),
        Field::new("seconds", DataType::Float64, false),
        // The scheduler job that ran the node (a Slurm job id) and the state it ended in; none
        // for a node run in the driver, and in runs recorded before they were kept.
        Field::new("job_id", DataType::Utf8, true),
        Field::new("job_state", DataType::Utf8, true),
    ]))
}
