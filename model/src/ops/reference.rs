//! The tensor-op forms of the fused ops, from Burn's generic tensor ops: the defaults of
//! [`FusedOps`](super::FusedOps) (what a backend without its own kernel runs) and the
//! definitions the kernels are tested against.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorMetadata, TensorPrimitive};

use super::CrossEntropy;

/// `sqrt(2 / pi)`.
pub(crate) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of `gelu_new`.
pub(crate) const GELU_C: f32 = 0.044_715;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub fn cross_entropy<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> CrossEntropy<B> {
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

pub fn attention_softmax<B: Backend>(
    scores: FloatTensor<B>,
    mask: Option<BoolTensor<B>>,
    scale: f64,
) -> FloatTensor<B> {
    let scores: Tensor<B, 4> = float::<B, 4>(scores).mul_scalar(scale);
    let scores = match mask {
        Some(mask) => {
            let shape = scores.shape();
            let mask: Tensor<B, 3, Bool> = Tensor::from_primitive(mask);
            scores.mask_fill(mask.unsqueeze_dim::<4>(1).expand(shape), f32::NEG_INFINITY)
        }
        None => scores,
    };
    softmax(scores, 3).into_primitive().tensor()
}

pub fn attention_softmax_backward<B: Backend>(
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let p: Tensor<B, 4> = float(probs);
    let gp = p.clone() * float::<B, 4>(grad);
    let dot = gp.clone().sum_dim(3);
    ((gp - p * dot) * scale).into_primitive().tensor()
}

pub fn rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    inverse: bool,
) -> FloatTensor<B> {
    let x: Tensor<B, 4> = float(x);
    let cos: Tensor<B, 2> = float(cos);
    let sin: Tensor<B, 2> = float(sin);
    let sin = if inverse { sin.neg() } else { sin };
    let [b, s, _, head_dim] = x.dims();
    let [n, dim] = cos.dims();
    // A table per position (`[seq, dim]`) or per token (`[batch * seq, dim]`).
    let rows = if n == s { 1 } else { b };
    let half = dim / 2;
    let x_rot = x.clone().narrow(3, 0, dim);
    let x1 = x_rot.clone().narrow(3, 0, half);
    let x2 = x_rot.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = cos.reshape([rows, s, 1, dim]);
    let sin = sin.reshape([rows, s, 1, dim]);
    let out = x_rot * cos + rotated * sin;
    let out = if dim == head_dim {
        out
    } else {
        Tensor::cat(vec![out, x.narrow(3, dim, head_dim - dim)], 3)
    };
    out.into_primitive().tensor()
}

/// [`FusedOps::dropout_seeded`](super::FusedOps::dropout_seeded) with the mask computed on the
/// host ([`super::dropout_keep`]) and uploaded: the same bits as every backend's kernel.
pub fn dropout_seeded<B: Backend>(x: FloatTensor<B>, p: f64, seed: u64) -> FloatTensor<B> {
    let like = x.clone();
    let x = flat::<B>(x);
    let n = x.dims()[0];
    let (keys, threshold) = (super::dropout_keys(seed), super::dropout_threshold(p));
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..n)
        .map(|i| {
            if super::dropout_keep(keys, i as u32, threshold) {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(mask, [n]), &x.device());
    let dtype = x.dtype();
    shaped_like(
        (x.cast(burn::tensor::FloatDType::F32) * mask).cast(dtype),
        &like,
    )
}

/// Any shape, flattened.
fn flat<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    let n = t.shape().num_elements();
    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).reshape([n])
}

fn shaped_like<B: Backend>(t: Tensor<B, 1>, like: &FloatTensor<B>) -> FloatTensor<B> {
    B::float_reshape(t.into_primitive().tensor(), like.shape())
}

pub fn lora_add<B: super::FusedOps>(
    y: FloatTensor<B>,
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let x: Tensor<B, 2> = float(x);
    let dtype = x.dtype();
    let (a, b): (Tensor<B, 2>, Tensor<B, 2>) = (float(a), float(b));
    let delta = super::matmul(super::matmul(x, a.cast(dtype)), b.cast(dtype));
    (float::<B, 2>(y) + delta.mul_scalar(scale))
        .into_primitive()
        .tensor()
}

/// NF4's dense `[out, in]` weight from tensor ops only (int shifts and masks, a gather from the
/// code book, a multiply by each block's absmax), in `dtype`: what the CubeCL backends run
/// instead of their dequantize kernel under `PHITUNE_REFERENCE_OPS=nf4`.
pub fn nf4_dequantize<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    shape: [usize; 2],
    dtype: burn::tensor::FloatDType,
) -> FloatTensor<B> {
    use burn::tensor::ElementConversion;
    let packed: Tensor<B, 1, Int> = Tensor::from_primitive(packed);
    let absmax: Tensor<B, 1> = float(absmax);
    let device = packed.device();
    let numel = shape[0] * shape[1];
    let words = packed.dims()[0];
    // Code j of word w (bits 4j..4j+4) is element 8w + j.
    let codes: Vec<Tensor<B, 1, Int>> = (0..8)
        .map(|j| {
            packed
                .clone()
                .bitwise_right_shift_scalar((4 * j).elem())
                .bitwise_and_scalar(15.elem())
        })
        .collect();
    let codes = Tensor::stack::<2>(codes, 1)
        .reshape([words * 8])
        .narrow(0, 0, numel);
    let book = Tensor::<B, 1>::from_data(
        burn::tensor::TensorData::new(super::NF4_CODE.to_vec(), [16]),
        &device,
    );
    let values = book.select(0, codes);
    let blocks = absmax.dims()[0];
    let scales = absmax
        .cast(burn::tensor::FloatDType::F32)
        .reshape([blocks, 1])
        .expand([blocks, super::BLOCK])
        .reshape([blocks * super::BLOCK])
        .narrow(0, 0, numel);
    (values.cast(burn::tensor::FloatDType::F32) * scales)
        .cast(dtype)
        .reshape(shape)
        .into_primitive()
        .tensor()
}

pub fn gelu_tanh<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let like = x.clone();
    let y = burn::tensor::activation::gelu_approximate(flat::<B>(x));
    shaped_like(y, &like)
}

pub fn gelu_tanh_backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let like = x.clone();
    let x = flat::<B>(x);
    let x2 = x.clone() * x.clone();
    let t = ((x.clone() + x2.clone() * x.clone() * GELU_C) * SQRT_2_OVER_PI).tanh();
    let dt = (t.clone() * t.clone()).neg() + 1.0;
    let du = (x2 * (3.0 * GELU_C) + 1.0) * SQRT_2_OVER_PI;
    let d = (t + 1.0) * 0.5 + x * dt * du * 0.5;
    shaped_like(d * flat::<B>(grad), &like)
}

/// `h W^T + bias` of one chunk of rows, in f32.
fn head_logits<B: super::Nf4Backend>(
    h: Tensor<B, 2>,
    w: &FloatTensor<B>,
    bias: &Option<FloatTensor<B>>,
) -> Tensor<B, 2> {
    let logits: Tensor<B, 2> = float(B::frozen_matmul(h.into_primitive().tensor(), w.clone()));
    let logits = match bias {
        Some(b) => logits + float::<B, 1>(b.clone()).unsqueeze(),
        None => logits,
    };
    logits.cast(burn::tensor::FloatDType::F32)
}

/// The rows `start..start + len` of each chunk of `t` rows.
fn chunks(t: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(chunk.max(1))
        .map(move |start| (start, chunk.max(1).min(t - start)))
}

pub fn head_cross_entropy<B: super::Nf4Backend>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    chunk: usize,
) -> CrossEntropy<B> {
    head_chunks::<B>(h, w, bias, targets, chunk, false).0
}

pub fn head_cross_entropy_with_grad<B: super::Nf4Backend>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    chunk: usize,
) -> (CrossEntropy<B>, FloatTensor<B>) {
    let (ce, dh) = head_chunks::<B>(h, w, bias, targets, chunk, true);
    (ce, dh.expect("requested"))
}

/// The head's cross-entropy chunk by chunk; with `grad`, also each row's `d nll / d h` (the
/// chunk's `d nll / d logits` for an upstream gradient of one, through the frozen head).
fn head_chunks<B: super::Nf4Backend>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    targets: IntTensor<B>,
    chunk: usize,
    grad: bool,
) -> (CrossEntropy<B>, Option<FloatTensor<B>>) {
    let h: Tensor<B, 2> = float(h);
    let dtype = h.dtype();
    let device = h.device();
    let targets: Tensor<B, 1, Int> = Tensor::from_primitive(targets);
    let t = h.dims()[0];
    let (mut nll, mut lse, mut argmax, mut dh) = (vec![], vec![], vec![], vec![]);
    for (start, len) in chunks(t, chunk) {
        let logits = head_logits::<B>(h.clone().narrow(0, start, len), &w, &bias);
        let chunk_targets = targets.clone().narrow(0, start, len);
        let ce = B::cross_entropy(
            logits.clone().into_primitive().tensor(),
            chunk_targets.clone().into_primitive(),
        );
        if grad {
            let ones = Tensor::<B, 1>::ones([len], &device).cast(burn::tensor::FloatDType::F32);
            let dlogits: Tensor<B, 2> = float(B::cross_entropy_backward(
                logits.into_primitive().tensor(),
                chunk_targets.into_primitive(),
                ce.lse.clone(),
                ones.into_primitive().tensor(),
            ));
            dh.push(float::<B, 2>(B::frozen_matmul_t(
                dlogits.cast(dtype).into_primitive().tensor(),
                w.clone(),
            )));
        }
        nll.push(float::<B, 1>(ce.nll));
        lse.push(float::<B, 1>(ce.lse));
        argmax.push(Tensor::<B, 1, Int>::from_primitive(ce.argmax));
    }
    let ce = CrossEntropy {
        nll: Tensor::cat(nll, 0).into_primitive().tensor(),
        lse: Tensor::cat(lse, 0).into_primitive().tensor(),
        argmax: Tensor::cat(argmax, 0).into_primitive(),
    };
    (
        ce,
        grad.then(|| Tensor::cat(dh, 0).into_primitive().tensor()),
    )
}
