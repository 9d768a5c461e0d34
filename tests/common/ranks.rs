//! Runs of several ranks against one device or process (`--devices`, MPI): the same
//! arguments, and the check that two runs are the same run.

use std::path::Path;

use phitune_train::metrics::{self, Record};

use super::*;

const SAMPLE: &str = "data/samples/persona_chat_sample.jsonl";

/// 4 micro-batches of 1 sequence per optimizer step, LoRA dropout on (its masks must follow the
/// micro-batch, not the rank), a checkpoint every 2 steps and held-out evaluation every 2.
pub fn args(out: &Path, placement: &[&str], extra: &[&str]) -> Vec<String> {
    let tiny = fixtures().join("tiny-phi");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut a: Vec<String> = [
        "train",
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        root.join(SAMPLE).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "6",
        "--micro-batch",
        "1",
        "--grad-accum",
        "4",
        "--lr",
        "1e-3",
        "--lora-dropout",
        "0.1",
        "--valid-fraction",
        "0.1",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--grad-checkpointing",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(placement.iter().chain(extra).map(|s| s.to_string()));
    a
}

pub fn run(args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    phitune(&a)
}

pub fn records(out: &Path) -> Vec<Record> {
    metrics::read(&out.join("metrics.jsonl")).unwrap()
}

/// Every train and valid record of `b` equals `a`'s (loss, gradient norm, tokens), and so do
/// the final adapters' factors.
pub fn assert_same_run(a: &Path, b: &Path) {
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len(), "{} vs {} records", ra.len(), rb.len());
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!((&x.split, x.step), (&y.split, y.step));
        assert_eq!(x.tokens, y.tokens, "{} step {}: tokens", x.split, x.step);
        assert!(
            (x.loss - y.loss).abs() < 1e-5,
            "{} step {}: loss {} vs {}",
            x.split,
            x.step,
            x.loss,
            y.loss
        );
        if let (Some(g), Some(h)) = (x.grad_norm, y.grad_norm) {
            assert!(
                (g - h).abs() < 1e-5,
                "step {}: gradient norm {g} vs {h}",
                x.step
            );
        }
        assert_eq!(x.grad_norm.is_some(), y.grad_norm.is_some());
    }
    let read = |d: &Path| phitune_model::io::adapter::Adapter::read(d).unwrap();
    let (wa, wb) = (read(a), read(b));
    assert_eq!(wa.modules.len(), wb.modules.len());
    let mut moved = 0f32;
    for (k, ma) in &wa.modules {
        let mb = &wb.modules[k];
        for (what, x, y) in [("A", &ma.a, &mb.a), ("B", &ma.b, &mb.b)] {
            let diff = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{k}: {what} differs by {diff}");
        }
        moved = ma.b.iter().fold(moved, |m, v| m.max(v.abs()));
    }
    // B starts at zero: the comparison means something only if training moved it.
    assert!(
        moved > 1e-4,
        "the adapter did not train (max |B| = {moved})"
    );
}
