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
