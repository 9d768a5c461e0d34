//! One module per subcommand.

mod bench;
mod generate;
mod score;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};

use crate::cli::{Command, ModelArgs};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// A checkpoint resolved and validated on the host; the weights are read later, on the device.
pub struct ModelSource {
    pub checkpoint: Checkpoint,
    pub tokenizer: PhiTokenizer,
}

impl ModelSource {
    pub fn open(args: &ModelArgs) -> Result<Self> {
        let dir = phitune_model::hub::resolve_model(&args.model, args.revision.as_deref())?;
        let checkpoint = Checkpoint::open(&dir)?;
        let tokenizer = PhiTokenizer::from_dir(&dir, checkpoint.config())?;
        Ok(Self {
            checkpoint,
            tokenizer,
        })
    }

    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Phi<B>> {
        Phi::load(&self.checkpoint, device)
            .with_context(|| format!("loading {}", self.checkpoint.dir().display()))
    }
}
