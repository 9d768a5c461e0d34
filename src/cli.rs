//! Command-line interface definitions.
//!
//! clap shows the doc comments below as `--help` text, so they are written for a terminal
//! (`cuda[:N]`, `eval/<adapter name>`), not as rustdoc markup.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use clap::{Args, Parser, Subcommand};

use crate::backend::{DeviceSpec, Dtype};

#[derive(Parser, Debug)]
#[command(
    name = "phitune",
    version,
    about = "QLoRA fine-tuning of Phi-2 for persona-grounded dialogue, on Burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Per-token negative log-likelihood of a text (one JSON object on stdout).
    Score(ScoreArgs),
    /// Continue a prompt (streams text; --json prints one JSON object instead).
    Generate(GenerateArgs),
    /// Fold a LoRA adapter into its base model and write an HF-format checkpoint.
    Merge(MergeArgs),
    /// Merge an adapter into its base and write one GGUF file (llama.cpp, Ollama) with an
    /// Ollama Modelfile beside it (--format gguf), or an HF checkpoint (--format hf, as merge).
    Export(ExportArgs),
    /// Inspect a data source: rows, split, a rendered example with its loss mask, lengths.
    Data(DataArgs),
    /// Measure speed on a model with a given configuration and random weights (JSON).
    Bench(BenchArgs),
    /// Fine-tune with QLoRA (the seed recipe by default); leaves a PEFT adapter in --out.
    Train(TrainArgs),
    /// Held-out loss/perplexity, and with --generate greedy replies scored by unigram F1.
    Eval(EvalArgs),
    /// Talk to the persona: type the other speaker's turns, the model answers in character.
    /// Reads one turn per line from stdin (a terminal or a pipe); /reset, /persona, /quit.
    Chat(ChatArgs),
    /// Serve the persona over HTTP: an OpenAI-compatible API (/v1/chat/completions,
    /// /v1/completions, /v1/models) and a chat page at /.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A TOML file of training settings (keys as the flags, with underscores); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Output directory: adapter, config.toml, metrics.jsonl, curves.svg, checkpoints/.
    #[arg(long, default_value = "runs/phi2-persona")]
    pub out: std::path::PathBuf,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in --out even if it holds one (the old run is deleted first).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Stop (with a checkpoint) after this optimizer step, without changing the schedule;
    /// continue later with --resume.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<usize>,
    /// Plain progress lines instead of the live dashboard even on a terminal.
    #[arg(long)]
    pub no_dashboard: bool,
    #[command(flatten)]
    pub flags: phitune_train::TrainFlags,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Data-parallel over these devices of one kind, one worker thread each (e.g.
    /// `cuda:0,cuda:1`; `cpu,cpu` runs two CPU ranks): each optimizer step's micro-batches are
    /// shared out and their gradients all-reduced once per step. Replaces --device.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        conflicts_with = "device"
    )]
    pub devices: Vec<DeviceSpec>,
    /// Seconds a rank waits for the others (--devices) before the run stops with an error.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub peer_timeout: u64,
    /// Widen every micro-batch to a multiple of this many positions (padding, which the loss
    /// ignores: the results are the same). Default 64 on GPUs, so that a run meets a few
    /// sequence lengths and compiles and tunes kernels for those only; 1 on the CPU.
    #[arg(long, value_name = "N")]
    pub pad_to_multiple: Option<usize>,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data file, directory or hub dataset id; its held-out split is evaluated.
    #[arg(long, default_value = "Cynaptics/persona-chat")]
    pub data: String,
    #[arg(long)]
    pub data_revision: Option<String>,
    /// Skip (and count) malformed rows.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Prompt template (default: the adapter's training run's, else persona).
    #[arg(long)]
    pub template: Option<phitune_data::Template>,
    /// Maximum tokens per example (default: the adapter's training run's, else 512).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Fraction of conversations held out (must match training's; default: the run's, else 0.02).
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// Evaluate only the first N held-out rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Generate greedy replies for the first N held-out rows and score them (unigram F1).
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// With --adapter and --generate: also generate the base model's replies for the same rows
    /// and print them next to the adapter's and the reference (stderr; both in the JSONL); with
    /// --hits, the base model's Hits@1 too.
    #[arg(long, requires = "adapter")]
    pub compare_base: bool,
    /// Hits@1 out of N candidates per held-out row (ConvAI2 uses 20): the row's reference and
    /// the next N-1 rows' references, ranked by the model's mean NLL of each after the row's
    /// prompt; rows to DIR/hits.jsonl. 0 = off.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub hits: usize,
    /// New tokens per reply.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// HF's repetition penalty for the replies (the seed used 1.2).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Sequences per forward pass for the loss.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Where generations.jsonl and summary.json go (default: eval/<adapter name or base>).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (HF format) or hub id.
    #[arg(long, default_value = "microsoft/phi-2")]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    pub revision: Option<String>,
    /// A LoRA adapter directory in PEFT's format (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub quant: QuantArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    /// Float weights as stored.
    None,
    /// 4-bit NormalFloat (QLoRA, bitsandbytes-compatible) for the decoder layers' Linear weights.
    Nf4,
}

#[derive(Args, Debug, Clone)]
pub struct QuantArgs {
    /// Quantize the base model's decoder-layer Linear weights while loading.
    /// [default: none; for `eval` with a training run's adapter, the run's]
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    /// With --quant nf4: also quantize the absmax values (bitsandbytes' double quant).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub double_quant: bool,
}

impl QuantArgs {
    pub fn quantization(&self) -> Option<phitune_model::phi::Quantization> {
        (self.quant == Some(Quant::Nf4)).then_some(phitune_model::phi::Quantization {
            double_quant: self.double_quant,
        })
    }
}

impl BenchArgs {
    /// The base weights to measure: `--quant`, or NF4 for training and float for generation.
    pub fn base_quant(&self) -> Quant {
        self.quant
            .unwrap_or(if self.train { Quant::Nf4 } else { Quant::None })
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda[:N] or wgpu[:N] (default: the best one compiled in).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Compute dtype: f32, or f16/bf16 on GPUs (default: bf16 on CUDA, f32 elsewhere).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Let f32 products use TF32 tensor cores (CUDA): faster, but each operand is rounded to a
    /// 10-bit mantissa (about 5e-4 relative). Off by default, as in PyTorch: f32 means f32.
    /// Half-precision runs are not affected.
    #[arg(long)]
    pub tf32: bool,
}

impl DeviceArgs {
    /// The device and dtype to run on (and the TF32 policy applied to the process).
    pub fn resolve(&self) -> (DeviceSpec, Dtype) {
        let device = self.device.unwrap_or_else(DeviceSpec::default_compiled);
        let dtype = self.dtype.unwrap_or(match device {
            DeviceSpec::Cuda(_) => Dtype::Bf16,
            _ => Dtype::F32,
        });
        // In an f16/bf16 run the only f32 products are the attention's q k^T of up-cast half
        // values, which TF32's 10-bit mantissa holds exactly: TF32 changes nothing there but
        // speed, so those runs keep Burn's tensor-core matmul as before.
        phitune_model::ops::set_allow_tf32(self.tf32 || dtype != Dtype::F32);
        (device, dtype)
    }
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score; repeat it to score several texts with one load of the model (one
    /// JSON object per line, in order).
    #[arg(long, required = true)]
    pub text: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy (the default, like HF generate); > 0 samples.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability >= P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// HF's repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A raw prompt to continue (instead of --persona/--dialogue/--row).
    #[arg(long, conflicts_with_all = ["persona", "persona_file", "row", "dialogue"])]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub persona: PersonaArgs,
    /// A dialogue turn, oldest first (repeatable); the reply answers the last one.
    #[arg(long, value_name = "TURN")]
    pub dialogue: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object {"tokens": [...], "text": "...", "prompt": "..."} instead of
    /// streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Who the model is, and the prompt format it was trained with.
#[derive(Args, Debug, Clone, Default)]
pub struct PersonaArgs {
    /// A persona fact, e.g. --persona "i love hiking." (repeatable).
    #[arg(long = "persona", value_name = "FACT")]
    pub persona: Vec<String>,
    /// A file of persona facts, one per line.
    #[arg(long, value_name = "FILE")]
    pub persona_file: Option<std::path::PathBuf>,
    /// Persona (persona_b) and dialogue from a data file's row: FILE:INDEX (0-based).
    #[arg(long, value_name = "FILE:INDEX")]
    pub row: Option<String>,
    /// Prompt template: persona or seed [default: the adapter's training run's, else persona].
    #[arg(long)]
    pub template: Option<phitune_data::Template>,
    /// Token budget for prompt + reply; older turns are dropped to fit
    /// [default: the adapter's training run's max_len, else 512].
    #[arg(long)]
    pub max_len: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub persona: PersonaArgs,
    /// Maximum number of new tokens per reply.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with probability >= P (1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// HF's repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.1)]
    pub repetition_penalty: f32,
    /// Random seed: the same seed and input give the same session.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// One JSON object per turn on stdout (user, reply, prompt, token counts, timings) instead
    /// of streamed text.
    #[arg(long)]
    pub json: bool,
    /// Recompute the whole prompt every turn instead of reusing the KV cache's shared prefix
    /// (for measuring what the reuse saves).
    #[arg(long)]
    pub no_cache_reuse: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The persona of requests without a system message (and of the page), the template and
    /// the prompt budget.
    #[command(flatten)]
    pub persona: PersonaArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ (default: the PHITUNE_API_KEY environment
    /// variable; none when unset).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Requests that may wait while one is generated; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// The model id clients name (default: the adapter's directory name, else the model's).
    #[arg(long)]
    pub name: Option<String>,
    /// New tokens of a reply when a request does not say (`max_tokens`).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature when a request does not say (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling when a request does not say (`top_p`; 1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// HF's repetition penalty when a request does not say (`repetition_penalty`; 1 = off).
    #[arg(long, default_value_t = 1.1)]
    pub repetition_penalty: f32,
    /// Seed of requests that do not give one (each such request gets the next one).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Args, Debug, Clone)]
pub struct DataSourceArgs {
    /// A .jsonl/.json/.parquet file, a directory of parquet shards, or a hub dataset id.
    #[arg(long, default_value = "Cynaptics/persona-chat")]
    pub data: String,
    /// Hub revision when --data is a hub dataset id.
    #[arg(long)]
    pub data_revision: Option<String>,
    /// Skip (and count) malformed rows instead of stopping at the first one.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Prompt template: persona (default) or seed (the original recipe's).
    #[arg(long, default_value = "persona")]
    pub template: phitune_data::Template,
    /// Maximum tokens per example for the persona template (the seed template uses 128).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Fraction of conversations held out for validation (by a stable hash of conv_id).
    #[arg(long, default_value_t = 0.02)]
    pub valid_fraction: f64,
}

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(flatten)]
    pub source: DataSourceArgs,
    /// The model whose tokenizer is used (directory or hub id).
    #[arg(long, default_value = "microsoft/phi-2")]
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
    /// Which example to render (index into the loaded rows).
    #[arg(long, default_value_t = 0)]
    pub show: usize,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model directory or hub id.
    #[arg(long, default_value = "microsoft/phi-2")]
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
    /// The PEFT adapter directory to fold in.
    #[arg(long)]
    pub adapter: std::path::PathBuf,
    /// Output directory (must not exist, or be empty).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace --out if it exists and is not empty (the old directory is removed only once the
    /// new checkpoint is complete).
    #[arg(long)]
    pub overwrite: bool,
    /// Shard the weights into files of at most this many MB (HF's default is 5000).
    #[arg(long, default_value_t = 5000)]
    pub max_shard_mb: u64,
    /// dtype of the written weights (default: the base checkpoint's).
    #[arg(long, value_enum)]
    pub dtype: Option<crate::backend::Dtype>,
    /// Merge into the NF4-dequantized base (what a QLoRA adapter was trained against); the
    /// output is float weights.
    #[command(flatten)]
    pub quant: QuantArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One GGUF file for llama.cpp / Ollama / LM Studio, and an Ollama Modelfile beside it.
    Gguf,
    /// An HF checkpoint directory (what `merge` writes).
    Hf,
    /// The adapter alone as llama.cpp's GGUF LoRA (a few MB; `llama-cli --lora`, Ollama's
    /// `ADAPTER`), and a Modelfile that applies it over --base-gguf (else Ollama's `phi`).
    #[value(name = "gguf-lora")]
    GgufLora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base model directory or hub id.
    #[arg(long, default_value = "microsoft/phi-2")]
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
    /// The PEFT adapter directory to merge in (without it, the base alone is exported).
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Merge into the NF4-dequantized base (what a QLoRA adapter was trained against)
    /// [default: the adapter's training run's base quantization].
    #[command(flatten)]
    pub quant: QuantArgs,
    #[arg(long, value_enum, default_value = "gguf")]
    pub format: ExportFormat,
    /// Tensor type of the matrices: for GGUF f16 by default (norms and biases stay f32); for
    /// --format gguf-lora f32, f16 (default) or bf16; for --format hf f32, f16 or bf16 (default:
    /// the base checkpoint's).
    #[arg(long = "type", value_enum)]
    pub ty: Option<GgufType>,
    /// The .gguf file (--format gguf) or the checkpoint directory (--format hf) to write.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace --out (and the Modelfile beside it) if they exist.
    #[arg(long)]
    pub overwrite: bool,
    /// --format gguf-lora: the base model's GGUF the adapter will be applied to (the Modelfile's
    /// FROM; its q/k/v layout, separate or fused, decides the adapter's tensors).
    #[arg(long, value_name = "FILE")]
    pub base_gguf: Option<std::path::PathBuf>,
    /// general.name in the GGUF file [default: the file's name without .gguf].
    #[arg(long)]
    pub name: Option<String>,
    /// The Modelfile's SYSTEM (the persona the model answers as); template and context follow
    /// the adapter's training run.
    #[command(flatten)]
    pub persona: PersonaArgs,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `bench` (phi-2's vocab and head geometry, hidden 640, 8 heads, 4 layers), `phi-2`,
    /// or a path to a config.json.
    #[arg(long, default_value = "bench")]
    pub config: String,
    /// Load weights from this model directory instead of random ones.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Prompt length for the generation benchmark.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// New tokens per generation run.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed repetitions (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Instead: time the two NF4 product paths (decode GEMV, dequantize + matmul) at these row
    /// counts on the config's fc1 shape, e.g. `--nf4-rows 1,2,4,8,16,32`.
    #[arg(long, value_delimiter = ',')]
    pub nf4_rows: Option<Vec<usize>>,
    /// Measure training too: the QLoRA setup (LoRA r=4 on q/k/v/dense over the --quant base,
    /// AdamW), one micro-batch of random tokens per step; then generation from the trained model.
    #[arg(long)]
    pub train: bool,
    /// Training: sequences per step.
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    /// Training: tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Training: timed steps (after --warmup-steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Base weights: float as stored (`none`) or 4-bit NF4 (QLoRA, with double quant).
    /// [default: nf4 with --train, none for generation]
    #[arg(long, value_enum)]
    pub quant: Option<Quant>,
    /// Generation: run over a LoRA adapter (r=4 on q/k/v/dense, as --train trains) on top of
    /// the base, unmerged, as `generate --adapter` does.
    #[arg(long)]
    pub lora: bool,
    /// Training: recompute activations in backward.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub grad_checkpointing: bool,
    /// Training: the vocabulary projection over every position (`full`, as transformers does)
    /// or over the target positions only, in chunks of rows (`targets`, what `train` runs).
    #[arg(long, value_enum, default_value_t = BenchHead::Targets)]
    pub head: BenchHead,
    /// Training: micro-batches of real rows from this data file (with their real lengths and
    /// loss masks, in file order, padded per micro-batch) instead of random tokens.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// With --data: the prompt template.
    #[arg(long, default_value = "persona")]
    pub template: phitune_data::Template,
    /// With --data: the template's maximum length.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// With --data: pack each micro-batch's examples into rows of up to --max-len tokens, as
    /// `train --packing` does.
    #[arg(long, requires = "data")]
    pub packing: bool,
    /// With --data: the tokenizer, from a model directory (tokenizer.json, config.json);
    /// default: --model.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// With --data: also write the micro-batches as JSON lines (input_ids, labels with -100)
    /// for `benches/hf_train.py --batches`, so both sides train on the same tokens.
    #[arg(long)]
    pub batches_out: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchHead {
    Full,
    Targets,
}
