//! Frozen base layers: a Linear whose weight is either dense or NF4-quantized, stored `[out, in]`
//! as module constants (never optimized, never written to training checkpoints) and applied
//! through the [`Nf4Backend`] extension.

use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorCreationOptions, TensorData, backend::Backend};

use crate::ops::{self, Nf4Backend, Nf4Host};

#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// 8 codes per int element (see [`Nf4Backend`]).
    pub packed: Tensor<B, 1, Int>,
    /// One f32 per 64 values (double-quantized absmax already expanded).
    pub absmax: Tensor<B, 1>,
    pub out_features: usize,
    pub in_features: usize,
}

impl<B: Backend> Nf4Weight<B> {
    pub fn from_host(q: &Nf4Host, device: &B::Device) -> Self {
        let words = q.device_words();
        let n = words.len();
        let absmax = q.absmax_f32();
        let m = absmax.len();
        Self {
            packed: Tensor::from_data(TensorData::new(words, [n]), device),
            absmax: Tensor::from_data(
                TensorData::new(absmax, [m]),
                TensorCreationOptions::new(device.clone()).with_dtype(DType::F32),
            ),
            out_features: q.shape[0],
            in_features: q.shape[1],
        }
    }
}

#[derive(Module, Debug)]
pub enum FrozenWeight<B: Backend> {
    /// `[out, in]`
    Dense(Tensor<B, 2>),
    Nf4(Nf4Weight<B>),
}

#[derive(Module, Debug)]
pub struct FrozenLinear<B: Backend> {
    pub weight: FrozenWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> FrozenLinear<B> {
    /// `(in, out)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            FrozenWeight::Dense(w) => {
                let [o, i] = w.dims();
                (i, o)
            }
            FrozenWeight::Nf4(q) => (q.in_features, q.out_features),
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, FrozenWeight::Nf4(_))
    }
}

impl<B: Nf4Backend> FrozenLinear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = match &self.weight {
            FrozenWeight::Dense(w) => ops::frozen_linear(x, w.clone()),
            FrozenWeight::Nf4(q) => ops::nf4_linear(
                x,
                q.packed.clone(),
                q.absmax.clone(),
                [q.out_features, q.in_features],
            ),
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze(),
            None => y,
        }
    }

    /// The weight as dense `[out, in]` values (dequantized if NF4).
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match &self.weight {
            FrozenWeight::Dense(w) => w.clone(),
            FrozenWeight::Nf4(q) => ops::nf4_dequantize(
                q.packed.clone(),
                q.absmax.clone(),
                [q.out_features, q.in_features],
            ),
        }
    }
}
