//! Where the per-fold nodes fan out: one training run per variant × seed × fold, each named by
//! its coordinates (`train[variant=abmil,seed=2,fold=3]`) and shown in its own folder of the
//! results. A workflow without `[variants]` or `[repeats]` leaves that dimension out of names
//! and folders, so its nodes are `train[fold=k]` under `folds/<k>/`, as they always were.

use schemas::workflow::{Variant, Workflow};

/// One training run's place in the fan-out.
#[derive(Debug, Clone)]
pub struct Coordinates {
    pub variant: Variant,
    pub seed: u64,
    pub fold: usize,
    /// Whether names and folders mention the variant, the seed.
    shown: (bool, bool),
}

impl Coordinates {
    /// Every run of `wf`, variant by variant, seed by seed, fold by fold.
    pub fn all(wf: &Workflow, folds: usize) -> Vec<Coordinates> {
        let shown = wf.fans_out();
        let seeds = wf.seeds();
        wf.variants()
            .into_iter()
            .flat_map(|variant| {
                seeds.iter().flat_map(move |&seed| {
                    let variant = variant.clone();
                    (0..folds).map(move |fold| Coordinates { variant: variant.clone(), seed, fold, shown })
                })
            })
            .collect()
    }

    /// The node label: `variant=…,seed=…,fold=…`, without the dimensions the workflow lacks.
    pub fn label(&self) -> String {
        let mut parts = self.training();
        parts.push(format!("fold={}", self.fold));
        parts.join(",")
    }

    /// The run's folder in the results: `[variants/<name>/][seed_<s>/]folds/<k>`.
    pub fn results(&self) -> String {
        format!("{}folds/{}", self.training_folder(), self.fold)
    }

    /// The label parts naming the training (variant and seed) of every fold, as the workflow
    /// shows them: what a node over all of one training's folds is named by.
    pub fn training(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if self.shown.0 {
            parts.push(format!("variant={}", self.variant.name));
        }
        if self.shown.1 {
            parts.push(format!("seed={}", self.seed));
        }
        parts
    }

    /// The folder of [`Coordinates::training`]: `[variants/<name>/][seed_<s>/]`.
    pub fn training_folder(&self) -> String {
        let mut path = String::new();
        if self.shown.0 {
            path += &format!("variants/{}/", self.variant.name);
        }
        if self.shown.1 {
            path += &format!("seed_{}/", self.seed);
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const WF: &str = "[workflow]\nname = \"t\"\nseed = 9\n[dataset]\nfeatures = \"f\"\nlabels = \"l.csv\"\n\
                      [labels.hierarchy]\nbenign = [\"N\"]\nmalignant = [\"IC\"]\n";

    #[test]
    fn names_and_folders_mention_only_the_dimensions_the_workflow_has() {
        let plain = Workflow::parse(WF, Path::new("w.toml"), &[]).unwrap();
        let runs = Coordinates::all(&plain, 2);
        assert_eq!(runs.iter().map(Coordinates::label).collect::<Vec<_>>(), ["fold=0", "fold=1"]);
        assert_eq!((runs[1].results(), runs[1].seed), ("folds/1".into(), 9));

        let text = format!("{WF}[variants.hmil]\n[variants.abmil]\nmodel = \"abmil\"\n[repeats]\nseeds = [1, 2]\n");
        let wf = Workflow::parse(&text, Path::new("w.toml"), &[]).unwrap();
        let runs = Coordinates::all(&wf, 2);
        assert_eq!(runs.len(), 8);
        assert_eq!(runs[5].label(), "variant=abmil,seed=1,fold=1");
        assert_eq!(runs[5].results(), "variants/abmil/seed_1/folds/1");
        let seeds_only = Workflow::parse(&format!("{WF}[repeats]\nseeds = [4]\n"), Path::new("w.toml"), &[]).unwrap();
        assert_eq!(Coordinates::all(&seeds_only, 1)[0].label(), "seed=4,fold=0");
    }
}
