//! `eval`: held-out loss/perplexity and, with --generate, replies scored by unigram F1.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Result, bail};
use phitune_model::ops::Nf4Backend;
use phitune_train::eval::{
    Baseline, EvalData, EvalOptions, EvalSummary, HeldOut, evaluate, held_out,
};

use super::ModelSource;
use crate::backend::{Job, dispatch};
use crate::cli::EvalArgs;

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let run = super::adapter_run(&args.model);
    let model_args = super::with_run_quant(&args.model, run.as_ref());
    let source = ModelSource::open(&model_args)?;
    let spec = EvalData {
        data: args.data.clone(),
        data_revision: args.data_revision.clone(),
        skip_invalid: args.skip_invalid,
        template: args
            .template
            .or(run.as_ref().map(|r| r.template))
            .unwrap_or(phitune_data::Template::Persona),
        max_len: args
            .max_len
            .or(run.as_ref().map(|r| r.max_len))
            .unwrap_or(512),
        valid_fraction: args
            .valid_fraction
            .or(run.as_ref().map(|r| r.valid_fraction))
            .unwrap_or(0.02),
        limit: args.limit,
    };
    if !(0.0..1.0).contains(&spec.valid_fraction) || spec.valid_fraction == 0.0 {
        bail!("--valid-fraction {} must be in (0, 1)", spec.valid_fraction);
    }
    let held = held_out(&spec, &source.tokenizer)?;
    if args.hits == 1 {
        bail!("--hits 1 ranks the reference alone; give N >= 2 (ConvAI2 uses 20)");
    }
    let out_dir = match (&args.out, args.generate + args.hits) {
        (Some(d), _) => Some(d.clone()),
        (None, 0) => None,
        (None, _) => Some(
            PathBuf::from("eval").join(match &args.model.adapter {
                Some(a) => a
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "adapter".into()),
                None => "base".into(),
            }),
        ),
    };
    if let Some(d) = &out_dir {
        if ["summary.json", "generations.jsonl", "hits.jsonl"]
            .iter()
            .any(|f| d.join(f).exists())
        {
            bail!(
                "{} already holds an evaluation; choose another --out",
                d.display()
            );
        }
        std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
    }
    eprintln!(
        "eval: {} held-out rows ({} template, max {} tokens){}{}",
        held.examples.len(),
        spec.template,
        spec.max_len,
        if args.generate > 0 {
            format!(", replies for {}", args.generate.min(held.rows.len()))
        } else {
            String::new()
        },
        if args.hits > 0 {
            format!(", Hits@1 of {} candidates", args.hits.min(held.rows.len()))
        } else {
            String::new()
        }
    );
    let (device, dtype) = args.model.device.resolve();
    let summary = dispatch(
        device,
        dtype,
        Eval {
            source: &source,
            held: &held,
            spec: &spec,
            opts: EvalOptions {
                micro_batch: args.batch,
                generate: args.generate,
                max_new_tokens: args.max_new_tokens,
                repetition_penalty: args.repetition_penalty,
                pad_multiple: device.pad_multiple(),
                hits: args.hits,
            },
            generations: out_dir.as_ref().map(|d| d.join("generations.jsonl")),
            hits: out_dir.as_ref().map(|d| d.join("hits.jsonl")),
            names: (
                args.model.model.clone(),
                args.model.adapter.as_ref().map(|a| a.display().to_string()),
                if source.quant.is_some() {
                    "nf4"
                } else {
                    "none"
                }
                .to_string(),
            ),
            compare_base: args.compare_base,
        },
    )?;
    if let (Some(h), Some(n)) = (summary.hits_at_1, summary.hits_n) {
        eprintln!(
            "Hits@1 of {n} candidates: {h:.4}{}",
            summary
                .base_hits_at_1
                .map_or(String::new(), |b| format!(" (base model: {b:.4})"))
        );
    }
    let line = serde_json::to_string(&summary)?;
    if let Some(d) = &out_dir {
        let path = d.join("summary.json");
        phitune_model::io::atomic_write(&path, |w| writeln!(w, "{line}"))?;
    }
    println!("{line}");
    Ok(())
}

struct Eval<'a> {
    source: &'a ModelSource,
    held: &'a HeldOut,
    spec: &'a EvalData,
    opts: EvalOptions,
    generations: Option<PathBuf>,
    hits: Option<PathBuf>,
    names: (String, Option<String>, String),
    compare_base: bool,
}

impl Job for Eval<'_> {
    type Output = EvalSummary;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<EvalSummary> {
        let model = self.source.load::<B>(&device)?;
        let base = if self.compare_base && (self.opts.generate > 0 || self.opts.hits > 0) {
            Some(Baseline(self.source.load_base::<B>(&device)?))
        } else {
            None
        };
        evaluate(
            model,
            &device,
            &self.source.tokenizer,
            self.held,
            self.spec,
            &self.opts,
            self.generations.as_deref(),
            self.hits.as_deref(),
            self.names,
            base,
        )
    }
}
