//! The NF4 CubeCL kernels (through `Fusion<CubeBackend<Wgpu>>`, what `burn::backend::Wgpu` is)
//! against the dense computation. Runs on any Vulkan driver, including Mesa's software one
//! (lavapipe) in CI: `VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json`.
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Wgpu};

#[test]
fn fused_nf4_matches_dense_on_wgpu() {
    let device = Default::default();
    common::nf4::check_fused::<Autodiff<Wgpu<f32>>>(
        &device,
        &[(3, 300, 128), (1, 64, 96), (17, 40, 200)],
    );
}
