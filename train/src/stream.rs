//! The training stream: examples in a seeded order, a fresh permutation for every pass over the
//! data, addressed by absolute position so a run can restart at any optimizer step and see
//! exactly the examples it would have seen.

use std::sync::Arc;

use burn::data::dataset::Dataset;
use phitune_data::batch::shuffled_order;
use phitune_data::prompt::Example;

use crate::lm::Item;

pub struct TrainStream {
    examples: Arc<Vec<Example>>,
    seed: u64,
    /// Absolute position of this view's first item.
    start: u64,
    len: usize,
    first_pass: u64,
    /// One permutation per pass this view touches.
    orders: Vec<Vec<usize>>,
}

impl TrainStream {
    /// Positions `start .. start + len` of the stream.
    pub fn new(examples: Arc<Vec<Example>>, seed: u64, start: u64, len: usize) -> Self {
        let n = examples.len().max(1) as u64;
        let first_pass = start / n;
        let last_pass = (start + len.max(1) as u64 - 1) / n;
        let orders = (first_pass..=last_pass)
            .map(|p| shuffled_order(examples.len(), pass_seed(seed, p)))
            .collect();
        Self {
            examples,
            seed,
            start,
            len,
            first_pass,
            orders,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Examples in one pass.
    pub fn examples(&self) -> usize {
        self.examples.len()
    }

    /// Index into the examples of the item at absolute `position`.
    pub fn index_at(&self, position: u64) -> Option<usize> {
        let n = self.examples.len() as u64;
        if n == 0 || position < self.start || position >= self.start + self.len as u64 {
            return None;
        }
        let pass = position / n;
        let order = self.orders.get((pass - self.first_pass) as usize)?;
        order.get((position % n) as usize).copied()
    }
}

fn pass_seed(seed: u64, pass: u64) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ pass
}

impl Dataset<Item> for TrainStream {
    fn get(&self, index: usize) -> Option<Item> {
        let position = self.start + index as u64;
        let i = self.index_at(position)?;
        Some(Item {
            position,
            example: self.examples[i].clone(),
        })
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The held-out examples as items (positions are irrelevant: evaluation has no dropout).
pub struct EvalSet(pub Arc<Vec<Example>>);

impl Dataset<Item> for EvalSet {
    fn get(&self, index: usize) -> Option<Item> {
        self.0.get(index).map(|e| Item {
            position: index as u64,
            example: e.clone(),
        })
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Arc<Vec<Example>> {
        Arc::new(
            (0..n)
                .map(|i| Example {
                    input_ids: vec![i as u32],
                    labels: vec![i as i64],
                    len: 1,
                    truncated: false,
                })
                .collect(),
        )
    }

    #[test]
    fn a_view_started_later_sees_the_same_items() {
        let ex = examples(7);
        let whole = TrainStream::new(ex.clone(), 42, 0, 30);
        let tail = TrainStream::new(ex.clone(), 42, 12, 18);
        for i in 0..18 {
            assert_eq!(
                whole.get(12 + i).unwrap().example.input_ids,
                tail.get(i).unwrap().example.input_ids
            );
            assert_eq!(tail.get(i).unwrap().position, 12 + i as u64);
        }
        assert!(tail.get(18).is_none());
        // Each pass is a permutation, and passes differ.
        let pass = |p: usize| -> Vec<u32> {
            (0..7)
                .map(|i| whole.get(p * 7 + i).unwrap().example.input_ids[0])
                .collect()
        };
        let mut first = pass(0);
        assert_ne!(first, pass(1));
        first.sort_unstable();
        assert_eq!(first, (0..7).collect::<Vec<u32>>());
        assert_ne!(
            pass(0),
            (0..7)
                .map(|i| TrainStream::new(ex.clone(), 43, 0, 7)
                    .get(i)
                    .unwrap()
                    .example
                    .input_ids[0])
                .collect::<Vec<_>>()
        );
    }
}
