//! Arrow schemas of the tables the stages write.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

fn schema(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

/// `features.parquet` (index_features): one row per feature file.
pub fn features() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        utf8("path"),
        utf8("format"),
        Field::new("n_instances", DataType::Int64, false),
        Field::new("dim", DataType::Int64, false),
        utf8("dtype"),
        Field::new("bytes", DataType::Int64, false),
        Field::new("has_coords", DataType::Boolean, false),
        utf8("digest"),
    ])
}

/// `skipped.parquet` (index_features): files left out under `on_bad_file = "skip"`.
pub fn skipped() -> SchemaRef {
    schema(vec![utf8("path"), utf8("error")])
}

/// `packed.parquet` (pack_features): where each slide's rows sit in `features.bin`/`coords.bin`.
pub fn packed() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        Field::new("row_offset", DataType::Int64, false),
        Field::new("n_instances", DataType::Int64, false),
        Field::new("dim", DataType::Int64, false),
        utf8("dtype"),
        Field::new("has_coords", DataType::Boolean, false),
    ])
}

/// `labels.parquet` (join_labels): one row per labelled slide with features.
pub fn labels() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        utf8("case_id"),
        utf8("fine_label"),
        Field::new("fine_idx", DataType::Int32, false),
        utf8("coarse_label"),
        Field::new("coarse_idx", DataType::Int32, false),
    ])
}

/// `dropped.parquet` (join_labels): rows left out under `on_missing = "drop"`, and why.
pub fn dropped() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        Field::new("case_id", DataType::Utf8, true),
        Field::new("label", DataType::Utf8, true),
        Field::new("csv_line", DataType::Int64, true),
        utf8("problem"),
    ])
}

/// `splits.parquet` (split_folds): one row per fold and slide.
pub fn splits() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, false),
        utf8("slide_id"),
        utf8("case_id"),
        utf8("split"),
    ])
}
