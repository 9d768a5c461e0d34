//! LayerNorm with HF's parameter names (`weight`, `bias`), normalising in f32 whatever the
//! model's dtype: the mean/variance of 2560 fp16/bf16 values lose too much precision otherwise.
//! The base model is frozen: weight and bias are module constants (plain tensors, not `Param`s),
//! so they get no gradient, no optimizer state and no place in training checkpoints.

use burn::module::Module;
use burn::tensor::{FloatDType, Tensor, backend::Backend};

#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Tensor<B, 1>,
    pub bias: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let y = (x - mean) / (var + self.eps).sqrt();
        let y = y.cast(dtype);
        y * self.weight.clone().unsqueeze() + self.bias.clone().unsqueeze()
    }
}
