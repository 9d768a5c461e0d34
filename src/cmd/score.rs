//! `score`: per-token negative log-likelihood of a text.

use anyhow::{Result, bail};
use phitune_model::ops::Nf4Backend;
use serde_json::json;

use super::ModelSource;
use crate::backend::{Job, dispatch};
use crate::cli::ScoreArgs;

pub fn run(args: ScoreArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let tokens = source.tokenizer.encode(&args.text)?;
    if tokens.len() < 2 {
        bail!(
            "--text has {} token(s); scoring needs at least 2",
            tokens.len()
        );
    }
    let (device, dtype) = args.model.device.resolve();
    let nll = dispatch(
        device,
        dtype,
        Score {
            source: &source,
            tokens: &tokens,
        },
    )?;
    let total: f64 = nll.iter().map(|&x| x as f64).sum();
    let out = json!({
        "tokens": tokens,
        "nll": nll,
        "total_nll": total,
        "mean_nll": total / nll.len() as f64,
    });
    println!("{out}");
    Ok(())
}

struct Score<'a> {
    source: &'a ModelSource,
    tokens: &'a [u32],
}

impl Job for Score<'_> {
    type Output = Vec<f32>;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Vec<f32>> {
        let model = self.source.load::<B>(&device)?;
        Ok(model.token_nll(self.tokens, &device))
    }
}
