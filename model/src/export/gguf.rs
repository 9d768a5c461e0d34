//! A Phi-2 checkpoint (with its LoRA adapter merged in) as one GGUF file that llama.cpp and
//! Ollama load: the metadata, tokenizer and tensor names that llama.cpp's own converter
//! (`convert_hf_to_gguf.py`, its `Phi2Model`) writes for `PhiForCausalLM`, and the weights in
//! f32, f16, bf16, q8_0 or q4_0 ([`crate::io::gguf`] is the format itself).
//!
//! Streams like [`super::merge`]: one tensor is read, merged, encoded and written at a time, into
//! a temporary file beside the output that is renamed into place only once complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::merge::{check_adapter, merged_f32};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::gguf::{Array, GgmlType, GgufWriter, TensorInfo, Value, quantize};
use crate::phi::Quantization;

/// llama.cpp's `llama_ftype` of a file whose large tensors are all `ty`.
pub(crate) fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
    }
}

/// The GGUF name llama.cpp reads for an HF tensor of `PhiForCausalLM` (its `phi2` architecture).
pub fn gguf_name(hf: &str) -> Option<String> {
    let (stem, kind) = hf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let base = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.final_layernorm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (i, module) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            let t = match module {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.dense" => "attn_output",
                "mlp.fc1" => "ffn_up",
                "mlp.fc2" => "ffn_down",
                _ => return None,
            };
            format!("blk.{i}.{t}")
        }
    };
    Some(format!("{base}.{kind}"))
}

/// The HF name of a GGUF tensor name (the inverse of [`gguf_name`]).
pub fn hf_name(config: &PhiConfig, gguf: &str) -> Option<String> {
    config
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| gguf_name(n).as_deref() == Some(gguf))
}

/// What a phi-2 checkpoint must not use for llama.cpp's `phi2` graph to compute the same model.
pub fn check_supported(config: &PhiConfig) -> Result<()> {
    let refuse = |what: &str, why: &str| {
        Err(Error::Invalid(format!(
            "cannot export to GGUF: {what} ({why})"
        )))
    };
    if config.qk_layernorm {
        return refuse(
            "qk_layernorm is true",
            "llama.cpp's phi2 graph has no query/key layer norms",
        );
    }
    if config.activation().ok() != Some(crate::config::Activation::GeluTanh) {
        return refuse(
            &format!("hidden_act is {:?}", config.hidden_act),
            "llama.cpp's phi2 graph computes the tanh GELU (gelu_new)",
        );
    }
    if config.tie_word_embeddings {
        return refuse(
            "tie_word_embeddings is true",
            "llama.cpp's phi2 graph reads its own output weight",
        );
    }
    Ok(())
}

/// The type a tensor is stored in: 1-D tensors (norms, biases) stay f32 as llama.cpp's converter
/// keeps them; a matrix whose rows are not a whole number of 32-value blocks falls back to f16
/// (as the converter does) when `ty` is a block quantization.
pub fn tensor_type(shape: &[usize], ty: GgmlType) -> GgmlType {
    if shape.len() < 2 {
        GgmlType::F32
    } else if !shape[shape.len() - 1].is_multiple_of(ty.block_size()) {
        GgmlType::F16
    } else {
        ty
    }
}

/// The tokenizer as llama.cpp's converter writes a GPT-2-style BPE (`tokenizer.ggml.*`).
fn tokenizer_metadata(dir: &Path, config: &PhiConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = crate::io::read_small_file(&path, 64 << 20)?;
    let bad = |msg: String| Error::Tokenizer {
        path: path.clone(),
        msg,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "model.type is {}, but GGUF export writes a BPE (gpt2) tokenizer",
            model["type"]
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    // id -> (text, added token's `special`)
    let mut by_id: HashMap<u64, (String, Option<bool>)> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("model.vocab[{tok:?}] is not an id")))?;
        by_id.insert(id, (tok.clone(), None));
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(bad("an added_tokens entry lacks its id or content".into()));
        };
        let special = t["special"].as_bool().unwrap_or(false);
        by_id.insert(id, (content.to_string(), Some(special)));
    }
    let n = config
        .vocab_size
        .max(by_id.keys().max().map_or(0, |m| *m as usize + 1));
    if n > config.vocab_size {
        return Err(bad(format!(
            "the tokenizer has ids up to {} but the model's vocab_size is {}",
            n - 1,
            config.vocab_size
        )));
    }
    // llama.cpp's token types: NORMAL 1, CONTROL 3, USER_DEFINED 4, UNUSED 5.
    let looks_special = |t: &str| {
        matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
            || (t.starts_with("<|") && t.ends_with("|>"))
            || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
            || t.starts_with("<start_of_")
            || t.starts_with("<end_of_")
    };
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n {
        match by_id.get(&(i as u64)) {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(5);
            }
            Some((t, None)) => {
                tokens.push(t.clone());
                types.push(1);
            }
            Some((t, Some(special))) => {
                if *special || looks_special(t) {
                    types.push(3);
                    tokens.push(t.clone());
                } else {
                    types.push(4);
                    tokens.push(t.replace('\u{2581}', " "));
                }
            }
        }
    }
    // Merges as "left right"; a space inside a part is written as U+0120 (the byte-level
    // alphabet's space), as the converter does for tokenizer.json's list-of-pairs form.
    let mut merges = Vec::new();
    for m in model["merges"].as_array().into_iter().flatten() {
        let line = match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &serde_json::Value| {
                    v.as_str()
                        .map(|s| s.replace(' ', "\u{0120}"))
                        .ok_or_else(|| {
                            bad("a model.merges pair holds something other than strings".into())
                        })
                };
                format!("{} {}", part(&pair[0])?, part(&pair[1])?)
            }
            _ => return Err(bad("model.merges holds something other than pairs".into())),
        };
        merges.push(line);
    }

    // bos / eos / unk: the tokenizer_config.json's special tokens, as the converter reads them,
    // else the model config's ids.
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let special_tokens: BTreeMap<String, String> = {
        let p = dir.join("tokenizer_config.json");
        let mut m = BTreeMap::new();
        if p.is_file() {
            let j: serde_json::Value =
                serde_json::from_str(&crate::io::read_small_file(&p, 1 << 24)?)
                    .map_err(|e| Error::config(&p, format!("invalid JSON: {e}")))?;
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                let v = &j[key];
                let text = v.as_str().or_else(|| v["content"].as_str());
                if let Some(t) = text {
                    m.insert(key.to_string(), t.to_string());
                }
            }
        }
        m
    };
    let mut meta: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), "gpt2".into()),
        // llama.cpp's name for phi-2's pre-tokenizer (the GPT-2 byte-level regex).
        ("tokenizer.ggml.pre".into(), "phi-2".into()),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens.clone())),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ),
    ];
    let first =
        |ids: &Option<crate::config::TokenIds>| ids.as_ref().and_then(|t| t.ids().first().copied());
    for (key, gguf_key, fallback) in [
        (
            "bos_token",
            "tokenizer.ggml.bos_token_id",
            first(&config.bos_token_id),
        ),
        (
            "eos_token",
            "tokenizer.ggml.eos_token_id",
            first(&config.eos_token_id),
        ),
        ("unk_token", "tokenizer.ggml.unknown_token_id", None),
        ("pad_token", "tokenizer.ggml.padding_token_id", None),
    ] {
        if let Some(id) = special_tokens.get(key).and_then(|t| id_of(t)).or(fallback) {
            meta.push((gguf_key.into(), Value::U32(id)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    Ok(meta)
}

/// Every metadata key of the file, in the converter's order.
pub fn metadata(ckpt: &Checkpoint, ty: GgmlType, name: &str) -> Result<Vec<(String, Value)>> {
    let c = ckpt.config();
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), "phi2".into()),
        ("general.name".into(), name.into()),
        (
            "phi2.context_length".into(),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            "phi2.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "phi2.feed_forward_length".into(),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            "phi2.block_count".into(),
            Value::U32(c.num_hidden_layers as u32),
        ),
        (
            "phi2.attention.head_count".into(),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            "phi2.attention.head_count_kv".into(),
            Value::U32(c.kv_heads() as u32),
        ),
        (
            "phi2.attention.layer_norm_epsilon".into(),
            Value::F32(c.layer_norm_eps as f32),
        ),
        (
            "phi2.rope.dimension_count".into(),
            Value::U32(c.rotary_dim() as u32),
        ),
    ];
    if c.rope_theta() != 10_000.0 {
        m.push((
            "phi2.rope.freq_base".into(),
            Value::F32(c.rope_theta() as f32),
        ));
    }
    m.push(("general.file_type".into(), Value::U32(file_type(ty))));
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m.extend(tokenizer_metadata(ckpt.dir(), c)?);
    Ok(m)
}

pub struct ExportReport {
    pub tensors: usize,
    pub merged_modules: usize,
    pub bytes: u64,
    /// Matrices written as f16 because their rows are no whole number of blocks.
    pub fell_back: Vec<String>,
}

/// Writes `out` (refused if it exists, unless `overwrite`): the base in `ckpt` with `adapter`
/// merged in (into the NF4-dequantized weights with `quant`, the model a QLoRA adapter was
/// trained against), as GGUF with its large tensors in `ty`.
pub fn export_gguf(
    ckpt: &Checkpoint,
    adapter: Option<&Adapter>,
    quant: Option<Quantization>,
    ty: GgmlType,
    name: &str,
    out: &Path,
    overwrite: bool,
) -> Result<ExportReport> {
    let config = ckpt.config();
    check_supported(config)?;
    if let Some(a) = adapter {
        check_adapter(config, a)?;
    }
    super::check_out_file(out, overwrite)?;
    let meta = metadata(ckpt, ty, name)?;
    let tensors = config.expected_tensors();
    let mut infos = Vec::new();
    let mut fell_back = Vec::new();
    for (hf, shape) in &tensors {
        let g = gguf_name(hf).ok_or_else(|| {
            Error::Invalid(format!("cannot export to GGUF: no llama.cpp name for {hf}"))
        })?;
        let t = tensor_type(shape, ty);
        if t != ty && shape.len() > 1 {
            fell_back.push(g.clone());
        }
        infos.push(TensorInfo::new(g, shape, t));
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = GgufWriter::new(std::io::BufWriter::new(file), out, &meta, &infos)?;
        let bar =
            crate::io::progress_bar(tensors.len() as u64, &format!("merging and writing {ty}"));
        let mut merged = 0;
        let mut bytes = 0u64;
        for ((hf, _), info) in tensors.iter().zip(&infos) {
            let (values, lora) = merged_f32(ckpt, adapter, quant, hf)?;
            merged += usize::from(lora);
            let data = quantize(&values, info.ty)
                .map_err(|e| Error::Invalid(format!("{}: {e}", info.name)))?;
            bytes += data.len() as u64;
            w.write_tensor(&info.name, &data)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let buffered = w.finish()?;
        let file = buffered
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(ExportReport {
            tensors: infos.len(),
            merged_modules: merged,
            bytes,
            fell_back,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
