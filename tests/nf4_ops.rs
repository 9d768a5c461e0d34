//! The frozen-weight ops (NF4 fused matmul, its backward, dense frozen matmul) against the plain
//! dense computation, on ndarray, plus a memory test: a forward + backward through several
//! quantized layers under autodiff never holds a dense copy of a weight.

mod common;

use common::nf4::{check_fused, host_weight, max_diff, upload};

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Int, Tensor};
use phitune_model::nf4::{self, Nf4Host};

/// Counts live heap bytes and the peak, to prove what is (not) allocated.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type B = NdArray<f32, i32>;
type A = Autodiff<B>;

#[test]
fn fused_nf4_matches_dense_on_ndarray() {
    // Shapes include a tile boundary (256 rows), a row count not a multiple of anything,
    // widths that are not multiples of 64 (blocks straddle rows), and a single-row input.
    check_fused::<A>(
        &Default::default(),
        &[(3, 300, 128), (1, 64, 96), (17, 40, 200), (2, 513, 64)],
    );
}

#[test]
fn frozen_dense_matmul_matches_matmul() {
    let device = Default::default();
    for (m, out, inp) in [(1usize, 70usize, 33usize), (2, 130, 64), (9, 64, 300)] {
        let w = Tensor::<A, 2>::random([out, inp], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<A, 2>::random([m, inp], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let y = nf4::frozen_linear(x.clone(), w.clone());
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
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let mut h = x.clone();
    for (packed, absmax) in &weights {
        h = nf4::nf4_linear(h, packed.clone(), absmax.clone(), [out, inp]);
    }
    let after_forward = LIVE.load(Ordering::SeqCst);
    let grads = h.sum().backward();
    let gx = x.grad(&grads).unwrap();
    assert_eq!(gx.dims(), [2, inp]);
    let peak = PEAK.load(Ordering::SeqCst) - base;
    assert!(
        after_forward - base < dense_bytes / 4,
        "the forward pass retained {} bytes (a dense weight is {dense_bytes})",
        after_forward - base
    );
    assert!(
        peak < dense_bytes,
        "peak heap growth {peak} bytes reaches a dense weight ({dense_bytes})"
    );
}
