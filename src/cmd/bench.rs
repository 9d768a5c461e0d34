//! `bench`: speed on a model of a given configuration (random weights by default), as JSON.

use std::time::Instant;

use anyhow::{Result, bail};
use phitune_model::generate::{GenerationConfig, generate};
use phitune_model::nf4::Nf4Backend;
use phitune_model::{Checkpoint, Phi, PhiConfig};
use serde_json::json;

use crate::backend::{Job, dispatch};
use crate::cli::BenchArgs;

/// phi-2's vocabulary and head geometry at a size a laptop CPU runs in seconds.
pub fn bench_config() -> PhiConfig {
    let mut c = PhiConfig::phi2();
    c.hidden_size = 640;
    c.num_attention_heads = 8;
    c.num_key_value_heads = Some(8);
    c.num_hidden_layers = 4;
    c.intermediate_size = 2560;
    c
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.prompt_len == 0 || args.new_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-len, --new-tokens and --repeats must be positive");
    }
    let config = match args.config.as_str() {
        "bench" => bench_config(),
        "phi-2" | "phi2" => PhiConfig::phi2(),
        path => PhiConfig::from_file(std::path::Path::new(path))?,
    };
    let checkpoint = args
        .model
        .as_deref()
        .map(|m| Checkpoint::open(std::path::Path::new(m)))
        .transpose()?;
    let (device, dtype) = args.device.resolve();
    if args.train {
        if args.micro_batch == 0 || args.seq_len < 2 || args.steps == 0 {
            bail!("--micro-batch and --steps must be positive and --seq-len at least 2");
        }
        let r = dispatch(
            device,
            dtype,
            super::bench_train::TrainBench {
                args: &args,
                config,
            },
        )?;
        println!(
            "{}",
            json!({
                "impl": "phitune",
                "mode": "train",
                "device": device.to_string(),
                "dtype": format!("{dtype:?}").to_lowercase(),
                "threads": rayon_threads(),
                "quant": format!("{:?}", args.quant).to_lowercase(),
                "micro_batch": args.micro_batch,
                "seq_len": args.seq_len,
                "grad_checkpointing": args.grad_checkpointing,
                "report": r,
            })
        );
        return Ok(());
    }
    let report = dispatch(
        device,
        dtype,
        Bench {
            args: &args,
            config,
            checkpoint,
        },
    )?;
    let mut out = json!({
        "impl": "phitune",
        "device": device.to_string(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "threads": rayon_threads(),
    });
    merge(&mut out, serde_json::to_value(report)?);
    println!("{out}");
    Ok(())
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

struct Bench<'a> {
    args: &'a BenchArgs,
    config: PhiConfig,
    checkpoint: Option<Checkpoint>,
}

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

impl Job for Bench<'_> {
    type Output = GenReport;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<GenReport> {
        let model: Phi<B> = match &self.checkpoint {
            Some(c) => Phi::load(c, &device)?,
            None => Phi::random(&self.config, &device),
        };
        let a = self.args;
        Ok(measure_generation(
            &model,
            a.prompt_len,
            a.new_tokens,
            a.repeats,
            &device,
        ))
    }
}
