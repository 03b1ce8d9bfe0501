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

/// `skipped.parquet` (index_features, tile_slides): files left out under `on_bad_file = "skip"`
/// or `on_bad_slide = "skip"`, and slides without tissue.
pub fn skipped() -> SchemaRef {
    schema(vec![utf8("path"), utf8("error")])
}

/// `slides.parquet` (tile_slides): one row per slide found, with how it is tiled.
pub fn slides() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        utf8("path"),
        // OpenSlide's hash of the slide's metadata and lowest-resolution level.
        utf8("quickhash"),
        Field::new("width", DataType::Int64, false),
        Field::new("height", DataType::Int64, false),
        Field::new("mpp", DataType::Float64, false),
        // Pyramid level patches are read from, and their side there and at level 0.
        Field::new("level", DataType::Int32, false),
        Field::new("read_size", DataType::Int64, false),
        Field::new("size", DataType::Int64, false),
        Field::new("patches", DataType::Int64, false),
    ])
}

/// `tiles.parquet` (tile_slides): one row per patch on tissue; x, y at level 0.
pub fn tiles() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        Field::new("x", DataType::Int64, false),
        Field::new("y", DataType::Int64, false),
        Field::new("level", DataType::Int32, false),
        Field::new("size", DataType::Int64, false),
    ])
}

/// `thumbnails.parquet` (thumbnails): one row per slide read, with its level-0 size, its microns
/// per pixel when it says, and how many level-0 pixels a pixel of its thumbnail spans.
pub fn thumbnails() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        utf8("path"),
        Field::new("width", DataType::Int64, false),
        Field::new("height", DataType::Int64, false),
        Field::new("mpp", DataType::Float64, true),
        Field::new("downsample", DataType::Float64, false),
    ])
}

/// `extracted.parquet` (extract_features): one row per slide encoded.
pub fn extracted() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        Field::new("patches", DataType::Int64, false),
        Field::new("dim", DataType::Int64, false),
    ])
}

/// `packed.parquet` (pack_features): each slide's rows in `features/` and `coords/`, and where they
/// sit in the slides' concatenation.
pub fn packed() -> SchemaRef {
    schema(vec![
        utf8("slide_id"),
        Field::new("row_offset", DataType::Int64, false),
        Field::new("n_instances", DataType::Int64, false),
        Field::new("dim", DataType::Int64, false),
        utf8("dtype"),
        Field::new("has_coords", DataType::Boolean, false),
        // The feature file's digest, as indexed: a later pack reuses the rows of an unchanged file.
        utf8("digest"),
        // What the coordinates measure (`px`: level-0 pixels, `um`: micrometres, empty: the file
        // does not say), and the patch side in that unit when the file says.
        utf8("coord_unit"),
        Field::new("patch_size", DataType::Float64, true),
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
    schema(vec![Field::new("fold", DataType::Int32, false), utf8("slide_id"), utf8("case_id"), utf8("split")])
}

/// `history.parquet` (train): one row per epoch and value, in long form so that each model's
/// own loss terms need no column of their own. Values: `lr`, `loss` and `loss_<term>` (a model's
/// terms: HMIL's `ce_coarse`, `ce_fine`, `reg`, `con`, `align`; a flat model's `ce_fine`), the
/// schedule's (HMIL's `weight_ce_coarse`, `weight_con`, `tau`), `train_` and `val_` `acc_` and
/// `auc_` `coarse`/`fine`, `val_loss`, and `seconds`.
pub fn history() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, false),
        Field::new("epoch", DataType::Int32, false),
        utf8("name"),
        Field::new("value", DataType::Float64, true),
    ])
}

/// `predictions.parquet` (evaluate): one row per slide of a fold's val and test splits, with
/// `prob_fine_<class>`, `prob_coarse_<class>` and `prob_coarse_from_fine_<class>` columns.
pub fn predictions(fine: &[&str], coarse: &[&str]) -> SchemaRef {
    let mut fields = vec![
        Field::new("fold", DataType::Int32, false),
        utf8("split"),
        utf8("slide_id"),
        utf8("case_id"),
        utf8("fine_true"),
        utf8("fine_pred"),
        utf8("coarse_true"),
        utf8("coarse_pred"),
        utf8("coarse_from_fine_pred"),
    ];
    let prob = |prefix: &str, c: &str| Field::new(format!("{prefix}_{c}"), DataType::Float64, false);
    fields.extend(fine.iter().map(|c| prob("prob_fine", c)));
    fields.extend(coarse.iter().map(|c| prob("prob_coarse", c)));
    fields.extend(coarse.iter().map(|c| prob("prob_coarse_from_fine", c)));
    schema(fields)
}

/// `metrics.parquet` (evaluate): one row per fold, split, level (`coarse`, `fine`,
/// `coarse_from_fine`), metric and class (NULL for summaries). Confusion counts are metric
/// `confusion[<predicted class>]` with `class` the true class.
pub fn metrics() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, false),
        utf8("split"),
        utf8("level"),
        utf8("metric"),
        Field::new("class", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
    ])
}

/// The columns that say which run of a workflow a row comes from: `cohort` (for an external
/// cohort), `variant` and `seed`.
pub fn run_columns(cohort: bool) -> Vec<Field> {
    let mut fields = if cohort { vec![utf8("cohort")] } else { Vec::new() };
    fields.extend([utf8("variant"), Field::new("seed", DataType::Int64, false)]);
    fields
}

fn tagged(table: SchemaRef, cohort: bool) -> SchemaRef {
    let mut fields = run_columns(cohort);
    fields.extend(table.fields().iter().map(|f| f.as_ref().clone()));
    schema(fields)
}

/// `all_folds_metrics.parquet` (report): every run's [`metrics`], after its [`run_columns`].
pub fn all_metrics() -> SchemaRef {
    tagged(metrics(), false)
}

/// `all_folds_predictions.parquet` (report): every run's [`predictions`], after its [`run_columns`].
pub fn all_predictions(fine: &[&str], coarse: &[&str]) -> SchemaRef {
    tagged(predictions(fine, coarse), false)
}

/// `external_metrics.parquet` (external): [`metrics`] of every fold model (split `external`)
/// and of their ensemble (split `ensemble`, fold −1) on a cohort, after the [`run_columns`].
pub fn external_metrics() -> SchemaRef {
    tagged(metrics(), true)
}

/// `external_predictions.parquet` (external): [`predictions`] as [`external_metrics`] has metrics.
pub fn external_predictions(fine: &[&str], coarse: &[&str]) -> SchemaRef {
    tagged(predictions(fine, coarse), true)
}

/// `comparison.parquet` (report): per variant, level and metric on the test split, the mean and
/// sd over runs (folds × seeds), the 95% t interval over folds, the paired per-fold difference
/// from the reference variant with its interval and p-value (null for the reference), and the
/// metric of the variant's test predictions pooled over folds and seeds with its 95% bootstrap
/// interval (cases resampled).
pub fn comparison() -> SchemaRef {
    let f = |name: &str| Field::new(name, DataType::Float64, true);
    schema(vec![
        utf8("variant"),
        utf8("level"),
        utf8("metric"),
        Field::new("runs", DataType::Int64, false),
        f("mean"),
        f("sd"),
        f("ci_low"),
        f("ci_high"),
        f("difference"),
        f("difference_low"),
        f("difference_high"),
        f("p"),
        f("pooled"),
        f("pooled_low"),
        f("pooled_high"),
    ])
}

/// `attention.parquet` (evaluate): per slide, level and class, the top instances by attention.
pub fn attention() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, false),
        utf8("slide_id"),
        utf8("level"),
        utf8("class"),
        Field::new("rank", DataType::Int32, false),
        Field::new("instance", DataType::Int64, false),
        Field::new("score", DataType::Float64, false),
        Field::new("x", DataType::Float64, true),
        Field::new("y", DataType::Float64, true),
    ])
}

/// `instance_attention.parquet` (heatmaps, and `hmil-flow heatmap`, whose rows have no fold):
/// every instance of each drawn slide, for every class of both levels: its attention, its
/// evidence (its share of the class's logit above the mean of the classes' logits) and the
/// percentile rank of each within the slide (1: the highest). x and y are the feature file's.
pub fn instance_attention() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, true),
        utf8("slide_id"),
        utf8("level"),
        utf8("class"),
        Field::new("instance", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
        Field::new("y", DataType::Float64, false),
        Field::new("attention", DataType::Float64, false),
        Field::new("attention_percentile", DataType::Float64, false),
        Field::new("evidence", DataType::Float64, false),
        Field::new("evidence_percentile", DataType::Float64, false),
    ])
}

/// `heatmaps.parquet` (heatmaps, and `hmil-flow heatmap`): one row per slide drawn, with its
/// pictures (paths relative to the table's folder), what they were drawn on (`slide` or
/// `blank`), and the seconds drawing them took.
pub fn heatmaps() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, true),
        utf8("slide_id"),
        utf8("heatmap"),
        Field::new("top_tiles", DataType::Utf8, true),
        utf8("background"),
        Field::new("seconds", DataType::Float64, false),
    ])
}

/// `agreement.parquet` (evaluate): per slide and fine class, the cosine between the fine class's
/// attention over the slide's instances and its coarse class's (null when either is all zero).
pub fn agreement() -> SchemaRef {
    schema(vec![
        Field::new("fold", DataType::Int32, false),
        utf8("split"),
        utf8("slide_id"),
        utf8("fine_class"),
        utf8("coarse_class"),
        Field::new("agreement", DataType::Float64, true),
    ])
}

/// `hmil-flow predict` output: one row per new slide, with `prob_fine_<class>`,
/// `prob_coarse_<class>` and `prob_coarse_from_fine_<class>` columns.
pub fn new_predictions(fine: &[&str], coarse: &[&str]) -> SchemaRef {
    let mut fields =
        vec![utf8("slide_id"), utf8("path"), utf8("fine_pred"), utf8("coarse_pred"), utf8("coarse_from_fine_pred")];
    let prob = |prefix: &str, c: &str| Field::new(format!("{prefix}_{c}"), DataType::Float64, false);
    fields.extend(fine.iter().map(|c| prob("prob_fine", c)));
    fields.extend(coarse.iter().map(|c| prob("prob_coarse", c)));
    fields.extend(coarse.iter().map(|c| prob("prob_coarse_from_fine", c)));
    schema(fields)
}
