//! Greedy-decode speed (KV cache on) of candle-transformers' Phi on the CPU, measured the way
//! `phitune bench` measures ours, for a side-by-side comparison on the same checkpoint.
//!
//!     RAYON_NUM_THREADS=2 candle-phi-bench --model DIR [--prompt-len 32] [--new-tokens 128] [--repeats 3]
//!     candle-phi-bench --model DIR --check     # print the first 8 greedy ids and exit
//!
//! DIR holds an HF `config.json` + `model.safetensors` in microsoft/phi-2 layout (float32 here).
//! The prompt is the same fixed pseudo-random one `phitune bench` uses: `(i * 7919 + 13) % vocab`.
//!
//! One run = clear the KV cache, prefill the whole prompt (argmax of the last position is the
//! first new token), then `new_tokens - 1` single-token decode steps, argmax each (no stop
//! token). One warm-up run, then `repeats` timed runs. Prints one JSON line:
//!     prefill_tokens_per_s  = prompt_len / median(time to first token)
//!     decode_tokens_per_s   = (new_tokens - 1) / median(total - first)
//!     generate_tokens_per_s = new_tokens / median(total)
//! (the definitions of `phitune bench`; its `generate_tokens_per_s` is what
//! benches/hf_generate.py calls `decode_tokens_per_s`).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::phi;
use serde_json::json;

struct Args {
    model: String,
    prompt_len: usize,
    new_tokens: usize,
    repeats: usize,
    check: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model: String::new(),
        prompt_len: 32,
        new_tokens: 128,
        repeats: 3,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--model" => a.model = value("--model")?,
            "--prompt-len" => a.prompt_len = value("--prompt-len")?.parse()?,
            "--new-tokens" => a.new_tokens = value("--new-tokens")?.parse()?,
            "--repeats" => a.repeats = value("--repeats")?.parse()?,
            "--check" => a.check = true,
            "-h" | "--help" => {
                println!(
                    "usage: candle-phi-bench --model DIR [--prompt-len N] [--new-tokens N] \
                     [--repeats N] [--check]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.model.is_empty() {
        bail!("--model DIR is required");
    }
    if a.prompt_len == 0 || a.new_tokens == 0 || a.repeats == 0 {
        bail!("--prompt-len, --new-tokens and --repeats must be positive");
    }
    Ok(a)
}

/// The candle-core version this was built against, read from the committed Cargo.lock.
fn candle_version() -> &'static str {
    let lock = include_str!("../Cargo.lock");
    lock.split("[[package]]")
        .find(|p| p.contains("name = \"candle-core\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("unknown")
}

fn argmax_last(logits: &Tensor) -> Result<u32> {
    // `phi::Model::forward` returns the last position's logits, shape (batch=1, vocab).
    Ok(logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?)
}

/// One greedy generation; calls `on_token` after each new token. Returns the new ids.
fn generate(
    model: &mut phi::Model,
    prompt: &[u32],
    new_tokens: usize,
    device: &Device,
    mut on_token: impl FnMut(usize),
) -> Result<Vec<u32>> {
    model.clear_kv_cache();
    let mut out = Vec::with_capacity(new_tokens);
    // Prefill (seqlen offset 0: the cache is empty).
    let input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut next = argmax_last(&model.forward(&input)?)?;
    out.push(next);
    on_token(out.len());
    // Decode: candle's Phi takes the seqlen offset from its KV cache length
    // (prompt_len + i for the i-th step), so each step feeds just the previous token.
    while out.len() < new_tokens {
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        next = argmax_last(&model.forward(&input)?)?;
        out.push(next);
        on_token(out.len());
    }
    Ok(out)
}

/// Same as phitune's: the upper median for an even count.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = std::path::Path::new(&args.model);
    let device = Device::Cpu;
    let config_json = std::fs::read(dir.join("config.json")).context("reading config.json")?;
    let config: phi::Config =
        serde_json::from_slice(&config_json).context("parsing config.json")?;
    let weights = dir.join("model.safetensors");
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
    let mut model = phi::Model::new(&config, vb)?;
    // `vocab_size` is crate-private in candle's Config; read it from the JSON.
    let vocab = serde_json::from_slice::<serde_json::Value>(&config_json)?["vocab_size"]
        .as_u64()
        .context("config.json: vocab_size")? as u32;
    let prompt: Vec<u32> = (0..args.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();

    if args.check {
        let ids = generate(&mut model, &prompt, args.new_tokens.min(8), &device, |_| {})?;
        println!(
            "{}",
            json!({"impl": "candle", "prompt_len": args.prompt_len, "first_ids": ids})
        );
        return Ok(());
    }

    let mut run = || -> Result<(f64, f64)> {
        let t = Instant::now();
        let mut first = None;
        let out = generate(&mut model, &prompt, args.new_tokens, &device, |_| {
            first.get_or_insert_with(|| t.elapsed().as_secs_f64());
        })?;
        let total = t.elapsed().as_secs_f64();
        assert_eq!(out.len(), args.new_tokens);
        Ok((first.unwrap(), total))
    };
    run()?; // warm-up
    let (mut prefill, mut decode, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let (first, total) = run()?;
        prefill.push(first);
        decode.push(total - first);
        times.push(total);
    }
    println!(
        "{}",
        json!({
            "impl": "candle",
            "candle": candle_version(),
            "threads": candle_core::utils::get_num_threads(),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_tokens_per_s": args.prompt_len as f64 / median(&prefill),
            "decode_tokens_per_s": (args.new_tokens - 1).max(1) as f64 / median(&decode),
            "generate_tokens_per_s": args.new_tokens as f64 / median(&times),
            "times_s": times,
        })
    );
    Ok(())
}
