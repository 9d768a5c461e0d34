//! `train`: the fine-tune (see phitune-train), on the device the flags pick.

use std::io::IsTerminal;

use anyhow::{Result, bail};
use phitune_model::ops::Nf4Backend;

use crate::backend::{DeviceSpec, Job, dispatch};
use crate::cli::TrainArgs;

pub fn run(args: TrainArgs) -> Result<()> {
    let dashboard = !args.no_dashboard && std::io::stdout().is_terminal();
    let (mut device, dtype) = args.device.resolve();
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
    if args.peer_timeout == 0 {
        bail!("--peer-timeout must be at least 1 second");
    }
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
    })?;
    let summary = dispatch(device, dtype, Train(prepared))?;
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
