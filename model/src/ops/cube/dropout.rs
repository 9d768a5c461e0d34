//! Seeded inverted dropout on CubeCL: element `i` is kept when the same 32-bit hash as every
//! other backend's ([`crate::ops::dropout_keep`]) clears the threshold, so one seed gives one
//! mask everywhere (a run resumed on another backend continues the same stream).

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{alloc, contiguous_in, elementwise};
use crate::ops::{dropout_keys, dropout_threshold};

/// [`crate::ops::mix32`] in a kernel.
#[cube]
fn mix32(x: u32) -> u32 {
    let mut v = x ^ (x >> 16u32);
    v *= 0x7feb_352du32;
    v ^= v >> 15u32;
    v *= 0x846c_a68bu32;
    v ^ (v >> 16u32)
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn dropout_kernel<F: Float>(
    x: &Tensor<F>,
    out: &mut Tensor<F>,
    key0: u32,
    key1: u32,
    threshold: u32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let draw = mix32(mix32(u32::cast_from(pos) ^ key0) ^ key1) >> 8u32;
    let mut v = 0.0f32;
    if draw >= threshold {
        v = f32::cast_from(x[pos]) * scale;
    }
    out[pos] = F::cast_from(v);
}

pub(super) fn apply<R: CubeRuntime>(x: CubeTensor<R>, p: f64, seed: u64) -> CubeTensor<R> {
    let dtype = x.dtype;
    let x = contiguous_in(x, dtype);
    let shape = x.meta.shape().to_vec();
    let out = alloc(&x, &shape, x.dtype);
    let [k0, k1] = dropout_keys(seed);
    let (count, dim) = elementwise(&x, out.meta.shape().num_elements());
    let (client, dtype) = (x.client.clone(), x.dtype);
    dropout_kernel::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        k0,
        k1,
        dropout_threshold(p),
        (1.0 / (1.0 - p)) as f32,
        dtype.into(),
    );
    out
}
