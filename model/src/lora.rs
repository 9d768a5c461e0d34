//! LoRA: `y = base(x) + scaling * B(A(dropout(x)))` on a frozen base Linear.
//!
//! A and B are stored transposed relative to PEFT (`a: [in, r]`, `b: [r, out]`, Burn's Linear
//! layout) so the forward pass is two plain matmuls; PEFT's `lora_A.weight [r, in]` and
//! `lora_B.weight [out, r]` are produced when writing (see `adapter.rs`).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, FloatDType, Tensor, TensorData, backend::Backend};

use crate::frozen::FrozenLinear;
use crate::ops::Nf4Backend;

pub use crate::config::{LoraConfig, TARGETABLE, pattern_matches};

/// The adapter's weights are kept in f32 whatever the model's compute dtype (as PEFT upcasts
/// them): Adam updates of a bf16/f16 weight would be rounded away. They are cast to the input's
/// dtype for the matmuls.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]`
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]`
    pub b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    pub dropout: Dropout,
}

impl<B: Backend> Lora<B> {
    /// PEFT's initialisation: A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    /// B = 0, so the adapted layer starts exactly equal to the base. A's values come from
    /// `seed` on the host (a SplitMix64 stream), so every backend starts from the same adapter.
    pub fn init(
        d_in: usize,
        d_out: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..(d_in * r) as u64)
            .map(|i| {
                let u = (crate::ops::splitmix64(seed.wrapping_add(i)) >> 40) as f64
                    / (1u64 << 24) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Self {
            a: Param::from_tensor(Tensor::<B, 2>::from_data(
                TensorData::new(a, [d_in, r]),
                (device, DType::F32),
            )),
            b: Param::from_tensor(Tensor::<B, 2>::zeros([r, d_out], device).cast(FloatDType::F32)),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    pub fn from_tensors(a: Tensor<B, 2>, b: Tensor<B, 2>, scaling: f64, dropout: f64) -> Self {
        Self {
            a: Param::from_tensor(a.cast(FloatDType::F32)),
            b: Param::from_tensor(b.cast(FloatDType::F32)),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }
}

impl<B: crate::ops::FusedOps> Lora<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let h = crate::ops::linear(
            crate::ops::dropout(x, self.dropout.prob),
            self.a.val().cast(dtype),
        );
        crate::ops::linear(h, self.b.val().cast(dtype)).mul_scalar(self.scaling)
    }
}

/// A frozen Linear (dense or NF4) with an optional trainable LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub base: FrozenLinear<B>,
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> LoraLinear<B> {
    pub fn new(base: FrozenLinear<B>) -> Self {
        Self { base, lora: None }
    }

    /// `(in, out)` of the base layer.
    pub fn dims(&self) -> (usize, usize) {
        self.base.dims()
    }
}

impl<B: Nf4Backend> LoraLinear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => self.base.forward(x),
            // Without autodiff (generation), the adapter is one fused op onto the base output.
            Some(lora) if !B::ad_enabled(&x.device()) => crate::ops::lora_add(
                self.base.forward(x.clone()),
                x,
                lora.a.val(),
                lora.b.val(),
                lora.scaling,
            ),
            Some(lora) => self.base.forward(x.clone()) + lora.forward(x),
        }
    }
}
