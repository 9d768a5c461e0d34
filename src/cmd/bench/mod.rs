//! `bench`: speed on a model of a given configuration (random weights by default), as JSON.

mod measure;
mod nf4_rows;
mod train;

use anyhow::{Result, bail};
use phitune_model::lora::LoraConfig;
use phitune_model::ops::Nf4Backend;
use phitune_model::phi::Quantization;
use phitune_model::{Checkpoint, Phi, PhiConfig};
use serde_json::json;

use self::measure::{GenReport, measure_generation, rayon_threads};
use crate::backend::{Job, dispatch};
use crate::cli::{BenchArgs, Quant};

/// phi-2's vocabulary and head geometry at a size a laptop CPU runs in seconds.
pub fn bench_config() -> PhiConfig {
    let mut c = PhiConfig::phi2();
    c.hidden_size = 640;
    c.num_attention_heads = 8;
    c.num_key_value_heads = Some(8);
    c.num_hidden_layers = 4;
    c.intermediate_size = 2560;
    c
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.prompt_len == 0 || args.new_tokens == 0 || args.repeats == 0 {
        bail!("--prompt-len, --new-tokens and --repeats must be positive");
    }
    if args.lora && args.train {
        bail!("--lora is for the generation benchmark; --train always trains LoRA adapters");
    }
    let config = match args.config.as_str() {
        "bench" => bench_config(),
        "phi-2" | "phi2" => PhiConfig::phi2(),
        path => PhiConfig::from_file(std::path::Path::new(path))?,
    };
    let checkpoint = args
        .model
        .as_deref()
        .map(|m| Checkpoint::open(std::path::Path::new(m)))
        .transpose()?;
    let (device, dtype) = args.device.resolve();
    if let Some(rows) = &args.nf4_rows {
        if rows.is_empty() || rows.contains(&0) {
            bail!("--nf4-rows takes positive row counts, e.g. 1,2,4,8,16");
        }
        let r = dispatch(
            device,
            dtype,
            nf4_rows::Nf4Rows {
                config,
                rows,
                repeats: args.repeats,
            },
        )?;
        println!(
            "{}",
            json!({
                "impl": "phitune",
                "mode": "nf4-rows",
                "device": device.to_string(),
                "dtype": format!("{dtype:?}").to_lowercase(),
                "report": r,
            })
        );
        return Ok(());
    }
    if args.train {
        if args.micro_batch == 0 || args.seq_len < 2 || args.steps == 0 {
            bail!("--micro-batch and --steps must be positive and --seq-len at least 2");
        }
        let batches = train::host_batches(&args, &config)?;
        let r = dispatch(
            device,
            dtype,
            train::TrainBench {
                args: &args,
                config,
                batches,
            },
        )?;
        println!(
            "{}",
            json!({
                "impl": "phitune",
                "mode": "train",
                "device": device.to_string(),
                "dtype": format!("{dtype:?}").to_lowercase(),
                "threads": rayon_threads(),
                "quant": quant_name(args.base_quant()),
                "micro_batch": args.micro_batch,
                "seq_len": args.seq_len,
                "grad_checkpointing": args.grad_checkpointing,
                "head": format!("{:?}", args.head).to_lowercase(),
                "data": args.data.as_ref().map(|d| d.display().to_string()),
                "template": args.data.as_ref().map(|_| args.template.to_string()),
                "report": r,
            })
        );
        return Ok(());
    }
    let report = dispatch(
        device,
        dtype,
        Bench {
            args: &args,
            config,
            checkpoint,
        },
    )?;
    let mut out = json!({
        "impl": "phitune",
        "device": device.to_string(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "threads": rayon_threads(),
        "quant": quant_name(args.base_quant()),
        "lora": args.lora.then(|| {
            let l = LoraConfig::seed();
            json!({ "r": l.r, "targets": l.target_modules })
        }),
    });
    merge(&mut out, serde_json::to_value(report)?);
    println!("{out}");
    Ok(())
}

fn quant_name(q: Quant) -> &'static str {
    match q {
        Quant::None => "none",
        Quant::Nf4 => "nf4",
    }
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

struct Bench<'a> {
    args: &'a BenchArgs,
    config: PhiConfig,
    checkpoint: Option<Checkpoint>,
}

/// The generation measurement, with what the model held: its decoder projections, how many of
/// them are NF4 and how many carry a LoRA adapter.
#[derive(serde::Serialize)]
struct BenchReport {
    projections: usize,
    nf4_projections: usize,
    lora_projections: usize,
    #[serde(flatten)]
    report: GenReport,
}

impl Job for Bench<'_> {
    type Output = BenchReport;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<BenchReport> {
        let a = self.args;
        let quant = (a.base_quant() == Quant::Nf4).then_some(Quantization { double_quant: true });
        let model: Phi<B> = match &self.checkpoint {
            Some(c) => Phi::load_with(c, &device, quant)?,
            None => Phi::random_with(&self.config, &device, quant),
        };
        let model = if a.lora {
            model.with_lora(&LoraConfig::seed(), 42, &device)
        } else {
            model
        };
        // What the timed model is, read from the model itself.
        let projections = model.projections();
        let nf4_projections = projections
            .iter()
            .filter(|p| p.2.base.is_quantized())
            .count();
        let lora_projections = projections.iter().filter(|p| p.2.lora.is_some()).count();
        let report = measure_generation(&model, a.prompt_len, a.new_tokens, a.repeats, &device);
        Ok(BenchReport {
            projections: projections.len(),
            nf4_projections,
            lora_projections,
            report,
        })
    }
}
