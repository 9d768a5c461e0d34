//! Operations that build a model file from a checkpoint and an adapter: the network's weights
//! combined, converted and written for other tools. [`crate::io`] reads and writes the formats;
//! this module decides what goes into them.
//!
//! | file | |
//! |---|---|
//! | `merge.rs` | an adapter folded into its base (`W + scaling * B A`, NF4-dequantized for QLoRA), written as an HF checkpoint |
//! | `gguf.rs` | llama.cpp's `phi2`: tensor names, metadata and tokenizer keys, and the merged model as one GGUF file |
//! | `lora_gguf.rs` | the adapter alone as llama.cpp's GGUF LoRA |

pub mod gguf;
pub mod lora_gguf;
pub mod merge;
