//! `split_folds`: train/val/test assignments per fold, at the case level (no case in two splits
//! of a fold), stratified by fine label and seeded. Methods: `kfold` (every case tested exactly
//! once), `monte_carlo` (CLAM-style repeated sampling: test sets may overlap across folds), and
//! `import` of CLAM `splits_{k}.csv` files (which [`export_clam`] writes back).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::Int32Array;
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{LABELS, SPLITS};
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
    /// Fine class index (strata are numbered by it) and name (errors name it).
    pub fine: usize,
    pub label: String,
}

/// One row of `splits.parquet`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Assignment {
    pub fold: usize,
    pub slide_id: String,
    pub case_id: String,
    pub part: Part,
}

/// Fine class index → name, for messages.
fn class_names(slides: &[Slide]) -> HashMap<usize, &str> {
    slides.iter().map(|s| (s.fine, s.label.as_str())).collect()
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
/// A class with fewer cases than folds is an error: some folds would never test it.
pub fn kfold(slides: &[Slide], folds: usize, val_frac: f64, seed: u64) -> Result<Vec<Assignment>> {
    let classes = cases_by_class(slides);
    let names = class_names(slides);
    let short: Vec<String> = classes
        .iter()
        .filter(|(_, cases)| cases.len() < folds)
        .map(|(c, cases)| format!("{} has {} case(s)", names[c], cases.len()))
        .collect();
    if !short.is_empty() {
        let fewest = classes.values().map(Vec::len).min().unwrap_or(0);
        return Err(Error::Splits(format!(
            "splits.folds = {folds}, but {}: stratified k-fold needs at least as many cases of every class \
             as folds, or some folds test none of that class. Set splits.folds to at most {fewest}, or use \
             method = \"monte_carlo\" (its test sets may overlap)",
            short.join(", ")
        )));
    }
    let mut test_fold: HashMap<String, usize> = HashMap::new();
    let mut offset = 0;
    for (&class, cases) in &classes {
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
    Ok(out)
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
    let names = class_names(slides);
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
                warnings.push(format!(
                    "class {} has {n} case(s): {n_test} test, {n_val} validation and {} training per fold",
                    names[&class],
                    n.saturating_sub(n_test + n_val)
                ));
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

/// Checks that every fold of `rows` trains on and tests something; an error names the fold.
pub fn check_folds(rows: &[Assignment], folds: usize) -> Result<()> {
    for fold in 0..folds {
        let count = |part: Part| rows.iter().filter(|a| a.fold == fold && a.part == part).count();
        let (train, test) = (count(Part::Train), count(Part::Test));
        if train == 0 || test == 0 {
            return Err(Error::Splits(format!(
                "fold {fold} has {train} training and {test} test slide(s): every fold needs both; \
                 use fewer folds, or a larger splits.test_frac"
            )));
        }
    }
    Ok(())
}

/// A warning when folds leave labelled slides out (imported splits may cover only some).
fn coverage_warning(rows: &[Assignment], slides: &[Slide], folds: usize) -> Option<String> {
    let used: std::collections::HashSet<&str> = rows.iter().map(|a| a.slide_id.as_str()).collect();
    let per_fold: Vec<usize> = (0..folds).map(|f| rows.iter().filter(|a| a.fold == f).count()).collect();
    if per_fold.iter().all(|&n| n == slides.len()) {
        return None;
    }
    let unused = slides.len() - used.len();
    Some(format!(
        "the folds use {} of the {} labelled slides (per fold: {}); {unused} slide(s) are in no fold",
        used.len(),
        slides.len(),
        per_fold.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
    ))
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
    /// The `join_labels` node.
    pub labels: NodeRef,
}

impl Stage for SplitFolds {
    fn kind(&self) -> &str {
        "split_folds"
    }
    /// Small: runs in the driver.
    fn resources(&self) -> Resources {
        Resources { gpu: false, in_driver: true }
    }
    /// 2: refuses folds that cannot test every class, and records what it warns about.
    fn code_version(&self) -> &str {
        "2"
    }
    fn params(&self) -> serde_json::Value {
        let s = &self.splits;
        match s.method {
            SplitMethod::Kfold => {
                serde_json::json!({"method": "kfold", "folds": s.folds(), "val_frac": s.val_frac, "seed": self.seed})
            }
            SplitMethod::MonteCarlo => serde_json::json!({
                "method": "monte_carlo", "folds": s.folds(), "val_frac": s.val_frac, "test_frac": s.test_frac, "seed": self.seed
            }),
            // The number of folds set is part of the warning an import gives when it differs.
            SplitMethod::Import => serde_json::json!({"method": "import", "folds": s.folds}),
        }
    }
    fn inputs(&self) -> Vec<Input> {
        let mut v = vec![Input::artifact("labels", &self.labels, &LABELS)];
        if let (SplitMethod::Import, Some(dir)) = (self.splits.method, &self.splits.dir) {
            v.push(Input::external("clam_splits", dir));
        }
        v
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&SPLITS).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let labels = table::read(ctx.input("labels"))?;
        let slides: Vec<Slide> = table::strings(&labels, "slide_id")
            .into_iter()
            .zip(table::strings(&labels, "case_id"))
            .zip(table::i32s(&labels, "fine_idx"))
            .zip(table::strings(&labels, "fine_label"))
            .map(|(((slide_id, case_id), fine), label)| Slide { slide_id, case_id, fine: fine as usize, label })
            .collect();
        let s = &self.splits;
        let (rows, folds) = match s.method {
            SplitMethod::Kfold => (kfold(&slides, s.folds(), s.val_frac, self.seed)?, s.folds()),
            SplitMethod::MonteCarlo => {
                let (rows, warnings) = monte_carlo(&slides, s.folds(), s.val_frac, s.test_frac, self.seed);
                warnings.into_iter().for_each(|w| ctx.warn(w));
                (rows, s.folds())
            }
            SplitMethod::Import => {
                let rows = import_clam(ctx.input("clam_splits"), &slides)?;
                let folds = rows.iter().map(|a| a.fold + 1).max().unwrap_or(0);
                if let Some(set) = s.folds.filter(|&k| k != folds) {
                    ctx.warn(format!(
                        "splits.folds = {set} is not used: method \"import\" takes its {folds} fold(s) from the \
                         splits_{{k}}.csv files"
                    ));
                }
                (rows, folds)
            }
        };
        check_folds(&rows, folds)?;
        if let Some(w) = coverage_warning(&rows, &slides, folds) {
            ctx.warn(w);
        }
        write(&ctx.output(SPLITS.file), &rows)?;
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
        (SPLITS.schema)(),
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
                let label = format!("L{class}");
                out.push(Slide {
                    slide_id: format!("s{class}-{i}"),
                    case_id: case.clone(),
                    fine: class,
                    label: label.clone(),
                });
                if i % 5 == 0 {
                    out.push(Slide { slide_id: format!("s{class}-{i}b"), case_id: case, fine: class, label });
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
        let rows = kfold(&s, 5, 0.1, 7).unwrap();
        check_no_case_leak(&rows);
        check_folds(&rows, 5).unwrap();
        assert_eq!(coverage_warning(&rows, &s, 5), None);
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
        assert_eq!(rows, kfold(&s, 5, 0.1, 7).unwrap(), "same seed, same folds");
        assert_ne!(rows, kfold(&s, 5, 0.1, 8).unwrap());
    }

    #[test]
    fn more_folds_than_cases_of_a_class_is_an_error_naming_the_classes() {
        // 8 cases in each of 7 classes, asked for 60 folds.
        let first_eight = |x: &Slide| x.case_id.split('-').nth(1).unwrap().parse::<usize>().unwrap() < 8;
        let s: Vec<Slide> = slides().into_iter().filter(first_eight).collect();
        let err = kfold(&s, 60, 0.1, 1).unwrap_err().to_string();
        assert!(err.starts_with("splits.folds = 60, but L0 has 8 case(s), L1 has 8 case(s)"), "{err}");
        assert!(err.contains("L3 has 8 case(s)") && err.contains("Set splits.folds to at most 8"), "{err}");
        assert!(kfold(&s, 8, 0.1, 1).is_ok());
        let err = kfold(&s, 9, 0.1, 1).unwrap_err().to_string();
        assert!(err.contains("at most 8"), "{err}");
    }

    #[test]
    fn a_fold_without_test_slides_is_an_error() {
        let s = slides();
        let (rows, warnings) = monte_carlo(&s, 2, 0.1, 0.0, 3);
        assert!(warnings.iter().any(|w| w.starts_with("class L0 has 9 case(s): 0 test")), "{warnings:?}");
        let err = check_folds(&rows, 2).unwrap_err().to_string();
        assert!(err.starts_with("fold 0 has") && err.contains(" and 0 test slide(s)"), "{err}");
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
        let rows = kfold(&s, 3, 0.2, 11).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("splits.parquet"), &rows).unwrap();
        let rows = read(&dir.path().join("splits.parquet")).unwrap();
        export_clam(&rows, dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("splits_0.csv")).unwrap();
        assert!(text.starts_with(",train,val,test\n0,"), "{text}");
        assert_eq!(import_clam(dir.path(), &s).unwrap(), rows);
        let err = import_clam(dir.path(), &s[1..]).unwrap_err().to_string();
        assert!(err.contains("splits_") && err.contains("slide s0-0 has no label"), "{err}");
        // Splits that cover only some labelled slides say how many.
        let mut more = s.clone();
        more.push(Slide { slide_id: "extra".into(), case_id: "cx".into(), fine: 0, label: "L0".into() });
        let rows = import_clam(dir.path(), &more).unwrap();
        let w = coverage_warning(&rows, &more, 3).unwrap();
        assert_eq!(
            w,
            format!(
                "the folds use {} of the {} labelled slides (per fold: {n}, {n}, {n}); 1 slide(s) are in no fold",
                s.len(),
                more.len(),
                n = s.len()
            )
        );
    }
}
