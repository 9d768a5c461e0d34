//! `PhiForCausalLM`: token embedding, parallel attention + MLP decoder layers sharing one
//! LayerNorm, final LayerNorm, and a biased `lm_head`.

use std::time::Instant;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Bool, FloatDType, Int, Tensor, TensorData, backend::Backend};

use crate::attention::{Attention, AttnContext};
use crate::cache::KvCache;
use crate::config::{Activation, PhiConfig};
use crate::error::{Error, Result};
use crate::frozen::{FrozenLinear, FrozenWeight, Nf4Weight};
use crate::io::adapter::{Adapter, LoraWeights, module_path};
use crate::io::checkpoint::Checkpoint;
use crate::lora::{Lora, LoraConfig, LoraLinear};
use crate::norm::LayerNorm;
use crate::ops::cross_entropy;
use crate::ops::{Nf4Backend, Nf4Host};
use crate::packing::Packing;
use crate::rotary::RotaryEmbedding;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: LoraLinear<B>,
    pub fc2: LoraLinear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Nf4Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = match self.act {
            Activation::GeluTanh => crate::ops::gelu_tanh(h),
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

impl<B: Nf4Backend> DecoderLayer<B> {
    fn forward(
        &self,
        h: Tensor<B, 3>,
        ctx: &AttnContext<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        // Parallel block: attention and MLP both read the same normalised input.
        let x = self.input_layernorm.forward(h.clone());
        let p = self.resid_dropout.prob;
        let attn = crate::ops::dropout(self.self_attn.forward(x.clone(), ctx, cache), p);
        let ff = crate::ops::dropout(self.mlp.forward(x), p);
        attn + ff + h
    }
}

#[derive(Module, Debug)]
pub struct Phi<B: Backend> {
    /// `[vocab, hidden]`, frozen (a module constant, like every base weight).
    pub embed_tokens: Tensor<B, 2>,
    pub embed_dropout: Dropout,
    pub layers: Vec<DecoderLayer<B>>,
    pub final_layernorm: LayerNorm<B>,
    pub lm_head: FrozenLinear<B>,
    pub rotary: RotaryEmbedding,
}

impl<B: Nf4Backend> Phi<B> {
    /// Logits `[batch, seq, vocab]` for a batch of right-padded sequences (no cache).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_packed(ids, None)
    }

    /// As [`forward`](Self::forward), for rows laid out by `packing` (several examples per
    /// row, each on its own) when given.
    pub fn forward_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        packing: Option<&Packing>,
    ) -> Tensor<B, 3> {
        self.lm_head.forward(self.final_hidden(ids, packing))
    }

    /// The head's logits for final hidden states `h [rows, hidden]`: `[rows, vocab]`.
    pub fn head_logits(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        self.lm_head.forward(h)
    }

    /// The final hidden states `[batch, seq, hidden]` (after the final LayerNorm): what the
    /// head reads. `packing` lays several examples in a row.
    pub fn final_hidden(&self, ids: Tensor<B, 2, Int>, packing: Option<&Packing>) -> Tensor<B, 3> {
        self.final_layernorm
            .forward(self.hidden(ids, None, packing))
    }

    /// The head's cross-entropy for the final hidden states of the target rows only, `h [t,
    /// hidden]` against `targets [t]`, `chunk` rows of logits at a time:
    /// `(nll [t] f32, argmax [t])`.
    pub fn head_cross_entropy(
        &self,
        h: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
        chunk: usize,
    ) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
        crate::ops::head_cross_entropy(
            h,
            self.lm_head.dense_weight(),
            self.lm_head.bias.clone(),
            targets,
            chunk,
        )
    }

    /// Runs `ids` (the positions after those already in `cache`) and appends them to the cache.
    /// Returns the logits of the last position only, `[batch, vocab]`: all generation needs,
    /// and it spares the vocab projection of every prompt position.
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let h = self.hidden(ids, Some(cache), None);
        let [b, s, d] = h.dims();
        let last = h.narrow(1, s - 1, 1).reshape([b, 1, d]);
        self.lm_head
            .forward(self.final_layernorm.forward(last))
            .reshape([b, self.vocab_size()])
    }

    /// As [`forward_cached`](Self::forward_cached), with the logits of every new position,
    /// `[batch, seq, vocab]` (scoring continuations of a shared, cached prompt).
    pub fn forward_cached_all(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let h = self.hidden(ids, Some(cache), None);
        self.lm_head.forward(self.final_layernorm.forward(h))
    }

    /// The decoder stack. With `cache`, `ids` continue the cached positions; with `packing`,
    /// each example of a row has its own positions and sees only itself (no cache then).
    fn hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        packing: Option<&Packing>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let ctx = match packing {
            Some(p) => {
                assert!(
                    cache.is_none() && [p.batch(), p.seq()] == [b, s],
                    "a packing of {}x{} for ids of {b}x{s}",
                    p.batch(),
                    p.seq()
                );
                let (cos, sin) = self.rotary.tables_at::<B>(&p.positions(), &device);
                AttnContext {
                    cos,
                    sin,
                    mask: Some(p.mask(&device)),
                }
            }
            None => {
                let (cos, sin) = self.rotary.tables::<B>(past, s, &device);
                let mask = (s > 1).then(|| {
                    Tensor::<B, 2, Bool>::tril_mask([s, past + s], past as i64, &device)
                        .unsqueeze::<3>()
                });
                AttnContext { cos, sin, mask }
            }
        };
        let mut h = crate::ops::dropout(
            burn::tensor::module::embedding(self.embed_tokens.clone(), ids),
            self.embed_dropout.prob,
        );
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, &ctx, cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        h
    }

    /// `nll[i] = -log p(tokens[i + 1] | tokens[..=i])` for one sequence, in f32.
    pub fn token_nll(&self, tokens: &[u32], device: &B::Device) -> Vec<f32> {
        if tokens.len() < 2 {
            return Vec::new();
        }
        let ids = ids_tensor::<B>(tokens, device);
        let logits = self.forward(ids).cast(FloatDType::F32);
        let [_, s, vocab] = logits.dims();
        // Position i predicts token i + 1; the last position predicts nothing.
        let targets: Vec<i64> = tokens[1..].iter().map(|&t| t as i64).chain([-1]).collect();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [s]), device);
        let (nll, _) = cross_entropy(logits.reshape([s, vocab]), targets);
        nll.narrow(0, 0, s - 1)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data")
    }
}

impl<B: Backend> Phi<B> {
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    /// Every LoRA-adaptable projection with its HF module path and short name.
    pub fn projections(&self) -> Vec<(String, &'static str, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.self_attn;
            let projs = [
                ("q_proj", &a.q_proj),
                ("k_proj", &a.k_proj),
                ("v_proj", &a.v_proj),
                ("dense", &a.dense),
                ("fc1", &l.mlp.fc1),
                ("fc2", &l.mlp.fc2),
            ];
            out.extend(
                projs
                    .into_iter()
                    .map(|(short, p)| (module_path(i, short), short, p)),
            );
        }
        out
    }

    fn projections_mut(&mut self) -> Vec<(String, &'static str, &mut LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let projs = [
                ("q_proj", &mut a.q_proj),
                ("k_proj", &mut a.k_proj),
                ("v_proj", &mut a.v_proj),
                ("dense", &mut a.dense),
                ("fc1", &mut l.mlp.fc1),
                ("fc2", &mut l.mlp.fc2),
            ];
            out.extend(
                projs
                    .into_iter()
                    .map(|(short, p)| (module_path(i, short), short, p)),
            );
        }
        out
    }

    /// Freezes every existing parameter, then adds fresh adapters (PEFT's init: B = 0, so the
    /// model's output is unchanged) on the configured targets. Only the adapters train.
    pub fn with_lora(self, config: &LoraConfig, seed: u64, device: &B::Device) -> Self {
        let mut model = self.no_grad();
        for (path, short, proj) in model.projections_mut() {
            proj.lora = None;
            if config.targets(short) {
                let (d_in, d_out) = proj.dims();
                let (r, alpha) = config.rank_alpha(&path);
                let scaling = config.scaling(r, alpha);
                // Each module's A from its own stream: independent of the module order.
                let module_seed = crate::ops::splitmix64(seed ^ fnv1a(&path));
                proj.lora = Some(Lora::init(
                    d_in,
                    d_out,
                    r,
                    scaling,
                    config.dropout,
                    module_seed,
                    device,
                ));
            }
        }
        model
    }

    /// Freezes the model and installs an adapter's weights (replacing any adapters).
    pub fn with_adapter(self, adapter: &Adapter, device: &B::Device) -> Result<Self> {
        let mut model = self.no_grad();
        let mut used = 0;
        for (path, _, proj) in model.projections_mut() {
            proj.lora = None;
            let Some(w) = adapter.modules.get(&path) else {
                continue;
            };
            let (d_in, d_out) = proj.dims();
            if (w.d_in, w.d_out) != (d_in, d_out) {
                return Err(Error::Invalid(format!(
                    "adapter weights for {path} fit a [{}, {}] layer but the model's is [{d_out}, {d_in}] \
                     (an adapter for another model?)",
                    w.d_out, w.d_in
                )));
            }
            // PEFT's A [r, in] / B [out, r] -> our [in, r] / [r, out].
            let a = TensorData::new(transpose_vec(&w.a, w.r, d_in), [d_in, w.r]);
            let b = TensorData::new(transpose_vec(&w.b, d_out, w.r), [w.r, d_out]);
            proj.lora = Some(Lora::from_tensors(
                Tensor::from_data(a, device),
                Tensor::from_data(b, device),
                w.scaling,
                adapter.config.dropout,
            ));
            used += 1;
        }
        if used != adapter.modules.len() {
            let names: Vec<String> = model.projections().into_iter().map(|(p, _, _)| p).collect();
            let extra = adapter
                .modules
                .keys()
                .find(|k| !names.contains(k))
                .cloned()
                .unwrap_or_default();
            return Err(Error::Invalid(format!(
                "the adapter has weights for {extra}, which this model does not have (an adapter for another model?)"
            )));
        }
        Ok(model)
    }

    /// The current adapters in PEFT's layout, for writing.
    pub fn adapter(&self, config: &LoraConfig, base_model_name_or_path: Option<String>) -> Adapter {
        let host = |t: Tensor<B, 2>| {
            t.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 data")
        };
        let mut modules = std::collections::BTreeMap::new();
        for (path, _, proj) in self.projections() {
            let Some(lora) = &proj.lora else { continue };
            let (d_in, d_out) = proj.dims();
            let r = lora.rank();
            let weights = LoraWeights {
                r,
                d_in,
                d_out,
                a: transpose_vec(&host(lora.a.val()), d_in, r),
                b: transpose_vec(&host(lora.b.val()), r, d_out),
                scaling: lora.scaling,
            };
            modules.insert(path, weights);
        }
        Adapter {
            config: config.clone(),
            base_model_name_or_path,
            modules,
        }
    }

    /// Builds a model with random weights (for benchmarks and tests that need no checkpoint).
    pub fn random(config: &PhiConfig, device: &B::Device) -> Self {
        Self::random_with(config, device, None)
    }

    /// [`random`](Self::random), with the decoder Linear weights quantized as by `load_with`.
    pub fn random_with(
        config: &PhiConfig,
        device: &B::Device,
        quant: Option<Quantization>,
    ) -> Self {
        let init = |shape: Vec<usize>, std: f64| -> TensorData {
            let n: usize = shape.iter().product();
            let dist = burn::tensor::Distribution::Normal(0.0, std);
            let t = Tensor::<B, 1>::random([n], dist, device);
            TensorData::new(
                t.into_data().convert::<f32>().into_vec::<f32>().unwrap(),
                shape,
            )
        };
        Self::build(config, device, quant, &mut |name, shape| {
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
        Self::load_with(ckpt, device, None)
    }

    /// Like [`Self::load`], quantizing every decoder-layer Linear weight to NF4 as it is read
    /// (each dense weight is dropped before the next is read) when `quant` is given.
    pub fn load_with(
        ckpt: &Checkpoint,
        device: &B::Device,
        quant: Option<Quantization>,
    ) -> Result<Self> {
        let config = ckpt.config().clone();
        let total = config.expected_tensors().len() as u64;
        let bar = crate::io::progress_bar(total, "loading weights");
        let start = Instant::now();
        let model = Self::build(&config, device, quant, &mut |name, shape| {
            let (values, got) = ckpt.read_f32(name)?;
            debug_assert_eq!(got, shape);
            bar.inc(1);
            Ok(TensorData::new(values, got))
        })?;
        bar.finish_and_clear();
        eprintln!(
            "loaded {} ({} layers, {} parameters) in {:.1}s",
            ckpt.dir().display(),
            config.num_hidden_layers,
            human_count(config.num_parameters()),
            start.elapsed().as_secs_f64()
        );
        Ok(model)
    }

    /// Constructs the model, asking `source` for each HF tensor by name and `[out, in]` shape.
    fn build(
        config: &PhiConfig,
        device: &B::Device,
        quant: Option<Quantization>,
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
        // Decoder-layer projections (quantized when asked) and lm_head (always dense).
        let linear = |get: &mut dyn FnMut(&str, &[usize]) -> Result<TensorData>,
                      name: &str,
                      out: usize,
                      inp: usize,
                      quant: Option<Quantization>|
         -> Result<FrozenLinear<B>> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = get(&format!("{name}.bias"), &[out])?;
            let weight = match quant {
                None => FrozenWeight::Dense(Tensor::from_data(w, device)),
                Some(q) => {
                    let values = w.into_vec::<f32>().expect("f32 weights");
                    let host = Nf4Host::quantize(&values, [out, inp], q.double_quant);
                    drop(values);
                    FrozenWeight::Nf4(Nf4Weight::from_host(&host, device))
                }
            };
            Ok(FrozenLinear {
                weight,
                bias: Some(Tensor::from_data(b, device)),
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
        let embed_tokens = Tensor::from_data(embed, device);
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
                q_proj: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.self_attn.q_proj"),
                    h,
                    h,
                    quant,
                )?),
                k_proj: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.self_attn.k_proj"),
                    kv,
                    h,
                    quant,
                )?),
                v_proj: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.self_attn.v_proj"),
                    kv,
                    h,
                    quant,
                )?),
                dense: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.self_attn.dense"),
                    h,
                    h,
                    quant,
                )?),
                q_layernorm,
                k_layernorm,
                attn_dropout: dropout(config.attention_dropout),
                rotary: rotary.clone(),
                num_heads: config.num_attention_heads,
                num_kv_heads: config.kv_heads(),
                head_dim: hd,
            };
            let mlp = Mlp {
                fc1: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.mlp.fc1"),
                    config.intermediate_size,
                    h,
                    quant,
                )?),
                fc2: LoraLinear::new(linear(
                    &mut get,
                    &format!("{p}.mlp.fc2"),
                    h,
                    config.intermediate_size,
                    quant,
                )?),
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
            FrozenLinear {
                weight: FrozenWeight::Dense(embed_tokens.clone()),
                bias: Some(Tensor::from_data(b, device)),
            }
        } else {
            linear(&mut get, "lm_head", config.vocab_size, h, None)?
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

/// Row-major `[rows, cols]` -> row-major `[cols, rows]`, cache-blocked.
/// FNV-1a of a module path (a seed per module).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn transpose_vec(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(src.len(), rows * cols);
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
    dst
}

/// A `[1, n]` Int tensor of token ids.
pub fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

/// NF4 quantization of the decoder-layer Linear weights while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    /// Also quantize the absmax values (bitsandbytes' `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

/// `2.78B`, `1.23M`, `4.5K`.
fn human_count(n: usize) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n}"),
    }
}
