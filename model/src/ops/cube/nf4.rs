//! NF4 on CubeCL, as bitsandbytes does it, chosen by the number of rows:
//!
//! - many rows (training, prefill: `m >=` [`nf4_gemv_max_rows`]): a dequantize kernel (one thread
//!   decodes a whole 32-bit word of 8 codes) writes the layer's weight in the compute dtype into
//!   a transient buffer, and Burn's autotuned matmul (matrix units on CUDA) multiplies. Forward
//!   (`x @ W^T`) and backward (`dy @ W`) alike. The dense weight lives only inside one op call:
//!   at most one layer's weight exists at a time (phi-2's largest, `fc1`, is 26.2 M values:
//!   52 MB in bf16) and its buffer returns to the pool right after the product;
//! - few rows (decoding): a GEMV that decodes on the fly, half a byte per weight read. Each
//!   cube computes 8 output features for one input row; the 32 lanes of a feature stride over
//!   its packed words, and their partial sums meet through a plane sum where the device has
//!   plane ops, through shared memory where it does not.
//!
//! Codes, absmax and the accumulation are f32 whatever the compute dtype.

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;

use super::{alloc, contiguous_in, elementwise, fixed_plane};
use crate::ops::{BLOCK, FusedOps, KernelOp, NF4_CODE, Nf4Backend, nf4_gemv_max_rows, reference};

/// Lanes per output feature in the GEMV (a plane on CUDA).
const LANES: usize = 32;
/// Output features per GEMV cube.
const FEATURES: usize = 8;

mod kernels {
    use cubecl::{cube, prelude::*};

    #[cube]
    fn code(word: u32, j: u32, lut: &Tensor<f32>) -> f32 {
        lut[((word >> (j * 4u32)) & 15u32) as usize]
    }

    /// One thread per packed word: its 8 values, `lut[code] * absmax[block]`.
    #[cube(launch)]
    pub fn dequantize<F: Float, I: Int>(
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        output: &mut Tensor<F>,
        numel: usize,
        #[comptime] block: usize,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let w = ABSOLUTE_POS;
        let first = w * 8;
        if first >= numel {
            terminate!();
        }
        let word = u32::cast_from(packed[w]);
        if first + 8 <= numel {
            // A word never straddles an absmax block (8 divides the block size).
            let scale = absmax[first / block];
            #[unroll]
            for j in 0..8u32 {
                output[first + j as usize] = F::cast_from(code(word, j, lut) * scale);
            }
        } else {
            for j in 0..8u32 {
                let e = first + j as usize;
                if e < numel {
                    output[e] = F::cast_from(code(word, j, lut) * absmax[e / block]);
                }
            }
        }
    }

    /// `out[r, n] = sum_k x[r, k] * W[n, k]`: cube `(CUBE_POS_X, CUBE_POS_Y)` computes features
    /// `CUBE_POS_X * features ..` of input row `CUBE_POS_Y`; `lanes` threads per feature.
    #[cube(launch)]
    // `k % 8 == 0` stays: the kernel language has no `is_multiple_of`.
    #[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)]
    pub fn gemv<F: Float, I: Int>(
        x: &Tensor<F>,
        packed: &Tensor<I>,
        absmax: &Tensor<f32>,
        lut: &Tensor<f32>,
        output: &mut Tensor<F>,
        n: usize,
        k: usize,
        #[comptime] block: usize,
        #[comptime] lanes: usize,
        #[comptime] features: usize,
        #[comptime] plane: bool,
        #[define(F, I)] _dtypes: [StorageType; 2],
    ) {
        let lane = UNIT_POS_X as usize % lanes;
        let slot = UNIT_POS_X as usize / lanes;
        let feature = CUBE_POS_X as usize * features + slot;
        let r = CUBE_POS_Y as usize;
        let mut acc = 0.0f32;
        if feature < n {
            let xrow = r * k;
            let wrow = feature * k;
            if k % 8 == 0 {
                // Rows start on a word: decode whole words (8 values, one absmax).
                let words = k / 8;
                let mut w = lane;
                while w < words {
                    let e = wrow + w * 8;
                    let word = u32::cast_from(packed[e / 8]);
                    let scale = absmax[e / block];
                    let xk = xrow + w * 8;
                    let mut part = 0.0f32;
                    #[unroll]
                    for j in 0..8u32 {
                        part += code(word, j, lut) * f32::cast_from(x[xk + j as usize]);
                    }
                    acc += part * scale;
                    w += lanes;
                }
            } else {
                // Odd widths: value by value.
                let mut kk = lane;
                while kk < k {
                    let e = wrow + kk;
                    let word = u32::cast_from(packed[e / 8]);
                    let v = code(word, (e % 8) as u32, lut) * absmax[e / block];
                    acc += v * f32::cast_from(x[xrow + kk]);
                    kk += lanes;
                }
            }
        }
        if comptime!(plane) {
            // `lanes` is the plane size: one plane per feature.
            let total = plane_sum(acc);
            if lane == 0 && feature < n {
                output[r * n + feature] = F::cast_from(total);
            }
        } else {
            let mut shared = SharedMemory::<f32>::new(lanes * features);
            let t = UNIT_POS_X as usize;
            shared[t] = acc;
            sync_cube();
            let mut stride = comptime!(lanes / 2).runtime();
            while stride > 0 {
                if lane < stride {
                    shared[t] += shared[t + stride];
                }
                sync_cube();
                stride /= 2;
            }
            if lane == 0 && feature < n {
                output[r * n + feature] = F::cast_from(shared[t]);
            }
        }
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

/// absmax as a contiguous f32 tensor, whatever dtype it arrived in.
fn absmax_f32<R: CubeRuntime>(absmax: CubeTensor<R>) -> CubeTensor<R> {
    contiguous_in(absmax, DType::F32)
}

/// The dense `[out, in]` weight in `dtype`.
fn dequantize<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    shape: [usize; 2],
    dtype: DType,
) -> CubeTensor<R> {
    if KernelOp::Nf4.uses_reference() {
        return reference::nf4_dequantize::<CubeBackend<R, F, I, BT>>(
            packed,
            absmax,
            shape,
            dtype.into(),
        );
    }
    let packed = into_contiguous(packed);
    let absmax = absmax_f32(absmax);
    let lut = lut::<R, F, I, BT>(&packed.device);
    let out = alloc(&packed, &shape, dtype);
    let numel = shape[0] * shape[1];
    let (count, dim) = elementwise(&packed, numel.div_ceil(8));
    let (client, idt) = (packed.client.clone(), packed.dtype);
    kernels::dequantize::launch::<R>(
        &client,
        count,
        dim,
        packed.into_tensor_arg(),
        absmax.into_tensor_arg(),
        lut.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        numel,
        BLOCK,
        [dtype.into(), idt.into()],
    );
    out
}

/// `x [m, k] @ W^T -> [m, n]` for small `m`, decoding on the fly.
fn gemv<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: CubeTensor<R>,
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    [n, k]: [usize; 2],
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let m = x.meta.shape().num_elements() / k;
    let packed = into_contiguous(packed);
    let absmax = absmax_f32(absmax);
    let lut = lut::<R, F, I, BT>(&x.device);
    let out = alloc(&x, &[m, n], x.dtype);
    let plane = fixed_plane(&x) == Some(LANES as u32);
    let count = CubeCount::Static(n.div_ceil(FEATURES) as u32, m as u32, 1);
    let dim = CubeDim::new_1d((LANES * FEATURES) as u32);
    let (client, fdt, idt) = (x.client.clone(), x.dtype, packed.dtype);
    kernels::gemv::launch::<R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        packed.into_tensor_arg(),
        absmax.into_tensor_arg(),
        lut.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        n,
        k,
        BLOCK,
        LANES,
        FEATURES,
        plane,
        [fdt.into(), idt.into()],
    );
    out
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4Backend
    for CubeBackend<R, F, I, BT>
{
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        dequantize::<R, F, I, BT>(packed, absmax, shape, F::dtype())
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let m = x.meta.shape().num_elements() / shape[1];
        if m < nf4_gemv_max_rows() && !KernelOp::Nf4.uses_reference() {
            return gemv::<R, F, I, BT>(x, packed, absmax, shape);
        }
        // The transient dense weight, dropped (back to the pool) once the product is queued.
        let w = dequantize::<R, F, I, BT>(packed, absmax, shape, x.dtype);
        Self::matmul(x, Self::float_transpose(w))
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let w = dequantize::<R, F, I, BT>(packed, absmax, shape, dy.dtype);
        Self::matmul(dy, w)
    }
}
