//! One slide's maps: for every class of both levels, each instance's attention and evidence (see
//! [`crate::hmil::infer::evidence`]) and their percentile ranks within the slide, with where each
//! instance's patch lies on the slide.

pub use schemas::workflow::MapKind;

use crate::features::{CoordUnit, Geometry};
use crate::hmil::infer::{BagOutput, argmax, ranked};
use crate::hmil::train::Classes;

/// One class's values over a slide's instances.
#[derive(Debug, Clone)]
pub struct ClassMap {
    /// `coarse` or `fine`.
    pub level: &'static str,
    pub class: String,
    pub prob: f64,
    pub is_true: bool,
    pub is_predicted: bool,
    pub attention: Vec<f64>,
    pub evidence: Vec<f64>,
    pub attention_percentile: Vec<f64>,
    pub evidence_percentile: Vec<f64>,
}

impl ClassMap {
    /// The values of `kind`.
    pub fn values(&self, kind: MapKind) -> &[f64] {
        match kind {
            MapKind::Evidence => &self.evidence,
            MapKind::Attention => &self.attention,
        }
    }

    /// The percentile ranks of `kind`.
    pub fn percentiles(&self, kind: MapKind) -> &[f64] {
        match kind {
            MapKind::Evidence => &self.evidence_percentile,
            MapKind::Attention => &self.attention_percentile,
        }
    }

    /// "(true, predicted)", "(true)", "(predicted)" or nothing.
    pub fn marks(&self) -> String {
        let marks: Vec<&str> = [(self.is_true, "true"), (self.is_predicted, "predicted")]
            .into_iter()
            .filter(|m| m.0)
            .map(|m| m.1)
            .collect();
        if marks.is_empty() { String::new() } else { format!("({})", marks.join(", ")) }
    }

    /// "ADH 0.62 (true, predicted)": the panel's title.
    pub fn title(&self) -> String {
        format!("{} {:.2} {}", self.class, self.prob, self.marks()).trim_end().to_owned()
    }
}

/// The true classes of a slide, when it has them (fine, coarse).
pub type Truth = Option<(usize, usize)>;

/// Every class's map over one slide, coarse classes first, then fine classes in the order of the
/// hierarchy (grouped under their coarse class).
#[derive(Debug, Clone)]
pub struct SlideMaps {
    pub slide_id: String,
    pub classes: Vec<ClassMap>,
    /// "true ADH / atypical, predicted FEA / atypical (fine / coarse)".
    pub verdict: String,
}

impl SlideMaps {
    /// The maps of `out`, the network's output on slide `slide_id` whose true classes are `truth`.
    pub fn new(slide_id: &str, out: &BagOutput, classes: &Classes, truth: Truth) -> SlideMaps {
        let evidence = out.evidence();
        let predicted = [argmax(out.coarse_probs), argmax(out.fine_probs)];
        let mut maps = Vec::new();
        for (level, names, probs) in [(0, &classes.coarse, out.coarse_probs), (1, &classes.fine, out.fine_probs)] {
            for (k, name) in names.iter().enumerate() {
                let attention: Vec<f64> =
                    out.attention.expect("drawn for models that attend")[level].iter().map(|r| r[k]).collect();
                // A flat model's logits do not split into evidence: NaN, never drawn (see
                // `heatmap --map`).
                let evidence: Vec<f64> = match &evidence {
                    Some(e) => e[level].iter().map(|r| r[k]).collect(),
                    None => vec![f64::NAN; attention.len()],
                };
                let is_true = truth.is_some_and(|(fine, coarse)| [coarse, fine][level] == k);
                maps.push(ClassMap {
                    level: ["coarse", "fine"][level],
                    class: name.clone(),
                    prob: probs[k],
                    is_true,
                    is_predicted: predicted[level] == k,
                    attention_percentile: percentiles(&attention),
                    evidence_percentile: percentiles(&evidence),
                    attention,
                    evidence,
                });
            }
        }
        let named = |fine: usize, coarse: usize| format!("{} / {}", classes.fine[fine], classes.coarse[coarse]);
        let predicted = named(predicted[1], predicted[0]);
        let verdict = match truth {
            Some((fine, coarse)) => format!("true {}, predicted {predicted} (fine / coarse)", named(fine, coarse)),
            None => format!("predicted {predicted} (fine / coarse)"),
        };
        SlideMaps { slide_id: slide_id.to_owned(), classes: maps, verdict }
    }
}

/// Percentile rank (0–1, 1 the highest) of each value within `values`; ties share the higher rank.
pub fn percentiles(values: &[f64]) -> Vec<f64> {
    let sorted = ranked(values.iter().copied(), usize::MAX);
    let n = sorted.len();
    let mut out = vec![0.0; n];
    let mut first_of_tie = 0;
    for (pos, &(inst, score)) in sorted.iter().enumerate() {
        if pos > 0 && score < sorted[pos - 1].1 {
            first_of_tie = pos;
        }
        out[inst] = if n > 1 { 1.0 - first_of_tie as f64 / (n - 1) as f64 } else { 1.0 };
    }
    out
}

/// Where a slide's patches lie: top-left corners and side, in level-0 pixels of the slide when
/// one is known, else in the unit of the feature file.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub corners: Vec<(f64, f64)>,
    pub size: f64,
}

impl Placement {
    /// Patches at `coords` in the file's unit, its patch size a side when the file said it (else
    /// the grid's step), on a slide of `mpp` microns per level-0 pixel when known. Micrometres are turned
    /// into pixels with the slide's resolution; without one they stay micrometres (a blank canvas
    /// has no pixels to match). A unit the file did not say is taken as level-0 pixels, as CLAM
    /// writes them.
    pub fn new(coords: Vec<(f64, f64)>, geometry: Geometry, mpp: Option<f64>) -> Placement {
        let size = geometry.patch_size.unwrap_or_else(|| spacing(&coords));
        match (geometry.unit, mpp) {
            (CoordUnit::Microns, Some(mpp)) if mpp > 0.0 => {
                Placement { corners: coords.iter().map(|(x, y)| (x / mpp, y / mpp)).collect(), size: size / mpp }
            }
            _ => Placement { corners: coords, size },
        }
    }

    /// The box the patches cover: (left, top, right, bottom).
    pub fn extent(&self) -> (f64, f64, f64, f64) {
        self.corners
            .iter()
            .fold((f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY), |(l, t, r, b), &(x, y)| {
                (l.min(x), t.min(y), r.max(x + self.size), b.max(y + self.size))
            })
    }
}

/// The patch side where a file does not say it: the smallest step between distinct x (or y)
/// coordinates, or 1.
pub fn spacing(coords: &[(f64, f64)]) -> f64 {
    let step = |values: Vec<f64>| {
        let mut v = values;
        v.sort_by(f64::total_cmp);
        v.dedup();
        v.windows(2).map(|w| w[1] - w[0]).fold(f64::INFINITY, f64::min)
    };
    let s = step(coords.iter().map(|c| c.0).collect()).min(step(coords.iter().map(|c| c.1).collect()));
    if s.is_finite() && s > 0.0 { s } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rank_within_the_slide_and_share_ties() {
        assert_eq!(percentiles(&[0.3, 0.1, 0.5, 0.3, 0.0]), [0.75, 0.25, 1.0, 0.75, 0.0]);
        assert_eq!(spacing(&[(0.0, 0.0), (256.0, 0.0), (512.0, 256.0)]), 256.0);
    }

    #[test]
    fn micrometres_become_pixels_on_a_slide_with_a_resolution() {
        let um = vec![(0.0, 0.0), (128.0, 64.0)];
        let on_slide =
            Placement::new(um.clone(), Geometry { unit: CoordUnit::Microns, patch_size: Some(128.0) }, Some(0.5));
        assert_eq!(on_slide, Placement { corners: vec![(0.0, 0.0), (256.0, 128.0)], size: 256.0 });
        assert_eq!(on_slide.extent(), (0.0, 0.0, 512.0, 384.0));
        let blank = Placement::new(um.clone(), Geometry { unit: CoordUnit::Microns, patch_size: None }, None);
        assert_eq!(blank, Placement { corners: um, size: 64.0 }, "the grid's step, in micrometres");
    }

    #[test]
    fn the_true_and_predicted_classes_are_marked_in_titles() {
        let classes = Classes {
            coarse: vec!["benign".into(), "malignant".into()],
            fine: vec!["N".into(), "PB".into(), "IC".into()],
            fine_to_coarse: vec![0, 0, 1],
        };
        let attention = [vec![vec![0.5, 0.2], vec![0.5, 0.8]], vec![vec![0.1, 0.6, 0.3], vec![0.9, 0.4, 0.7]]];
        let out = BagOutput {
            coarse_probs: &[0.3, 0.7],
            fine_probs: &[0.2, 0.5, 0.3],
            attention: Some([&attention[0], &attention[1]]),
            scores: Some([&[1.0, -1.0], &[0.5, 0.0]]),
        };
        let maps = SlideMaps::new("s1", &out, &classes, Some((2, 1)));
        let titles: Vec<String> = maps.classes.iter().map(ClassMap::title).collect();
        assert_eq!(
            titles,
            ["benign 0.30", "malignant 0.70 (true, predicted)", "N 0.20", "PB 0.50 (predicted)", "IC 0.30 (true)"]
        );
        assert_eq!(maps.verdict, "true IC / malignant, predicted PB / malignant (fine / coarse)");
        assert_eq!(maps.classes[1].attention, [0.2, 0.8]);
        assert_eq!(maps.classes[1].attention_percentile, [0.0, 1.0]);
    }
}
