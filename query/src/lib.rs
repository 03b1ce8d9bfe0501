//! SQL over a workspace: every Parquet output of every published node becomes a row source of
//! the table named after the file (`metrics.parquet` → `metrics`), with the columns `run_id`
//! (the run that produced it), `node`, `cache_key`, the node's coordinates `cohort`, `variant`
//! and `seed` (from its id, `evaluate[variant=abmil,seed=2,fold=0]`; null where the id does not
//! name them, and left to the file where it has such a column), `workflow` (the name of the
//! workflow whose run produced it) and `current` (whether it is an output of the workflow being
//! queried, as it stands now) added; the `runs` table holds every run's per-node record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{MemTable, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
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
#[derive(Debug)]
struct Source {
    path: PathBuf,
    run_id: String,
    node: String,
    cache_key: String,
    workflow: Option<String>,
    current: bool,
}

/// A Parquet file's schema, from its footer alone.
fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::Table { path: path.into(), message: e.to_string() })?;
    Ok(builder.schema().clone())
}

fn read_parquet(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let err = |e: &dyn std::fmt::Display| Error::Table { path: path.into(), message: e.to_string() };
    let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| err(&e))?;
    let schema = builder.schema().clone();
    let batches = builder.build().map_err(|e| err(&e))?.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))?;
    Ok((schema, batches))
}

/// Every run record of the workspace at `root`, in the current `runs` schema: columns that
/// older records lack are null.
fn read_runs(root: &Path) -> Result<Vec<RecordBatch>> {
    let dir = root.join("runs");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| Error::Io { path: dir.clone(), source })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    paths.sort();
    let schema = schemas::runs::schema();
    let mut out = Vec::new();
    for path in &paths {
        for batch in read_parquet(path)?.1 {
            let columns = schema
                .fields()
                .iter()
                .map(|f| match batch.column_by_name(f.name()) {
                    Some(c) => c.clone(),
                    None => new_null_array(f.data_type(), batch.num_rows()),
                })
                .collect();
            out.push(
                RecordBatch::try_new(schema.clone(), columns)
                    .map_err(|e| Error::Table { path: path.clone(), message: e.to_string() })?,
            );
        }
    }
    Ok(out)
}

/// Run id → the name of the workflow it ran.
fn workflow_of_runs(runs: &[RecordBatch]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for b in runs {
        let col = |name: &str| b.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
        if let (Some(run), Some(workflow)) = (col("run_id"), col("workflow")) {
            for (r, w) in run.iter().zip(workflow.iter()) {
                if let (Some(r), Some(w)) = (r, w) {
                    out.insert(r.to_owned(), w.to_owned());
                }
            }
        }
    }
    out
}

/// Every table of the workspace at `root`: name → sources. A source is current when its cache
/// key is in `current`.
fn discover(
    root: &Path,
    current: &HashSet<String>,
    workflows: &HashMap<String, String>,
) -> Result<BTreeMap<String, Vec<Source>>> {
    let objects = root.join("objects");
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
                    workflow: workflows.get(&m.run_id).cloned(),
                    current: current.contains(&m.key),
                });
            }
        }
    }
    Ok(tables)
}

/// A table of Parquet files, read when a statement scans it: its schema comes from the footers,
/// so a statement pays only for the tables it uses.
#[derive(Debug)]
struct LazyTable {
    name: String,
    sources: Vec<Source>,
    /// The columns of the current source (else the first), which every source must have.
    reference: SchemaRef,
    /// `reference` with the provenance columns appended.
    schema: SchemaRef,
    /// The node coordinates added as columns (those the files do not have themselves).
    coordinates: Vec<&'static str>,
}

/// Node coordinates that become columns: (name in a node id's label, whether an integer).
const COORDINATES: [(&str, bool); 3] = [("cohort", false), ("variant", false), ("seed", true)];

/// The value of `key` in a node id's label: `train[variant=abmil,seed=2,fold=0]` has variant
/// `abmil`.
fn coordinate<'a>(node: &'a str, key: &str) -> Option<&'a str> {
    let label = node.split_once('[')?.1.strip_suffix(']')?;
    label.split(',').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
}

impl LazyTable {
    fn new(name: &str, sources: Vec<Source>) -> Result<LazyTable> {
        let pick = sources.iter().find(|s| s.current).or(sources.first());
        let reference = match pick {
            Some(source) => parquet_schema(&source.path)?,
            None => Arc::new(Schema::empty()),
        };
        let mut fields: Vec<Field> = reference.fields().iter().map(|f| f.as_ref().clone()).collect();
        for extra in ["run_id", "node", "cache_key"] {
            fields.push(Field::new(extra, DataType::Utf8, false));
        }
        let mut coordinates = Vec::new();
        for (key, integer) in COORDINATES {
            if reference.field_with_name(key).is_err() {
                fields.push(Field::new(key, if integer { DataType::Int64 } else { DataType::Utf8 }, true));
                coordinates.push(key);
            }
        }
        fields.push(Field::new("workflow", DataType::Utf8, true));
        fields.push(Field::new("current", DataType::Boolean, false));
        let schema = Arc::new(Schema::new(fields));
        Ok(LazyTable { name: name.to_owned(), sources, reference, schema, coordinates })
    }

    /// Every source's rows, provenance columns appended. Sources whose columns differ from the
    /// reference (a changed hierarchy, say) are left out with a warning.
    fn load(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for source in &self.sources {
            let (s, batches) = read_parquet(&source.path)?;
            if s.fields() != self.reference.fields() {
                tracing::warn!(
                    "{}: leaving out {} (its columns differ from the current ones)",
                    self.name,
                    source.path.display()
                );
                continue;
            }
            for batch in batches {
                let n = batch.num_rows();
                let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
                for value in [&source.run_id, &source.node, &source.cache_key] {
                    columns.push(Arc::new(StringArray::from(vec![value.as_str(); n])));
                }
                for key in &self.coordinates {
                    let value = coordinate(&source.node, key);
                    columns.push(if *key == "seed" {
                        Arc::new(Int64Array::from(vec![value.and_then(|v| v.parse::<i64>().ok()); n]))
                    } else {
                        Arc::new(StringArray::from(vec![value; n]))
                    });
                }
                columns.push(Arc::new(StringArray::from(vec![source.workflow.as_deref(); n])));
                columns.push(Arc::new(BooleanArray::from(vec![source.current; n])));
                out.push(
                    RecordBatch::try_new(self.schema.clone(), columns)
                        .map_err(|e| Error::Table { path: source.path.clone(), message: e.to_string() })?,
                );
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl TableProvider for LazyTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batches = self.load().map_err(|e| DataFusionError::External(Box::new(e)))?;
        MemTable::try_new(self.schema.clone(), vec![batches])?.scan(state, projection, filters, limit).await
    }
}

/// A DataFusion session with every table of the workspace at `root` registered.
pub struct Workspace {
    ctx: SessionContext,
    runtime: tokio::runtime::Runtime,
    tables: Vec<(String, SchemaRef)>,
}

impl Workspace {
    /// Registers every artifact table (read when a statement scans it) and the `runs` table.
    /// Rows whose cache key is in `current` (the keys of the queried workflow's nodes) have
    /// `current = true`.
    pub fn open(root: &Path, current: &HashSet<String>) -> Result<Workspace> {
        if !root.join("objects").is_dir() {
            return Err(Error::NoWorkspace(root.into()));
        }
        let ctx = SessionContext::new();
        let mut tables = Vec::new();
        let runs = read_runs(root)?;
        for (name, sources) in discover(root, current, &workflow_of_runs(&runs))? {
            let table = LazyTable::new(&name, sources)?;
            tables.push((name.clone(), table.schema.clone()));
            ctx.register_table(&name, Arc::new(table)).map_err(|e| Error::Sql(e.to_string()))?;
        }
        let table = MemTable::try_new(schemas::runs::schema(), vec![runs]).map_err(|e| Error::Sql(e.to_string()))?;
        ctx.register_table("runs", Arc::new(table)).map_err(|e| Error::Sql(e.to_string()))?;
        tables.push(("runs".to_owned(), schemas::runs::schema()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|source| Error::Io { path: root.into(), source })?;
        Ok(Workspace { ctx, runtime, tables })
    }

    /// The registered tables and their schemas, by name.
    pub fn tables(&self) -> &[(String, SchemaRef)] {
        &self.tables
    }

    /// Runs one read-only SQL statement (a query: nothing that creates, changes or drops).
    pub fn sql(&self, sql: &str) -> Result<Answer> {
        let read_only = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        self.runtime.block_on(async {
            let df = self.ctx.sql_with_options(sql, read_only).await.map_err(|e| self.explain(e))?;
            let schema = df.schema().inner().clone();
            let batches = df.collect().await.map_err(|e| self.explain(e))?;
            Ok(Answer { schema, batches })
        })
    }

    /// A DataFusion error in words, with the tables listed when a table was not found.
    fn explain(&self, e: datafusion::error::DataFusionError) -> Error {
        let message = e.to_string();
        if message.contains("not found") && message.contains("table") {
            let names: Vec<&str> = self.tables.iter().map(|(n, _)| n.as_str()).collect();
            return Error::Sql(format!("{message}; the tables are: {}", names.join(", ")));
        }
        if ["DDL not supported", "DML not supported", "Statement not supported"].iter().any(|p| message.contains(p)) {
            return Error::Sql(format!("{message}; queries are read-only (SELECT, WITH, EXPLAIN, SHOW, DESCRIBE)"));
        }
        Error::Sql(message)
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

impl Format {
    /// The format a file name's extension calls for (`.csv`, `.json`, `.parquet`; else none).
    pub fn of_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "parquet" | "pq" => Some(Format::Parquet),
            "txt" => Some(Format::Table),
            _ => None,
        }
    }
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
            let mut w = arrow::json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow::json::writer::JsonArray>(&mut *out);
            batches.iter().try_for_each(|b| w.write(b)).map_err(|e| err(&e))?;
            w.finish().map_err(|e| err(&e))?;
            writeln!(out).map_err(|e| err(&e))
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
    fn a_node_s_coordinates_come_from_its_id() {
        let node = "evaluate[variant=abmil,seed=2,fold=0]";
        assert_eq!((coordinate(node, "variant"), coordinate(node, "seed")), (Some("abmil"), Some("2")));
        assert_eq!(coordinate(node, "cohort"), None);
        assert_eq!(coordinate("external[cohort=site_b]", "cohort"), Some("site_b"));
        assert_eq!(coordinate("report", "variant"), None);
    }

    #[test]
    fn empty_answers_keep_their_columns() {
        let empty = answer(0);
        assert_eq!(text(&empty, Format::Csv), "fold\n");
        assert!(text(&empty, Format::Table).contains("fold\n(no rows)"));
        assert_eq!(text(&empty, Format::Json), "[]\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.parquet");
        write(&empty, Format::Parquet, &mut File::create(&path).unwrap(), &path).unwrap();
        let (schema, batches) = read_parquet(&path).unwrap();
        assert_eq!(schema.field(0).name(), "fold");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
    }

    #[test]
    fn json_keeps_null_values() {
        let schema = Arc::new(Schema::new(vec![Field::new("class", DataType::Utf8, true)]));
        let col: ArrayRef = Arc::new(StringArray::from(vec![Some("N"), None]));
        let a = Answer { schema: schema.clone(), batches: vec![RecordBatch::try_new(schema, vec![col]).unwrap()] };
        assert_eq!(text(&a, Format::Json), "[{\"class\":\"N\"},{\"class\":null}]\n");
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::of_path(Path::new("x.CSV")), Some(Format::Csv));
        assert_eq!(Format::of_path(Path::new("x.json")), Some(Format::Json));
        assert_eq!(Format::of_path(Path::new("x.parquet")), Some(Format::Parquet));
        assert_eq!(Format::of_path(Path::new("x")), None);
    }

    /// A workspace with one published `metrics.parquet` (two rows) under key `k1`, which is current.
    fn workspace(dir: &Path) -> Workspace {
        let obj = dir.join("objects/k1");
        std::fs::create_dir_all(&obj).unwrap();
        std::fs::create_dir_all(dir.join("runs")).unwrap();
        let mut f = File::create(obj.join("metrics.parquet")).unwrap();
        write(&answer(2), Format::Parquet, &mut f, Path::new("-")).unwrap();
        let manifest = serde_json::json!({
            "key": "k1", "node": "evaluate[fold=0]", "run_id": "r1", "created_at": "", "seconds": 0.0,
            "engine_version": "t", "outputs": {"metrics.parquet": {"digest": "d", "stat": {"bytes": 0, "mtime_ns": 0}}},
            "parts": {"kind": "evaluate", "code_version": "1", "params": null, "inputs": {}}
        });
        std::fs::write(obj.join("manifest.json"), manifest.to_string()).unwrap();
        Workspace::open(dir, &HashSet::from(["k1".to_owned()])).unwrap()
    }

    #[test]
    fn current_is_the_given_keys_and_statements_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let ws = workspace(dir.path());
        let a = ws.sql("SELECT count(*) AS n FROM metrics WHERE current AND workflow IS NULL").unwrap();
        assert_eq!(text(&a, Format::Csv), "n\n2\n");
        for statement in
            ["DROP TABLE metrics", "CREATE TABLE t AS SELECT 1", "INSERT INTO metrics SELECT * FROM metrics"]
        {
            let err = ws.sql(statement).err().expect(statement).to_string();
            assert!(err.contains("queries are read-only"), "{statement}: {err}");
        }
        assert!(ws.sql("SELECT count(*) FROM metrics").is_ok(), "nothing was dropped");
        let err = ws.sql("SELECT * FROM metricz").err().unwrap().to_string();
        assert!(err.contains("the tables are: metrics, runs"), "{err}");
    }

    #[test]
    fn runs_recorded_before_a_column_existed_still_load() {
        let dir = tempfile::tempdir().unwrap();
        workspace(dir.path());
        // A run record of the schema before `settings`: every column but that one.
        let old: Vec<Field> = schemas::runs::schema()
            .fields()
            .iter()
            .filter(|f| f.name() != "settings")
            .map(|f| f.as_ref().clone())
            .collect();
        let old = Arc::new(Schema::new(old));
        let columns = old
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.data_type() {
                    DataType::Utf8 => Arc::new(StringArray::from(vec!["x"])),
                    DataType::Float64 => Arc::new(arrow::array::Float64Array::from(vec![1.0])),
                    _ => Arc::new(arrow::array::TimestampMillisecondArray::from(vec![0]).with_timezone("+00:00")),
                }
            })
            .collect();
        let mut f = File::create(dir.path().join("runs/r0.parquet")).unwrap();
        let batch = RecordBatch::try_new(old.clone(), columns).unwrap();
        write(&Answer { schema: old, batches: vec![batch] }, Format::Parquet, &mut f, Path::new("-")).unwrap();
        let ws = Workspace::open(dir.path(), &HashSet::new()).unwrap();
        let a = ws.sql("SELECT count(*) AS n FROM runs WHERE settings IS NULL").unwrap();
        assert_eq!(text(&a, Format::Csv), "n\n1\n");
    }

    #[test]
    fn rows_are_written_in_each_format() {
        let two = answer(2);
        assert_eq!(text(&two, Format::Csv), "fold\n0\n1\n");
        assert_eq!(text(&two, Format::Json), "[{\"fold\":0},{\"fold\":1}]\n");
        assert!(text(&two, Format::Table).contains("| 1    |"));
    }
}
