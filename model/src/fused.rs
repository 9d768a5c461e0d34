//! Fused element-wise work, as a backend extension. Burn's tensor-op forms walk their tensors
//! once per op and allocate a temporary each time (and as many again in the backward); these
//! read the input once forward and once backward:
//!
//! - the language-model cross-entropy over the vocabulary (log-softmax + gather, whose
//!   backwards are a scatter into zeros and a slice-assign, over `[tokens, vocab]`);
//! - `gelu_new`;
//! - the rotary embedding (the backward is the rotation by the negated angles);
//! - dropout, with a mask that is a hash of a seed and the element index (the backward
//!   re-derives it instead of storing it).
//!
//! [`FusedOps`] has default implementations from Burn's tensor ops (what the CubeCL backends
//! use; `reference*` below, also what the kernels are tested against); `NdArray` has one-pass
//! kernels, rows or chunks in parallel; `Autodiff<B>` has hand-written backwards.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorPrimitive};
use rayon::prelude::*;

/// Per-row results of [`FusedOps::cross_entropy`].
pub struct CrossEntropy<B: Backend> {
    /// `-log softmax(logits)[target]`, 0 where the target is negative (ignored), `[n]`.
    pub nll: FloatTensor<B>,
    /// `log sum exp(logits)`, `[n]` (what the backward needs).
    pub lse: FloatTensor<B>,
    /// Index of the largest logit (the first on ties), `[n]`.
    pub argmax: IntTensor<B>,
}

pub trait FusedOps: Backend {
    /// Cross-entropy of f32 `logits [n, vocab]` against `targets [n]`; a negative target is
    /// ignored. Only `nll` is differentiable (with respect to the logits).
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        reference::cross_entropy::<Self>(logits, targets)
    }

    /// `d nll / d logits` for an upstream gradient `grad [n]`:
    /// `(softmax(logits) - onehot(target)) * grad`, rows with a negative target zero.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::cross_entropy_backward::<Self>(logits, targets, lse, grad)
    }

    /// `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, element-wise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::gelu_tanh::<Self>(x)
    }

    /// `grad * gelu_tanh'(x)`.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::gelu_tanh_backward::<Self>(x, grad)
    }

    /// Rotary embedding of `x [batch, seq, heads, head_dim]` with `cos`/`sin` tables
    /// `[seq, dim]` (HF's rotate_half layout on the first `dim` channels of each head; the rest
    /// pass through). `inverse` rotates by the negated angles: the backward of the forward.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        reference::rope::<Self>(x, cos, sin, inverse)
    }

    /// Whether [`FusedOps::dropout_seeded`] is implemented (else dropout uses Burn's ops).
    fn has_seeded_dropout() -> bool {
        false
    }

    /// Inverted dropout whose mask is a hash of `(seed, element index)`: `x / (1 - p)` where
    /// kept, 0 elsewhere. The same seed gives the same mask, so the backward is this op applied
    /// to the gradient and no mask is stored.
    fn dropout_seeded(x: FloatTensor<Self>, _p: f64, _seed: u64) -> FloatTensor<Self> {
        x
    }
}

/// Rotary embedding of `x [batch, seq, heads, head_dim]`; see [`FusedOps::rope`].
pub fn rope<B: FusedOps>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::rope(
        x.into_primitive().tensor(),
        cos.clone().into_primitive().tensor(),
        sin.clone().into_primitive().tensor(),
        false,
    )))
}

/// Training-time dropout (identity outside autodiff or for `p == 0`), as Burn's `Dropout`.
pub fn dropout<B: FusedOps, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if p == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    if B::has_seeded_dropout() {
        // The seed comes from the backend's generator, so `B::seed` makes masks reproducible.
        let draws = Tensor::<B, 1>::random(
            [2],
            burn::tensor::Distribution::Uniform(0.0, 16_777_216.0),
            &x.device(),
        )
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default();
        let seed = draws.iter().fold(0u64, |s, &d| (s << 24) | d as u64);
        return Tensor::from_primitive(TensorPrimitive::Float(B::dropout_seeded(
            x.into_primitive().tensor(),
            p,
            seed,
        )));
    }
    burn::nn::DropoutConfig::new(p).init().forward(x)
}

/// `gelu_new` (the tanh approximation), any shape.
pub fn gelu_tanh<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gelu_tanh(
        x.into_primitive().tensor(),
    )))
}

/// Cross-entropy over the last dimension: `(nll [n], argmax [n])` for `logits [n, vocab]`.
pub fn cross_entropy<B: FusedOps>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let out = B::cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    (
        Tensor::from_primitive(TensorPrimitive::Float(out.nll)),
        Tensor::from_primitive(out.argmax),
    )
}

/// The tensor-op form: the definition the fused kernels are tested against.
pub mod reference {
    pub use super::reference_gelu::{gelu_tanh, gelu_tanh_backward};
    pub use super::reference_rope::rope;
    use super::*;

    fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    pub fn cross_entropy<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> CrossEntropy<B> {
        let logits: Tensor<B, 2> = float(logits);
        let targets: Tensor<B, 1, Int> = Tensor::from_primitive(targets);
        let [n, _] = logits.dims();
        let max = logits.clone().max_dim(1);
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let keep = targets
            .clone()
            .greater_equal_elem(0)
            .float()
            .reshape([n, 1]);
        let picked = logits
            .clone()
            .gather(1, targets.clamp_min(0).reshape([n, 1]));
        let nll = (lse.clone() - picked) * keep;
        CrossEntropy {
            nll: nll.reshape([n]).into_primitive().tensor(),
            lse: lse.reshape([n]).into_primitive().tensor(),
            argmax: logits.argmax(1).reshape([n]).into_primitive(),
        }
    }

    pub fn cross_entropy_backward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let logits: Tensor<B, 2> = float(logits);
        let targets: Tensor<B, 1, Int> = Tensor::from_primitive(targets);
        let [n, _] = logits.dims();
        let keep = targets.clone().greater_equal_elem(0).float();
        let g = (float::<B, 1>(grad) * keep).reshape([n, 1]);
        let lse = float::<B, 1>(lse).reshape([n, 1]);
        let softmax = (logits - lse).exp() * g.clone();
        softmax
            .scatter(
                1,
                targets.clamp_min(0).reshape([n, 1]),
                g.neg(),
                IndexingUpdateOp::Add,
            )
            .into_primitive()
            .tensor()
    }
}

/// `sqrt(2 / pi)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

pub mod reference_rope {
    use super::*;

    pub fn rope<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
        inverse: bool,
    ) -> FloatTensor<B> {
        let x: Tensor<B, 4> = Tensor::from_primitive(TensorPrimitive::Float(x));
        let cos: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(cos));
        let sin: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(sin));
        let sin = if inverse { sin.neg() } else { sin };
        let [_, s, _, head_dim] = x.dims();
        let dim = cos.dims()[1];
        let half = dim / 2;
        let x_rot = x.clone().narrow(3, 0, dim);
        let x1 = x_rot.clone().narrow(3, 0, half);
        let x2 = x_rot.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.reshape([1, s, 1, dim]);
        let sin = sin.reshape([1, s, 1, dim]);
        let out = x_rot * cos + rotated * sin;
        let out = if dim == head_dim {
            out
        } else {
            Tensor::cat(vec![out, x.narrow(3, dim, head_dim - dim)], 3)
        };
        out.into_primitive().tensor()
    }
}

pub mod reference_gelu {
    use super::*;

    fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
        let n = burn::tensor::TensorMetadata::shape(&t).num_elements();
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).reshape([n])
    }

    fn back<B: Backend>(t: Tensor<B, 1>, like: &FloatTensor<B>) -> FloatTensor<B> {
        let shape = burn::tensor::TensorMetadata::shape(like);
        B::float_reshape(t.into_primitive().tensor(), shape)
    }

    pub fn gelu_tanh<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let like = x.clone();
        let y = burn::tensor::activation::gelu_approximate(float::<B>(x));
        back(y, &like)
    }

    pub fn gelu_tanh_backward<B: Backend>(
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let like = x.clone();
        let x = float::<B>(x);
        let x2 = x.clone() * x.clone();
        let t = ((x.clone() + x2.clone() * x.clone() * GELU_C) * SQRT_2_OVER_PI).tanh();
        let dt = (t.clone() * t.clone()).neg() + 1.0;
        let du = (x2 * (3.0 * GELU_C) + 1.0) * SQRT_2_OVER_PI;
        let d = (t + 1.0) * 0.5 + x * dt * du * 0.5;
        back(d * float::<B>(grad), &like)
    }
}

// ---------------------------------------------------------------------------------------------
// NdArray: one pass over each row forward, one backward.

/// `tanh(u)` through [`exp_neg`] (vectorizes; within a few ulps of `f32::tanh`).
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    let e = exp_neg(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

#[inline(always)]
fn gelu_parts(x: f32) -> (f32, f32) {
    let t = tanh_fast(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    (0.5 * x * (1.0 + t), t)
}

/// `e^x` for `x <= 0` to within a few ulps (Cephes' `expf` polynomial), written branch-free so
/// the row loops vectorize; results below `e^-87.3` flush to (nearly) zero.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.3);
    // Round to nearest through the float mantissa (vectorizes, unlike `round`).
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * y
}

/// `(nll, lse, argmax)` of one row.
fn row_forward(row: &[f32], target: i64) -> (f32, f32, usize) {
    let (mut max, mut arg, mut nan) = (f32::NEG_INFINITY, 0usize, false);
    for (j, &x) in row.iter().enumerate() {
        nan |= x.is_nan();
        if x > max {
            max = x;
            arg = j;
        }
    }
    let mut acc = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += exp_neg(c[l] - max);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &x in rest {
        sum += exp_neg(x - max);
    }
    let lse = if nan || !max.is_finite() {
        f32::NAN
    } else {
        max + sum.ln()
    };
    let nll = if target < 0 {
        0.0
    } else {
        lse - row[target as usize]
    };
    (nll, lse, arg)
}

fn ints(t: &NdArrayTensor) -> Option<Vec<i64>> {
    match t {
        NdArrayTensor::I64(s) => Some(s.view().iter().copied().collect()),
        NdArrayTensor::I32(s) => Some(s.view().iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

fn shared<T: Clone>(values: Vec<T>, shape: &[usize]) -> SharedArray<T> {
    ndarray::Array::from_shape_vec(ndarray::IxDyn(shape), values)
        .expect("shape matches")
        .into_shared()
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FusedOps for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&logits);
        let v = shape[1];
        let (Some(xs), Some(ts)) = (crate::nf4::ndarray::f32s(&logits), ints(&targets)) else {
            return reference::cross_entropy::<Self>(logits, targets);
        };
        let rows: Vec<(f32, f32, usize)> = xs
            .par_chunks(v)
            .zip(ts.par_iter())
            .map(|(row, &t)| row_forward(row, t))
            .collect();
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

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&logits);
        let v = shape[1];
        let f32s = crate::nf4::ndarray::f32s;
        let (Some(xs), Some(ts), Some(lse_s), Some(gs)) =
            (f32s(&logits), ints(&targets), f32s(&lse), f32s(&grad))
        else {
            return reference::cross_entropy_backward::<Self>(logits, targets, lse, grad);
        };
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(v)
            .zip(xs.par_chunks(v))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let t = ts[r];
                if t < 0 {
                    return; // zeros
                }
                let (l, g) = (lse_s[r], gs[r]);
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = exp_neg(x - l) * g;
                }
                o[t as usize] -= g;
            });
        crate::nf4::ndarray::output(out, [xs.len() / v, v])
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&x);
        let Some(xs) = crate::nf4::ndarray::f32s(&x) else {
            return reference::gelu_tanh::<Self>(x);
        };
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(4096)
            .zip(xs.par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = gelu_parts(x).0;
                }
            });
        shaped(out, &shape)
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&x);
        let f32s = crate::nf4::ndarray::f32s;
        let (Some(xs), Some(gs)) = (f32s(&x), f32s(&grad)) else {
            return reference::gelu_tanh_backward::<Self>(x, grad);
        };
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(4096)
            .zip(xs.par_chunks(4096).zip(gs.par_chunks(4096)))
            .for_each(|(o, (x, g))| {
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    let (_, t) = gelu_parts(x);
                    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                    *o = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
                }
            });
        shaped(out, &shape)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&x);
        let f32s = crate::nf4::ndarray::f32s;
        let (Some(xs), Some(cs), Some(ss)) = (f32s(&x), f32s(&cos), f32s(&sin)) else {
            return reference::rope::<Self>(x, cos, sin, inverse);
        };
        let (seq, heads, hd) = (shape[1], shape[2], shape[3]);
        let dim = cs.len() / seq.max(1);
        let half = dim / 2;
        let sign = if inverse { -1.0f32 } else { 1.0 };
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(hd)
            .zip(xs.par_chunks(hd))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let p = (r / heads) % seq;
                let (c, sn) = (&cs[p * dim..(p + 1) * dim], &ss[p * dim..(p + 1) * dim]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    o[i] = x1 * c[i] - x2 * sn[i] * sign;
                    o[i + half] = x2 * c[i + half] + x1 * sn[i + half] * sign;
                }
                o[dim..].copy_from_slice(&x[dim..]);
            });
        shaped(out, &shape)
    }

    fn has_seeded_dropout() -> bool {
        true
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        let shape = burn::tensor::TensorMetadata::shape(&x);
        let Some(xs) = crate::nf4::ndarray::f32s(&x) else {
            return x; // not f32: never built that way (models run f32 on the CPU)
        };
        let threshold = (p * (1u64 << 24) as f64) as u64;
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(4096)
            .zip(xs.par_chunks(4096))
            .enumerate()
            .for_each(|(c, (o, x))| {
                for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                    let keep = mask_draw(seed, (c * 4096 + j) as u64) >= threshold;
                    *o = if keep { x * scale } else { 0.0 };
                }
            });
        shaped(out, &shape)
    }
}

/// 24 uniform bits for element `i` under `seed` (SplitMix64's finalizer).
#[inline(always)]
fn mask_draw(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 40
}

fn shaped(values: Vec<f32>, shape: &burn::tensor::Shape) -> NdArrayTensor {
    NdArrayTensor::from(shared(values, shape.as_slice()))
}

// ---------------------------------------------------------------------------------------------
// Autodiff: only the nll is tracked; the state is the logits and the per-row log-sum-exp.

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: FusedOps> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, targets, lse) = ops.state;
        if let Some(node) = node_logits {
            let g = B::cross_entropy_backward(logits, targets, lse, grad);
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FusedOps> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rope(grad, cos, sin, true));
        }
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl<B: FusedOps> Backward<B, 1> for DropoutBackward {
    type State = (f64, u64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (p, seed) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::dropout_seeded(grad, p, seed));
        }
    }
}

#[derive(Debug)]
struct GeluTanhBackward;

impl<B: FusedOps> Backward<B, 1> for GeluTanhBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::gelu_tanh_backward(ops.state, grad));
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        let inner = B::cross_entropy(logits.primitive.clone(), targets.clone());
        let lse = Self::from_inner(inner.lse.clone());
        let nll = match CrossEntropyBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((logits.primitive, targets, inner.lse), inner.nll)
            }
            OpsKind::UnTracked(prep) => prep.finish(inner.nll),
        };
        CrossEntropy {
            nll,
            lse,
            argmax: inner.argmax,
        }
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::cross_entropy_backward(
            Self::inner(logits),
            targets,
            Self::inner(lse),
            Self::inner(grad),
        ))
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluTanhBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::gelu_tanh(x.primitive.clone());
                prep.finish(x.primitive, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.primitive)),
        }
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::gelu_tanh_backward(Self::inner(x), Self::inner(grad)))
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (Self::inner(cos), Self::inner(sin));
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rope(x.primitive, cos.clone(), sin.clone(), inverse);
                // The inverse of a rotation by `inverse` is one by `!inverse`.
                if inverse {
                    let neg = B::float_neg(sin);
                    prep.finish((cos, neg), out)
                } else {
                    prep.finish((cos, sin), out)
                }
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin, inverse)),
        }
    }

    fn has_seeded_dropout() -> bool {
        B::has_seeded_dropout()
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        match DropoutBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::dropout_seeded(x.primitive, p, seed);
                prep.finish((p, seed), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dropout_seeded(x.primitive, p, seed)),
        }
    }
}

#[cfg(feature = "cube")]
mod cube_impls {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    use super::FusedOps;

    // The tensor-op form; a CubeCL kernel is future work (issue 7's GPU profile decides).
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps
        for CubeBackend<R, F, I, BT>
    {
    }
    impl<B: FusionBackend + FusedOps> FusedOps for Fusion<B> {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type B = NdArray<f32>;
    type AB = Autodiff<B>;

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

    fn case(n: usize, v: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
        let dev = Default::default();
        <B as Backend>::seed(&dev, 7);
        let logits = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &dev);
        let t: Vec<i64> = (0..n as i64)
            .map(|i| {
                if i % 5 == 3 {
                    -100
                } else {
                    (i * 7919) % v as i64
                }
            })
            .collect();
        (logits, Tensor::from_data(TensorData::new(t, [n]), &dev))
    }

    #[test]
    fn fused_forward_and_backward_match_the_tensor_op_form() {
        let (logits, targets) = case(37, 1003);
        let fused = B::cross_entropy(
            logits.clone().into_primitive().tensor(),
            targets.clone().into_primitive(),
        );
        let refr = reference::cross_entropy::<B>(
            logits.clone().into_primitive().tensor(),
            targets.clone().into_primitive(),
        );
        let f = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).into_data();
        f(fused.nll).assert_approx_eq::<f32>(&f(refr.nll), Tolerance::absolute(2e-5));
        f(fused.lse.clone())
            .assert_approx_eq::<f32>(&f(refr.lse.clone()), Tolerance::absolute(2e-5));
        Tensor::<B, 1, Int>::from_primitive(fused.argmax)
            .into_data()
            .assert_eq(
                &Tensor::<B, 1, Int>::from_primitive(refr.argmax).into_data(),
                true,
            );
        let g: Tensor<B, 1> =
            Tensor::random([37], Distribution::Uniform(-1.0, 1.0), &Default::default());
        let args = || {
            (
                logits.clone().into_primitive().tensor(),
                targets.clone().into_primitive(),
                refr.lse.clone(),
                g.clone().into_primitive().tensor(),
            )
        };
        let (a, b, c, d) = args();
        let fused = B::cross_entropy_backward(a, b, c, d);
        let (a, b, c, d) = args();
        let refr = reference::cross_entropy_backward::<B>(a, b, c, d);
        let f = |t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).into_data();
        f(fused).assert_approx_eq::<f32>(&f(refr), Tolerance::absolute(1e-6));
    }

    #[test]
    fn autodiff_gradient_matches_log_softmax() {
        let (logits, targets) = case(12, 257);
        let dev = Default::default();
        let x = Tensor::<AB, 2>::from_data(logits.into_data(), &dev).require_grad();
        let t = Tensor::<AB, 1, Int>::from_data(targets.clone().into_data(), &dev);
        let (nll, _) = cross_entropy(x.clone(), t);
        let w: Tensor<AB, 1> = Tensor::arange(1..13, &dev).float();
        let grads = (nll.clone() * w.clone()).sum().backward();
        let fused = x.grad(&grads).unwrap();

        let y = Tensor::<AB, 2>::from_data(x.clone().into_data(), &dev).require_grad();
        let logp = burn::tensor::activation::log_softmax(y.clone(), 1);
        let keep = t_keep(&targets);
        let picked = logp
            .gather(
                1,
                Tensor::<AB, 1, Int>::from_data(targets.clone().clamp_min(0).into_data(), &dev)
                    .reshape([12, 1]),
            )
            .reshape([12]);
        let expected_nll = picked.neg() * Tensor::<AB, 1>::from_data(keep.into_data(), &dev);
        nll.into_data()
            .assert_approx_eq::<f32>(&expected_nll.clone().into_data(), Tolerance::absolute(2e-5));
        let grads = (expected_nll * w).sum().backward();
        fused.into_data().assert_approx_eq::<f32>(
            &y.grad(&grads).unwrap().into_data(),
            // f32 rounding of values up to ~12 (the weights): a few ulps.
            Tolerance::rel_abs(2e-6, 1e-6),
        );
    }

    fn t_keep(t: &Tensor<B, 1, Int>) -> Tensor<B, 1> {
        t.clone().greater_equal_elem(0).float()
    }

    #[test]
    fn fused_gelu_matches_burns_gelu_approximate_and_its_gradient() {
        let dev = Default::default();
        <B as Backend>::seed(&dev, 3);
        let x = Tensor::<B, 3>::random([3, 5, 701], Distribution::Normal(0.0, 3.0), &dev);
        let w = Tensor::<B, 3>::random([3, 5, 701], Distribution::Uniform(-1.0, 1.0), &dev);
        let ours = |x: Tensor<B, 3>| {
            let x = Tensor::<AB, 3>::from_data(x.into_data(), &dev).require_grad();
            let y = gelu_tanh(x.clone());
            let g = (y.clone() * Tensor::from_data(w.clone().into_data(), &dev))
                .sum()
                .backward();
            (y.into_data(), x.grad(&g).unwrap().into_data())
        };
        let burns = |x: Tensor<B, 3>| {
            let x = Tensor::<AB, 3>::from_data(x.into_data(), &dev).require_grad();
            let y = burn::tensor::activation::gelu_approximate(x.clone());
            let g = (y.clone() * Tensor::from_data(w.clone().into_data(), &dev))
                .sum()
                .backward();
            (y.into_data(), x.grad(&g).unwrap().into_data())
        };
        let (y1, g1) = ours(x.clone());
        let (y2, g2) = burns(x.clone());
        let tol = Tolerance::rel_abs(1e-5, 1e-6);
        y1.assert_approx_eq::<f32>(&y2, tol);
        g1.assert_approx_eq::<f32>(&g2, tol);
        // The tensor-op backward (what the CubeCL backends run) agrees too.
        let refr = reference::gelu_tanh_backward::<B>(
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
        );
        Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(refr))
            .into_data()
            .assert_approx_eq::<f32>(&g1, tol);
    }

    #[test]
    fn fused_rope_and_its_gradient_match_the_tensor_op_form() {
        let dev = Default::default();
        <B as Backend>::seed(&dev, 9);
        let rot = crate::rotary::RotaryEmbedding::new(8, 10000.0);
        for head_dim in [8, 12] {
            let (cos, sin) = rot.tables::<AB>(3, 5, &dev);
            let x =
                Tensor::<AB, 4>::random([2, 5, 3, head_dim], Distribution::Normal(0.0, 1.0), &dev)
                    .require_grad();
            let w =
                Tensor::<AB, 4>::random([2, 5, 3, head_dim], Distribution::Normal(0.0, 1.0), &dev);
            let y = rope(x.clone(), &cos, &sin);
            let g = x.grad(&(y.clone() * w.clone()).sum().backward()).unwrap();
            let x2 = x.clone().detach().require_grad();
            let y2: Tensor<AB, 4> =
                Tensor::from_primitive(TensorPrimitive::Float(reference::rope::<AB>(
                    x2.clone().into_primitive().tensor(),
                    cos.clone().into_primitive().tensor(),
                    sin.clone().into_primitive().tensor(),
                    false,
                )));
            let g2 = x2.grad(&(y2.clone() * w).sum().backward()).unwrap();
            let tol = Tolerance::absolute(1e-5);
            y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            g.into_data().assert_approx_eq::<f32>(&g2.into_data(), tol);
        }
    }

    #[test]
    fn seeded_dropout_keeps_1_minus_p_scales_and_backpropagates_its_own_mask() {
        let dev = Default::default();
        let x = Tensor::<AB, 2>::ones([64, 1000], &dev).require_grad();
        <AB as Backend>::seed(&dev, 11);
        let y = dropout(x.clone(), 0.1);
        let ys = y.clone().into_data().into_vec::<f32>().unwrap();
        let kept = ys.iter().filter(|&&v| v != 0.0).count() as f64 / ys.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(ys.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // d(sum(y * w))/dx = w * mask / (1 - p): zero exactly where y is.
        let w = Tensor::<AB, 2>::random([64, 1000], Distribution::Uniform(1.0, 2.0), &dev);
        let g = x.grad(&(y * w.clone()).sum().backward()).unwrap();
        let (gs, ws) = (
            g.into_data().into_vec::<f32>().unwrap(),
            w.into_data().into_vec::<f32>().unwrap(),
        );
        for ((g, y), w) in gs.iter().zip(&ys).zip(&ws) {
            assert!((g - y * w).abs() < 1e-5, "{g} vs {}", y * w);
        }
        // The backend's seed reproduces the mask; another seed changes it.
        <AB as Backend>::seed(&dev, 11);
        assert_eq!(
            dropout(x.clone(), 0.1)
                .into_data()
                .into_vec::<f32>()
                .unwrap(),
            ys
        );
        <AB as Backend>::seed(&dev, 12);
        assert_ne!(
            dropout(x.clone(), 0.1)
                .into_data()
                .into_vec::<f32>()
                .unwrap(),
            ys
        );
        // Identity without autodiff, and for p = 0.
        let plain = Tensor::<B, 2>::ones([4, 4], &dev);
        assert_eq!(dropout(plain.clone(), 0.5).into_data(), plain.into_data());
        let z = dropout(x.clone(), 0.0);
        assert_eq!(z.into_data(), x.into_data());
    }

    #[test]
    fn nan_logits_give_nan_loss() {
        let (logits, targets) = case(4, 64);
        let logits = logits.slice_assign(
            [1..2, 5..6],
            Tensor::from_data([[f32::NAN]], &Default::default()),
        );
        let out = B::cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
        let nll = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out.nll))
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        assert!(nll[1].is_nan() && nll[0].is_finite(), "{nll:?}");
    }
}
