//! The CubeCL kernels (through `Fusion<CubeBackend<Wgpu>>`, what `burn::backend::Wgpu` is)
//! against the dense computation and the CPU backend. Runs on any Vulkan driver, including
//! Mesa's software one (lavapipe) in CI, where plane operations are off and the
//! shared-memory reductions run: `VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json`.
//! The checks themselves are `kernels/checks.rs`, shared with `cuda_kernels.rs`.
#![cfg(feature = "wgpu")]

mod common;

type W = burn::backend::Wgpu<f32>;
type H = burn::backend::Wgpu<half::f16>;

#[path = "kernels/checks.rs"]
mod checks;
