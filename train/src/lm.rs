//! The causal-LM objective on Phi as burn-train steps: response-only cross-entropy (labels
//! `-100` ignored, logits shifted by one as transformers does), token accuracy, and the host-side
//! statistics every metric and log line is computed from.

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use phitune_data::batch::collate;
use phitune_data::prompt::{Example, IGNORE};
use phitune_model::Phi;
use phitune_model::ops::Nf4Backend;
use phitune_model::ops::cross_entropy;

/// Phi with the training objective. `loss_scale` multiplies the loss before `backward` (1 /
/// gradient-accumulation steps, so that accumulated gradients are those of the mean).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub phi: Phi<B>,
    pub loss_scale: f64,
    /// Dropout masks come from a seed stream started from this and the batch's position before
    /// every training step: a resumed run (on any backend) draws the same masks.
    pub seed: u64,
}

/// One example and its position in the run's stream of training examples.
#[derive(Debug, Clone)]
pub struct Item {
    pub position: u64,
    pub example: Example,
}

/// A padded micro-batch.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub labels: Tensor<B, 2, Int>,
    /// Position of the first example in the training stream.
    pub position: u64,
    pub sequences: usize,
    /// Tokens that count in the loss (after the shift).
    pub targets: usize,
    /// All tokens fed, padding excluded.
    pub tokens: usize,
}

#[derive(Debug, Clone)]
pub struct LmBatcher {
    pub pad_id: u32,
}

impl<B: Backend> Batcher<B, Item, LmBatch<B>> for LmBatcher {
    fn batch(&self, items: Vec<Item>, device: &B::Device) -> LmBatch<B> {
        let position = items.first().map_or(0, |i| i.position);
        let examples: Vec<Example> = items.into_iter().map(|i| i.example).collect();
        let h = collate(&examples, self.pad_id);
        let targets = examples
            .iter()
            .map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count())
            .sum();
        let tokens = examples.iter().map(|e| e.len).sum();
        let t = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [h.batch, h.seq]), device);
        LmBatch {
            input_ids: t(h.input_ids),
            labels: t(h.labels),
            position,
            sequences: h.batch,
            targets,
            tokens,
        }
    }
}

/// What one micro-batch produced, on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LmStats {
    /// Sum of the target tokens' negative log-likelihoods.
    pub nll_sum: f64,
    pub targets: usize,
    /// Targets that were the argmax prediction.
    pub correct: usize,
    pub tokens: usize,
    pub sequences: usize,
    /// Wall time of the step that produced this (set by the step loop).
    pub seconds: f64,
}

impl LmStats {
    pub fn loss(&self) -> f64 {
        if self.targets == 0 {
            0.0
        } else {
            self.nll_sum / self.targets as f64
        }
    }

    pub fn add(&mut self, o: &LmStats) {
        self.nll_sum += o.nll_sum;
        self.targets += o.targets;
        self.correct += o.correct;
        self.tokens += o.tokens;
        self.sequences += o.sequences;
        self.seconds += o.seconds;
    }
}

impl ItemLazy for LmStats {
    type ItemSync = LmStats;
    fn sync(self) -> LmStats {
        self
    }
}

impl<B: Nf4Backend> CausalLm<B> {
    pub fn new(phi: Phi<B>, loss_scale: f64, seed: u64) -> Self {
        Self {
            phi,
            loss_scale,
            seed,
        }
    }

    /// Mean loss over the batch's target tokens (a `[1]` tensor) and the batch's statistics.
    pub fn objective(&self, batch: &LmBatch<B>) -> (Tensor<B, 1>, LmStats) {
        let [b, s] = batch.input_ids.dims();
        let device = batch.labels.device();
        let logits = self
            .phi
            .forward(batch.input_ids.clone())
            .cast(FloatDType::F32);
        let vocab = logits.dims()[2];
        // Position i predicts label i + 1; the last position of each sequence predicts nothing.
        let none = Tensor::full([b, 1], IGNORE, &device);
        let targets = if s > 1 {
            Tensor::cat(vec![batch.labels.clone().narrow(1, 1, s - 1), none], 1)
        } else {
            none
        }
        .reshape([b * s]);
        let (nll, predicted) = cross_entropy(logits.reshape([b * s, vocab]), targets.clone());
        let correct = predicted
            .equal(targets.clone())
            .bool_and(targets.greater_equal_elem(0))
            .int()
            .sum();
        let nll_sum = nll.sum();
        let loss = nll_sum.clone() / (batch.targets.max(1) as f64);
        let host = Tensor::cat(
            vec![nll_sum.detach(), correct.float().cast(FloatDType::F32)],
            0,
        )
        .into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .unwrap_or_default();
        let stats = LmStats {
            nll_sum: host.first().copied().unwrap_or(f64::NAN),
            targets: batch.targets,
            correct: host.get(1).map_or(0, |&c| c as usize),
            tokens: batch.tokens,
            sequences: batch.sequences,
            seconds: 0.0,
        };
        (loss, stats)
    }
}

/// Seed for the dropout masks of the micro-batch starting at `position`.
pub fn step_seed(seed: u64, position: u64) -> u64 {
    // SplitMix64 of the pair: nearby positions give unrelated seeds.
    phitune_model::ops::splitmix64(seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl<B> TrainStep for CausalLm<B>
where
    B: AutodiffBackend + Nf4Backend,
    B::InnerBackend: Nf4Backend,
{
    type Input = LmBatch<B>;
    type Output = LmStats;

    fn step(&self, batch: LmBatch<B>) -> TrainOutput<LmStats> {
        let seed = step_seed(self.seed, batch.position);
        phitune_model::ops::start_dropout_stream(seed);
        // Only Burn's own dropout (a backend without seeded dropout) draws from the generator.
        B::seed(&batch.input_ids.device(), seed);
        let (loss, stats) = self.objective(&batch);
        let grads = (loss * self.loss_scale).backward();
        TrainOutput::new(self, grads, stats)
    }
}

impl<B: Nf4Backend> InferenceStep for CausalLm<B> {
    type Input = LmBatch<B>;
    type Output = LmStats;

    fn step(&self, batch: LmBatch<B>) -> LmStats {
        self.objective(&batch).1
    }
}
