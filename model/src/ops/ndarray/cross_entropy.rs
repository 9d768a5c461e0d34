//! The language-model cross-entropy over the vocabulary, rows in parallel, each row's loops
//! vectorized to the CPU's width ([`vectorized`]): forward (nll, log-sum-exp, argmax), backward
//! (`softmax - onehot`), and the head's fused form ([`row_in_place`]: the bias added, the loss
//! taken and the row turned into its own gradient, in one row buffer).

use rayon::prelude::*;

use super::math::{exp_neg, vectorized};

const LANES: usize = 16;

/// The largest non-NaN value of `row` (-inf if none), the index of its first occurrence (0 if
/// none) and whether the row holds a NaN.
#[inline(always)]
fn max_arg(row: &[f32]) -> (f32, usize, bool) {
    let (mut lanes, mut inf_or_nan) = ([f32::NEG_INFINITY; LANES], [0f32; LANES]);
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
            // NaN for a NaN or an infinity, 0 otherwise: one vector add per step.
            inf_or_nan[l] += c[l] * 0.0;
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for &x in rest {
        max = if x > max { x } else { max };
    }
    let suspect = inf_or_nan.iter().sum::<f32>().is_nan() || rest.iter().any(|x| !x.is_finite());
    let nan = suspect && row.iter().any(|x| x.is_nan());
    // The first chunk holding the max, found a vector compare at a time, then the index in it.
    let at = row
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |hit, &x| hit | (x == max)))
        .unwrap_or(0);
    let arg = at * LANES
        + row[at * LANES..]
            .iter()
            .position(|&x| x == max)
            .unwrap_or(0);
    (max, arg.min(row.len().saturating_sub(1)), nan)
}

/// `sum(exp(row - max))` in 16 lanes (then the remainder).
#[inline(always)]
fn exp_sum(row: &[f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp_neg(c[l] - max);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &x in rest {
        sum += exp_neg(x - max);
    }
    sum
}

/// [`exp_sum`], also writing each exponential over its value (same order, same sum).
#[inline(always)]
fn exp_sum_in_place(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_neg(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_neg(*x - max);
        sum += *x;
    }
    sum
}

/// `(nll, lse)` from a row's max, its sum of exponentials and its target's logit.
#[inline(always)]
fn finish(max: f32, sum: f32, nan: bool, target_logit: Option<f32>) -> (f32, f32) {
    let lse = if nan || !max.is_finite() {
        f32::NAN
    } else {
        max + sum.ln()
    };
    (target_logit.map_or(0.0, |x| lse - x), lse)
}

/// `(nll, lse, argmax)` of one row (nll 0 for a negative target).
#[inline(always)]
fn row_forward(row: &[f32], target: i64) -> (f32, f32, usize) {
    let (max, arg, nan) = max_arg(row);
    let sum = exp_sum(row, max);
    let target_logit = (target >= 0).then(|| row[target as usize]);
    let (nll, lse) = finish(max, sum, nan, target_logit);
    (nll, lse, arg)
}

/// One row of the head's logits, in place: adds `bias`, then returns `(nll, lse, argmax)` as
/// [`forward`] does; with `grad`, the row is left holding `d nll / d logits` (`softmax -
/// onehot(target)`; zeros for a negative target, NaN where the loss is NaN), otherwise the
/// biased logits.
#[inline(always)]
pub(super) fn row_in_place(
    row: &mut [f32],
    bias: Option<&[f32]>,
    target: i64,
    grad: bool,
) -> (f32, f32, usize) {
    if let Some(b) = bias {
        for (x, &b) in row.iter_mut().zip(b) {
            *x += b;
        }
    }
    let (max, arg, nan) = max_arg(row);
    let target_logit = (target >= 0).then(|| row[target as usize]);
    let sum = if grad {
        exp_sum_in_place(row, max)
    } else {
        exp_sum(row, max)
    };
    let (nll, lse) = finish(max, sum, nan, target_logit);
    if grad {
        if target < 0 {
            row.fill(0.0);
        } else if lse.is_nan() {
            row.fill(f32::NAN);
        } else {
            let inv = 1.0 / sum;
            for x in row.iter_mut() {
                *x *= inv;
            }
            row[target as usize] -= 1.0;
        }
    }
    (nll, lse, arg)
}

/// `(nll, lse, argmax)` per row of `logits [targets.len(), vocab]`.
pub(super) fn forward(logits: &[f32], targets: &[i64], vocab: usize) -> Vec<(f32, f32, usize)> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| vectorized(|| row_forward(row, t)))
        .collect()
}

/// `(softmax(logits) - onehot(target)) * grad` per row, zero for a negative target.
pub(super) fn backward(
    logits: &[f32],
    targets: &[i64],
    lse: &[f32],
    grad: &[f32],
    vocab: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; logits.len()];
    out.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .enumerate()
        .for_each(|(r, (o, x))| {
            let t = targets[r];
            if t < 0 {
                return; // zeros
            }
            let (l, g) = (lse[r], grad[r]);
            vectorized(|| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = exp_neg(x - l) * g;
                }
            });
            o[t as usize] -= g;
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row with its largest value at `at` (twice: the first one counts), of a length no
    /// multiple of the 16 lanes.
    fn row(len: usize, at: usize) -> Vec<f32> {
        let mut r: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        r[at] = 7.5;
        r[len - 1] = 7.5;
        r
    }

    fn f64_reference(row: &[f32], target: usize) -> (f64, f64, Vec<f64>) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let mut g: Vec<f64> = row.iter().map(|&x| (x as f64 - lse).exp()).collect();
        g[target] -= 1.0;
        (lse - row[target] as f64, lse, g)
    }

    /// The in-place row against f64, with and without a bias, and against the separate forward
    /// and backward it fuses.
    #[test]
    fn in_place_row_matches_f64_and_the_separate_passes() {
        for (len, at, target) in [(51_203, 40_000, 17), (37, 3, 36), (16, 0, 5)] {
            let bias: Vec<f32> = (0..len).map(|i| (i % 5) as f32 * 0.25).collect();
            let mut base = row(len, at);
            // The two maxima stay equal once biased.
            base[at] -= bias[at];
            base[len - 1] -= bias[len - 1];
            let biased: Vec<f32> = base.iter().zip(&bias).map(|(x, b)| x + b).collect();
            let (nll_e, lse_e, g_e) = f64_reference(&biased, target);
            let mut r = base.clone();
            let (nll, lse, arg) =
                vectorized(|| row_in_place(&mut r, Some(&bias), target as i64, true));
            assert_eq!(arg, at, "argmax is the first of equal maxima");
            assert!((nll as f64 - nll_e).abs() < 1e-5, "{nll} vs {nll_e}");
            assert!((lse as f64 - lse_e).abs() < 1e-5);
            for (j, (&g, &e)) in r.iter().zip(&g_e).enumerate() {
                assert!((g as f64 - e).abs() < 1e-6, "grad[{j}] {g} vs {e}");
            }
            let fwd = forward(&biased, &[target as i64], len);
            assert_eq!(fwd[0].2, arg);
            assert!((fwd[0].0 - nll).abs() < 1e-5 && (fwd[0].1 - lse).abs() < 1e-5);
            let bwd = backward(&biased, &[target as i64], &[lse], &[1.0], len);
            for (a, b) in bwd.iter().zip(&r) {
                assert!((a - b).abs() < 1e-6);
            }
            // Without the gradient the row keeps the biased logits.
            let mut r = base.clone();
            let (nll2, _, _) = row_in_place(&mut r, Some(&bias), target as i64, false);
            assert_eq!(r, biased);
            assert!((nll2 - nll).abs() < 1e-6);
        }
    }

    /// A NaN anywhere makes the loss NaN (and its gradient); an ignored target gives nll 0 and
    /// a zero gradient; a -inf logit leaves the loss finite and gets a (flushed) zero gradient.
    #[test]
    fn nan_ignored_and_infinite_rows() {
        let mut r = row(100, 10);
        r[63] = f32::NAN;
        let (nll, lse, _) = row_forward(&r, 2);
        assert!(nll.is_nan() && lse.is_nan());
        let (nll, _, _) = row_in_place(&mut r, None, 2, true);
        assert!(nll.is_nan() && r.iter().all(|g| g.is_nan()));

        let mut r = row(100, 10);
        let (nll, lse, arg) = row_in_place(&mut r, None, -100, true);
        assert_eq!((nll, arg), (0.0, 10));
        assert!(lse.is_finite() && r.iter().all(|&g| g == 0.0));

        let mut r = row(100, 10);
        r[20] = f32::NEG_INFINITY;
        let (nll, lse, _) = row_in_place(&mut r, None, 3, true);
        assert!(nll.is_finite() && lse.is_finite() && r[20].abs() < 1e-30);
    }
}
