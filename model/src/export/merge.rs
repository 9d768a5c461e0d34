//! Folding a LoRA adapter into its base checkpoint: `W' = W + scaling * B @ A` for every adapted
//! Linear, written as a standard HF checkpoint that `PhiForCausalLM.from_pretrained` loads.
//!
//! Streams: one tensor is read, merged and written at a time. Tensors the adapter does not touch
//! are copied byte for byte; merged ones are written in the base's dtype.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::adapter::Adapter;
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::{Dtype, StreamWriter, dtype_bytes, f32_to_bytes};

/// Files copied unchanged from the base model directory when present.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

pub struct MergeReport {
    pub merged_modules: usize,
    pub shards: usize,
    pub bytes: u64,
}

/// Writes the merged checkpoint into `out`, which must not exist or be empty (unless
/// `overwrite`). Everything is
/// written into a sibling temporary directory first and renamed into place at the end, so an
/// interrupted merge leaves no half-written model behind.
/// `dtype`: the dtype to write (default: each tensor's dtype in the base checkpoint).
pub fn merge(
    ckpt: &Checkpoint,
    adapter: &Adapter,
    out: &Path,
    max_shard_bytes: u64,
    dtype: Option<Dtype>,
    quant: Option<crate::phi::Quantization>,
    overwrite: bool,
) -> Result<MergeReport> {
    let tensors = ckpt.config().expected_tensors();
    check_adapter(ckpt.config(), adapter)?;
    let tmp = crate::io::prepare_output_dir(out, overwrite)?;
    let result = (|| {
        // Plan shards by bytes, keeping the checkpoint's tensor order.
        let mut shards: Vec<Vec<(String, Dtype, Vec<usize>)>> = vec![Vec::new()];
        let mut size = 0u64;
        let mut total = 0u64;
        for (name, shape) in &tensors {
            let stored = ckpt.info(name).map(|(_, i)| i.dtype).unwrap_or(Dtype::F32);
            let dtype = dtype.unwrap_or(stored);
            let bytes = (shape.iter().product::<usize>() * dtype_bytes(dtype)) as u64;
            if size > 0 && size + bytes > max_shard_bytes {
                shards.push(Vec::new());
                size = 0;
            }
            size += bytes;
            total += bytes;
            shards
                .last_mut()
                .unwrap()
                .push((name.clone(), dtype, shape.clone()));
        }
        let n = shards.len();
        let file_name = |i: usize| {
            if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{n:05}.safetensors", i + 1)
            }
        };
        let bar = crate::io::progress_bar(tensors.len() as u64, "merging");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut weight_map = BTreeMap::new();
        let mut merged = 0;
        for (i, entries) in shards.iter().enumerate() {
            let mut w = StreamWriter::create(&tmp.join(file_name(i)), entries, &meta)?;
            for (name, dtype, _) in entries {
                let touched = changes(name, Some(adapter), quant);
                let bytes = if !touched {
                    match ckpt.info(name) {
                        Some((_, i)) if i.dtype == *dtype => ckpt.read_raw(name)?,
                        _ => f32_to_bytes(&ckpt.read_f32(name)?.0, *dtype),
                    }
                } else {
                    let (values, lora) = merged_f32(ckpt, Some(adapter), quant, name)?;
                    merged += usize::from(lora);
                    f32_to_bytes(&values, *dtype)
                };
                w.write_tensor(name, &bytes)?;
                weight_map.insert(name.clone(), file_name(i));
                bar.inc(1);
            }
            w.finish()?;
        }
        bar.finish_and_clear();
        if n > 1 {
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = tmp.join("model.safetensors.index.json");
            std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap())
                .map_err(|e| Error::io(&path, e))?;
        }
        for f in SIDE_FILES {
            let src = ckpt.dir().join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
            }
        }
        Ok(MergeReport {
            merged_modules: merged,
            shards: n,
            bytes: total,
        })
    })();
    crate::io::finish_output_dir(&tmp, out, result)
}

/// Every module `adapter` adapts exists in `config` with the adapter's shape.
pub fn check_adapter(config: &crate::config::PhiConfig, adapter: &Adapter) -> Result<()> {
    let tensors = config.expected_tensors();
    for (module, w) in &adapter.modules {
        let name = format!("{module}.weight");
        let shape = tensors
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the adapter targets {module}, which the base model does not have"
                ))
            })?;
        if shape != [w.d_out, w.d_in] {
            return Err(Error::Invalid(format!(
                "the adapter's {module} is [{}, {}] but the base weight is {shape:?}",
                w.d_out, w.d_in
            )));
        }
    }
    Ok(())
}

/// Whether the merged value of tensor `name` differs from the stored one: it is adapted, or
/// (with `quant`) a decoder-layer Linear weight that becomes its dequantized NF4 value.
pub fn changes(
    name: &str,
    adapter: Option<&Adapter>,
    quant: Option<crate::phi::Quantization>,
) -> bool {
    let module = name.strip_suffix(".weight");
    let adapted = module.is_some_and(|m| adapter.is_some_and(|a| a.modules.contains_key(m)));
    adapted || (quant.is_some() && module.is_some_and(crate::io::adapter::is_adaptable_path))
}

/// Tensor `name` of the merged model as f32, and whether an adapter delta was added: with
/// `quant`, every decoder-layer Linear weight is its dequantized NF4 value, adapted or not (the
/// model the adapter was trained with); then `W + scaling * B @ A` where the adapter has `name`.
pub fn merged_f32(
    ckpt: &Checkpoint,
    adapter: Option<&Adapter>,
    quant: Option<crate::phi::Quantization>,
    name: &str,
) -> Result<(Vec<f32>, bool)> {
    let (mut values, shape) = ckpt.read_f32(name)?;
    let module = name.strip_suffix(".weight");
    if let Some(q) = quant.filter(|_| module.is_some_and(crate::io::adapter::is_adaptable_path)) {
        let host = crate::ops::Nf4Host::quantize(&values, [shape[0], shape[1]], q.double_quant);
        values = host.dequantize();
    }
    let lora = module.and_then(|m| adapter.and_then(|a| a.modules.get(m)));
    if let Some(lora) = lora {
        for (v, d) in values.iter_mut().zip(lora.delta()) {
            *v += d;
        }
    }
    Ok((values, lora.is_some()))
}
