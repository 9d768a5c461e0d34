//! Packed rows: several examples laid end to end in one row of a batch, each attending only to
//! itself (a block-diagonal causal mask) at its own positions (the rotary embedding restarts at
//! 0 for each example), so a packed row computes exactly what its examples would alone.

use burn::tensor::{Bool, Tensor, TensorData, backend::Backend};

use crate::error::{Error, Result};

/// Where the examples lie in the rows of a `[batch, seq]` batch: for each row, the lengths of
/// its examples in order. Positions after a row's last example are padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    rows: Vec<Vec<usize>>,
    seq: usize,
}

impl Packing {
    /// A layout of `rows.len()` rows of `seq` positions; every row's examples must fit and none
    /// may be empty.
    pub fn new(rows: Vec<Vec<usize>>, seq: usize) -> Result<Self> {
        for (r, lens) in rows.iter().enumerate() {
            let used: usize = lens.iter().sum();
            if used > seq || lens.contains(&0) {
                return Err(Error::Invalid(format!(
                    "packed row {r}: examples of {lens:?} tokens in a row of {seq}"
                )));
            }
        }
        Ok(Self { rows, seq })
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Each row's example lengths, in order.
    pub fn rows(&self) -> &[Vec<usize>] {
        &self.rows
    }

    /// For every position (row-major `[batch * seq]`): its example's index in the row (padding
    /// is one more example of its own) and its position within that example.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.rows.iter().flat_map(move |lens| {
            let pad = self.seq - lens.iter().sum::<usize>();
            lens.iter()
                .copied()
                .chain([pad])
                .enumerate()
                .flat_map(|(e, n)| (0..n).map(move |p| (e, p)))
        })
    }

    /// Every token's position within its own example, row-major `[batch * seq]`.
    pub fn positions(&self) -> Vec<usize> {
        self.spans().map(|(_, p)| p).collect()
    }

    /// `[batch, seq, seq]`, true where query `i` must not see key `j`: a later key, or a key of
    /// another example. Every query sees at least itself (padding included), so no softmax row
    /// is empty.
    pub fn mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3, Bool> {
        let s = self.seq;
        let example: Vec<usize> = self.spans().map(|(e, _)| e).collect();
        let mut mask = Vec::with_capacity(self.rows.len() * s * s);
        for row in example.chunks(s.max(1)) {
            for (i, ei) in row.iter().enumerate() {
                mask.extend(row.iter().enumerate().map(|(j, ej)| j > i || ej != ei));
            }
        }
        Tensor::from_data(TensorData::new(mask, [self.rows.len(), s, s]), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn positions_restart_and_the_mask_is_block_diagonal_causal() {
        let p = Packing::new(vec![vec![2, 3], vec![4]], 6).unwrap();
        assert_eq!(
            p.positions(),
            [0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 0, 1],
            "padding counts on as one more example"
        );
        let m = p.mask::<NdArray>(&Default::default());
        let m = m.into_data().into_vec::<bool>().unwrap();
        let seen = |r: usize, i: usize| -> Vec<usize> {
            (0..6).filter(|&j| !m[r * 36 + i * 6 + j]).collect()
        };
        assert_eq!(seen(0, 1), [0, 1]);
        assert_eq!(seen(0, 2), [2], "the second example starts afresh");
        assert_eq!(seen(0, 4), [2, 3, 4]);
        assert_eq!(seen(0, 5), [5], "padding sees itself only");
        assert_eq!(seen(1, 3), [0, 1, 2, 3]);
        assert_eq!(seen(1, 5), [4, 5]);
        assert!(Packing::new(vec![vec![4, 3]], 6).is_err());
        assert!(Packing::new(vec![vec![0, 3]], 6).is_err());
    }
}
