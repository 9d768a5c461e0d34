//! The attention's softmax: scale, mask and softmax of each score row in one pass (parallel
//! over rows), and its backward in one more. Masked keys are skipped, not filled with -inf.

use rayon::prelude::*;

use super::math::{exp_neg, vectorized};

/// Which keys row `r` of `scores [batch, heads, q, k]` may see, from `mask [mb, q, k]` (true =
/// hidden; `mb` is 1 or `batch`).
pub(super) struct Mask<'a> {
    pub values: &'a [bool],
    pub per_batch: bool,
}

impl Mask<'_> {
    fn row(&self, r: usize, [_, heads, q, k]: [usize; 4]) -> &[bool] {
        let (b, qi) = (r / (heads * q), r % q);
        let m = if self.per_batch { b * q + qi } else { qi };
        &self.values[m * k..(m + 1) * k]
    }
}

/// `softmax(scores * scale)` over the last dim, hidden keys at 0.
pub(super) fn forward(
    scores: &[f32],
    mask: Option<Mask<'_>>,
    scale: f32,
    dims: [usize; 4],
) -> Vec<f32> {
    let k = dims[3];
    let mut out = vec![0f32; scores.len()];
    out.par_chunks_mut(k.max(1))
        .zip(scores.par_chunks(k.max(1)))
        .enumerate()
        .for_each(|(r, (o, x))| {
            let hidden = mask.as_ref().map(|m| m.row(r, dims));
            vectorized(|| row_forward(o, x, hidden, scale))
        });
    out
}

/// One row of [`forward`]: `o = softmax(x * scale)` over the keys not `hidden`.
#[inline(always)]
fn row_forward(o: &mut [f32], x: &[f32], hidden: Option<&[bool]>, scale: f32) {
    // Branch-free loops (they vectorize): hidden keys count as -inf.
    let max = match hidden {
        None => x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        Some(h) => x
            .iter()
            .zip(h)
            .map(|(&x, &h)| if h { f32::NEG_INFINITY } else { x })
            .fold(f32::NEG_INFINITY, f32::max),
    };
    if max == f32::NEG_INFINITY {
        // Nothing visible (never in the model: a query always sees itself).
        o.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    match hidden {
        None => {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = exp_neg((x - max) * scale);
                sum += *o;
            }
        }
        Some(h) => {
            for ((o, &x), &h) in o.iter_mut().zip(x).zip(h) {
                let e = exp_neg((x - max) * scale);
                *o = if h { 0.0 } else { e };
                sum += *o;
            }
        }
    }
    let inv = 1.0 / sum;
    for o in o.iter_mut() {
        *o *= inv;
    }
}

/// `scale * p * (g - sum(g * p))` per row: the gradient of the scores from that of the
/// probabilities (hidden keys, whose probability is 0, get 0).
pub(super) fn backward(probs: &[f32], grad: &[f32], scale: f32, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; probs.len()];
    out.par_chunks_mut(k.max(1))
        .zip(probs.par_chunks(k.max(1)).zip(grad.par_chunks(k.max(1))))
        .for_each(|(o, (p, g))| {
            vectorized(|| {
                let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                    *o = scale * p * (g - dot);
                }
            })
        });
    out
}
