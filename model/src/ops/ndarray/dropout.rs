//! Inverted dropout whose mask is a hash of `(seed, element index)` ([`dropout_keep`]): the
//! backward re-derives the mask from the seed instead of storing it.

use rayon::prelude::*;

use crate::ops::{dropout_keep, dropout_keys, dropout_threshold};

const CHUNK: usize = 4096;

/// `x / (1 - p)` where element `i` is kept, 0 elsewhere.
pub(super) fn apply(xs: &[f32], p: f64, seed: u64) -> Vec<f32> {
    let keys = dropout_keys(seed);
    let threshold = dropout_threshold(p);
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                let keep = dropout_keep(keys, (c * CHUNK + j) as u32, threshold);
                *o = if keep { x * scale } else { 0.0 };
            }
        });
    out
}
