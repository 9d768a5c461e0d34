//! Frozen base weights as a Burn backend extension: NF4 4-bit weights (QLoRA) and dense frozen
//! weights, both stored `[out, in]` (PyTorch's layout) and applied as `x @ W^T`.
//!
//! - [`Nf4Backend`]: the extension trait. Its ops take the packed codes and absmax, so the
//!   dense weight is never materialised (except by `nf4_dequantize`, for merging and tests).
//! - `ndarray.rs`: plain Rust, multi-threaded, tiled dequantize + sgemm, no copies of weights.
//! - `cube.rs` (feature `cube`): `#[cube]` kernels for CUDA/wgpu; `fusion.rs`: the same ops
//!   on `Fusion<B>` (what `Cuda`/`Wgpu` are with fusion on).
//! - `autodiff.rs`: `Autodiff<B>` with hand-written backwards giving dX only; the saved state is
//!   the packed codes and absmax (or the frozen dense weight), never a dequantized copy.
//! - `format.rs`: the bitsandbytes-compatible host format (quantize, double quant, export).

mod autodiff;
#[cfg(feature = "cube")]
mod cube;
pub mod format;
#[cfg(feature = "cube")]
mod fusion;
pub(crate) mod ndarray;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Shape, Tensor, TensorPrimitive, backend::Backend};

pub use format::{Absmax, BLOCK, NF4_CODE, Nf4Host};

/// Frozen-weight linear algebra. `w` is always `[out, in]`; the NF4 form is 8 codes per
/// 32-bit int element (element i in bits `4*(i%8)` of element `i/8`) plus one f32 absmax per
/// 64 consecutive values of the row-major weight.
pub trait Nf4Backend: crate::fused::FusedOps {
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
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `dy [m, out] @ dequant(W) -> [m, in]` (the input gradient).
    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let w = Self::nf4_dequantize(packed, absmax, shape);
        Self::float_matmul(dy, w)
    }

    /// `x [m, in] @ W^T -> [m, out]` for a frozen dense `W [out, in]`.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `dy [m, out] @ W -> [m, in]`.
    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(dy, w)
    }
}

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
