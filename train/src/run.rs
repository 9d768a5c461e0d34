//! A fine-tune on a backend, from a [`Prepared`] run to its outputs: burn-train's
//! `SupervisedTraining` with our step loop, then the adapter, the curves and a summary.

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
use phitune_data::batch::fill;
use phitune_model::Phi;
use phitune_model::ops::Nf4Backend;
use phitune_model::phi::Quantization;
use serde::Serialize;

use crate::checkpoint;
use crate::config::{QuantMode, TrainConfig};
use crate::dashboard::{Dashboard, Quiet, RunShape};
use crate::lm::{CausalLm, LmBatcher, LmStats};
use crate::metrics::{
    self, HostMemory, Loss, MetricsLog, Perplexity, TokenAccuracy, TokensPerSecond,
};
use crate::prepare::{Prepared, settle};
use crate::schedule::WarmupCosine;
use crate::step_loop::{Components, Outcome, StepLoop, Stop};
use crate::stream::{EvalSet, TrainStream};
use crate::world::World;

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
