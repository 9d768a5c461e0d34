//! The CPU backend (Burn's `NdArray`): plain Rust over the backend's buffers (no copies of the
//! weights), multi-threaded with rayon. This file moves tensors in and out of slices; each
//! op's kernel is in its own file. A tensor that is not f32 (never built that way: models run
//! f32 on the CPU) falls back to the tensor-op form.

mod cross_entropy;
mod dropout;
mod gelu;
mod head;
mod lora;
mod math;
mod matmul;
mod nf4;
mod rope;
mod simd;
mod softmax;

use std::borrow::Cow;

use burn::backend::NdArray;
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::ops::{BoolTensor, FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{ElementConversion, TensorMetadata};

use self::nf4::Words;
use super::{CrossEntropy, FusedOps, Nf4Backend, reference};

/// Row-major f32 values of a tensor (a view when already contiguous f32).
fn f32s(t: &NdArrayTensor) -> Option<Cow<'_, [f32]>> {
    match t {
        NdArrayTensor::F32(s) => {
            let v = s.view();
            Some(match v.to_slice() {
                Some(sl) => Cow::Borrowed(sl),
                None => Cow::Owned(row_major(v)),
            })
        }
        _ => None,
    }
}

/// The values of a strided view in row-major order, a last-axis lane at a time (iterating
/// element by element over a dynamic-rank view costs several nanoseconds per value).
fn row_major<T: Copy>(v: ::ndarray::ArrayViewD<'_, T>) -> Vec<T> {
    if v.ndim() == 0 {
        return v.iter().copied().collect();
    }
    let mut out = Vec::with_capacity(v.len());
    for lane in v.rows() {
        match lane.as_slice() {
            Some(values) => out.extend_from_slice(values),
            None => out.extend(lane.iter().copied()),
        }
    }
    out
}

/// Row-major values of a bool tensor.
fn bools(t: &NdArrayTensor) -> Option<Cow<'_, [bool]>> {
    match t {
        NdArrayTensor::Bool(s) => {
            let v = s.view();
            Some(match v.to_slice() {
                Some(sl) => Cow::Borrowed(sl),
                None => Cow::Owned(row_major(v)),
            })
        }
        _ => None,
    }
}

fn ints(t: &NdArrayTensor) -> Option<Vec<i64>> {
    match t {
        NdArrayTensor::I64(s) => Some(s.view().iter().copied().collect()),
        NdArrayTensor::I32(s) => Some(s.view().iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

fn words(t: &NdArrayTensor) -> Option<Words<'_>> {
    match t {
        NdArrayTensor::I32(s) => s.view().to_slice().map(Words::I32),
        NdArrayTensor::I64(s) => s.view().to_slice().map(Words::I64),
        _ => None,
    }
}

fn shared<T: Clone>(values: Vec<T>, shape: &[usize]) -> SharedArray<T> {
    ::ndarray::Array::from_shape_vec(::ndarray::IxDyn(shape), values)
        .expect("shape matches")
        .into_shared()
}

/// An f32 tensor of `shape` holding `values`.
fn output(values: Vec<f32>, shape: &[usize]) -> NdArrayTensor {
    NdArrayTensor::from(shared(values, shape))
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
        let words = words(&packed).expect("packed NF4 codes are a contiguous int tensor");
        let absmax = f32s(&absmax).expect("absmax is f32");
        output(nf4::dequantize(&words, &absmax, shape), &shape)
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let (Some(xs), Some(w), Some(am)) = (f32s(&x), words(&packed), f32s(&absmax)) else {
            let w = Self::nf4_dequantize(packed, absmax, shape);
            return Self::frozen_matmul(x, w);
        };
        let m = xs.len() / shape[1];
        output(nf4::matmul(&xs, &w, &am, shape), &[m, shape[0]])
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let (Some(dys), Some(w), Some(am)) = (f32s(&dy), words(&packed), f32s(&absmax)) else {
            let w = Self::nf4_dequantize(packed, absmax, shape);
            return Self::frozen_matmul_t(dy, w);
        };
        let m = dys.len() / shape[0];
        output(nf4::matmul_t(&dys, &w, &am, shape), &[m, shape[1]])
    }

    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = w.shape();
        let (n, k) = (shape[0], shape[1]);
        let (Some(xs), Some(ws)) = (f32s(&x), f32s(&w)) else {
            return Self::float_matmul(x, Self::float_transpose(w));
        };
        let m = xs.len() / k;
        output(matmul::frozen_matmul(&xs, &ws, m, n, k), &[m, n])
    }

    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = w.shape();
        let (n, k) = (shape[0], shape[1]);
        let (Some(dys), Some(ws)) = (f32s(&dy), f32s(&w)) else {
            return Self::float_matmul(dy, w);
        };
        let m = dys.len() / n;
        output(matmul::frozen_matmul_t(&dys, &ws, m, n, k), &[m, k])
    }

    fn head_cross_entropy(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> CrossEntropy<Self> {
        match fused_head::<E, I, Q>(&h, &w, bias.as_ref(), &targets, chunk, false) {
            Some((ce, _)) => ce,
            None => reference::head_cross_entropy::<Self>(h, w, bias, targets, chunk),
        }
    }

    fn head_cross_entropy_with_grad(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (CrossEntropy<Self>, FloatTensor<Self>) {
        match fused_head::<E, I, Q>(&h, &w, bias.as_ref(), &targets, chunk, true) {
            Some((ce, dh)) => (ce, dh.expect("requested")),
            None => reference::head_cross_entropy_with_grad::<Self>(h, w, bias, targets, chunk),
        }
    }
}

/// The fused CPU head ([`head::head`]) over f32 tensors; `None` for any other dtype.
#[allow(clippy::type_complexity)]
fn fused_head<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement>(
    h: &NdArrayTensor,
    w: &NdArrayTensor,
    bias: Option<&NdArrayTensor>,
    targets: &NdArrayTensor,
    chunk: usize,
    grad: bool,
) -> Option<(CrossEntropy<NdArray<E, I, Q>>, Option<NdArrayTensor>)>
where
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    let (hs, ws, ts) = (f32s(h)?, f32s(w)?, ints(targets)?);
    let bias = match bias {
        Some(b) => Some(f32s(b)?),
        None => None,
    };
    let hidden = w.shape()[1];
    let out = head::head(&hs, &ws, bias.as_deref(), &ts, chunk, grad);
    let dh = out.dh.map(|dh| output(dh, &[ts.len(), hidden]));
    Some((per_row(&out.rows), dh))
}

/// [`CrossEntropy`] from `(nll, lse, argmax)` per row.
fn per_row<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement>(
    rows: &[(f32, f32, usize)],
) -> CrossEntropy<NdArray<E, I, Q>>
where
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    let n = rows.len();
    let nll = rows.iter().map(|r| r.0.elem::<E>()).collect();
    let lse = rows.iter().map(|r| r.1.elem::<E>()).collect();
    let arg = rows.iter().map(|r| (r.2 as i64).elem::<I>()).collect();
    CrossEntropy {
        nll: shared(nll, &[n]).into(),
        lse: shared(lse, &[n]).into(),
        argmax: shared(arg, &[n]).into(),
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedOps for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        let vocab = logits.shape()[1];
        let (Some(xs), Some(ts)) = (f32s(&logits), ints(&targets)) else {
            return reference::cross_entropy::<Self>(logits, targets);
        };
        per_row(&cross_entropy::forward(&xs, &ts, vocab))
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let vocab = logits.shape()[1];
        let (Some(xs), Some(ts), Some(ls), Some(gs)) =
            (f32s(&logits), ints(&targets), f32s(&lse), f32s(&grad))
        else {
            return reference::cross_entropy_backward::<Self>(logits, targets, lse, grad);
        };
        let out = cross_entropy::backward(&xs, &ts, &ls, &gs, vocab);
        output(out, &[xs.len() / vocab, vocab])
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(xs) = f32s(&x) else {
            return reference::gelu_tanh::<Self>(x);
        };
        output(gelu::forward(&xs), x.shape().as_slice())
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(xs), Some(gs)) = (f32s(&x), f32s(&grad)) else {
            return reference::gelu_tanh_backward::<Self>(x, grad);
        };
        output(gelu::backward(&xs, &gs), x.shape().as_slice())
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let shape = x.shape();
        let (Some(xs), Some(cs), Some(ss)) = (f32s(&x), f32s(&cos), f32s(&sin)) else {
            return reference::rope::<Self>(x, cos, sin, inverse);
        };
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        let table = [cos.shape()[0], cos.shape()[1]];
        output(rope::rotate(&xs, &cs, &ss, dims, table, inverse), &dims)
    }

    fn attention_softmax(
        scores: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let shape = scores.shape();
        let bools = mask.as_ref().map(bools);
        let (Some(xs), true) = (f32s(&scores), bools.as_ref().is_none_or(Option::is_some)) else {
            return reference::attention_softmax::<Self>(scores, mask, scale);
        };
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        let mask = match (&mask, &bools) {
            (Some(m), Some(Some(values))) => Some(softmax::Mask {
                values,
                per_batch: m.shape()[0] != 1,
            }),
            _ => None,
        };
        output(softmax::forward(&xs, mask, scale as f32, dims), &dims)
    }

    fn lora_add(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (ys, xs, as_, bs) = (f32s(&y), f32s(&x), f32s(&a), f32s(&b));
        let (Some(ys), Some(xs), Some(as_), Some(bs)) = (ys, xs, as_, bs) else {
            return reference::lora_add::<Self>(y, x, a, b, scale);
        };
        let shape = y.shape();
        let r = a.shape()[1];
        let values = lora::add(ys.into_owned(), &xs, &as_, &bs, r, scale as f32);
        output(values, shape.as_slice())
    }

    fn attention_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let shape = probs.shape();
        let (Some(ps), Some(gs)) = (f32s(&probs), f32s(&grad)) else {
            return reference::attention_softmax_backward::<Self>(probs, grad, scale);
        };
        let k = shape[shape.num_dims() - 1];
        output(
            softmax::backward(&ps, &gs, scale as f32, k),
            shape.as_slice(),
        )
    }

    fn has_seeded_dropout() -> bool {
        true
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        let Some(xs) = f32s(&x) else {
            return x;
        };
        output(dropout::apply(&xs, p, seed), x.shape().as_slice())
    }
}
