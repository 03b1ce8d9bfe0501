//! The HMIL objective: hierarchical cross-entropy, the fine→coarse probability regulariser,
//! supervised contrastive loss over fine-class views with a cosine temperature, a curriculum
//! weight, and an (off by default) attention-alignment term.

use tch::{Kind, Reduction, Tensor};

use super::model::{Batch, Output, segment_sum};

/// Curriculum weight `alpha = 1 − (e/E)²` for epoch `e` of `E`.
pub fn alpha(epoch: usize, epochs: usize) -> f64 {
    1.0 - (epoch as f64 / epochs as f64).powi(2)
}

/// Cosine temperature `tau = 0.9·(1 + cos(2πe/E))/2 + 0.1`.
pub fn tau(epoch: usize, epochs: usize) -> f64 {
    0.9 * (1.0 + (std::f64::consts::TAU * epoch as f64 / epochs as f64).cos()) / 2.0 + 0.1
}

/// The loss terms of one batch.
pub struct Terms {
    pub ce_coarse: Tensor,
    pub ce_fine: Tensor,
    /// Cross-entropy of the fine probabilities summed per coarse group, taken as logits (as the
    /// published code does).
    pub reg: Tensor,
    pub con: Tensor,
    pub align: Tensor,
    pub total: Tensor,
}

/// Weights and schedule values for one epoch.
pub struct LossConfig<'a> {
    pub alpha: f64,
    pub tau: f64,
    pub align_weight: f64,
    /// n_f × n_c one-hot fine→coarse map.
    pub groups: &'a Tensor,
    /// Per-class loss weights (coarse, fine), or none.
    pub class_weights: Option<(&'a Tensor, &'a Tensor)>,
}

/// Computes every term and `alpha·CE_c + CE_f + REG + (1−alpha)·CON + w·ALIGN`.
pub fn terms(out: &Output, batch: &Batch, coarse: &Tensor, fine: &Tensor, cfg: &LossConfig) -> Terms {
    let (wc, wf) = match cfg.class_weights {
        Some((c, f)) => (Some(c), Some(f)),
        None => (None, None),
    };
    let ce = |logits: &Tensor, y: &Tensor, w: Option<&Tensor>| {
        logits.cross_entropy_loss::<&Tensor>(y, w, Reduction::Mean, -100, 0.0)
    };
    let ce_coarse = ce(&out.coarse_logits, coarse, wc);
    let ce_fine = ce(&out.fine_logits, fine, wf);
    let grouped = out.fine_logits.softmax(-1, Kind::Float).matmul(cfg.groups);
    let reg = ce(&grouped, coarse, wc);
    let con = if cfg.alpha < 1.0 {
        supcon(&out.fine_views(&batch.lengths), fine, cfg.tau) / batch.bags() as f64
    } else {
        Tensor::zeros([], (Kind::Float, coarse.device()))
    };
    let align = if cfg.align_weight > 0.0 {
        attention_alignment(out, &batch.seg, batch.bags(), cfg.groups)
    } else {
        Tensor::zeros([], (Kind::Float, coarse.device()))
    };
    let total = &ce_coarse * cfg.alpha + &ce_fine + &reg + &con * (1.0 - cfg.alpha) + &align * cfg.align_weight;
    Terms { ce_coarse, ce_fine, reg, con, align, total }
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

/// 1 − mean cosine, per bag and coarse class, between the coarse attention and the fine
/// attention summed into coarse groups.
pub fn attention_alignment(out: &Output, seg: &Tensor, bags: i64, groups: &Tensor) -> Tensor {
    let a1 = &out.coarse_attention;
    let a2 = out.fine_attention.matmul(groups);
    let dot = segment_sum(&(a1 * &a2), seg, bags);
    let n1 = segment_sum(&(a1 * a1), seg, bags).sqrt();
    let n2 = segment_sum(&(&a2 * &a2), seg, bags).sqrt();
    let cosine: Tensor = dot / (n1 * n2).clamp_min(1e-12);
    cosine.neg().g_add_scalar(1.0).mean(Kind::Float)
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
    use super::*;
    use crate::hmil::model::group_matrix;
    use crate::hmil::model::tests::{fixture, get};

    #[test]
    fn loss_terms_match_pytorch() {
        let (_vs, model, batch, expected) = fixture();
        let schedule: Vec<i64> = Vec::try_from(get(&expected, "schedule")).unwrap();
        let (epoch, epochs) = (schedule[0] as usize, schedule[1] as usize);
        let groups = group_matrix(&[0, 0, 0, 1, 1, 2, 2], 3, tch::Device::Cpu);
        let cfg = LossConfig {
            alpha: alpha(epoch, epochs),
            tau: tau(epoch, epochs),
            align_weight: 0.0,
            groups: &groups,
            class_weights: None,
        };
        let out = model.forward(&batch, false);
        let t = terms(&out, &batch, &get(&expected, "coarse"), &get(&expected, "fine"), &cfg);
        let want: Vec<f32> = Vec::try_from(get(&expected, "terms")).unwrap();
        let got = [&t.ce_coarse, &t.ce_fine, &t.reg, &t.con, &t.total].map(|x| x.double_value(&[]) as f32);
        for (name, (g, w)) in ["ce_coarse", "ce_fine", "reg", "con", "total"].iter().zip(got.iter().zip(&want)) {
            assert!((g - w).abs() < 1e-4, "{name}: {g} vs {w}");
        }
    }
}
