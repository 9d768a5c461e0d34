//! Memory of the target-only head: a forward + backward over 4096 target rows and a 4096-token
//! vocabulary holds one chunk of logits at a time, never `[rows, vocab]`. Its own test binary
//! (one test) so that nothing else allocates meanwhile.

#[path = "common/counting.rs"]
mod counting;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use phitune_model::ops;

type A = Autodiff<NdArray<f32, i32>>;

#[test]
fn the_head_holds_one_chunk_of_logits() {
    let device = Default::default();
    let (rows, hidden, vocab, chunk) = (4096usize, 64usize, 4096usize, 256usize);
    let w = Tensor::<A, 2>::random([vocab, hidden], Distribution::Normal(0.0, 0.1), &device);
    let bias = Tensor::<A, 1>::random([vocab], Distribution::Normal(0.0, 0.1), &device);
    let targets: Vec<i32> = (0..rows as i32)
        .map(|i| (i * 7919) % vocab as i32)
        .collect();
    let targets = Tensor::<A, 1, Int>::from_data(TensorData::new(targets, [rows]), &device);
    let h = Tensor::<A, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device)
        .require_grad();
    let full = rows * vocab * 4;
    let one_chunk = chunk * vocab * 4;
    // The CPU's GEMM (the `gemm` crate) gives each thread an L2-sized packing scratch on that
    // thread's first product and keeps it for the life of the thread, whatever the product's
    // size: run the head once first (without autodiff, so no graph of it is left to free later)
    // so that the fixed scratch is not counted as the head's.
    let _ = ops::head_cross_entropy(
        h.clone().inner(),
        w.clone().inner(),
        Some(bias.clone().inner()),
        targets.clone().inner(),
        chunk,
    );
    let base = counting::start();
    // The weight and bias stay alive (as they do in a model) so that freeing them at the end of
    // the forward cannot hide what the forward keeps.
    let (nll, _) =
        ops::head_cross_entropy(h.clone(), w.clone(), Some(bias.clone()), targets, chunk);
    let after_forward = counting::live();
    let grads = nll.sum().backward();
    let gh = h.grad(&grads).unwrap();
    assert_eq!(gh.dims(), [rows, hidden]);
    let peak = counting::peak_since(base);
    eprintln!(
        "head: forward retained {} bytes, peak {peak} bytes; one chunk of logits {one_chunk}, all {full}",
        after_forward.saturating_sub(base)
    );
    // The state kept for the backward is each row's input gradient ([rows, hidden]), not logits.
    // The lower bound checks the measurement itself: that state must be seen.
    let retained = after_forward.saturating_sub(base);
    let row_grads = rows * hidden * 4;
    assert!(
        (row_grads..one_chunk).contains(&retained),
        "the forward retained {retained} bytes (each row's input gradient is {row_grads}, \
         one chunk of logits {one_chunk})"
    );
    // A few chunk-sized temporaries (logits, their bias sum, the logits' gradient) at most.
    assert!(
        peak < 4 * one_chunk && peak < full / 4,
        "peak heap growth {peak} bytes (one chunk {one_chunk}, all logits {full})"
    );
}
