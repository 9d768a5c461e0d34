//! Inverted dropout whose mask is a hash of `(seed, element index)`: the backward re-derives
//! the mask from the seed instead of storing it.

use rayon::prelude::*;

const CHUNK: usize = 4096;

/// 24 uniform bits for element `i` under `seed` (SplitMix64's finalizer).
#[inline(always)]
fn mask_draw(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 40
}

/// `x / (1 - p)` where element `i`'s draw is at or above `p`, 0 elsewhere.
pub(super) fn apply(xs: &[f32], p: f64, seed: u64) -> Vec<f32> {
    let threshold = (p * (1u64 << 24) as f64) as u64;
    let scale = (1.0 / (1.0 - p)) as f32;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                let keep = mask_draw(seed, (c * CHUNK + j) as u64) >= threshold;
                *o = if keep { x * scale } else { 0.0 };
            }
        });
    out
}
