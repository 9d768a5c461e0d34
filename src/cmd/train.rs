//! `train`: the fine-tune (see phitune-train), on the device the flags pick.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{Result, bail};
use phitune_model::ops::Nf4Backend;

use crate::backend::{DeviceSpec, Job, dispatch};
use crate::cli::TrainArgs;

pub fn run(args: TrainArgs) -> Result<()> {
    if args.peer_timeout == 0 {
        bail!("--peer-timeout must be at least 1 second");
    }
    // Under mpirun / srun: this process's rank among the run's (one process otherwise).
    let world = Arc::new(phitune_train::World::from_launcher(
        std::time::Duration::from_secs(args.peer_timeout),
    )?);
    let result = run_in(args, world.clone());
    match result {
        // The ranks reached that error together: rank 0 says it, once, and the others wait
        // until it has. The launcher ends the whole job as soon as one rank exits with an
        // error, which could otherwise kill rank 0 before its line is out.
        Err(e) if world.is_distributed() && e.is::<phitune_train::SharedError>() => {
            if world.is_root() {
                phitune_model::error::print_error_line(&crate::one_line(&e));
            }
            let _ = world.sum_f64(&mut [0.0], "the error's report");
            drop(world);
            std::process::exit(1)
        }
        // A failure of this process alone: said here, then the whole job ends (the other ranks
        // would otherwise wait for it until their timeout).
        Err(e) if world.is_distributed() && !e.is::<phitune_train::SharedError>() => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            phitune_model::error::print_error_line(&format!(
                "rank {}: {}",
                world.rank(),
                chain.join(": ").replace('\n', " ")
            ));
            world.abort()
        }
        other => other,
    }
}

fn run_in(args: TrainArgs, world: Arc<phitune_train::World>) -> Result<()> {
    // Under an MPI launcher a rank's stdout is the launcher's forwarding, not the user's
    // terminal (keys never reach it): rank 0 prints plain lines (the whole run's tokens/s).
    let dashboard =
        !args.no_dashboard && std::io::stdout().is_terminal() && !world.is_distributed();
    let (mut device, dtype) = args.device.resolve();
    if world.is_distributed() && args.device.device.is_none() {
        // One process per device, as torchrun: the rank's index on its machine.
        device = device.with_index(phitune_train::world::local_rank());
    }
    let device_indices = match args.devices.split_first() {
        None => Vec::new(),
        Some((&first, rest)) => {
            if let Some(other) = rest
                .iter()
                .find(|d| std::mem::discriminant(*d) != std::mem::discriminant(&first))
            {
                bail!(
                    "--devices mixes {first} and {other}: the ranks of a run share one kind of device"
                );
            }
            device = first;
            args.devices.iter().map(DeviceSpec::index).collect()
        }
    };
    if args.pad_to_multiple == Some(0) {
        bail!("--pad-to-multiple must be at least 1");
    }
    let prepared = phitune_train::prepare(phitune_train::Request {
        config_file: args.config,
        flags: args.flags,
        out: args.out,
        resume: args.resume,
        overwrite: args.overwrite,
        stop_after: args.stop_after,
        dashboard,
        cuda: matches!(device, DeviceSpec::Cuda(_)),
        device_indices,
        peer_timeout: std::time::Duration::from_secs(args.peer_timeout),
        pad_multiple: args.pad_to_multiple.unwrap_or(device.pad_multiple()),
        world: world.clone(),
    })?;
    let summary = dispatch(device, dtype, Train(prepared))?;
    if !world.is_root() {
        return Ok(());
    }
    eprintln!(
        "{}: {} steps; adapter in {}; curves in {}",
        summary.status,
        summary.steps,
        summary.adapter.display(),
        summary.out.join("curves.svg").display()
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

struct Train(phitune_train::Prepared);

impl Job for Train {
    type Output = phitune_train::Summary;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Self::Output> {
        phitune_train::train::<B>(self.0, device)
    }
}
