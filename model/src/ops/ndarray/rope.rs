//! The rotary embedding (HF's rotate_half layout), one head row at a time in parallel. The
//! backward is the same rotation by the negated angles.

use rayon::prelude::*;

/// Rotates `x [batch, seq, heads, head_dim]` (row-major) by the `cos`/`sin` tables
/// `[n, dim]` (`n` = seq, or batch × seq for a row per token); channels past `dim` pass
/// through. `inverse` negates the angles.
pub(super) fn rotate(
    xs: &[f32],
    cos: &[f32],
    sin: &[f32],
    [_, _, heads, head_dim]: [usize; 4],
    [n, dim]: [usize; 2],
    inverse: bool,
) -> Vec<f32> {
    let half = dim / 2;
    let sign = if inverse { -1.0f32 } else { 1.0 };
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(head_dim)
        .zip(xs.par_chunks(head_dim))
        .enumerate()
        .for_each(|(r, (o, x))| {
            let p = (r / heads) % n.max(1);
            let (c, s) = (&cos[p * dim..(p + 1) * dim], &sin[p * dim..(p + 1) * dim]);
            for i in 0..half {
                let (x1, x2) = (x[i], x[i + half]);
                o[i] = x1 * c[i] - x2 * s[i] * sign;
                o[i + half] = x2 * c[i + half] + x1 * s[i + half] * sign;
            }
            o[dim..].copy_from_slice(&x[dim..]);
        });
    out
}
