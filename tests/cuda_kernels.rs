//! The kernel checks of `kernels/checks.rs` on CUDA (`burn::backend::Cuda`), where plane
//! (warp) operations are on and the matmul has tensor-core paths: what lavapipe in CI cannot
//! show. Needs an NVIDIA GPU, so CI only compiles it; `benches/gpu.sh` runs it first, from a
//! binary built here with
//! `cargo test --release --features cuda --test cuda_kernels --no-run`.
#![cfg(feature = "cuda")]

mod common;

type W = burn::backend::Cuda<f32>;
type H = burn::backend::Cuda<half::f16>;
/// `W` without fusion: where the padded tensors of `kernels/padded.rs` are built.
type Inner = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

#[path = "kernels/checks.rs"]
mod checks;
#[path = "kernels/padded.rs"]
mod padded;
