//! The frozen-weight ops (NF4 fused matmul, its backward, dense frozen matmul) against the plain
//! dense computation, on ndarray.

mod common;

use common::nf4::{check_fused, max_diff};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Tensor};
use phitune_model::ops;

type B = NdArray<f32, i32>;
type A = Autodiff<B>;

#[test]
fn fused_nf4_matches_dense_on_ndarray() {
    // Shapes include a tile boundary (256 rows), a row count not a multiple of anything,
    // widths that are not multiples of 64 (blocks straddle rows), a single-row input, and
    // 1-4 rows with whole blocks per row (the decoding path, vectorised where the CPU can).
    check_fused::<A>(
        &Default::default(),
        &[
            (3, 300, 128),
            (1, 64, 96),
            (17, 40, 200),
            (2, 513, 64),
            (4, 70, 192),
            (1, 100, 256),
        ],
    );
}

#[test]
fn frozen_dense_matmul_matches_matmul() {
    let device = Default::default();
    for (m, out, inp) in [(1usize, 70usize, 33usize), (2, 130, 64), (9, 64, 300)] {
        let w = Tensor::<A, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<A, 2>::random([m, inp], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let y = ops::frozen_linear(x.clone(), w.clone());
        let y_ref = x.clone().matmul(w.clone().transpose());
        assert!(max_diff(y.clone(), y_ref) < 1e-4 * (inp as f32).sqrt());
        let gx = x.grad(&y.sum().backward()).unwrap();
        let x2 = x.detach().require_grad();
        let gx_ref = x2
            .grad(&x2.clone().matmul(w.transpose()).sum().backward())
            .unwrap();
        assert!(max_diff(gx, gx_ref) < 1e-4 * (out as f32).sqrt());
    }
}
