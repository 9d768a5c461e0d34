//! GGUF v3, the file format of llama.cpp and Ollama: the tensor encodings (F32, F16, BF16, Q8_0,
//! Q4_0), a streaming file writer and a reader ([`GgufFile`]: the header, then one tensor at a
//! time). Only the format; which tensors and keys a model needs is the exporter's business.
//!
//! The encoders are bit-identical to `gguf.quants.quantize` of llama.cpp's Python package
//! `gguf` (checked against its output in `tests/fixtures/gguf/quants.json`, written by
//! `tests/fixtures/gguf_quants.py`), which for Q8_0 and Q4_0 is itself bit-identical to ggml's
//! reference C quantizers.
//!
//! # File layout (everything little-endian)
//!
//! ```text
//! "GGUF"  u32 version = 3  u64 n_tensors  u64 n_kv
//! n_kv times:       string key, u32 value type, value
//! n_tensors times:  string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset
//! zero padding up to a multiple of the alignment (counted from the start of the file)
//! tensor data, each tensor followed by zero padding up to a multiple of the alignment
//! ```
//!
//! A string is a u64 byte length and the UTF-8 bytes (no terminating NUL). An array value is a
//! u32 element type, a u64 count and the elements. A tensor's `offset` is counted from the start
//! of the data section (the first byte after the header's padding), and every offset is a
//! multiple of the alignment: `general.alignment` (a u32 key) when present, else 32.
//!
//! Dimensions are stored in ggml's order, the reverse of PyTorch's: `ne[0]` is the innermost,
//! contiguous dimension (the length of a row). A PyTorch Linear weight `[out, in]` is written as
//! `ne = [in, out]`. The block quantizations (Q8_0, Q4_0) encode each row in blocks of 32
//! consecutive values, so `ne[0]` (the last PyTorch dimension) must be a multiple of 32.
//!
//! | file | |
//! |---|---|
//! | `quants.rs` | the tensor encodings: [`GgmlType`], [`quantize`], [`dequantize`] |
//! | `value.rs` | metadata values ([`Value`], [`Array`]) and their encoding |
//! | `write.rs` | [`GgufWriter`]: the header, then one tensor at a time |
//! | `read.rs` | [`GgufFile`]: a bounded, checked header reader and tensor reads |
//!
//! Which tensors and keys llama.cpp's `phi2` needs is in [`crate::export`].

mod quants;
mod read;
#[cfg(test)]
mod test_util;
mod value;
mod write;

pub use quants::{GgmlType, dequantize, quantize};
pub use read::{
    GgufFile, GgufTensor, MAX_ARRAY_LEN, MAX_HEADER_BYTES, MAX_KEY_BYTES, MAX_KV, MAX_TENSORS,
};
pub use value::{Array, Value};
pub use write::{GgufWriter, TensorInfo};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The format version this module writes.
pub const VERSION: u32 = 3;
/// The metadata key that sets the data alignment, and the alignment when it is absent.
pub const ALIGNMENT_KEY: &str = "general.alignment";
pub const DEFAULT_ALIGNMENT: u32 = 32;
/// llama.cpp keeps tensor names in a 64-byte buffer with its terminating NUL (`GGML_MAX_NAME`).
pub const MAX_TENSOR_NAME_BYTES: usize = 63;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// `n` rounded up to a multiple of `align`.
fn padded(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}
