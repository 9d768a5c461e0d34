//! The language-model cross-entropy on CubeCL. Forward: one cube per row, each thread an online
//! (max, sum of exponentials, argmax) over a strided slice of the vocabulary in f32, combined
//! across the cube through plane operations or shared memory; thread 0 writes the row's nll,
//! log-sum-exp and argmax. Backward: one thread per logit, `(softmax - onehot) * grad`.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use burn_cubecl::kernel::into_contiguous;

use super::{alloc, contiguous_in, elementwise, fixed_plane, per_row, row_threads};

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    nll: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    argmax: &mut Tensor<I>,
    rows: usize,
    vocab: usize,
    #[comptime] threads: usize,
    #[comptime] plane: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    if row >= rows {
        terminate!();
    }
    let t = UNIT_POS_X as usize;
    let base = row * vocab;
    // Below any logit (a finite sentinel: WGSL has no infinity literal).
    let mut m = f32::new(-3.0e38);
    let mut s = 0.0f32;
    let mut best = f32::new(-3.0e38);
    let mut best_i = 0xffff_ffffu32;
    let mut j = t;
    while j < vocab {
        let v = f32::cast_from(logits[base + j]);
        // Strictly greater: the first index wins within a thread (j increases).
        if v > best {
            best = v;
            best_i = j as u32;
        }
        if v > m {
            s = s * f32::exp(m - v) + 1.0;
            m = v;
        } else {
            s += f32::exp(v - m);
        }
        j += threads;
    }

    let mut sm = SharedMemory::<f32>::new(threads);
    let mut ss = SharedMemory::<f32>::new(threads);
    let mut sb = SharedMemory::<f32>::new(threads);
    let mut si = SharedMemory::<u32>::new(threads);
    let mut parts = threads;
    if comptime!(plane > 0) {
        // Within each plane, then one entry per plane in shared memory.
        let top = plane_max(m);
        let sum = plane_sum(s * f32::exp(m - top));
        let b = plane_max(best);
        let mut cand = 0xffff_ffffu32;
        if best == b {
            cand = best_i;
        }
        let bi = plane_min(cand);
        let p = t / plane;
        if UNIT_POS_PLANE == 0 {
            sm[p] = top;
            ss[p] = sum;
            sb[p] = b;
            si[p] = bi;
        }
        parts = comptime!(threads / plane);
    } else {
        sm[t] = m;
        ss[t] = s;
        sb[t] = best;
        si[t] = best_i;
    }
    sync_cube();
    let mut stride = parts / 2;
    while stride > 0 {
        if t < stride {
            // (max, sum of exp(x - max)) of both halves as one.
            let o = t + stride;
            let top = f32::max(sm[t], sm[o]);
            ss[t] = ss[t] * f32::exp(sm[t] - top) + ss[o] * f32::exp(sm[o] - top);
            sm[t] = top;
            if sb[o] > sb[t] || (sb[o] == sb[t] && si[o] < si[t]) {
                sb[t] = sb[o];
                si[t] = si[o];
            }
        }
        sync_cube();
        stride /= 2;
    }
    if t == 0 {
        let l = sm[0] + f32::ln(ss[0]);
        let target = i32::cast_from(targets[row]);
        let mut loss = 0.0f32;
        if target >= 0 {
            loss = l - f32::cast_from(logits[base + usize::cast_from(target)]);
        }
        nll[row] = F::cast_from(loss);
        lse[row] = F::cast_from(l);
        argmax[row] = I::cast_from(si[0]);
    }
}

#[cube(launch)]
fn backward_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    out: &mut Tensor<F>,
    vocab: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let row = pos / vocab;
    let col = pos % vocab;
    let target = i32::cast_from(targets[row]);
    let mut value = 0.0f32;
    if target >= 0 {
        let g = f32::cast_from(grad[row]);
        let mut p = f32::exp(f32::cast_from(logits[pos]) - f32::cast_from(lse[row]));
        if col == usize::cast_from(target) {
            p -= 1.0;
        }
        value = p * g;
    }
    out[pos] = F::cast_from(value);
}

/// `(nll [n], lse [n], argmax [n])` of `logits [n, vocab]` against `targets [n]`.
pub(super) fn forward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let dtype = logits.dtype;
    let (logits, targets) = (contiguous_in(logits, dtype), into_contiguous(targets));
    let shape = logits.meta.shape().clone();
    let (rows, vocab) = (shape[0], shape[1]);
    let (fdt, idt): (DType, DType) = (logits.dtype, targets.dtype);
    let nll = alloc(&logits, &[rows], fdt);
    let lse = alloc(&logits, &[rows], fdt);
    let argmax = alloc(&logits, &[rows], idt);
    let threads = row_threads(&logits);
    let plane = fixed_plane(&logits)
        .map(|p| p as usize)
        .filter(|&p| p <= threads && threads.is_multiple_of(p))
        .unwrap_or(0);
    let client = logits.client.clone();
    forward_kernel::launch::<R>(
        &client,
        per_row(rows),
        CubeDim::new_1d(threads as u32),
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        nll.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        argmax.clone().into_tensor_arg(),
        rows,
        vocab,
        threads,
        plane,
        [fdt.into(), idt.into()],
    );
    (nll, lse, argmax)
}

/// `d nll / d logits` for the upstream `grad [n]`.
pub(super) fn backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let shape = logits.meta.shape().clone();
    let (rows, vocab) = (shape[0], shape[1]);
    let (fdt, idt) = (logits.dtype, targets.dtype);
    let (logits, targets) = (contiguous_in(logits, fdt), into_contiguous(targets));
    let (lse, grad) = (contiguous_in(lse, fdt), contiguous_in(grad, fdt));
    let out = alloc(&logits, &[rows, vocab], fdt);
    let (count, dim) = elementwise(&logits, rows * vocab);
    let client = logits.client.clone();
    backward_kernel::launch::<R>(
        &client,
        count,
        dim,
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        vocab,
        [fdt.into(), idt.into()],
    );
    out
}
