//! Partial rotary position embedding in the non-interleaved "rotate_half" layout (HF's
//! `apply_rotary_pos_emb`): only the first `dim` channels of each q/k head are rotated,
//! channel i is paired with channel i + dim/2 (NOT adjacent pairs), the rest pass through.
//! The rotation itself is [`crate::ops::rope`] (a fused kernel on the CPU).

use burn::module::Module;
use burn::tensor::{Tensor, TensorData, backend::Backend};

#[derive(Module, Debug, Clone)]
pub struct RotaryEmbedding {
    pub dim: usize,
    pub theta: f64,
}

impl RotaryEmbedding {
    pub fn new(dim: usize, theta: f64) -> Self {
        Self { dim, theta }
    }

    /// `cos` and `sin` tables `[seq, dim]` for positions `start..start + seq`.
    ///
    /// Computed in f32 exactly as HF does (`inv_freq` in f32, `pos * inv_freq` in f32), so the
    /// angles round identically; built on the host per call, which is cheap (seq x dim values)
    /// and has no maximum length.
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        seq: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let positions: Vec<usize> = (start..start + seq).collect();
        self.tables_at(&positions, device)
    }

    /// `cos` and `sin` tables `[positions.len(), dim]`, a row for each given position (packed
    /// rows: one row per token, positions restarting at each example).
    pub fn tables_at<B: Backend>(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let half = self.dim / 2;
        let base = self.theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / self.dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * self.dim);
        let mut sin = Vec::with_capacity(positions.len() * self.dim);
        for &p in positions {
            // emb = cat(freqs, freqs): both halves of a row use the same angles.
            let angles: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
            for a in angles.iter().chain(&angles) {
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = [positions.len(), self.dim];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}
