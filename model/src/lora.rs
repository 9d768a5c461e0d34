//! LoRA: `y = base(x) + scaling * B(A(dropout(x)))` on a frozen base Linear.
//!
//! A and B are stored transposed relative to PEFT (`a: [in, r]`, `b: [r, out]`, Burn's Linear
//! layout) so the forward pass is two plain matmuls; PEFT's `lora_A.weight [r, in]` and
//! `lora_B.weight [out, r]` are produced when writing (see `adapter.rs`).

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{DType, FloatDType, Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::frozen::FrozenLinear;
use crate::ops::Nf4Backend;

/// The Linear layers of a Phi decoder layer that LoRA can adapt, by PEFT's names.
pub const TARGETABLE: [&str; 6] = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Short names among [`TARGETABLE`].
    pub target_modules: Vec<String>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// PEFT's per-module overrides: pattern (matched against the end of the module path) -> value.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl LoraConfig {
    /// The seed recipe's adapter: r=4, alpha=16, dropout 0.05 on q/k/v/dense.
    pub fn seed() -> Self {
        Self {
            r: 4,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "dense"]
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 || self.r > 4096 {
            return Err(format!("LoRA rank r = {} must be in 1..=4096", self.r));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora_alpha {} must be positive", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("lora_dropout {} must be in [0, 1)", self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err("target_modules is empty".into());
        }
        for t in &self.target_modules {
            if !TARGETABLE.contains(&t.as_str()) {
                return Err(format!(
                    "target module \"{t}\" is not one of Phi's adaptable layers ({})",
                    TARGETABLE.join(", ")
                ));
            }
        }
        for (k, &r) in &self.rank_pattern {
            if r == 0 || r > 4096 {
                return Err(format!("rank_pattern[{k}] = {r} must be in 1..=4096"));
            }
        }
        for (k, &a) in &self.alpha_pattern {
            if !(a.is_finite() && a > 0.0) {
                return Err(format!("alpha_pattern[{k}] = {a} must be positive"));
            }
        }
        Ok(())
    }

    pub fn targets(&self, short_name: &str) -> bool {
        self.target_modules.iter().any(|t| t == short_name)
    }

    /// Rank and alpha for the module at `path` (e.g. `model.layers.3.mlp.fc1`), honouring the
    /// patterns the way PEFT does: a key matches when the path ends with it at a dot boundary.
    pub fn rank_alpha(&self, path: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, path))
            .map_or(self.r, |(_, &r)| r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, path))
            .map_or(self.alpha, |(_, &a)| a);
        (r, alpha)
    }

    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// PEFT's `re.match(rf"(.*\.)?({key})$", name)`.
pub fn pattern_matches(key: &str, path: &str) -> bool {
    match regex::Regex::new(&format!(r"^(.*\.)?({key})$")) {
        Ok(re) => re.is_match(path),
        Err(_) => path == key || path.ends_with(&format!(".{key}")),
    }
}

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
