//! The processes of one run: data parallelism across processes and machines on MPI (feature
//! `mpi`), started by `mpirun` or Slurm's `srun`, one process per device as torchrun does.
//! Without the feature, or without a launcher, a run is one process and every call here is a
//! no-op.
//!
//! What crosses the network is small and happens once per optimizer step: the sum of the ranks'
//! trainable gradients (f32, on the host; phi-2 at r=4 on q/k/v/dense: 2.6 M values, 10.5 MB)
//! with the step's statistics, then rank 0's updated trainable values. Rank 0 alone applies the
//! optimizer and broadcasts the result (as `--devices` does), so the ranks can never drift apart,
//! even on machines whose CPUs round differently, and the optimizer's moments live on rank 0
//! only, which alone writes checkpoints.
//!
//! Every collective call is bounded by `--peer-timeout`. Before each one, every rank tells rank 0
//! it has arrived (a small point-to-point message), and rank 0 waits for those with a deadline,
//! so when a rank has stopped or hangs, rank 0 names it. A watchdog thread bounds the collective
//! itself on every rank. Either way the run ends with one line (the rank, what it was waiting
//! for, the last good checkpoint) and `MPI_Abort`, which takes down the whole job.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

/// An error every rank reaches together (the ranks disagree on a setting, ...): rank 0 prints it,
/// the others exit quietly, so the user reads it once.
#[derive(Debug)]
pub struct SharedError(pub String);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SharedError {}

/// The last complete checkpoint, shared with whatever reports faults (the signal handler).
#[derive(Clone, Default, Debug)]
pub struct LastGood(Arc<Mutex<Option<PathBuf>>>);

impl LastGood {
    /// "the last good checkpoint is ... (continue with --resume)", or that there is none yet.
    pub fn line(&self) -> String {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(d) => format!(
                "the last good checkpoint is {} (continue with --resume)",
                d.display()
            ),
            None => "there is no checkpoint yet".into(),
        }
    }
}

/// This process's place in the run.
pub struct World {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::Mpi>,
    /// The last checkpoint rank 0 completed: what the fault lines name.
    last_good: LastGood,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

/// The launcher's environment variables that say this process is one of several.
fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE", // Open MPI's mpirun
        "PMI_SIZE",             // MPICH / Intel MPI (hydra), Slurm's PMI-2
        "PMIX_RANK",            // PMIx launchers: Open MPI 5, Slurm's srun --mpi=pmix
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// This process's index among the ranks on its machine, from the launcher (0 without one).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "PMI_LOCAL_RANK",
        "SLURM_LOCALID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

impl World {
    /// One process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
            last_good: LastGood::default(),
        }
    }

    /// The launcher's processes when this one was started by `mpirun` / `srun` (with the `mpi`
    /// feature), else one process. `timeout` bounds every wait on another rank.
    pub fn from_launcher(timeout: Duration) -> Result<Self> {
        if !launched_by_mpi() {
            return Ok(Self::single());
        }
        #[cfg(feature = "mpi")]
        {
            let mpi = mpi_world::Mpi::init(timeout)?;
            let (rank, size) = (mpi.rank(), mpi.size());
            Ok(Self {
                rank,
                size,
                mpi: Some(mpi),
                last_good: LastGood::default(),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            anyhow::bail!(
                "started by an MPI launcher (mpirun/srun), but this binary was built without MPI: rebuild with `--features mpi`"
            )
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Several processes.
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    /// Ends the whole job at once (`MPI_Abort`) after a failure only this process knows of,
    /// rather than leaving the other ranks to time out; one process: exits.
    pub fn abort(&self) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort()
        }
        std::process::exit(1)
    }

    /// Records the last complete checkpoint (rank 0), for the fault lines.
    pub fn set_last_good(&self, dir: Option<PathBuf>) {
        if let Ok(mut g) = self.last_good.0.lock() {
            *g = dir;
        }
    }

    /// The last complete checkpoint, as the fault lines name it (shareable across threads).
    pub fn last_good(&self) -> LastGood {
        self.last_good.clone()
    }

    /// Element-wise sum over the ranks, in place (every rank gets the sum). Returns the
    /// seconds the reduction itself took here once every rank had arrived (on rank 0, which
    /// waits for the others' arrival first, that is the reduction's own cost).
    pub fn sum_f32(&self, buf: &mut [f32], what: &str) -> Result<f64> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.sum_f32(buf, what, &|| self.last_good.line());
        }
        let _ = (buf, what);
        Ok(0.0)
    }

    /// Element-wise sum over the ranks, in place.
    pub fn sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.sum_f64(buf, what, &|| self.last_good.line());
        }
        let _ = (buf, what);
        Ok(())
    }

    /// Rank 0's `buf` (whatever its length) on every rank.
    pub fn broadcast_f32(&self, buf: &mut Vec<f32>, what: &str) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.broadcast_f32(buf, what, &|| self.last_good.line());
        }
        let _ = (buf, what);
        Ok(())
    }

    /// Rank 0's bytes on every rank.
    pub fn broadcast_bytes(&self, bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        self.broadcast_bytes_from(0, bytes, what)
    }

    /// Rank `from`'s bytes on every rank.
    pub fn broadcast_bytes_from(&self, from: usize, bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.broadcast_bytes(from, bytes, what, &|| self.last_good.line());
        }
        let _ = (from, what);
        Ok(bytes)
    }

    /// Settles a check that each rank made on its own: `mine` is this rank's complaint (None if
    /// it has none). When any rank has one, every rank returns the lowest such rank's, as a
    /// [`SharedError`] (printed once, by rank 0).
    pub fn agree(&self, mine: Option<String>, what: &str) -> Result<()> {
        if !self.is_distributed() {
            return match mine {
                Some(m) => Err(SharedError(m).into()),
                None => Ok(()),
            };
        }
        // The lowest complaining rank, by a sum of one-hot flags.
        let mut flags = vec![0f64; self.size];
        if mine.is_some() {
            flags[self.rank] = 1.0;
        }
        self.sum_f64(&mut flags, what)?;
        let Some(first) = flags.iter().position(|&f| f > 0.0) else {
            return Ok(());
        };
        let msg = self.broadcast_bytes_from(first, mine.unwrap_or_default().into_bytes(), what)?;
        Err(SharedError(String::from_utf8_lossy(&msg).into_owned()).into())
    }
}

#[cfg(feature = "mpi")]
mod mpi_world {
    //! The MPI side: rsmpi over `MPI_COMM_WORLD`, every call bounded.

    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow, bail};
    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use mpi::environment::{Threading, Universe};
    use mpi::point_to_point::{Destination, Source};
    use mpi::topology::{Communicator, SimpleCommunicator};

    /// The tag of the "arrived" messages.
    const ARRIVED: i32 = 7;

    /// What the watchdog is waiting on: (deadline, the line to print if it passes).
    type Armed = Arc<Mutex<Option<(Instant, String)>>>;

    pub struct Mpi {
        _universe: Universe,
        timeout: Duration,
        /// Collective calls made so far (the same count on every rank).
        calls: Mutex<u64>,
        armed: Armed,
        _stop: Sender<()>,
    }

    impl Mpi {
        pub fn init(timeout: Duration) -> Result<Self> {
            let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
                .ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
            let armed: Armed = Arc::new(Mutex::new(None));
            let (stop, stopped) = channel();
            // The watchdog aborts the job from its own thread, which MPI allows with
            // MPI_THREAD_MULTIPLE; a library without it gets an exit instead (the launcher then
            // ends the other ranks).
            let abort_allowed = threading == Threading::Multiple;
            let watched = armed.clone();
            std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || watchdog(watched, stopped, abort_allowed))?;
            Ok(Self {
                _universe: universe,
                timeout,
                calls: Mutex::new(0),
                armed,
                _stop: stop,
            })
        }

        /// `MPI_COMM_WORLD` (a handle, made on demand: rsmpi's communicators are not `Send`).
        fn comm(&self) -> SimpleCommunicator {
            SimpleCommunicator::world()
        }

        pub fn rank(&self) -> usize {
            self.comm().rank() as usize
        }

        pub fn size(&self) -> usize {
            self.comm().size() as usize
        }

        /// The preamble of every collective: announces this rank to rank 0 and, on rank 0,
        /// waits (bounded) for every other rank's announcement; then arms the watchdog for the
        /// collective itself.
        fn arrive(&self, what: &str, last_good: &dyn Fn() -> String) -> Result<()> {
            let call = {
                let mut c = self
                    .calls
                    .lock()
                    .map_err(|_| anyhow!("MPI state poisoned"))?;
                *c += 1;
                *c
            };
            let (rank, size) = (self.rank(), self.size());
            if rank != 0 {
                self.comm().process_at_rank(0).send_with_tag(&call, ARRIVED);
            } else {
                let start = Instant::now();
                let mut arrived = vec![false; size];
                arrived[0] = true;
                while arrived.iter().any(|a| !a) {
                    let mut progressed = false;
                    for (r, done) in arrived.iter_mut().enumerate().skip(1) {
                        let comm = self.comm();
                        let p = comm.process_at_rank(r as i32);
                        if !*done && p.immediate_probe_with_tag(ARRIVED).is_some() {
                            let (theirs, _) = p.receive_with_tag::<u64>(ARRIVED);
                            if theirs != call {
                                bail!(
                                    "rank {r} is at call {theirs} of the run's collectives, rank 0 at {call} ({what}): the ranks are running different programs"
                                );
                            }
                            *done = true;
                            progressed = true;
                        }
                    }
                    if !progressed {
                        if start.elapsed() >= self.timeout {
                            let missing: Vec<String> = arrived
                                .iter()
                                .enumerate()
                                .filter(|(_, a)| !**a)
                                .map(|(r, _)| r.to_string())
                                .collect();
                            let line = format!(
                                "rank {} did not reach {what} within {} s (it stopped or hangs); {}",
                                missing.join(", rank "),
                                self.timeout.as_secs_f64(),
                                last_good()
                            );
                            fail(&self.comm(), &line, true);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
            // Rank 0 can name a missing rank (it waited for the announcements above): the
            // others wait longer, so that rank 0's line comes first; they speak only when rank
            // 0 itself is gone or stuck.
            let (limit, line) = if rank == 0 {
                (
                    self.timeout,
                    format!(
                        "rank 0: {what} did not complete within {} s after every rank arrived; {}",
                        self.timeout.as_secs_f64(),
                        last_good()
                    ),
                )
            } else {
                let limit = self.timeout * 2 + Duration::from_secs(5);
                (
                    limit,
                    format!(
                        "rank {rank}: {what} did not complete within {} s (rank 0 stopped or hangs); continue from the last checkpoint in rank 0's --out with --resume",
                        limit.as_secs_f64()
                    ),
                )
            };
            if let Ok(mut a) = self.armed.lock() {
                *a = Some((Instant::now() + limit, line));
            }
            Ok(())
        }

        pub fn abort(&self) -> ! {
            self.comm().abort(1)
        }

        fn done(&self) {
            if let Ok(mut a) = self.armed.lock() {
                *a = None;
            }
        }

        pub fn sum_f32(
            &self,
            buf: &mut [f32],
            what: &str,
            last: &dyn Fn() -> String,
        ) -> Result<f64> {
            self.arrive(what, last)?;
            let send = buf.to_vec();
            let t = Instant::now();
            self.comm()
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            let took = t.elapsed().as_secs_f64();
            self.done();
            Ok(took)
        }

        pub fn sum_f64(
            &self,
            buf: &mut [f64],
            what: &str,
            last: &dyn Fn() -> String,
        ) -> Result<()> {
            self.arrive(what, last)?;
            let send = buf.to_vec();
            self.comm()
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            self.done();
            Ok(())
        }

        pub fn broadcast_f32(
            &self,
            buf: &mut Vec<f32>,
            what: &str,
            last: &dyn Fn() -> String,
        ) -> Result<()> {
            self.arrive(what, last)?;
            let comm = self.comm();
            let root = comm.process_at_rank(0);
            let mut len = buf.len() as u64;
            root.broadcast_into(&mut len);
            buf.resize(len as usize, 0.0);
            root.broadcast_into(&mut buf[..]);
            self.done();
            Ok(())
        }

        pub fn broadcast_bytes(
            &self,
            from: usize,
            mut bytes: Vec<u8>,
            what: &str,
            last: &dyn Fn() -> String,
        ) -> Result<Vec<u8>> {
            self.arrive(what, last)?;
            let comm = self.comm();
            let root = comm.process_at_rank(from as i32);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
            self.done();
            Ok(bytes)
        }
    }

    /// Prints `line` (one line, as every error of the CLI) and ends the whole job.
    fn fail(world: &SimpleCommunicator, line: &str, abort_allowed: bool) -> ! {
        phitune_model::error::print_error_line(line);
        if abort_allowed {
            world.abort(1)
        }
        std::process::exit(1)
    }

    fn watchdog(armed: Armed, stopped: Receiver<()>, abort_allowed: bool) {
        loop {
            match stopped.recv_timeout(Duration::from_millis(100)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let due = armed
                .lock()
                .ok()
                .and_then(|a| a.as_ref().filter(|(t, _)| Instant::now() >= *t).cloned());
            if let Some((_, line)) = due {
                fail(&SimpleCommunicator::world(), &line, abort_allowed);
            }
        }
    }
}
