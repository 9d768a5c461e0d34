//! One module per subcommand.

mod bench;
mod bench_train;
mod data;
mod eval;
mod generate;
mod merge;
mod score;
mod train;

use anyhow::{Context, Result};
use phitune_model::adapter::Adapter;
use phitune_model::nf4::Nf4Backend;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};

use crate::cli::{Command, ModelArgs};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Data(args) => data::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
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
        let dir = phitune_model::hub::resolve_model(&args.model, args.revision.as_deref())?;
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

    pub fn load<B: Nf4Backend>(&self, device: &B::Device) -> Result<Phi<B>> {
        let model = Phi::load_with(&self.checkpoint, device, self.quant)
            .with_context(|| format!("loading {}", self.checkpoint.dir().display()))?;
        match &self.adapter {
            Some(adapter) => Ok(model.with_adapter(adapter, device)?),
            None => Ok(model),
        }
    }
}
