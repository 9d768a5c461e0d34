//! `phitune-model`: Phi-2 in Burn: the network, generation, the backend extension for its heavy
//! ops, weight and file I/O, and the exports built from them. It knows nothing of data sets or
//! training; `phitune-data` and `phitune-train` build on it. See ARCHITECTURE.md at the
//! repository's root for the map of the whole workspace.
//!
//! Everything is generic over `B: Backend`; the backend is chosen only by the binary.
//!
//! - The network, top to bottom as HF's `modeling_phi.py`: `config.rs`, `phi.rs`,
//!   `attention.rs`, `rotary.rs`, `norm.rs`, `cache.rs` (KV cache), `lora.rs`, `frozen.rs`
//!   (frozen base weights, dense or NF4), `packing.rs` (several examples per row).
//! - Generation: `generate.rs`, `sampling.rs`, `tokenizer.rs`.
//! - [`ops`]: the backend extension (NF4 and fused ops), one file or folder per backend.
//! - [`io`]: the formats (safetensors, checkpoint directories, the hub, PEFT adapters, GGUF)
//!   and file utilities; it imports nothing from the network.
//! - [`export`]: what is built from a checkpoint and an adapter: merged HF checkpoints, GGUF
//!   files for llama.cpp, GGUF LoRA adapters.
// `unsafe` only where each use is named and justified (SAFETY comments): the sgemm call.
#![deny(unsafe_code)]

pub mod cache;
pub mod config;
pub mod error;
pub mod export;
pub mod frozen;
pub mod generate;
pub mod io;
pub mod lora;
pub mod norm;
pub mod ops;
pub mod packing;
pub mod phi;
pub mod rotary;
pub mod sampling;
pub mod tokenizer;

mod attention;

pub use config::PhiConfig;
pub use error::{Error, Result};
pub use io::{Adapter, Checkpoint};
pub use ops::Nf4Backend;
pub use packing::Packing;
pub use phi::Phi;
pub use tokenizer::PhiTokenizer;
