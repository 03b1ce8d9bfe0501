//! The HMIL objective: hierarchical cross-entropy, the fine→coarse probability regulariser,
//! supervised contrastive loss over fine-class views with a cosine temperature, a curriculum
//! weight, and an (off by default) attention-alignment term. Each term can be switched off for
//! an ablation (`[train.loss]`).

use schemas::workflow::Curriculum;
use tch::{Kind, Tensor};

use crate::ops::{cross_entropy, segment_sum};
use crate::{PerBag, Targets, Terms};

/// Curriculum weight `alpha = 1 − (e/E)²` for epoch `e` of `E`.
pub fn alpha(epoch: usize, epochs: usize) -> f64 {
    1.0 - (epoch as f64 / epochs as f64).powi(2)
}

/// The weights of the coarse cross-entropy and of the contrastive loss in epoch `e` of `E`.
pub fn weights(curriculum: Curriculum, epoch: usize, epochs: usize) -> (f64, f64) {
    let a = match curriculum {
        Curriculum::Quadratic => alpha(epoch, epochs),
        Curriculum::Linear => 1.0 - epoch as f64 / epochs as f64,
        Curriculum::None => return (1.0, 1.0),
    };
    (a, 1.0 - a)
}

/// Cosine temperature `tau = 0.9·(1 + cos(2πe/E))/2 + 0.1`.
pub fn tau(epoch: usize, epochs: usize) -> f64 {
    0.9 * (1.0 + (std::f64::consts::TAU * epoch as f64 / epochs as f64).cos()) / 2.0 + 0.1
}

/// Weights and schedule values for one epoch.
pub struct Objective<'a> {
    /// Weight of the coarse cross-entropy (`alpha` under the published curriculum; 0 turns it off).
    pub coarse_ce: f64,
    pub regulariser: bool,
    /// Weight of the contrastive loss (`1 − alpha`; 0 skips computing it).
    pub contrastive: f64,
    pub tau: f64,
    pub align_weight: f64,
    /// n_f × n_c one-hot fine→coarse map.
    pub groups: &'a Tensor,
}

/// Every term, and `w_c·CE_c + CE_f + REG + w_con·CON + w·ALIGN` (published: `w_c = alpha`,
/// `w_con = 1 − alpha`), from the bags' rows of [`super::Hmil`]'s `per_bag`. The regulariser is
/// the cross-entropy of the fine probabilities summed per coarse group, taken as logits (as the
/// published code does).
pub fn terms(bags: &PerBag, targets: &Targets, cfg: &Objective) -> Terms {
    let (wc, wf) = match targets.class_weights {
        Some((c, f)) => (Some(c), Some(f)),
        None => (None, None),
    };
    let zero = || Tensor::zeros([], (Kind::Float, targets.fine.device()));
    let ce_coarse = cross_entropy(&bags.coarse_logits, targets.coarse, wc);
    let ce_fine = cross_entropy(&bags.fine_logits, targets.fine, wf);
    let grouped = bags.fine_logits.softmax(-1, Kind::Float).matmul(cfg.groups);
    let reg = if cfg.regulariser { cross_entropy(&grouped, targets.coarse, wc) } else { zero() };
    let mut extra = bags.extra.iter();
    let n = bags.fine_logits.size()[0] as f64;
    let con = match (cfg.contrastive > 0.0).then(|| extra.next()).flatten() {
        Some(views) => supcon(views, targets.fine, cfg.tau) / n,
        None => zero(),
    };
    let align = match (cfg.align_weight > 0.0).then(|| extra.next()).flatten() {
        Some(cosine) => cosine.neg().g_add_scalar(1.0).mean(Kind::Float),
        None => zero(),
    };
    let total = &ce_coarse * cfg.coarse_ce + &ce_fine + &reg + &con * cfg.contrastive + &align * cfg.align_weight;
    Terms {
        total,
        named: vec![("ce_coarse", ce_coarse), ("ce_fine", ce_fine), ("reg", reg), ("con", con), ("align", align)],
        schedule: vec![("weight_ce_coarse", cfg.coarse_ce), ("weight_con", cfg.contrastive), ("tau", cfg.tau)],
    }
}

/// Supervised contrastive loss (Khosla et al. 2020), "all" anchors, base temperature 0.1.
/// `views` is B × V × F (L2-normalised), each view labelled with its bag's label.
pub fn supcon(views: &Tensor, labels: &Tensor, temperature: f64) -> Tensor {
    const BASE_TEMPERATURE: f64 = 0.1;
    let size = views.size();
    let (b, v) = (size[0], size[1]);
    let device = views.device();
    let labels = labels.view([-1, 1]);
    let mask = labels.eq_tensor(&labels.tr()).to_kind(Kind::Float);
    // View-major: rows are view 0 of every bag, then view 1, …
    let features = views.transpose(0, 1).reshape([v * b, -1]);
    let logits = features.matmul(&features.tr()) / temperature;
    let (max, _) = logits.max_dim(1, true);
    let logits = logits - max.detach();
    let mask = mask.repeat([v, v]);
    let not_self = Tensor::ones([v * b, v * b], (Kind::Float, device)) - Tensor::eye(v * b, (Kind::Float, device));
    let mask = mask * &not_self;
    let exp_logits = logits.exp() * &not_self;
    let log_prob = &logits - (exp_logits.sum_dim_intlist([1].as_slice(), true, Kind::Float) + 1e-6).log();
    let mean_log_prob_pos = (&mask * log_prob).sum_dim_intlist([1].as_slice(), false, Kind::Float)
        / (mask.sum_dim_intlist([1].as_slice(), false, Kind::Float) + 1e-6);
    (mean_log_prob_pos * (-temperature / BASE_TEMPERATURE)).mean(Kind::Float)
}

/// The cosine, per bag and coarse class (B × n_c), between the coarse attention and the fine
/// attention summed into coarse groups; the alignment term is 1 − its mean.
pub fn attention_agreement(out: &crate::Output, seg: &Tensor, bags: i64, groups: &Tensor) -> Tensor {
    let [a1, a2] = out.attention.as_ref().expect("HMIL attends");
    let a2 = a2.matmul(groups);
    let dot = segment_sum(&(a1 * &a2), seg, bags);
    let n1 = segment_sum(&(a1 * a1), seg, bags).sqrt();
    let n2 = segment_sum(&(&a2 * &a2), seg, bags).sqrt();
    dot / (n1 * n2).clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(alpha(0, 10), 1.0);
        assert!((alpha(5, 10) - 0.75).abs() < 1e-12);
        assert!((tau(0, 10) - 1.0).abs() < 1e-12);
        assert!((tau(5, 10) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn supcon_matches_hand_computation() {
        // Two bags, one view each, same label, features e1 and (e1+e2)/√2; temperature 1.
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let views = Tensor::from_slice(&[1.0f32, 0.0, s as f32, s as f32]).view([2, 1, 2]);
        let labels = Tensor::from_slice(&[3i64, 3]);
        let got = supcon(&views, &labels, 1.0).double_value(&[]);
        // Each anchor has one positive (the other) and no other contrast: log_prob = l − log(e^l + 1e-6)
        // with l the shifted logit (cos − 1).
        let l = s - 1.0;
        let expected = -(1.0 / 0.1) * (l - (l.exp() + 1e-6).ln()) / (1.0 + 1e-6);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }
}

#[cfg(test)]
mod reference {
    use schemas::workflow::Loss;

    use super::*;
    use crate::hmil::tests::{fixture_with, get};
    use crate::{MilModel, Schedule};

    fn value(t: &Terms, name: &str) -> f64 {
        t.named.iter().find(|(n, _)| *n == name).unwrap().1.double_value(&[])
    }

    #[test]
    fn loss_terms_match_pytorch() {
        let (_vs, model, batch, expected) = fixture_with(Loss::default());
        let schedule: Vec<i64> = Vec::try_from(get(&expected, "schedule")).unwrap();
        let schedule = Schedule { epoch: schedule[0] as usize, epochs: schedule[1] as usize };
        let (coarse, fine) = (get(&expected, "coarse"), get(&expected, "fine"));
        let targets = Targets { coarse: &coarse, fine: &fine, class_weights: None };
        let (_, t) = model.step(&batch, &targets, schedule);
        let want: Vec<f32> = Vec::try_from(get(&expected, "terms")).unwrap();
        let got = ["ce_coarse", "ce_fine", "reg", "con"].map(|n| value(&t, n)).to_vec();
        let got = [got, vec![t.total.double_value(&[])]].concat();
        for (name, (g, w)) in ["ce_coarse", "ce_fine", "reg", "con", "total"].iter().zip(got.iter().zip(&want)) {
            assert!((*g as f32 - w).abs() < 1e-4, "{name}: {g} vs {w}");
        }
    }

    #[test]
    fn ablations_drop_their_terms_from_the_total() {
        let schedule = Schedule { epoch: 3, epochs: 10 };
        let run = |loss: Loss| {
            let (_vs, model, batch, expected) = fixture_with(loss);
            let (coarse, fine) = (get(&expected, "coarse"), get(&expected, "fine"));
            let (_, t) = model.step(&batch, &Targets { coarse: &coarse, fine: &fine, class_weights: None }, schedule);
            t
        };
        let full = run(Loss::default());
        let a = alpha(3, 10);
        let sum = |t: &Terms, parts: &[(&str, f64)]| parts.iter().map(|(n, w)| value(t, n) * w).sum::<f64>();
        let close = |x: f64, y: f64| (x - y).abs() < 1e-5;
        let published = [("ce_coarse", a), ("ce_fine", 1.0), ("reg", 1.0), ("con", 1.0 - a)];
        assert!(close(full.total.double_value(&[]), sum(&full, &published)));
        let t = run(Loss { contrastive: false, ..Loss::default() });
        assert!(close(t.total.double_value(&[]), sum(&full, &published[..3])) && value(&t, "con") == 0.0);
        let t = run(Loss { coarse_ce: false, regulariser: false, ..Loss::default() });
        assert!(close(t.total.double_value(&[]), sum(&full, &[("ce_fine", 1.0), ("con", 1.0 - a)])));
        let t = run(Loss { curriculum: Curriculum::None, ..Loss::default() });
        let flat = [("ce_coarse", 1.0), ("ce_fine", 1.0), ("reg", 1.0), ("con", 1.0)];
        assert!(close(t.total.double_value(&[]), sum(&full, &flat)));
        assert_eq!(weights(Curriculum::Linear, 3, 10), (0.7, 1.0 - 0.7));
    }
}
