//! `merge`: fold a LoRA adapter into its base model (an HF-format checkpoint).

use anyhow::{Result, bail};
use phitune_model::Checkpoint;
use phitune_model::io::adapter::Adapter;

use crate::cli::MergeArgs;

pub fn run(args: MergeArgs) -> Result<()> {
    if args.max_shard_mb == 0 {
        bail!("--max-shard-mb must be positive");
    }
    let adapter = Adapter::read(&args.adapter)?;
    let dir = phitune_model::io::hub::resolve_model(&args.model, args.revision.as_deref())?;
    let ckpt = Checkpoint::open(&dir)?;
    adapter.check_compatible(ckpt.config())?;
    use phitune_model::io::safetensors::Dtype as St;
    let dtype = args.dtype.map(|d| match d {
        crate::backend::Dtype::F32 => St::F32,
        crate::backend::Dtype::F16 => St::F16,
        crate::backend::Dtype::Bf16 => St::BF16,
    });
    let quant = args.quant.quantization();
    if let Some(q) = quant {
        eprintln!(
            "merging into the NF4-dequantized base weights{} and writing float weights",
            if q.double_quant {
                " (double quant)"
            } else {
                ""
            }
        );
    }
    let report = phitune_model::export::merge::merge(
        &ckpt,
        &adapter,
        &args.out,
        args.max_shard_mb * 1_000_000,
        dtype,
        quant,
        args.overwrite,
    )?;
    let written = dtype.unwrap_or(ckpt.storage_dtype());
    eprintln!(
        "merged {} LoRA modules into {} ({} shard(s), {:.1} MB of {} weights{})",
        report.merged_modules,
        args.out.display(),
        report.shards,
        report.bytes as f64 / 1e6,
        written,
        if written == St::F32 {
            ""
        } else {
            "; --dtype f32 keeps full precision"
        }
    );
    Ok(())
}
