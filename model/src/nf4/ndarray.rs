//! The CPU implementation: plain Rust over the ndarray backend's buffers (no copies of the
//! weights), multi-threaded. Weights are processed in tiles of rows: a tile is dequantized into
//! a small buffer (for NF4) and multiplied with matrixmultiply's sgemm, so at most one tile of
//! dense values exists at a time.

use burn::backend::NdArray;
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use rayon::prelude::*;

use super::{BLOCK, NF4_CODE, Nf4Backend};

/// Rows of W dequantized at a time.
const TILE_ROWS: usize = 256;

/// Row-major f32 values of a tensor (a view when already contiguous f32).
pub(crate) fn f32s(t: &NdArrayTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t {
        NdArrayTensor::F32(s) => {
            let v = s.view();
            Some(match v.to_slice() {
                Some(sl) => std::borrow::Cow::Borrowed(sl),
                None => std::borrow::Cow::Owned(v.iter().copied().collect()),
            })
        }
        _ => None,
    }
}

/// The packed code words, whatever the backend's int width (only the low 32 bits are used).
enum Words<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Words<'_> {
    fn of(t: &NdArrayTensor) -> Option<Words<'_>> {
        match t {
            NdArrayTensor::I32(s) => s.view().to_slice().map(Words::I32),
            NdArrayTensor::I64(s) => s.view().to_slice().map(Words::I64),
            _ => None,
        }
    }
    #[inline]
    fn get(&self, i: usize) -> u32 {
        match self {
            Words::I32(w) => w[i] as u32,
            Words::I64(w) => w[i] as u32,
        }
    }
}

/// Dequantizes rows `r0..r0 + rows` of an `[out, k]` NF4 weight into `buf` (row-major).
fn dequant_rows(words: &Words, absmax: &[f32], k: usize, r0: usize, buf: &mut [f32]) {
    buf.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        let base = (r0 + r) * k;
        for (j, v) in row.iter_mut().enumerate() {
            let i = base + j;
            let code = (words.get(i / 8) >> (4 * (i % 8))) & 0xF;
            *v = NF4_CODE[code as usize] * absmax[i / BLOCK];
        }
    });
}

/// Up to this many input rows (decoding) take the matrix-vector path.
const GEMV_ROWS: usize = 4;

/// `x [m, k] @ dequant(W)^T` for a few rows, decoding the codes on the fly (nothing dense is
/// written; each weight is read once as 4 bits). Each 64-value block is summed against the
/// code table and scaled by its absmax once. Needs `k % 64 == 0` (blocks within rows).
fn nf4_gemv(xs: &[f32], words: &Words, absmax: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m]; // [n, m]: rows of W in parallel
    out_t
        .par_chunks_mut(m * 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (r, o) in chunk.chunks_mut(m).enumerate() {
                let j = c * 16 + r;
                for b in 0..k / BLOCK {
                    let base = j * k + b * BLOCK;
                    let scale = absmax[base / BLOCK];
                    let mut acc = [0f32; GEMV_ROWS];
                    for w in 0..BLOCK / 8 {
                        let word = words.get(base / 8 + w);
                        let kk = b * BLOCK + w * 8;
                        let mut v = [0f32; 8];
                        for (t, v) in v.iter_mut().enumerate() {
                            *v = NF4_CODE[((word >> (4 * t)) & 0xF) as usize];
                        }
                        for (i, a) in acc.iter_mut().enumerate().take(m) {
                            let x = &xs[i * k + kk..i * k + kk + 8];
                            for t in 0..8 {
                                *a += x[t] * v[t];
                            }
                        }
                    }
                    for i in 0..m {
                        o[i] += acc[i] * scale;
                    }
                }
            }
        });
    // [n, m] -> [m, n]
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// `c[m, n] (+)= a[m, k] @ b` where `b` is addressed with strides (rsb, csb).
#[allow(clippy::too_many_arguments)]
fn sgemm(
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
    // SAFETY: matrixmultiply reads a as [m, k] row-major, b as [k, n] with the given (positive)
    // strides and writes c as [m, n] with row stride rsc; the assertions above bound the last
    // element of each, so every access is inside the slices.
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            1,
        );
    }
}

pub(crate) fn output(values: Vec<f32>, shape: [usize; 2]) -> NdArrayTensor {
    let arr: SharedArray<f32> = ndarray::Array::from_shape_vec(ndarray::IxDyn(&shape), values)
        .expect("shape matches")
        .into_shared();
    NdArrayTensor::from(arr)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> Nf4Backend for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let words = Words::of(&packed).expect("packed NF4 codes are a contiguous int tensor");
        let absmax = f32s(&absmax).expect("absmax is f32");
        let mut out = vec![0f32; shape[0] * shape[1]];
        dequant_rows(&words, &absmax, shape[1], 0, &mut out);
        output(out, shape)
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let [n, k] = shape;
        let (Some(xs), Some(words), Some(am)) = (f32s(&x), Words::of(&packed), f32s(&absmax))
        else {
            let w = Self::nf4_dequantize(packed, absmax, shape);
            return Self::frozen_matmul(x, w);
        };
        let m = xs.len() / k;
        if m <= GEMV_ROWS && k % BLOCK == 0 {
            return output(nf4_gemv(&xs, &words, &am, m, n, k), [m, n]);
        }
        let mut out = vec![0f32; m * n];
        let mut buf = vec![0f32; TILE_ROWS.min(n) * k];
        for r0 in (0..n).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(n - r0);
            let tile = &mut buf[..rows * k];
            dequant_rows(&words, &am, k, r0, tile);
            // out[:, r0..r0+rows] = x @ tile^T; tile^T[kk, r] = tile[r * k + kk].
            sgemm(
                m,
                k,
                rows,
                &xs,
                tile,
                1,
                k as isize,
                &mut out[r0..],
                n as isize,
                0.0,
            );
        }
        output(out, [m, n])
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let [n, k] = shape;
        let (Some(dys), Some(words), Some(am)) = (f32s(&dy), Words::of(&packed), f32s(&absmax))
        else {
            let w = Self::nf4_dequantize(packed, absmax, shape);
            return Self::frozen_matmul_t(dy, w);
        };
        let m = dys.len() / n;
        let mut out = vec![0f32; m * k];
        let mut buf = vec![0f32; TILE_ROWS.min(n) * k];
        let mut dy_tile = vec![0f32; m * TILE_ROWS.min(n)];
        for r0 in (0..n).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(n - r0);
            let tile = &mut buf[..rows * k];
            dequant_rows(&words, &am, k, r0, tile);
            // dy[:, r0..r0+rows] as a contiguous [m, rows] block.
            let dt = &mut dy_tile[..m * rows];
            for (i, row) in dt.chunks_mut(rows).enumerate() {
                row.copy_from_slice(&dys[i * n + r0..i * n + r0 + rows]);
            }
            sgemm(
                m, rows, k, dt, tile, k as isize, 1, &mut out, k as isize, 1.0,
            );
        }
        output(out, [m, k])
    }

    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&w);
        let (n, k) = (shape[0], shape[1]);
        let (Some(xs), Some(ws)) = (f32s(&x), f32s(&w)) else {
            return Self::float_matmul(x, Self::float_transpose(w));
        };
        let m = xs.len() / k;
        let mut out = vec![0f32; m * n];
        if m <= 2 {
            // Matrix-vector products: sgemm would pack all of W for a handful of rows.
            for i in 0..m {
                let xr = &xs[i * k..(i + 1) * k];
                out[i * n..(i + 1) * n]
                    .par_chunks_mut(64)
                    .enumerate()
                    .for_each(|(c, chunk)| {
                        for (j, o) in chunk.iter_mut().enumerate() {
                            *o = dot(xr, &ws[(c * 64 + j) * k..][..k]);
                        }
                    });
            }
        } else {
            sgemm(m, k, n, &xs, &ws, 1, k as isize, &mut out, n as isize, 0.0);
        }
        output(out, [m, n])
    }

    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&w);
        let (n, k) = (shape[0], shape[1]);
        let (Some(dys), Some(ws)) = (f32s(&dy), f32s(&w)) else {
            return Self::float_matmul(dy, w);
        };
        let m = dys.len() / n;
        let mut out = vec![0f32; m * k];
        sgemm(m, n, k, &dys, &ws, k as isize, 1, &mut out, k as isize, 0.0);
        output(out, [m, k])
    }
}

/// Dot product with 8 independent accumulators (vectorizes).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
