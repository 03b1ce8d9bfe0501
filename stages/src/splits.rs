//! `split_folds`: train/val/test assignments per fold, at the case level (no case in two splits
//! of a fold), stratified by fine label and seeded. Methods: `kfold` (every case tested exactly
//! once), `monte_carlo` (CLAM-style repeated sampling: test sets may overlap across folds), and
//! `import` of CLAM `splits_{k}.csv` files (which [`export_clam`] writes back).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::Int32Array;
use pipeline::{Context, Input, Stage, StageError};
use schemas::workflow::{SplitMethod, Splits};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::table;

/// Which part of a fold a slide is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Train,
    Val,
    Test,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Part::Train => "train",
            Part::Val => "val",
            Part::Test => "test",
        })
    }
}

/// A labelled slide, as splitting sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Slide {
    pub slide_id: String,
    pub case_id: String,
    pub fine: usize,
}

/// One row of `splits.parquet`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Assignment {
    pub fold: usize,
    pub slide_id: String,
    pub case_id: String,
    pub part: Part,
}

/// Cases with their fine class, sorted by case id; then grouped per class.
fn cases_by_class(slides: &[Slide]) -> BTreeMap<usize, Vec<String>> {
    let mut case_class: BTreeMap<&str, usize> = BTreeMap::new();
    for s in slides {
        case_class.entry(&s.case_id).or_insert(s.fine);
    }
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (case, class) in case_class {
        out.entry(class).or_default().push(case.to_owned());
    }
    out
}

fn expand(slides: &[Slide], fold: usize, part_of: &HashMap<String, Part>) -> Vec<Assignment> {
    slides
        .iter()
        .filter_map(|s| {
            part_of.get(&s.case_id).map(|&part| Assignment {
                fold,
                slide_id: s.slide_id.clone(),
                case_id: s.case_id.clone(),
                part,
            })
        })
        .collect()
}

fn take_val(rng: &mut Rng, mut pool: Vec<String>, frac: f64, part_of: &mut HashMap<String, Part>) {
    rng.shuffle(&mut pool);
    let mut n = (frac * pool.len() as f64).round() as usize;
    if frac > 0.0 && n == 0 && pool.len() >= 2 {
        n = 1;
    }
    for (i, case) in pool.into_iter().enumerate() {
        part_of.insert(case, if i < n { Part::Val } else { Part::Train });
    }
}

/// Stratified, case-grouped k-fold: each case is in exactly one test fold; per class, test
/// counts of two folds differ by at most one. Validation cases come from the remaining cases.
pub fn kfold(slides: &[Slide], folds: usize, val_frac: f64, seed: u64) -> (Vec<Assignment>, Vec<String>) {
    let classes = cases_by_class(slides);
    let mut warnings = Vec::new();
    let mut test_fold: HashMap<String, usize> = HashMap::new();
    let mut offset = 0;
    for (&class, cases) in &classes {
        if cases.len() < folds {
            warnings
                .push(format!("class {class} has {} case(s) for {folds} folds: some test folds lack it", cases.len()));
        }
        let mut shuffled = cases.clone();
        Rng::new(seed, class as u64).shuffle(&mut shuffled);
        for (j, case) in shuffled.into_iter().enumerate() {
            test_fold.insert(case, (j + offset) % folds);
        }
        offset = (offset + cases.len()) % folds;
    }
    let mut out = Vec::new();
    for fold in 0..folds {
        let mut part_of = HashMap::new();
        let mut rng = Rng::new(seed, 1_000 + fold as u64);
        for cases in classes.values() {
            let mut pool = Vec::new();
            for case in cases {
                if test_fold[case] == fold {
                    part_of.insert(case.clone(), Part::Test);
                } else {
                    pool.push(case.clone());
                }
            }
            take_val(&mut rng, pool, val_frac, &mut part_of);
        }
        out.extend(expand(slides, fold, &part_of));
    }
    out.sort();
    (out, warnings)
}

/// CLAM-style Monte-Carlo folds: per fold and class, `test_frac` of the cases are tested and
/// `val_frac` validate, drawn anew each fold, so test sets may overlap across folds.
pub fn monte_carlo(
    slides: &[Slide],
    folds: usize,
    val_frac: f64,
    test_frac: f64,
    seed: u64,
) -> (Vec<Assignment>, Vec<String>) {
    let classes = cases_by_class(slides);
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for fold in 0..folds {
        let mut part_of = HashMap::new();
        for (&class, cases) in &classes {
            let mut shuffled = cases.clone();
            Rng::new(seed, (fold as u64) << 32 | class as u64).shuffle(&mut shuffled);
            let n = shuffled.len();
            let n_test = (test_frac * n as f64).round() as usize;
            let n_val = (val_frac * n as f64).round() as usize;
            if fold == 0 && (n_test == 0 || n_val == 0 || n_test + n_val >= n) {
                warnings.push(format!("class {class} has {n} case(s): {n_test} test and {n_val} val per fold"));
            }
            for (i, case) in shuffled.into_iter().enumerate() {
                let part = if i < n_test {
                    Part::Test
                } else if i < n_test + n_val {
                    Part::Val
                } else {
                    Part::Train
                };
                part_of.insert(case, part);
            }
        }
        out.extend(expand(slides, fold, &part_of));
    }
    out.sort();
    (out, warnings)
}

/// Reads CLAM `splits_{k}.csv` files (first header cell empty, then columns train, val, test,
/// blank-padded) from `dir`. Every slide must be labelled; a case split across parts is an error.
pub fn import_clam(dir: &Path, slides: &[Slide]) -> Result<Vec<Assignment>> {
    let case_of: HashMap<&str, &str> = slides.iter().map(|s| (s.slide_id.as_str(), s.case_id.as_str())).collect();
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let k = name.strip_prefix("splits_")?.strip_suffix(".csv")?.parse().ok()?;
            Some((k, e.path()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Splits(format!("{}: no splits_{{k}}.csv files", dir.display())));
    }
    let mut out = Vec::new();
    for (fold, (k, path)) in files.iter().enumerate() {
        if *k != fold {
            return Err(Error::Splits(format!(
                "{}: splits_{fold}.csv is missing (folds must be numbered from 0)",
                dir.display()
            )));
        }
        let bad = |message: String| Error::BadFile { path: path.clone(), message };
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(path).map_err(|e| bad(e.to_string()))?;
        let header = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
        let cols: Vec<(usize, Part)> = [("train", Part::Train), ("val", Part::Val), ("test", Part::Test)]
            .iter()
            .map(|(name, part)| {
                header
                    .iter()
                    .position(|h| h.trim() == *name)
                    .map(|i| (i, *part))
                    .ok_or_else(|| bad(format!("no `{name}` column")))
            })
            .collect::<Result<_>>()?;
        let mut part_of_case: HashMap<String, Part> = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| bad(e.to_string()))?;
            let line = record.position().map_or(0, |p| p.line());
            for &(i, part) in &cols {
                let id = record.get(i).unwrap_or("").trim();
                if id.is_empty() {
                    continue;
                }
                let case = case_of
                    .get(id)
                    .ok_or_else(|| bad(format!("line {line}: slide {id} has no label (or no features)")))?;
                if let Some(prev) = part_of_case.insert(case.to_string(), part)
                    && prev != part
                {
                    return Err(bad(format!("line {line}: case {case} is in both {prev} and {part}")));
                }
                out.push(Assignment { fold, slide_id: id.to_owned(), case_id: case.to_string(), part });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes assignments as CLAM `splits_{k}.csv` files into `dir`; returns how many folds.
pub fn export_clam(assignments: &[Assignment], dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let folds = assignments.iter().map(|a| a.fold + 1).max().unwrap_or(0);
    for fold in 0..folds {
        let cols: Vec<Vec<&str>> = [Part::Train, Part::Val, Part::Test]
            .iter()
            .map(|p| {
                assignments.iter().filter(|a| a.fold == fold && a.part == *p).map(|a| a.slide_id.as_str()).collect()
            })
            .collect();
        let rows = cols.iter().map(Vec::len).max().unwrap_or(0);
        let path = dir.join(format!("splits_{fold}.csv"));
        let bad = |message: String| Error::BadFile { path: path.clone(), message };
        let mut w = csv::Writer::from_path(&path).map_err(|e| bad(e.to_string()))?;
        w.write_record(["", "train", "val", "test"]).map_err(|e| bad(e.to_string()))?;
        for i in 0..rows {
            let index = i.to_string();
            let cells = cols.iter().map(|c| c.get(i).copied().unwrap_or_default());
            w.write_record(std::iter::once(index.as_str()).chain(cells)).map_err(|e| bad(e.to_string()))?;
        }
        // Flushed here, not on drop, so a failed write at the end is reported.
        w.flush().map_err(|e| Error::io(&path, e))?;
    }
    Ok(folds)
}

/// The `split_folds` stage.
pub struct SplitFolds {
    pub splits: Splits,
    pub seed: u64,
    /// Node id of `join_labels`.
    pub labels_node: String,
}

impl Stage for SplitFolds {
    fn kind(&self) -> &str {
        "split_folds"
    }
    fn code_version(&self) -> &str {
        "1"
    }
    fn params(&self) -> serde_json::Value {
        let s = &self.splits;
        match s.method {
            SplitMethod::Kfold => {
                serde_json::json!({"method": "kfold", "folds": s.folds, "val_frac": s.val_frac, "seed": self.seed})
            }
            SplitMethod::MonteCarlo => serde_json::json!({
                "method": "monte_carlo", "folds": s.folds, "val_frac": s.val_frac, "test_frac": s.test_frac, "seed": self.seed
            }),
            SplitMethod::Import => serde_json::json!({"method": "import"}),
        }
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = vec![Input::artifact("labels", &self.labels_node, "labels.parquet")];
        if let (SplitMethod::Import, Some(dir)) = (self.splits.method, &self.splits.dir) {
            v.push(Input::external("clam_splits", dir));
        }
        v
    }
    fn outputs(&self) -> Vec<String> {
        vec!["splits.parquet".into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let labels = table::read(ctx.input("labels"))?;
        let slides: Vec<Slide> = table::strings(&labels, "slide_id")
            .into_iter()
            .zip(table::strings(&labels, "case_id"))
            .zip(table::i32s(&labels, "fine_idx"))
            .map(|((slide_id, case_id), fine)| Slide { slide_id, case_id, fine: fine as usize })
            .collect();
        let s = &self.splits;
        let (rows, warnings) = match s.method {
            SplitMethod::Kfold => kfold(&slides, s.folds, s.val_frac, self.seed),
            SplitMethod::MonteCarlo => monte_carlo(&slides, s.folds, s.val_frac, s.test_frac, self.seed),
            SplitMethod::Import => (import_clam(ctx.input("clam_splits"), &slides)?, Vec::new()),
        };
        for w in warnings {
            tracing::warn!("{w}");
        }
        write(&ctx.output("splits.parquet"), &rows)?;
        Ok(())
    }
}

/// Reads `splits.parquet` back.
pub fn read(path: &Path) -> Result<Vec<Assignment>> {
    let t = table::read(path)?;
    let parts = table::strings(&t, "split").into_iter().map(|p| match p.as_str() {
        "train" => Ok(Part::Train),
        "val" => Ok(Part::Val),
        "test" => Ok(Part::Test),
        other => Err(Error::Splits(format!("{}: unknown split `{other}`", path.display()))),
    });
    table::i32s(&t, "fold")
        .into_iter()
        .zip(table::strings(&t, "slide_id"))
        .zip(table::strings(&t, "case_id"))
        .zip(parts)
        .map(|(((fold, slide_id), case_id), part)| {
            Ok(Assignment { fold: fold as usize, slide_id, case_id, part: part? })
        })
        .collect()
}

/// Writes `splits.parquet`.
pub fn write(path: &Path, rows: &[Assignment]) -> Result<()> {
    table::write(
        path,
        schemas::tables::splits(),
        vec![
            Arc::new(rows.iter().map(|a| a.fold as i32).collect::<Int32Array>()),
            table::string_col(rows.iter().map(|a| a.slide_id.as_str())),
            table::string_col(rows.iter().map(|a| a.case_id.as_str())),
            table::string_col(rows.iter().map(|a| a.part.to_string())),
        ],
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// 7 classes of uneven size, some cases with two slides.
    fn slides() -> Vec<Slide> {
        let sizes = [9, 30, 15, 8, 10, 12, 26];
        let mut out = Vec::new();
        for (class, &n) in sizes.iter().enumerate() {
            for i in 0..n {
                let case = format!("c{class}-{i}");
                out.push(Slide { slide_id: format!("s{class}-{i}"), case_id: case.clone(), fine: class });
                if i % 5 == 0 {
                    out.push(Slide { slide_id: format!("s{class}-{i}b"), case_id: case, fine: class });
                }
            }
        }
        out
    }

    fn check_no_case_leak(rows: &[Assignment]) {
        let mut parts: HashMap<(usize, &str), Part> = HashMap::new();
        for a in rows {
            if let Some(p) = parts.insert((a.fold, &a.case_id), a.part) {
                assert_eq!(p, a.part, "case {} in two parts of fold {}", a.case_id, a.fold);
            }
        }
    }

    #[test]
    fn kfold_invariants() {
        let s = slides();
        let (rows, warnings) = kfold(&s, 5, 0.1, 7);
        assert!(warnings.is_empty());
        check_no_case_leak(&rows);
        // Every case tested exactly once.
        let mut tested: HashMap<&str, usize> = HashMap::new();
        for a in rows.iter().filter(|a| a.part == Part::Test) {
            tested.insert(&a.case_id, a.fold);
        }
        let cases: HashSet<&str> = s.iter().map(|x| x.case_id.as_str()).collect();
        assert_eq!(tested.len(), cases.len());
        let tests_per_case =
            rows.iter().filter(|a| a.part == Part::Test).map(|a| (&a.case_id, a.fold)).collect::<HashSet<_>>();
        assert_eq!(tests_per_case.len(), cases.len(), "no case is tested in two folds");
        // Stratified: per class, test case counts across folds within ±1.
        for class in 0..7 {
            let counts: Vec<usize> = (0..5)
                .map(|f| {
                    let c: HashSet<&str> = rows
                        .iter()
                        .filter(|a| a.fold == f && a.part == Part::Test && a.case_id.starts_with(&format!("c{class}-")))
                        .map(|a| a.case_id.as_str())
                        .collect();
                    c.len()
                })
                .collect();
            assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "class {class}: {counts:?}");
        }
        // Every fold holds every slide once, and has a validation set.
        for f in 0..5 {
            assert_eq!(rows.iter().filter(|a| a.fold == f).count(), s.len());
            assert!(rows.iter().any(|a| a.fold == f && a.part == Part::Val));
        }
        assert_eq!(rows, kfold(&s, 5, 0.1, 7).0, "same seed, same folds");
        assert_ne!(rows, kfold(&s, 5, 0.1, 8).0);
    }

    #[test]
    fn kfold_warns_about_tiny_classes() {
        let s: Vec<Slide> =
            (0..3).map(|i| Slide { slide_id: format!("s{i}"), case_id: format!("c{i}"), fine: 0 }).collect();
        let (_, warnings) = kfold(&s, 5, 0.1, 1);
        assert_eq!(warnings, ["class 0 has 3 case(s) for 5 folds: some test folds lack it"]);
    }

    #[test]
    fn monte_carlo_fractions_and_no_leak() {
        let s = slides();
        let (rows, _) = monte_carlo(&s, 10, 0.1, 0.1, 3);
        check_no_case_leak(&rows);
        for f in 0..10 {
            let test: HashSet<&str> =
                rows.iter().filter(|a| a.fold == f && a.part == Part::Test).map(|a| a.case_id.as_str()).collect();
            // round(0.1 * n) per class: 1+3+2+1+1+1+3 = 12 cases.
            assert_eq!(test.len(), 12, "fold {f}");
        }
        assert_eq!(rows, monte_carlo(&s, 10, 0.1, 0.1, 3).0);
    }

    #[test]
    fn clam_round_trip() {
        let s = slides();
        let (rows, _) = kfold(&s, 3, 0.2, 11);
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("splits.parquet"), &rows).unwrap();
        let rows = read(&dir.path().join("splits.parquet")).unwrap();
        export_clam(&rows, dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("splits_0.csv")).unwrap();
        assert!(text.starts_with(",train,val,test\n0,"), "{text}");
        assert_eq!(import_clam(dir.path(), &s).unwrap(), rows);
        let err = import_clam(dir.path(), &s[1..]).unwrap_err().to_string();
        assert!(err.contains("splits_") && err.contains("slide s0-0 has no label"), "{err}");
    }
}
