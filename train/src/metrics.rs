//! What the dashboard shows (burn-train `Metric`s over [`LmStats`]) and what the run leaves
//! behind (`metrics.jsonl`, one line per optimizer step and per evaluation).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};
use serde::{Deserialize, Serialize};

use crate::lm::LmStats;

impl Adaptor<LmStats> for LmStats {
    fn adapt(&self) -> LmStats {
        *self
    }
}

fn numeric(unit: Option<&str>, higher_is_better: bool) -> MetricAttributes {
    NumericAttributes {
        unit: unit.map(str::to_string),
        higher_is_better,
    }
    .into()
}

macro_rules! numeric_metric {
    ($ty:ident, $name:literal, $unit:expr, $higher:expr, |$s:ident| ($value:expr, $weight:expr), $precision:expr) => {
        #[derive(Clone)]
        pub struct $ty {
            name: MetricName,
            state: NumericMetricState,
        }

        impl Default for $ty {
            fn default() -> Self {
                Self {
                    name: Arc::new($name.to_string()),
                    state: NumericMetricState::new(),
                }
            }
        }

        impl Metric for $ty {
            type Input = LmStats;

            fn name(&self) -> MetricName {
                self.name.clone()
            }

            fn attributes(&self) -> MetricAttributes {
                numeric($unit, $higher)
            }

            fn update(&mut self, $s: &LmStats, _: &MetricMetadata) -> SerializedEntry {
                let mut format = FormatOptions::new(self.name.clone()).precision($precision);
                if let Some(unit) = $unit {
                    format = format.unit(unit);
                }
                self.state.update($value, $weight, format)
            }

            fn clear(&mut self) {
                self.state.reset();
            }
        }

        impl Numeric for $ty {
            fn value(&self) -> NumericEntry {
                self.state.current_value()
            }
            fn running_value(&self) -> NumericEntry {
                self.state.running_value()
            }
        }
    };
}

numeric_metric!(
    Loss,
    "Loss",
    None::<&str>,
    false,
    |s| (s.loss(), s.targets.max(1)),
    4
);
numeric_metric!(
    Perplexity,
    "Perplexity",
    None::<&str>,
    false,
    |s| (s.loss().exp(), s.targets.max(1)),
    2
);
numeric_metric!(
    TokenAccuracy,
    "Token accuracy",
    Some("%"),
    true,
    |s| (
        100.0 * s.correct as f64 / s.targets.max(1) as f64,
        s.targets.max(1)
    ),
    2
);
numeric_metric!(
    TokensPerSecond,
    "Tokens per second",
    Some("tok/s"),
    true,
    |s| (
        if s.seconds > 0.0 {
            s.tokens as f64 / s.seconds
        } else {
            0.0
        },
        1
    ),
    1
);
numeric_metric!(
    HostMemory,
    "Host memory",
    Some("GiB"),
    false,
    |_s| (resident_gib(), 1),
    2
);
/// Resident set size of this process (Linux; 0 elsewhere).
pub fn resident_gib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1u64 << 30) as f64
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// "train" (one optimizer step) or "valid" (one evaluation).
    pub split: String,
    pub step: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub token_accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    pub tokens: usize,
    pub sequences: usize,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_second: Option<f64>,
    /// Seconds since the (first) start of the run.
    pub elapsed: f64,
}

impl Record {
    pub fn from_stats(split: &str, step: usize, s: &LmStats, elapsed: f64) -> Self {
        Self {
            split: split.into(),
            step,
            loss: s.loss(),
            perplexity: s.loss().exp(),
            token_accuracy: s.correct as f64 / s.targets.max(1) as f64,
            lr: None,
            grad_norm: None,
            tokens: s.tokens,
            sequences: s.sequences,
            seconds: s.seconds,
            tokens_per_second: (s.seconds > 0.0).then(|| s.tokens as f64 / s.seconds),
            elapsed,
        }
    }
}

/// `metrics.jsonl`, appended one line at a time and flushed, so it is current while the run
/// goes and complete up to the last step when it stops for any reason.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    pub records: Vec<Record>,
}

impl MetricsLog {
    /// Opens the log, keeping only complete lines up to `keep_through` (the step of the
    /// checkpoint a resumed run starts from; the steps after it will be run again).
    pub fn open(path: &Path, keep_through: usize) -> Result<Self> {
        let mut records = Vec::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(r) = serde_json::from_str::<Record>(line)
                    && r.step <= keep_through
                {
                    records.push(r);
                }
            }
        }
        let mut body = String::new();
        for r in &records {
            body.push_str(&serde_json::to_string(r)?);
            body.push('\n');
        }
        crate::checkpoint::write_synced(path, body.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| path.display().to_string())?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            records,
        })
    }

    pub fn append(&mut self, r: Record) -> Result<()> {
        let mut line = serde_json::to_string(&r)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.records.push(r);
        Ok(())
    }

    /// The elapsed time recorded last (a resumed run continues the clock).
    pub fn elapsed(&self) -> f64 {
        self.records.last().map_or(0.0, |r| r.elapsed)
    }
}

/// Reads a `metrics.jsonl` (for tests and tools).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect()
}
