//! The rotary embedding on CubeCL (HF's rotate_half layout on the first `dim` channels of each
//! head), one thread per element; `inverse` rotates by the negated angles (the backward).

use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{alloc, contiguous_in, elementwise};

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    table_rows: usize,
    heads: usize,
    head_dim: usize,
    dim: usize,
    sign: f32,
    #[define(F)] _dtype: StorageType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let c = pos % head_dim;
    if c >= dim {
        out[pos] = x[pos];
    } else {
        let row = pos / head_dim;
        let p = (row / heads) % table_rows;
        let half = dim / 2;
        let t = p * dim + c;
        let (cv, sv) = (f32::cast_from(cos[t]), f32::cast_from(sin[t]) * sign);
        let v = f32::cast_from(x[pos]);
        let rotated = if c < half {
            -f32::cast_from(x[pos + half])
        } else {
            f32::cast_from(x[pos - half])
        };
        out[pos] = F::cast_from(v * cv + rotated * sv);
    }
}

/// Rotates `x [batch, seq, heads, head_dim]` by the `cos`/`sin` tables `[n, dim]` (`n` = seq,
/// or batch × seq for a row per token).
pub(super) fn rotate<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    inverse: bool,
) -> CubeTensor<R> {
    let shape = x.meta.shape().to_vec();
    let (heads, head_dim) = (shape[2], shape[3]);
    let (table_rows, dim) = (cos.meta.shape()[0], cos.meta.shape()[1]);
    let dtype = x.dtype;
    let x = contiguous_in(x, dtype);
    let (cos, sin) = (contiguous_in(cos, dtype), contiguous_in(sin, dtype));
    let out = alloc(&x, &shape, dtype);
    let (count, cube_dim) = elementwise(&x, out.meta.shape().num_elements());
    let client = x.client.clone();
    rope_kernel::launch::<R>(
        &client,
        count,
        cube_dim,
        x.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        table_rows,
        heads,
        head_dim,
        dim,
        if inverse { -1.0f32 } else { 1.0 },
        dtype.into(),
    );
    out
}
