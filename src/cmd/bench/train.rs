//! `bench --train`: training speed of the QLoRA setup on a model of a given configuration with
//! random weights: LoRA r=4 (alpha 16, dropout 0.05) on q/k/v/dense over an NF4 (or float)
//! base, AdamW, one micro-batch of random tokens per optimizer step, the loss on every token.
//! With `--data`, micro-batches of real rows instead (their lengths and loss masks; padded, or
//! packed with `--packing`). Reports steady-state tokens/s (real tokens, after warm-up steps),
//! the median time of each phase (forward including the loss, backward, optimizer), the head's
//! share of a step (the head alone timed on the same rows) and peak memory, then greedy
//! generation speed from the trained model (KV cache on), as one JSON object.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use phitune_data::batch::{ExampleDataset, collate, pack};
use phitune_model::PhiTokenizer;
use phitune_model::lora::LoraConfig;
use phitune_model::ops::Nf4Backend;
use phitune_model::phi::Quantization;
use phitune_model::{Packing, Phi, PhiConfig};
use phitune_train::lm::{CausalLm, Head, LmBatch};
use serde::Serialize;

use super::measure::{GenReport, measure_generation, median, peak_rss_gib};
use crate::backend::Job;
use crate::cli::{BenchArgs, BenchHead, Quant};

#[derive(Debug, Serialize)]
pub struct TrainReport {
    /// Real (non-pad) tokens per second over the timed steps.
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// The head alone (vocabulary projection and cross-entropy, forward and backward to its
    /// input) on each timed step's rows, median seconds, timed apart from the step.
    pub head_s: f64,
    /// `head_s / step_s`: the share of a step spent in the head.
    pub head_share: f64,
    pub trainable_params: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    /// Peak resident memory of the process (CPU backends), GiB.
    pub peak_rss_gib: Option<f64>,
    pub step_times_s: Vec<f64>,
    /// Greedy generation with the KV cache from the trained model (NF4 base + LoRA).
    pub generation: GenReport,
}

pub struct TrainBench<'a> {
    pub args: &'a BenchArgs,
    pub config: PhiConfig,
    /// One micro-batch per step (warm-up steps first), prepared on the host.
    pub batches: Vec<HostBatch>,
}

/// A micro-batch on the host: `[batch, seq]` ids and labels (`-100` where no loss), and its
/// real (non-pad) token count.
#[derive(Debug, Clone, Serialize)]
pub struct HostBatch {
    #[serde(skip)]
    pub shape: [usize; 2],
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// Real tokens of each row (the rest is padding).
    pub lengths: Vec<usize>,
    /// With --packing: each row's example lengths, in order (each example has its own
    /// positions and attention).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<Vec<usize>>>,
    #[serde(skip)]
    pub tokens: usize,
}

impl HostBatch {
    fn flat(v: &[Vec<i64>]) -> Vec<i64> {
        v.iter().flatten().copied().collect()
    }
}

/// The bench's micro-batches: random tokens (the loss on every token), or real rows of
/// `--data` with the template's lengths and loss masks (in file order, cycling).
pub fn host_batches(args: &BenchArgs, config: &PhiConfig) -> Result<Vec<HostBatch>> {
    let (b, s) = (args.micro_batch, args.seq_len);
    let steps = args.warmup_steps + args.steps;
    let Some(data) = &args.data else {
        let vocab = config.vocab_size as i64;
        return Ok((0..steps)
            .map(|step| {
                let row = |r: usize| -> Vec<i64> {
                    (0..s)
                        .map(|j| (((r * s + j) * 7919 + step * 104_729 + 13) as i64) % vocab)
                        .collect()
                };
                let ids: Vec<Vec<i64>> = (0..b).map(row).collect();
                HostBatch {
                    shape: [b, s],
                    labels: ids.clone(),
                    input_ids: ids,
                    lengths: vec![s; b],
                    segments: None,
                    tokens: b * s,
                }
            })
            .collect());
    };
    let dir = args
        .tokenizer
        .clone()
        .or_else(|| args.model.as_ref().map(std::path::PathBuf::from))
        .context("with --data, give --tokenizer DIR (a model directory with tokenizer.json, e.g. tests/fixtures/tiny-phi) or --model DIR")?;
    let tok_config = PhiConfig::from_file(&dir.join("config.json"))?;
    let tok = PhiTokenizer::from_dir(&dir, &tok_config)?;
    let rows = phitune_data::load::load_path(data, Default::default())?.rows;
    let examples = ExampleDataset::build(&rows, &tok, args.template, args.max_len)?.examples;
    if examples.is_empty() {
        bail!(
            "{}: no examples fit --max-len {}",
            data.display(),
            args.max_len
        );
    }
    let pad = tok.eos_token_ids[0];
    let batches: Vec<HostBatch> = (0..steps)
        .map(|step| {
            let items: Vec<_> = (0..b)
                .map(|i| examples[(step * b + i) % examples.len()].clone())
                .collect();
            let (h, segments) = if args.packing {
                let p = pack(&items, pad, args.max_len);
                (p.host, Some(p.rows))
            } else {
                (collate(&items, pad), None)
            };
            let rows =
                |v: Vec<i64>| -> Vec<Vec<i64>> { v.chunks(h.seq).map(<[i64]>::to_vec).collect() };
            let lengths = match &segments {
                Some(rows) => rows.iter().map(|r| r.iter().sum()).collect(),
                None => items.iter().map(|e| e.len).collect(),
            };
            HostBatch {
                shape: [h.batch, h.seq],
                input_ids: rows(h.input_ids),
                labels: rows(h.labels),
                lengths,
                segments,
                tokens: items.iter().map(|e| e.len).sum(),
            }
        })
        .collect();
    if let Some(id) = batches
        .iter()
        .flat_map(|b| b.input_ids.iter().flatten())
        .find(|&&id| id as usize >= config.vocab_size)
    {
        bail!(
            "token id {id} of {} is outside the model's vocabulary ({})",
            dir.display(),
            config.vocab_size
        );
    }
    if let Some(out) = &args.batches_out {
        let text: String = batches
            .iter()
            .map(|b| serde_json::to_string(b).map(|l| l + "\n"))
            .collect::<Result<_, _>>()?;
        std::fs::write(out, text).with_context(|| out.display().to_string())?;
    }
    Ok(batches)
}

impl Job for TrainBench<'_> {
    type Output = TrainReport;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<TrainReport> {
        if self.args.grad_checkpointing {
            run_on::<Autodiff<B, BalancedCheckpointing>>(self, device)
        } else {
            run_on::<Autodiff<B>>(self, device)
        }
    }
}

fn run_on<AB>(bench: TrainBench<'_>, device: AB::Device) -> Result<TrainReport>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let (args, config) = (bench.args, &bench.config);
    let quant = (args.base_quant() == Quant::Nf4).then_some(Quantization { double_quant: true });
    AB::seed(&device, 42);
    let lora = LoraConfig::seed();
    let t = Instant::now();
    let phi = Phi::<AB>::random_with(config, &device, quant).with_lora(&lora, 42, &device);
    let _ = AB::sync(&device);
    eprintln!(
        "bench: model with random weights ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let trainable = burn::module::Module::num_params(&phi);
    let head = match args.head {
        BenchHead::Full => Head::Full,
        BenchHead::Targets => Head::default(),
    };
    let mut model = CausalLm::new(phi, 1.0, 42).with_head(head);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AB, CausalLm<AB>>();
    let batch = |step: usize| -> LmBatch<AB> {
        let h = &bench.batches[step];
        let (ids, labels) = (HostBatch::flat(&h.input_ids), HostBatch::flat(&h.labels));
        let batch = LmBatch::from_host(ids, labels, h.shape, step as u64, h.tokens, &device);
        match &h.segments {
            Some(rows) => {
                batch.packed(Packing::new(rows.clone(), h.shape[1]).expect("packed to fit"))
            }
            None => batch,
        }
    };
    let mut tokens = 0;
    let sync = |d: &AB::Device| {
        let _ = AB::sync(d);
    };
    let (mut fwd, mut bwd, mut opt, mut steps) = (vec![], vec![], vec![], vec![]);
    let mut head = vec![];
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for step in 0..args.warmup_steps + args.steps {
        let input = batch(step);
        sync(&device);
        let t0 = Instant::now();
        AB::seed(&device, step as u64);
        let (loss, stats) = model.objective(&input); // syncs: the statistics come to the host
        let t1 = Instant::now();
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, &model);
        sync(&device);
        let t2 = Instant::now();
        model = optim.step(1e-4, model, grads);
        sync(&device);
        let t3 = Instant::now();
        if step == 0 {
            first = stats.loss();
        }
        last = stats.loss();
        eprintln!(
            "bench: step {}/{} ({}): {:.3} s, loss {:.4}",
            step + 1,
            args.warmup_steps + args.steps,
            if step < args.warmup_steps {
                "warm-up"
            } else {
                "timed"
            },
            (t3 - t0).as_secs_f64(),
            last
        );
        if step >= args.warmup_steps {
            tokens += input.tokens;
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt.push((t3 - t2).as_secs_f64());
            steps.push((t3 - t0).as_secs_f64());
            head.push(head_seconds(&model, &input, config.hidden_size, &device));
        }
    }
    let total: f64 = steps.iter().sum();
    let peak_rss_gib = peak_rss_gib();
    let a = args;
    eprintln!(
        "bench: timing greedy generation ({} prompt + {} new tokens, {} repeats after a warm-up)",
        a.prompt_len, a.new_tokens, a.repeats
    );
    let generation = measure_generation(
        &burn::module::AutodiffModule::valid(&model.phi),
        a.prompt_len,
        a.new_tokens,
        a.repeats,
        &device,
    );
    Ok(TrainReport {
        tokens_per_s: tokens as f64 / total,
        step_s: median(&steps),
        forward_s: median(&fwd),
        backward_s: median(&bwd),
        optimizer_s: median(&opt),
        head_s: median(&head),
        head_share: median(&head) / median(&steps),
        trainable_params: trainable,
        loss_first: first,
        loss_last: last,
        peak_rss_gib,
        step_times_s: steps,
        generation,
    })
}

/// Seconds of the model's head alone on `input`'s rows (every position for the full head, the
/// targets for the target-only one): forward and backward from random final hidden states.
fn head_seconds<AB>(
    model: &CausalLm<AB>,
    input: &LmBatch<AB>,
    hidden: usize,
    device: &AB::Device,
) -> f64
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let [b, s] = input.input_ids.dims();
    let h = Tensor::<AB, 2>::random([b * s, hidden], Distribution::Normal(0.0, 1.0), device)
        .require_grad();
    let _ = AB::sync(device);
    let t = Instant::now();
    let (nll, _) = model.head(h.clone(), input);
    let grads = nll.backward();
    let _ = h.grad(&grads).map(|g| g.into_data());
    t.elapsed().as_secs_f64()
}
