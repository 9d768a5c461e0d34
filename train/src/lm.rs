//! The causal-LM objective on Phi as burn-train steps: response-only cross-entropy (labels
//! `-100` ignored, logits shifted by one as transformers does), token accuracy, and the host-side
//! statistics every metric and log line is computed from.

use burn::data::dataloader::batcher::Batcher;
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use phitune_data::batch::{collate, pack, pad_to_multiple};
use phitune_data::prompt::{Example, IGNORE};
use phitune_model::ops::Nf4Backend;
use phitune_model::ops::cross_entropy;
use phitune_model::{Packing, Phi};

/// Phi with the training objective. `loss_scale` multiplies the loss before `backward` (1 /
/// gradient-accumulation steps, so that accumulated gradients are those of the mean).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub phi: Phi<B>,
    pub loss_scale: f64,
    #[module(skip)]
    pub head: Head,
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

/// A micro-batch: one example per row, padded to the longest, or (packed) several examples
/// per row, each on its own.
#[derive(Debug, Clone)]
pub struct LmBatch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub labels: Tensor<B, 2, Int>,
    /// Where the examples lie when rows are packed.
    pub packing: Option<Packing>,
    /// Row-major positions (in the flattened `[batch * seq]`) whose next-token label counts,
    /// and those labels: what the target-only head reads.
    pub target_rows: Tensor<B, 1, Int>,
    pub target_ids: Tensor<B, 1, Int>,
    /// Position of the first example in the training stream.
    pub position: u64,
    /// Examples (not rows: a packed row holds several).
    pub sequences: usize,
    /// Tokens that count in the loss (after the shift).
    pub targets: usize,
    /// All tokens fed, padding excluded.
    pub tokens: usize,
}

impl<B: Backend> LmBatch<B> {
    /// The same micro-batch on `device` (data parallelism hands batches to other devices).
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            input_ids: self.input_ids.to_device(device),
            labels: self.labels.to_device(device),
            target_rows: self.target_rows.to_device(device),
            target_ids: self.target_ids.to_device(device),
            ..self
        }
    }
}

#[derive(Debug, Clone)]
pub struct LmBatcher {
    pub pad_id: u32,
    /// Pack the micro-batch's examples into rows of up to this many tokens (`--packing`);
    /// None pads each example to the longest.
    pub pack: Option<usize>,
    /// Widen every micro-batch to a multiple of this many positions (1: none). GPU runs use
    /// 64, so a run meets a few sequence lengths and compiles and tunes kernels for those
    /// only; the extra positions are padding, which the mask and the loss ignore.
    pub pad_multiple: usize,
}

impl<B: Backend> Batcher<B, Item, LmBatch<B>> for LmBatcher {
    fn batch(&self, items: Vec<Item>, device: &B::Device) -> LmBatch<B> {
        let position = items.first().map_or(0, |i| i.position);
        let examples: Vec<Example> = items.into_iter().map(|i| i.example).collect();
        let tokens = examples.iter().map(|e| e.len).sum();
        let (h, packing) = match self.pack {
            None => (
                pad_to_multiple(
                    collate(&examples, self.pad_id),
                    self.pad_multiple,
                    self.pad_id,
                ),
                None,
            ),
            Some(capacity) => {
                let p = pack(&examples, self.pad_id, capacity);
                let host = pad_to_multiple(p.host, self.pad_multiple, self.pad_id);
                let packing = Packing::new(p.rows, host.seq).expect("rows packed to fit");
                (host, Some(packing))
            }
        };
        let batch = LmBatch::from_host(
            h.input_ids,
            h.labels,
            [h.batch, h.seq],
            position,
            tokens,
            device,
        );
        match packing {
            Some(p) => batch.packed(p),
            None => batch,
        }
    }
}

impl<B: Backend> LmBatch<B> {
    /// A batch from row-major host ids and labels `[batch, seq]` (`IGNORE` where the token does
    /// not count); `tokens` are the real (non-pad) tokens.
    pub fn from_host(
        input_ids: Vec<i64>,
        labels: Vec<i64>,
        [batch, seq]: [usize; 2],
        position: u64,
        tokens: usize,
        device: &B::Device,
    ) -> Self {
        // Position p predicts label p + 1; the last position of a row predicts nothing.
        let (mut rows, mut ids) = (Vec::new(), Vec::new());
        for r in 0..batch {
            for p in 0..seq.saturating_sub(1) {
                let label = labels[r * seq + p + 1];
                if label != IGNORE {
                    rows.push((r * seq + p) as i64);
                    ids.push(label);
                }
            }
        }
        let targets = rows.len();
        let t2 = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [batch, seq]), device);
        let t1 = |v: Vec<i64>| {
            let n = v.len();
            Tensor::from_data(TensorData::new(v, [n]), device)
        };
        LmBatch {
            input_ids: t2(input_ids),
            labels: t2(labels),
            packing: None,
            target_rows: t1(rows),
            target_ids: t1(ids),
            position,
            sequences: batch,
            targets,
            tokens,
        }
    }
}

impl<B: Backend> LmBatch<B> {
    /// The same rows, laid out by `packing` (several examples per row): the model gives each
    /// its own positions and attention, and the batch counts examples, not rows.
    pub fn packed(mut self, packing: Packing) -> Self {
        self.sequences = packing.rows().iter().map(Vec::len).sum();
        self.packing = Some(packing);
        self
    }
}

/// Rows of logits per chunk in the target-only head: a `[chunk, vocab]` f32 buffer (phi-2:
/// 1024 x 51200 x 4 bytes = 210 MB) is the most the head holds at once, forward or backward.
pub const HEAD_CHUNK_ROWS: usize = 1024;

/// How the training objective computes the vocabulary projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Logits at every position of every sequence (`[batch * seq, vocab]`), masked afterwards:
    /// what transformers does, kept for comparison.
    Full,
    /// Only the positions whose label counts, `chunk` rows of logits at a time.
    Targets { chunk: usize },
}

impl Default for Head {
    fn default() -> Self {
        Head::Targets {
            chunk: HEAD_CHUNK_ROWS,
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

    /// The counts as numbers to sum over processes (the wall time stays each process's own).
    pub fn to_sums(&self) -> [f64; 5] {
        [
            self.nll_sum,
            self.targets as f64,
            self.correct as f64,
            self.tokens as f64,
            self.sequences as f64,
        ]
    }

    /// The counts summed by [`to_sums`](Self::to_sums), with `seconds`.
    pub fn from_sums(s: &[f64], seconds: f64) -> Self {
        Self {
            nll_sum: s[0],
            targets: s[1] as usize,
            correct: s[2] as usize,
            tokens: s[3] as usize,
            sequences: s[4] as usize,
            seconds,
        }
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
            head: Head::default(),
            seed,
        }
    }

    pub fn with_head(mut self, head: Head) -> Self {
        self.head = head;
        self
    }

    /// Mean loss over the batch's target tokens (a `[1]` tensor) and the batch's statistics.
    pub fn objective(&self, batch: &LmBatch<B>) -> (Tensor<B, 1>, LmStats) {
        let (nll_sum, correct) = self.head(self.hidden(batch), batch);
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

    /// The final hidden states of every position, `[batch * seq, hidden]` (row-major): what the
    /// head reads.
    pub fn hidden(&self, batch: &LmBatch<B>) -> Tensor<B, 2> {
        let h = self
            .phi
            .final_hidden(batch.input_ids.clone(), batch.packing.as_ref());
        let [b, s, d] = h.dims();
        h.reshape([b * s, d])
    }

    /// `(sum of the targets' nll (f32), correct predictions)` from the final hidden states `h
    /// [batch * seq, hidden]`, through the head this model was built with.
    pub fn head(&self, h: Tensor<B, 2>, batch: &LmBatch<B>) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
        match self.head {
            Head::Targets { chunk } if batch.targets > 0 => self.target_head(h, batch, chunk),
            _ => self.full_head(h, batch),
        }
    }

    /// Through the target rows only, in chunks.
    fn target_head(
        &self,
        h: Tensor<B, 2>,
        batch: &LmBatch<B>,
        chunk: usize,
    ) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
        let h = h.select(0, batch.target_rows.clone());
        let (nll, predicted) = self
            .phi
            .head_cross_entropy(h, batch.target_ids.clone(), chunk);
        let correct = predicted.equal(batch.target_ids.clone()).int().sum();
        (nll.sum(), correct)
    }

    /// The same through logits at every position.
    fn full_head(&self, h: Tensor<B, 2>, batch: &LmBatch<B>) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
        let [b, s] = batch.input_ids.dims();
        let device = batch.labels.device();
        let logits = self.phi.head_logits(h).cast(FloatDType::F32);
        // Position i predicts label i + 1; the last position of each sequence predicts nothing.
        let none = Tensor::full([b, 1], IGNORE, &device);
        let targets = if s > 1 {
            Tensor::cat(vec![batch.labels.clone().narrow(1, 1, s - 1), none], 1)
        } else {
            none
        }
        .reshape([b * s]);
        let (nll, predicted) = cross_entropy(logits, targets.clone());
        let correct = predicted
            .equal(targets.clone())
            .bool_and(targets.greater_equal_elem(0))
            .int()
            .sum();
        (nll.sum(), correct)
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
