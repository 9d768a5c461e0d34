//! Batching: a Burn `Dataset` of tokenized examples and a `Batcher` that pads to the longest
//! sequence of the batch (the seed template's examples are already 128 long), with pad = eos,
//! attention mask 0 and label [`IGNORE`] on padding.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rayon::prelude::*;

use phitune_model::PhiTokenizer;

use crate::prompt::{Encoded, Example, IGNORE, Template};
use crate::row::PersonaRow;

/// Tokenized examples, computed once (in parallel) and kept in memory.
pub struct ExampleDataset {
    pub examples: Vec<Example>,
    /// Rows whose reference could not fit (persona template).
    pub dropped: usize,
    /// Examples that were cut to fit.
    pub truncated: usize,
}

impl ExampleDataset {
    pub fn build(
        rows: &[PersonaRow],
        tok: &PhiTokenizer,
        template: Template,
        max_len: usize,
    ) -> phitune_model::Result<Self> {
        let encoded: Vec<Encoded> = rows
            .par_iter()
            .map(|r| template.encode(tok, r, max_len))
            .collect::<phitune_model::Result<_>>()?;
        let mut examples = Vec::with_capacity(encoded.len());
        let mut dropped = 0;
        for e in encoded {
            match e {
                Encoded::Kept(x) => examples.push(x),
                Encoded::Dropped => dropped += 1,
            }
        }
        let truncated = examples.iter().filter(|e| e.truncated).count();
        Ok(Self {
            examples,
            dropped,
            truncated,
        })
    }
}

impl Dataset<Example> for ExampleDataset {
    fn get(&self, index: usize) -> Option<Example> {
        self.examples.get(index).cloned()
    }
    fn len(&self) -> usize {
        self.examples.len()
    }
}

/// A padded batch on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
}

pub fn collate(examples: &[Example], pad_id: u32) -> HostBatch {
    let seq = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut b = HostBatch {
        batch: examples.len(),
        seq,
        input_ids: Vec::new(),
        attention_mask: Vec::new(),
        labels: Vec::new(),
    };
    for e in examples {
        for j in 0..seq {
            let real = j < e.len;
            b.input_ids
                .push(e.input_ids.get(j).copied().unwrap_or(pad_id) as i64);
            b.attention_mask.push(real as i64);
            b.labels.push(if real { e.labels[j] } else { IGNORE });
        }
    }
    b
}

/// A batch of token tensors `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2, Int>,
    pub labels: Tensor<B, 2, Int>,
}

#[derive(Debug, Clone)]
pub struct PersonaBatcher {
    pub pad_id: u32,
}

impl<B: Backend> Batcher<B, Example, TokenBatch<B>> for PersonaBatcher {
    fn batch(&self, items: Vec<Example>, device: &B::Device) -> TokenBatch<B> {
        let h = collate(&items, self.pad_id);
        let t = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [h.batch, h.seq]), device);
        TokenBatch {
            input_ids: t(h.input_ids),
            attention_mask: t(h.attention_mask),
            labels: t(h.labels),
        }
    }
}

/// Optional length bucketing: an order of example indices in which each batch holds examples
/// of similar length (less padding). Examples are shuffled (seeded), cut into pools of
/// `pool_batches` batches, each pool sorted by length and cut into batches, and the batches
/// shuffled again, so batches stay random while their members are alike.
pub fn bucketed_order(
    lengths: &[usize],
    batch_size: usize,
    pool_batches: usize,
    seed: u64,
) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    let pool = (batch_size * pool_batches).max(1);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for chunk in idx.chunks_mut(pool) {
        chunk.sort_by_key(|&i| lengths[i]);
        batches.extend(chunk.chunks(batch_size.max(1)).map(|b| b.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches.into_iter().flatten().collect()
}

/// A seeded permutation of `0..n`: the training order of one pass over the data.
pub fn shuffled_order(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix(seed).shuffle(&mut idx);
    idx
}

/// A small seeded generator (SplitMix64) so orders are identical on every machine.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_is_a_seeded_permutation_that_reduces_padding() {
        let lengths: Vec<usize> = (0..400).map(|i| (i * 7919) % 500 + 10).collect();
        let order = bucketed_order(&lengths, 8, 16, 42);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..400).collect::<Vec<_>>(), "a permutation");
        assert_eq!(order, bucketed_order(&lengths, 8, 16, 42), "seeded");
        assert_ne!(order, bucketed_order(&lengths, 8, 16, 43));
        let padding = |o: &[usize]| -> usize {
            o.chunks(8)
                .map(|b| {
                    let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                    b.iter().map(|&i| m - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain: Vec<usize> = (0..400).collect();
        assert!(
            padding(&order) * 4 < padding(&plain),
            "{} vs {}",
            padding(&order),
            padding(&plain)
        );
    }
}
