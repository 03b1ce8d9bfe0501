//! Holding what a stage wrote to what it declared, before anything is published: every output
//! present, and every table with exactly its declared columns.

use std::fs::File;
use std::path::Path;

use arrow::datatypes::{Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::stage::Output;
use crate::store::is_directory;

/// Why the outputs in `staging` are not what the stage declared, if they are not.
pub(crate) fn mismatch(staging: &Path, outputs: &[Output]) -> Option<String> {
    outputs.iter().find_map(|o| mismatch_of(staging, o))
}

fn mismatch_of(staging: &Path, output: &Output) -> Option<String> {
    let path = staging.join(output.name);
    let present = if is_directory(output.name) { path.is_dir() } else { path.is_file() };
    if !present {
        return Some(format!("the stage did not write its declared output {}", output.name));
    }
    let declared = output.schema.as_ref()?;
    let written = File::open(&path)
        .map_err(|e| e.to_string())
        .and_then(|f| ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| e.to_string()));
    let written = match written {
        Ok(reader) => reader.schema().clone(),
        Err(e) => return Some(format!("the stage's output {} is not a readable Parquet table: {e}", output.name)),
    };
    difference(declared, &written).map(|d| {
        format!("the stage wrote {} with other columns than it declares: {d} (a bug in the stage)", output.name)
    })
}

/// The first way `written` differs from `declared` in its columns' names, types and nullability.
fn difference(declared: &Schema, written: &Schema) -> Option<String> {
    let describe = |f: &Field| format!("`{}` {}{}", f.name(), f.data_type(), if f.is_nullable() { "?" } else { "" });
    let (d, w) = (declared.fields(), written.fields());
    for (i, want) in d.iter().enumerate() {
        match w.get(i) {
            None => return Some(format!("column {} {} is missing", i + 1, describe(want))),
            Some(got)
                if got.name() != want.name()
                    || got.data_type() != want.data_type()
                    || got.is_nullable() != want.is_nullable() =>
            {
                return Some(format!("column {} is {}, not {}", i + 1, describe(got), describe(want)));
            }
            Some(_) => {}
        }
    }
    let extra: Vec<String> = w.iter().skip(d.len()).map(|f| describe(f)).collect();
    (!extra.is_empty()).then(|| format!("undeclared column(s) {}", extra.join(", ")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::DataType;
    use parquet::arrow::ArrowWriter;

    use super::*;

    fn write(path: &Path, field: Field) {
        let schema = Arc::new(Schema::new(vec![field]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1]))]).unwrap();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn a_table_must_have_exactly_its_declared_columns() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("t.parquet"), Field::new("n", DataType::Int64, false));
        let output = |fields: Vec<Field>| Output { name: "t.parquet", schema: Some(Arc::new(Schema::new(fields))) };
        let n = Field::new("n", DataType::Int64, false);
        assert_eq!(mismatch(dir.path(), &[output(vec![n.clone()])]), None);
        let cases = [
            (vec![Field::new("n", DataType::Int32, false)], "column 1 is `n` Int64, not `n` Int32"),
            (vec![Field::new("n", DataType::Int64, true)], "column 1 is `n` Int64, not `n` Int64?"),
            (vec![n.clone(), Field::new("m", DataType::Utf8, false)], "column 2 `m` Utf8 is missing"),
            (vec![], "undeclared column(s) `n` Int64"),
        ];
        for (fields, expected) in cases {
            let why = mismatch(dir.path(), &[output(fields)]).unwrap();
            assert!(why.contains(expected) && why.contains("t.parquet"), "{why}");
        }
        let absent = Output { name: "u.parquet", schema: None };
        assert_eq!(mismatch(dir.path(), &[absent]).unwrap(), "the stage did not write its declared output u.parquet");
        std::fs::write(dir.path().join("bad.parquet"), b"not parquet").unwrap();
        let bad = Output { name: "bad.parquet", schema: Some(Arc::new(Schema::new(vec![n]))) };
        assert!(mismatch(dir.path(), &[bad]).unwrap().contains("not a readable Parquet table"));
    }
}
