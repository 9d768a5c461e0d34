//! The measurements `bench` makes, shared by its generation and training runs.

use std::time::Instant;

use phitune_model::Phi;
use phitune_model::generate::{GenerationConfig, generate};
use phitune_model::ops::Nf4Backend;

/// Greedy generation speed with the KV cache.
#[derive(Debug, serde::Serialize)]
pub struct GenReport {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub prefill_tokens_per_s: f64,
    /// New tokens after the first / the time after the first (the per-token decode steps).
    pub decode_tokens_per_s: f64,
    /// New tokens / the whole call (prefill included), as HF's benchmark reports it.
    pub generate_tokens_per_s: f64,
    pub times_s: Vec<f64>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `repeats` greedy generations (after one warm-up) of `new_tokens` from a fixed
/// pseudo-random prompt of `prompt_len` tokens (no tokenizer needed).
pub fn measure_generation<B: Nf4Backend>(
    model: &Phi<B>,
    prompt_len: usize,
    new_tokens: usize,
    repeats: usize,
    device: &B::Device,
) -> GenReport {
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let config = GenerationConfig {
        max_new_tokens: new_tokens,
        sampling: Default::default(),
        stop_tokens: vec![],
    };
    let run = || {
        let t = Instant::now();
        let mut first = None;
        let out = generate(model, &prompt, &config, device, |_| {
            first.get_or_insert_with(|| t.elapsed().as_secs_f64());
            true
        });
        assert_eq!(out.len(), new_tokens);
        (first.unwrap(), t.elapsed().as_secs_f64())
    };
    run(); // warm-up
    let (mut prefill, mut decode, mut times) = (vec![], vec![], vec![]);
    for _ in 0..repeats {
        let (first, total) = run();
        prefill.push(first);
        times.push(total);
        decode.push(total - first);
    }
    GenReport {
        prompt_len,
        new_tokens,
        prefill_tokens_per_s: prompt_len as f64 / median(&prefill),
        // The first new token comes out of the prefill pass; the rest are decode steps.
        decode_tokens_per_s: (new_tokens - 1).max(1) as f64 / median(&decode),
        generate_tokens_per_s: new_tokens as f64 / median(&times),
        times_s: times,
    }
}

/// VmHWM of this process (Linux).
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// The CPU threads the run uses (rayon's pool).
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}
