//! Fine-tuning Phi-2 with QLoRA on burn-train's Learner: configuration and presets, the
//! learning-rate schedule, the training objective, the step loop (global-norm clipping,
//! step-granular evaluation and checkpoints, exact resume), metrics and curves, and the
//! held-out evaluation with generation.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod dashboard;
pub mod eval;
pub mod f1;
pub mod hits;
pub mod lm;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod step_loop;
pub mod stream;
pub mod world;

pub use config::{Preset, QuantMode, TrainConfig, TrainFlags};
pub use run::{Prepared, Request, Summary, prepare, train};
pub use world::{SharedError, World};
