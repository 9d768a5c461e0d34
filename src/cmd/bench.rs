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
    println!(
        "{}",
        json!({
            "impl": "phitune",
            "device": device.to_string(),
            "dtype": format!("{dtype:?}").to_lowercase(),
            "threads": rayon_threads(),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_tokens_per_s": report.prefill_tps,
            "decode_tokens_per_s": report.decode_tps,
        "generate_tokens_per_s": report.generate_tps,
            "times_s": report.times,
        })
    );
    Ok(())
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

struct Report {
    prefill_tps: f64,
    decode_tps: f64,
    /// new tokens / whole generate call (prefill included), as HF's benchmark reports it.
    generate_tps: f64,
    times: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Job for Bench<'_> {
    type Output = Report;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Report> {
        let model: Phi<B> = match &self.checkpoint {
            Some(c) => Phi::load(c, &device)?,
            None => Phi::random(&self.config, &device),
        };
        let vocab = model.vocab_size() as u32;
        // A fixed pseudo-random prompt (no tokenizer needed).
        let prompt: Vec<u32> = (0..self.args.prompt_len as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let config = GenerationConfig {
            max_new_tokens: self.args.new_tokens,
            sampling: Default::default(),
            stop_tokens: vec![],
        };
        let run = || {
            let t = Instant::now();
            let mut first = None;
            let out = generate(&model, &prompt, &config, &device, |_| {
                first.get_or_insert_with(|| t.elapsed().as_secs_f64());
                true
            });
            assert_eq!(out.len(), self.args.new_tokens);
            (first.unwrap(), t.elapsed().as_secs_f64())
        };
        run(); // warm-up
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut times = Vec::new();
        for _ in 0..self.args.repeats {
            let (first, total) = run();
            prefill.push(first);
            times.push(total);
            decode.push(total - first);
        }
        Ok(Report {
            prefill_tps: self.args.prompt_len as f64 / median(&prefill),
            // The first new token comes out of the prefill pass; the rest are decode steps.
            decode_tps: (self.args.new_tokens - 1).max(1) as f64 / median(&decode),
            generate_tps: self.args.new_tokens as f64 / median(&times),
            times,
        })
    }
}
