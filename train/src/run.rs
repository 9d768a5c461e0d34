//! A fine-tune from start to outputs: prepare (config, output directory, data, model files) on
//! the host, then train on a backend through burn-train's `SupervisedTraining` with our step
//! loop, then write the adapter, the curves and a summary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::data::dataloader::DataLoaderBuilder;
use burn::optim::AdamWConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{Learner, SupervisedTraining, TrainLoader, TrainingStrategy, ValidLoader};
use phitune_data::batch::{ExampleDataset, fill};
use phitune_data::prompt::Example;
use phitune_data::split::{Split, split_of};
use phitune_data::{LoadOptions, load_source};
use phitune_model::ops::Nf4Backend;
use phitune_model::phi::Quantization;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};
use serde::Serialize;

use crate::checkpoint;
use crate::config::{Preset, QuantMode, TrainConfig, TrainFlags};
use crate::dashboard::{Dashboard, Quiet, RunShape};
use crate::lm::{CausalLm, LmBatcher, LmStats};
use crate::metrics::{
    self, HostMemory, Loss, MetricsLog, Perplexity, TokenAccuracy, TokensPerSecond,
};
use crate::schedule::WarmupCosine;
use crate::step_loop::{Components, Outcome, StepLoop, Stop};
use crate::stream::{EvalSet, TrainStream};
use crate::world::World;

/// How the user asked for the run.
pub struct Request {
    pub config_file: Option<PathBuf>,
    pub flags: TrainFlags,
    pub out: PathBuf,
    pub resume: bool,
    /// Replace a run already in `out` (deleted once everything else has been checked).
    pub overwrite: bool,
    pub stop_after: Option<usize>,
    /// Live dashboard (when stdout is a terminal); otherwise one plain line per step on stderr.
    pub dashboard: bool,
    /// The run is on a CUDA device: GPU memory and utilisation (NVML) join the dashboard's
    /// metrics where the build has them (the `gpu-metrics` feature).
    pub cuda: bool,
    /// Data parallelism over devices of one kind: each rank's device index.
    pub device_indices: Vec<u16>,
    /// How long a rank waits for the others.
    pub peer_timeout: std::time::Duration,
    /// Micro-batches are widened to a multiple of this many positions (see
    /// [`LmBatcher::pad_multiple`]): 64 on GPUs, 1 on the CPU.
    pub pad_multiple: usize,
    /// The processes of the run (MPI ranks; one without a launcher).
    pub world: Arc<World>,
}

/// Everything resolved on the host before touching a device.
pub struct Prepared {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub resume_from: Option<(usize, PathBuf)>,
    pub stop_after: Option<usize>,
    pub checkpoint: Checkpoint,
    pub train: Arc<Vec<Example>>,
    pub valid: Arc<Vec<Example>>,
    pub pad_id: u32,
    pub dashboard: bool,
    pub cuda: bool,
    /// `--devices`: the device index of each rank (one entry or none: a single device).
    pub device_indices: Vec<u16>,
    /// `--peer-timeout`.
    pub peer_timeout: std::time::Duration,
    pub pad_multiple: usize,
    pub world: Arc<World>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub status: String,
    pub steps: usize,
    pub max_steps: usize,
    pub train_examples: usize,
    pub valid_examples: usize,
    pub trainable_params: usize,
    pub final_train_loss: Option<f64>,
    pub valid_loss_before: Option<f64>,
    pub valid_loss: Option<f64>,
    pub valid_perplexity: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub seconds: f64,
    pub adapter: PathBuf,
    pub last_checkpoint: Option<PathBuf>,
    /// `--devices`: what synchronising the ranks cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::parallel::SyncCost>,
}

pub fn prepare(req: Request) -> Result<Prepared> {
    let world = req.world.clone();
    let (root, rank) = (world.is_root(), world.rank());
    // Every collective below is reached by every rank in the same order; a rank's own failure
    // is settled at the next one, so no rank waits for another that has given up.
    let local = if root {
        resolve_here(&req)
    } else {
        Ok((TrainConfig::preset(Preset::Persona), None))
    };
    let (mut config, resume_from) = settle(&world, local, "the settings check")?;
    if world.is_distributed() {
        // Rank 0's settings are the run's. Another rank takes its own flags (its paths may
        // differ: each machine reads the model and data from its own disk or HF cache) over
        // rank 0's settings, and must end up with the same ones.
        let text = world.broadcast_bytes(config.to_toml().into_bytes(), "the settings check")?;
        let local = if root {
            Ok(None)
        } else {
            TrainConfig::parse_toml(&String::from_utf8_lossy(&text)).and_then(|of_root| {
                // A new run: this rank's own settings, which must be rank 0's. Resumed: it
                // has no run directory, so rank 0's, with its own flags (paths) over them.
                let base = req.resume.then(|| of_root.clone());
                let mine = TrainConfig::resolve_from(base, req.config_file.as_deref(), &req.flags)?;
                Ok(Some((mine, of_root)))
            })
        };
        if let Some((mine, of_root)) = settle(&world, local, "the settings check")? {
            let complaint = mine.differs_between_ranks(&of_root).map(|d| {
                format!(
                    "rank {rank} was started with other settings than rank 0: {d}; every rank of a run needs the same settings"
                )
            });
            world.agree(complaint, "the settings check")?;
            config = mine;
        } else {
            world.agree(None, "the settings check")?;
        }
    }
    if let Some(n) = req.stop_after
        && (n == 0 || n > config.max_steps)
    {
        bail!(
            "--stop-after {n} must be between 1 and max_steps ({})",
            config.max_steps
        );
    }
    let ranks = req.device_indices.len().max(world.size());
    if world.is_distributed() && req.device_indices.len() > 1 {
        bail!(
            "--devices cannot be combined with an MPI launch: start one process per device instead"
        );
    }
    if ranks > 1 && config.grad_accum < ranks {
        bail!(
            "{ranks} ranks but grad_accum is {}: each optimizer step's {} micro-batches are shared out among the ranks, so grad_accum must be at least {ranks}",
            config.grad_accum,
            config.grad_accum
        );
    }

    let loaded = (|| -> Result<_> {
        let dir = phitune_model::io::hub::resolve_model(&config.model, config.revision.as_deref())?;
        let ckpt = Checkpoint::open(&dir)?;
        let tok = PhiTokenizer::from_dir(&dir, ckpt.config())?;
        let (train, valid) = load_examples(&config, &tok)?;
        if let Some((_, dir)) = &resume_from {
            let state = checkpoint::read_state(dir)?;
            if state
                .data_fingerprint
                .is_some_and(|f| f != checkpoint::data_fingerprint(&train))
            {
                bail!(
                    "{}: the training data differ from those of the run being resumed ({} now)",
                    dir.display(),
                    config.data
                );
            }
        }
        let fingerprints = [
            model_fingerprint(&dir),
            checkpoint::data_fingerprint(&train),
            checkpoint::data_fingerprint(&valid),
        ];
        Ok((ckpt, tok, train, valid, fingerprints))
    })();
    let (ckpt, tok, train, valid, fingerprints) =
        settle(&world, loaded, "loading the model and data")?;
    if world.is_distributed() {
        let of_root = world.broadcast_bytes(
            fingerprints.iter().flat_map(|f| f.to_le_bytes()).collect(),
            "comparing the model and data",
        )?;
        let names = [
            format!("model ({})", config.model),
            format!("training data ({})", config.data),
            format!("held-out data ({})", config.data),
        ];
        let complaint = fingerprints
            .iter()
            .zip(of_root.chunks(8))
            .zip(&names)
            .find(|((mine, theirs), _)| mine.to_le_bytes()[..] != theirs[..])
            .map(|(_, what)| {
                format!(
                    "rank {rank}'s {what} differs from rank 0's: every rank of a run needs the same model and data"
                )
            });
        world.agree(complaint, "comparing the model and data")?;
    }
    let pad_id = tok.eos_token_ids[0];

    // Only rank 0 writes the run; another rank keeps what it must write (its metrics log, the
    // Learner's files) in a private directory, removed at the end.
    let out = if root {
        settle(
            &world,
            create_out(&req, &config),
            "creating the output directory",
        )?;
        req.out.clone()
    } else {
        let dir = std::env::temp_dir().join(format!("phitune-rank{rank}-{}", std::process::id()));
        let made = std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .and_then(|()| std::fs::create_dir_all(&dir))
            .with_context(|| format!("rank {rank}: creating {}", dir.display()));
        settle(&world, made, "creating the output directory")?;
        dir
    };
    Ok(Prepared {
        config,
        out,
        resume_from: if root { resume_from } else { None },
        stop_after: req.stop_after,
        checkpoint: ckpt,
        train: Arc::new(train),
        valid: Arc::new(valid),
        pad_id,
        dashboard: req.dashboard && root,
        cuda: req.cuda,
        device_indices: req.device_indices,
        peer_timeout: req.peer_timeout,
        pad_multiple: req.pad_multiple.max(1),
        world,
    })
}

/// The settings of the run in `--out` (resumed) or of the flags (new), with `--out` checked.
fn resolve_here(req: &Request) -> Result<(TrainConfig, Option<(usize, PathBuf)>)> {
    let out = &req.out;
    let config_path = out.join("config.toml");
    if req.resume {
        if !config_path.is_file() {
            bail!(
                "--resume: {} has no config.toml (not a training output directory)",
                out.display()
            );
        }
        let saved = TrainConfig::read(&config_path)?;
        let config = if req.config_file.is_none() && req.flags.is_empty() {
            saved.clone()
        } else {
            TrainConfig::resolve_from(Some(saved.clone()), req.config_file.as_deref(), &req.flags)?
        };
        if let Some(diff) = saved.differs_for_resume(&config) {
            bail!("--resume cannot change {diff}; start a new run in another --out instead");
        }
        checkpoint::clean_staging(out);
        let from = checkpoint::latest(out);
        if let Some((_, dir)) = &from {
            let state = checkpoint::read_state(dir)?;
            if state.seed != config.seed || state.max_steps != config.max_steps {
                bail!(
                    "{}: written by a run with another seed or step count",
                    dir.display()
                );
            }
        }
        Ok((config, from))
    } else {
        let config = TrainConfig::resolve(req.config_file.as_deref(), &req.flags)?;
        if out.exists() {
            let non_empty = std::fs::read_dir(out)
                .with_context(|| out.display().to_string())?
                .next()
                .is_some();
            if non_empty && !req.overwrite {
                bail!(
                    "{} exists and is not empty: pass --resume to continue the run there, --overwrite to replace it, or choose another --out",
                    out.display()
                );
            }
        }
        Ok((config, None))
    }
}

/// `--out`, emptied first with `--overwrite`, with the run's config.toml (a new run).
fn create_out(req: &Request, config: &TrainConfig) -> Result<()> {
    let out = &req.out;
    if req.overwrite && out.exists() {
        // Renamed aside first, so a failed deletion never leaves half a run under `out`;
        // remove_dir_all does not follow symlinks.
        let old = out.with_file_name(format!(
            ".{}.old-{}",
            out.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(out, &old).with_context(|| format!("replacing {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        eprintln!(
            "--overwrite: removed the previous contents of {}",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if !req.resume {
        checkpoint::write_synced(&out.join("config.toml"), config.to_toml().as_bytes())?;
    }
    Ok(())
}

/// A fingerprint of a model directory: its config and tokenizer, and the size of every weight
/// file (hashing gigabytes of weights would cost more than it tells).
fn model_fingerprint(dir: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for f in ["config.json", "tokenizer.json"] {
        eat(&std::fs::read(dir.join(f)).unwrap_or_default());
    }
    let mut weights: Vec<(String, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            let len = e.metadata().map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    weights.sort();
    for (name, len) in weights {
        eat(name.as_bytes());
        eat(&len.to_le_bytes());
    }
    h
}

/// This rank's result of a step every rank takes: when any rank failed, every rank returns the
/// first failure (rank 0 prints it; see [`World::agree`]). One process: the result as it is.
fn settle<T>(world: &World, local: Result<T>, what: &str) -> Result<T> {
    if !world.is_distributed() {
        return local;
    }
    let complaint = local.as_ref().err().map(|e| {
        let msg = format!("{e:#}").replace('\n', " ");
        if world.is_root() {
            msg
        } else {
            format!("rank {}: {msg}", world.rank())
        }
    });
    world.agree(complaint, what)?;
    local
}

/// Training and held-out examples (the latter limited to `eval_rows`, longest first so that
/// batches pad little and a too-large batch fails at once rather than at the end).
pub fn load_examples(
    config: &TrainConfig,
    tok: &PhiTokenizer,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let t = Instant::now();
    let loaded = load_source(
        &config.data,
        config.data_revision.as_deref(),
        LoadOptions {
            skip_invalid: config.skip_invalid,
        },
    )?;
    if loaded.rows.is_empty() {
        bail!("{}: no valid rows", config.data);
    }
    let (valid_rows, train_rows): (Vec<_>, Vec<_>) = loaded
        .rows
        .into_iter()
        .partition(|r| split_of(&r.conv_id, config.valid_fraction) == Split::Valid);
    let train = ExampleDataset::build(&train_rows, tok, config.template, config.max_len)?;
    let mut valid =
        ExampleDataset::build(&valid_rows, tok, config.template, config.max_len)?.examples;
    if config.eval_rows > 0 {
        valid.truncate(config.eval_rows);
    }
    valid.sort_by_key(|e| std::cmp::Reverse(e.len));
    eprintln!(
        "data: {} training examples ({} dropped, {} truncated), {} held-out, from {} rows ({} skipped as malformed) in {:.1}s",
        train.examples.len(),
        train.dropped,
        train.truncated,
        valid.len(),
        train_rows.len() + valid_rows.len(),
        loaded.skipped.len(),
        t.elapsed().as_secs_f64()
    );
    if train.examples.is_empty() {
        bail!(
            "{}: no training examples (every row is held out or dropped)",
            config.data
        );
    }
    Ok((train.examples, valid))
}

/// Runs the fine-tune on backend `B` (with or without activation checkpointing).
pub fn train<B: Nf4Backend>(p: Prepared, device: B::Device) -> Result<Summary> {
    if p.config.grad_checkpointing {
        train_on::<Autodiff<B, BalancedCheckpointing>>(p, device)
    } else {
        train_on::<Autodiff<B>>(p, device)
    }
}

fn train_on<AB>(p: Prepared, device: AB::Device) -> Result<Summary>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let started = Instant::now();
    let world = p.world.clone();
    let (learner, trainable, start_step) = settle(
        &world,
        set_up_learner::<AB>(&p, &device),
        "setting up the model",
    )?;
    // Across processes, rank 0's step is the run's (another rank has no checkpoint: it gets rank
    // 0's trainable values when the loop starts), and every rank must train as many values.
    let start_step = if world.is_distributed() {
        let complaint = {
            let theirs = world.broadcast_bytes(
                (trainable as u64).to_le_bytes().to_vec(),
                "comparing the models",
            )?;
            (theirs[..] != (trainable as u64).to_le_bytes()[..]).then(|| {
                format!(
                    "rank {} trains {trainable} parameters, rank 0 another number: every rank needs the same model and adapter settings",
                    world.rank()
                )
            })
        };
        world.agree(complaint, "comparing the models")?;
        let step = world.broadcast_bytes((start_step as u64).to_le_bytes().to_vec(), "resuming")?;
        u64::from_le_bytes(step[..8].try_into().expect("8 bytes")) as usize
    } else {
        start_step
    };
    let (train_loader, valid_loader) = data_loaders::<AB>(&p, start_step, &device);
    let mut log = MetricsLog::open(&p.out.join("metrics.jsonl"), start_step)?;
    let valid_before = evaluate_base(&p, &learner, &valid_loader, &mut log, start_step)?;
    let outcome = Arc::new(Mutex::new(None::<Outcome>));
    let step_loop = StepLoop {
        out: p.out.clone(),
        config: p.config.clone(),
        start_step,
        stop_after: p.stop_after,
        base_model: p.config.model.clone(),
        plain: !p.dashboard,
        elapsed_before: log.elapsed(),
        log: Mutex::new(log),
        outcome: outcome.clone(),
        started,
        data_fingerprint: checkpoint::data_fingerprint(&p.train),
        evaluates: !p.valid.is_empty(),
        device_indices: p.device_indices.clone(),
        peer_timeout: p.peer_timeout,
        world: world.clone(),
    };
    let (training, interrupter) =
        build_training(&p, start_step, step_loop, train_loader, valid_loader);
    if world.is_root() {
        announce(&p.config, trainable);
    }
    #[cfg(unix)]
    let signals = stop_on_signals(interrupter, &world);
    #[cfg(not(unix))]
    drop(interrupter);
    let result = training.launch(learner);
    #[cfg(unix)]
    if let Some(handle) = signals {
        handle.close();
    }
    let outcome = outcome
        .lock()
        .ok()
        .and_then(|o| o.clone())
        .context("the training loop did not report an outcome")?;
    if !world.is_root() {
        // Rank 0 reports the run (and any failure); this rank only cleans up.
        let _ = std::fs::remove_dir_all(&p.out);
        if let Stop::Failed(e) | Stop::NonFinite { what: e, .. } = &outcome.stop {
            return Err(crate::world::SharedError(e.clone()).into());
        }
        return Ok(Summary::of_rank(&p, &outcome, trainable));
    }
    finish(&p, &outcome, &result.model, trainable, valid_before)
}

/// The model (the base as loaded, with fresh LoRA adapters), AdamW and the schedule, restored
/// from the latest checkpoint when resuming: `(learner, trainable parameters, first step)`.
fn set_up_learner<AB>(
    p: &Prepared,
    device: &AB::Device,
) -> Result<(Learner<Components<AB>>, usize, usize)>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let c = &p.config;
    let quant = (c.quant == QuantMode::Nf4).then_some(Quantization {
        double_quant: c.double_quant,
    });
    let phi = Phi::<AB>::load_with(&p.checkpoint, device, quant)
        .with_context(|| format!("loading {}", p.checkpoint.dir().display()))?;
    AB::seed(device, c.seed);
    let phi = phi.with_lora(&c.lora(), c.seed, device);
    let trainable: usize = burn::module::Module::num_params(&phi);
    let model = CausalLm::new(phi, 1.0 / c.grad_accum as f64, c.seed);
    let optim = AdamWConfig::new()
        .with_beta_1(c.adam_beta1 as f32)
        .with_beta_2(c.adam_beta2 as f32)
        .with_epsilon(c.adam_eps as f32)
        .with_weight_decay(c.weight_decay as f32)
        .init::<AB, CausalLm<AB>>();
    let schedule = WarmupCosine::new(c.lr, c.warmup_steps(), c.max_steps);
    let mut learner: Learner<Components<AB>> = Learner::new(model, optim, schedule);
    let Some((step, dir)) = &p.resume_from else {
        return Ok((learner, trainable, 0));
    };
    learner.load_model(checkpoint::load_record(dir, checkpoint::MODEL, device)?);
    learner.load_optim(checkpoint::load_record(dir, checkpoint::OPTIM, device)?);
    learner.load_scheduler(checkpoint::load_record::<usize, AB>(
        dir,
        checkpoint::SCHEDULER,
        device,
    )?);
    eprintln!("resuming from {} (step {step})", dir.display());
    Ok((learner, trainable, *step))
}

/// The training stream from `start_step`'s position on, and the held-out set.
fn data_loaders<AB>(
    p: &Prepared,
    start_step: usize,
    device: &AB::Device,
) -> (TrainLoader<Components<AB>>, ValidLoader<Components<AB>>)
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let c = &p.config;
    let seqs = c.sequences_per_step();
    let remaining = (c.max_steps - start_step) * seqs;
    let stream = TrainStream::new(
        p.train.clone(),
        c.seed,
        (start_step * seqs) as u64,
        remaining,
    );
    report_fill(&stream, c, p.pad_multiple);
    let batcher = LmBatcher {
        pad_id: p.pad_id,
        pack: c.packing.then_some(c.max_len),
        pad_multiple: p.pad_multiple,
    };
    let train = DataLoaderBuilder::<AB, _, _>::new(batcher.clone())
        .batch_size(c.micro_batch)
        .set_device(device.clone())
        .build(stream);
    let valid = DataLoaderBuilder::<AB::InnerBackend, _, _>::new(batcher)
        .batch_size(c.micro_batch)
        .set_device(device.clone())
        .build(EvalSet(p.valid.clone()));
    (train, valid)
}

/// One line on how full the micro-batches ahead are (over up to one pass of the stream), padded
/// and packed, so the choice of `--packing` is an informed one.
fn report_fill(stream: &TrainStream, c: &TrainConfig, pad_multiple: usize) {
    use burn::data::dataset::Dataset;
    let n = stream
        .len()
        .min(stream.examples().max(1) * c.micro_batch.max(1));
    let lengths: Vec<usize> = (0..n)
        .filter_map(|i| stream.get(i).map(|item| item.example.len))
        .collect();
    let padded = fill(&lengths, c.micro_batch, None, pad_multiple);
    let packed = fill(&lengths, c.micro_batch, Some(c.max_len), pad_multiple);
    if pad_multiple > 1 {
        eprintln!(
            "batches: widened to multiples of {pad_multiple} positions (fewer shapes for the GPU to compile and tune; padding, ignored by the loss)"
        );
    }
    if c.packing {
        eprintln!(
            "batches: {} examples per micro-batch packed into rows of up to {} tokens: {:.2} examples per row, {:.0}% of positions are real tokens (padded: {:.0}%)",
            c.micro_batch,
            c.max_len,
            packed.per_row,
            100.0 * packed.real,
            100.0 * padded.real
        );
    } else {
        eprintln!(
            "batches: {} examples per micro-batch, padded: {:.0}% of positions are real tokens (--packing: {:.0}%)",
            c.micro_batch,
            100.0 * padded.real,
            100.0 * packed.real
        );
    }
}

/// The base model's held-out loss, once (kept from the log when resuming), for the
/// before/after comparison.
fn evaluate_base<AB>(
    p: &Prepared,
    learner: &Learner<Components<AB>>,
    valid: &ValidLoader<Components<AB>>,
    log: &mut MetricsLog,
    start_step: usize,
) -> Result<Option<f64>>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let logged = log
        .records
        .iter()
        .find(|r| r.split == "valid" && r.step == 0)
        .map(|r| r.loss);
    let world = &p.world;
    let skip = logged.is_some() || start_step > 0 || p.valid.is_empty();
    // Rank 0's log decides, for every rank (the evaluation is shared out among them).
    let skip = world.broadcast_bytes(vec![skip as u8], "evaluating the base model")?[0] != 0;
    if skip {
        return Ok(logged);
    }
    if world.is_root() {
        eprintln!(
            "evaluating the base model on {} held-out examples...",
            p.valid.len()
        );
    }
    let model = burn::module::AutodiffModule::valid(&learner.model());
    let mut sum = LmStats::default();
    // Across processes, batch j is rank j % ranks's, and the counts are summed.
    for (j, batch) in valid.iter().enumerate() {
        if j % world.size() == world.rank() {
            sum.add(&burn::train::InferenceStep::step(&model, batch));
        }
    }
    if world.is_distributed() {
        let mut sums = sum.to_sums();
        world.sum_f64(&mut sums, "evaluating the base model")?;
        sum = LmStats::from_sums(&sums, sum.seconds);
    }
    log.append(metrics::Record::from_stats("valid", 0, &sum, 0.0))?;
    Ok(Some(sum.loss()))
}

/// burn-train's `SupervisedTraining` around our step loop: the dashboard's metrics and renderer
/// (or none without a terminal), and the interrupter that signals stop it through.
fn build_training<AB>(
    p: &Prepared,
    start_step: usize,
    step_loop: StepLoop,
    train: TrainLoader<Components<AB>>,
    valid: ValidLoader<Components<AB>>,
) -> (SupervisedTraining<Components<AB>>, burn::train::Interrupter)
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let training = SupervisedTraining::new(p.out.join("logs"), train, valid)
        .metrics((
            Loss::default(),
            Perplexity::default(),
            TokenAccuracy::default(),
        ))
        .metric_train_numeric(burn::train::metric::LearningRateMetric::new())
        .metric_train_numeric(TokensPerSecond::default())
        .metric_train_numeric(HostMemory::default())
        .with_training_strategy(TrainingStrategy::Custom(Arc::new(step_loop)))
        // burn-train's application logger would replace our panic hook and log file handling.
        .with_application_logger(None);
    // GPU memory and utilisation (NVML) where the build has CUDA and the run is on it.
    #[cfg(feature = "gpu-metrics")]
    let training = if p.cuda {
        training.metric_train(burn::train::metric::CudaMetric::new())
    } else {
        training
    };
    let interrupter = training.interrupter();
    let training = if p.dashboard {
        let shape = RunShape {
            max_steps: p.config.max_steps,
            grad_accum: p.config.grad_accum,
            start_step,
        };
        let dashboard = Dashboard::new(training.interrupter(), shape);
        training.renderer(dashboard)
    } else {
        training.renderer(Quiet)
    };
    (training, interrupter)
}

fn announce(c: &TrainConfig, trainable: usize) {
    eprintln!(
        "training: {} trainable parameters, {} optimizer steps of {} x {} sequences, lr {:e} (warmup {} steps, cosine), {}",
        trainable,
        c.max_steps,
        c.micro_batch,
        c.grad_accum,
        c.lr,
        c.warmup_steps(),
        if c.quant == QuantMode::Nf4 {
            "NF4 base"
        } else {
            "float base"
        }
    );
}

/// After the loop: the curves, the adapter as of the last step at the top of the output
/// directory, and the summary (or the error that stopped the run).
fn finish<B: Nf4Backend>(
    p: &Prepared,
    outcome: &Outcome,
    model: &CausalLm<B>,
    trainable: usize,
    valid_before: Option<f64>,
) -> Result<Summary> {
    let c = &p.config;
    let records = metrics::read(&p.out.join("metrics.jsonl")).unwrap_or_default();
    write_curves(&p.out, &records)?;
    let status = match &outcome.stop {
        Stop::Completed => "completed".to_string(),
        Stop::StoppedAfter(n) => format!("stopped after step {n}"),
        Stop::Interrupted(why) => format!("interrupted ({why})"),
        Stop::NonFinite { step, what } => {
            let keep = last_good(outcome);
            bail!(
                "training stopped at step {step}: {what} is not finite; {keep} (lower --lr or --max-grad-norm, then --resume)"
            );
        }
        Stop::Failed(e) if p.device_indices.len() > 1 || p.world.is_distributed() => {
            match &outcome.last_checkpoint {
                Some(d) => bail!(
                    "training stopped: {e}; the last good checkpoint is {} (--resume continues from it)",
                    d.display()
                ),
                None => bail!("training stopped: {e}; there is no checkpoint yet"),
            }
        }
        Stop::Failed(e) => bail!("training stopped: {e}"),
    };
    let adapter = model.phi.adapter(&c.lora(), Some(c.model.clone()));
    let staging = p.out.join(".adapter.tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| staging.display().to_string())?;
    }
    adapter.write(&staging)?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::rename(staging.join(f), p.out.join(f))
            .with_context(|| format!("writing {}", p.out.join(f).display()))?;
    }
    let _ = std::fs::remove_dir(&staging);

    let last_train = records.iter().rev().find(|r| r.split == "train");
    let last_valid = records
        .iter()
        .rev()
        .find(|r| r.split == "valid" && r.step > 0);
    let (tokens, seconds) = records
        .iter()
        .filter(|r| r.split == "train")
        .skip(1)
        .fold((0usize, 0.0f64), |(t, s), r| (t + r.tokens, s + r.seconds));
    let summary = Summary {
        out: p.out.clone(),
        status,
        steps: outcome.steps_done,
        max_steps: c.max_steps,
        train_examples: p.train.len(),
        valid_examples: p.valid.len(),
        trainable_params: trainable,
        final_train_loss: last_train.map(|r| r.loss),
        valid_loss_before: valid_before,
        valid_loss: last_valid.map(|r| r.loss),
        valid_perplexity: last_valid.map(|r| r.perplexity),
        tokens_per_second: (seconds > 0.0).then(|| tokens as f64 / seconds),
        seconds: records.last().map_or(0.0, |r| r.elapsed),
        adapter: p.out.clone(),
        last_checkpoint: outcome.last_checkpoint.clone(),
        sync: outcome.sync,
    };
    checkpoint::write_synced(
        &p.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

impl Summary {
    /// What another rank than 0 knows of the run (it writes nothing).
    fn of_rank(p: &Prepared, outcome: &Outcome, trainable: usize) -> Self {
        Self {
            out: p.out.clone(),
            status: format!("{:?}", outcome.stop),
            steps: outcome.steps_done,
            max_steps: p.config.max_steps,
            train_examples: p.train.len(),
            valid_examples: p.valid.len(),
            trainable_params: trainable,
            final_train_loss: None,
            valid_loss_before: None,
            valid_loss: None,
            valid_perplexity: None,
            tokens_per_second: None,
            seconds: 0.0,
            adapter: p.out.clone(),
            last_checkpoint: None,
            sync: outcome.sync,
        }
    }
}

/// Ctrl-C (SIGINT) or SIGTERM while training: the first asks the step loop to finish the current
/// optimizer step, write a checkpoint and stop (the run then ends as "interrupted" and can be
/// resumed); a second one quits at once with status 130, which corrupts nothing because every
/// checkpoint is written to a staging directory and renamed into place.
#[cfg(unix)]
fn stop_on_signals(
    interrupter: burn::train::Interrupter,
    world: &World,
) -> Option<signal_hook::iterator::Handle> {
    let (distributed, root, last_good) =
        (world.is_distributed(), world.is_root(), world.last_good());
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).ok()?;
    let handle = signals.handle();
    std::thread::spawn(move || {
        for (n, sig) in signals.forever().enumerate() {
            let name = if sig == SIGINT { "Ctrl-C" } else { "SIGTERM" };
            if n == 0 {
                if distributed {
                    // The launcher signals every rank, when the job is cancelled and when a rank
                    // has ended; in the second case the step cannot finish.
                    if root {
                        eprintln!(
                            "\n{name} from the MPI launcher (the job is being stopped, or a rank has ended): finishing the current step and writing a checkpoint; should the job end first, {}",
                            last_good.line()
                        );
                    }
                } else {
                    eprintln!(
                        "\n{name}: finishing the current step and writing a checkpoint ({name} again quits at once)"
                    );
                }
                interrupter.stop(Some(name));
            } else {
                eprintln!("{name}: quitting now; continue from the last checkpoint with --resume");
                std::process::exit(130);
            }
        }
    });
    Some(handle)
}

/// `curves.svg`: loss and perplexity (train and held-out), learning rate and gradient norm per
/// optimizer step.
/// Where a failed run can be resumed from.
fn last_good(outcome: &Outcome) -> String {
    outcome
        .last_checkpoint
        .as_ref()
        .map_or("there is no checkpoint yet".to_string(), |d| {
            format!("the last good checkpoint is {}", d.display())
        })
}

pub fn write_curves(out: &Path, records: &[metrics::Record]) -> Result<()> {
    use crate::plot::{Panel, Series, svg};
    use plotters::style::RGBColor;
    const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
    const RED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
    const GREEN: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
    const PURPLE: RGBColor = RGBColor(0x94, 0x67, 0xbd);
    let pts = |split: &str, f: &dyn Fn(&metrics::Record) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| r.split == split)
            .filter_map(|r| f(r).map(|v| (r.step as f64, v)))
            .collect()
    };
    let train_loss = pts("train", &|r| Some(r.loss));
    let valid_loss = pts("valid", &|r| Some(r.loss));
    let train_ppl = pts("train", &|r| Some(r.perplexity));
    let valid_ppl = pts("valid", &|r| Some(r.perplexity));
    let lr = pts("train", &|r| r.lr);
    let gn = pts("train", &|r| r.grad_norm);
    let panels = [
        Panel {
            title: "Loss (response tokens)",
            y_label: "nats/token",
            log_y: false,
            series: vec![
                Series {
                    name: "train",
                    points: &train_loss,
                    color: BLUE,
                },
                Series {
                    name: "held-out",
                    points: &valid_loss,
                    color: RED,
                },
            ],
        },
        Panel {
            title: "Perplexity",
            y_label: "perplexity",
            log_y: true,
            series: vec![
                Series {
                    name: "train",
                    points: &train_ppl,
                    color: BLUE,
                },
                Series {
                    name: "held-out",
                    points: &valid_ppl,
                    color: RED,
                },
            ],
        },
        Panel {
            title: "Learning rate",
            y_label: "lr",
            log_y: false,
            series: vec![Series {
                name: "lr",
                points: &lr,
                color: GREEN,
            }],
        },
        Panel {
            title: "Gradient norm (before clipping)",
            y_label: "L2 norm",
            log_y: false,
            series: vec![Series {
                name: "grad norm",
                points: &gn,
                color: PURPLE,
            }],
        },
    ];
    checkpoint::write_synced(
        &out.join("curves.svg"),
        svg(&panels, "optimizer step")?.as_bytes(),
    )
}
