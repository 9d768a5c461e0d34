//! Held-out evaluation: response-only loss and perplexity over the held-out split, and, on
//! request, greedy replies for the first N held-out rows scored by unigram F1 against the
//! reference (ParlAI's normalisation). Run it for the base model and for an adapter to get the
//! before/after comparison.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;
use phitune_data::batch::ExampleDataset;
use phitune_data::prompt::Example;
use phitune_data::split::{Split, split_of};
use phitune_data::{LoadOptions, PersonaRow, Template, load_source};
use phitune_model::generate::{GenerationConfig, generate};
use phitune_model::ops::Nf4Backend;
use phitune_model::sampling::SamplingConfig;
use phitune_model::{Phi, PhiTokenizer};
use serde::Serialize;
use serde_json::json;

use crate::config::TrainConfig;
use crate::lm::{CausalLm, Item, LmBatcher, LmStats};

/// Where the held-out rows come from and how they are rendered.
#[derive(Debug, Clone)]
pub struct EvalData {
    pub data: String,
    pub data_revision: Option<String>,
    pub skip_invalid: bool,
    pub template: Template,
    pub max_len: usize,
    pub valid_fraction: f64,
    /// Held-out rows used (None = all).
    pub limit: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub micro_batch: usize,
    /// Rows to generate replies for (0 = none).
    pub generate: usize,
    pub max_new_tokens: usize,
    pub repetition_penalty: f32,
    /// Batches widened to a multiple of this many positions (64 on GPUs; see
    /// [`LmBatcher::pad_multiple`]).
    pub pad_multiple: usize,
    /// Hits@1 out of this many candidates per row (0 = off; ConvAI2 uses 20).
    pub hits: usize,
}

/// The model without its adapter, to generate the same rows' replies with (`--compare-base`).
pub struct Baseline<B: Backend>(pub Phi<B>);

/// Held-out rows and their examples (same order; rows whose reference cannot fit are left out).
pub struct HeldOut {
    pub rows: Vec<PersonaRow>,
    pub examples: Vec<Example>,
}

pub fn held_out(spec: &EvalData, tok: &PhiTokenizer) -> Result<HeldOut> {
    let loaded = load_source(
        &spec.data,
        spec.data_revision.as_deref(),
        LoadOptions {
            skip_invalid: spec.skip_invalid,
        },
    )?;
    let mut rows: Vec<PersonaRow> = loaded
        .rows
        .into_iter()
        .filter(|r| split_of(&r.conv_id, spec.valid_fraction) == Split::Valid)
        .collect();
    if let Some(n) = spec.limit {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!(
            "{}: no held-out rows (valid_fraction {}); evaluate on more data or raise --valid-fraction",
            spec.data,
            spec.valid_fraction
        );
    }
    let mut kept_rows = Vec::with_capacity(rows.len());
    let mut examples = Vec::with_capacity(rows.len());
    for row in rows {
        let ds =
            ExampleDataset::build(std::slice::from_ref(&row), tok, spec.template, spec.max_len)?;
        if let Some(e) = ds.examples.into_iter().next() {
            examples.push(e);
            kept_rows.push(row);
        }
    }
    Ok(HeldOut {
        rows: kept_rows,
        examples,
    })
}

/// The template and length a run trained with, from the `config.toml` next to an adapter (a
/// run's output directory, or one of its checkpoints two levels below).
pub fn run_config_for_adapter(adapter: &Path) -> Option<TrainConfig> {
    [
        adapter.join("config.toml"),
        adapter.join("../../config.toml"),
    ]
    .iter()
    .find(|p| p.is_file())
    .and_then(|p| TrainConfig::read(p).ok())
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalSummary {
    pub model: String,
    pub adapter: Option<String>,
    /// The base weights: "nf4" or "none" (float).
    pub quant: String,
    pub template: String,
    pub rows: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub token_accuracy: f64,
    pub target_tokens: usize,
    pub generated: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// The base model's F1 on the same rows (`--compare-base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generations: Option<PathBuf>,
    /// Hits@1 out of `hits_n` candidates (`--hits`), and the base model's (`--compare-base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits_at_1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits_n: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_hits_at_1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hits: Option<PathBuf>,
    pub seconds: f64,
}

/// Loss over `held.examples`, then replies for the first `opts.generate` rows, written as JSONL
/// to `generations` (one line per row: prompt facts, reference, reply, F1), then Hits@1
/// (`opts.hits` candidates per row, written to `hits_out`; see [`crate::hits`]).
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Nf4Backend>(
    phi: Phi<B>,
    device: &B::Device,
    tok: &PhiTokenizer,
    held: &HeldOut,
    spec: &EvalData,
    opts: &EvalOptions,
    generations: Option<&Path>,
    hits_out: Option<&Path>,
    names: (String, Option<String>, String),
    base: Option<Baseline<B>>,
) -> Result<EvalSummary> {
    let t = Instant::now();
    let batcher = LmBatcher {
        pad_id: tok.eos_token_ids[0],
        pack: None,
        pad_multiple: opts.pad_multiple,
    };
    // Longest first: similar lengths per batch, and memory trouble shows at once.
    let mut order: Vec<usize> = (0..held.examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(held.examples[i].len));
    let model = CausalLm::new(phi, 1.0, 0);
    let mut sum = LmStats::default();
    let batches = order.len().div_ceil(opts.micro_batch.max(1));
    for (k, chunk) in order.chunks(opts.micro_batch.max(1)).enumerate() {
        let items: Vec<Item> = chunk
            .iter()
            .map(|&i| Item {
                position: i as u64,
                example: held.examples[i].clone(),
            })
            .collect();
        let batch = batcher.batch(items, device);
        sum.add(&model.objective(&batch).1);
        if (k + 1) % 10 == 0 || k + 1 == batches {
            progress(&format!(
                "loss: {}/{batches} batches, running loss {:.4}",
                k + 1,
                sum.loss()
            ));
        }
    }
    progress_done();
    if !sum.nll_sum.is_finite() {
        bail!("the held-out loss is not finite ({})", sum.loss());
    }

    let n = opts.generate.min(held.rows.len());
    let mut f1s = Vec::with_capacity(n);
    let mut base_f1s = Vec::with_capacity(n);
    if n > 0 {
        let path = generations.context("no output file for the generations")?;
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        let config = GenerationConfig {
            max_new_tokens: opts.max_new_tokens,
            sampling: SamplingConfig {
                repetition_penalty: opts.repetition_penalty,
                ..SamplingConfig::default()
            },
            stop_tokens: tok.eos_token_ids.clone(),
        };
        for (i, row) in held.rows.iter().take(n).enumerate() {
            let prompt = spec.template.prompt_ids(
                tok,
                &row.persona_b,
                &row.dialogue,
                spec.max_len,
                opts.max_new_tokens,
            )?;
            let reply_of = |phi: &Phi<B>| -> Result<String> {
                let ids = generate(phi, &prompt, &config, device, |_| true);
                let ids: Vec<u32> = ids.into_iter().filter(|&t| !tok.is_eos(t)).collect();
                Ok(tok.decode(&ids)?.trim().to_string())
            };
            let reply = reply_of(&model.phi)?;
            let f1 = crate::f1::unigram_f1(&reply, &row.reference);
            f1s.push(f1);
            let mut line = json!({
                "conv_id": row.conv_id,
                "persona": row.persona_b,
                "last_turn": row.dialogue.last(),
                "reference": row.reference,
                "reply": reply,
                "f1": f1,
            });
            if let Some(Baseline(base)) = &base {
                let base_reply = reply_of(base)?;
                let base_f1 = crate::f1::unigram_f1(&base_reply, &row.reference);
                base_f1s.push(base_f1);
                line["base_reply"] = json!(base_reply);
                line["base_f1"] = json!(base_f1);
                progress_done();
                eprintln!(
                    "[{i}] persona:   {}\n    them:      {}\n    reference: {}\n    base:      {base_reply}\n    adapter:   {reply}",
                    row.persona_b.join(" "),
                    row.dialogue.last().map(String::as_str).unwrap_or(""),
                    row.reference
                );
            }
            writeln!(out, "{line}").with_context(|| format!("writing {}", path.display()))?;
            if (i + 1) % 10 == 0 || i + 1 == n || is_tty() {
                progress(&format!(
                    "generate: {}/{n} rows, mean F1 {:.4}",
                    i + 1,
                    f1s.iter().sum::<f64>() / f1s.len() as f64
                ));
            }
        }
        progress_done();
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut hits = None;
    if opts.hits > 0 {
        let path = hits_out.context("no output file for the Hits@1 rows")?;
        let mut models = vec![("adapter", &model.phi)];
        if let Some(Baseline(b)) = &base {
            models.push(("base", b));
        }
        let (n, scores) = crate::hits::hits_at_1(
            &models,
            device,
            tok,
            held,
            spec.template,
            opts.hits,
            path,
            progress,
        )?;
        progress_done();
        hits = Some((n, scores));
    }
    Ok(EvalSummary {
        hits_at_1: hits.as_ref().map(|(_, s)| s[0]),
        hits_n: hits.as_ref().map(|(n, _)| *n),
        base_hits_at_1: hits.as_ref().and_then(|(_, s)| s.get(1).copied()),
        hits: hits.as_ref().and(hits_out.map(Path::to_path_buf)),
        model: names.0,
        adapter: names.1,
        quant: names.2,
        template: spec.template.to_string(),
        rows: held.examples.len(),
        loss: sum.loss(),
        perplexity: sum.loss().exp(),
        token_accuracy: sum.correct as f64 / sum.targets.max(1) as f64,
        target_tokens: sum.targets,
        generated: n,
        f1: (n > 0).then(|| f1s.iter().sum::<f64>() / n as f64),
        base_f1: (!base_f1s.is_empty()).then(|| base_f1s.iter().sum::<f64>() / n as f64),
        generations: (n > 0)
            .then(|| generations.map(Path::to_path_buf))
            .flatten(),
        seconds: t.elapsed().as_secs_f64(),
    })
}

fn is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// A progress line: rewritten in place on a terminal, one line each otherwise.
fn progress(msg: &str) {
    if is_tty() {
        eprint!("\r{msg}   ");
    } else {
        eprintln!("{msg}");
    }
}

fn progress_done() {
    if is_tty() {
        eprintln!();
    }
}
