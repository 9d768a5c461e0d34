//! `bench --train`: training speed of the QLoRA setup on a model of a given configuration with
//! random weights: LoRA r=4 (alpha 16, dropout 0.05) on q/k/v/dense over an NF4 (or float)
//! base, AdamW, one micro-batch of random tokens per optimizer step, the loss on every token.
//! Reports steady-state tokens/s (after warm-up steps), the median time of each phase (forward
//! including the loss, backward, optimizer) and peak memory, then greedy generation speed from
//! the trained model (KV cache on), as one JSON object.

use std::time::Instant;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use phitune_model::lora::LoraConfig;
use phitune_model::ops::Nf4Backend;
use phitune_model::phi::Quantization;
use phitune_model::{Phi, PhiConfig};
use phitune_train::lm::{CausalLm, LmBatch};
use serde::Serialize;

use super::measure::{GenReport, measure_generation, median, peak_rss_gib};
use crate::backend::Job;
use crate::cli::{BenchArgs, Quant};

#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
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
}

impl Job for TrainBench<'_> {
    type Output = TrainReport;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<TrainReport> {
        if self.args.grad_checkpointing {
            run_on::<Autodiff<B, BalancedCheckpointing>>(self.args, &self.config, device)
        } else {
            run_on::<Autodiff<B>>(self.args, &self.config, device)
        }
    }
}

fn run_on<AB>(args: &BenchArgs, config: &PhiConfig, device: AB::Device) -> Result<TrainReport>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let quant = (args.quant == Quant::Nf4).then_some(Quantization { double_quant: true });
    AB::seed(&device, 42);
    let lora = LoraConfig::seed();
    let phi = Phi::<AB>::random_with(config, &device, quant).with_lora(&lora, 42, &device);
    let trainable = burn::module::Module::num_params(&phi);
    let mut model = CausalLm::new(phi, 1.0, 42);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AB, CausalLm<AB>>();
    let (b, s) = (args.micro_batch, args.seq_len);
    let vocab = config.vocab_size as i64;
    let batch = |step: usize| -> LmBatch<AB> {
        let ids: Vec<i64> = (0..b * s)
            .map(|i| ((i * 7919 + step * 104_729 + 13) as i64) % vocab)
            .collect();
        let t = Tensor::<AB, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
        LmBatch {
            input_ids: t.clone(),
            labels: t,
            position: step as u64,
            sequences: b,
            targets: b * (s - 1),
            tokens: b * s,
        }
    };
    let sync = |d: &AB::Device| {
        let _ = AB::sync(d);
    };
    let (mut fwd, mut bwd, mut opt, mut steps) = (vec![], vec![], vec![], vec![]);
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
        if step >= args.warmup_steps {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt.push((t3 - t2).as_secs_f64());
            steps.push((t3 - t0).as_secs_f64());
        }
    }
    let total: f64 = steps.iter().sum();
    let peak_rss_gib = peak_rss_gib();
    let a = args;
    let generation = measure_generation(
        &burn::module::AutodiffModule::valid(&model.phi),
        a.prompt_len,
        a.new_tokens,
        a.repeats,
        &device,
    );
    Ok(TrainReport {
        tokens_per_s: (args.steps * b * s) as f64 / total,
        step_s: median(&steps),
        forward_s: median(&fwd),
        backward_s: median(&bwd),
        optimizer_s: median(&opt),
        trainable_params: trainable,
        loss_first: first,
        loss_last: last,
        peak_rss_gib,
        step_times_s: steps,
        generation,
    })
}
