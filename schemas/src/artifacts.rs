//! Every file a stage writes, named once. The stage that writes an artifact and every stage that
//! reads it use the same constant, so a renamed file or a changed table cannot drift apart
//! between them, and the engine checks each table's schema when it publishes it.

use arrow::datatypes::SchemaRef;

use crate::tables;

/// What every kind of artifact has: the file name in its node's outputs.
pub trait Artifact {
    /// The file name; a name ending in `/` is a directory of files.
    fn file(&self) -> &'static str;
}

/// A Parquet table with fixed columns.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub file: &'static str,
    pub schema: fn() -> SchemaRef,
}

/// A Parquet table with a column per class of each level (fine classes, then coarse).
#[derive(Debug, Clone, Copy)]
pub struct ClassTable {
    pub file: &'static str,
    pub schema: fn(&[&str], &[&str]) -> SchemaRef,
}

/// Any other file (packed arrays, a model, a picture, markdown), or a directory of files when
/// the name ends in `/`.
#[derive(Debug, Clone, Copy)]
pub struct Blob {
    pub file: &'static str,
}

impl Artifact for Table {
    fn file(&self) -> &'static str {
        self.file
    }
}

impl Artifact for ClassTable {
    fn file(&self) -> &'static str {
        self.file
    }
}

impl Artifact for Blob {
    fn file(&self) -> &'static str {
        self.file
    }
}

const fn table(file: &'static str, schema: fn() -> SchemaRef) -> Table {
    Table { file, schema }
}

const fn blob(file: &'static str) -> Blob {
    Blob { file }
}

/// `tile_slides`: the slides found and how each is tiled.
pub const SLIDES: Table = table("slides.parquet", tables::slides);
/// `tile_slides`: the patches on tissue.
pub const TILES: Table = table("tiles.parquet", tables::tiles);
/// `tile_slides`: one tissue-mask picture per slide.
pub const QC_DIR: Blob = blob("qc/");
/// `tile_slides` and `index_features`: inputs left out, and why.
pub const SKIPPED: Table = table("skipped.parquet", tables::skipped);
/// `extract_features`: one CLAM `.h5` feature file per slide.
pub const H5_DIR: Blob = blob("h5/");
/// `extract_features`: the slides encoded.
pub const EXTRACTED: Table = table("extracted.parquet", tables::extracted);
/// `thumbnails`: the slides read, with their sizes.
pub const THUMBNAILS: Table = table("thumbnails.parquet", tables::thumbnails);
/// `thumbnails`: one thumbnail picture per slide.
pub const THUMBNAIL_DIR: Blob = blob("thumbnails/");
/// `index_features`: one row per feature file.
pub const FEATURE_INDEX: Table = table("features.parquet", tables::features);
/// `pack_features`: each slide's features (`<slide>.bin`, rows × dim little-endian values).
pub const FEATURES_DIR: Blob = blob("features/");
/// `pack_features`: each slide's instances' (x, y) (`<slide>.bin`, f64 pairs, NaN when unknown).
pub const COORDS_DIR: Blob = blob("coords/");
/// `pack_features`: each slide's rows (its offset in the slides' concatenation, in this table's
/// order, and count) and what [`FEATURES_DIR`] and [`COORDS_DIR`] hold for it.
pub const PACKED: Table = table("packed.parquet", tables::packed);
/// `join_labels`: the labelled slides.
pub const LABELS: Table = table("labels.parquet", tables::labels);
/// `join_labels`: label rows left out, and why.
pub const DROPPED: Table = table("dropped.parquet", tables::dropped);
/// `split_folds`: every fold's train/val/test slides.
pub const SPLITS: Table = table("splits.parquet", tables::splits);
/// `train`: the selected model's parameters (safetensors).
pub const MODEL: Blob = blob("model.safetensors");
/// `train`: per-epoch values.
pub const HISTORY: Table = table("history.parquet", tables::history);
/// `evaluate`: per-slide predictions on val and test.
pub const PREDICTIONS: ClassTable = ClassTable { file: "predictions.parquet", schema: tables::predictions };
/// `evaluate`: metrics per split, level and class.
pub const METRICS: Table = table("metrics.parquet", tables::metrics);
/// `evaluate`: each slide's top instances by attention.
pub const ATTENTION: Table = table("attention.parquet", tables::attention);
/// `evaluate`: how fine and coarse attention agree.
pub const AGREEMENT: Table = table("agreement.parquet", tables::agreement);
/// `heatmaps`: every instance's attention and evidence on the drawn slides.
pub const INSTANCE_ATTENTION: Table = table("instance_attention.parquet", tables::instance_attention);
/// `heatmaps`: the slides drawn and their pictures.
pub const HEATMAPS: Table = table("heatmaps.parquet", tables::heatmaps);
/// `heatmaps`: one heatmap picture per slide.
pub const HEATMAP_DIR: Blob = blob("heatmaps/");
/// `heatmaps`: one mosaic of top tiles per slide.
pub const TOP_TILES_DIR: Blob = blob("top_tiles/");
/// `external`: every fold model's and the ensemble's predictions on an external cohort.
pub const EXTERNAL_PREDICTIONS: ClassTable =
    ClassTable { file: "external_predictions.parquet", schema: tables::external_predictions };
/// `external`: their metrics.
pub const EXTERNAL_METRICS: Table = table("external_metrics.parquet", tables::external_metrics);
/// `report`: the report.
pub const REPORT: Blob = blob("report.md");
/// `report`: ROC curves.
pub const ROC: Blob = blob("roc.png");
/// `report`: confusion matrices.
pub const CONFUSION: Blob = blob("confusion.png");
/// `report`: training curves.
pub const CURVES: Blob = blob("curves.png");
/// `report`: the forest plot of differences from the reference variant (with two or more variants).
pub const COMPARISON_PLOT: Blob = blob("comparison.png");
/// `report`: every run's metrics in one table.
pub const ALL_METRICS: Table = table("all_folds_metrics.parquet", tables::all_metrics);
/// `report`: every run's predictions in one table.
pub const ALL_PREDICTIONS: ClassTable =
    ClassTable { file: "all_folds_predictions.parquet", schema: tables::all_predictions };
/// `report`: variants against the reference variant.
pub const COMPARISON: Table = table("comparison.parquet", tables::comparison);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_tables_lead_with_the_run_columns() {
        let names = |s: SchemaRef| s.fields().iter().take(4).map(|f| f.name().clone()).collect::<Vec<_>>();
        assert_eq!(names((ALL_METRICS.schema)()), ["variant", "seed", "fold", "split"]);
        assert_eq!(names((EXTERNAL_PREDICTIONS.schema)(&["a"], &["b"])), ["cohort", "variant", "seed", "fold"]);
        let all = (ALL_PREDICTIONS.schema)(&["a", "c"], &["b"]);
        assert_eq!(all.fields().len(), 2 + (tables::predictions)(&["a", "c"], &["b"]).fields().len());
    }
}
