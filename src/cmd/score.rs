//! `score`: per-token negative log-likelihood of one or more texts.

use anyhow::{Result, bail};
use phitune_model::ops::Nf4Backend;
use serde_json::json;

use super::ModelSource;
use crate::backend::{Job, dispatch};
use crate::cli::ScoreArgs;

pub fn run(args: ScoreArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let texts = args
        .text
        .iter()
        .map(|text| {
            let tokens = source.tokenizer.encode(text)?;
            if tokens.len() < 2 {
                bail!(
                    "--text \"{text}\" has {} token(s); scoring needs at least 2",
                    tokens.len()
                );
            }
            Ok(tokens)
        })
        .collect::<Result<Vec<_>>>()?;
    let (device, dtype) = args.model.device.resolve();
    let nlls = dispatch(
        device,
        dtype,
        Score {
            source: &source,
            texts: &texts,
        },
    )?;
    for (tokens, nll) in texts.iter().zip(nlls) {
        let total: f64 = nll.iter().map(|&x| x as f64).sum();
        let out = json!({
            "tokens": tokens,
            "nll": nll,
            "total_nll": total,
            "mean_nll": total / nll.len() as f64,
        });
        println!("{out}");
    }
    Ok(())
}

struct Score<'a> {
    source: &'a ModelSource,
    texts: &'a [Vec<u32>],
}

impl Job for Score<'_> {
    type Output = Vec<Vec<f32>>;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Vec<Vec<f32>>> {
        let model = self.source.load::<B>(&device)?;
        Ok(self
            .texts
            .iter()
            .map(|tokens| model.token_nll(tokens, &device))
            .collect())
    }
}
