//! Weights and files: everything that reads or writes the disk or the network. It knows the
//! formats, not the network: nothing here imports `phi.rs`, `lora.rs` or the backend extension
//! (what combines weights into new files is [`crate::export`]).
//!
//! | file | |
//! |---|---|
//! | `safetensors.rs` | the safetensors format: validated headers, one tensor at a time, writers |
//! | `checkpoint.rs` | HF checkpoint directories: `config.json`, single file or shards with their index |
//! | `hub.rs` | HF hub ids: the shared HF cache, downloads, offline use |
//! | `adapter.rs` | PEFT's LoRA adapter files, read and written |
//! | `gguf/` | GGUF v3 (llama.cpp, Ollama): F16/BF16/Q8_0/Q4_0 encoders, a streaming writer, a bounded reader |
//! | `files.rs` | size-bounded reads, atomic writes, output directories that replace nothing early |
//! | `progress.rs` | progress bars for long work |

pub mod adapter;
pub mod checkpoint;
pub mod files;
pub mod gguf;
pub mod hub;
pub mod progress;
pub mod safetensors;

pub use adapter::Adapter;
pub use checkpoint::Checkpoint;
pub use files::{atomic_write, finish_output_dir, prepare_output_dir, read_small_file};
pub use progress::{progress_bar, set_terminal_taken, terminal_taken};
