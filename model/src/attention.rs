//! Phi's self-attention: q/k/v projections with bias, optional per-head LayerNorm on q and k,
//! partial rotary embedding, grouped-query attention, causal mask, output projection `dense`.

use burn::module::Module;
use burn::nn::Dropout;
use burn::tensor::{Bool, FloatDType, Tensor, backend::Backend};

use crate::cache::KvCache;
use crate::lora::LoraLinear;
use crate::norm::LayerNorm;
use crate::ops::Nf4Backend;
use crate::rotary::RotaryEmbedding;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub dense: LoraLinear<B>,
    pub q_layernorm: Option<LayerNorm<B>>,
    pub k_layernorm: Option<LayerNorm<B>>,
    pub attn_dropout: Dropout,
    pub rotary: RotaryEmbedding,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Per-forward inputs shared by every layer.
pub(crate) struct AttnContext<B: Backend> {
    /// `[q_len, dim]`, or `[batch * q_len, dim]` when each row has its own positions.
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
    /// `[1 or batch, q_len, kv_len]`, true where a query must not see a key; None when nothing
    /// is masked.
    pub mask: Option<Tensor<B, 3, Bool>>,
}

impl<B: Nf4Backend> Attention<B> {
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttnContext<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        let k = self.k_proj.forward(x.clone()).reshape([b, s, kvh, d]);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, kvh, d])
            .swap_dims(1, 2);
        let q = match &self.q_layernorm {
            Some(ln) => ln.forward(q),
            None => q,
        };
        let k = match &self.k_layernorm {
            Some(ln) => ln.forward(k),
            None => k,
        };
        let q = crate::ops::rope(q, &ctx.cos, &ctx.sin).swap_dims(1, 2);
        let k = crate::ops::rope(k, &ctx.cos, &ctx.sin).swap_dims(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));

        // Scores and softmax in f32 even when the model runs in f16/bf16: phi-2's q.k products
        // overflow fp16 (HF upcasts here for the same reason).
        let scale = 1.0 / (d as f64).sqrt();
        let scores = crate::ops::matmul(
            q.cast(FloatDType::F32),
            k.cast(FloatDType::F32).swap_dims(2, 3),
        );
        let probs = crate::ops::attention_softmax(scores, ctx.mask.as_ref(), scale).cast(v.dtype());
        let probs = crate::ops::dropout(probs, self.attn_dropout.prob);
        let out = crate::ops::matmul(probs, v)
            .swap_dims(1, 2)
            .reshape([b, s, h * d]);
        self.dense.forward(out)
    }
}

/// `[b, kv_heads, t, d]` -> `[b, kv_heads * n_rep, t, d]`, query head i reading kv head i / n_rep.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, t, d])
        .reshape([b, kvh * n_rep, t, d])
}
