//! Everything resolved on the host before a device is touched: the settings (config file, flags,
//! preset, resume), the output directory, the model files and the data, agreed by every rank of a
//! distributed run (`settle`). [`crate::run`] takes the [`Prepared`] run from here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use phitune_data::batch::ExampleDataset;
use phitune_data::prompt::Example;
use phitune_data::split::{Split, split_of};
use phitune_data::{LoadOptions, load_source};
use phitune_model::{Checkpoint, PhiTokenizer};

use crate::checkpoint;
use crate::config::{Preset, TrainConfig, TrainFlags};
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
    /// [`LmBatcher::pad_multiple`](crate::lm::LmBatcher::pad_multiple)): 64 on GPUs, 1 on the CPU.
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
pub(crate) fn settle<T>(world: &World, local: Result<T>, what: &str) -> Result<T> {
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
