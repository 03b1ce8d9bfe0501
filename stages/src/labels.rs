//! `join_labels`: the label CSV joined with the feature index through the fine→coarse hierarchy.
//! Every problem is reported with its CSV line: duplicate slide ids, labels outside the hierarchy,
//! cases with conflicting labels, labels without features, features without labels.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Int32Array, Int64Array};
use pipeline::{Context, Input, NodeRef, Output, Resources, Stage, StageError};
use schemas::artifacts::{DROPPED, FEATURE_INDEX, LABELS, SKIPPED};
use schemas::workflow::{Labels, OnMissing};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};
use crate::table;

/// The `join_labels` stage.
pub struct JoinLabels {
    pub csv: PathBuf,
    pub labels: Labels,
    /// The `index_features` node.
    pub index: NodeRef,
}

impl Stage for JoinLabels {
    fn kind(&self) -> &str {
        "join_labels"
    }
    /// Small: runs in the driver.
    fn resources(&self) -> Resources {
        Resources { gpu: false, in_driver: true }
    }
    /// 2: names the feature files indexing skipped, hints at near-miss ids, warns of empty classes.
    fn code_version(&self) -> &str {
        "2"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.labels).expect("labels serialise")
    }
    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::external("labels", &self.csv),
            Input::artifact("index", &self.index, &FEATURE_INDEX),
            Input::artifact("skipped", &self.index, &SKIPPED),
        ]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![(&LABELS).into(), (&DROPPED).into()]
    }
    fn run(&self, ctx: &Context) -> std::result::Result<(), StageError> {
        let index = table::read(ctx.input("index"))?;
        let skipped = table::read(ctx.input("skipped"))?;
        let features = Features {
            slides: table::strings(&index, "slide_id"),
            skipped: table::strings(&skipped, "path").into_iter().zip(table::strings(&skipped, "error")).collect(),
        };
        let rows = read_csv(ctx.input("labels").to_path_buf(), &self.labels)?;
        let joined = join(rows, &features, &self.labels)?;
        joined.warnings.iter().for_each(|w| ctx.warn(w.clone()));
        write(ctx, &joined)?;
        Ok(())
    }
}

/// What indexing found: the slides with features, and the files it skipped as unreadable
/// (path, error).
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub slides: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

impl Features {
    /// Why `slide` has no features, with the nearest unlabelled id when it looks like a near miss.
    fn missing(&self, slide: &str, ids: &HashMap<String, &str>, labelled: &HashSet<&str>) -> String {
        // A file's slide id is its stem, as indexing names it.
        let of_slide = |p: &str| std::path::Path::new(p).file_stem().is_some_and(|s| s.to_string_lossy() == slide);
        if let Some((path, error)) = self.skipped.iter().find(|(p, _)| of_slide(p)) {
            return format!(
                "has a label, but its feature file {path} was skipped as unreadable \
                 (dataset.on_bad_file = \"skip\"): {error}"
            );
        }
        match ids.get(&near_miss_key(slide)).filter(|id| !labelled.contains(**id)) {
            Some(id) if id.nfc().eq(slide.nfc()) => format!(
                "has a label but no feature file; did you mean `{id}`? (the same letters, in another Unicode \
                 normalisation: NFC vs NFD)"
            ),
            Some(id) => format!("has a label but no feature file; did you mean `{id}`?"),
            None => "has a label but no feature file".to_owned(),
        }
    }
}

/// What two spellings of one slide id share: Unicode NFC, lower case, and no slide or feature
/// file extension (`000001.svs`, `000001.SVS.pt` and `000001` meet).
fn near_miss_key(id: &str) -> String {
    let mut key: String = id.nfc().collect::<String>().to_lowercase();
    while let Some((stem, ext)) = key.rsplit_once('.') {
        if ext.is_empty() || ext.len() > 5 || !ext.chars().all(|c| c.is_ascii_alphanumeric()) || stem.is_empty() {
            break;
        }
        key = stem.to_owned();
    }
    key
}

/// One data row of the label CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    pub line: u64,
    pub case_id: String,
    pub slide_id: String,
    pub label: String,
}

/// Reads the configured columns of a label CSV; ids stay strings.
pub fn read_csv(path: PathBuf, cfg: &Labels) -> Result<Vec<CsvRow>> {
    let bad = |message: String| Error::BadFile { path: path.clone(), message };
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_path(&path).map_err(|e| bad(e.to_string()))?;
    let header = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let col = |name: &str, key: &str| {
        header.iter().position(|h| h.trim() == name).ok_or_else(|| {
            bad(format!(
                "no column `{name}` (set labels.{key}); the header has: {}",
                header.iter().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let (c, s, l) = (
        col(&cfg.case_column, "case_column")?,
        col(&cfg.slide_column, "slide_column")?,
        col(&cfg.label_column, "label_column")?,
    );
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |i: usize| record.get(i).unwrap_or("").trim().to_owned();
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        rows.push(CsvRow { line, case_id: field(c), slide_id: field(s), label: field(l) });
    }
    Ok(rows)
}

/// A labelled slide with features.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSlide {
    pub slide_id: String,
    pub case_id: String,
    pub fine: usize,
    pub coarse: usize,
}

/// A row left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub slide_id: String,
    pub row: Option<CsvRow>,
    pub problem: String,
}

/// The join's result.
#[derive(Debug, Clone)]
pub struct Joined {
    pub slides: Vec<LabelledSlide>,
    pub dropped: Vec<Dropped>,
    pub fine_names: Vec<String>,
    pub coarse_names: Vec<String>,
    /// What the user should know of the result: dropped slides, classes without slides.
    pub warnings: Vec<String>,
}

/// Joins label rows with the slides that have features. Problems fail the join under
/// `on_missing = "error"`, listing every offending row; under `"drop"` they are recorded.
pub fn join(rows: Vec<CsvRow>, features: &Features, cfg: &Labels) -> Result<Joined> {
    let with_features = &features.slides;
    let fine_names: Vec<String> = cfg.hierarchy.fine().into_iter().map(str::to_owned).collect();
    let coarse_names: Vec<String> = cfg.hierarchy.coarse().into_iter().map(str::to_owned).collect();
    let to_coarse = cfg.hierarchy.fine_to_coarse();
    let fine_idx: HashMap<&str, usize> = fine_names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let has_features: HashSet<&str> = with_features.iter().map(String::as_str).collect();
    let near: HashMap<String, &str> = with_features.iter().map(|id| (near_miss_key(id), id.as_str())).collect();

    let labelled: HashSet<&str> = rows.iter().map(|r| r.slide_id.as_str()).collect();
    let mut problems: BTreeMap<usize, String> = BTreeMap::new();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *count.entry(r.slide_id.as_str()).or_default() += 1;
    }
    let mut case_labels: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in &rows {
        case_labels.entry(r.case_id.as_str()).or_default().insert(r.label.as_str());
    }
    for (i, r) in rows.iter().enumerate() {
        let problem = if r.slide_id.is_empty() {
            Some("empty slide id".to_owned())
        } else if r.case_id.is_empty() {
            Some("empty case id".to_owned())
        } else if count[r.slide_id.as_str()] > 1 {
            Some(format!("slide id {} appears {} times", r.slide_id, count[r.slide_id.as_str()]))
        } else if !fine_idx.contains_key(r.label.as_str()) {
            Some(format!("label `{}` is not in labels.hierarchy ({})", r.label, fine_names.join(", ")))
        } else if case_labels[r.case_id.as_str()].len() > 1 {
            let mut ls: Vec<&str> = case_labels[r.case_id.as_str()].iter().copied().collect();
            ls.sort();
            Some(format!("case {} has conflicting labels ({})", r.case_id, ls.join(", ")))
        } else if !has_features.contains(r.slide_id.as_str()) {
            Some(features.missing(&r.slide_id, &near, &labelled))
        } else {
            None
        };
        if let Some(p) = problem {
            problems.insert(i, p);
        }
    }
    let mut unlabelled: Vec<&String> = with_features.iter().filter(|s| !labelled.contains(s.as_str())).collect();
    unlabelled.sort();

    if cfg.on_missing == OnMissing::Error && (!problems.is_empty() || !unlabelled.is_empty()) {
        let mut lines: Vec<String> = problems
            .iter()
            .map(|(&i, p)| format!("  line {}: slide {}: {p}", rows[i].line, rows[i].slide_id))
            .collect();
        lines.extend(unlabelled.iter().map(|s| format!("  slide {s}: has a feature file but no label")));
        return Err(Error::Labels(format!(
            "{} label problem(s) (set labels.on_missing = \"drop\" to leave these slides out):\n{}",
            lines.len(),
            lines.join("\n")
        )));
    }
    let mut dropped: Vec<Dropped> = problems
        .iter()
        .map(|(&i, p)| Dropped { slide_id: rows[i].slide_id.clone(), row: Some(rows[i].clone()), problem: p.clone() })
        .collect();
    dropped.extend(unlabelled.iter().map(|s| Dropped {
        slide_id: (*s).clone(),
        row: None,
        problem: "has a feature file but no label".into(),
    }));
    let mut slides: Vec<LabelledSlide> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| !problems.contains_key(i))
        .map(|(_, r)| {
            let fine = fine_idx[r.label.as_str()];
            LabelledSlide { slide_id: r.slide_id.clone(), case_id: r.case_id.clone(), fine, coarse: to_coarse[fine] }
        })
        .collect();
    slides.sort_by(|a, b| a.slide_id.cmp(&b.slide_id));
    if slides.is_empty() {
        return Err(Error::Labels("no slide has both a valid label and features".into()));
    }
    let mut warnings = Vec::new();
    if !dropped.is_empty() {
        let list: Vec<String> = dropped.iter().map(|d| format!("{}: {}", d.slide_id, d.problem)).collect();
        warnings.push(format!(
            "{} slide(s) left out (listed in dropped.parquet): {}",
            dropped.len(),
            pipeline::some_of(&list, "; ")
        ));
    }
    let empty: Vec<&str> = fine_names
        .iter()
        .enumerate()
        .filter(|(f, _)| !slides.iter().any(|s| s.fine == *f))
        .map(|(_, n)| n.as_str())
        .collect();
    if !empty.is_empty() {
        warnings.push(format!(
            "fine class(es) {} of labels.hierarchy have no slide: the model keeps an output for each that \
             nothing trains, and their metrics are undefined; remove them from the hierarchy if that is meant",
            empty.join(", ")
        ));
    }
    Ok(Joined { slides, dropped, fine_names, coarse_names, warnings })
}

fn write(ctx: &Context, j: &Joined) -> Result<()> {
    let s = &j.slides;
    table::write_output(
        ctx,
        &LABELS,
        vec![
            table::string_col(s.iter().map(|x| x.slide_id.as_str())),
            table::string_col(s.iter().map(|x| x.case_id.as_str())),
            table::string_col(s.iter().map(|x| j.fine_names[x.fine].as_str())),
            Arc::new(s.iter().map(|x| x.fine as i32).collect::<Int32Array>()),
            table::string_col(s.iter().map(|x| j.coarse_names[x.coarse].as_str())),
            Arc::new(s.iter().map(|x| x.coarse as i32).collect::<Int32Array>()),
        ],
    )?;
    let d = &j.dropped;
    let opt = |f: &dyn Fn(&CsvRow) -> String| -> arrow::array::ArrayRef {
        Arc::new(d.iter().map(|x| x.row.as_ref().map(f)).collect::<arrow::array::StringArray>())
    };
    table::write_output(
        ctx,
        &DROPPED,
        vec![
            table::string_col(d.iter().map(|x| x.slide_id.as_str())),
            opt(&|r| r.case_id.clone()),
            opt(&|r| r.label.clone()),
            Arc::new(d.iter().map(|x| x.row.as_ref().map(|r| r.line as i64)).collect::<Int64Array>()),
            table::string_col(d.iter().map(|x| x.problem.as_str())),
        ],
    )
}

#[cfg(test)]
mod tests {
    use schemas::workflow::Hierarchy;

    use super::*;

    fn cfg(on_missing: OnMissing) -> Labels {
        Labels {
            case_column: "case_id".into(),
            slide_column: "slide_id".into(),
            label_column: "label".into(),
            on_missing,
            hierarchy: Hierarchy(vec![
                ("benign".into(), vec!["N".into(), "PB".into()]),
                ("malignant".into(), vec!["IC".into()]),
            ]),
        }
    }

    fn row(line: u64, case: &str, slide: &str, label: &str) -> CsvRow {
        CsvRow { line, case_id: case.into(), slide_id: slide.into(), label: label.into() }
    }

    fn feats(ids: &[&str]) -> Features {
        Features { slides: ids.iter().map(|s| s.to_string()).collect(), skipped: Vec::new() }
    }

    #[test]
    fn joins_through_hierarchy_with_string_ids() {
        let rows = vec![row(2, "c1", "007", "IC"), row(3, "c2", "10", "PB"), row(4, "c2", "11", "PB")];
        let j = join(rows, &feats(&["007", "10", "11"]), &cfg(OnMissing::Error)).unwrap();
        let got: Vec<_> = j.slides.iter().map(|s| (s.slide_id.as_str(), s.fine, s.coarse)).collect();
        assert_eq!(got, [("007", 2, 1), ("10", 1, 0), ("11", 1, 0)]);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let rows = vec![
            row(2, "c1", "a", "N"),
            row(3, "c1", "b", "IC"),
            row(4, "c3", "d", "N"),
            row(5, "c4", "d", "N"),
            row(6, "c5", "e", "XX"),
            row(7, "c6", "f", "N"),
        ];
        let err =
            join(rows.clone(), &feats(&["a", "b", "d", "e", "g"]), &cfg(OnMissing::Error)).unwrap_err().to_string();
        for needle in [
            "line 2: slide a: case c1 has conflicting labels (IC, N)",
            "line 3: slide b: case c1 has conflicting labels",
            "line 4: slide d: slide id d appears 2 times",
            "line 5: slide d: slide id d appears 2 times",
            "line 6: slide e: label `XX` is not in labels.hierarchy (N, PB, IC)",
            "line 7: slide f: has a label but no feature file",
            "slide g: has a feature file but no label",
            "7 label problem(s)",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in\n{err}");
        }
        let j = join(rows, &feats(&["a", "b", "d", "e", "g"]), &cfg(OnMissing::Drop));
        assert!(j.is_err(), "nothing valid is left");
    }

    #[test]
    fn near_misses_and_skipped_files_are_called_out() {
        let nfd = "cafe\u{301}"; // "café" as e + combining accent
        let nfc = "caf\u{e9}";
        let rows = vec![
            row(2, "c1", nfc, "N"),
            row(3, "c2", "000001.svs", "N"),
            row(4, "c3", "Slide7", "IC"),
            row(5, "c4", "broken", "IC"),
            row(6, "c5", "ok", "PB"),
            row(7, "c6", "nowhere", "PB"),
        ];
        let mut features = feats(&[nfd, "000001", "slide7", "ok"]);
        features.skipped = vec![("/data/pt/broken.pt".into(), "not a torch.save file".into())];
        let err = join(rows, &features, &cfg(OnMissing::Error)).unwrap_err().to_string();
        for needle in [
            &format!(
                "line 2: slide {nfc}: has a label but no feature file; did you mean `{nfd}`? (the same letters, in another Unicode normalisation: NFC vs NFD)"
            ),
            "line 3: slide 000001.svs: has a label but no feature file; did you mean `000001`?",
            "line 4: slide Slide7: has a label but no feature file; did you mean `slide7`?",
            "line 5: slide broken: has a label, but its feature file /data/pt/broken.pt was skipped as unreadable (dataset.on_bad_file = \"skip\"): not a torch.save file",
            "line 7: slide nowhere: has a label but no feature file\n",
        ] {
            assert!(format!("{err}\n").contains(needle), "missing {needle:?} in\n{err}");
        }
    }

    #[test]
    fn classes_without_slides_are_warned_about() {
        let j =
            join(vec![row(2, "c1", "a", "N"), row(3, "c2", "b", "IC")], &feats(&["a", "b"]), &cfg(OnMissing::Error))
                .unwrap();
        assert_eq!(j.warnings.len(), 1);
        assert!(j.warnings[0].starts_with("fine class(es) PB of labels.hierarchy have no slide"), "{:?}", j.warnings);
    }

    #[test]
    fn drop_policy_keeps_the_rest_and_records_drops() {
        let rows = vec![row(2, "c1", "a", "N"), row(3, "c2", "b", "XX"), row(4, "c3", "c", "IC")];
        let j = join(rows, &feats(&["a", "b", "z"]), &cfg(OnMissing::Drop)).unwrap();
        assert_eq!(j.slides.len(), 1);
        let problems: Vec<_> =
            j.dropped.iter().map(|d| (d.slide_id.as_str(), d.row.as_ref().map(|r| r.line))).collect();
        assert_eq!(problems, [("b", Some(3)), ("c", Some(4)), ("z", None)]);
        assert!(
            j.warnings[0].starts_with("3 slide(s) left out (listed in dropped.parquet): b: label `XX`"),
            "{:?}",
            j.warnings
        );
    }
}
