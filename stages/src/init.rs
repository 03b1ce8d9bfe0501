//! `hmil-flow init`: a first workflow file, drafted from what a features directory (or a slides
//! directory and an encoder) and a label CSV hold: the feature format and dimension (or the slide
//! formats and resolution), the label columns and classes, whether cases group slides, and which
//! slides have no features or no label.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use schemas::workflow::Hierarchy;

use crate::error::{Error, Result};
use crate::index;

/// Header names taken, case-insensitively, for each column, in order of preference.
const SLIDE_NAMES: [&str; 6] = ["slide_id", "slide", "slide_name", "wsi", "image_id", "filename"];
const LABEL_NAMES: [&str; 6] = ["label", "class", "diagnosis", "subtype", "grade", "target"];
const CASE_NAMES: [&str; 5] = ["case_id", "case", "patient_id", "patient", "submitter_id"];

/// Where a workflow's features come from, as `init` found it.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Feature files: the dimension and instances of the first one.
    Features { dir: PathBuf, dim: usize, first_instances: usize },
    /// Slides, encoded by `encoder`: the first one's microns per pixel, when it says.
    Slides { dir: PathBuf, encoder: PathBuf, mpp: Option<f64> },
}

/// What `init` found.
#[derive(Debug, Clone, PartialEq)]
pub struct Survey {
    pub source: Source,
    pub labels: PathBuf,
    /// Feature or slide files by format (extension), with counts.
    pub formats: BTreeMap<String, usize>,
    /// The first of those files.
    pub first_file: PathBuf,
    pub slide_column: String,
    pub label_column: String,
    /// `None` when the CSV has no case column (each slide is its own case).
    pub case_column: Option<String>,
    /// Classes in order of first appearance, with their slide counts.
    pub classes: Vec<(String, usize)>,
    pub slides: usize,
    pub cases: usize,
    /// Labelled slides without a feature file, and feature files without a label row.
    pub without_features: Vec<String>,
    pub without_label: Vec<String>,
}

/// Where `survey` looks for features: a features directory, or slides and their encoder.
pub enum Look<'a> {
    Features(&'a Path),
    Slides { dir: &'a Path, encoder: &'a Path },
}

/// Looks at the features (or slides) and the label CSV.
pub fn survey(look: Look, labels: &Path) -> Result<Survey> {
    let mut formats = BTreeMap::new();
    let (files, source): (Vec<(String, PathBuf)>, Source) = match look {
        Look::Features(dir) => {
            let files = index::feature_files(dir)?;
            for (_, _, format) in &files {
                *formats.entry(format.name().to_owned()).or_insert(0) += 1;
            }
            let (_, first, format) = &files[0];
            let bytes = std::fs::read(first).map_err(|e| Error::io(first, e))?;
            let facts =
                index::facts(*format, &bytes).map_err(|message| Error::BadFile { path: first.clone(), message })?;
            let source =
                Source::Features { dir: dir.to_path_buf(), dim: facts.dim, first_instances: facts.n_instances };
            (files.into_iter().map(|(s, p, _)| (s, p)).collect(), source)
        }
        Look::Slides { dir, encoder } => {
            let files = crate::tile::slide_files(dir)?;
            for (_, path) in &files {
                let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                *formats.entry(ext).or_insert(0) += 1;
            }
            let first = wsi::Slide::open(&files[0].1).map_err(|e| Error::Features(e.to_string()))?;
            let source = Source::Slides { dir: dir.to_path_buf(), encoder: encoder.to_path_buf(), mpp: first.mpp() };
            (files, source)
        }
    };
    let first_file = files[0].1.clone();
    let stems: HashSet<&str> = files.iter().map(|(s, _)| s.as_str()).collect();

    let bad = |message: String| Error::BadFile { path: labels.to_path_buf(), message };
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_path(labels).map_err(|e| bad(e.to_string()))?;
    let header: Vec<String> =
        reader.headers().map_err(|e| bad(e.to_string()))?.iter().map(|h| h.trim().to_owned()).collect();
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.map(|r| r.iter().map(|f| f.trim().to_owned()).collect()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let rows: Vec<Vec<String>> = rows.into_iter().filter(|r| r.iter().any(|f| !f.is_empty())).collect();
    let named = |names: &[&str]| names.iter().find_map(|n| header.iter().position(|h| h.eq_ignore_ascii_case(n)));
    // The slide column is the one whose values name the most feature files (a known name wins ties).
    let matches = |c: usize| rows.iter().filter(|r| stems.contains(r[c].as_str())).count();
    let slide = (0..header.len())
        .map(|c| (matches(c), named(&SLIDE_NAMES) == Some(c), c))
        .filter(|&(m, known, _)| m > 0 || known)
        .max()
        .map(|(_, _, c)| c)
        .ok_or_else(|| {
            bad(format!(
                "no column names the feature files (e.g. `{}`); the header has: {}",
                files[0].0,
                header.join(", ")
            ))
        })?;
    let label = named(&LABEL_NAMES).filter(|&c| c != slide).ok_or_else(|| {
        bad(format!(
            "no label column (one named {}); the header has: {}; rename the column, then run init again",
            LABEL_NAMES.join(", "),
            header.join(", ")
        ))
    })?;
    let case = named(&CASE_NAMES).filter(|&c| c != slide && c != label);

    let mut classes: Vec<(String, usize)> = Vec::new();
    for r in &rows {
        match classes.iter_mut().find(|(c, _)| *c == r[label]) {
            Some((_, n)) => *n += 1,
            None => classes.push((r[label].clone(), 1)),
        }
    }
    let labelled: HashSet<&str> = rows.iter().map(|r| r[slide].as_str()).collect();
    let cases: HashSet<&str> = rows.iter().map(|r| r[case.unwrap_or(slide)].as_str()).collect();
    Ok(Survey {
        source,
        labels: labels.to_path_buf(),
        formats,
        first_file,
        slide_column: header[slide].clone(),
        label_column: header[label].clone(),
        case_column: case.map(|c| header[c].clone()),
        classes,
        slides: labelled.len(),
        cases: cases.len(),
        without_features: rows.iter().map(|r| &r[slide]).filter(|s| !stems.contains(s.as_str())).cloned().collect(),
        without_label: files.iter().map(|f| &f.0).filter(|s| !labelled.contains(s.as_str())).cloned().collect(),
    })
}

/// Reads `benign=N,PB,UDH;atypical=FEA,ADH;malignant=DCIS,IC`.
pub fn parse_hierarchy(text: &str) -> Result<Hierarchy> {
    let bad = |message: String| Error::Init(format!("--hierarchy `{text}`: {message}"));
    let mut out = Vec::new();
    for group in text.split(';').map(str::trim).filter(|g| !g.is_empty()) {
        let (coarse, fine) =
            group.split_once('=').ok_or_else(|| bad(format!("`{group}` is not coarse=fine,fine,…")))?;
        let fine: Vec<String> = fine.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect();
        out.push((coarse.trim().to_owned(), fine));
    }
    Ok(Hierarchy(out))
}

impl Survey {
    /// The classes of the CSV missing from `hierarchy`, and the fine classes of `hierarchy` no
    /// slide has.
    pub fn compare(&self, hierarchy: &Hierarchy) -> (Vec<String>, Vec<String>) {
        let fine = hierarchy.fine();
        let missing = self.classes.iter().map(|(c, _)| c).filter(|c| !fine.contains(&c.as_str())).cloned().collect();
        let unused =
            fine.iter().filter(|f| !self.classes.iter().any(|(c, _)| c == *f)).map(|f| f.to_string()).collect();
        (missing, unused)
    }

    /// The feature or slide files by format: `136 pt`.
    pub fn formats_text(&self) -> String {
        self.formats.iter().map(|(f, n)| format!("{n} {f}")).collect::<Vec<_>>().join(", ")
    }

    /// The classes with their slides: `N 11, PB 37`.
    pub fn classes_text(&self) -> String {
        self.classes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    }

    /// The workflow file's text, for a file written at `out` (paths in it relative to its folder).
    /// Without `hierarchy`, each class is its own coarse class, marked to be grouped.
    pub fn draft(&self, name: &str, out: &Path, hierarchy: Option<&Hierarchy>) -> String {
        let base = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let path = |p: &Path| toml_string(&relative_to(p, base).display().to_string());
        let mut t = String::new();
        let _ = writeln!(t, "# Written by `hmil-flow init`. Check the hierarchy and the splits, then:");
        let _ = writeln!(t, "#   hmil-flow run {}\n", out.display());
        let _ = writeln!(t, "[workflow]\nname = {}\nseed = 0\n", toml_string(name));
        let first = self.first_file.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
        let _ = writeln!(t, "[dataset]");
        match &self.source {
            Source::Features { dir, dim, first_instances } => {
                let _ = writeln!(
                    t,
                    "# {} feature file(s); {first} has {first_instances} instances of dimension {dim}.",
                    self.formats_text()
                );
                let _ = writeln!(t, "features = {}", path(dir));
                let _ = writeln!(t, "labels = {}\n", path(&self.labels));
            }
            Source::Slides { dir, encoder, mpp } => {
                let _ = writeln!(t, "labels = {}\n", path(&self.labels));
                let _ = writeln!(t, "[slides]\n# {} slide file(s).", self.formats_text());
                let _ = writeln!(t, "dir = {}", path(dir));
                let _ = writeln!(t, "mpp = 0.5                 # patches at 0.5 µm per pixel (about 20x)");
                let _ = writeln!(t, "patch_size = 256");
                match mpp {
                    Some(m) => {
                        let _ = writeln!(t, "# {first} is scanned at {m:.3} µm per pixel.");
                    }
                    None => {
                        let _ = writeln!(
                            t,
                            "# TO DO: {first} does not say its resolution; set the scanner's (0.25 at 40x).\nmpp_fallback = 0.25"
                        );
                    }
                }
                let _ = writeln!(
                    t,
                    "\n[encoder]\n# A TorchScript file (see the README's Encoders); ImageNet mean and std."
                );
                let _ = writeln!(t, "model = {}\ninput_size = 224\n", path(encoder));
            }
        }
        let _ = writeln!(t, "[labels]");
        let _ = writeln!(t, "slide_column = {}", toml_string(&self.slide_column));
        let _ = writeln!(t, "label_column = {}", toml_string(&self.label_column));
        match &self.case_column {
            Some(c) if self.cases < self.slides => {
                let _ = writeln!(
                    t,
                    "# {} slides of {} cases: folds keep each case's slides together.",
                    self.slides, self.cases
                );
                let _ = writeln!(t, "case_column = {}", toml_string(c));
            }
            Some(c) => {
                let _ = writeln!(t, "# One slide per case.\ncase_column = {}", toml_string(c));
            }
            None => {
                let _ = writeln!(t, "# No case column: each slide is its own case.");
                let _ = writeln!(t, "case_column = {}", toml_string(&self.slide_column));
            }
        }
        if !self.without_features.is_empty() || !self.without_label.is_empty() {
            let _ = writeln!(
                t,
                "# {} labelled slide(s) have no feature file and {} feature file(s) no label: leave them out.",
                self.without_features.len(),
                self.without_label.len()
            );
            let _ = writeln!(t, "on_missing = \"drop\"");
        }
        let _ = writeln!(t, "\n# Slides per class: {}.", self.classes_text());
        let _ = writeln!(t, "# Coarse classes, each with its fine classes; their order numbers the classes.");
        let _ = writeln!(t, "[labels.hierarchy]");
        match hierarchy {
            Some(h) => {
                for (coarse, fine) in &h.0 {
                    let fine: Vec<String> = fine.iter().map(|f| toml_string(f)).collect();
                    let _ = writeln!(t, "{} = [{}]", toml_key(coarse), fine.join(", "));
                }
            }
            None => {
                let _ = writeln!(t, "# TO DO: group the fine classes under coarse ones (each is its own group now).");
                for (c, _) in &self.classes {
                    let _ = writeln!(t, "{} = [{}]", toml_key(c), toml_string(c));
                }
            }
        }
        let smallest = self.classes.iter().map(|(_, n)| *n).min().unwrap_or(0);
        let folds = smallest.clamp(2, 5);
        let _ = writeln!(t, "\n[splits]");
        let _ = writeln!(
            t,
            "# Stratified k-fold by case; each case is tested once. The smallest class has {smallest} slide(s)."
        );
        let _ = writeln!(t, "method = \"kfold\"\nfolds = {folds}\nval_frac = 0.1\n");
        let _ = writeln!(t, "[train]\n# The published HMIL settings; uncomment to change.");
        let _ = writeln!(t, "# epochs = 200\n# batch_size = 64\n# lr = 1e-4\ndevice = \"auto\"");
        t
    }
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// `text` as a TOML key: bare when it can be.
fn toml_key(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        text.to_owned()
    } else {
        toml_string(text)
    }
}

/// `path` relative to the folder `base` where both resolve, else `path` as given.
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let (Ok(path_abs), Ok(base_abs)) = (std::fs::canonicalize(path), std::fs::canonicalize(base)) else {
        return path.to_path_buf();
    };
    let (p, b): (Vec<Component>, Vec<Component>) = (path_abs.components().collect(), base_abs.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: PathBuf = std::iter::repeat_n(Component::ParentDir, b.len() - common).collect();
    out.extend(&p[common..]);
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::workflow::Workflow;

    fn survey_of(classes: &[(&str, usize)], case_column: Option<&str>) -> Survey {
        Survey {
            source: Source::Features { dir: PathBuf::from("/data/pt_files"), dim: 64, first_instances: 100 },
            labels: PathBuf::from("/data/labels.csv"),
            formats: [("pt".to_owned(), 12)].into(),
            first_file: PathBuf::from("/data/pt_files/a.pt"),
            slide_column: "slide".into(),
            label_column: "diagnosis".into(),
            case_column: case_column.map(str::to_owned),
            classes: classes.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect(),
            slides: 12,
            cases: 10,
            without_features: vec!["x".into()],
            without_label: vec![],
        }
    }

    #[test]
    fn hierarchy_text_reads_in_order() {
        let h = parse_hierarchy("benign=N, PB;malignant=IC;").unwrap();
        assert_eq!(h.coarse(), ["benign", "malignant"]);
        assert_eq!(h.fine(), ["N", "PB", "IC"]);
        assert!(parse_hierarchy("benign").unwrap_err().to_string().contains("`benign` is not coarse=fine"));
    }

    #[test]
    fn drafts_are_valid_workflows_that_say_what_was_found() {
        let s = survey_of(&[("N", 4), ("PB", 5), ("IC", 3)], Some("patient"));
        let out = Path::new("/work/wf.toml");
        let flat = s.draft("mine", out, None);
        let wf = Workflow::parse(&flat, out, &[]).unwrap();
        assert_eq!(wf.labels.hierarchy.coarse(), ["N", "PB", "IC"]);
        assert_eq!((wf.labels.case_column.as_str(), wf.labels.label_column.as_str()), ("patient", "diagnosis"));
        assert_eq!(wf.splits.folds(), 3, "no more folds than the smallest class has slides");
        assert_eq!(wf.labels.on_missing, schemas::workflow::OnMissing::Drop);
        assert!(flat.contains("# 12 slides of 10 cases") && flat.contains("N 4, PB 5, IC 3") && flat.contains("TO DO"));
        let h = parse_hierarchy("benign=N,PB;malignant=IC").unwrap();
        let grouped = Workflow::parse(&s.draft("mine", out, Some(&h)), out, &[]).unwrap();
        assert_eq!(grouped.labels.hierarchy, h);
        let alone = survey_of(&[("N", 9), ("IC", 9)], None);
        let wf = Workflow::parse(&alone.draft("x", out, None), out, &[]).unwrap();
        assert_eq!(wf.labels.case_column, "slide", "without a case column each slide is its case");
        assert_eq!(s.compare(&h), (vec![], vec![]));
        assert_eq!(alone.compare(&h), (vec![], vec!["PB".to_owned()]));
    }

    #[test]
    fn a_slides_draft_has_slides_and_an_encoder_and_asks_for_a_missing_resolution() {
        let mut s = survey_of(&[("N", 4), ("IC", 4)], None);
        s.formats = [("svs".to_owned(), 8)].into();
        s.first_file = PathBuf::from("/data/slides/a.svs");
        s.source = Source::Slides { dir: "/data/slides".into(), encoder: "/enc/uni.ts".into(), mpp: Some(0.25) };
        let out = Path::new("/work/wf.toml");
        let text = s.draft("mine", out, None);
        let wf = Workflow::parse(&text, out, &[]).unwrap();
        let (slides, encoder) = (wf.slides.unwrap(), wf.encoder.unwrap());
        assert_eq!(
            (slides.dir.as_path(), encoder.model.as_path()),
            (Path::new("/data/slides"), Path::new("/enc/uni.ts"))
        );
        assert!(wf.dataset.features.is_none() && slides.mpp_fallback.is_none());
        assert!(text.contains("# 8 svs slide file(s).") && text.contains("a.svs is scanned at 0.250 µm"), "{text}");
        s.source = Source::Slides { dir: "/data/slides".into(), encoder: "/enc/uni.ts".into(), mpp: None };
        let text = s.draft("mine", out, None);
        let wf = Workflow::parse(&text, out, &[]).unwrap();
        assert_eq!(wf.slides.unwrap().mpp_fallback, Some(0.25));
        assert!(text.contains("TO DO: a.svs does not say its resolution"), "{text}");
    }

    #[test]
    fn paths_are_written_relative_to_the_workflow() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/pt")).unwrap();
        std::fs::create_dir_all(dir.path().join("wf")).unwrap();
        assert_eq!(relative_to(&dir.path().join("data/pt"), &dir.path().join("wf")), Path::new("../data/pt"));
        assert_eq!(relative_to(Path::new("/no/such"), dir.path()), Path::new("/no/such"));
    }
}
