//! `PhiForCausalLM`: token embedding, parallel attention + MLP decoder layers sharing one
//! LayerNorm, final LayerNorm, and a biased `lm_head`.

use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::tensor::activation::{gelu, gelu_approximate, log_softmax};
use burn::tensor::{Bool, FloatDType, Int, Tensor, TensorData, backend::Backend};

use crate::attention::{Attention, AttnContext};
use crate::cache::KvCache;
use crate::checkpoint::Checkpoint;
use crate::config::{Activation, PhiConfig};
use crate::error::Result;
use crate::norm::LayerNorm;
use crate::rotary::RotaryEmbedding;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = match self.act {
            Activation::GeluTanh => gelu_approximate(h),
            Activation::Gelu => gelu(h),
        };
        self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: LayerNorm<B>,
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub resid_dropout: Dropout,
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        h: Tensor<B, 3>,
        ctx: &AttnContext<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        // Parallel block: attention and MLP both read the same normalised input.
        let x = self.input_layernorm.forward(h.clone());
        let attn = self
            .resid_dropout
            .forward(self.self_attn.forward(x.clone(), ctx, cache));
        let ff = self.resid_dropout.forward(self.mlp.forward(x));
        attn + ff + h
    }
}

#[derive(Module, Debug)]
pub struct Phi<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub embed_dropout: Dropout,
    pub layers: Vec<DecoderLayer<B>>,
    pub final_layernorm: LayerNorm<B>,
    pub lm_head: Linear<B>,
    pub rotary: RotaryEmbedding,
}

impl<B: Backend> Phi<B> {
    /// Logits `[batch, seq, vocab]` for a batch of right-padded sequences (no cache).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.hidden(ids, None);
        self.lm_head.forward(self.final_layernorm.forward(h))
    }

    /// Runs `ids` (the positions after those already in `cache`) and appends them to the cache.
    /// Returns the logits of the last position only, `[batch, vocab]`: all generation needs,
    /// and it spares the vocab projection of every prompt position.
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let h = self.hidden(ids, Some(cache));
        let [b, s, d] = h.dims();
        let last = h.narrow(1, s - 1, 1).reshape([b, 1, d]);
        self.lm_head
            .forward(self.final_layernorm.forward(last))
            .reshape([b, self.vocab_size()])
    }

    fn hidden(&self, ids: Tensor<B, 2, Int>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [_, s] = ids.dims();
        let device = ids.device();
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let (cos, sin) = self.rotary.tables::<B>(past, s, &device);
        let mask =
            (s > 1).then(|| Tensor::<B, 2, Bool>::tril_mask([s, past + s], past as i64, &device));
        let ctx = AttnContext { cos, sin, mask };
        let mut h = self.embed_dropout.forward(self.embed_tokens.forward(ids));
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, &ctx, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        h
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    /// `nll[i] = -log p(tokens[i + 1] | tokens[..=i])` for one sequence, in f32.
    pub fn token_nll(&self, tokens: &[u32], device: &B::Device) -> Vec<f32> {
        if tokens.len() < 2 {
            return Vec::new();
        }
        let ids = ids_tensor::<B>(tokens, device);
        let logits = self.forward(ids);
        let n = tokens.len() - 1;
        let logp = log_softmax(logits.cast(FloatDType::F32).narrow(1, 0, n), 2);
        let targets = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                tokens[1..].iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [n],
            ),
            device,
        )
        .reshape([1, n, 1]);
        let picked = logp.gather(2, targets).reshape([n]);
        picked
            .neg()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data")
    }

    /// Builds a model with random weights (for benchmarks and tests that need no checkpoint).
    pub fn random(config: &PhiConfig, device: &B::Device) -> Self {
        let init = |shape: Vec<usize>, std: f64| -> TensorData {
            let n: usize = shape.iter().product();
            let dist = burn::tensor::Distribution::Normal(0.0, std);
            let t = Tensor::<B, 1>::random([n], dist, device);
            TensorData::new(
                t.into_data().convert::<f32>().into_vec::<f32>().unwrap(),
                shape,
            )
        };
        Self::build(config, device, &mut |name, shape| {
            Ok(if name.ends_with("layernorm.weight") {
                TensorData::new(vec![1.0f32; shape.iter().product()], shape.to_vec())
            } else if name.ends_with(".bias") {
                TensorData::new(vec![0.0f32; shape.iter().product()], shape.to_vec())
            } else {
                init(shape.to_vec(), 0.02)
            })
        })
        .expect("random init cannot fail")
    }

    /// Loads a checkpoint opened with [`Checkpoint::open`] (which already checked every tensor's
    /// presence and shape), one tensor at a time, with a progress bar.
    pub fn load(ckpt: &Checkpoint, device: &B::Device) -> Result<Self> {
        let config = ckpt.config().clone();
        let total = config.expected_tensors().len() as u64;
        let bar = crate::progress_bar(total, "loading weights");
        let start = Instant::now();
        let model = Self::build(&config, device, &mut |name, shape| {
            let (values, got) = ckpt.read_f32(name)?;
            debug_assert_eq!(got, shape);
            bar.inc(1);
            Ok(TensorData::new(values, got))
        })?;
        bar.finish_and_clear();
        eprintln!(
            "loaded {} ({} layers, {:.2}B parameters) in {:.1}s",
            ckpt.dir().display(),
            config.num_hidden_layers,
            config.num_parameters() as f64 / 1e9,
            start.elapsed().as_secs_f64()
        );
        Ok(model)
    }

    /// Constructs the model, asking `source` for each HF tensor by name and `[out, in]` shape.
    fn build(
        config: &PhiConfig,
        device: &B::Device,
        source: &mut dyn FnMut(&str, &[usize]) -> Result<TensorData>,
    ) -> Result<Self> {
        let h = config.hidden_size;
        let hd = config.head_dim();
        let kv = config.kv_heads() * hd;
        let eps = config.layer_norm_eps;
        let act = config.activation().expect("validated config");
        let rotary = RotaryEmbedding::new(config.rotary_dim(), config.rope_theta());
        let dropout = |p: f64| DropoutConfig::new(p).init();

        let mut get = |name: &str, shape: &[usize]| source(name, shape);
        let linear = |get: &mut dyn FnMut(&str, &[usize]) -> Result<TensorData>,
                      name: &str,
                      out: usize,
                      inp: usize|
         -> Result<Linear<B>> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = get(&format!("{name}.bias"), &[out])?;
            Ok(Linear {
                weight: Param::from_tensor(Tensor::from_data(transpose(w), device)),
                bias: Some(Param::from_tensor(Tensor::from_data(b, device))),
            })
        };
        let norm = |get: &mut dyn FnMut(&str, &[usize]) -> Result<TensorData>,
                    name: &str,
                    n: usize,
                    eps: f64|
         -> Result<LayerNorm<B>> {
            let w = get(&format!("{name}.weight"), &[n])?;
            let b = get(&format!("{name}.bias"), &[n])?;
            Ok(LayerNorm::new(
                Tensor::from_data(w, device),
                Tensor::from_data(b, device),
                eps,
            ))
        };

        let embed = get("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let embed_tokens = Embedding {
            weight: Param::from_tensor(Tensor::from_data(embed, device)),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm = norm(&mut get, &format!("{p}.input_layernorm"), h, eps)?;
            let (q_layernorm, k_layernorm) = if config.qk_layernorm {
                (
                    Some(norm(
                        &mut get,
                        &format!("{p}.self_attn.q_layernorm"),
                        hd,
                        eps,
                    )?),
                    Some(norm(
                        &mut get,
                        &format!("{p}.self_attn.k_layernorm"),
                        hd,
                        eps,
                    )?),
                )
            } else {
                (None, None)
            };
            let self_attn = Attention {
                q_proj: linear(&mut get, &format!("{p}.self_attn.q_proj"), h, h)?,
                k_proj: linear(&mut get, &format!("{p}.self_attn.k_proj"), kv, h)?,
                v_proj: linear(&mut get, &format!("{p}.self_attn.v_proj"), kv, h)?,
                dense: linear(&mut get, &format!("{p}.self_attn.dense"), h, h)?,
                q_layernorm,
                k_layernorm,
                attn_dropout: dropout(config.attention_dropout),
                rotary: rotary.clone(),
                num_heads: config.num_attention_heads,
                num_kv_heads: config.kv_heads(),
                head_dim: hd,
            };
            let mlp = Mlp {
                fc1: linear(
                    &mut get,
                    &format!("{p}.mlp.fc1"),
                    config.intermediate_size,
                    h,
                )?,
                fc2: linear(
                    &mut get,
                    &format!("{p}.mlp.fc2"),
                    h,
                    config.intermediate_size,
                )?,
                act,
            };
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                mlp,
                resid_dropout: dropout(config.resid_pdrop),
            });
        }
        let final_layernorm = norm(&mut get, "model.final_layernorm", h, eps)?;
        let lm_head = if config.tie_word_embeddings {
            let b = get("lm_head.bias", &[config.vocab_size])?;
            Linear {
                weight: Param::from_tensor(embed_tokens.weight.val().transpose()),
                bias: Some(Param::from_tensor(Tensor::from_data(b, device))),
            }
        } else {
            linear(&mut get, "lm_head", config.vocab_size, h)?
        };
        Ok(Self {
            embed_tokens,
            embed_dropout: dropout(config.embd_pdrop),
            layers,
            final_layernorm,
            lm_head,
            rotary,
        })
    }
}

/// `[out, in]` (PyTorch) -> `[in, out]` (Burn's Linear), on the host, once at load time.
fn transpose(data: TensorData) -> TensorData {
    let [rows, cols]: [usize; 2] = data.shape.as_slice().try_into().expect("2-d weight");
    let src = data.into_vec::<f32>().expect("f32 weights");
    let mut dst = vec![0f32; src.len()];
    const TILE: usize = 64;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    TensorData::new(dst, [cols, rows])
}

/// A `[1, n]` Int tensor of token ids.
pub fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}
