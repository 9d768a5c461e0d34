//! Vector kernels for decoding (a handful of input rows against a frozen weight), picked at run
//! time through `pulp`'s safe dispatch (AVX-512 or AVX2 + FMA where the CPU has them), since the
//! release build targets the baseline instruction set.
//!
//! - [`dot_rows`]: `out[j] = x · W[r0 + j]` for dense f32 rows (the head and dense layers).
//! - [`nf4_rows`]: the same against NF4 codes, decoded 16 (AVX-512) or 8 (AVX2) at a time by a
//!   register permute over the 16-entry code table, scaled by each block's absmax.

use crate::ops::{BLOCK, NF4_CODE};

/// `out[j] = x · w[j * k..(j + 1) * k]` for every `j` (`w` holds `out.len()` rows of `k`).
pub(super) fn dot_rows(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    pulp::Arch::new().dispatch(DotRows { x, w, k, out });
}

struct DotRows<'a> {
    x: &'a [f32],
    w: &'a [f32],
    k: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for DotRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let (xv, xt) = S::as_simd_f32s(self.x);
        let (x4, xr) = pulp::as_arrays::<4, _>(xv);
        for (j, o) in self.out.iter_mut().enumerate() {
            let (wv, wt) = S::as_simd_f32s(&self.w[j * self.k..(j + 1) * self.k]);
            let (w4, wr) = pulp::as_arrays::<4, _>(wv);
            // Four independent accumulators: no add waits on the one before.
            let mut acc = [simd.splat_f32s(0.0); 4];
            for (a, b) in x4.iter().zip(w4) {
                for l in 0..4 {
                    acc[l] = simd.mul_add_e_f32s(a[l], b[l], acc[l]);
                }
            }
            for (&a, &b) in xr.iter().zip(wr) {
                acc[0] = simd.mul_add_e_f32s(a, b, acc[0]);
            }
            let s = simd.add_f32s(simd.add_f32s(acc[0], acc[1]), simd.add_f32s(acc[2], acc[3]));
            let mut s = simd.reduce_sum_f32s(s);
            for (a, b) in xt.iter().zip(wt) {
                s += a * b;
            }
            *o = s;
        }
    }
}

/// Codes per vector step of the NF4 kernel in use, if the CPU has one: 32 (AVX-512: 16 bytes
/// widened to 16 lanes, low and high nibbles) or 16 (AVX2: 8 bytes to 8 lanes).
pub(super) fn nf4_group() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::is_available() {
            return Some(32);
        }
        if pulp::x86::V3::is_available() {
            return Some(16);
        }
    }
    None
}

/// The input rows laid out for [`nf4_rows`] with groups of `group` codes: within each group,
/// the values of the even-indexed codes (low nibbles), then the odd ones (high nibbles).
pub(super) fn nf4_deinterleave(x: &[f32], group: usize) -> Vec<f32> {
    let half = group / 2;
    let mut out = vec![0f32; x.len()];
    for (o, g) in out.chunks_exact_mut(group).zip(x.chunks_exact(group)) {
        for l in 0..half {
            o[l] = g[2 * l];
            o[half + l] = g[2 * l + 1];
        }
    }
    out
}

/// `out[j * m + i] = xs[i] · dequant(W[r0 + j])` for the `m` (1 to 4) input rows `xs` (laid out
/// by [`nf4_deinterleave`] for [`nf4_group`]), `words` the rows' packed codes (8 per word,
/// lowest nibble first: the byte order is the code order on a little-endian machine) and
/// `absmax` their blocks' scales. Returns false (and writes nothing) without a vector kernel.
pub(super) fn nf4_rows(
    xs: &[f32],
    m: usize,
    words: &[i32],
    absmax: &[f32],
    k: usize,
    out: &mut [f32],
) -> bool {
    debug_assert!(k.is_multiple_of(BLOCK) && (1..=4).contains(&m));
    #[cfg(target_arch = "x86_64")]
    {
        let job = Nf4Rows {
            xs,
            m,
            words,
            absmax,
            k,
            out,
        };
        if let Some(simd) = pulp::x86::V4::try_new() {
            pulp::Simd::vectorize(simd, x86::V4Rows { simd, job });
            return true;
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            pulp::Simd::vectorize(simd, x86::V3Rows { simd, job });
            return true;
        }
    }
    let _ = (xs, words, absmax, out);
    false
}

/// Dequantizes whole 64-value blocks: `out[i] = code(i) * absmax[i / 64]` with `words` the
/// packed codes of `out` (8 per word) and `absmax` one scale per block. Returns false (and
/// writes nothing) without a vector kernel.
pub(super) fn nf4_dequant(words: &[i32], absmax: &[f32], out: &mut [f32]) -> bool {
    debug_assert!(out.len() == absmax.len() * BLOCK && words.len() * 8 == out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            pulp::Simd::vectorize(
                simd,
                x86::V4Dequant {
                    simd,
                    words,
                    absmax,
                    out,
                },
            );
            return true;
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            pulp::Simd::vectorize(
                simd,
                x86::V3Dequant {
                    simd,
                    words,
                    absmax,
                    out,
                },
            );
            return true;
        }
    }
    let _ = (words, absmax, out);
    false
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Nf4Rows<'a> {
    xs: &'a [f32],
    m: usize,
    words: &'a [i32],
    absmax: &'a [f32],
    k: usize,
    out: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m128i, __m256, __m512, __m512i};

    use pulp::cast;
    use pulp::x86::{V3, V4};

    use super::{BLOCK, NF4_CODE, Nf4Rows};

    pub(super) struct V4Rows<'a> {
        pub simd: V4,
        pub job: Nf4Rows<'a>,
    }

    impl pulp::WithSimd for V4Rows<'_> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            match self.job.m {
                1 => v4_rows::<1>(self.simd, self.job),
                2 => v4_rows::<2>(self.simd, self.job),
                3 => v4_rows::<3>(self.simd, self.job),
                _ => v4_rows::<4>(self.simd, self.job),
            }
        }
    }

    /// Per 64-code block: the table scaled by the block's absmax, then two steps of 32 codes
    /// (16 bytes widened to 16 lanes; the low nibbles are the even codes, the high nibbles the
    /// odd ones), each looked up with one `vpermps` and multiplied into its own accumulator.
    #[inline(always)]
    fn v4_rows<const M: usize>(simd: V4, job: Nf4Rows) {
        let f = simd.avx512f;
        let table: __m512 = cast(NF4_CODE);
        let nibble = f._mm512_set1_epi32(0xF);
        let (k, rw, rb) = (job.k, job.k / 8, job.k / BLOCK);
        let xs: [&[[f32; 16]]; M] =
            core::array::from_fn(|i| pulp::as_arrays::<16, _>(&job.xs[i * k..(i + 1) * k]).0);
        for (j, o) in job.out.chunks_exact_mut(job.m).enumerate() {
            let (words, _) = pulp::as_arrays::<4, _>(&job.words[j * rw..(j + 1) * rw]);
            let scales = &job.absmax[j * rb..(j + 1) * rb];
            let mut acc = [[f._mm512_setzero_ps(); 4]; M];
            for (b, (w, &scale)) in words.chunks_exact(2).zip(scales).enumerate() {
                let t = f._mm512_mul_ps(table, f._mm512_set1_ps(scale));
                for (g, &w) in w.iter().enumerate() {
                    let v = f._mm512_cvtepu8_epi32(cast::<[i32; 4], __m128i>(w));
                    let even = f._mm512_permutexvar_ps(f._mm512_and_si512(v, nibble), t);
                    let odd = f._mm512_permutexvar_ps(f._mm512_srli_epi32::<4>(v), t);
                    let at = 4 * b + 2 * g;
                    for (a, x) in acc.iter_mut().zip(&xs) {
                        a[2 * g] = f._mm512_fmadd_ps(even, cast(x[at]), a[2 * g]);
                        a[2 * g + 1] = f._mm512_fmadd_ps(odd, cast(x[at + 1]), a[2 * g + 1]);
                    }
                }
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                let s = f._mm512_add_ps(f._mm512_add_ps(a[0], a[1]), f._mm512_add_ps(a[2], a[3]));
                *o = f._mm512_reduce_add_ps(s);
            }
        }
    }

    pub(super) struct V3Rows<'a> {
        pub simd: V3,
        pub job: Nf4Rows<'a>,
    }

    impl pulp::WithSimd for V3Rows<'_> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            match self.job.m {
                1 => v3_rows::<1>(self.simd, self.job),
                2 => v3_rows::<2>(self.simd, self.job),
                3 => v3_rows::<3>(self.simd, self.job),
                _ => v3_rows::<4>(self.simd, self.job),
            }
        }
    }

    /// As [`v4_rows`] with 8 lanes: steps of 16 codes (8 bytes widened to 8 lanes); the
    /// 16-entry table is two 8-entry permutes blended on the code's bit 3.
    #[inline(always)]
    fn v3_rows<const M: usize>(simd: V3, job: Nf4Rows) {
        let (a2, a1, fm) = (simd.avx2, simd.avx, simd.fma);
        let [lo, hi]: [[f32; 8]; 2] = cast(NF4_CODE);
        let (lo, hi): (__m256, __m256) = (cast(lo), cast(hi));
        let nibble = a1._mm256_set1_epi32(0xF);
        let (k, rw, rb) = (job.k, job.k / 8, job.k / BLOCK);
        let xs: [&[[f32; 8]]; M] =
            core::array::from_fn(|i| pulp::as_arrays::<8, _>(&job.xs[i * k..(i + 1) * k]).0);
        let lookup = |idx| {
            let l = a2._mm256_permutevar8x32_ps(lo, idx);
            let h = a2._mm256_permutevar8x32_ps(hi, idx);
            a1._mm256_blendv_ps(
                l,
                h,
                a1._mm256_castsi256_ps(a2._mm256_slli_epi32::<28>(idx)),
            )
        };
        for (j, o) in job.out.chunks_exact_mut(job.m).enumerate() {
            let (words, _) = pulp::as_arrays::<2, _>(&job.words[j * rw..(j + 1) * rw]);
            let scales = &job.absmax[j * rb..(j + 1) * rb];
            let mut acc = [[a1._mm256_setzero_ps(); 2]; M];
            for (b, (w, &scale)) in words.chunks_exact(4).zip(scales).enumerate() {
                let s = a1._mm256_set1_ps(scale);
                let mut blk = [[a1._mm256_setzero_ps(); 2]; M];
                for (g, &w) in w.iter().enumerate() {
                    let v = a2._mm256_cvtepu8_epi32(cast::<[i32; 4], __m128i>([w[0], w[1], 0, 0]));
                    let even = lookup(a2._mm256_and_si256(v, nibble));
                    let odd = lookup(a2._mm256_srli_epi32::<4>(v));
                    let at = 8 * b + 2 * g;
                    for (a, x) in blk.iter_mut().zip(&xs) {
                        a[0] = fm._mm256_fmadd_ps(even, cast(x[at]), a[0]);
                        a[1] = fm._mm256_fmadd_ps(odd, cast(x[at + 1]), a[1]);
                    }
                }
                for (a, blk) in acc.iter_mut().zip(&blk) {
                    a[0] = fm._mm256_fmadd_ps(blk[0], s, a[0]);
                    a[1] = fm._mm256_fmadd_ps(blk[1], s, a[1]);
                }
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                let s: [f32; 8] = cast(a1._mm256_add_ps(a[0], a[1]));
                *o = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
            }
        }
    }

    pub(super) struct V4Dequant<'a> {
        pub simd: V4,
        pub words: &'a [i32],
        pub absmax: &'a [f32],
        pub out: &'a mut [f32],
    }

    impl pulp::WithSimd for V4Dequant<'_> {
        type Output = ();

        /// Per 32 codes: the even and odd codes' values as in [`v4_rows`], interleaved back into
        /// code order by two two-source permutes.
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let f = self.simd.avx512f;
            let table: __m512 = cast(NF4_CODE);
            let nibble = f._mm512_set1_epi32(0xF);
            let first: __m512i = cast(core::array::from_fn::<i32, 16, _>(|l| {
                (l / 2 + 16 * (l % 2)) as i32
            }));
            let second: __m512i = cast(core::array::from_fn::<i32, 16, _>(|l| {
                (8 + l / 2 + 16 * (l % 2)) as i32
            }));
            let (words, _) = pulp::as_arrays::<4, _>(self.words);
            let (out, _) = pulp::as_arrays_mut::<16, _>(self.out);
            for ((w, o), &scale) in words
                .chunks_exact(2)
                .zip(out.chunks_exact_mut(4))
                .zip(self.absmax)
            {
                let t = f._mm512_mul_ps(table, f._mm512_set1_ps(scale));
                for (&w, o) in w.iter().zip(o.chunks_exact_mut(2)) {
                    let v = f._mm512_cvtepu8_epi32(cast::<[i32; 4], __m128i>(w));
                    let even = f._mm512_permutexvar_ps(f._mm512_and_si512(v, nibble), t);
                    let odd = f._mm512_permutexvar_ps(f._mm512_srli_epi32::<4>(v), t);
                    o[0] = cast(f._mm512_permutex2var_ps(even, first, odd));
                    o[1] = cast(f._mm512_permutex2var_ps(even, second, odd));
                }
            }
        }
    }

    pub(super) struct V3Dequant<'a> {
        pub simd: V3,
        pub words: &'a [i32],
        pub absmax: &'a [f32],
        pub out: &'a mut [f32],
    }

    impl pulp::WithSimd for V3Dequant<'_> {
        type Output = ();

        /// As [`V4Dequant`] with 8 lanes: per 16 codes, the even and odd values interleaved by
        /// unpacking within 128-bit halves and swapping the halves.
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let (a2, a1) = (self.simd.avx2, self.simd.avx);
            let [lo, hi]: [[f32; 8]; 2] = cast(NF4_CODE);
            let (lo, hi): (__m256, __m256) = (cast(lo), cast(hi));
            let nibble = a1._mm256_set1_epi32(0xF);
            let (words, _) = pulp::as_arrays::<2, _>(self.words);
            let (out, _) = pulp::as_arrays_mut::<8, _>(self.out);
            for ((w, o), &scale) in words
                .chunks_exact(4)
                .zip(out.chunks_exact_mut(8))
                .zip(self.absmax)
            {
                let s = a1._mm256_set1_ps(scale);
                let (tl, th) = (a1._mm256_mul_ps(lo, s), a1._mm256_mul_ps(hi, s));
                let lookup = |idx| {
                    let l = a2._mm256_permutevar8x32_ps(tl, idx);
                    let h = a2._mm256_permutevar8x32_ps(th, idx);
                    let bit3 = a1._mm256_castsi256_ps(a2._mm256_slli_epi32::<28>(idx));
                    a1._mm256_blendv_ps(l, h, bit3)
                };
                for (&w, o) in w.iter().zip(o.chunks_exact_mut(2)) {
                    let v = a2._mm256_cvtepu8_epi32(cast::<[i32; 4], __m128i>([w[0], w[1], 0, 0]));
                    let even = lookup(a2._mm256_and_si256(v, nibble));
                    let odd = lookup(a2._mm256_srli_epi32::<4>(v));
                    let (l, h) = (
                        a1._mm256_unpacklo_ps(even, odd),
                        a1._mm256_unpackhi_ps(even, odd),
                    );
                    o[0] = cast(a1._mm256_permute2f128_ps::<0x20>(l, h));
                    o[1] = cast(a1._mm256_permute2f128_ps::<0x31>(l, h));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> u32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 33) as u32
    }

    /// Random codes, scales and inputs, and `out[j * m + i]` computed in f64 from the codes.
    fn case(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<i32>, Vec<f32>, Vec<f64>) {
        let mut s = (m * 1000 + n * 10 + k) as u64;
        let words: Vec<i32> = (0..n * k / 8).map(|_| lcg(&mut s) as i32).collect();
        let absmax: Vec<f32> = (0..n * k / BLOCK)
            .map(|_| 0.01 + lcg(&mut s) as f32 / u32::MAX as f32)
            .collect();
        let xs: Vec<f32> = (0..m * k)
            .map(|_| lcg(&mut s) as f32 / u32::MAX as f32 * 2.0 - 1.0)
            .collect();
        let mut want = vec![0f64; n * m];
        for j in 0..n {
            for i in 0..m {
                want[j * m + i] = (0..k)
                    .map(|kk| {
                        let c = (words[(j * k + kk) / 8] as u32 >> (4 * (kk % 8))) & 0xF;
                        let w = NF4_CODE[c as usize] as f64 * absmax[(j * k + kk) / BLOCK] as f64;
                        w * xs[i * k + kk] as f64
                    })
                    .sum();
            }
        }
        (xs, words, absmax, want)
    }

    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 5, 64),
        (2, 3, 128),
        (3, 7, 192),
        (4, 2, 256),
        (1, 1, 2560),
    ];

    fn check(got: &[f32], want: &[f64], k: usize, what: &str) {
        for (g, w) in got.iter().zip(want) {
            assert!(
                (*g as f64 - w).abs() < 1e-5 * (k as f64).sqrt(),
                "{what}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn dot_rows_matches_f64() {
        for (_, n, k) in SHAPES.iter().chain(&[(1, 3, 37), (1, 2, 5)]) {
            let (n, k) = (*n, *k);
            let mut s = (n * 31 + k) as u64;
            let x: Vec<f32> = (0..k).map(|_| lcg(&mut s) as f32 / 4e9 - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s) as f32 / 4e9 - 0.5).collect();
            let mut out = vec![0f32; n];
            dot_rows(&x, &w, k, &mut out);
            let want: Vec<f64> = (0..n)
                .map(|j| (0..k).map(|i| x[i] as f64 * w[j * k + i] as f64).sum())
                .collect();
            check(&out, &want, k, "dot_rows");
        }
    }

    /// The dispatched kernel, and each x86 kernel the CPU has (AVX2 too on an AVX-512 CPU).
    #[test]
    fn nf4_kernels_match_the_codes() {
        for &(m, n, k) in &SHAPES {
            let (xs, words, absmax, want) = case(m, n, k);
            if let Some(group) = nf4_group() {
                let mut out = vec![0f32; n * m];
                let xp = nf4_deinterleave(&xs, group);
                assert!(nf4_rows(&xp, m, &words, &absmax, k, &mut out));
                check(&out, &want, k, "dispatched");
            }
            #[cfg(target_arch = "x86_64")]
            {
                let (words, absmax) = (&words[..], &absmax[..]);
                if let Some(simd) = pulp::x86::V4::try_new() {
                    let (xs, mut out) = (nf4_deinterleave(&xs, 32), vec![0f32; n * m]);
                    let job = Nf4Rows {
                        xs: &xs,
                        m,
                        words,
                        absmax,
                        k,
                        out: &mut out,
                    };
                    pulp::Simd::vectorize(simd, x86::V4Rows { simd, job });
                    check(&out, &want, k, "avx-512");
                }
                if let Some(simd) = pulp::x86::V3::try_new() {
                    let (xs, mut out) = (nf4_deinterleave(&xs, 16), vec![0f32; n * m]);
                    let job = Nf4Rows {
                        xs: &xs,
                        m,
                        words,
                        absmax,
                        k,
                        out: &mut out,
                    };
                    pulp::Simd::vectorize(simd, x86::V3Rows { simd, job });
                    check(&out, &want, k, "avx2");
                }
            }
        }
    }

    #[test]
    fn nf4_dequant_kernels_match_the_codes() {
        let (_, words, absmax, _) = case(1, 3, 256);
        let want: Vec<f32> = (0..3 * 256)
            .map(|i| {
                let c = (words[i / 8] as u32 >> (4 * (i % 8))) & 0xF;
                NF4_CODE[c as usize] * absmax[i / BLOCK]
            })
            .collect();
        let mut out = vec![0f32; want.len()];
        if nf4_dequant(&words, &absmax, &mut out) {
            assert_eq!(out, want, "dispatched");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (words, absmax) = (&words[..], &absmax[..]);
            if let Some(simd) = pulp::x86::V4::try_new() {
                let mut out = vec![0f32; want.len()];
                pulp::Simd::vectorize(
                    simd,
                    x86::V4Dequant {
                        simd,
                        words,
                        absmax,
                        out: &mut out,
                    },
                );
                assert_eq!(out, want, "avx-512");
            }
            if let Some(simd) = pulp::x86::V3::try_new() {
                let mut out = vec![0f32; want.len()];
                pulp::Simd::vectorize(
                    simd,
                    x86::V3Dequant {
                        simd,
                        words,
                        absmax,
                        out: &mut out,
                    },
                );
                assert_eq!(out, want, "avx2");
            }
        }
    }
}
