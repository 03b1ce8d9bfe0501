//! Classification metrics with scikit-learn's definitions (`accuracy_score`,
//! `balanced_accuracy_score`, `f1_score`, `precision_recall_fscore_support`,
//! `roc_auc_score(multi_class="ovr")`, `cohen_kappa_score(weights="quadratic")`).

/// Predictions at one level: true class, predicted class, and class probabilities per sample.
pub struct Scored<'a> {
    pub y_true: &'a [usize],
    pub y_pred: &'a [usize],
    /// Samples × classes.
    pub probs: &'a [Vec<f64>],
    pub n_classes: usize,
}

/// One metric value; `class` is `None` for summaries.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub class: Option<usize>,
    /// For `confusion` counts: the predicted class (`class` is the true class).
    pub predicted: Option<usize>,
    pub value: f64,
}

impl Metric {
    fn new(name: &'static str, class: Option<usize>, value: f64) -> Metric {
        Metric { name, class, predicted: None, value }
    }
}

fn confusion(s: &Scored) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; s.n_classes]; s.n_classes];
    for (&t, &p) in s.y_true.iter().zip(s.y_pred) {
        m[t][p] += 1;
    }
    m
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// Area under the ROC curve of `scores` for `positive` samples (ties count one half);
/// NaN when either side is empty.
pub fn binary_auc(positive: &[bool], scores: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties (Mann–Whitney U).
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = positive.iter().zip(&ranks).filter(|(p, _)| **p).map(|(_, r)| r).sum();
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

/// Every metric of one level: summaries, then per class, then confusion counts.
pub fn all(s: &Scored) -> Vec<Metric> {
    let n = s.n_classes;
    let total = s.y_true.len() as f64;
    let cm = confusion(s);
    let support: Vec<f64> = (0..n).map(|c| cm[c].iter().sum::<usize>() as f64).collect();
    let predicted: Vec<f64> = (0..n).map(|c| (0..n).map(|t| cm[t][c]).sum::<usize>() as f64).collect();
    let tp: Vec<f64> = (0..n).map(|c| cm[c][c] as f64).collect();
    let precision: Vec<f64> = (0..n).map(|c| ratio(tp[c], predicted[c])).collect();
    let recall: Vec<f64> = (0..n).map(|c| ratio(tp[c], support[c])).collect();
    let f1: Vec<f64> = (0..n).map(|c| ratio(2.0 * tp[c], support[c] + predicted[c])).collect();
    let auc: Vec<f64> = (0..n)
        .map(|c| {
            let pos: Vec<bool> = s.y_true.iter().map(|&t| t == c).collect();
            let scores: Vec<f64> = s.probs.iter().map(|p| p[c]).collect();
            binary_auc(&pos, &scores)
        })
        .collect();
    // scikit-learn averages over the labels present in y_true or y_pred.
    let present: Vec<usize> = (0..n).filter(|&c| support[c] > 0.0 || predicted[c] > 0.0).collect();
    let with_support: Vec<usize> = (0..n).filter(|&c| support[c] > 0.0).collect();
    let mean = |v: &[f64], idx: &[usize]| {
        if idx.is_empty() { f64::NAN } else { idx.iter().map(|&c| v[c]).sum::<f64>() / idx.len() as f64 }
    };
    let finite_auc: Vec<usize> = (0..n).filter(|&c| auc[c].is_finite()).collect();
    let mut out = vec![
        Metric::new("accuracy", None, ratio(tp.iter().sum(), total)),
        Metric::new("balanced_accuracy", None, mean(&recall, &with_support)),
        Metric::new("f1_macro", None, mean(&f1, &present)),
        Metric::new(
            "f1_weighted",
            None,
            ratio(present.iter().map(|&c| f1[c] * support[c]).sum(), present.iter().map(|&c| support[c]).sum()),
        ),
        Metric::new("auc_macro", None, if finite_auc.len() >= 2 { mean(&auc, &finite_auc) } else { f64::NAN }),
        Metric::new("kappa_quadratic", None, quadratic_kappa(&cm, &present)),
    ];
    for c in 0..n {
        for (name, v) in
            [("precision", &precision), ("recall", &recall), ("f1", &f1), ("auc", &auc), ("support", &support)]
        {
            out.push(Metric::new(name, Some(c), v[c]));
        }
    }
    for (t, row) in cm.iter().enumerate() {
        for (p, &count) in row.iter().enumerate() {
            out.push(Metric { name: "confusion", class: Some(t), predicted: Some(p), value: count as f64 });
        }
    }
    out
}

/// Cohen's kappa with quadratic weights over the present labels (weights by their positions).
fn quadratic_kappa(cm: &[Vec<usize>], present: &[usize]) -> f64 {
    let k = present.len();
    let m: Vec<Vec<f64>> = present.iter().map(|&t| present.iter().map(|&p| cm[t][p] as f64).collect()).collect();
    let total: f64 = m.iter().flatten().sum();
    if total == 0.0 {
        return f64::NAN;
    }
    let rows: Vec<f64> = m.iter().map(|r| r.iter().sum()).collect();
    let cols: Vec<f64> = (0..k).map(|j| m.iter().map(|r| r[j]).sum()).collect();
    let (mut observed, mut expected) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            let w = ((i as f64) - (j as f64)).powi(2);
            observed += w * m[i][j];
            expected += w * rows[i] * cols[j] / total;
        }
    }
    if expected == 0.0 { f64::NAN } else { 1.0 - observed / expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_with_ties() {
        assert_eq!(binary_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]), 0.75);
        assert_eq!(binary_auc(&[false, true], &[0.5, 0.5]), 0.5);
        assert!(binary_auc(&[true, true], &[0.1, 0.2]).is_nan());
    }
}

#[cfg(test)]
mod sklearn {
    use super::*;

    #[test]
    fn equals_scikit_learn() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/metrics.json");
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for (i, case) in cases.iter().enumerate() {
            let ints = |k: &str| -> Vec<usize> { serde_json::from_value(case[k].clone()).unwrap() };
            let probs: Vec<Vec<f64>> = serde_json::from_value(case["probs"].clone()).unwrap();
            let n_classes = case["n_classes"].as_u64().unwrap() as usize;
            let (y_true, y_pred) = (ints("y_true"), ints("y_pred"));
            let got = all(&Scored { y_true: &y_true, y_pred: &y_pred, probs: &probs, n_classes });
            let value = |name: &str, class: Option<usize>| {
                got.iter().find(|m| m.name == name && m.class == class && m.predicted.is_none()).unwrap().value
            };
            for name in ["accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "auc_macro", "kappa_quadratic"] {
                let want = case[name].as_f64().unwrap();
                assert!((value(name, None) - want).abs() < 1e-12, "case {i} {name}: {} vs {want}", value(name, None));
            }
            for name in ["precision", "recall", "f1", "auc"] {
                for c in 0..n_classes {
                    let want = case[name][c].as_f64().unwrap();
                    assert!((value(name, Some(c)) - want).abs() < 1e-12, "case {i} {name}[{c}]");
                }
            }
            let confusion: f64 = got.iter().filter(|m| m.name == "confusion").map(|m| m.value).sum();
            assert_eq!(confusion as usize, y_true.len());
        }
    }
}
