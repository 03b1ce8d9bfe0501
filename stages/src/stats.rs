//! The statistics variants are compared with: mean and sample sd, Student-t intervals, the
//! paired t-test, with the t distribution computed here (the regularised incomplete beta function
//! by its continued fraction), and percentile bootstrap intervals over groups of samples; checked
//! against scipy and numpy.

use crate::rng::Rng;

/// Mean and sample standard deviation (0 for one value; NaN for none).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

/// A mean with its two-sided 95% Student-t interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub n: usize,
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// The 95% interval of the mean of `v`: mean ± t(0.975, n−1)·sd/√n (NaN bounds below 2 values).
pub fn t_interval(v: &[f64]) -> Interval {
    let (mean, sd) = mean_sd(v);
    let n = v.len();
    if n < 2 {
        return Interval { n, mean, low: f64::NAN, high: f64::NAN };
    }
    let half = t_quantile(0.975, (n - 1) as f64) * sd / (n as f64).sqrt();
    Interval { n, mean, low: mean - half, high: mean + half }
}

/// The paired t-test of `a` against `b` (a − b, pair by pair): the mean difference with its 95%
/// interval, t and the two-sided p-value, as `scipy.stats.ttest_rel` gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    pub difference: Interval,
    pub t: f64,
    pub p: f64,
}

/// See [`Paired`]. `a` and `b` hold one value per pair, in the same order.
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let difference = t_interval(&d);
    let (mean, sd) = mean_sd(&d);
    let n = d.len() as f64;
    let t = if d.len() < 2 { f64::NAN } else { mean / (sd / n.sqrt()) };
    let p = if t.is_nan() { f64::NAN } else { 2.0 * t_sf(t.abs(), n - 1.0) };
    Paired { difference, t, p }
}

/// The 95% percentile bootstrap interval of `statistic` over `groups` (each a list of sample
/// indices, such as the slides of one case): `draws` resamples of the groups with replacement,
/// each taking all of its groups' samples, drawn from `seed`. `statistic` gets a resample's sample
/// indices; resamples where it is NaN (a class missing) are left out.
pub fn bootstrap(groups: &[Vec<usize>], draws: usize, seed: u64, statistic: impl Fn(&[usize]) -> f64) -> (f64, f64) {
    bootstrap_each(groups, draws, seed, |samples| vec![statistic(samples)])[0]
}

/// [`bootstrap`] of several statistics that `statistics` computes together (as many values on
/// every resample): each interval is the one [`bootstrap`] gives for that statistic alone, from
/// the same resamples, at the cost of one pass.
pub fn bootstrap_each(
    groups: &[Vec<usize>],
    draws: usize,
    seed: u64,
    statistics: impl Fn(&[usize]) -> Vec<f64>,
) -> Vec<(f64, f64)> {
    let mut rng = Rng::new(seed, 0xb007);
    let n = groups.len();
    let resamples = (0..draws).map(|_| (0..n).map(|_| ((rng.uniform() * n as f64) as usize).min(n - 1)).collect());
    bootstrap_over_each(groups, resamples, statistics)
}

/// [`bootstrap`] over given resamples (each a list of group indices).
pub fn bootstrap_over(
    groups: &[Vec<usize>],
    resamples: impl Iterator<Item = Vec<usize>>,
    statistic: impl Fn(&[usize]) -> f64,
) -> (f64, f64) {
    bootstrap_over_each(groups, resamples, |samples| vec![statistic(samples)])[0]
}

fn bootstrap_over_each(
    groups: &[Vec<usize>],
    resamples: impl Iterator<Item = Vec<usize>>,
    statistics: impl Fn(&[usize]) -> Vec<f64>,
) -> Vec<(f64, f64)> {
    let mut values: Vec<Vec<f64>> = Vec::new();
    for picked in resamples {
        let samples: Vec<usize> = picked.iter().flat_map(|&g| groups[g].iter().copied()).collect();
        for (k, v) in statistics(&samples).into_iter().enumerate() {
            if values.len() <= k {
                values.push(Vec::new());
            }
            if !v.is_nan() {
                values[k].push(v);
            }
        }
    }
    values
        .into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            (percentile(&v, 2.5), percentile(&v, 97.5))
        })
        .collect()
}

/// The `q`th percentile of sorted `v` by linear interpolation (numpy's default); NaN for none.
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let at = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

/// P(T > t) for Student's t with `df` degrees of freedom.
pub fn t_sf(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return if t > 0.0 { 0.0 } else { 1.0 };
    }
    // x = df/(df+t²) and 1 − x, each computed without cancellation.
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t));
    if t >= 0.0 { tail } else { 1.0 - tail }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (bisection on [`t_sf`], to the
/// precision of a double).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !(0.0..=1.0).contains(&p) || df <= 0.0 {
        return f64::NAN;
    }
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    while 1.0 - t_sf(lo, df) > p {
        lo *= 2.0;
    }
    while 1.0 - t_sf(hi, df) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if 1.0 - t_sf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The regularised incomplete beta function I_x(a, b), given x and y = 1 − x (each as exact as
/// the caller has it: near x = 1, y carries the precision x has lost).
fn incomplete_beta(a: f64, b: f64, x: f64, y: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if y <= 0.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * y.ln()).exp();
    // The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, y) / b
    }
}

/// The continued fraction of the incomplete beta function, by the modified Lentz method.
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0));
    let mut h = d;
    for m in 1..1000 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 / clamp(1.0 + numerator * d);
            c = clamp(1.0 + numerator / c);
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1−x) = π / sin(πx).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = C[1..].iter().enumerate().fold(C[0], |s, (i, c)| s + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// `tests/fixtures/stats.json`, written by scipy (make_stats.py).
    fn fixture() -> serde_json::Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stats.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn f(v: &serde_json::Value) -> f64 {
        v.as_f64().unwrap_or(f64::NAN)
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(f).collect()
    }

    fn close(a: f64, b: f64, what: &str) {
        assert!((a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{what}: {a} vs scipy {b}");
    }

    #[test]
    fn t_distribution_matches_scipy() {
        for case in fixture()["t"].as_array().unwrap() {
            let (df, q, x) = (f(&case["df"]), f(&case["q"]), f(&case["x"]));
            close(t_quantile(q, df), f(&case["ppf"]), &format!("ppf({q}, {df})"));
            close(t_sf(x, df), f(&case["sf"]), &format!("sf({x}, {df})"));
        }
    }

    #[test]
    fn intervals_and_paired_tests_match_scipy() {
        let fx = fixture();
        for case in fx["intervals"].as_array().unwrap() {
            let i = t_interval(&floats(&case["values"]));
            close(i.mean, f(&case["mean"]), "mean");
            close(i.low, f(&case["low"]), "low");
            close(i.high, f(&case["high"]), "high");
        }
        for case in fx["paired"].as_array().unwrap() {
            let p = paired(&floats(&case["a"]), &floats(&case["b"]));
            close(p.t, f(&case["t"]), "t");
            close(p.p, f(&case["p"]), "p");
            close(p.difference.low, f(&case["low"]), "difference low");
            close(p.difference.high, f(&case["high"]), "difference high");
        }
    }

    #[test]
    fn bootstrap_intervals_match_numpy_on_its_resamples() {
        for case in fixture()["bootstrap"].as_array().unwrap() {
            let values = floats(&case["values"]);
            let groups: Vec<Vec<usize>> = case["groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect())
                .collect();
            let resamples = case["resamples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect());
            let mean = |idx: &[usize]| idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64;
            let (low, high) = bootstrap_over(&groups, resamples, mean);
            close(low, f(&case["low"]), "bootstrap low");
            close(high, f(&case["high"]), "bootstrap high");
        }
        // Our own draws: the same for a seed, and around the statistic.
        let groups: Vec<Vec<usize>> = (0..40).map(|g| vec![2 * g, 2 * g + 1]).collect();
        let mean = |idx: &[usize]| idx.iter().map(|&i| (i % 7) as f64).sum::<f64>() / idx.len() as f64;
        let a = bootstrap(&groups, 500, 3, mean);
        assert_eq!(a, bootstrap(&groups, 500, 3, mean));
        let all: Vec<usize> = (0..80).collect();
        assert!(a.0 < mean(&all) && mean(&all) < a.1, "{a:?} around {}", mean(&all));
    }

    #[test]
    fn degenerate_samples_say_so() {
        assert!(t_interval(&[0.7]).low.is_nan());
        let same = paired(&[0.5, 0.6, 0.7], &[0.5, 0.6, 0.7]);
        assert!(same.t.is_nan() && same.p.is_nan() && same.difference.mean == 0.0);
        let shifted = paired(&[1.5, 2.5, 3.5], &[1.0, 2.0, 3.0]);
        assert!(shifted.t.is_infinite() && shifted.p == 0.0, "{shifted:?}");
    }
}
