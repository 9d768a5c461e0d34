//! `gelu_new` (the tanh approximation) and its derivative, in chunks in parallel.

use rayon::prelude::*;

use super::math::{tanh_fast, vectorized};
use crate::ops::reference::{GELU_C, SQRT_2_OVER_PI};

const CHUNK: usize = 4096;

/// `(gelu_new(x), tanh(...))`.
#[inline(always)]
fn gelu_parts(x: f32) -> (f32, f32) {
    let t = tanh_fast(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    (0.5 * x * (1.0 + t), t)
}

pub(super) fn forward(xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            vectorized(|| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = gelu_parts(x).0;
                }
            })
        });
    out
}

/// `grad * gelu_new'(x)`.
pub(super) fn backward(xs: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| {
            vectorized(|| {
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    let (_, t) = gelu_parts(x);
                    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                    *o = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
                }
            })
        });
    out
}
