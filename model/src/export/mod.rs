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

use std::path::Path;

use crate::error::{Error, Result};

/// `out` may be written as one file: not a directory, and absent unless `overwrite`.
fn check_out_file(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is a directory; --out names the .gguf file to write",
            out.display()
        )));
    }
    if out.exists() && !overwrite {
        return Err(Error::Invalid(format!(
            "{} exists; pass --overwrite to replace it",
            out.display()
        )));
    }
    Ok(())
}
