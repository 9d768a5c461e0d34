//! The language-model cross-entropy over the vocabulary: one pass over each row forward
//! (nll, log-sum-exp, argmax), one backward (`softmax - onehot`), rows in parallel.

use rayon::prelude::*;

use super::math::exp_neg;

/// `(nll, lse, argmax)` of one row.
fn row_forward(row: &[f32], target: i64) -> (f32, f32, usize) {
    let (mut max, mut arg, mut nan) = (f32::NEG_INFINITY, 0usize, false);
    for (j, &x) in row.iter().enumerate() {
        nan |= x.is_nan();
        if x > max {
            max = x;
            arg = j;
        }
    }
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += exp_neg(c[l] - max);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &x in rest {
        sum += exp_neg(x - max);
    }
    let lse = if nan || !max.is_finite() {
        f32::NAN
    } else {
        max + sum.ln()
    };
    let nll = if target < 0 {
        0.0
    } else {
        lse - row[target as usize]
    };
    (nll, lse, arg)
}

/// `(nll, lse, argmax)` per row of `logits [targets.len(), vocab]`.
pub(super) fn forward(logits: &[f32], targets: &[i64], vocab: usize) -> Vec<(f32, f32, usize)> {
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| row_forward(row, t))
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
            for (o, &x) in o.iter_mut().zip(x) {
                *o = exp_neg(x - l) * g;
            }
            o[t as usize] -= g;
        });
    out
}
