//! The backend extension: how each backend computes the model's heavy ops.
//!
//! Two traits over Burn's `Backend`, each op with a tensor-op default ([`reference`](mod@reference)):
//!
//! - [`Nf4Backend`]: frozen base weights, stored `[out, in]` (PyTorch's layout) and applied as
//!   `x @ W^T`: NF4 4-bit weights (QLoRA), which take the packed codes and absmax so the dense
//!   weight is never materialised (except by `nf4_dequantize`, for merging and tests), and dense
//!   frozen weights. It is the one bound the model code needs (it implies [`FusedOps`]).
//! - [`FusedOps`]: every product of the model ([`FusedOps::matmul`]: f32 kept f32 where Burn's
//!   matmul would round to TF32), and element-wise work in one pass forward and one backward, where Burn's
//!   tensor-op forms walk their tensors once per op and allocate a temporary each time: the
//!   language-model cross-entropy over the vocabulary, `gelu_new`, the rotary embedding, the
//!   attention's scaled, masked softmax and dropout with a mask hashed from a seed and the
//!   element index.
//!
//! One file or folder per backend:
//!
//! | file | backend |
//! |---|---|
//! | `reference.rs` | the tensor-op forms: every op's default, and what the kernels are tested against |
//! | `ndarray/` | the CPU (`NdArray`): one file per op (`nf4.rs`, `cross_entropy.rs`, `gelu.rs`, `rope.rs`, `softmax.rs`, `dropout.rs`), multi-threaded, no copies of weights |
//! | `cube/` | CubeCL (CUDA, wgpu): `#[cube]` kernels and their launchers (feature `cube`); `PHITUNE_REFERENCE_OPS` ([`KernelOp`]) sends any of them to its `reference.rs` form |
//! | `fusion.rs` | `Fusion<B>` (what `Cuda`/`Wgpu` are with fusion on): each op registered as a custom operation |
//! | `autodiff.rs` | `Autodiff<B>`: the hand-written backwards of every op |
//! | `nf4_format.rs` | NF4's host format: quantize, double quant, bitsandbytes' layout, export |

mod autodiff;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cube")]
mod fusion;
mod ndarray;
pub mod nf4_format;
pub mod reference;
#[cfg(test)]
mod tests;

use burn::tensor::ops::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{Bool, DType, Int, Shape, Tensor, TensorPrimitive, backend::Backend};

pub use nf4_format::{Absmax, BLOCK, NF4_CODE, Nf4Host};

/// NF4 products with fewer input rows than this take the decode GEMV on backends that have one
/// (CubeCL); larger ones dequantize the layer and use the backend's matmul. bitsandbytes takes
/// its GEMV for one row only; 8 is a guess until `bench --nf4-rows` is run on a GPU
/// (`benches/gpu.sh` does).
pub const DEFAULT_NF4_GEMV_MAX_ROWS: usize = 8;

static NF4_GEMV_MAX_ROWS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_NF4_GEMV_MAX_ROWS);

/// The row count below which NF4 products take the GEMV.
pub fn nf4_gemv_max_rows() -> usize {
    NF4_GEMV_MAX_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets [`nf4_gemv_max_rows`] for the process (for measurement: `bench --nf4-rows` times both
/// paths at each row count).
pub fn set_nf4_gemv_max_rows(rows: usize) {
    NF4_GEMV_MAX_ROWS.store(rows, std::sync::atomic::Ordering::Relaxed)
}

/// Whether f32 products may round their operands to TF32 (10-bit mantissa) on backends whose
/// fast matmul does (CubeCL's tensor-core kernels on CUDA). Off by default, as PyTorch's
/// `torch.backends.cuda.matmul.allow_tf32`: f32 means f32. `--tf32` turns it on for speed.
static ALLOW_TF32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`set_allow_tf32`].
pub fn allow_tf32() -> bool {
    ALLOW_TF32.load(std::sync::atomic::Ordering::Relaxed)
}

/// Lets f32 products run on TF32 tensor cores (faster, ~5e-4 relative rounding of the operands)
/// for the rest of the process.
pub fn set_allow_tf32(allow: bool) {
    ALLOW_TF32.store(allow, std::sync::atomic::Ordering::Relaxed)
}

/// The ops a GPU backend can send to their tensor-op form ([`reference`](mod@reference)) instead of its own
/// kernel, named in `PHITUNE_REFERENCE_OPS` (comma-separated, or `all`): a bisection switch for
/// when a device computes something wrong (`benches/gpu.sh` uses it to name the culprit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelOp {
    /// The NF4 dequantize and GEMV kernels (the reference unpacks the codes with int ops).
    Nf4,
    /// The exact f32 matmul (the reference is Burn's autotuned matmul).
    Matmul,
    CrossEntropy,
    Gelu,
    Rope,
    Dropout,
}

impl KernelOp {
    pub const ALL: [KernelOp; 6] = [
        KernelOp::Nf4,
        KernelOp::Matmul,
        KernelOp::CrossEntropy,
        KernelOp::Gelu,
        KernelOp::Rope,
        KernelOp::Dropout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelOp::Nf4 => "nf4",
            KernelOp::Matmul => "matmul",
            KernelOp::CrossEntropy => "cross_entropy",
            KernelOp::Gelu => "gelu",
            KernelOp::Rope => "rope",
            KernelOp::Dropout => "dropout",
        }
    }

    /// Parses `PHITUNE_REFERENCE_OPS`' value: names separated by commas, or `all`.
    pub fn parse_list(list: &str) -> Result<Vec<KernelOp>, String> {
        let mut ops = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                ops.extend(Self::ALL);
                continue;
            }
            match Self::ALL.iter().find(|op| op.name() == name) {
                Some(&op) => ops.push(op),
                None => {
                    let known: Vec<&str> = Self::ALL.iter().map(|op| op.name()).collect();
                    return Err(format!(
                        "unknown op \"{name}\" (known: {}, all)",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(ops)
    }

    /// Whether this op runs its tensor-op form (`PHITUNE_REFERENCE_OPS`, read once; the CLI
    /// refuses a bad value before any work, see [`reference_ops_from_env`]).
    pub fn uses_reference(self) -> bool {
        reference_ops().contains(&self)
    }
}

fn reference_ops() -> &'static [KernelOp] {
    static OPS: std::sync::OnceLock<Vec<KernelOp>> = std::sync::OnceLock::new();
    OPS.get_or_init(|| reference_ops_from_env().unwrap_or_default())
}

/// The ops `PHITUNE_REFERENCE_OPS` names (empty when unset), or why its value is bad.
pub fn reference_ops_from_env() -> Result<Vec<KernelOp>, String> {
    match std::env::var("PHITUNE_REFERENCE_OPS") {
        Ok(list) => KernelOp::parse_list(&list).map_err(|e| format!("PHITUNE_REFERENCE_OPS: {e}")),
        Err(_) => Ok(Vec::new()),
    }
}

/// Frozen-weight linear algebra. `w` is always `[out, in]`; the NF4 form is 8 codes per
/// 32-bit int element (element i in bits `4*(i%8)` of element `i/8`) plus one f32 absmax per
/// 64 consecutive values of the row-major weight.
pub trait Nf4Backend: FusedOps {
    /// `dequant(W)`, `[out, in]`.
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self>;

    /// `x [m, in] @ dequant(W)^T -> [m, out]`.
    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let w = Self::nf4_dequantize(packed, absmax, shape);
        Self::matmul(x, Self::float_transpose(w))
    }

    /// `dy [m, out] @ dequant(W) -> [m, in]` (the input gradient).
    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let w = Self::nf4_dequantize(packed, absmax, shape);
        Self::matmul(dy, w)
    }

    /// `x [m, in] @ W^T -> [m, out]` for a frozen dense `W [out, in]`.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::matmul(x, Self::float_transpose(w))
    }

    /// `dy [m, out] @ W -> [m, in]`.
    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::matmul(dy, w)
    }

    /// The language-model head and its cross-entropy, over the rows that have a target only:
    /// `h [t, hidden]` (final hidden states), the frozen head `w [vocab, hidden]` and `bias
    /// [vocab]`, `targets [t]` (all kept). `logits = h W^T + bias` (f32) exist for `chunk`
    /// rows at a time and never for all `t`. Only `nll` is differentiable, with respect to `h`.
    fn head_cross_entropy(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> CrossEntropy<Self> {
        reference::head_cross_entropy::<Self>(h, w, bias, targets, chunk)
    }

    /// [`head_cross_entropy`](Self::head_cross_entropy) for training: also `d nll_i / d h_i`
    /// for every row (`[t, hidden]`, in `h`'s dtype), computed while each chunk's logits exist,
    /// so the backward is that times the upstream per-row gradient: no logits are recomputed
    /// and still only one chunk of `[rows, vocab]` exists at a time.
    fn head_cross_entropy_with_grad(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> (CrossEntropy<Self>, FloatTensor<Self>) {
        reference::head_cross_entropy_with_grad::<Self>(h, w, bias, targets, chunk)
    }
}

/// Per-row results of [`FusedOps::cross_entropy`].
pub struct CrossEntropy<B: Backend> {
    /// `-log softmax(logits)[target]`, 0 where the target is negative (ignored), `[n]`.
    pub nll: FloatTensor<B>,
    /// `log sum exp(logits)`, `[n]` (what the backward needs).
    pub lse: FloatTensor<B>,
    /// Index of the largest logit (the first on ties), `[n]`.
    pub argmax: IntTensor<B>,
}

/// Fused element-wise ops. Each default is the tensor-op form in [`reference`](mod@reference).
pub trait FusedOps: Backend {
    /// `lhs [..., m, k] @ rhs [..., k, n]` with equal batch dims: every product of the model
    /// (frozen and dequantized NF4 weights, LoRA, attention) goes through here. Burn's
    /// `float_matmul` unless [`exact_matmul`](Self::exact_matmul) says the backend has a path
    /// of its own for the dtype.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// Whether [`matmul`](Self::matmul) of `dtype` operands takes the backend's own path
    /// instead of `float_matmul`: on CubeCL, f32 without [`allow_tf32`] (Burn's autotuned
    /// matmul would take f32 operands as TF32 on tensor cores). Autodiff then records its own
    /// backward, whose products take the same path.
    fn exact_matmul(_dtype: DType) -> bool {
        false
    }

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
    /// `[n, dim]` (HF's rotate_half layout on the first `dim` channels of each head; the rest
    /// pass through). `n` is `seq` (every row at the same positions) or `batch * seq` (a table
    /// row per token: packed rows, whose positions restart at each example); token `t` (row-major
    /// over `[batch, seq]`) reads table row `t % n`. `inverse` rotates by the negated angles: the
    /// backward of the forward.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        reference::rope::<Self>(x, cos, sin, inverse)
    }

    /// The attention's probabilities from f32 `scores [batch, heads, q, k]`:
    /// `softmax(scores * scale)` over the last dim, where `mask [1 or batch, q, k]` (true =
    /// hidden) gives hidden keys probability 0. Every query must see at least one key.
    fn attention_softmax(
        scores: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        scale: f64,
    ) -> FloatTensor<Self> {
        reference::attention_softmax::<Self>(scores, mask, scale)
    }

    /// The scores' gradient from the probabilities' `grad`: `scale * p * (grad - sum(grad *
    /// p))` per row.
    fn attention_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        reference::attention_softmax_backward::<Self>(probs, grad, scale)
    }

    /// LoRA at inference, onto the base layer's output: `y + scale * (x a) b` for `y [m, out]`,
    /// `x [m, in]`, `a [in, r]`, `b [r, out]` (f32 adapter weights, cast to `x`'s dtype). Not
    /// differentiable: called only where autodiff is off (decoding's three small products and
    /// the add are one op).
    fn lora_add(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        reference::lora_add::<Self>(y, x, a, b, scale)
    }

    /// Whether [`FusedOps::dropout_seeded`] is implemented (else dropout uses Burn's ops).
    fn has_seeded_dropout() -> bool {
        false
    }

    /// Inverted dropout whose mask is a hash of `(seed, element index)` ([`dropout_keep`]):
    /// `x / (1 - p)` where kept, 0 elsewhere. The same seed gives the same mask on every
    /// backend, so the backward is this op applied to the gradient and no mask is stored.
    fn dropout_seeded(x: FloatTensor<Self>, _p: f64, _seed: u64) -> FloatTensor<Self> {
        x
    }
}

// ---------------------------------------------------------------------------------------------
// The ops on Burn tensors, as the model calls them.

/// `x [..., in] -> [..., out]` through a frozen dense `[out, in]` weight.
pub fn frozen_linear<B: Nf4Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
) -> Tensor<B, D> {
    let [out, _] = w.dims();
    apply_2d(x, out, |x2| {
        B::frozen_matmul(x2, w.into_primitive().tensor())
    })
}

/// `lhs [..., m, k] @ rhs [..., k, n]` (equal batch dims) through [`FusedOps::matmul`].
pub fn matmul<B: FusedOps, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::matmul(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
    )))
}

/// `x [..., in] @ w [in, out] -> [..., out]` through [`FusedOps::matmul`].
pub fn linear<B: FusedOps, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    if !B::exact_matmul(x.dtype()) {
        // Burn's own op (and its backward), as before there was an exact path.
        return burn::tensor::module::linear(x, w, None);
    }
    let [_, out] = w.dims();
    apply_2d(x, out, |x2| B::matmul(x2, w.into_primitive().tensor()))
}

/// `y + scale * (x a) b` over the last dim (`x [..., in]`, `y [..., out]`); see
/// [`FusedOps::lora_add`]. Inference only.
pub fn lora_add<B: FusedOps, const D: usize>(
    y: Tensor<B, D>,
    x: Tensor<B, D>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, D> {
    let dims = y.dims();
    let out = dims[D - 1];
    let m: usize = dims[..D - 1].iter().product();
    let y2: Tensor<B, 2> = y.reshape([m, out]);
    apply_2d(x, out, |x2| {
        B::lora_add(
            y2.into_primitive().tensor(),
            x2,
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
            scale,
        )
    })
}

/// `x [..., in] -> [..., out]` through an NF4 weight.
pub fn nf4_linear<B: Nf4Backend, const D: usize>(
    x: Tensor<B, D>,
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: [usize; 2],
) -> Tensor<B, D> {
    apply_2d(x, shape[0], |x2| {
        B::nf4_matmul(
            x2,
            packed.into_primitive(),
            absmax.into_primitive().tensor(),
            shape,
        )
    })
}

/// The dense `[out, in]` weight of an NF4 weight.
pub fn nf4_dequantize<B: Nf4Backend>(
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: [usize; 2],
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::nf4_dequantize(
        packed.into_primitive(),
        absmax.into_primitive().tensor(),
        shape,
    )))
}

fn apply_2d<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    out: usize,
    f: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let m: usize = dims[..D - 1].iter().product();
    let x2: Tensor<B, 2> = x.reshape([m, k]);
    let y: Tensor<B, 2> =
        Tensor::from_primitive(TensorPrimitive::Float(f(x2.into_primitive().tensor())));
    let mut out_dims = dims;
    out_dims[D - 1] = out;
    y.reshape(Shape::from(out_dims.to_vec()))
}

/// The attention's probabilities, `[batch, heads, q, k]` f32; see [`FusedOps::attention_softmax`].
pub fn attention_softmax<B: FusedOps>(
    scores: Tensor<B, 4>,
    mask: Option<&Tensor<B, 3, Bool>>,
    scale: f64,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::attention_softmax(
        scores.into_primitive().tensor(),
        mask.map(|m| m.clone().into_primitive()),
        scale,
    )))
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

// ---------------------------------------------------------------------------------------------
// Dropout masks: the same bits on every backend.

/// SplitMix64's finalizer: a 64-bit mixer (host side only).
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 32-bit mixer (Wellons' `lowbias32`): what the kernels run per element, since WGSL has no
/// 64-bit integers.
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The two 32-bit keys of a dropout seed.
pub fn dropout_keys(seed: u64) -> [u32; 2] {
    let z = splitmix64(seed ^ 0x9E37_79B9_7F4A_7C15);
    [z as u32, (z >> 32) as u32]
}

/// Elements whose 24-bit draw is below this are dropped.
pub fn dropout_threshold(p: f64) -> u32 {
    (p * (1u32 << 24) as f64) as u32
}

/// Whether element `i` (its row-major index, modulo 2^32) is kept: two rounds of [`mix32`]
/// keyed by [`dropout_keys`], the top 24 bits against [`dropout_threshold`]. Every backend's
/// kernel computes exactly this.
#[inline(always)]
pub fn dropout_keep(keys: [u32; 2], i: u32, threshold: u32) -> bool {
    (mix32(mix32(i ^ keys[0]) ^ keys[1]) >> 8) >= threshold
}

thread_local! {
    /// `(base, calls so far)` of the dropout seed stream on this thread.
    static DROPOUT_STREAM: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Starts the dropout seed stream of this thread: the n-th dropout call after it uses
/// `splitmix64(base + n)`. A training step starts it from (run seed, data position), so its
/// masks depend on neither the backend nor its random generator, and a run resumed on another
/// backend continues the same stream.
pub fn start_dropout_stream(base: u64) {
    DROPOUT_STREAM.with(|s| s.set(Some((base, 0))));
}

fn next_dropout_seed() -> Option<u64> {
    DROPOUT_STREAM.with(|s| {
        let (base, n) = s.get()?;
        s.set(Some((base, n + 1)));
        Some(splitmix64(base.wrapping_add(n)))
    })
}

/// Training-time dropout (identity outside autodiff or for `p == 0`), as Burn's `Dropout`.
/// The seed comes from this thread's dropout stream ([`start_dropout_stream`]), or without one
/// from the backend's generator (so `B::seed` makes masks reproducible).
pub fn dropout<B: FusedOps, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if p == 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    if B::has_seeded_dropout() {
        let seed = next_dropout_seed().unwrap_or_else(|| {
            let draws = Tensor::<B, 1>::random(
                [2],
                burn::tensor::Distribution::Uniform(0.0, 16_777_216.0),
                &x.device(),
            )
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
            draws.iter().fold(0u64, |s, &d| (s << 24) | d as u64)
        });
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

/// The head's cross-entropy over target rows, chunked: `(nll [t], argmax [t])` for the final
/// hidden states `h [t, hidden]`; see [`Nf4Backend::head_cross_entropy`].
pub fn head_cross_entropy<B: Nf4Backend>(
    h: Tensor<B, 2>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    targets: Tensor<B, 1, Int>,
    chunk: usize,
) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let out = B::head_cross_entropy(
        h.into_primitive().tensor(),
        w.into_primitive().tensor(),
        bias.map(|b| b.into_primitive().tensor()),
        targets.into_primitive(),
        chunk.max(1),
    );
    (
        Tensor::from_primitive(TensorPrimitive::Float(out.nll)),
        Tensor::from_primitive(out.argmax),
    )
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
