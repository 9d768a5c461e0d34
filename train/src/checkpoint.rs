//! Step checkpoints that survive being killed at any moment.
//!
//! A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding the adapter in PEFT's format
//! (usable as-is with `--adapter`), the Learner's model, optimizer and scheduler records in full
//! precision (so a resumed run continues bit for bit) and `state.json` (step, data position,
//! seed). It is assembled in a hidden staging directory and renamed into place only when every
//! file is written and synced: a directory named `step-*` is always complete. Old checkpoints
//! are renamed away before they are deleted, for the same reason.
//!
//! The Learner's records go through burn-train's `Checkpointer` interface (`RecordFile`), which
//! runs each save on its own thread; the step loop waits for all of them before committing.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use burn::train::checkpoint::{
    Checkpointer, CheckpointerError, CheckpointingAction, CheckpointingStrategy,
};
use burn::train::metric::store::EventStoreClient;
use serde::{Deserialize, Serialize};

pub const MODEL: &str = "model";
pub const OPTIM: &str = "optim";
pub const SCHEDULER: &str = "scheduler";
pub const STATE: &str = "state.json";
const RECORDS: [&str; 3] = [MODEL, OPTIM, SCHEDULER];
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

pub type FullRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// What the step loop needs, besides the records, to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Examples consumed from the training stream (its position).
    pub examples_seen: u64,
    /// Dropout masks and the data order derive from this and the position.
    pub seed: u64,
    /// Fingerprint of the tokenized training examples: a resumed run must see the same data.
    #[serde(default)]
    pub data_fingerprint: Option<u64>,
    pub max_steps: usize,
    pub train_loss: f64,
    pub valid_loss: Option<f64>,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

pub fn step_dir(out: &Path, step: usize) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:08}"))
}

pub fn staging_dir(out: &Path, step: usize) -> PathBuf {
    checkpoints_dir(out).join(format!(".step-{step:08}.tmp"))
}

/// Committed checkpoints, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(out)) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest checkpoint whose files are all present.
pub fn latest(out: &Path) -> Option<(usize, PathBuf)> {
    list(out)
        .into_iter()
        .rev()
        .find(|(_, dir)| is_complete(dir))
}

pub fn is_complete(dir: &Path) -> bool {
    dir.join(STATE).is_file()
        && RECORDS
            .iter()
            .all(|r| dir.join(format!("{r}.mpk")).is_file())
        && ADAPTER_FILES.iter().all(|f| dir.join(f).is_file())
}

/// FNV-1a over the examples' token ids and labels, in order.
pub fn data_fingerprint(examples: &[phitune_data::prompt::Example]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(examples.len() as u64);
    for e in examples {
        eat(e.input_ids.len() as u64);
        e.input_ids.iter().for_each(|&t| eat(t as u64));
        e.labels.iter().for_each(|&l| eat(l as u64));
    }
    h
}

pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// Loads one of the Learner's records from a committed checkpoint.
pub fn load_record<R: Record<B>, B: Backend>(
    dir: &Path,
    name: &str,
    device: &B::Device,
) -> Result<R> {
    let path = dir.join(format!("{name}.mpk"));
    FullRecorder::new()
        .load(path.clone(), device)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))
}

/// A burn-train `Checkpointer` writing one record into the staging directory of the step
/// being saved, reporting completion (or the error) to the step loop.
pub struct RecordFile {
    out: PathBuf,
    name: &'static str,
    done: Mutex<Sender<std::result::Result<(), String>>>,
}

impl RecordFile {
    pub fn new(
        out: &Path,
        name: &'static str,
        done: Sender<std::result::Result<(), String>>,
    ) -> Self {
        Self {
            out: out.to_path_buf(),
            name,
            done: Mutex::new(done),
        }
    }

    fn write<R: Record<B>, B: Backend>(
        &self,
        step: usize,
        record: R,
    ) -> std::result::Result<(), String> {
        let path = staging_dir(&self.out, step).join(format!("{}.mpk", self.name));
        FullRecorder::new()
            .record(record, path.clone())
            .map_err(|e| format!("{}: {}", path.display(), one_line(&e.to_string())))?;
        sync_file(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl<R: Record<B>, B: Backend> Checkpointer<R, B> for RecordFile {
    fn save(&self, step: usize, record: R) -> std::result::Result<(), CheckpointerError> {
        // Errors go to the step loop, which stops the run cleanly; returning one here would
        // make burn-train's checkpointer thread panic.
        let result = self.write::<R, B>(step, record);
        if let Ok(done) = self.done.lock() {
            let _ = done.send(result);
        }
        Ok(())
    }

    fn delete(&self, _step: usize) -> std::result::Result<(), CheckpointerError> {
        Ok(()) // retention is handled by `commit`
    }

    fn restore(
        &self,
        step: usize,
        device: &B::Device,
    ) -> std::result::Result<R, CheckpointerError> {
        let path = step_dir(&self.out, step).join(format!("{}.mpk", self.name));
        FullRecorder::new()
            .load(path, device)
            .map_err(CheckpointerError::RecorderError)
    }
}

/// Save on every request: the step loop decides when.
pub struct EveryRequest;

impl CheckpointingStrategy for EveryRequest {
    fn checkpointing(
        &mut self,
        _step: usize,
        _store: &EventStoreClient,
    ) -> Vec<CheckpointingAction> {
        vec![CheckpointingAction::Save]
    }
}

/// Collects the record writers' reports for one checkpoint.
pub struct Completion {
    rx: Receiver<std::result::Result<(), String>>,
}

impl Completion {
    pub fn channel() -> (Sender<std::result::Result<(), String>>, Self) {
        let (tx, rx) = channel();
        (tx, Self { rx })
    }

    /// Waits for the three records of a checkpoint.
    pub fn wait(&self) -> Result<()> {
        let mut first_err = None;
        for _ in 0..RECORDS.len() {
            match self.rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => bail!("the checkpoint writer stopped unexpectedly"),
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => bail!("writing checkpoint: {e}"),
        }
    }
}

/// Prepares an empty staging directory for `step`.
pub fn begin(out: &Path, step: usize) -> Result<PathBuf> {
    let dir = staging_dir(out, step);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| dir.display().to_string())?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes `state.json`, syncs, renames the staging directory into place, then retires all but
/// the newest `keep` checkpoints.
pub fn commit(out: &Path, state: &CheckpointState, keep: usize) -> Result<PathBuf> {
    let staging = staging_dir(out, state.step);
    test_delay();
    for f in ADAPTER_FILES {
        sync_file(&staging.join(f)).with_context(|| staging.join(f).display().to_string())?;
    }
    test_failure(state.step).with_context(|| staging.join(STATE).display().to_string())?;
    write_synced(
        &staging.join(STATE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    sync_dir(&staging);
    test_delay();
    let dir = step_dir(out, state.step);
    if dir.exists() {
        // A checkpoint of the same step from an earlier attempt: replace it.
        retire(&dir)?;
    }
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))?;
    sync_dir(&checkpoints_dir(out));
    let all = list(out);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        retire(old)?;
    }
    Ok(dir)
}

/// Removes leftovers of interrupted writes and deletions.
pub fn clean_staging(out: &Path) {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(out)) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".old")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Renames a checkpoint away (atomic: it stops counting as a checkpoint at once), then deletes it.
fn retire(dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let gone = dir.with_file_name(format!(".{name}.old"));
    if gone.exists() {
        let _ = std::fs::remove_dir_all(&gone);
    }
    std::fs::rename(dir, &gone).with_context(|| format!("retiring {}", dir.display()))?;
    test_delay();
    std::fs::remove_dir_all(&gone).with_context(|| format!("deleting {}", gone.display()))
}

/// For the kill test: `PHITUNE_TEST_CHECKPOINT_DELAY_MS` widens the windows between the steps
/// of writing and retiring a checkpoint, so that a random kill lands inside them often.
fn test_delay() {
    if let Some(ms) = std::env::var("PHITUNE_TEST_CHECKPOINT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// For the disk-full test: `PHITUNE_TEST_CHECKPOINT_FAIL_STEP=N` makes writing step N's
/// checkpoint fail as a full disk does (ENOSPC), after its weights were written.
fn test_failure(step: usize) -> std::io::Result<()> {
    let fail = std::env::var("PHITUNE_TEST_CHECKPOINT_FAIL_STEP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if fail == Some(step) {
        return Err(std::io::Error::from_raw_os_error(28));
    }
    Ok(())
}

/// Writes a file through a temporary name and a rename, synced.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    sync_file(&tmp).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn sync_dir(dir: &Path) {
    // Best effort: not every platform can open a directory for syncing.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Shared slot the step loop and the caller use to exchange the run's outcome.
pub type Shared<T> = Arc<Mutex<T>>;
