//! `phitune-train`: fine-tuning Phi-2 with QLoRA on burn-train's Learner: configuration and
//! presets, preparing a run (`prepare.rs`) and running it (`run.rs`), the learning-rate schedule,
//! the training objective, the step loop (global-norm clipping, step-granular evaluation and
//! checkpoints, exact resume), data parallelism over devices and MPI ranks, metrics and curves,
//! and the held-out evaluation with generation and Hits@1. Built on `phitune-model` and
//! `phitune-data`; the binary chooses the backend. See ARCHITECTURE.md at the repository's root
//! for the map of the whole workspace.
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
pub mod prepare;
pub mod run;
pub mod schedule;
pub mod step_loop;
pub mod stream;
pub mod world;

pub use config::{Preset, QuantMode, TrainConfig, TrainFlags};
pub use prepare::{Prepared, Request, prepare};
pub use run::{Summary, train};
pub use world::{SharedError, World};
