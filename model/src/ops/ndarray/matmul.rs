//! Dense products against a frozen `W [n, k]` (row-major, PyTorch's `[out, in]`): the `gemm`
//! crate's sgemm (multi-threaded; AVX-512 kernels where the CPU has them, chosen at run time),
//! and dot products ([`super::simd::dot_rows`]) for a handful of rows (decoding).

use rayon::prelude::*;

/// `c[m, n] (+)= a[m, k] @ b` where `b` is addressed with strides (rsb, csb).
#[allow(clippy::too_many_arguments)]
pub(super) fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    rsb: isize,
    csb: isize,
    c: &mut [f32],
    rsc: isize,
    beta: f32,
) {
    assert!(m > 0 && k > 0 && n > 0);
    assert!(a.len() >= m * k && c.len() >= (m - 1) * rsc as usize + n);
    assert!(
        rsb > 0 && csb > 0 && b.len() as isize > (k as isize - 1) * rsb + (n as isize - 1) * csb
    );
    // SAFETY: gemm reads a as [m, k] row-major (row stride k, column stride 1), b as [k, n] with
    // the given (positive) strides and writes c as [m, n] with row stride rsc and column stride
    // 1; the assertions above bound the last element of each, so every access is inside the
    // slices. (gemm's `alpha` scales the destination, its `beta` the product.)
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            rsc,
            beta != 0.0,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            csb,
            rsb,
            beta,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// `x [m, k] @ W^T -> [m, n]`.
pub(super) fn frozen_matmul(xs: &[f32], ws: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if m <= 2 {
        // Matrix-vector products: sgemm would pack all of W for a handful of rows.
        for i in 0..m {
            let xr = &xs[i * k..(i + 1) * k];
            out[i * n..(i + 1) * n]
                .par_chunks_mut(64)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let rows = &ws[c * 64 * k..(c * 64 + chunk.len()) * k];
                    super::simd::dot_rows(xr, rows, k, chunk);
                });
        }
    } else {
        sgemm(m, k, n, xs, ws, 1, k as isize, &mut out, n as isize, 0.0);
    }
    out
}

/// `dy [m, n] @ W -> [m, k]`.
pub(super) fn frozen_matmul_t(dys: &[f32], ws: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * k];
    sgemm(m, n, k, dys, ws, k as isize, 1, &mut out, k as isize, 0.0);
    out
}
