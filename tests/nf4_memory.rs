//! Memory: a forward + backward through several NF4 layers under autodiff never holds a dense
//! copy of a weight. Its own test binary (one test) so that nothing else allocates meanwhile.

mod common;

#[path = "common/counting.rs"]
mod counting;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Int, Tensor};
use common::nf4::{host_weight, upload};
use phitune_model::ops::{self, Nf4Host};

type A = Autodiff<NdArray<f32, i32>>;

/// A forward + backward through 4 quantized [1024, 1024] layers keeps no dense weight alive:
/// the peak heap growth stays below one dense weight (4 MiB), where keeping a dequantized
/// copy per layer for the backward pass would add 16 MiB.
#[test]
fn autodiff_keeps_no_dense_weights() {
    let device = Default::default();
    let (out, inp, layers) = (1024, 1024, 4);
    let weights: Vec<(Tensor<A, 1, Int>, Tensor<A, 1>)> = (0..layers)
        .map(|l| {
            upload::<A>(
                &Nf4Host::quantize(&host_weight(out, inp, l as u64 + 7), [out, inp], false),
                &device,
            )
        })
        .collect();
    let x =
        Tensor::<A, 2>::random([2, inp], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let dense_bytes = out * inp * 4;
    let base = counting::start();
    let mut h = x.clone();
    for (packed, absmax) in &weights {
        h = ops::nf4_linear(h, packed.clone(), absmax.clone(), [out, inp]);
    }
    let after_forward = counting::live();
    let grads = h.sum().backward();
    let gx = x.grad(&grads).unwrap();
    assert_eq!(gx.dims(), [2, inp]);
    let peak = counting::peak_since(base);
    assert!(
        after_forward.saturating_sub(base) < dense_bytes / 4,
        "the forward pass retained {} bytes (a dense weight is {dense_bytes})",
        after_forward - base
    );
    assert!(
        peak < dense_bytes,
        "peak heap growth {peak} bytes reaches a dense weight ({dense_bytes})"
    );
}
