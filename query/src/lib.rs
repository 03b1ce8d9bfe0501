//! SQL over a workspace: every Parquet output of every published node becomes a row source of
//! the table named after the file (`metrics.parquet` → `metrics`), with the columns `run_id`
//! (the run that produced it), `node`, `cache_key` and `current` (whether it is what the node
//! holds now) added; the `runs` table holds every run's per-node record.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// What querying can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Table { path: PathBuf, message: String },
    /// The query itself, as DataFusion words it.
    #[error("{0}")]
    Sql(String),
    #[error("no workspace at {}: run the workflow first", .0.display())]
    NoWorkspace(PathBuf),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// A source file of a table and the provenance columns added to its rows.
struct Source {
    path: PathBuf,
    run_id: String,
    node: String,
    cache_key: String,
    current: bool,
}

fn read_parquet(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let err = |e: &dyn std::fmt::Display| Error::Table { path: path.into(), message: e.to_string() };
    let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(&e))?;
    let schema = builder.schema().clone();
    let batches = builder.build().map_err(|e| err(&e))?.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
    Ok((schema, batches))
}

/// Every table of the workspace at `root`: name → sources.
fn discover(root: &Path) -> Result<BTreeMap<String, Vec<Source>>> {
    let objects = root.join("objects");
    if !objects.is_dir() {
        return Err(Error::NoWorkspace(root.into()));
    }
    let mut current: HashSet<String> = HashSet::new();
    for entry in std::fs::read_dir(root.join("nodes"))
        .map_err(|source| Error::Io { path: root.join("nodes"), source })?
        .flatten()
    {
        if let Ok(bytes) = std::fs::read(entry.path())
            && let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(key) = record["key"].as_str()
        {
            current.insert(key.to_owned());
        }
    }
    let mut tables: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&objects)
        .map_err(|source| Error::Io { path: objects.clone(), source })?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else { continue };
        let Ok(m) = serde_json::from_slice::<pipeline::Manifest>(&bytes) else { continue };
        for name in m.outputs.keys() {
            if let Some(table) = name.strip_suffix(".parquet") {
                tables.entry(table.to_owned()).or_default().push(Source {
                    path: dir.join(name),
                    run_id: m.run_id.clone(),
                    node: m.node.clone(),
                    cache_key: m.key.clone(),
                    current: current.contains(&m.key),
                });
            }
        }
    }
    Ok(tables)
}

/// One table from its sources, provenance columns appended. Sources whose schema differs from
/// the current one (a changed hierarchy, say) are left out with a warning.
fn build(name: &str, sources: &[Source]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let loaded: Vec<(&Source, SchemaRef, Vec<RecordBatch>)> =
        sources.iter().map(|s| read_parquet(&s.path).map(|(schema, b)| (s, schema, b))).collect::<Result<_>>()?;
    let reference = loaded.iter().find(|(s, _, _)| s.current).or(loaded.first()).map(|(_, schema, _)| schema.clone());
    let Some(reference) = reference else { return Ok((Arc::new(Schema::empty()), Vec::new())) };
    let mut fields: Vec<Field> = reference.fields().iter().map(|f| f.as_ref().clone()).collect();
    for extra in ["run_id", "node", "cache_key"] {
        fields.push(Field::new(extra, DataType::Utf8, false));
    }
    fields.push(Field::new("current", DataType::Boolean, false));
    let schema = Arc::new(Schema::new(fields));
    let mut out = Vec::new();
    for (source, s, batches) in loaded {
        if s.fields() != reference.fields() {
            tracing::warn!("{name}: leaving out {} (its columns differ from the current ones)", source.path.display());
            continue;
        }
        for batch in batches {
            let n = batch.num_rows();
            let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
            for value in [&source.run_id, &source.node, &source.cache_key] {
                columns.push(Arc::new(StringArray::from(vec![value.as_str(); n])));
            }
            columns.push(Arc::new(BooleanArray::from(vec![source.current; n])));
            out.push(
                RecordBatch::try_new(schema.clone(), columns)
                    .map_err(|e| Error::Table { path: source.path.clone(), message: e.to_string() })?,
            );
        }
    }
    Ok((schema, out))
}

/// A DataFusion session with every table of the workspace at `root` registered.
pub struct Workspace {
    ctx: SessionContext,
    runtime: tokio::runtime::Runtime,
    tables: Vec<(String, SchemaRef)>,
}

impl Workspace {
    /// Registers every artifact table and the `runs` table.
    pub fn open(root: &Path) -> Result<Workspace> {
        let ctx = SessionContext::new();
        let mut tables = Vec::new();
        let mut register = |name: &str, schema: SchemaRef, batches: Vec<RecordBatch>| -> Result<()> {
            let table = MemTable::try_new(schema.clone(), vec![batches]).map_err(|e| Error::Sql(e.to_string()))?;
            ctx.register_table(name, Arc::new(table)).map_err(|e| Error::Sql(e.to_string()))?;
            tables.push((name.to_owned(), schema));
            Ok(())
        };
        for (name, sources) in discover(root)? {
            let (schema, batches) = build(&name, &sources)?;
            register(&name, schema, batches)?;
        }
        let mut runs: Vec<PathBuf> = std::fs::read_dir(root.join("runs"))
            .map_err(|source| Error::Io { path: root.join("runs"), source })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        runs.sort();
        let mut batches = Vec::new();
        for path in &runs {
            batches.extend(read_parquet(path)?.1);
        }
        register("runs", schemas::runs::schema(), batches)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|source| Error::Io { path: root.into(), source })?;
        Ok(Workspace { ctx, runtime, tables })
    }

    /// The registered tables and their schemas, by name.
    pub fn tables(&self) -> &[(String, SchemaRef)] {
        &self.tables
    }

    /// Runs one SQL statement.
    pub fn sql(&self, sql: &str) -> Result<Answer> {
        self.runtime.block_on(async {
            let df = self.ctx.sql(sql).await.map_err(|e| Error::Sql(e.to_string()))?;
            let schema = df.schema().inner().clone();
            let batches = df.collect().await.map_err(|e| Error::Sql(e.to_string()))?;
            Ok(Answer { schema, batches })
        })
    }
}

/// The result of a query: its schema (known even when no row matched) and its rows.
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Output formats of query results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
    Parquet,
}

/// Writes `answer` in `format` to `out`; an empty answer still carries its header/schema.
pub fn write(answer: &Answer, format: Format, out: &mut dyn std::io::Write, path_for_errors: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Table { path: path_for_errors.into(), message: e.to_string() };
    let batches = &answer.batches;
    match format {
        Format::Table if batches.is_empty() => {
            let names: Vec<&str> = answer.schema.fields().iter().map(|f| f.name().as_str()).collect();
            writeln!(out, "{}\n(no rows)", names.join(" | ")).map_err(|e| err(&e))
        }
        Format::Table => {
            let text = arrow::util::pretty::pretty_format_batches(batches).map_err(|e| err(&e))?;
            writeln!(out, "{text}").map_err(|e| err(&e))
        }
        Format::Csv => {
            if batches.is_empty() {
                let names: Vec<&str> = answer.schema.fields().iter().map(|f| f.name().as_str()).collect();
                return writeln!(out, "{}", names.join(",")).map_err(|e| err(&e));
            }
            let mut w = arrow::csv::Writer::new(out);
            batches.iter().try_for_each(|b| w.write(b)).map_err(|e| err(&e))
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(out);
            batches.iter().try_for_each(|b| w.write(b)).map_err(|e| err(&e))?;
            w.finish().map_err(|e| err(&e))
        }
        Format::Parquet => {
            let mut buf = Vec::new();
            let mut w = ArrowWriter::try_new(&mut buf, answer.schema.clone(), None).map_err(|e| err(&e))?;
            batches.iter().try_for_each(|b| w.write(b)).map_err(|e| err(&e))?;
            w.close().map_err(|e| err(&e))?;
            out.write_all(&buf).map_err(|e| err(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn answer(rows: usize) -> Answer {
        let schema = Arc::new(Schema::new(vec![Field::new("fold", DataType::Int64, false)]));
        let batches = (rows > 0)
            .then(|| {
                let col: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
                RecordBatch::try_new(schema.clone(), vec![col]).unwrap()
            })
            .into_iter()
            .collect();
        Answer { schema, batches }
    }

    fn text(a: &Answer, format: Format) -> String {
        let mut out = Vec::new();
        write(a, format, &mut out, Path::new("-")).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn empty_answers_keep_their_columns() {
        let empty = answer(0);
        assert_eq!(text(&empty, Format::Csv), "fold\n");
        assert!(text(&empty, Format::Table).contains("fold\n(no rows)"));
        assert_eq!(text(&empty, Format::Json), "[]");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.parquet");
        write(&empty, Format::Parquet, &mut File::create(&path).unwrap(), &path).unwrap();
        let (schema, batches) = read_parquet(&path).unwrap();
        assert_eq!(schema.field(0).name(), "fold");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
    }

    #[test]
    fn rows_are_written_in_each_format() {
        let two = answer(2);
        assert_eq!(text(&two, Format::Csv), "fold\n0\n1\n");
        assert_eq!(text(&two, Format::Json), r#"[{"fold":0},{"fold":1}]"#);
        assert!(text(&two, Format::Table).contains("| 1    |"));
    }
}
