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

/// Widens `b` to a multiple of `multiple` positions (pad = `pad_id`, attention mask 0, label
/// [`IGNORE`]): padding the model and the loss already ignore, so the results are the same.
/// GPU backends use it so that a run meets a few sequence lengths instead of one per batch
/// (each new length can mean new kernels to compile and matmul shapes to tune).
pub fn pad_to_multiple(b: HostBatch, multiple: usize, pad_id: u32) -> HostBatch {
    let seq = b.seq.next_multiple_of(multiple.max(1));
    if seq == b.seq {
        return b;
    }
    let widen = |v: Vec<i64>, fill: i64| -> Vec<i64> {
        let mut out = Vec::with_capacity(b.batch * seq);
        for row in v.chunks(b.seq.max(1)).take(b.batch) {
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(fill, seq - row.len()));
        }
        out.resize(b.batch * seq, fill);
        out
    };
    HostBatch {
        batch: b.batch,
        seq,
        input_ids: widen(b.input_ids, pad_id as i64),
        attention_mask: widen(b.attention_mask, 0),
        labels: widen(b.labels, IGNORE),
    }
}

/// A packed batch on the host: rows of several examples laid end to end, padded to the
/// longest row.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBatch {
    /// `attention_mask` is 1 on every example's tokens; `labels` are each example's own, except
    /// that an example's first label is [`IGNORE`] (in a packed row the token before it is the
    /// previous example's last, which must not be trained to predict it).
    pub host: HostBatch,
    /// Each row's example lengths, in order (what the model's block-diagonal mask and
    /// per-example positions are built from).
    pub rows: Vec<Vec<usize>>,
    /// Each row's examples, as indices into the packed slice, in the same order.
    pub members: Vec<Vec<usize>>,
}

/// Packs examples into rows of at most `capacity` tokens (or the longest example's length, if
/// longer), first-fit decreasing: each example, longest first, goes to the first row with
/// room. Deterministic; each example's real tokens (`len`) are kept whole.
pub fn pack(examples: &[Example], pad_id: u32, capacity: usize) -> PackedBatch {
    let lengths: Vec<usize> = examples.iter().map(|e| e.len).collect();
    let bins: Vec<(usize, Vec<usize>)> = pack_lengths(&lengths, capacity)
        .into_iter()
        .map(|m| (m.iter().map(|&i| lengths[i]).sum(), m))
        .collect();
    let seq = bins.iter().map(|(used, _)| *used).max().unwrap_or(0);
    let mut host = HostBatch {
        batch: bins.len(),
        seq,
        input_ids: Vec::with_capacity(bins.len() * seq),
        attention_mask: Vec::with_capacity(bins.len() * seq),
        labels: Vec::with_capacity(bins.len() * seq),
    };
    let mut rows = Vec::with_capacity(bins.len());
    for (used, members) in &bins {
        for &i in members {
            let e = &examples[i];
            host.input_ids
                .extend(e.input_ids[..e.len].iter().map(|&t| t as i64));
            host.labels.push(IGNORE);
            host.labels.extend_from_slice(&e.labels[1..e.len]);
        }
        host.attention_mask
            .extend((0..seq).map(|j| (j < *used) as i64));
        host.input_ids
            .extend(std::iter::repeat_n(pad_id as i64, seq - used));
        host.labels.extend(std::iter::repeat_n(IGNORE, seq - used));
        rows.push(members.iter().map(|&i| examples[i].len).collect());
    }
    let members = bins.into_iter().map(|(_, m)| m).collect();
    PackedBatch {
        host,
        rows,
        members,
    }
}

/// First-fit decreasing over `lengths` into rows of at most `capacity` (or the longest length,
/// if longer): each row's members as indices into `lengths`. Ties keep their order.
pub fn pack_lengths(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let capacity = lengths.iter().copied().max().unwrap_or(0).max(capacity);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let len = lengths[i];
        match bins.iter_mut().find(|(used, _)| used + len <= capacity) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => bins.push((len, vec![i])),
        }
    }
    bins.into_iter().map(|(_, m)| m).collect()
}

/// How well micro-batches of `micro_batch` consecutive lengths fill the positions they feed,
/// padded to the longest (`pack` None) or packed into rows of `pack` tokens, and widened to a
/// multiple of `pad_multiple` positions ([`pad_to_multiple`]; 1: not widened).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    /// Real tokens over positions fed.
    pub real: f64,
    /// Examples per row.
    pub per_row: f64,
}

pub fn fill(
    lengths: &[usize],
    micro_batch: usize,
    pack: Option<usize>,
    pad_multiple: usize,
) -> Fill {
    let (mut real, mut positions, mut rows) = (0, 0, 0);
    for b in lengths.chunks(micro_batch.max(1)) {
        real += b.iter().sum::<usize>();
        let (r, seq) = match pack {
            None => (b.len(), b.iter().copied().max().unwrap_or(0)),
            Some(capacity) => {
                let bins = pack_lengths(b, capacity);
                let longest = bins
                    .iter()
                    .map(|m| m.iter().map(|&i| b[i]).sum::<usize>())
                    .max()
                    .unwrap_or(0);
                (bins.len(), longest)
            }
        };
        rows += r;
        positions += r * seq.next_multiple_of(pad_multiple.max(1));
    }
    Fill {
        real: real as f64 / positions.max(1) as f64,
        per_row: lengths.len() as f64 / rows.max(1) as f64,
    }
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

    fn example(len: usize, pad_to: usize, tag: u32) -> Example {
        Example {
            input_ids: (0..pad_to)
                .map(|j| if j < len { tag * 100 + j as u32 } else { 7 })
                .collect(),
            labels: (0..pad_to)
                .map(|j| {
                    if j < len {
                        (tag * 100 + j as u32) as i64
                    } else {
                        IGNORE
                    }
                })
                .collect(),
            len,
            truncated: false,
        }
    }

    #[test]
    fn padding_to_a_multiple_adds_ignored_positions_only() {
        let b = collate(&[example(3, 3, 1), example(5, 5, 2)], 7);
        let wide = pad_to_multiple(b.clone(), 4, 7);
        assert_eq!((wide.batch, wide.seq), (2, 8));
        for r in 0..2 {
            let (narrow, widened) = (r * 5..r * 5 + 5, r * 8..r * 8 + 8);
            assert_eq!(
                wide.input_ids[widened.clone()][..5],
                b.input_ids[narrow.clone()]
            );
            assert_eq!(wide.labels[widened.clone()][..5], b.labels[narrow.clone()]);
            assert_eq!(
                wide.attention_mask[widened.clone()][..5],
                b.attention_mask[narrow]
            );
            assert_eq!(wide.input_ids[widened.clone()][5..], [7, 7, 7]);
            assert_eq!(wide.labels[widened.clone()][5..], [IGNORE; 3]);
            assert_eq!(wide.attention_mask[widened][5..], [0; 3]);
        }
        assert_eq!(pad_to_multiple(b.clone(), 5, 7), b, "already a multiple");
        assert_eq!(pad_to_multiple(b.clone(), 1, 7), b);
    }

    #[test]
    fn packing_fills_rows_longest_first_and_keeps_each_example_whole() {
        let ex: Vec<Example> = [5, 9, 3, 4, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| example(n, 12, i as u32 + 1))
            .collect();
        let p = pack(&ex, 7, 10);
        // 9 | 5+4 | 3+2: first-fit decreasing.
        assert_eq!(p.rows, [vec![9], vec![5, 4], vec![3, 2]]);
        assert_eq!(p.members, [vec![1], vec![0, 3], vec![2, 4]]);
        let h = &p.host;
        assert_eq!((h.batch, h.seq), (3, 9), "padded to the longest row only");
        assert_eq!(
            h.attention_mask.iter().sum::<i64>(),
            23,
            "every real token once"
        );
        let row = |r: usize| &h.input_ids[r * 9..(r + 1) * 9];
        assert_eq!(row(1), [100, 101, 102, 103, 104, 400, 401, 402, 403]);
        assert_eq!(row(2)[5..], [7, 7, 7, 7], "padding");
        let labels = &h.labels[9..18];
        assert_eq!(labels[0], IGNORE);
        assert_eq!(labels[1..5], [101, 102, 103, 104]);
        assert_eq!(
            labels[5], IGNORE,
            "no example predicts the next one's first token"
        );
        assert_eq!(labels[6..], [401, 402, 403]);
        // The estimate the run prints agrees.
        let lengths = [5, 9, 3, 4, 2];
        let f = fill(&lengths, 5, Some(10), 1);
        assert_eq!((f.real, f.per_row), (23.0 / 27.0, 5.0 / 3.0));
        assert_eq!(fill(&lengths, 5, None, 1).real, 23.0 / 45.0);
        assert_eq!(fill(&lengths, 2, None, 1).real, 23.0 / (18 + 8 + 2) as f64);
        assert_eq!(fill(&lengths, 2, None, 4).real, 23.0 / (24 + 8 + 4) as f64);
        // An example longer than the capacity still gets a row of its own.
        assert_eq!(pack(&ex, 7, 4).rows[0], [9]);
        assert_eq!(pack(&[], 7, 10).host.batch, 0);
    }

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
