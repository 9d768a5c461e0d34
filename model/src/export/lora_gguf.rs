//! A LoRA adapter alone as llama.cpp's GGUF LoRA (what its `convert_lora_to_gguf.py` writes from
//! a PEFT directory): `general.type = "adapter"`, `general.architecture = "phi2"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha` (f32), and per adapted weight `W` of the base
//! (named as [`super::gguf::gguf_name`] names it) two tensors, `W.lora_a` (PEFT's A, `[r, in]`,
//! ggml ne `[in, r]`) and `W.lora_b` (B, `[out, r]`, ne `[r, out]`). llama.cpp, and Ollama's
//! `ADAPTER`, add `scale * B A x` to `W x` with `scale = alpha / r` of each pair.
//!
//! What one alpha cannot say (rsLoRA's `alpha / sqrt(r)`, `rank_pattern`, `alpha_pattern`) is
//! folded into `lora_b`: each pair's B is multiplied by `scaling / (alpha / r)`, so the product
//! llama.cpp forms is exactly PEFT's `scaling B A`. For a base GGUF whose attention takes q, k and
//! v from one fused `attn_qkv` weight (older conversions of phi-2), the three pairs of a layer
//! become one: A stacked (rank `r_q + r_k + r_v`), B block-diagonal, so `B A` is the three
//! deltas stacked as the fused weight's rows.

use std::path::Path;

use super::gguf::{file_type, gguf_name};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::io::adapter::{Adapter, LoraWeights};
use crate::io::gguf::{GgmlType, GgufFile, GgufWriter, TensorInfo, Value, quantize};

/// How the base model's GGUF holds the attention's q, k and v weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// `attn_q`, `attn_k`, `attn_v` (what `phitune export` and today's converter write).
    Separate,
    /// One `attn_qkv` weight, q's rows first, then k's, then v's.
    Fused,
}

/// The layout of a base GGUF, checked against the model the adapter was trained on: a phi2
/// model (not an adapter) with this many layers of this width.
pub fn base_layout(path: &Path, config: &PhiConfig) -> Result<QkvLayout> {
    let f = GgufFile::open(path)?;
    let bad = |msg: String| Error::Invalid(format!("--base-gguf {}: {msg}", path.display()));
    let text = |key: &str| match f.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let arch = text("general.architecture").unwrap_or_default();
    if arch != "phi2" {
        return Err(bad(format!(
            "a {:?} model; the adapter is for phi2",
            if arch.is_empty() { "unknown" } else { &arch }
        )));
    }
    if text("general.type").as_deref() == Some("adapter") {
        return Err(bad("an adapter, not a base model".into()));
    }
    let number = |key: &str| match f.get(key) {
        Some(Value::U32(v)) => Some(*v as usize),
        Some(Value::U64(v)) => Some(*v as usize),
        Some(Value::I32(v)) => Some(*v as usize),
        _ => None,
    };
    for (key, want) in [
        ("phi2.block_count", config.num_hidden_layers),
        ("phi2.embedding_length", config.hidden_size),
    ] {
        if let Some(got) = number(key)
            && got != want
        {
            return Err(bad(format!(
                "{key} is {got}, the adapter's base has {want}"
            )));
        }
    }
    if f.tensor("blk.0.attn_q.weight").is_some() {
        Ok(QkvLayout::Separate)
    } else if f.tensor("blk.0.attn_qkv.weight").is_some() {
        Ok(QkvLayout::Fused)
    } else {
        Err(bad(
            "has neither blk.0.attn_q.weight nor blk.0.attn_qkv.weight".into(),
        ))
    }
}

/// One `lora_a` / `lora_b` pair, ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// The base weight's GGUF name (`blk.0.attn_q.weight`).
    pub base: String,
    pub r: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `[r, d_in]` row-major.
    pub a: Vec<f32>,
    /// `[d_out, r]` row-major, with the scaling llama.cpp does not apply folded in.
    pub b: Vec<f32>,
    /// Whether B was rescaled (the adapter's scaling is not `alpha / r` for this pair).
    pub folded: bool,
}

/// llama.cpp's scale for a pair of rank `r` (`llama-adapter.h`: `alpha / rank`, or 1 without
/// an alpha).
fn llama_scale(alpha: f32, r: usize) -> f64 {
    if alpha != 0.0 {
        alpha as f64 / r as f64
    } else {
        1.0
    }
}

/// B scaled so that `llama_scale(alpha, r) * B' = scaling * B`.
fn folded_b(w: &LoraWeights, alpha: f32, r: usize) -> (Vec<f32>, bool) {
    let factor = w.scaling / llama_scale(alpha, r);
    if factor == 1.0 {
        return (w.b.clone(), false);
    }
    (
        w.b.iter().map(|&v| (v as f64 * factor) as f32).collect(),
        true,
    )
}

/// The pairs to write for `adapter`, in layer order (q, k, v, dense, fc1, fc2 within a layer).
pub fn lora_pairs(
    config: &PhiConfig,
    adapter: &Adapter,
    layout: QkvLayout,
) -> Result<Vec<LoraPair>> {
    let alpha = adapter.config.alpha as f32;
    let order = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"];
    let mut pairs = Vec::new();
    for layer in 0..config.num_hidden_layers {
        let module = |short: &str| {
            adapter
                .modules
                .get(&crate::io::adapter::module_path(layer, short))
        };
        let fused = layout == QkvLayout::Fused;
        if fused {
            let parts: Vec<(usize, &LoraWeights)> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .filter_map(|(i, s)| module(s).map(|w| (i, w)))
                .collect();
            if !parts.is_empty() {
                pairs.push(fused_qkv(config, layer, &parts, alpha)?);
            }
        }
        for short in order {
            if fused && short.ends_with("_proj") {
                continue;
            }
            let Some(w) = module(short) else { continue };
            let path = crate::io::adapter::module_path(layer, short);
            let base = gguf_name(&format!("{path}.weight"))
                .ok_or_else(|| Error::Invalid(format!("no llama.cpp name for {path}")))?;
            let (b, folded) = folded_b(w, alpha, w.r);
            pairs.push(LoraPair {
                base,
                r: w.r,
                d_in: w.d_in,
                d_out: w.d_out,
                a: w.a.clone(),
                b,
                folded,
            });
        }
    }
    Ok(pairs)
}

/// q, k and v of one layer as one pair on the fused `attn_qkv` weight.
fn fused_qkv(
    config: &PhiConfig,
    layer: usize,
    parts: &[(usize, &LoraWeights)],
    alpha: f32,
) -> Result<LoraPair> {
    let d_in = config.hidden_size;
    let kv = config.kv_heads() * config.head_dim();
    let rows = [config.hidden_size, kv, kv];
    let d_out: usize = rows.iter().sum();
    let r: usize = parts.iter().map(|(_, w)| w.r).sum();
    let mut a = Vec::with_capacity(r * d_in);
    let mut b = vec![0f32; d_out * r];
    let mut col = 0;
    let mut folded = false;
    for &(i, w) in parts {
        if w.d_in != d_in || w.d_out != rows[i] {
            return Err(Error::Invalid(format!(
                "layer {layer}: a {}x{} adapter for a {}x{d_in} attention weight",
                w.d_out, w.d_in, rows[i]
            )));
        }
        a.extend_from_slice(&w.a);
        let factor = w.scaling / llama_scale(alpha, r);
        folded |= factor != 1.0;
        let row0: usize = rows[..i].iter().sum();
        for o in 0..w.d_out {
            for k in 0..w.r {
                b[(row0 + o) * r + col + k] = (w.b[o * w.r + k] as f64 * factor) as f32;
            }
        }
        col += w.r;
    }
    Ok(LoraPair {
        base: format!("blk.{layer}.attn_qkv.weight"),
        r,
        d_in,
        d_out,
        a,
        b,
        folded,
    })
}

/// What [`export_gguf_lora`] wrote.
pub struct LoraGgufReport {
    pub pairs: usize,
    /// Pairs whose B carries folded scaling (rsLoRA, rank or alpha patterns, fused q/k/v).
    pub folded: usize,
    pub bytes: u64,
    pub alpha: f32,
}

/// The file's metadata, in the converter's order.
pub fn metadata(name: &str, alpha: f32, ty: GgmlType) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), "phi2".into()),
        ("general.type".into(), "adapter".into()),
        ("general.name".into(), name.into()),
        ("general.file_type".into(), Value::U32(file_type(ty))),
        ("adapter.type".into(), "lora".into()),
        ("adapter.lora.alpha".into(), Value::F32(alpha)),
    ]
}

/// Writes `adapter` as a GGUF LoRA for the base model of `config` whose GGUF holds q/k/v as
/// `layout` says, tensors in `ty` (f32, f16 or bf16). `out` is refused if it exists, unless
/// `overwrite`; it is written whole into a temporary file and renamed into place.
pub fn export_gguf_lora(
    config: &PhiConfig,
    adapter: &Adapter,
    layout: QkvLayout,
    ty: GgmlType,
    name: &str,
    out: &Path,
    overwrite: bool,
) -> Result<LoraGgufReport> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(Error::Invalid(format!(
            "--type {}: a GGUF LoRA holds f32, f16 or bf16 tensors",
            ty.name()
        )));
    }
    super::check_out_file(out, overwrite)?;
    let pairs = lora_pairs(config, adapter, layout)?;
    if pairs.is_empty() {
        return Err(Error::Invalid("the adapter adapts no module".into()));
    }
    let alpha = adapter.config.alpha as f32;
    let mut infos = Vec::with_capacity(2 * pairs.len());
    let mut data = Vec::with_capacity(2 * pairs.len());
    for p in &pairs {
        for (suffix, shape, values) in [
            ("lora_a", [p.r, p.d_in], &p.a),
            ("lora_b", [p.d_out, p.r], &p.b),
        ] {
            let info = TensorInfo::new(format!("{}.{suffix}", p.base), &shape, ty);
            data.push(
                quantize(values, ty).map_err(|e| Error::Invalid(format!("{}: {e}", info.name)))?,
            );
            infos.push(info);
        }
    }
    let meta = metadata(name, alpha, ty);
    let bytes = data.iter().map(|d| d.len() as u64).sum();
    crate::io::atomic_write(out, |w| {
        let mut g = GgufWriter::new(w, out, &meta, &infos).map_err(std::io::Error::other)?;
        for (info, d) in infos.iter().zip(&data) {
            g.write_tensor(&info.name, d)
                .map_err(std::io::Error::other)?;
        }
        g.finish().map_err(std::io::Error::other)?;
        Ok(())
    })?;
    Ok(LoraGgufReport {
        pairs: pairs.len(),
        folded: pairs.iter().filter(|p| p.folded).count(),
        bytes,
        alpha,
    })
}
