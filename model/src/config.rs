//! The network's configuration: [`PhiConfig`], `config.json` of an HF `PhiForCausalLM`
//! checkpoint, and [`LoraConfig`], the adapter's (PEFT's `adapter_config.json` fields).
//!
//! Field names are HF's and PEFT's, so the structs deserialize straight from the files. Nothing
//! about phi-2's sizes is assumed: every dimension comes from here.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest config.json we are willing to parse (real ones are ~1 KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `null` or absent means "same as num_attention_heads".
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers >= 5 writes `rope_parameters: {rope_theta, partial_rotary_factor, rope_type}`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Only `null` is supported (phi-2 has no rope scaling).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub qk_layernorm: bool,
    #[serde(default)]
    pub resid_pdrop: f64,
    #[serde(default)]
    pub embd_pdrop: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, alias = "dtype")]
    pub torch_dtype: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// HF allows a single id or a list of ids for bos/eos.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The activations Phi checkpoints use, by their HF names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_max_pos() -> usize {
    2048
}

impl PhiConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_small_file(path, MAX_CONFIG_BYTES)?;
        Self::from_json(&text).map_err(|msg| Error::config(path, msg))
    }

    /// Parses and validates; the error is a message without the path.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: PhiConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            match e.path().to_string().as_str() {
                "." | "" => format!("invalid config: {}", e.inner()),
                path => format!("invalid config: {path}: {}", e.inner()),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(t) = &self.model_type
            && t != "phi"
        {
            return Err(format!(
                "model_type is \"{t}\", expected \"phi\" (only PhiForCausalLM checkpoints are supported)"
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        // Generous upper bounds: they only stop absurd values from turning into huge allocations.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 21),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
        ] {
            if v > max {
                return Err(format!("{name} = {v} is larger than supported ({max})"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_key_value_heads {kv} must divide num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        let factor = self.partial_rotary();
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(format!("partial_rotary_factor {factor} must be in (0, 1]"));
        }
        let exact = self.head_dim() as f64 * factor;
        if (exact - exact.round()).abs() > 1e-9 || !(exact.round() as usize).is_multiple_of(2) {
            return Err(format!(
                "rotary dim = head_dim {} x partial_rotary_factor {factor} = {exact} is not an even whole number",
                self.head_dim()
            ));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 1.0) {
            return Err(format!("rope_theta {theta} must be a finite number > 1"));
        }
        if let Some(s) = &self.rope_scaling
            && !s.is_null()
        {
            return Err("rope_scaling is not supported (only null)".into());
        }
        if let Some(p) = &self.rope_parameters
            && let Some(t) = &p.rope_type
            && t != "default"
        {
            return Err(format!(
                "rope_parameters.rope_type \"{t}\" is not supported (only \"default\")"
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        self.activation()?;
        for (name, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attention_dropout", self.attention_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} {p} must be in [0, 1)"));
            }
        }
        Ok(())
    }

    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!(
                "hidden_act \"{other}\" is not supported (gelu_new, gelu_pytorch_tanh, gelu_fast, gelu)"
            )),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn partial_rotary(&self) -> f64 {
        self.partial_rotary_factor
            .or(self
                .rope_parameters
                .as_ref()
                .and_then(|p| p.partial_rotary_factor))
            .unwrap_or(0.5)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or(self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }

    /// `int(head_dim * partial_rotary_factor)`, as HF computes it.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary()).round() as usize
    }

    /// The names and `[out, in]` shapes of every tensor a checkpoint of this config holds.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut add = |name: String, shape: Vec<usize>| out.push((name, shape));
            add(format!("{p}.input_layernorm.weight"), vec![h]);
            add(format!("{p}.input_layernorm.bias"), vec![h]);
            for (proj, o, i_) in [
                ("q_proj", h, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("dense", h, h),
            ] {
                add(format!("{p}.self_attn.{proj}.weight"), vec![o, i_]);
                add(format!("{p}.self_attn.{proj}.bias"), vec![o]);
            }
            if self.qk_layernorm {
                for n in ["q_layernorm", "k_layernorm"] {
                    add(format!("{p}.self_attn.{n}.weight"), vec![self.head_dim()]);
                    add(format!("{p}.self_attn.{n}.bias"), vec![self.head_dim()]);
                }
            }
            add(
                format!("{p}.mlp.fc1.weight"),
                vec![self.intermediate_size, h],
            );
            add(format!("{p}.mlp.fc1.bias"), vec![self.intermediate_size]);
            add(
                format!("{p}.mlp.fc2.weight"),
                vec![h, self.intermediate_size],
            );
            add(format!("{p}.mlp.fc2.bias"), vec![h]);
        }
        out.push(("model.final_layernorm.weight".into(), vec![h]));
        out.push(("model.final_layernorm.bias".into(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        out.push(("lm_head.bias".into(), vec![self.vocab_size]));
        out
    }

    /// Total number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        self.expected_tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// microsoft/phi-2's configuration (for benchmarks with random weights).
    pub fn phi2() -> Self {
        Self::from_json(include_str!("phi2_config.json")).expect("built-in phi-2 config is valid")
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::from_str(include_str!("phi2_config.json")).unwrap()
    }

    fn with(key: &str, v: serde_json::Value) -> std::result::Result<PhiConfig, String> {
        let mut j = base();
        j[key] = v;
        PhiConfig::from_json(&j.to_string())
    }

    #[test]
    fn phi2_geometry() {
        let c = PhiConfig::phi2();
        assert_eq!(c.head_dim(), 80);
        assert_eq!(c.rotary_dim(), 32);
        assert_eq!(c.kv_heads(), 32);
        assert_eq!(c.expected_tensors().len(), 453);
        assert_eq!(c.num_parameters(), 2_779_683_840);
    }

    #[test]
    fn rejects_unsupported_values() {
        let e = with("hidden_act", "swish".into()).unwrap_err();
        assert!(e.contains("hidden_act \"swish\""), "{e}");
        let e = with("partial_rotary_factor", 0.33.into()).unwrap_err();
        assert!(e.contains("rotary dim"), "{e}");
        let e = with("num_attention_heads", 7.into()).unwrap_err();
        assert!(e.contains("not divisible"), "{e}");
        let e = with("num_key_value_heads", 5.into()).unwrap_err();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = with("model_type", "llama".into()).unwrap_err();
        assert!(e.contains("model_type"), "{e}");
        let e = with(
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
        )
        .unwrap_err();
        assert!(e.contains("rope_scaling"), "{e}");
        let e = with("hidden_size", "big".into()).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        let e = with("vocab_size", 0.into()).unwrap_err();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn tolerates_unknown_keys_and_new_rope_parameters() {
        let mut j = base();
        j["some_future_key"] = serde_json::json!({"x": [1, 2]});
        let obj = j.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.remove("partial_rotary_factor");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 5000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}),
        );
        let c = PhiConfig::from_json(&j.to_string()).unwrap();
        assert_eq!(c.rope_theta(), 5000.0);
        assert_eq!(c.rotary_dim(), 40);
    }
}
