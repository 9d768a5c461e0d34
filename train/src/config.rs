//! The training configuration: the seed recipe's defaults (REFERENCE.md §5) with the corrected
//! `persona` template, a `seed` preset for a like-for-like run, a TOML file and command-line
//! flags on top (flags override the file, the file overrides the preset). The effective
//! configuration is written next to the run's outputs as `config.toml`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use phitune_data::Template;
use phitune_model::lora::{LoraConfig, TARGETABLE};
use serde::{Deserialize, Serialize};

/// Named starting points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The seed recipe with its defects fixed: persona template (eos trained, the turn being
    /// answered kept, response-only loss, up to `max_len` tokens) and held-out evaluation.
    Persona,
    /// The original recipe as it was: its prompt template, 128 tokens padded with eos.
    Seed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    None,
    Nf4,
}

/// Everything that determines a run. Field names are the TOML keys and the `--flag` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub preset: Preset,
    /// Base model: directory or hub id.
    pub model: String,
    pub revision: Option<String>,
    /// Data: a .jsonl/.json/.parquet file, a directory of shards, or a hub dataset id.
    pub data: String,
    pub data_revision: Option<String>,
    pub skip_invalid: bool,
    pub template: Template,
    pub max_len: usize,
    pub valid_fraction: f64,
    pub quant: QuantMode,
    pub double_quant: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub micro_batch: usize,
    /// Pack each micro-batch's examples into rows of up to `max_len` tokens, each example with
    /// its own positions and attention: the same examples and loss, fewer padded positions.
    /// (Absent from the configurations of runs made before it existed.)
    #[serde(default)]
    pub packing: bool,
    pub grad_accum: usize,
    pub lr: f64,
    /// Fraction of `max_steps` spent warming up linearly from 0 (rounded up, as HF does).
    pub warmup_ratio: f64,
    /// Optimizer steps (each `micro_batch × grad_accum` sequences).
    pub max_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip over all trainable parameters (0 = off).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Recompute activations in the backward pass instead of keeping them (Burn's balanced
    /// checkpointing strategy): less memory, more compute.
    pub grad_checkpointing: bool,
    /// Write a checkpoint every N optimizer steps (and at the end).
    pub save_every: usize,
    /// Keep the last K checkpoints.
    pub keep_checkpoints: usize,
    /// Evaluate on the held-out split every N optimizer steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Held-out examples used by each evaluation (0 = all).
    pub eval_rows: usize,
}

impl TrainConfig {
    pub fn preset(preset: Preset) -> Self {
        let lora = LoraConfig::seed();
        let (template, max_len) = match preset {
            Preset::Persona => (Template::Persona, 512),
            Preset::Seed => (Template::Seed, 128),
        };
        Self {
            preset,
            model: "microsoft/phi-2".into(),
            revision: None,
            data: "Cynaptics/persona-chat".into(),
            data_revision: None,
            skip_invalid: false,
            template,
            max_len,
            valid_fraction: 0.02,
            quant: QuantMode::Nf4,
            double_quant: true,
            lora_r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: lora.target_modules,
            micro_batch: 2,
            packing: false,
            grad_accum: 8,
            lr: 1e-4,
            warmup_ratio: 0.1,
            max_steps: 500,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 0.3,
            seed: 42,
            grad_checkpointing: true,
            save_every: 100,
            keep_checkpoints: 3,
            eval_every: 100,
            eval_rows: 256,
        }
    }

    /// Preset, then the file, then the flags. Unknown keys and wrong types in the file are
    /// errors naming the key.
    pub fn resolve(file: Option<&Path>, flags: &TrainFlags) -> Result<Self> {
        Self::resolve_from(None, file, flags)
    }

    /// As [`resolve`](Self::resolve), starting from `base` (a resumed run's saved configuration)
    /// instead of a preset.
    pub fn resolve_from(
        base: Option<Self>,
        file: Option<&Path>,
        flags: &TrainFlags,
    ) -> Result<Self> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = read_small(path)?;
            table = text
                .parse::<toml::Table>()
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        }
        let flag_table = toml::Table::try_from(flags).context("command-line flags")?;
        let preset = match flag_table.get("preset").or(table.get("preset")) {
            Some(v) => Preset::deserialize(v.clone())
                .map_err(|_| anyhow::anyhow!("preset = {v}: expected \"persona\" or \"seed\""))?,
            None => Preset::Persona,
        };
        let start = base.unwrap_or_else(|| Self::preset(preset));
        let mut merged = toml::Table::try_from(start).expect("serializable");
        for (k, v) in table.into_iter().chain(flag_table) {
            if !merged.contains_key(&k) && !OPTIONAL_KEYS.contains(&k.as_str()) {
                let origin = file.map_or("flags".to_string(), |p| p.display().to_string());
                bail!("{origin}: unknown key \"{k}\"");
            }
            merged.insert(k, v);
        }
        let origin = file.map_or("flags".to_string(), |p| p.display().to_string());
        let config: Self =
            serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
                anyhow::anyhow!(
                    "{origin}: {}: {}",
                    e.path(),
                    one_line(&e.inner().to_string())
                )
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a `config.toml` written by a run.
    pub fn read(path: &Path) -> Result<Self> {
        let text = read_small(path)?;
        let config: Self =
            serde_path_to_error::deserialize(toml::Deserializer::parse(&text).map_err(|e| {
                anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string()))
            })?)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}: {}",
                    path.display(),
                    e.path(),
                    one_line(&e.inner().to_string())
                )
            })?;
        config
            .validate()
            .with_context(|| path.display().to_string())?;
        Ok(config)
    }

    /// A configuration from its TOML text (what [`to_toml`](Self::to_toml) writes), validated.
    pub fn parse_toml(text: &str) -> Result<Self> {
        let config: Self =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", one_line(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("serializable")
    }

    pub fn validate(&self) -> Result<()> {
        self.lora().validate().map_err(anyhow::Error::msg)?;
        let positive = [
            ("micro_batch", self.micro_batch),
            ("grad_accum", self.grad_accum),
            ("max_steps", self.max_steps),
            ("save_every", self.save_every),
            ("keep_checkpoints", self.keep_checkpoints),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr = {} must be a positive number", self.lr);
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!("warmup_ratio = {} must be in [0, 1]", self.warmup_ratio);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight_decay = {} must be >= 0", self.weight_decay);
        }
        for (name, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                bail!("{name} = {b} must be in [0, 1)");
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!("adam_eps = {} must be positive", self.adam_eps);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "max_grad_norm = {} must be >= 0 (0 = no clipping)",
                self.max_grad_norm
            );
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            bail!("valid_fraction = {} must be in [0, 1)", self.valid_fraction);
        }
        if self.max_len < 16 || self.max_len > 1 << 16 {
            bail!("max_len = {} must be between 16 and 65536", self.max_len);
        }
        for t in &self.target_modules {
            if !TARGETABLE.contains(&t.as_str()) {
                bail!(
                    "target_modules: \"{t}\" is not one of {}",
                    TARGETABLE.join(", ")
                );
            }
        }
        Ok(())
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            ..LoraConfig::seed()
        }
    }

    /// Optimizer steps of linear warmup: `ceil(max_steps × warmup_ratio)`, as transformers.
    pub fn warmup_steps(&self) -> usize {
        (self.max_steps as f64 * self.warmup_ratio).ceil() as usize
    }

    pub fn sequences_per_step(&self) -> usize {
        self.micro_batch * self.grad_accum
    }

    /// The keys whose change does not alter the result of a resumed run.
    pub fn differs_for_resume(&self, other: &Self) -> Option<String> {
        let a = toml::Table::try_from(self).expect("serializable");
        let b = toml::Table::try_from(other).expect("serializable");
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if RESUME_FREE.contains(&k.as_str()) {
                continue;
            }
            if a.get(k) != b.get(k) {
                let show =
                    |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
                return Some(format!(
                    "{k} ({} in the run, {} now)",
                    show(a.get(k)),
                    show(b.get(k))
                ));
            }
        }
        None
    }
}

impl TrainConfig {
    /// What differs between this rank's settings and rank 0's (`root`), if anything, except
    /// where the model and data are read from (each machine has its own paths: the ranks compare
    /// fingerprints of what they read instead) and the keys only rank 0 uses.
    pub fn differs_between_ranks(&self, root: &Self) -> Option<String> {
        let a = toml::Table::try_from(self).expect("serializable");
        let b = toml::Table::try_from(root).expect("serializable");
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            if RANK_FREE.contains(&k.as_str()) {
                continue;
            }
            if a.get(k) != b.get(k) {
                let show =
                    |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
                return Some(format!(
                    "{k} is {} here, {} on rank 0",
                    show(a.get(k)),
                    show(b.get(k))
                ));
            }
        }
        None
    }
}

/// Keys the ranks of a run may set differently: where each reads the model and data from, and
/// what only rank 0 does (writing checkpoints).
const RANK_FREE: [&str; 6] = [
    "model",
    "revision",
    "data",
    "data_revision",
    "save_every",
    "keep_checkpoints",
];

/// Keys that may be absent from the preset's table (serialized `None`s are omitted by TOML).
const OPTIONAL_KEYS: [&str; 2] = ["revision", "data_revision"];
/// Keys a resumed run may change.
const RESUME_FREE: [&str; 3] = ["save_every", "keep_checkpoints", "eval_rows"];

/// Command-line overrides of [`TrainConfig`]; only the flags given are applied.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct TrainFlags {
    /// Starting point: persona (the seed recipe with its defects fixed) or seed (the original).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Base model directory or hub id [default: microsoft/phi-2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Hub revision of the model.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Data file, directory or hub dataset id [default: Cynaptics/persona-chat].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Hub revision of the data set.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_revision: Option<String>,
    /// Skip (and count) malformed rows instead of stopping.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_invalid: Option<bool>,
    /// Prompt template: persona or seed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<Template>,
    /// Maximum tokens per example (persona template).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Fraction of conversations held out for evaluation.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_fraction: Option<f64>,
    /// Base weights: nf4 (QLoRA, the default) or none (LoRA on float weights).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantMode>,
    /// With --quant nf4: quantize the absmax values too.
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
    /// LoRA rank.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scaling = alpha / r).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// Adapted layers, comma-separated (q_proj,k_proj,v_proj,dense,fc1,fc2).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
    /// Examples per forward/backward pass.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Pack each micro-batch's examples into rows of up to --max-len tokens (no attention
    /// across examples, positions restart at each): the same loss, less padding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Fraction of the steps spent in linear warmup.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Optimizer steps to run.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// AdamW's decoupled weight decay.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Seed for LoRA init, data order and dropout.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Recompute activations in backward to save memory.
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_checkpointing: Option<bool>,
    /// Checkpoint every N optimizer steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// Checkpoints kept.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<usize>,
    /// Evaluate every N optimizer steps (0 = only at the end).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Held-out examples per evaluation (0 = all).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_rows: Option<usize>,
}

impl TrainFlags {
    pub fn is_empty(&self) -> bool {
        toml::Table::try_from(self)
            .map(|t| t.is_empty())
            .unwrap_or(false)
    }
}

/// Configuration files are small; refuse anything that is not.
fn read_small(path: &Path) -> Result<String> {
    const LIMIT: u64 = 1 << 20;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.len() > LIMIT {
        bail!(
            "{}: {} bytes is too large for a configuration file",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", path.display()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_recipe_with_the_persona_template() {
        let c = TrainConfig::resolve(None, &TrainFlags::default()).unwrap();
        assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (4, 16.0, 0.05));
        assert_eq!(c.target_modules, ["q_proj", "k_proj", "v_proj", "dense"]);
        assert_eq!((c.micro_batch, c.grad_accum, c.max_steps), (2, 8, 500));
        assert_eq!(
            (c.lr, c.warmup_steps(), c.max_grad_norm, c.seed),
            (1e-4, 50, 0.3, 42)
        );
        assert_eq!((c.quant, c.double_quant), (QuantMode::Nf4, true));
        assert_eq!(c.template, Template::Persona);
        let s = TrainConfig::resolve(
            None,
            &TrainFlags {
                preset: Some(Preset::Seed),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((s.template, s.max_len), (Template::Seed, 128));
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_preset() {
        let dir = std::env::temp_dir().join(format!("phitune-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "preset = \"seed\"\nlr = 3e-4\nmax_steps = 20\n").unwrap();
        let flags = TrainFlags {
            max_steps: Some(7),
            ..Default::default()
        };
        let c = TrainConfig::resolve(Some(&f), &flags).unwrap();
        assert_eq!((c.lr, c.max_steps, c.template), (3e-4, 7, Template::Seed));
        // Round trip through the written file.
        std::fs::write(&f, c.to_toml()).unwrap();
        assert_eq!(TrainConfig::read(&f).unwrap(), c);

        std::fs::write(&f, "lr = 1e-4\nlearning_rate = 3\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), &TrainFlags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key \"learning_rate\""), "{e}");
        std::fs::write(&f, "max_steps = \"many\"\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), &TrainFlags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_steps"), "{e}");
        std::fs::write(&f, "lr = -1.0\n").unwrap();
        let e = TrainConfig::resolve(Some(&f), &TrainFlags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lr = -1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_compares_everything_but_bookkeeping() {
        let a = TrainConfig::preset(Preset::Persona);
        let mut b = a.clone();
        b.save_every = 5;
        assert_eq!(a.differs_for_resume(&b), None);
        b.lr = 2e-4;
        assert!(a.differs_for_resume(&b).unwrap().starts_with("lr"));
    }
}
