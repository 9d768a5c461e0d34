//! Key/value cache for incremental decoding: per layer, the rotated keys and the values of every
//! position seen so far, `[batch, kv_heads, len, head_dim]`.

use burn::tensor::{Tensor, backend::Backend};

#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Keeps only the first `len` positions (to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            return self.clear();
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.clone().narrow(2, 0, len);
            *v = v.clone().narrow(2, 0, len);
        }
        self.len = len;
    }

    /// The cache with every entry repeated `n` times along the batch (one prompt, continued
    /// `n` ways).
    pub fn repeat(&self, n: usize) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref()
                        .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))
                })
                .collect(),
            len: self.len,
        }
    }

    /// Appends this step's keys/values for `layer` and returns the full ones.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Called once per forward pass after all layers appended `added` positions.
    pub(crate) fn advance(&mut self, added: usize) {
        self.len += added;
    }
}
