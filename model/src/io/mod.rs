//! Weights and files: everything that reads or writes the disk or the network.
//!
//! | file | |
//! |---|---|
//! | `safetensors.rs` | the safetensors format: validated headers, one tensor at a time, writers |
//! | `checkpoint.rs` | HF checkpoint directories: `config.json`, single file or shards with their index |
//! | `hub.rs` | HF hub ids: the shared HF cache, downloads, offline use |
//! | `adapter.rs` | PEFT's LoRA adapter files, read and written |
//! | `merge.rs` | an adapter folded into its base, written as an HF checkpoint |
//! | `gguf.rs` | GGUF v3 (llama.cpp, Ollama): F16/BF16/Q8_0/Q4_0 encoders, a streaming writer, a bounded reader |
//! | `export.rs` | a checkpoint and its adapter merged into one GGUF file as llama.cpp's `phi2` reads it |
//! | `files.rs` | size-bounded reads, atomic writes, output directories that replace nothing early |
//! | `progress.rs` | progress bars for long work |

pub mod adapter;
pub mod checkpoint;
pub mod export;
pub mod files;
pub mod gguf;
pub mod hub;
pub mod lora_gguf;
pub mod merge;
pub mod progress;
pub mod safetensors;

pub use adapter::Adapter;
pub use checkpoint::Checkpoint;
pub use files::{atomic_write, finish_output_dir, prepare_output_dir, read_small_file};
pub use progress::{progress_bar, set_terminal_taken, terminal_taken};
