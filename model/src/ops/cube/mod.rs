//! CubeCL backends (CUDA, wgpu, ROCm; feature `cube`): `#[cube]` kernels and their launchers,
//! one file per op.

mod nf4;

use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::FusedOps;

// The tensor-op defaults (see `reference.rs`) until the fused ops have CubeCL kernels.
impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FusedOps
    for CubeBackend<R, F, I, BT>
{
}
