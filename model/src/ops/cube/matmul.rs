//! Exact f32 products on CubeCL. Burn's autotuned matmul ranks the tensor-core ("accelerated")
//! kernels of cubek-matmul first, and those take f32 operands as TF32 wherever the device has it
//! (CUDA from Ampere on): each operand rounded to a 10-bit mantissa, ~5e-4 relative, before
//! the product. PyTorch keeps f32 products in f32 by default (`allow_tf32 = False`), and so do
//! we: an f32 product launches cubek's unit matmul (each thread a register tile, f32 fused
//! multiply-adds, no matrix units) directly, and falls back to the naive kernel where the unit
//! one cannot be set up for the problem. `--tf32` (`ops::set_allow_tf32`) hands f32 back to
//! Burn's autotuned matmul. Half-precision products never come here.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::matmul::init_matmul_output;
use burn_cubecl::tensor::CubeTensor;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{Strategy, launch_ref};
use cubek::matmul::routines::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::routines::{BlueprintStrategy, TileSizeSelection};
use cubek::std::InputBinding;

use super::contiguous_in;

/// `lhs [..., m, k] @ rhs [..., k, n]` in `lhs`'s dtype without matrix units. Operands may be
/// strided (transposed views, padded rows): cubek reads them through their strides and copies
/// only layouts it cannot read.
pub(super) fn exact<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
    let dtype = lhs.dtype;
    let rhs = if rhs.dtype == dtype {
        rhs
    } else {
        contiguous_in(rhs, dtype)
    };
    let out = init_matmul_output(&lhs, &rhs, dtype);
    let unit = Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs {
        tile_size: TileSizeSelection::MaxTileSize,
    }));
    let launch = |strategy: &Strategy| {
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: dtype.into(),
            rhs: dtype.into(),
            out: dtype.into(),
        });
        launch_ref(
            strategy,
            &out.client,
            InputBinding::new(lhs.clone().binding(), dtype.into()),
            InputBinding::new(rhs.clone().binding(), dtype.into()),
            out.clone().binding(),
            &mut dtypes,
        )
    };
    if let Err(unit_err) = launch(&unit) {
        // The naive kernel takes any problem; failing it is a bug, not an input error.
        if let Err(naive_err) = launch(&Strategy::Naive) {
            panic!(
                "the exact {dtype:?} matmul could not be launched: unit kernel {unit_err:?}, \
                 naive kernel {naive_err:?}"
            );
        }
    }
    out
}

/// Whether an f32 product takes [`exact`] instead of Burn's autotuned matmul.
pub(super) fn is_exact(dtype: DType) -> bool {
    dtype == DType::F32
        && !crate::ops::allow_tf32()
        && !crate::ops::KernelOp::Matmul.uses_reference()
}
