//! NF4 on CubeCL: `#[cube]` kernels over the packed codes and their launchers. The matmul
//! kernels decode each weight on the fly and accumulate in f32, so no dense weight is ever
//! written to device memory.

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Shape, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use crate::ops::{BLOCK, NF4_CODE, Nf4Backend};

mod kernels {
    use cubecl::{cube, prelude::*};

    #[cube]
    fn weight<I: Int>(
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        idx: usize,
        #[comptime] block: usize,
    ) -> f32 {
        let word = u32::cast_from(packed[idx / 8]);
        let shift = u32::cast_from((idx % 8) * 4);
        let code = (word >> shift) & 15u32;
        lut[code as usize] * absmax[idx / block]
    }

    #[cube(launch)]
    pub fn dequantize<F: Float, I: Int>(
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        output: &mut Tensor<F>,
        #[comptime] block: usize,
    ) {
        let idx = ABSOLUTE_POS;
        if idx >= output.len() {
            terminate!();
        }
        output[idx] = F::cast_from(weight::<I>(packed, absmax, lut, idx, block));
    }

    /// `out[m, n] = sum_k x[m, k] * W[n, k]`, one output per thread.
    #[cube(launch)]
    pub fn matmul<F: Float, I: Int>(
        x: &Tensor<F>,
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        output: &mut Tensor<F>,
        #[comptime] k: usize,
        #[comptime] n: usize,
        #[comptime] block: usize,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= output.len() {
            terminate!();
        }
        let row = pos / n;
        let col = pos % n;
        let mut acc = 0.0f32;
        for kk in 0..k {
            let w = weight::<I>(packed, absmax, lut, col * k + kk, block);
            acc += f32::cast_from(x[row * k + kk]) * w;
        }
        output[pos] = F::cast_from(acc);
    }

    /// `out[m, k] = sum_n dy[m, n] * W[n, k]`, one output per thread.
    #[cube(launch)]
    pub fn matmul_t<F: Float, I: Int>(
        dy: &Tensor<F>,
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        output: &mut Tensor<F>,
        #[comptime] k: usize,
        #[comptime] n: usize,
        #[comptime] block: usize,
    ) {
        let pos = ABSOLUTE_POS;
        if pos >= output.len() {
            terminate!();
        }
        let row = pos / k;
        let col = pos % k;
        let mut acc = 0.0f32;
        for nn in 0..n {
            let w = weight::<I>(packed, absmax, lut, nn * k + col, block);
            acc += f32::cast_from(dy[row * n + nn]) * w;
        }
        output[pos] = F::cast_from(acc);
    }
}

fn lut<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    device: &R::Device,
) -> CubeTensor<R> {
    <CubeBackend<R, F, I, BT> as FloatTensorOps<CubeBackend<R, F, I, BT>>>::float_from_data(
        TensorData::new(NF4_CODE.to_vec(), [16]),
        device,
    )
}

fn empty<R: CubeRuntime, F: FloatElement>(
    like: &CubeTensor<R>,
    shape: [usize; 2],
) -> CubeTensor<R> {
    let numel = shape[0] * shape[1];
    let buffer = like.client.empty(numel * core::mem::size_of::<F>());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        buffer,
        F::dtype(),
    )
}

/// absmax as a contiguous f32 tensor, whatever dtype it arrived in.
fn absmax_f32<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    absmax: CubeTensor<R>,
) -> CubeTensor<R> {
    let absmax = if absmax.dtype == DType::F32 {
        absmax
    } else {
        <CubeBackend<R, F, I, BT> as FloatTensorOps<CubeBackend<R, F, I, BT>>>::float_cast(
            absmax,
            burn::tensor::FloatDType::F32,
        )
    };
    into_contiguous(absmax)
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4Backend
    for CubeBackend<R, F, I, BT>
{
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let packed = into_contiguous(packed);
        let absmax = absmax_f32::<R, F, I, BT>(absmax);
        let lut = lut::<R, F, I, BT>(&packed.device);
        let out = empty::<R, F>(&packed, shape);
        let numel = shape[0] * shape[1];
        let client = packed.client.clone();
        let cube_dim = CubeDim::new(&client, numel);
        let cube_count = calculate_cube_count_elemwise(&client, numel, cube_dim);
        kernels::dequantize::launch::<F, I, R>(
            &client,
            cube_count,
            cube_dim,
            packed.into_tensor_arg(),
            absmax.into_tensor_arg(),
            lut.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            BLOCK,
        );
        out
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        matmul::<R, F, I, BT>(x, packed, absmax, shape, false)
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        matmul::<R, F, I, BT>(dy, packed, absmax, shape, true)
    }
}

/// `x [m, k] @ W^T -> [m, n]`, or with `transposed` `dy [m, n] @ W -> [m, k]`, for `W [n, k]`.
fn matmul<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    input: CubeTensor<R>,
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    shape: [usize; 2],
    transposed: bool,
) -> CubeTensor<R> {
    let [n, k] = shape;
    let (inner, cols) = if transposed { (n, k) } else { (k, n) };
    let input = into_contiguous(input);
    let m = input.meta.shape().num_elements() / inner;
    let packed = into_contiguous(packed);
    let absmax = absmax_f32::<R, F, I, BT>(absmax);
    let lut = lut::<R, F, I, BT>(&input.device);
    let out = empty::<R, F>(&input, [m, cols]);
    let client = input.client.clone();
    let cube_dim = CubeDim::new(&client, m * cols);
    let cube_count = calculate_cube_count_elemwise(&client, m * cols, cube_dim);
    let args = (
        input.into_tensor_arg(),
        packed.into_tensor_arg(),
        absmax.into_tensor_arg(),
        lut.into_tensor_arg(),
    );
    if transposed {
        kernels::matmul_t::launch::<F, I, R>(
            &client,
            cube_count,
            cube_dim,
            args.0,
            args.1,
            args.2,
            args.3,
            out.clone().into_tensor_arg(),
            k,
            n,
            BLOCK,
        );
    } else {
        kernels::matmul::launch::<F, I, R>(
            &client,
            cube_count,
            cube_dim,
            args.0,
            args.1,
            args.2,
            args.3,
            out.clone().into_tensor_arg(),
            k,
            n,
            BLOCK,
        );
    }
    out
}
