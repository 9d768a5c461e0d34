//! The fine-tune as a burn-train learning strategy: the Learner runs it, its event processor
//! feeds the dashboard, its `Checkpointer`s write the records. What this loop adds is what the
//! seed recipe needs and burn-train 0.21's epoch loop does not do: optimizer steps as the unit
//! (schedule, stop, evaluation and checkpoint intervals), global-norm clipping, exact resume
//! (data position and dropout seeds derive from the step), atomic checkpoints, and a stop with
//! the last good checkpoint kept when the loss goes NaN.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::data::dataloader::Progress;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator};
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::AsyncCheckpointer;
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningCheckpointer,
    LearningComponentsMarker, SupervisedLearningStrategy, SupervisedTrainingEventProcessor,
    TrainLoader, TrainingComponents, TrainingItem, ValidLoader,
};
use phitune_model::ops::Nf4Backend;

use crate::checkpoint::{self, CheckpointState, Completion, EveryRequest, RecordFile};
use crate::clip::clip_global_norm;
use crate::config::TrainConfig;
use crate::lm::{CausalLm, LmStats};
use crate::metrics::{MetricsLog, Record};
use crate::parallel::{
    Peers, SyncCost, flatten_grads, flatten_values, load_values, unflatten_grads,
};
use crate::schedule::WarmupCosine;
use crate::world::World;
use burn::tensor::backend::{Device as _, DeviceId};

pub type Optim<AB> = OptimizerAdaptor<AdamW, CausalLm<AB>, AB>;
pub type Components<AB> = LearningComponentsMarker<AB, WarmupCosine, CausalLm<AB>, Optim<AB>>;

/// Why the loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// `max_steps` reached.
    Completed,
    /// `--stop-after` reached (a checkpoint was written).
    StoppedAfter(usize),
    /// The dashboard's quit key or a signal (a checkpoint was written).
    Interrupted(String),
    /// NaN/Inf loss or gradient norm at this step; nothing after the last checkpoint is kept.
    NonFinite { step: usize, what: String },
    /// An I/O or data error.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub stop: Stop,
    /// Optimizer steps completed (and applied).
    pub steps_done: usize,
    pub last_checkpoint: Option<PathBuf>,
    pub last_valid: Option<LmStats>,
    /// What synchronising the ranks cost (`--devices`).
    pub sync: Option<SyncCost>,
}

pub struct StepLoop {
    pub out: PathBuf,
    pub config: TrainConfig,
    pub start_step: usize,
    pub stop_after: Option<usize>,
    pub base_model: String,
    /// Print one line per optimizer step on stderr (no dashboard).
    pub plain: bool,
    pub log: Mutex<MetricsLog>,
    pub outcome: Arc<Mutex<Option<Outcome>>>,
    pub started: Instant,
    pub elapsed_before: f64,
    pub data_fingerprint: u64,
    /// There are held-out examples to evaluate on.
    pub evaluates: bool,
    /// Data parallelism: the device index of each rank (rank 0 is the model's device); one
    /// entry or none for a single device.
    pub device_indices: Vec<u16>,
    /// How long a rank waits for the others before stopping (`--peer-timeout`).
    pub peer_timeout: std::time::Duration,
    /// The processes of the run (MPI ranks): each computes its share of every step's
    /// micro-batches (micro-batch k is rank k % ranks's), the gradients are summed across
    /// them, rank 0 applies the optimizer and sends every rank the new trainable values; only
    /// rank 0 writes (metrics, checkpoints) and draws.
    pub world: Arc<World>,
}

struct Ctx<'a, AB>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    processor: &'a mut SupervisedTrainingEventProcessor<Components<AB>>,
    valid: &'a ValidLoader<Components<AB>>,
}

impl StepLoop {
    /// The other ranks' workers, started with a copy of `model` (None on one device).
    fn peers<AB>(&self, model: &CausalLm<AB>) -> anyhow::Result<Option<Peers<AB>>>
    where
        AB: AutodiffBackend + Nf4Backend,
        AB::InnerBackend: Nf4Backend,
    {
        if self.device_indices.len() < 2 {
            return Ok(None);
        }
        let base = burn::module::Module::devices(model)
            .into_iter()
            .next()
            .unwrap_or_default();
        let kind = base.to_id().type_id;
        let devices = self
            .device_indices
            .iter()
            .map(|&i| AB::Device::from_id(DeviceId::new(kind, i)))
            .collect();
        Peers::start(model, devices, self.peer_timeout).map(Some)
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Evaluation intervals, for the dashboard's progress ("epochs" there).
    fn intervals(&self) -> (usize, usize) {
        let every = if self.config.eval_every == 0 {
            self.config.max_steps
        } else {
            self.config.eval_every
        };
        (every, self.config.max_steps.div_ceil(every))
    }

    fn evaluate<AB>(
        &self,
        learner: &Learner<Components<AB>>,
        replica: Option<&CausalLm<AB>>,
        ctx: &mut Ctx<'_, AB>,
        interval: usize,
        total: usize,
    ) -> anyhow::Result<LmStats>
    where
        AB: AutodiffBackend + Nf4Backend,
        AB::InnerBackend: Nf4Backend,
    {
        let model = replica
            .map_or_else(|| learner.model(), Clone::clone)
            .valid();
        let global = Progress::new(interval, total);
        let mut iter = ctx.valid.iter();
        let mut sum = LmStats::default();
        let mut k = 0;
        let world = &self.world;
        while let Some(batch) = iter.next() {
            k += 1;
            // Across processes, batch k is rank (k - 1) % ranks's; the counts are summed below.
            if (k - 1) % world.size() != world.rank() {
                continue;
            }
            let t = Instant::now();
            let mut stats = model.step(batch);
            stats.seconds = t.elapsed().as_secs_f64();
            sum.add(&stats);
            ctx.processor
                .process_valid(LearnerEvent::ProcessedItem(TrainingItem::new(
                    stats,
                    iter.progress(),
                    global.clone(),
                    Some(k),
                    None,
                )));
        }
        ctx.processor
            .process_valid(LearnerEvent::EndEpoch(interval));
        if world.is_distributed() {
            let mut sums = sum.to_sums();
            world.sum_f64(
                &mut sums,
                &format!("the held-out evaluation after step {}", interval),
            )?;
            sum = LmStats::from_sums(&sums, sum.seconds);
        }
        Ok(sum)
    }

    fn checkpoint<AB>(
        &self,
        learner: &Learner<Components<AB>>,
        writer: &mut LearningCheckpointer<Components<AB>>,
        completion: &Completion,
        store: &burn::train::metric::store::EventStoreClient,
        state: &CheckpointState,
    ) -> anyhow::Result<PathBuf>
    where
        AB: AutodiffBackend + Nf4Backend,
        AB::InnerBackend: Nf4Backend,
    {
        let staging = checkpoint::begin(&self.out, state.step)?;
        writer.checkpoint(learner, state.step, store);
        let adapter = learner
            .model()
            .phi
            .adapter(&self.config.lora(), Some(self.base_model.clone()));
        let written = adapter.write(&staging);
        completion.wait()?;
        written?;
        checkpoint::commit(&self.out, state, self.config.keep_checkpoints)
    }

    fn append_log(&self, record: Record) -> anyhow::Result<()> {
        self.log
            .lock()
            .map_err(|_| anyhow::anyhow!("the metrics log is unusable"))?
            .append(record)
    }

    fn finish(
        &self,
        stop: Stop,
        steps_done: usize,
        last_checkpoint: Option<PathBuf>,
        last_valid: Option<LmStats>,
        sync: Option<SyncCost>,
    ) {
        if let Ok(mut o) = self.outcome.lock() {
            *o = Some(Outcome {
                stop,
                steps_done,
                last_checkpoint,
                last_valid,
                sync,
            });
        }
    }
}

impl<AB> SupervisedLearningStrategy<Components<AB>> for StepLoop
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    fn fit(
        &self,
        components: TrainingComponents<Components<AB>>,
        mut learner: Learner<Components<AB>>,
        train: TrainLoader<Components<AB>>,
        valid: ValidLoader<Components<AB>>,
        _starting_epoch: usize,
    ) -> (
        CausalLm<AB>,
        SupervisedTrainingEventProcessor<Components<AB>>,
    ) {
        let mut processor = components.event_processor;
        let interrupter = components.interrupter;
        let store = components.event_store;
        let c = &self.config;
        let (tx, completion) = Completion::channel();
        let mut writer = LearningCheckpointer::new(
            AsyncCheckpointer::new(RecordFile::new(&self.out, checkpoint::MODEL, tx.clone())),
            AsyncCheckpointer::new(RecordFile::new(&self.out, checkpoint::OPTIM, tx.clone())),
            AsyncCheckpointer::new(RecordFile::new(&self.out, checkpoint::SCHEDULER, tx)),
            Box::new(EveryRequest),
        );
        let (every, intervals) = self.intervals();
        let mut iter = train.iter();
        let mut last_checkpoint = checkpoint::latest(&self.out).map(|(_, d)| d);
        let mut last_valid = None;
        let mut step = self.start_step;
        let mut ctx = Ctx::<AB> {
            processor: &mut processor,
            valid: &valid,
        };
        let mut peers = match self.peers(&learner.model()) {
            Ok(p) => p,
            Err(e) => {
                let stop = Stop::Failed(format!("{e:#}"));
                self.finish(stop, step, last_checkpoint, last_valid, None);
                return (learner.model(), processor);
            }
        };
        let world = self.world.clone();
        let (distributed, root) = (world.is_distributed(), world.is_root());
        let mut sync = distributed.then(SyncCost::default);
        world.set_last_good(last_checkpoint.clone());
        // Another process than rank 0 trains its own copy of the model, which takes rank 0's
        // trainable values now (its adapter after a resume) and after every optimizer step.
        let mut replica: Option<CausalLm<AB>> = None;
        if distributed {
            let mut values = if root {
                host_values::<AB>(&learner.model())
            } else {
                Vec::new()
            };
            if let Err(e) = world.broadcast_f32(&mut values, "the start (rank 0's adapter)") {
                self.finish(
                    Stop::Failed(format!("{e:#}")),
                    step,
                    last_checkpoint,
                    last_valid,
                    sync,
                );
                return (learner.model(), processor);
            }
            if !root {
                replica = Some(load_host_values(learner.model(), values));
            }
        }

        let stop = loop {
            if step >= c.max_steps {
                break Stop::Completed;
            }
            let interval = step / every + 1;
            learner.lr_step();
            let lr = learner.lr_current();
            let t0 = Instant::now();
            let mut accumulator = GradientsAccumulator::new();
            let mut stats = LmStats::default();
            // The step's micro-batches, in stream order; with peers, micro-batch k belongs to
            // rank k % ranks, and the workers get theirs before rank 0 starts on its own; across
            // processes, each takes its own (every process reads the whole stream).
            let batches: Vec<_> = iter.by_ref().take(c.grad_accum).collect();
            if batches.len() < c.grad_accum {
                break Stop::Failed(format!(
                    "the training stream ended before step {}",
                    step + 1
                ));
            }
            let mut mine = Vec::new();
            let mut handed = Ok(());
            for (k, batch) in batches.into_iter().enumerate() {
                match &peers {
                    Some(p) if p.rank_of(k) != 0 => {
                        handed = handed.and_then(|()| p.send(p.rank_of(k), batch));
                    }
                    _ if k % world.size() != world.rank() => {}
                    _ => mine.push((k, batch)),
                }
            }
            let local = !mine.is_empty();
            let whole_step = peers.is_some() || distributed;
            for (k, batch) in mine {
                let t = Instant::now();
                let out = match &replica {
                    Some(m) => burn::train::TrainStep::step(m, batch),
                    None => learner.train_step(batch),
                };
                match &replica {
                    Some(m) => accumulator.accumulate(m, out.grads),
                    None => accumulator.accumulate(&learner.model(), out.grads),
                }
                let mut item = out.item;
                item.seconds = t.elapsed().as_secs_f64();
                stats.add(&item);
                // With peers or processes the dashboard gets the whole step at its end instead
                // (global tokens/s over the step's wall time).
                if !whole_step {
                    let done_in_interval = (step % every) * c.grad_accum + k + 1;
                    let progress = Progress::new(
                        done_in_interval,
                        every.min(c.max_steps - (interval - 1) * every) * c.grad_accum,
                    );
                    ctx.processor
                        .process_train(LearnerEvent::ProcessedItem(TrainingItem::new(
                            item,
                            progress,
                            Progress::new(interval, intervals),
                            Some(step + 1),
                            Some(lr),
                        )));
                }
            }
            // Whether to stop after this step: one process's Ctrl-C or SIGTERM stops them all at
            // the same step.
            let mut stopping_now = interrupter.should_stop();
            let grads = match (&mut peers, &mut sync) {
                (Some(p), _) => {
                    let reduced = handed.and_then(|()| {
                        p.all_reduce(&learner.model(), local.then(|| accumulator.grads()))
                    });
                    match reduced {
                        Ok((grads, theirs)) => {
                            theirs.iter().for_each(|s| stats.add(s));
                            Some(grads)
                        }
                        Err(e) => break Stop::Failed(format!("step {}: {e:#}", step + 1)),
                    }
                }
                (None, Some(cost)) => {
                    test_fault(world.rank(), step + 1);
                    let model = replica.clone().unwrap_or_else(|| learner.model());
                    let summed = sum_across::<AB>(
                        &world,
                        &model,
                        local.then(|| accumulator.grads()),
                        &mut stats,
                        &mut stopping_now,
                        step + 1,
                        cost,
                    );
                    match summed {
                        Ok(g) => root.then_some(g),
                        Err(e) => break Stop::Failed(format!("step {}: {e:#}", step + 1)),
                    }
                }
                (None, None) => Some(accumulator.grads()),
            };
            if !stats.nll_sum.is_finite() {
                break Stop::NonFinite {
                    step: step + 1,
                    what: format!("loss {}", stats.loss()),
                };
            }
            let norm = match grads {
                // Rank 0 (or the only process) clips and steps.
                Some(mut grads) => {
                    let norm =
                        clip_global_norm::<AB, _>(&learner.model(), &mut grads, c.max_grad_norm);
                    if norm.is_finite() {
                        learner.optimizer_step(grads);
                    }
                    norm
                }
                None => 0.0,
            };
            // Across processes: rank 0's new trainable values and its gradient norm (last).
            if distributed {
                let t = Instant::now();
                let mut values = if root {
                    let mut v = host_values::<AB>(&learner.model());
                    v.push(norm as f32);
                    v
                } else {
                    Vec::new()
                };
                if let Err(e) =
                    world.broadcast_f32(&mut values, &format!("the update of step {}", step + 1))
                {
                    break Stop::Failed(format!("step {}: {e:#}", step + 1));
                }
                let norm_of_root = values.pop().unwrap_or(f32::NAN) as f64;
                if let Some(m) = replica.take() {
                    replica = Some(load_host_values(m, values));
                }
                if let Some(cost) = &mut sync {
                    cost.copy_s += t.elapsed().as_secs_f64();
                }
                if !root && !norm_of_root.is_finite() {
                    break Stop::NonFinite {
                        step: step + 1,
                        what: format!("gradient norm {norm_of_root}"),
                    };
                }
            }
            if !norm.is_finite() {
                break Stop::NonFinite {
                    step: step + 1,
                    what: format!("gradient norm {norm}"),
                };
            }
            if let Some(p) = &mut peers
                && let Err(e) = p.update(&learner.model())
            {
                break Stop::Failed(format!("step {}: {e:#}", step + 1));
            }
            step += 1;
            stats.seconds = t0.elapsed().as_secs_f64();
            if whole_step {
                let progress = Progress::new(
                    (step - 1) % every * c.grad_accum + c.grad_accum,
                    every.min(c.max_steps - (interval - 1) * every) * c.grad_accum,
                );
                ctx.processor
                    .process_train(LearnerEvent::ProcessedItem(TrainingItem::new(
                        stats,
                        progress,
                        Progress::new(interval, intervals),
                        Some(step),
                        Some(lr),
                    )));
            }

            if root {
                let mut record = Record::from_stats("train", step, &stats, self.elapsed());
                record.lr = Some(lr);
                record.grad_norm = Some(norm);
                if self.plain {
                    eprintln!("{}", progress_line(&record, c.max_steps));
                }
                if let Err(e) = self.append_log(record) {
                    break Stop::Failed(format!("{e:#}"));
                }
            }

            let interval_end = step.is_multiple_of(every) || step == c.max_steps;
            let stopping = stopping_now || self.stop_after == Some(step);
            if interval_end {
                ctx.processor
                    .process_train(LearnerEvent::EndEpoch(interval));
            }
            // Skipped when interrupted (the user wants out now); a planned stop evaluates as the
            // uninterrupted run would, so the two logs stay identical.
            if interval_end && self.evaluates && !stopping_now {
                let v = match self.evaluate(
                    &learner,
                    replica.as_ref(),
                    &mut ctx,
                    interval,
                    intervals,
                ) {
                    Ok(v) => v,
                    Err(e) => break Stop::Failed(format!("{e:#}")),
                };
                if root {
                    let record = Record::from_stats("valid", step, &v, self.elapsed());
                    if self.plain {
                        eprintln!(
                            "eval  {step:>5}/{} | held-out loss {:.4} | ppl {:.2} | acc {:.1}% | {} examples",
                            c.max_steps,
                            v.loss(),
                            v.loss().exp(),
                            100.0 * v.correct as f64 / v.targets.max(1) as f64,
                            v.sequences
                        );
                    }
                    if let Err(e) = self.append_log(record) {
                        break Stop::Failed(format!("{e:#}"));
                    }
                }
                last_valid = Some(v);
            }
            if root && (step.is_multiple_of(c.save_every) || step == c.max_steps || stopping) {
                let state = CheckpointState {
                    step,
                    examples_seen: (step * c.sequences_per_step()) as u64,
                    data_fingerprint: Some(self.data_fingerprint),
                    seed: c.seed,
                    max_steps: c.max_steps,
                    train_loss: stats.loss(),
                    valid_loss: last_valid.map(|v| v.loss()),
                };
                match self.checkpoint(&learner, &mut writer, &completion, &store, &state) {
                    Ok(dir) => {
                        if self.plain {
                            eprintln!("saved {}", dir.display());
                        }
                        world.set_last_good(Some(dir.clone()));
                        last_checkpoint = Some(dir);
                    }
                    Err(e) => {
                        // Free what the failed write left (it never counts as a checkpoint).
                        checkpoint::clean_staging(&self.out);
                        let keep = last_checkpoint
                            .as_ref()
                            .map_or("there is no earlier checkpoint".to_string(), |d| {
                                format!("the last good checkpoint is {}", d.display())
                            });
                        break Stop::Failed(format!(
                            "writing the step {step} checkpoint failed: {e:#}; {keep} (free space or fix permissions, then --resume)"
                        ));
                    }
                }
            }
            if self.stop_after == Some(step) {
                break Stop::StoppedAfter(step);
            }
            if stopping_now {
                break Stop::Interrupted(
                    interrupter
                        .get_message()
                        .unwrap_or_else(|| "a stop signal on another rank".into()),
                );
            }
        };
        let sync = peers.as_ref().map(|p| p.cost).or(sync);
        if let Some(c) = &sync
            && c.steps > 0
            && world.is_root()
        {
            eprintln!("{}", c.describe());
        }
        self.finish(stop, step, last_checkpoint, last_valid, sync);
        (learner.model(), processor)
    }
}

/// Sums this process's gradient (`None`: it computed no micro-batch of the step) and step
/// statistics with the other processes', and agrees on stopping: every process gets the step's
/// totals in `stats` and `stopping`, and the summed gradient.
fn sum_across<AB>(
    world: &World,
    model: &CausalLm<AB>,
    grads: Option<burn::optim::GradientsParams>,
    stats: &mut LmStats,
    stopping: &mut bool,
    step: usize,
    cost: &mut SyncCost,
) -> anyhow::Result<burn::optim::GradientsParams>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let t = Instant::now();
    let flat = flatten_grads::<AB, _>(model, grads.unwrap_or_default());
    let device = flat.device();
    let mut host = flat
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading the gradients: {e:?}"))?;
    let mut copy = t.elapsed().as_secs_f64();
    // On rank 0 the gradients' reduction proper: the other ranks have all arrived by then.
    let reduce = world.sum_f32(&mut host, &format!("the gradient sum of step {step}"))?;
    let mut counts: Vec<f64> = stats.to_sums().to_vec();
    counts.push(*stopping as u8 as f64);
    world.sum_f64(&mut counts, &format!("the gradient sum of step {step}"))?;
    *stopping = counts[5] > 0.0;
    *stats = LmStats::from_sums(&counts, stats.seconds);
    let t = Instant::now();
    let n = host.len();
    let summed = burn::tensor::Tensor::<AB::InnerBackend, 1>::from_data(
        burn::tensor::TensorData::new(host, [n]),
        &device,
    );
    let grads = unflatten_grads::<AB, _>(model, summed);
    copy += t.elapsed().as_secs_f64();
    cost.steps += 1;
    cost.values = n;
    cost.all_reduce_s += reduce;
    cost.copy_s += copy;
    Ok(grads)
}

/// What the fault tests make a process do (`PHITUNE_TEST_FAULT=hang:R:S` or `kill:R:S`): rank R
/// stops answering, or is killed (SIGKILL, as a crashed machine), when it reaches the gradient
/// sum of step S (counted from 1 in this run).
fn test_fault(rank: usize, step: usize) {
    use crate::parallel::Fault;
    match crate::parallel::fault_at(rank) {
        Some((Fault::Hang, s)) if s == step => loop {
            std::thread::park();
        },
        Some((Fault::Exit, s)) if s == step => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::process::exit(137)
        }
        _ => {}
    }
}

/// The model's trainable values on the host, f32, in visiting order.
fn host_values<AB: AutodiffBackend>(model: &CausalLm<AB>) -> Vec<f32> {
    flatten_values::<AB, _>(model)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// `model` with the trainable values [`host_values`] read.
fn load_host_values<AB: AutodiffBackend>(model: CausalLm<AB>, values: Vec<f32>) -> CausalLm<AB> {
    let device = burn::module::Module::devices(&model)
        .into_iter()
        .next()
        .unwrap_or_default();
    let n = values.len();
    let flat = burn::tensor::Tensor::<AB::InnerBackend, 1>::from_data(
        burn::tensor::TensorData::new(values, [n]),
        &device,
    );
    load_values::<AB, _>(model, flat)
}

fn progress_line(r: &Record, max_steps: usize) -> String {
    format!(
        "step {:>5}/{max_steps} | loss {:.4} | ppl {:.2} | acc {:.1}% | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | {:.2} s/step",
        r.step,
        r.loss,
        r.perplexity,
        100.0 * r.token_accuracy,
        r.lr.unwrap_or(0.0),
        r.grad_norm.unwrap_or(0.0),
        r.tokens_per_second.unwrap_or(0.0),
        r.seconds,
    )
}
