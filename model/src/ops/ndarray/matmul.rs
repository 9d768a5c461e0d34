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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// `x [m, k] @ W^T` and `dy [m, n] @ W` against f64 sums, for sizes that are no multiple of
    /// any kernel's tile.
    #[test]
    fn frozen_products_equal_f64_sums() {
        for (m, n, k) in [(3, 5, 7), (37, 130, 67), (128, 96, 640)] {
            let (x, w, dy) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
            let y = frozen_matmul(&x, &w, m, n, k);
            let dx = frozen_matmul_t(&dy, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let e: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "y[{i},{j}] {got} vs {e}"
                    );
                }
                for t in 0..k {
                    let e: f64 = (0..n)
                        .map(|j| dy[i * n + j] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = dx[i * k + t] as f64;
                    assert!(
                        (got - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "dx[{i},{t}] {got} vs {e}"
                    );
                }
            }
        }
    }

    /// `beta = 1` accumulates into a strided destination (the NF4 tiles' backward).
    #[test]
    fn sgemm_accumulates_into_a_strided_destination() {
        let (m, k, n, rsc) = (9, 11, 6, 10);
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let mut c = values(m * rsc, 6);
        let before = c.clone();
        sgemm(m, k, n, &a, &b, n as isize, 1, &mut c, rsc as isize, 1.0);
        for i in 0..m {
            for j in 0..rsc {
                let e = if j < n {
                    before[i * rsc + j] as f64
                        + (0..k)
                            .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                            .sum::<f64>()
                } else {
                    before[i * rsc + j] as f64
                };
                let got = c[i * rsc + j] as f64;
                assert!(
                    (got - e).abs() < 1e-5 * (1.0 + e.abs()),
                    "c[{i},{j}] {got} vs {e}"
                );
            }
        }
    }
}
