//! The CubeCL kernels (through `Fusion<CubeBackend<Wgpu>>`, what `burn::backend::Wgpu` is)
//! against the dense computation and the CPU backend. Runs on any Vulkan driver, including
//! Mesa's software one (lavapipe) in CI, where plane operations are off and the
//! shared-memory reductions run: `VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json`.
//! The checks themselves are `kernels/checks.rs`, shared with `cuda_kernels.rs`.
#![cfg(feature = "wgpu")]

mod common;

type W = burn::backend::Wgpu<f32>;
type H = burn::backend::Wgpu<half::f16>;
/// `W` without fusion: where the padded tensors of `kernels/padded.rs` are built.
type Inner = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

#[path = "kernels/checks.rs"]
mod checks;
#[path = "kernels/padded.rs"]
mod padded;
