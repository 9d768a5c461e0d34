//! `gelu_new` (the tanh approximation) and its derivative on CubeCL, one thread per element,
//! in f32.

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{alloc, contiguous_in, elementwise};
use crate::ops::reference::{GELU_C, SQRT_2_OVER_PI};

/// `tanh(sqrt(2/pi) (x + 0.044715 x^3))`. The argument is clamped to +-15, where tanh is 1
/// in f32 anyway, so a driver's exp-based tanh never overflows to NaN.
#[cube]
fn inner_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    f32::tanh(f32::clamp(u, -15.0, 15.0))
}

#[cube(launch)]
fn forward_kernel<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let v = f32::cast_from(x[pos]);
    out[pos] = F::cast_from(0.5 * v * (1.0 + inner_tanh(v)));
}

#[cube(launch)]
fn backward_kernel<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let v = f32::cast_from(x[pos]);
    let t = inner_tanh(v);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
    let d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du;
    out[pos] = F::cast_from(f32::cast_from(grad[pos]) * d);
}

pub(super) fn forward<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = x.dtype;
    let x = contiguous_in(x, dtype);
    let shape = x.meta.shape().to_vec();
    let out = alloc(&x, &shape, x.dtype);
    let (count, dim) = elementwise(&x, out.meta.shape().num_elements());
    let (client, dtype) = (x.client.clone(), x.dtype);
    forward_kernel::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}

pub(super) fn backward<R: CubeRuntime>(x: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = x.dtype;
    let x = contiguous_in(x, dtype);
    let shape = x.meta.shape().to_vec();
    let grad = contiguous_in(grad, x.dtype);
    let out = alloc(&x, &shape, x.dtype);
    let (count, dim) = elementwise(&x, out.meta.shape().num_elements());
    let (client, dtype) = (x.client.clone(), x.dtype);
    backward_kernel::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        grad.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}
