//! CubeCL backends (CUDA, wgpu, ROCm; feature `cube`): `#[cube]` kernels and their launchers,
//! one file per op. Every kernel computes in f32 whatever the tensor's dtype (f16, bf16, f32):
//! sums, exponentials and the NF4 accumulation never run in half precision.
//!
//! | file | op |
//! |---|---|
//! | `matmul.rs` | exact f32 products (no TF32): cubek's unit matmul, launched directly |
//! | `nf4.rs` | NF4 dequantize (whole 32-bit words per thread), the decode GEMV, the dispatch |
//! | `cross_entropy.rs` | the loss over the vocabulary: one cube per row forward, one pass backward |
//! | `gelu.rs` | `gelu_new` and its derivative |
//! | `rope.rs` | the rotary embedding (and its inverse, the backward) |
//! | `dropout.rs` | the seeded dropout mask, the same bits as every other backend |
//!
//! Reductions use plane (warp) operations where the device has them with a fixed plane size,
//! and shared memory where it does not (cubecl turns plane ops off on CPU adapters such as
//! lavapipe, so CI runs that path).

mod cross_entropy;
mod dropout;
mod gelu;
mod matmul;
mod nf4;
mod rope;

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::features::Plane;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::{CrossEntropy, FusedOps, KernelOp, reference};

/// A contiguous tensor of `shape` and `dtype` on `like`'s device, uninitialised.
fn alloc<R: CubeRuntime>(like: &CubeTensor<R>, shape: &[usize], dtype: DType) -> CubeTensor<R> {
    let numel: usize = shape.iter().product();
    let buffer = like.client.empty(numel * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        buffer,
        dtype,
    )
}

/// `t` in `dtype` and contiguous (a kernel reads all its float inputs in one dtype, indexing
/// them as row-major). The cast comes first: on CUDA a cast's output can have padded rows
/// (cubecl-cuda allocates pitched), so making the input contiguous before casting would hand
/// the kernel a padded tensor it reads as contiguous.
fn contiguous_in<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    let t = if t.dtype == dtype {
        t
    } else {
        burn_cubecl::kernel::cast(t, dtype)
    };
    into_contiguous(t)
}

/// Launch dimensions for one thread per element of `numel`.
fn elementwise<R: CubeRuntime>(like: &CubeTensor<R>, numel: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&like.client, numel.max(1));
    let count = calculate_cube_count_elemwise(&like.client, numel.max(1), cube_dim);
    (count, cube_dim)
}

/// Launch dimensions for one cube per row (`rows` may exceed a grid dimension's limit: the
/// kernel reads its row as `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X`).
fn per_row(rows: usize) -> CubeCount {
    const MAX_X: usize = 32_768;
    let x = rows.clamp(1, MAX_X);
    CubeCount::Static(x as u32, rows.div_ceil(x).max(1) as u32, 1)
}

/// The plane size when the device has plane operations with one fixed plane size (CUDA: 32);
/// None where reductions must go through shared memory (lavapipe, some mobile GPUs).
fn fixed_plane<R: CubeRuntime>(like: &CubeTensor<R>) -> Option<u32> {
    let props = like.client.properties();
    let hw = &props.hardware;
    (props.features.plane.contains(Plane::Ops) && hw.plane_size_min == hw.plane_size_max)
        .then_some(hw.plane_size_max)
}

/// Threads per cube for a row reduction: a power of two, at most 256 and the device's limit.
fn row_threads<R: CubeRuntime>(like: &CubeTensor<R>) -> usize {
    let max = like.client.properties().hardware.max_units_per_cube as usize;
    let mut t = 256usize.min(max.max(1));
    while !t.is_power_of_two() {
        t &= t - 1;
    }
    t
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps
    for CubeBackend<R, F, I, BT>
{
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        if matmul::is_exact(lhs.dtype) {
            matmul::exact(lhs, rhs)
        } else {
            Self::float_matmul(lhs, rhs)
        }
    }

    fn exact_matmul(dtype: DType) -> bool {
        matmul::is_exact(dtype)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        if KernelOp::CrossEntropy.uses_reference() {
            return reference::cross_entropy::<Self>(logits, targets);
        }
        let (nll, lse, argmax) = cross_entropy::forward(logits, targets);
        CrossEntropy { nll, lse, argmax }
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if KernelOp::CrossEntropy.uses_reference() {
            return reference::cross_entropy_backward::<Self>(logits, targets, lse, grad);
        }
        cross_entropy::backward(logits, targets, lse, grad)
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if KernelOp::Gelu.uses_reference() {
            return reference::gelu_tanh::<Self>(x);
        }
        gelu::forward(x)
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if KernelOp::Gelu.uses_reference() {
            return reference::gelu_tanh_backward::<Self>(x, grad);
        }
        gelu::backward(x, grad)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        if KernelOp::Rope.uses_reference() {
            return reference::rope::<Self>(x, cos, sin, inverse);
        }
        rope::rotate(x, cos, sin, inverse)
    }

    fn has_seeded_dropout() -> bool {
        true
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        if KernelOp::Dropout.uses_reference() {
            return reference::dropout_seeded::<Self>(x, p, seed);
        }
        dropout::apply(x, p, seed)
    }
}
