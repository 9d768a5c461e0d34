//! One module per subcommand.

mod bench;
mod chat;
mod data;
mod eval;
mod export;
mod generate;
mod merge;
mod reply;
mod score;
mod serve;
mod train;

use anyhow::{Context, Result};
use phitune_model::io::adapter::Adapter;
use phitune_model::ops::Nf4Backend;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};

use crate::cli::{Command, ModelArgs, PersonaArgs, Quant};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::run(args),
        Command::Data(args) => data::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// A checkpoint (and adapter) resolved and validated on the host; the weights are read later,
/// on the device.
pub struct ModelSource {
    pub checkpoint: Checkpoint,
    pub tokenizer: PhiTokenizer,
    pub adapter: Option<Adapter>,
    pub quant: Option<phitune_model::phi::Quantization>,
}

impl ModelSource {
    pub fn open(args: &ModelArgs) -> Result<Self> {
        let adapter = args.adapter.as_deref().map(Adapter::read).transpose()?;
        let dir = phitune_model::io::hub::resolve_model(&args.model, args.revision.as_deref())?;
        let checkpoint = Checkpoint::open(&dir)?;
        let tokenizer = PhiTokenizer::from_dir(&dir, checkpoint.config())?;
        if let Some(a) = &adapter {
            a.check_compatible(checkpoint.config())
                .with_context(|| format!("adapter {}", args.adapter.as_ref().unwrap().display()))?;
        }
        Ok(Self {
            checkpoint,
            tokenizer,
            adapter,
            quant: args.quant.quantization(),
        })
    }

    /// The base model alone (no adapter), with the same quantization.
    pub fn load_base<B: Nf4Backend>(&self, device: &B::Device) -> Result<Phi<B>> {
        Phi::load_with(&self.checkpoint, device, self.quant)
            .with_context(|| format!("loading {}", self.checkpoint.dir().display()))
    }

    pub fn load<B: Nf4Backend>(&self, device: &B::Device) -> Result<Phi<B>> {
        let model = Phi::load_with(&self.checkpoint, device, self.quant)
            .with_context(|| format!("loading {}", self.checkpoint.dir().display()))?;
        match &self.adapter {
            Some(adapter) => Ok(model.with_adapter(adapter, device)?),
            None => Ok(model),
        }
    }
}

/// The training run an adapter came from (its `config.toml`), if any.
pub fn adapter_run(model: &ModelArgs) -> Option<phitune_train::TrainConfig> {
    model
        .adapter
        .as_deref()
        .and_then(phitune_train::eval::run_config_for_adapter)
}

/// `model` with the base quantization of `run` unless --quant was given: an adapter is used on
/// the base it was trained against (NF4 for QLoRA).
pub fn with_run_quant(model: &ModelArgs, run: Option<&phitune_train::TrainConfig>) -> ModelArgs {
    let mut out = model.clone();
    if let (None, Some(r)) = (out.quant.quant, run) {
        out.quant.quant = Some(match r.quant {
            phitune_train::QuantMode::Nf4 => Quant::Nf4,
            phitune_train::QuantMode::None => Quant::None,
        });
        out.quant.double_quant = r.double_quant;
    }
    out
}

/// A persona, a dialogue so far, and the template and budget to render them with.
pub struct PersonaPrompt {
    pub persona: Vec<String>,
    pub dialogue: Vec<String>,
    pub template: phitune_data::Template,
    pub max_len: usize,
}

impl PersonaArgs {
    /// Whether any persona source was given.
    pub fn given(&self) -> bool {
        !self.persona.is_empty() || self.persona_file.is_some() || self.row.is_some()
    }

    /// Resolves the facts (flags, then the file, or a data row's persona and dialogue) and the
    /// template/budget (flags, else the adapter's run, else persona/512).
    pub fn resolve(&self, run: Option<&phitune_train::TrainConfig>) -> Result<PersonaPrompt> {
        let mut persona = self.persona.clone();
        let mut dialogue = Vec::new();
        if let Some(path) = &self.persona_file {
            let text = phitune_model::io::read_small_file(path, 1 << 20)?;
            persona.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        if let Some(spec) = &self.row {
            let (file, index) = spec
                .rsplit_once(':')
                .and_then(|(f, i)| Some((f, i.parse::<usize>().ok()?)))
                .with_context(|| format!("--row {spec}: expected FILE:INDEX, e.g. data.jsonl:3"))?;
            let loaded = phitune_data::load::load_path(
                std::path::Path::new(file),
                phitune_data::load::LoadOptions::default(),
            )?;
            let n = loaded.rows.len();
            let row =
                loaded.rows.into_iter().nth(index).with_context(|| {
                    format!("--row {spec}: {file} has {n} rows (indices 0..{n})")
                })?;
            persona.extend(row.persona_b);
            dialogue = row.dialogue;
        }
        let max_len = self.max_len.or(run.map(|r| r.max_len)).unwrap_or(512);
        if max_len < 16 {
            anyhow::bail!("--max-len {max_len} is too small for a prompt and a reply");
        }
        Ok(PersonaPrompt {
            persona,
            dialogue,
            template: self
                .template
                .or(run.map(|r| r.template))
                .unwrap_or(phitune_data::Template::Persona),
            max_len,
        })
    }
}
