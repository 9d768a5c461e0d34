//! Scalar maths written so the row loops around them vectorize, and the dispatch that has them
//! vectorize to the CPU's full width.

/// `e^x` for `x <= 0` to within a few ulps (Cephes' `expf` polynomial), written branch-free so
/// the row loops vectorize; results below `e^-87.3` flush to (nearly) zero.
#[inline(always)]
pub(super) fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.3);
    // Round to nearest through the float mantissa (vectorizes, unlike `round`).
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits in `t` (an integer in its low mantissa bits, -126..=0 here): an
    // `as i32` conversion would saturate, which keeps the loops around it from vectorizing.
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(n_bits.wrapping_add(127) << 23) * y
}

/// Runs `f` compiled for the widest vector instructions the CPU has (AVX-512, or AVX2 + FMA,
/// picked at run time by `pulp`), so that the loops of the `#[inline(always)]` kernels called
/// inside vectorize to that width: the release build targets the baseline x86-64 set (SSE2).
#[inline(always)]
pub(super) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `tanh(u)` through [`exp_neg`] (vectorizes; within a few ulps of `f32::tanh`).
#[inline(always)]
pub(super) fn tanh_fast(u: f32) -> f32 {
    let e = exp_neg(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -(i as f32) * 4.4e-4; // 0 .. -88
            let (a, b) = (exp_neg(x), x.exp());
            if b > 1e-37 {
                worst = worst.max(((a - b) / b).abs());
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-200.0) < 1e-37);
    }
}
