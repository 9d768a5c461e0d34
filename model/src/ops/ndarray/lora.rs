//! LoRA at inference on the CPU: `y + scale * (x a) b` in one pass over `a` and `b` (a few
//! thousand multiply-adds per row at rank 4), without the tensor ops' dispatch and buffers.

/// `y [m, out] + scale * (x [m, in] @ a [in, r]) @ b [r, out]`, in `y`'s buffer.
pub(super) fn add(
    mut y: Vec<f32>,
    x: &[f32],
    a: &[f32],
    b: &[f32],
    r: usize,
    scale: f32,
) -> Vec<f32> {
    let k = a.len() / r;
    let out = b.len() / r;
    let mut xa = vec![0f32; r];
    for (yr, xr) in y.chunks_exact_mut(out).zip(x.chunks_exact(k)) {
        xa.fill(0.0);
        for (&xv, ar) in xr.iter().zip(a.chunks_exact(r)) {
            for (s, &av) in xa.iter_mut().zip(ar) {
                *s += xv * av;
            }
        }
        for (&s, br) in xa.iter().zip(b.chunks_exact(out)) {
            let s = s * scale;
            for (o, &bv) in yr.iter_mut().zip(br) {
                *o += s * bv;
            }
        }
    }
    y
}
