//! PEFT's LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight [r, in]` and `...lora_B.weight [out, r]`.
//! What PEFT writes loads here, and what we write loads in PEFT.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::config::{LoraConfig, TARGETABLE};
use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, SafetensorsFile, TensorOut, f32_to_bytes};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// One adapted module's weights in PEFT's orientation (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub r: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `[r, d_in]`
    pub a: Vec<f32>,
    /// `[d_out, r]`
    pub b: Vec<f32>,
    pub scaling: f64,
}

impl LoraWeights {
    /// `scaling * B @ A`, `[d_out, d_in]` row-major: what merging adds to the base weight.
    pub fn delta(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.d_out * self.d_in];
        for o in 0..self.d_out {
            let row = &mut out[o * self.d_in..(o + 1) * self.d_in];
            for k in 0..self.r {
                let bk = self.b[o * self.r + k] as f64 * self.scaling;
                let a = &self.a[k * self.d_in..(k + 1) * self.d_in];
                for (dst, &av) in row.iter_mut().zip(a) {
                    *dst += (bk * av as f64) as f32;
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    /// Module path (`model.layers.0.self_attn.q_proj`) -> weights.
    pub modules: BTreeMap<String, LoraWeights>,
}

/// `model.layers.{i}.self_attn.q_proj` etc.: the module path of a targetable layer.
pub fn module_path(layer: usize, short: &str) -> String {
    let group = if short.starts_with("fc") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{layer}.{group}.{short}")
}

/// Whether `path` is one of a Phi decoder layer's Linear modules (q/k/v/dense/fc1/fc2).
pub fn is_adaptable_path(path: &str) -> bool {
    parse_module_path(path).is_some()
}

fn parse_module_path(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = rest
        .strip_prefix("self_attn.")
        .or_else(|| rest.strip_prefix("mlp."))?;
    let expected_group = if short.starts_with("fc") {
        "mlp."
    } else {
        "self_attn."
    };
    (TARGETABLE.contains(&short) && rest.starts_with(expected_group)).then_some((layer, short))
}

fn config_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::config(path, msg)
}

/// Parses `adapter_config.json` into our LoRA settings, refusing what we cannot reproduce
/// exactly (DoRA, biases, fan_in_fan_out, modules_to_save, layer selection). Unknown keys are
/// ignored: newer PEFT versions add them.
fn parse_config(path: &Path, text: &str) -> Result<(LoraConfig, Option<String>, Value)> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| config_error(path, format!("invalid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| config_error(path, "not a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type")
        && t.as_str() != Some("LORA")
    {
        return Err(config_error(
            path,
            format!("peft_type {t} is not supported (only LORA)"),
        ));
    }
    let unsupported_true = [
        ("use_dora", "DoRA adapters are not supported"),
        (
            "fan_in_fan_out",
            "fan_in_fan_out adapters are not supported",
        ),
    ];
    for (k, msg) in unsupported_true {
        if get(k).and_then(Value::as_bool).unwrap_or(false) {
            return Err(config_error(path, format!("{k} = true: {msg}")));
        }
    }
    if let Some(b) = get("bias")
        && b.as_str() != Some("none")
    {
        return Err(config_error(
            path,
            format!("bias = {b}: only \"none\" is supported"),
        ));
    }
    for k in [
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
        "trainable_token_indices",
    ] {
        if let Some(x) = get(k)
            && !(x.as_array().is_some_and(|a| a.is_empty())
                || x.as_object().is_some_and(|o| o.is_empty()))
        {
            return Err(config_error(path, format!("{k} = {x} is not supported")));
        }
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| config_error(path, "r: missing or not a positive integer"))?
        as usize;
    let alpha = match get("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(a) => a
            .as_f64()
            .ok_or_else(|| config_error(path, "lora_alpha: not a number"))?,
    };
    let dropout = match get("lora_dropout") {
        None => 0.0,
        Some(d) => d
            .as_f64()
            .ok_or_else(|| config_error(path, "lora_dropout: not a number"))?,
    };
    let use_rslora = match get("use_rslora") {
        None => false,
        Some(b) => b
            .as_bool()
            .ok_or_else(|| config_error(path, "use_rslora: not a boolean"))?,
    };
    let mut rank_pattern = BTreeMap::new();
    if let Some(p) = get("rank_pattern") {
        let p = p
            .as_object()
            .ok_or_else(|| config_error(path, "rank_pattern: not an object"))?;
        for (k, v) in p {
            let r = v
                .as_u64()
                .ok_or_else(|| config_error(path, format!("rank_pattern.{k}: not an integer")))?;
            rank_pattern.insert(k.clone(), r as usize);
        }
    }
    let mut alpha_pattern = BTreeMap::new();
    if let Some(p) = get("alpha_pattern") {
        let p = p
            .as_object()
            .ok_or_else(|| config_error(path, "alpha_pattern: not an object"))?;
        for (k, v) in p {
            let a = v
                .as_f64()
                .ok_or_else(|| config_error(path, format!("alpha_pattern.{k}: not a number")))?;
            alpha_pattern.insert(k.clone(), a);
        }
    }
    let base = get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    let targets = get("target_modules").cloned().unwrap_or(Value::Null);
    if !(targets.is_string()
        || targets
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string)))
    {
        return Err(config_error(
            path,
            "target_modules: expected a list of names or a regex string",
        ));
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules: Vec::new(), // filled from the tensors present
        use_rslora,
        rank_pattern,
        alpha_pattern,
    };
    Ok((config, base, targets))
}

/// PEFT's rule for whether `target_modules` selects the module at `path`.
fn targeted(targets: &Value, path: &str) -> bool {
    match targets {
        Value::String(re) => {
            regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|re| re.is_match(path))
        }
        Value::Array(names) => names
            .iter()
            .filter_map(Value::as_str)
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        _ => false,
    }
}

impl Adapter {
    /// Reads a PEFT adapter directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(Error::checkpoint(
                dir,
                format!("no {CONFIG_FILE} in the adapter directory"),
            ));
        }
        let (mut config, base, targets) = parse_config(
            &config_path,
            &crate::io::read_small_file(&config_path, 1 << 20)?,
        )?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (only the pickle adapter_model.bin is there; phitune reads safetensors only, because \
                 unpickling can run arbitrary code: convert once in Python with \
                 `PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(Error::checkpoint(
                dir,
                format!("no {WEIGHTS_FILE} in the adapter directory{hint}"),
            ));
        }
        let file = SafetensorsFile::open(&weights_path)?;
        let bad = |msg: String| Error::checkpoint(&weights_path, msg);
        // Group lora_A / lora_B by module path.
        let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
        for key in file.tensors().keys() {
            let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor {key} (expected keys starting with {KEY_PREFIX})"
                ))
            })?;
            let (module, which) = ["lora_A", "lora_B"]
                .iter()
                .enumerate()
                .find_map(|(i, ab)| {
                    [format!(".{ab}.weight"), format!(".{ab}.default.weight")]
                        .iter()
                        .find_map(|suffix| rest.strip_suffix(suffix.as_str()))
                        .map(|m| (m.to_string(), i))
                })
                .ok_or_else(|| {
                    bad(format!(
                        "unsupported tensor {key} (only lora_A/lora_B weights are)"
                    ))
                })?;
            if parse_module_path(&module).is_none() {
                return Err(bad(format!(
                    "tensor {key}: {module} is not an adaptable Phi layer"
                )));
            }
            pairs.entry(module).or_default()[which] = Some(key.clone());
        }
        if pairs.is_empty() {
            return Err(bad("holds no LoRA tensors".into()));
        }
        let mut modules = BTreeMap::new();
        let mut shorts = std::collections::BTreeSet::new();
        for (module, [a_key, b_key]) in pairs {
            let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
                return Err(bad(format!("{module} has only one of lora_A / lora_B")));
            };
            if !targets.is_null() && !targeted(&targets, &module) {
                return Err(bad(format!(
                    "{module} has LoRA weights but is not in target_modules"
                )));
            }
            let (a, a_shape) = file.read_f32(&a_key)?;
            let (b, b_shape) = file.read_f32(&b_key)?;
            let (&[r, d_in], &[d_out, r_b]) = (a_shape.as_slice(), b_shape.as_slice()) else {
                return Err(bad(format!(
                    "{module}: lora_A {a_shape:?} / lora_B {b_shape:?} are not 2-d"
                )));
            };
            if r != r_b {
                return Err(bad(format!(
                    "{module}: lora_A is {a_shape:?} but lora_B is {b_shape:?}"
                )));
            }
            let (r_cfg, alpha) = config.rank_alpha(&module);
            if r != r_cfg {
                return Err(bad(format!(
                    "{module}: rank {r} in the weights, {r_cfg} in {CONFIG_FILE}"
                )));
            }
            shorts.insert(parse_module_path(&module).unwrap().1.to_string());
            let scaling = config.scaling(r, alpha);
            modules.insert(
                module,
                LoraWeights {
                    r,
                    d_in,
                    d_out,
                    a,
                    b,
                    scaling,
                },
            );
        }
        config.target_modules = TARGETABLE
            .iter()
            .filter(|t| shorts.contains(**t))
            .map(|t| t.to_string())
            .collect();
        config
            .validate()
            .map_err(|m| config_error(&config_path, m))?;
        Ok(Self {
            config,
            base_model_name_or_path: base,
            modules,
        })
    }

    /// Checks, before any weights are loaded, that every adapted module exists in a model of
    /// `config` with the adapter's dimensions.
    pub fn check_compatible(&self, config: &crate::PhiConfig) -> Result<()> {
        let shapes: BTreeMap<String, Vec<usize>> = config.expected_tensors().into_iter().collect();
        for (module, w) in &self.modules {
            match shapes.get(&format!("{module}.weight")) {
                None => {
                    return Err(Error::Invalid(format!(
                        "the adapter has weights for {module}, which this model does not have (an adapter for another model?)"
                    )));
                }
                Some(s) if s != &[w.d_out, w.d_in] => {
                    return Err(Error::Invalid(format!(
                        "adapter weights for {module} fit a [{}, {}] layer but the model's is {s:?} (an adapter for another model?)",
                        w.d_out, w.d_in
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let c = &self.config;
        let config = json!({
            "alpha_pattern": c.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": c.rank_pattern,
            "revision": null,
            "target_modules": c.target_modules,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": c.use_rslora,
        });
        let tensors: Vec<TensorOut> = self
            .modules
            .iter()
            .flat_map(|(m, w)| {
                [
                    TensorOut {
                        name: format!("{KEY_PREFIX}{m}.lora_A.weight"),
                        dtype: Dtype::F32,
                        shape: vec![w.r, w.d_in],
                        data: Cow::Owned(f32_to_bytes(&w.a, Dtype::F32)),
                    },
                    TensorOut {
                        name: format!("{KEY_PREFIX}{m}.lora_B.weight"),
                        dtype: Dtype::F32,
                        shape: vec![w.d_out, w.r],
                        data: Cow::Owned(f32_to_bytes(&w.b, Dtype::F32)),
                    },
                ]
            })
            .collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        crate::io::safetensors::write(&dir.join(WEIGHTS_FILE), &tensors, &meta)?;
        let text = serde_json::to_string_pretty(&config).expect("serializable");
        crate::io::atomic_write(&dir.join(CONFIG_FILE), |f| {
            use std::io::Write;
            f.write_all(text.as_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths() {
        assert_eq!(module_path(3, "fc1"), "model.layers.3.mlp.fc1");
        assert_eq!(
            parse_module_path("model.layers.3.self_attn.dense"),
            Some((3, "dense"))
        );
        assert_eq!(parse_module_path("model.layers.3.mlp.q_proj"), None);
        assert_eq!(parse_module_path("model.embed_tokens"), None);
    }

    #[test]
    fn peft_target_rules() {
        let list = json!(["q_proj", "fc1"]);
        assert!(targeted(&list, "model.layers.0.self_attn.q_proj"));
        assert!(!targeted(&list, "model.layers.0.self_attn.k_proj"));
        let re = json!(r".*\.(q_proj|v_proj)");
        assert!(targeted(&re, "model.layers.1.self_attn.v_proj"));
        assert!(!targeted(&re, "model.layers.1.self_attn.dense"));
    }

    #[test]
    fn delta_is_scaled_b_times_a() {
        let w = LoraWeights {
            r: 1,
            d_in: 2,
            d_out: 2,
            a: vec![1.0, 2.0],
            b: vec![3.0, -1.0],
            scaling: 0.5,
        };
        assert_eq!(w.delta(), vec![1.5, 3.0, -0.5, -1.0]);
    }
}
