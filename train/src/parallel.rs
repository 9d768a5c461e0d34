//! Data parallelism over the devices of one process (`train --devices a,b,...`), on Burn's own
//! collective (`burn::collective`, local peers): rank 0 is the training loop itself, every other
//! rank a worker thread with a copy of the model on its device.
//!
//! The mathematics are the single-device run's: an optimizer step's `grad_accum` micro-batches
//! are taken from the one stream in order, micro-batch `k` computed by rank `k % ranks` (each
//! with its own dropout seed from its position, as on one device), each rank sums its
//! micro-batches' gradients, and one all-reduce (a sum, over one flat tensor of every trainable
//! gradient) gives every rank the step's accumulated gradient. Rank 0 clips and applies the
//! optimizer and sends the updated trainable values (one flat tensor again: the LoRA factors,
//! never the frozen base) to the workers; only rank 0 writes anything.
//!
//! Every wait on a peer is bounded (`--peer-timeout`): Burn's collective has no timeouts, so a
//! blocking call runs on a helper thread and, past the limit, `reset_collective` releases the
//! ranks still waiting and the run stops with the rank that did not arrive named.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};
use burn::train::TrainStep;
use phitune_model::ops::Nf4Backend;

use crate::lm::{CausalLm, LmBatch, LmStats};

type Inner<AB> = <AB as AutodiffBackend>::InnerBackend;

enum Work<AB: AutodiffBackend> {
    Batch(LmBatch<AB>),
    /// End of the step's micro-batches: all-reduce, then report.
    Reduce,
    /// The trainable values after the optimizer step, flattened as [`flatten`] does.
    Params(Tensor<Inner<AB>, 1>),
}

/// What a worker reports after each all-reduce: its micro-batches' stats and how long its
/// all-reduce call took.
type Report = std::result::Result<(Vec<LmStats>, f64), String>;

/// What synchronising the ranks cost, summed over the run's optimizer steps.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SyncCost {
    pub steps: usize,
    /// Values in the all-reduced tensor (every trainable parameter, f32).
    pub values: usize,
    /// The all-reduce itself: per step, the shortest call among the ranks (the last rank to
    /// arrive waits for no one, so its call is the reduction's own cost).
    pub all_reduce_s: f64,
    /// Rank 0 flattening the gradients, splitting the sum and sending the updated values.
    pub copy_s: f64,
}

impl SyncCost {
    /// One line for the end of a run.
    pub fn describe(&self) -> String {
        let n = self.steps.max(1) as f64;
        format!(
            "synchronising the ranks: {:.1} ms per optimizer step in the all-reduce of {:.1} MB, {:.1} ms copying (mean over {} steps)",
            1e3 * self.all_reduce_s / n,
            self.values as f64 * 4.0 / 1e6,
            1e3 * self.copy_s / n,
            self.steps
        )
    }
}

struct Worker<AB: AutodiffBackend> {
    work: Sender<Work<AB>>,
    report: Receiver<Report>,
    handle: Option<JoinHandle<()>>,
    /// How many all-reduces this rank has entered (to name the one that did not arrive).
    arrived: Arc<AtomicUsize>,
}

/// The peers of one training run (rank 0 is the caller).
pub struct Peers<AB: AutodiffBackend> {
    workers: Vec<Worker<AB>>,
    devices: Vec<AB::Device>,
    timeout: Duration,
    /// All-reduces rank 0 has entered.
    reduces: usize,
    pub cost: SyncCost,
}

fn config(ranks: usize) -> CollectiveConfig {
    CollectiveConfig::default().with_num_devices(ranks)
}

impl<AB> Peers<AB>
where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    /// Starts one worker per device after the first (rank 0's) and registers every rank with
    /// the collective. `timeout` bounds every wait on a peer.
    pub fn start(
        model: &CausalLm<AB>,
        devices: Vec<AB::Device>,
        timeout: Duration,
    ) -> Result<Self> {
        let ranks = devices.len();
        let mut workers = Vec::new();
        for (rank, device) in devices.iter().enumerate().skip(1) {
            let (work_tx, work_rx) = channel::<Work<AB>>();
            let (report_tx, report_rx) = channel::<Report>();
            let model = model.clone().fork(device);
            let device = device.clone();
            let arrived = Arc::new(AtomicUsize::new(0));
            let seen = arrived.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rank-{rank}"))
                .spawn(move || worker(rank, ranks, device, model, work_rx, report_tx, seen))
                .map_err(|e| anyhow!("cannot start the worker for rank {rank}: {e}"))?;
            workers.push(Worker {
                work: work_tx,
                report: report_rx,
                handle: Some(handle),
                arrived,
            });
        }
        let peers = Self {
            workers,
            devices,
            timeout,
            reduces: 0,
            cost: SyncCost::default(),
        };
        let device = peers.devices[0].clone();
        peers.bounded("registering with the other ranks", move || {
            collective::register::<Inner<AB>>(PeerId::from(0u32), device, config(ranks))
                .map_err(|e| format!("{e:?}"))
        })?;
        Ok(peers)
    }

    pub fn ranks(&self) -> usize {
        self.devices.len()
    }

    /// The rank that computes micro-batch `k` of a step.
    pub fn rank_of(&self, k: usize) -> usize {
        k % self.ranks()
    }

    /// Sends micro-batch to worker `rank` (>= 1).
    pub fn send(&self, rank: usize, batch: LmBatch<AB>) -> Result<()> {
        self.workers[rank - 1]
            .work
            .send(Work::Batch(batch))
            .map_err(|_| anyhow!("rank {rank} has stopped"))
    }

    /// Rank 0's part of the step's end: all-reduces `grads` (rank 0's accumulated gradient, if
    /// it computed any micro-batch) with every worker's, and returns the step's gradient and the
    /// workers' stats (in rank order).
    pub fn all_reduce(
        &mut self,
        model: &CausalLm<AB>,
        grads: Option<GradientsParams>,
    ) -> Result<(GradientsParams, Vec<LmStats>)> {
        for (i, w) in self.workers.iter().enumerate() {
            w.work
                .send(Work::Reduce)
                .map_err(|_| anyhow!("rank {} has stopped", i + 1))?;
        }
        let t = Instant::now();
        let flat = flatten_grads(model, grads.unwrap_or_default());
        let values = flat.dims()[0];
        let mut copy = t.elapsed().as_secs_f64();
        self.reduces += 1;
        let (summed, mut shortest) = self.bounded("the gradient all-reduce", move || {
            let t = Instant::now();
            collective::all_reduce::<Inner<AB>>(
                PeerId::from(0u32),
                flat.into_primitive().tensor(),
                ReduceOperation::Sum,
            )
            .map(|s| {
                let s = Tensor::<Inner<AB>, 1>::from_primitive(TensorPrimitive::Float(s));
                (s, t.elapsed().as_secs_f64())
            })
            .map_err(|e| format!("{e:?}"))
        })?;
        let mut stats = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            match w.report.recv_timeout(self.timeout) {
                Ok(Ok((s, secs))) => {
                    stats.extend(s);
                    shortest = shortest.min(secs);
                }
                Ok(Err(e)) => bail!("rank {}: {e}", i + 1),
                Err(_) => bail!("rank {} did not report within {:?}", i + 1, self.timeout),
            }
        }
        let t = Instant::now();
        let grads = unflatten_grads(model, summed);
        copy += t.elapsed().as_secs_f64();
        self.cost.steps += 1;
        self.cost.values = values;
        self.cost.all_reduce_s += shortest;
        self.cost.copy_s += copy;
        Ok((grads, stats))
    }

    /// Sends the updated trainable values to every worker.
    pub fn update(&mut self, model: &CausalLm<AB>) -> Result<()> {
        let t = Instant::now();
        let values = flatten_values(model);
        for (i, w) in self.workers.iter().enumerate() {
            w.work
                .send(Work::Params(values.clone().to_device(&self.devices[i + 1])))
                .map_err(|_| anyhow!("rank {} has stopped", i + 1))?;
        }
        self.cost.copy_s += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs a blocking collective call on a helper thread and waits at most the timeout, or
    /// until a worker's thread has ended (a crashed rank never arrives); then the collective is
    /// reset (which releases the waiting peers) and the missing rank named.
    fn bounded<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => bail!("{what} failed: {e}"),
                Err(_) => {}
            }
            let dead = self
                .workers
                .iter()
                .any(|w| w.handle.as_ref().is_none_or(JoinHandle::is_finished));
            let late = start.elapsed() >= self.timeout;
            if dead || late {
                // Named before the reset, which makes the ranks that did arrive fail too.
                let missing = self.missing().map_or(String::new(), |m| format!(": {m}"));
                collective::reset_collective::<Inner<AB>>();
                if dead {
                    bail!("{what} stopped{missing}");
                }
                bail!(
                    "{what} timed out after {} s{missing}",
                    self.timeout.as_secs_f64()
                )
            }
        }
    }

    /// The worker to blame, with what it said if it stopped on an error: the first that
    /// stopped before entering the current all-reduce, else the first not in it yet (hung or
    /// slow), else the first that stopped. (A rank that did arrive can stop too, on the error
    /// its all-reduce returns once a peer is gone; a live rank can be late behind a dead one.)
    fn missing(&self) -> Option<String> {
        let (i, w) = self
            .workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let behind = w.arrived.load(Ordering::SeqCst) < self.reduces;
                let stopped = w.handle.as_ref().is_none_or(JoinHandle::is_finished);
                let blame = match (stopped, behind) {
                    (true, true) => 0,
                    (false, true) => 1,
                    (true, false) => 2,
                    (false, false) => return None,
                };
                Some((blame, i, w))
            })
            .min_by_key(|&(blame, i, _)| (blame, i))
            .map(|(_, i, w)| (i, w))?;
        Some(match w.report.try_recv() {
            Ok(Err(e)) => format!("rank {} did not arrive: {e}", i + 1),
            _ => format!("rank {} did not arrive", i + 1),
        })
    }
}

impl<AB: AutodiffBackend> Drop for Peers<AB> {
    fn drop(&mut self) {
        // Closing the channels ends each worker's loop; a worker stuck in a call is left behind
        // (the process ends without it) after a short grace.
        let handles: Vec<_> = self
            .workers
            .drain(..)
            .filter_map(|mut w| w.handle.take())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(1);
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        collective::reset_collective::<Inner<AB>>();
    }
}

/// What the fault tests make a worker do (`PHITUNE_TEST_FAULT=hang:R:S` or `exit:R:S`): rank R
/// (a worker, R >= 1) stops answering, or its thread ends as a crashed device's would, when it
/// reaches the all-reduce of step S (counted from 1 in this run).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    Hang,
    Exit,
}

pub(crate) fn fault_at(rank: usize) -> Option<(Fault, usize)> {
    let v = std::env::var("PHITUNE_TEST_FAULT").ok()?;
    let mut it = v.split(':');
    let kind = match it.next()? {
        "hang" => Fault::Hang,
        "exit" | "kill" => Fault::Exit,
        _ => return None,
    };
    let r: usize = it.next()?.parse().ok()?;
    let s: usize = it.next()?.parse().ok()?;
    (r == rank).then_some((kind, s))
}

fn worker<AB>(
    rank: usize,
    ranks: usize,
    device: AB::Device,
    mut model: CausalLm<AB>,
    work: Receiver<Work<AB>>,
    report: Sender<Report>,
    arrived: Arc<AtomicUsize>,
) where
    AB: AutodiffBackend + Nf4Backend,
    AB::InnerBackend: Nf4Backend,
{
    let peer = PeerId::from(rank as u32);
    if let Err(e) = collective::register::<Inner<AB>>(peer, device.clone(), config(ranks)) {
        let _ = report.send(Err(format!("registering: {e:?}")));
        return;
    }
    let fault = fault_at(rank);
    let mut acc = GradientsAccumulator::new();
    let mut any = false;
    let mut stats = Vec::new();
    while let Ok(w) = work.recv() {
        match w {
            Work::Batch(batch) => {
                let batch = batch.to_device(&device);
                let t = Instant::now();
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    TrainStep::step(&model, batch)
                }));
                let Ok(out) = out else {
                    let _ = report.send(Err("its training step panicked".into()));
                    return;
                };
                acc.accumulate(&model, out.grads);
                any = true;
                let mut item = out.item;
                item.seconds = t.elapsed().as_secs_f64();
                stats.push(item);
            }
            Work::Reduce => {
                match fault {
                    Some((f, s)) if s == arrived.load(Ordering::SeqCst) + 1 => {
                        if f == Fault::Exit {
                            let _ = report.send(Err("it stopped (test fault)".into()));
                            return;
                        }
                        // Gone silent: only the end of the process ends this thread.
                        loop {
                            std::thread::park();
                        }
                    }
                    _ => {}
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                let grads = any.then(|| acc.grads());
                any = false;
                let flat = flatten_grads(&model, grads.unwrap_or_default());
                let t = Instant::now();
                let r = collective::all_reduce::<Inner<AB>>(
                    peer,
                    flat.into_primitive().tensor(),
                    ReduceOperation::Sum,
                );
                let secs = t.elapsed().as_secs_f64();
                let msg = match r {
                    Ok(_) => Ok((std::mem::take(&mut stats), secs)),
                    Err(e) => Err(format!("all-reduce: {e:?}")),
                };
                let failed = msg.is_err();
                if report.send(msg).is_err() || failed {
                    return;
                }
            }
            Work::Params(values) => model = load_values(model, values),
        }
    }
    let _ = collective::finish_collective::<Inner<AB>>(peer);
}

/// Whether the optimizer updates this parameter (the LoRA factors; never the frozen base).
fn trainable<B: burn::tensor::backend::Backend, const D: usize>(
    param: &Param<Tensor<B, D>>,
) -> bool {
    param.val().is_require_grad()
}

/// Every trainable parameter's gradient (zeros where there is none) as f32, flattened in the
/// module's visiting order: the same order on every rank.
pub(crate) fn flatten_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    mut grads: GradientsParams,
) -> Tensor<Inner<AB>, 1> {
    struct Flatten<'a, AB: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        parts: Vec<Tensor<Inner<AB>, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Flatten<'_, AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if !trainable(param) {
                return;
            }
            let n = param.shape().num_elements();
            let g = match self.grads.remove::<Inner<AB>, D>(param.id) {
                Some(g) => g.reshape([n]).cast(FloatDType::F32),
                None => Tensor::<Inner<AB>, 1>::zeros([n], &param.val().inner().device())
                    .cast(FloatDType::F32),
            };
            self.parts.push(g);
        }
    }
    let mut v = Flatten::<AB> {
        grads: &mut grads,
        parts: Vec::new(),
    };
    model.visit(&mut v);
    Tensor::cat(v.parts, 0)
}

/// The inverse of [`flatten_grads`]: the step's gradients, keyed by this rank's parameter ids.
pub(crate) fn unflatten_grads<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
    flat: Tensor<Inner<AB>, 1>,
) -> GradientsParams {
    struct Split<AB: AutodiffBackend> {
        flat: Tensor<Inner<AB>, 1>,
        at: usize,
        grads: GradientsParams,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Split<AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if !trainable(param) {
                return;
            }
            let shape = param.shape();
            let n = shape.num_elements();
            let dtype = param.val().dtype();
            let g = self
                .flat
                .clone()
                .narrow(0, self.at, n)
                .reshape(shape)
                .cast(dtype);
            self.at += n;
            self.grads.register::<Inner<AB>, D>(param.id, g);
        }
    }
    let mut v = Split::<AB> {
        flat,
        at: 0,
        grads: GradientsParams::new(),
    };
    model.visit(&mut v);
    v.grads
}

/// Every trainable parameter's value as f32, flattened in the module's visiting order.
pub(crate) fn flatten_values<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: &M,
) -> Tensor<Inner<AB>, 1> {
    struct Values<AB: AutodiffBackend> {
        parts: Vec<Tensor<Inner<AB>, 1>>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Values<AB> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if trainable(param) {
                let n = param.shape().num_elements();
                self.parts
                    .push(param.val().inner().reshape([n]).cast(FloatDType::F32));
            }
        }
    }
    let mut v = Values::<AB> { parts: Vec::new() };
    model.visit(&mut v);
    Tensor::cat(v.parts, 0)
}

/// Replaces `model`'s trainable values by those of [`flatten_values`] (same ids, still trainable).
pub(crate) fn load_values<AB: AutodiffBackend, M: AutodiffModule<AB>>(
    model: M,
    flat: Tensor<Inner<AB>, 1>,
) -> M {
    struct Load<AB: AutodiffBackend> {
        flat: Tensor<Inner<AB>, 1>,
        at: usize,
    }
    impl<AB: AutodiffBackend> ModuleMapper<AB> for Load<AB> {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<AB, D>>,
        ) -> Param<Tensor<AB, D>> {
            if !trainable(&param) {
                return param;
            }
            let shape = param.shape();
            let n = shape.num_elements();
            let dtype = param.val().dtype();
            let value = self
                .flat
                .clone()
                .narrow(0, self.at, n)
                .reshape(shape)
                .cast(dtype);
            self.at += n;
            param.map(|_| Tensor::from_inner(value).require_grad())
        }
    }
    model.map(&mut Load::<AB> { flat, at: 0 })
}
