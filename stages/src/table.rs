//! Reading and writing the Parquet tables stages exchange.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Float64Type, Int32Type, Int64Type, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use pipeline::Context;
use schemas::artifacts::Table;

use crate::error::{Error, Result};

/// Writes `columns` under `schema` to `path` as one Parquet file (snappy).
pub fn write(path: &Path, schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<()> {
    let mut w = Writer::create(path, schema)?;
    w.write(columns)?;
    w.close()
}

/// Writes `columns` as the stage's declared output `table`, under its schema.
pub fn write_output(ctx: &Context, table: &Table, columns: Vec<ArrayRef>) -> Result<()> {
    write(&ctx.output(table.file), (table.schema)(), columns)
}

/// A Parquet file written a batch of rows at a time, so that a large table never sits whole in
/// memory.
pub struct Writer {
    path: std::path::PathBuf,
    schema: SchemaRef,
    inner: ArrowWriter<File>,
}

impl Writer {
    /// Starts `path` (snappy) for rows of `schema`.
    pub fn create(path: &Path, schema: SchemaRef) -> Result<Writer> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        let inner = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| Error::Table { path: path.into(), message: e.to_string() })?;
        Ok(Writer { path: path.into(), schema, inner })
    }

    /// Appends rows given as `columns`.
    pub fn write(&mut self, columns: Vec<ArrayRef>) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| Error::Table { path: self.path.clone(), message: e.to_string() };
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| err(&e))?;
        self.inner.write(&batch).map_err(|e| err(&e))
    }

    /// Finishes the file.
    pub fn close(self) -> Result<()> {
        self.inner.close().map_err(|e| Error::Table { path: self.path, message: e.to_string() })?;
        Ok(())
    }
}

/// Writes `batches` (of one schema) to `path` as one Parquet file.
pub fn write_all(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Table { path: path.into(), message: e.to_string() };
    let schema = batches.first().ok_or_else(|| err(&"no table to write"))?.schema();
    let batch = concat_batches(&schema, batches).map_err(|e| err(&e))?;
    write(path, schema, batch.columns().to_vec())
}

/// `batch` with a column of `variant`, one of `seed`, and (for an external cohort) one of
/// `cohort` first: which run of a workflow its rows come from.
pub fn tag_run(batch: &RecordBatch, cohort: Option<&str>, variant: &str, seed: u64) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut fields = schemas::tables::run_columns(cohort.is_some());
    let mut columns: Vec<ArrayRef> = cohort.map(|c| string_col(std::iter::repeat_n(c, n))).into_iter().collect();
    columns.extend([
        string_col(std::iter::repeat_n(variant, n)),
        Arc::new(arrow::array::Int64Array::from(vec![seed as i64; n])) as ArrayRef,
    ]);
    fields.extend(batch.schema().fields().iter().map(|f| f.as_ref().clone()));
    columns.extend(batch.columns().iter().cloned());
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::Features(format!("tagging a run's table: {e}")))
}

/// Reads a whole Parquet file as one batch.
pub fn read(path: &Path) -> Result<RecordBatch> {
    let err = |e: &dyn std::fmt::Display| Error::Table { path: path.into(), message: e.to_string() };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(&e))?;
    let schema = builder.schema().clone();
    let batches = builder.build().map_err(|e| err(&e))?.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
    concat_batches(&schema, &batches).map_err(|e| err(&e))
}

/// A string column of `batch` as owned values (nulls as empty strings).
pub fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let col = batch.column_by_name(name).unwrap_or_else(|| panic!("table lacks column {name}"));
    let col = col.as_string::<i32>();
    (0..col.len()).map(|i| if col.is_null(i) { String::new() } else { col.value(i).to_owned() }).collect()
}

/// An Int64 column of `batch`.
pub fn i64s(batch: &RecordBatch, name: &str) -> Vec<i64> {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("table lacks column {name}"))
        .as_primitive::<Int64Type>()
        .values()
        .to_vec()
}

/// An Int32 column of `batch`.
pub fn i32s(batch: &RecordBatch, name: &str) -> Vec<i32> {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("table lacks column {name}"))
        .as_primitive::<Int32Type>()
        .values()
        .to_vec()
}

/// A Float64 column of `batch`, nulls as `None`.
pub fn f64s(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let col = batch.column_by_name(name).unwrap_or_else(|| panic!("table lacks column {name}"));
    col.as_primitive::<Float64Type>().iter().collect()
}

/// Shorthand for building string columns (from any iterator, sized or not).
pub fn string_col<S: AsRef<str>>(values: impl IntoIterator<Item = S>) -> ArrayRef {
    let values: Vec<S> = values.into_iter().collect();
    Arc::new(arrow::array::StringArray::from_iter_values(values))
}
