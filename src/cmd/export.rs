//! `export`: a base model with its adapter merged in, as one GGUF file for llama.cpp / Ollama
//! (and an Ollama Modelfile rendering the training template), or as an HF checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use phitune_data::Template;
use phitune_model::Checkpoint;
use phitune_model::io::adapter::Adapter;
use phitune_model::io::gguf::GgmlType;

use crate::cli::{ExportArgs, ExportFormat, GgufType, MergeArgs, ModelArgs};

pub fn run(args: ExportArgs) -> Result<()> {
    if args.format == ExportFormat::Hf {
        let Some(adapter) = args.adapter.clone() else {
            bail!("--format hf needs --adapter (the base alone is already an HF checkpoint)");
        };
        use crate::backend::Dtype;
        let dtype = match args.ty {
            None => None,
            Some(GgufType::F32) => Some(Dtype::F32),
            Some(GgufType::F16) => Some(Dtype::F16),
            Some(GgufType::Bf16) => Some(Dtype::Bf16),
            Some(t) => bail!(
                "--type {}: an HF checkpoint holds f32, f16 or bf16 weights (q8_0 and q4_0 are GGUF types)",
                ty_name(t)
            ),
        };
        let model = model_args(&args);
        let run = super::adapter_run(&model);
        let quant = super::with_run_quant(&model, run.as_ref()).quant;
        return super::merge::run(MergeArgs {
            model: args.model,
            revision: args.revision,
            adapter,
            out: args.out,
            overwrite: args.overwrite,
            max_shard_mb: 5000,
            dtype,
            quant,
        });
    }
    let lora = args.format == ExportFormat::GgufLora;
    if lora && args.adapter.is_none() {
        bail!("--format gguf-lora needs --adapter (the adapter to write)");
    }
    if !lora && args.base_gguf.is_some() {
        bail!("--base-gguf is for --format gguf-lora");
    }
    let ty = GgmlType::from_name(ty_name(args.ty.unwrap_or(GgufType::F16)))?;
    if args.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!(
            "--out {}: name the file to write, ending in .gguf",
            args.out.display()
        );
    }
    let out_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !out_dir.is_dir() {
        bail!(
            "--out {}: the directory {} does not exist",
            args.out.display(),
            out_dir.display()
        );
    }
    let modelfile = args.out.with_file_name("Modelfile");
    if modelfile.exists() && !args.overwrite {
        bail!(
            "{} exists; pass --overwrite to replace it (and {})",
            modelfile.display(),
            args.out.display()
        );
    }
    let model = model_args(&args);
    let run = super::adapter_run(&model);
    let model = super::with_run_quant(&model, run.as_ref());
    let quant = model.quant.quantization();
    let adapter = args.adapter.as_deref().map(Adapter::read).transpose()?;
    let dir = phitune_model::io::hub::resolve_model(&args.model, args.revision.as_deref())?;
    let ckpt = Checkpoint::open(&dir)?;
    if let Some(a) = &adapter {
        a.check_compatible(ckpt.config())
            .with_context(|| format!("adapter {}", args.adapter.as_ref().unwrap().display()))?;
    }
    let tokenizer = phitune_model::PhiTokenizer::from_dir(&dir, ckpt.config())?;
    let prompt = args.persona.resolve(run.as_ref())?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "phi2".into())
    });
    if quant.is_some() && adapter.is_some() && !lora {
        eprintln!("merging into the NF4-dequantized base weights (the adapter's training base)");
    }
    // Everything the Modelfile needs is settled before the GGUF is written, so that no bad
    // input leaves a GGUF without its Modelfile.
    let eos_id = tokenizer.eos_token_ids[0];
    let eos = tokenizer.inner().id_to_token(eos_id).with_context(|| {
        format!(
            "{}: the eos token id {eos_id} (config.json) has no token in tokenizer.json",
            dir.display()
        )
    })?;
    if lora {
        return export_lora(
            &args,
            &ckpt,
            adapter.as_ref().unwrap(),
            ty,
            &name,
            &eos,
            &prompt,
        );
    }
    let from = PathBuf::from(".").join(args.out.file_name().unwrap_or_default());
    let text = modelfile_text(
        &from.display().to_string(),
        None,
        prompt.template,
        &prompt.persona,
        &eos,
        prompt.max_len,
    );
    let report = phitune_model::export::gguf::export_gguf(
        &ckpt,
        adapter.as_ref(),
        quant,
        ty,
        &name,
        &args.out,
        args.overwrite,
    )?;
    write_modelfile(&modelfile, &text)?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB, {}{}{}) and {}",
        args.out.display(),
        report.tensors,
        report.bytes as f64 / 1e6,
        ty.name(),
        if report.merged_modules > 0 {
            format!(", {} LoRA modules merged", report.merged_modules)
        } else {
            String::new()
        },
        if report.fell_back.is_empty() {
            String::new()
        } else {
            format!(
                "; {} matrices in f16, their rows being no whole number of 32-value blocks",
                report.fell_back.len()
            )
        },
        modelfile.display()
    );
    eprintln!(
        "run it with: ollama create {name} -f {} && ollama run {name}",
        out_dir.join("Modelfile").display()
    );
    Ok(())
}

/// `--format gguf-lora`: the adapter as a GGUF LoRA for the base's q/k/v layout, and a
/// Modelfile that applies it over the base GGUF (or Ollama's `phi`).
fn export_lora(
    args: &ExportArgs,
    ckpt: &Checkpoint,
    adapter: &Adapter,
    ty: GgmlType,
    name: &str,
    eos: &str,
    prompt: &super::PersonaPrompt,
) -> Result<()> {
    use phitune_model::export::lora_gguf::{QkvLayout, base_layout, export_gguf_lora};
    let layout = match &args.base_gguf {
        Some(p) => base_layout(p, ckpt.config())?,
        None => QkvLayout::Separate,
    };
    // The Modelfile's FROM: the base file by its absolute path (Ollama resolves a relative
    // one against the Modelfile's directory), or Ollama's library phi-2.
    let from = match &args.base_gguf {
        Some(p) => std::fs::canonicalize(p)
            .with_context(|| format!("--base-gguf {}", p.display()))?
            .display()
            .to_string(),
        None => "phi".to_string(),
    };
    let modelfile = args.out.with_file_name("Modelfile");
    let adapter_file = PathBuf::from(".").join(args.out.file_name().unwrap_or_default());
    let mut text = modelfile_text(
        &from,
        Some(&adapter_file),
        prompt.template,
        &prompt.persona,
        eos,
        prompt.max_len,
    );
    if args.base_gguf.is_none() {
        text = format!(
            "# FROM phi is Ollama's library phi-2 in Ollama's own quantisation, not the base this\n\
             # adapter was trained on: close, not equal. `phitune export --format gguf` (merged) or\n\
             # --base-gguf FILE (your own base GGUF) give the trained model exactly.\n{text}"
        );
    }
    let report = export_gguf_lora(
        ckpt.config(),
        adapter,
        layout,
        ty,
        name,
        &args.out,
        args.overwrite,
    )?;
    write_modelfile(&modelfile, &text)?;
    eprintln!(
        "wrote {} ({} LoRA pairs{}, {:.2} MB, {}, alpha {}{}) and {}",
        args.out.display(),
        report.pairs,
        if layout == QkvLayout::Fused {
            " on the fused attn_qkv"
        } else {
            ""
        },
        report.bytes as f64 / 1e6,
        ty.name(),
        report.alpha,
        if report.folded > 0 {
            format!(
                "; {} pairs carry their scaling in lora_b (rsLoRA, rank/alpha patterns or fused q/k/v)",
                report.folded
            )
        } else {
            String::new()
        },
        modelfile.display()
    );
    let out_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    eprintln!(
        "run it with: ollama create {name} -f {} && ollama run {name}   (or llama-cli -m BASE.gguf --lora {})",
        out_dir.join("Modelfile").display(),
        args.out.display()
    );
    Ok(())
}

fn model_args(args: &ExportArgs) -> ModelArgs {
    ModelArgs {
        model: args.model.clone(),
        revision: args.revision.clone(),
        adapter: args.adapter.clone(),
        quant: args.quant.clone(),
        device: crate::cli::DeviceArgs {
            device: None,
            dtype: None,
            tf32: false,
        },
    }
}

fn ty_name(t: GgufType) -> &'static str {
    match t {
        GgufType::F32 => "f32",
        GgufType::F16 => "f16",
        GgufType::Bf16 => "bf16",
        GgufType::Q8_0 => "q8_0",
        GgufType::Q4_0 => "q4_0",
    }
}

/// An Ollama Modelfile for `gguf`: its `TEMPLATE` (Go template syntax) renders exactly the
/// training prompt of `template`, with the persona as the system message (`SYSTEM`, or
/// `/set system` in `ollama run`) and the dialogue so far as the other messages; the model's
/// reply then follows as it did in training, up to the eos.
/// `from` is the Modelfile's FROM; `adapter` an `ADAPTER` GGUF LoRA applied over it.
pub fn modelfile_text(
    from: &str,
    adapter: Option<&Path>,
    template: Template,
    persona: &[String],
    eos: &str,
    max_len: usize,
) -> String {
    // Persona facts joined by spaces, the dialogue's turns by newlines (persona template) or
    // spaces (seed template), as `Template::prompt_text` joins them.
    let turns = match template {
        Template::Persona => {
            "{{ range .Messages }}{{ if ne .Role \"system\" }}{{ .Content }}\n{{ end }}{{ end }}"
        }
        Template::Seed => {
            "{{ $first := true }}{{ range .Messages }}{{ if ne .Role \"system\" }}{{ if not $first }} {{ end }}{{ .Content }}{{ $first = false }}{{ end }}{{ end }}"
        }
    };
    let body = match template {
        Template::Persona => format!(
            "Instruct: Given this persona: {{{{ .System }}}}\nand this dialogue:\n{turns}generate a response.\nOutput:"
        ),
        Template::Seed => format!(
            "Instruct: Given this persona: {{{{ .System }}}}\nand this dialogue: {turns}\ngenerate a response.\nOutput:"
        ),
    };
    let mut s = format!(
        "# Written by `phitune export`. Create the model with: ollama create NAME -f Modelfile\n\
         FROM {from}\n{}\
         TEMPLATE \"\"\"{body}\"\"\"\n",
        adapter.map_or(String::new(), |a| format!("ADAPTER {}\n", a.display()))
    );
    if !persona.is_empty() {
        s += &format!("SYSTEM \"\"\"{}\"\"\"\n", persona.join(" "));
    }
    // `chat`'s defaults.
    s += &format!(
        "PARAMETER stop \"{}\"\n\
         PARAMETER temperature 0.7\n\
         PARAMETER top_p 0.9\n\
         PARAMETER repeat_penalty 1.1\n\
         PARAMETER num_predict 64\n\
         PARAMETER num_ctx {max_len}\n",
        eos.replace('\\', "\\\\").replace('"', "\\\"")
    );
    s
}

/// The Modelfile beside the GGUF, written atomically like the GGUF itself.
fn write_modelfile(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    phitune_model::io::atomic_write(path, |w| w.write_all(text.as_bytes()))?;
    Ok(())
}
