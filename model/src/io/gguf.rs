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

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;

use crate::error::{Error, Result};

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

/// The tensor encodings this module writes, with their ggml type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 values -> 34 bytes: f16 scale `d`, then 32 `i8`; value = q * d.
    Q8_0,
    /// Blocks of 32 values -> 18 bytes: f16 scale `d`, then 16 bytes; byte j holds value j in
    /// its low nibble and value j + 16 in its high nibble; value = (nibble - 8) * d.
    Q4_0,
}

impl GgmlType {
    pub const ALL: [GgmlType; 5] = [Self::F32, Self::F16, Self::BF16, Self::Q8_0, Self::Q4_0];

    /// The type id in ggml's `enum ggml_type` (what a tensor info stores).
    pub const fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }

    /// The type with ggml type id `id`, if it is one of the types this module encodes.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The lowercase name used on the command line (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Values per block (1 for the float types).
    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 => 32,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
        }
    }

    /// Parses a name as [`GgmlType::name`] gives it (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown GGUF tensor type {name:?}; expected one of f32, f16, bf16, q8_0, q4_0"
                ))
            })
    }

    /// The encoded size of `n` values; an error unless `n` is a whole number of blocks.
    pub fn n_bytes(self, n: usize) -> Result<usize> {
        let block = self.block_size();
        if !n.is_multiple_of(block) {
            return Err(Error::Invalid(format!(
                "{self} encodes blocks of {block} values; a length of {n} is not a multiple of {block}"
            )));
        }
        (n / block)
            .checked_mul(self.type_size())
            .ok_or_else(|| Error::Invalid(format!("{n} {self} values overflow the address space")))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding
//
// gguf-py computes on float32 numpy arrays; under numpy 2's promotion rules (NEP 50) a Python
// scalar operand such as `/ 127` or `/ -8` stays float32, so every intermediate below is one IEEE
// float32 operation, rounded to nearest even, as Rust's f32 arithmetic is (Rust never fuses a
// multiply and an add into an FMA, and does not flush subnormals to zero).
// ---------------------------------------------------------------------------------------------

/// Encodes `values` as `ty`: the tensor's bytes in the file (little-endian), bit-identical to
/// `gguf.quants.quantize(np.asarray(values, np.float32), ty).tobytes()`.
///
/// Q8_0 and Q4_0 need a whole number of 32-value blocks and finite values (the reference's
/// output for inf/NaN is undefined). Their f16 scale overflows to infinity, exactly as in the
/// reference, for blocks with |x| above 65504 * 127 (Q8_0) or 65504 * 8 (Q4_0); check such
/// tensors with [`dequantize`] when that can happen.
pub fn quantize(values: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.n_bytes(values.len())?);
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // numpy's `astype(float16)`: round to nearest even, subnormals kept, overflow to inf.
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16_bits(*v).to_le_bytes())),
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "{ty} cannot encode the non-finite value {} at index {i}",
                    values[i]
                )));
            }
            let block = if ty == GgmlType::Q8_0 {
                q8_0_block
            } else {
                q4_0_block
            };
            values.chunks_exact(32).for_each(|b| block(b, &mut out));
        }
    }
    Ok(out)
}

/// Decodes `n` values of type `ty` (the inverse of [`quantize`] up to its rounding), computed as
/// gguf-py's `dequantize` does.
pub fn dequantize(bytes: &[u8], ty: GgmlType, n: usize) -> Result<Vec<f32>> {
    let expected = ty.n_bytes(n)?;
    if bytes.len() != expected {
        return Err(Error::Invalid(format!(
            "{n} {ty} values take {expected} bytes, got {}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let qs = &b[2..];
                let lo = qs.iter().map(|q| q & 0x0f);
                let hi = qs.iter().map(|q| q >> 4);
                out.extend(lo.chain(hi).map(|q| f32::from(q as i8 - 8) * d));
            }
        }
    }
    Ok(out)
}

/// f32 -> bf16 bits as gguf-py (and ggml's `ggml_compute_fp32_to_bf16`) do it: a NaN keeps its
/// sign and top 7 mantissa bits with the quiet bit set; everything else rounds to nearest even
/// (so values past bf16's largest finite number round to infinity).
fn bf16_bits(v: f32) -> u16 {
    let mut n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | 0x0040_0000;
    }
    let round = 0x7fff + u64::from((n >> 16) & 1);
    ((u64::from(n) + round) >> 16) as u16
}

/// One Q8_0 block: `d = max|x| / 127`, `q = round(x * (1/d))` rounding halves away from zero
/// (gguf-py's `np_roundf`, C's `roundf`: NOT numpy's half-to-even `np.round`), `d` stored as f16.
/// The quotients use the f32 `d`, not its f16 rounding.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for &v in x {
        let p = v * id;
        // |p| <= 127 (+ a few ulps), so the cast is exact. p is not finite only when 1/d
        // overflowed (max|x| < ~3.7e-37, whose f16 scale is 0 anyway): undefined in the
        // reference; numpy on x86-64 gives 0, and so do we.
        let q = if p.is_finite() { p.round() as i8 } else { 0 };
        out.push(q as u8);
    }
}

/// One Q4_0 block: `m` = the value of largest magnitude WITH its sign (the first one on a tie),
/// `d = m / -8`, `q = min(15, trunc(x * (1/d) + 8.5))`, `d` stored as f16. So `m` itself encodes
/// as 0 (-8 * d = m) and the other sign reaches at most +7 * d.
/// The sum `x * id + 8.5` is rounded to f32 before the truncation, which matters: a product just
/// below k + 0.5 can round up to the next integer.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let m = x[1..]
        .iter()
        .fold(x[0], |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = m / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    // The sign of zero carries over: a block of +0.0 stores d = -0.0 (f16 0x8000), as gguf-py.
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| -> u8 {
        let t = (v * id + 8.5).trunc();
        // t is in [0, 16]; it is not finite only when 1/d overflowed (undefined in the
        // reference; numpy on x86-64 gives 0, and so do we).
        if t.is_finite() { (t as u8).min(15) } else { 0 }
    };
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A metadata value, with its GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: elements all of one (non-array) type, which the file records even when
/// the array is empty.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    /// The GGUF value type id (`gguf_type`: UINT8 = 0 .. FLOAT64 = 12, ARRAY = 9).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value without its type id.
    fn put_payload(&self, buf: &mut Vec<u8>) {
        match self {
            Value::U8(v) => buf.push(*v),
            Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => buf.push(u8::from(*v)),
            Value::String(s) => put_string(buf, s),
            Value::Array(a) => a.put(buf),
            Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

impl Array {
    /// The GGUF value type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::String(_) => 8,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type, count, elements.
    fn put(&self, buf: &mut Vec<u8>) {
        fn all<T: Copy, const N: usize>(buf: &mut Vec<u8>, items: &[T], le: fn(T) -> [u8; N]) {
            items.iter().for_each(|x| buf.extend_from_slice(&le(*x)));
        }
        buf.extend_from_slice(&self.elem_type_id().to_le_bytes());
        buf.extend_from_slice(&(self.len() as u64).to_le_bytes());
        match self {
            Array::U8(v) => buf.extend_from_slice(v),
            Array::I8(v) => all(buf, v, i8::to_le_bytes),
            Array::U16(v) => all(buf, v, u16::to_le_bytes),
            Array::I16(v) => all(buf, v, i16::to_le_bytes),
            Array::U32(v) => all(buf, v, u32::to_le_bytes),
            Array::I32(v) => all(buf, v, i32::to_le_bytes),
            Array::F32(v) => all(buf, v, f32::to_le_bytes),
            Array::Bool(v) => all(buf, v, |b| [u8::from(b)]),
            Array::String(v) => v.iter().for_each(|s| put_string(buf, s)),
            Array::U64(v) => all(buf, v, u64::to_le_bytes),
            Array::I64(v) => all(buf, v, i64::to_le_bytes),
            Array::F64(v) => all(buf, v, f64::to_le_bytes),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::$variant(v)
            }
        }
        impl From<Vec<$t>> for Value {
            fn from(v: Vec<$t>) -> Self {
                Value::Array(Array::$variant(v))
            }
        }
    )*};
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}

impl From<Array> for Value {
    fn from(v: Array) -> Self {
        Value::Array(v)
    }
}

/// A GGUF string: u64 byte length, then the UTF-8 bytes.
fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

/// A tensor to write: its name, its shape in PyTorch order (e.g. `[out, in]`) and its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn new(name: impl Into<String>, shape: &[usize], ty: GgmlType) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            ty,
        }
    }
}

/// Writes a GGUF v3 file tensor by tensor: [`GgufWriter::new`] takes the metadata and declares
/// every tensor (name, shape, type) and writes the whole header; then
/// [`GgufWriter::write_tensor`] takes each tensor's encoded bytes ([`quantize`]) in the declared
/// order, so only one tensor needs to be in memory at a time; [`GgufWriter::finish`] checks that
/// all were written. `out` must be positioned at the start of the file (the alignment of the data
/// section is counted from there); the writer does no buffering of its own.
///
/// The output is byte-identical to gguf-py's `GGUFWriter` given the same keys (in the same order:
/// gguf-py puts `general.architecture` first) and tensors.
pub struct GgufWriter<W: Write> {
    out: W,
    /// Names the file in error messages only.
    path: PathBuf,
    tensors: Vec<Planned>,
    next: usize,
    alignment: usize,
}

struct Planned {
    info: TensorInfo,
    n_bytes: usize,
}

impl<W: Write> GgufWriter<W> {
    /// Checks the metadata and tensor declarations and writes the header: magic, version,
    /// counts, the key/value pairs in the given order, the tensor infos in the given order (which
    /// is also the order of their data), and the padding before the data. `path` only names the
    /// file in error messages.
    ///
    /// The alignment is `general.alignment` when `metadata` has it (a [`Value::U32`] power of
    /// two), else 32.
    pub fn new(
        out: W,
        path: &Path,
        metadata: &[(String, Value)],
        tensors: &[TensorInfo],
    ) -> Result<Self> {
        let invalid = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));

        // Keys: the spec asks for ASCII, at most 65535 bytes, unique.
        let mut alignment = DEFAULT_ALIGNMENT;
        let mut keys = std::collections::HashSet::new();
        for (key, value) in metadata {
            if key.is_empty() || key.len() > u16::MAX as usize || !key.is_ascii() {
                return Err(invalid(format!(
                    "metadata key {key:?} must be 1 to 65535 ASCII bytes"
                )));
            }
            if !keys.insert(key.as_str()) {
                return Err(invalid(format!("metadata key {key} is given twice")));
            }
            if key == ALIGNMENT_KEY {
                match value {
                    Value::U32(a) if a.is_power_of_two() => alignment = *a,
                    other => {
                        return Err(invalid(format!(
                            "metadata key {key} must be a u32 power of two, got {other:?}"
                        )));
                    }
                }
            }
        }
        let alignment = alignment as usize;

        // Tensors: what llama.cpp's loader checks, so that a file we write is one it reads.
        let mut names = std::collections::HashSet::new();
        let mut planned = Vec::with_capacity(tensors.len());
        for t in tensors {
            let name = &t.name;
            if name.is_empty() || name.len() > MAX_TENSOR_NAME_BYTES {
                return Err(invalid(format!(
                    "tensor name {name:?} must be 1 to {MAX_TENSOR_NAME_BYTES} bytes"
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(format!("tensor {name} is declared twice")));
            }
            if t.shape.is_empty() || t.shape.len() > MAX_DIMS || t.shape.contains(&0) {
                return Err(invalid(format!(
                    "tensor {name} has shape {:?}; GGUF needs 1 to {MAX_DIMS} dimensions, none 0",
                    t.shape
                )));
            }
            // The last PyTorch dimension is ggml's ne[0], the row that blocks are cut from.
            let row = t.shape[t.shape.len() - 1];
            let block = t.ty.block_size();
            if !row.is_multiple_of(block) {
                return Err(invalid(format!(
                    "tensor {name} {:?}: {} needs rows (the last dimension, ggml's ne[0]) of a \
                     multiple of {block} values, not {row}",
                    t.shape, t.ty
                )));
            }
            let n_bytes = t
                .shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .and_then(|n| t.ty.n_bytes(n).ok())
                .filter(|&b| b.checked_add(alignment).is_some())
                .ok_or_else(|| invalid(format!("tensor {name} {:?} is too large", t.shape)))?;
            planned.push(Planned {
                info: t.clone(),
                n_bytes,
            });
        }

        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value.type_id().to_le_bytes());
            value.put_payload(&mut header);
        }
        let mut offset = 0u64;
        for p in &planned {
            put_string(&mut header, &p.info.name);
            header.extend_from_slice(&(p.info.shape.len() as u32).to_le_bytes());
            // ggml order: innermost (contiguous) dimension first, i.e. PyTorch's shape reversed.
            for &d in p.info.shape.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&p.info.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            // Each tensor's data is padded to the alignment, so every offset is aligned.
            offset += padded(p.n_bytes, alignment) as u64;
        }
        // The data section starts at the next multiple of the alignment (counted from the
        // start of the file); tensor offsets are relative to it.
        header.resize(padded(header.len(), alignment), 0);

        let mut out = out;
        out.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            tensors: planned,
            next: 0,
            alignment,
        })
    }

    /// Writes the next declared tensor's encoded bytes (see [`quantize`]) and the padding after
    /// them. `name` must be the next declared tensor and `bytes` its exact size.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path.display();
        let Some(p) = self.tensors.get(self.next) else {
            return Err(Error::Invalid(format!(
                "{path}: tensor {name} written after all {} declared tensors",
                self.tensors.len()
            )));
        };
        if p.info.name != name {
            return Err(Error::Invalid(format!(
                "{path}: tensor {name} written out of order; the next declared tensor is {}",
                p.info.name
            )));
        }
        if bytes.len() != p.n_bytes {
            return Err(Error::Invalid(format!(
                "{path}: tensor {name} ({} {:?}) takes {} bytes, got {}",
                p.info.ty,
                p.info.shape,
                p.n_bytes,
                bytes.len()
            )));
        }
        let pad = padded(bytes.len(), self.alignment) - bytes.len();
        self.out
            .write_all(bytes)
            .and_then(|()| self.out.write_all(&vec![0; pad]))
            .map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes and returns the output.
    pub fn finish(mut self) -> Result<W> {
        if let Some(p) = self.tensors.get(self.next) {
            return Err(Error::Invalid(format!(
                "{}: only {} of {} tensors written; {} is missing",
                self.path.display(),
                self.next,
                self.tensors.len(),
                p.info.name
            )));
        }
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.out)
    }
}

/// `n` rounded up to a multiple of `align`.
fn padded(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

// ---------------------------------------------------------------------------------------------
// The reader
// ---------------------------------------------------------------------------------------------

/// The most tensors a header may declare (llama.cpp's largest models have a few thousand).
pub const MAX_TENSORS: u64 = 1 << 20;
/// The most metadata key/value pairs a header may declare.
pub const MAX_KV: u64 = 1 << 20;
/// The most elements a metadata array may hold (the largest vocabularies have ~256k tokens).
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// The spec's limit on a metadata key's length.
pub const MAX_KEY_BYTES: u64 = u16::MAX as u64;
/// The most bytes the header (everything before the data section) may take. Together with the
/// limits above this bounds what [`GgufFile::open`] allocates, whatever the file claims.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;

/// A GGUF file's header: its metadata in file order and its tensors' infos with their absolute
/// byte offsets. [`GgufFile::open`] reads and checks the header only; the tensors are read one
/// at a time with [`GgufFile::read_raw`] or [`GgufFile::read_f32`].
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    /// The file, for the tensor reads and to name it in error messages.
    pub path: PathBuf,
    /// The format version (2 or 3; they share the layout).
    pub version: u32,
    /// The key/value pairs in file order (keys are unique).
    pub metadata: Vec<(String, Value)>,
    /// The tensors in header order (names are unique).
    pub tensors: Vec<GgufTensor>,
    /// `general.alignment`, else [`DEFAULT_ALIGNMENT`].
    pub alignment: usize,
    /// The absolute offset of the data section (the header's end rounded up to the alignment).
    pub data_start: u64,
}

/// One tensor of a [`GgufFile`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensor {
    /// Name, type and shape in PyTorch order (ggml's `ne` reversed), as [`GgufWriter`] takes it.
    pub info: TensorInfo,
    /// The absolute offset of the tensor's bytes, from the start of the file.
    pub offset: u64,
    /// The size of the tensor's encoded bytes (without the padding after them).
    pub n_bytes: usize,
}

impl GgufTensor {
    /// The number of values (1 for a tensor of no dimensions).
    pub fn numel(&self) -> usize {
        self.info.shape.iter().product()
    }
}

impl GgufFile {
    /// Reads and checks the header of the GGUF file at `path`; reads no tensor data.
    ///
    /// Everything the header claims is checked against the file's size and the `MAX_*` limits
    /// before anything is allocated for it, so a corrupt or hostile file gives a one-line error
    /// naming the file and what is wrong, never a panic or a huge allocation. Refused: a wrong
    /// magic, versions other than 2 and 3 (and big-endian files), more than [`MAX_KV`] keys or
    /// [`MAX_TENSORS`] tensors, anything extending past the end of the file, strings that are not
    /// UTF-8, unknown value types, nested arrays, bools other than 0 and 1, duplicate keys or
    /// tensor names, a `general.alignment` that is not a u32 power of two, more than
    /// [`MAX_DIMS`] dimensions, tensor types other than those of [`GgmlType`], rows that are not
    /// whole blocks, and tensor offsets that are not multiples of the alignment. Accepted as
    /// llama.cpp does: tensors with a zero dimension, and no dimensions (one value). Unlike
    /// llama.cpp the reader does not insist on the padding after the last tensor, nor on tensor
    /// data packed in header order.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let reader = std::io::BufReader::with_capacity(1 << 16, file);
        Self::parse(reader, file_len, path).map_err(|msg| Error::checkpoint(path, msg))
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.info.name == name)
    }

    /// One tensor's encoded bytes, as [`quantize`] gives them (a positioned read of the file).
    pub fn read_raw(&self, name: &str) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let t = self.tensor_or_err(name)?;
        let mut file = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut buf = vec![0u8; t.n_bytes];
        file.seek(SeekFrom::Start(t.offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| {
                Error::checkpoint(
                    &self.path,
                    format!(
                        "reading tensor {} (bytes {}..{}): {e}",
                        shown(name),
                        t.offset,
                        t.offset + t.n_bytes as u64
                    ),
                )
            })?;
        Ok(buf)
    }

    /// One tensor's values, decoded with [`dequantize`] (in ggml's memory order, which is
    /// PyTorch's row-major order of `info.shape`).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_or_err(name)?;
        let bytes = self.read_raw(name)?;
        dequantize(&bytes, t.info.ty, t.numel())
            .map_err(|e| Error::checkpoint(&self.path, format!("tensor {}: {e}", shown(name))))
    }

    fn tensor_or_err(&self, name: &str) -> Result<&GgufTensor> {
        self.tensor(name).ok_or_else(|| {
            Error::checkpoint(&self.path, format!("no tensor named {}", shown(name)))
        })
    }

    /// The header parser behind [`GgufFile::open`]: `r` is positioned at the start of a file of
    /// `file_len` bytes. The error is the message without the path.
    fn parse(r: impl std::io::Read, file_len: u64, path: &Path) -> Parse<Self> {
        let mut h = HeaderReader {
            r,
            pos: 0,
            file_len,
        };
        if file_len < 4 {
            return Err(format!(
                "not a GGUF file: {file_len} bytes long, too short for a header"
            ));
        }
        let magic: [u8; 4] = h.fixed("the magic")?;
        if magic != MAGIC {
            return Err(format!(
                "not a GGUF file: it starts with \"{}\", not \"GGUF\"",
                magic.escape_ascii()
            ));
        }
        let version = h.u32("the version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err("a big-endian GGUF file; only little-endian ones are read".into());
        }
        if version != 2 && version != 3 {
            return Err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            ));
        }
        let n_tensors = h.u64("the tensor count")?;
        if n_tensors > MAX_TENSORS {
            return Err(format!(
                "the header declares {n_tensors} tensors, more than the limit of {MAX_TENSORS}"
            ));
        }
        let n_kv = h.u64("the metadata count")?;
        if n_kv > MAX_KV {
            return Err(format!(
                "the header declares {n_kv} metadata keys, more than the limit of {MAX_KV}"
            ));
        }

        // Capacities are capped: the counts are not yet backed by bytes.
        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv.min(1024) as usize);
        let mut keys = std::collections::HashSet::new();
        for i in 0..n_kv {
            let key = h.string(&format!("metadata key {i} of {n_kv}"), MAX_KEY_BYTES)?;
            let what = format!("metadata key {}", shown(&key));
            let ty = h.u32(&format!("the value type of {what}"))?;
            let value = h.value(ty, &format!("the value of {what}"))?;
            if !keys.insert(key.clone()) {
                return Err(format!("{what} appears twice"));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a,
            Some((_, other)) => {
                return Err(format!(
                    "metadata key {ALIGNMENT_KEY} must be a u32 power of two, got {}",
                    shown(&format!("{other:?}"))
                ));
            }
        };
        let align = u64::from(alignment);

        // (info, offset relative to the data section, n_bytes)
        let mut tensors = Vec::with_capacity(n_tensors.min(1024) as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = h.string(
                &format!("the name of tensor {i} of {n_tensors}"),
                MAX_HEADER_BYTES,
            )?;
            let what = format!("tensor {}", shown(&name));
            let n_dims = h.u32(&format!("the dimension count of {what}"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(format!(
                    "{what} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}"
                ));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = h.u64(&format!("the dimensions of {what}"))?;
                // ggml's ne are int64_t.
                if d > i64::MAX as u64 {
                    return Err(format!("{what} has the dimension {d}, out of range"));
                }
                ne.push(d);
            }
            let type_id = h.u32(&format!("the type of {what}"))?;
            let offset = h.u64(&format!("the offset of {what}"))?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| {
                let known = ggml_type_name(type_id)
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                format!(
                    "{what} has ggml type {type_id}{known}, which this reader does not \
                     decode (it reads F32, F16, BF16, Q8_0 and Q4_0)"
                )
            })?;
            let shape: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
            if ne
                .first()
                .is_some_and(|r| !r.is_multiple_of(ty.block_size() as u64))
            {
                return Err(format!(
                    "{what} {shape:?} is {ty} but its rows (ggml's ne[0]) of {} values are not \
                     a whole number of {}-value blocks",
                    ne[0],
                    ty.block_size()
                ));
            }
            let n_bytes = ne
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
                .and_then(|n| ty.n_bytes(n).ok())
                .filter(|&b| b as u64 <= file_len)
                .ok_or_else(|| {
                    format!("{what} {shape:?} {ty} is larger than the file ({file_len} bytes)")
                })?;
            if !offset.is_multiple_of(align) {
                return Err(format!(
                    "{what} is at offset {offset}, not a multiple of the alignment {alignment}"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("{what} appears twice"));
            }
            tensors.push((TensorInfo { name, shape, ty }, offset, n_bytes));
        }

        // header end <= MAX_HEADER_BYTES and align <= 2^31: no overflow.
        let data_start = h.pos.div_ceil(align) * align;
        let tensors = tensors
            .into_iter()
            .map(|(info, offset, n_bytes)| {
                let start = data_start.checked_add(offset);
                match start.and_then(|s| s.checked_add(n_bytes as u64)) {
                    Some(end) if end <= file_len => Ok(GgufTensor {
                        info,
                        offset: start.unwrap_or_default(),
                        n_bytes,
                    }),
                    _ => Err(format!(
                        "tensor {} ({n_bytes} bytes at data offset {offset}, the data starting \
                         at byte {data_start}) extends past the end of the file ({file_len} \
                         bytes)",
                        shown(&info.name)
                    )),
                }
            })
            .collect::<Parse<Vec<_>>>()?;

        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment: alignment as usize,
            data_start,
        })
    }
}

/// A header parse result: the error is a one-line message without the file's path.
type Parse<T> = std::result::Result<T, String>;

/// Reads the header, checking every length against the bytes left in the file (and
/// [`MAX_HEADER_BYTES`]) before reading or allocating.
struct HeaderReader<R> {
    r: R,
    /// Bytes read so far; never more than `file_len`.
    pos: u64,
    file_len: u64,
}

impl<R: std::io::Read> HeaderReader<R> {
    /// Checks that `n` more bytes are in the file and within the header limit.
    fn need(&self, n: u64, what: &str) -> Parse<()> {
        let left = self.file_len - self.pos;
        if n > left {
            return Err(format!(
                "{what} at byte {} takes {n} bytes, but the file ends {left} bytes later \
                 (truncated or corrupt)",
                self.pos
            ));
        }
        if self.pos + n > MAX_HEADER_BYTES {
            return Err(format!(
                "{what} at byte {} takes {n} bytes, past the header size limit of \
                 {MAX_HEADER_BYTES} bytes",
                self.pos
            ));
        }
        Ok(())
    }

    fn read_into(&mut self, buf: &mut [u8], what: &str) -> Parse<()> {
        self.need(buf.len() as u64, what)?;
        self.r
            .read_exact(buf)
            .map_err(|e| format!("reading {what} at byte {}: {e}", self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_into(&mut buf, what)?;
        Ok(buf)
    }

    fn bytes(&mut self, n: u64, what: &str) -> Parse<Vec<u8>> {
        self.need(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.read_into(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        self.fixed(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        self.fixed(what).map(u64::from_le_bytes)
    }

    /// A u64 length and that many bytes of UTF-8, at most `max` of them.
    fn string(&mut self, what: &str, max: u64) -> Parse<String> {
        let n = self.u64(what)?;
        if n > max {
            return Err(format!(
                "{what} at byte {} is a string of {n} bytes, more than the limit of {max}",
                self.pos - 8
            ));
        }
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes).map_err(|e| format!("{what} is not valid UTF-8: {e}"))
    }

    fn bool(&mut self, what: &str) -> Parse<bool> {
        match self.fixed::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("{what} is a bool stored as {b}, not 0 or 1")),
        }
    }

    /// One value of GGUF value type `ty`.
    fn value(&mut self, ty: u32, what: &str) -> Parse<Value> {
        Ok(match ty {
            0 => Value::U8(self.fixed::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.fixed(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.fixed(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.fixed(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.fixed(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.fixed(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.fixed(what)?)),
            7 => Value::Bool(self.bool(what)?),
            8 => Value::String(self.string(what, MAX_HEADER_BYTES)?),
            9 => Value::Array(self.array(what)?),
            10 => Value::U64(u64::from_le_bytes(self.fixed(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.fixed(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.fixed(what)?)),
            other => return Err(format!("{what} has the unknown value type {other}")),
        })
    }

    /// An array: element type, count, elements.
    fn array(&mut self, what: &str) -> Parse<Array> {
        let elem = self.u32(what)?;
        let n = self.u64(what)?;
        // The smallest encoding of one element (a string is at least its length).
        let min_size = match elem {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => {
                return Err(format!(
                    "{what} is an array of arrays, which is not supported"
                ));
            }
            other => {
                return Err(format!(
                    "{what} is an array of the unknown value type {other}"
                ));
            }
        };
        if n > MAX_ARRAY_LEN {
            return Err(format!(
                "{what} is an array of {n} elements, more than the limit of {MAX_ARRAY_LEN}"
            ));
        }
        self.need(n * min_size, what)?;
        let n = n as usize;
        Ok(match elem {
            0 => Array::U8(self.bytes(n as u64, what)?),
            1 => Array::I8(self.many(n, what, i8::from_le_bytes)?),
            2 => Array::U16(self.many(n, what, u16::from_le_bytes)?),
            3 => Array::I16(self.many(n, what, i16::from_le_bytes)?),
            4 => Array::U32(self.many(n, what, u32::from_le_bytes)?),
            5 => Array::I32(self.many(n, what, i32::from_le_bytes)?),
            6 => Array::F32(self.many(n, what, f32::from_le_bytes)?),
            7 => Array::Bool((0..n).map(|_| self.bool(what)).collect::<Parse<Vec<_>>>()?),
            8 => Array::String(
                (0..n)
                    .map(|_| self.string(what, MAX_HEADER_BYTES))
                    .collect::<Parse<Vec<_>>>()?,
            ),
            10 => Array::U64(self.many(n, what, u64::from_le_bytes)?),
            11 => Array::I64(self.many(n, what, i64::from_le_bytes)?),
            _ => Array::F64(self.many(n, what, f64::from_le_bytes)?),
        })
    }

    /// `n` fixed-size elements.
    fn many<T, const N: usize>(
        &mut self,
        n: usize,
        what: &str,
        decode: fn([u8; N]) -> T,
    ) -> Parse<Vec<T>> {
        let bytes = self.bytes((n * N) as u64, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| decode(c.try_into().expect("chunks_exact gives N bytes")))
            .collect())
    }
}

/// A name from a file, quoted and escaped for a one-line message, and cut at 80 characters.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(80).collect();
    let more = if cut.len() < s.len() { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// The names of ggml's other tensor types, for error messages (ggml.h's `enum ggml_type`).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    fn fixture(name: &str) -> String {
        format!(
            "{}/../tests/fixtures/gguf/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    fn fixture_json() -> Json {
        let text = std::fs::read_to_string(fixture("quants.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn f32s(hex: &str) -> Vec<f32> {
        unhex(hex)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The first offset where `a` and `b` differ (or where the shorter one ends).
    fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
        (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
    }

    /// A fixture case: name, inputs, [(type, expected bytes)].
    type Case = (String, Vec<f32>, Vec<(GgmlType, Vec<u8>)>);

    fn cases() -> Vec<Case> {
        let doc = fixture_json();
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        cases
            .iter()
            .map(|c| {
                let name = c["name"].as_str().unwrap().to_owned();
                let x = f32s(c["input_f32_le"].as_str().unwrap());
                assert_eq!(x.len() as u64, c["n"].as_u64().unwrap(), "{name}");
                let expected = c["expected"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(t, hex)| {
                        (
                            GgmlType::from_name(t).unwrap(),
                            unhex(hex.as_str().unwrap()),
                        )
                    })
                    .collect();
                (name, x, expected)
            })
            .collect()
    }

    #[test]
    fn gguf_type_table() {
        let table = [
            (GgmlType::F32, 0, 1, 4),
            (GgmlType::F16, 1, 1, 2),
            (GgmlType::Q4_0, 2, 32, 18),
            (GgmlType::Q8_0, 8, 32, 34),
            (GgmlType::BF16, 30, 1, 2),
        ];
        for (ty, id, block, size) in table {
            assert_eq!(
                (ty.id(), ty.block_size(), ty.type_size()),
                (id, block, size),
                "{ty}"
            );
            assert_eq!(GgmlType::from_name(ty.name()).unwrap(), ty);
            assert_eq!(GgmlType::from_name(&ty.to_string()).unwrap(), ty);
        }
        let err = GgmlType::from_name("q5_k").unwrap_err().to_string();
        assert!(err.contains("q5_k") && err.contains("q8_0"), "{err}");
        assert_eq!(GgmlType::Q8_0.n_bytes(64).unwrap(), 68);
        assert_eq!(GgmlType::Q4_0.n_bytes(64).unwrap(), 36);
        assert_eq!(GgmlType::BF16.n_bytes(3).unwrap(), 6);
    }

    #[test]
    fn gguf_quantize_matches_gguf_py_fixture() {
        let mut checked = 0;
        for (case, x, expected) in cases() {
            for (ty, want) in expected {
                let got = quantize(&x, ty).unwrap();
                if let Some(i) = first_difference(&got, &want) {
                    let block = i / ty.type_size();
                    panic!(
                        "case {case}, {ty}: first differing byte {i} (block {block}): ours {:?}, \
                         gguf-py {:?}; ({} vs {} bytes)",
                        got.get(i),
                        want.get(i),
                        got.len(),
                        want.len()
                    );
                }
                checked += 1;
            }
        }
        // 10 cases x 4 types + the bf16-only case.
        assert_eq!(checked, 41);
    }

    /// A deterministic, spread-out test signal (no RNG dependency): magnitudes over 10 decades.
    fn signal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                let block_scale = 10f64.powi(((i / 32) % 11) as i32 - 6); // 1e-6 .. 1e4
                ((u - 0.5) * 2.0 * block_scale) as f32
            })
            .collect()
    }

    /// dequantize(quantize(x)) stays within each format's own rounding bound:
    /// - F16: half an ulp of f16: |err| <= |x| * 2^-11 for normal results, <= 2^-25 in the
    ///   subnormal range; |x| >= 65520 becomes an infinity of the same sign.
    /// - BF16: |err| <= |x| * 2^-8 (normal), <= 2^-134 (subnormal), or infinity past bf16's max.
    /// - Q8_0, per block with `d = max|x| / 127` and `d16` its f16 rounding:
    ///   |err| <= d/2 (rounding x/d to an integer), plus 127 * |d - d16| (the stored scale's
    ///   error), plus max|x| * 2^-20 (the f32 rounding of 1/d and x * (1/d)). Blocks whose
    ///   scale overflows f16 (max|x| > 65504 * 127) are skipped: their decoding is inf / NaN.
    /// - Q4_0, per block with `m` the signed largest value, `d = m / -8`: the codes reach -8 d
    ///   (i.e. m) but only +7 d on the other side, so |err| <= |d|/2 for a value with m's sign or
    ///   |x| <= 7.5 |d|, and <= |d| for a value of the other sign beyond 7.5 |d| (clipped to
    ///   7 d; x = -m gives exactly |d|); plus 8 * |d - d16| and |m| * 2^-20 as above.
    #[test]
    fn gguf_dequantize_within_bounds() {
        let mut inputs: Vec<(String, Vec<f32>)> = cases()
            .into_iter()
            .filter(|(_, x, _)| x.iter().all(|v| v.is_finite()))
            .map(|(name, x, _)| (name, x))
            .collect();
        inputs.push(("signal".into(), signal(32 * 44, 7)));
        let half_f16_ulp = |x: f32| {
            if x.abs() >= 2f32.powi(-14) {
                x.abs() * 2f32.powi(-11)
            } else {
                2f32.powi(-25)
            }
        };
        for (case, x) in &inputs {
            let n = x.len();
            let y = dequantize(&quantize(x, GgmlType::F32).unwrap(), GgmlType::F32, n).unwrap();
            assert_eq!(&y, x, "{case}: F32");

            let y = dequantize(&quantize(x, GgmlType::F16).unwrap(), GgmlType::F16, n).unwrap();
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                if a.abs() >= 65520.0 {
                    assert!(
                        b.is_infinite() && b.signum() == a.signum(),
                        "{case} F16 [{i}]"
                    );
                } else {
                    assert!(
                        (a - b).abs() <= half_f16_ulp(a),
                        "{case} F16 [{i}]: {a} -> {b}"
                    );
                }
            }

            let y = dequantize(&quantize(x, GgmlType::BF16).unwrap(), GgmlType::BF16, n).unwrap();
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let bound = if a.abs() >= f32::MIN_POSITIVE {
                    a.abs() * 2f32.powi(-8)
                } else {
                    2f32.powi(-134)
                };
                let overflow = b.is_infinite() && a.abs() > 3.38e38 && b.signum() == a.signum();
                assert!(
                    overflow || (a - b).abs() <= bound,
                    "{case} BF16 [{i}]: {a} -> {b}"
                );
            }

            let y = dequantize(&quantize(x, GgmlType::Q8_0).unwrap(), GgmlType::Q8_0, n).unwrap();
            for (k, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let d16 = f16::from_f32(d).to_f32();
                if d16.is_infinite() {
                    assert!(d > 65504.0, "{case} Q8_0 block {k}");
                    continue;
                }
                let bound = d / 2.0 + 127.0 * (d - d16).abs() + amax * 2f32.powi(-20);
                for (i, (&a, &b)) in xb.iter().zip(yb).enumerate() {
                    let err = (a - b).abs();
                    assert!(
                        err <= bound,
                        "{case} Q8_0 block {k} [{i}]: {a} -> {b}, bound {bound}"
                    );
                }
            }

            let y = dequantize(&quantize(x, GgmlType::Q4_0).unwrap(), GgmlType::Q4_0, n).unwrap();
            for (k, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let m = xb[1..]
                    .iter()
                    .fold(xb[0], |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = (m / -8.0).abs();
                let d16 = f16::from_f32(m / -8.0).to_f32().abs();
                if d16.is_infinite() {
                    assert!(d > 65504.0, "{case} Q4_0 block {k}");
                    continue;
                }
                let extra = 8.0 * (d - d16).abs() + m.abs() * 2f32.powi(-20);
                for (i, (&a, &b)) in xb.iter().zip(yb).enumerate() {
                    let clipped = a.signum() != m.signum() && a.abs() > 7.5 * d;
                    let bound = if clipped { d } else { d / 2.0 } + extra;
                    let err = (a - b).abs();
                    assert!(
                        err <= bound,
                        "{case} Q4_0 block {k} [{i}]: {a} -> {b}, bound {bound}"
                    );
                }
            }
        }
    }

    fn json_value(entry: &Json) -> Value {
        let ty = entry["type"].as_str().unwrap();
        let v = &entry["value"];
        let bits32 =
            |v: &Json| f32::from_bits(u32::from_str_radix(v.as_str().unwrap(), 16).unwrap());
        let bits64 =
            |v: &Json| f64::from_bits(u64::from_str_radix(v.as_str().unwrap(), 16).unwrap());
        let int = |v: &Json| v.as_i64().unwrap();
        let uint = |v: &Json| v.as_u64().unwrap();
        let items = || v.as_array().unwrap().iter();
        match ty {
            "u8" => Value::U8(uint(v) as u8),
            "i8" => Value::I8(int(v) as i8),
            "u16" => Value::U16(uint(v) as u16),
            "i16" => Value::I16(int(v) as i16),
            "u32" => Value::U32(uint(v) as u32),
            "i32" => Value::I32(int(v) as i32),
            "f32" => Value::F32(bits32(v)),
            "bool" => Value::Bool(v.as_bool().unwrap()),
            "string" => Value::String(v.as_str().unwrap().to_owned()),
            "u64" => Value::U64(uint(v)),
            "i64" => Value::I64(int(v)),
            "f64" => Value::F64(bits64(v)),
            "array" => Value::Array(match entry["elem"].as_str().unwrap() {
                "string" => {
                    Array::String(items().map(|s| s.as_str().unwrap().to_owned()).collect())
                }
                "i32" => Array::I32(items().map(|x| int(x) as i32).collect()),
                "u32" => Array::U32(items().map(|x| uint(x) as u32).collect()),
                "f32" => Array::F32(items().map(bits32).collect()),
                other => panic!("array of {other} not in the fixture reader"),
            }),
            other => panic!("value type {other}"),
        }
    }

    #[test]
    fn gguf_writer_matches_gguf_py_reference() {
        let doc = fixture_json();
        let files = doc["writer"].as_array().unwrap();
        assert_eq!(files.len(), 2);
        for file in files {
            let name = file["file"].as_str().unwrap();
            let reference = std::fs::read(fixture(name)).unwrap();
            assert_eq!(
                reference.len() as u64,
                file["size"].as_u64().unwrap(),
                "{name}"
            );
            let metadata: Vec<(String, Value)> = file["metadata"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["key"].as_str().unwrap().to_owned(), json_value(e)))
                .collect();
            let tensors: Vec<(TensorInfo, Vec<f32>)> = file["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let shape: Vec<usize> = t["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap() as usize)
                        .collect();
                    let ty = GgmlType::from_name(t["type"].as_str().unwrap()).unwrap();
                    let info = TensorInfo::new(t["name"].as_str().unwrap(), &shape, ty);
                    (info, f32s(t["input_f32_le"].as_str().unwrap()))
                })
                .collect();
            let infos: Vec<TensorInfo> = tensors.iter().map(|(i, _)| i.clone()).collect();
            let mut w = GgufWriter::new(Vec::new(), Path::new(name), &metadata, &infos).unwrap();
            for (info, x) in &tensors {
                w.write_tensor(&info.name, &quantize(x, info.ty).unwrap())
                    .unwrap();
            }
            let ours = w.finish().unwrap();
            if let Some(i) = first_difference(&ours, &reference) {
                panic!(
                    "{name}: first differing byte at offset {i}: ours {:?}, gguf-py {:?} \
                     ({} vs {} bytes)",
                    ours.get(i),
                    reference.get(i),
                    ours.len(),
                    reference.len()
                );
            }
        }
    }

    /// The header fields a reader needs, checked by hand on a small file: reversed dims,
    /// aligned offsets, data section start.
    #[test]
    fn gguf_writer_layout() {
        let infos = [
            TensorInfo::new("a", &[3, 64], GgmlType::Q4_0), // 3 rows of 2 blocks: 108 bytes
            TensorInfo::new("b", &[2, 3, 5], GgmlType::F32), // 120 bytes
        ];
        let metadata = vec![("general.architecture".to_owned(), Value::from("x"))];
        let mut w = GgufWriter::new(Vec::new(), Path::new("t.gguf"), &metadata, &infos).unwrap();
        let a = quantize(&signal(192, 1), GgmlType::Q4_0).unwrap();
        let b = quantize(&signal(30, 2), GgmlType::F32).unwrap();
        w.write_tensor("a", &a).unwrap();
        w.write_tensor("b", &b).unwrap();
        let file = w.finish().unwrap();

        let u32_at = |o: usize| u32::from_le_bytes(file[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(file[o..o + 8].try_into().unwrap());
        assert_eq!(&file[..4], b"GGUF");
        assert_eq!((u32_at(4), u64_at(8), u64_at(16)), (3, 2, 1));
        // KV: key string (8 + 20), type 8, value string (8 + 1).
        let mut o = 24;
        assert_eq!(u64_at(o), 20);
        o += 8 + 20;
        assert_eq!(u32_at(o), 8);
        o += 4 + 8 + 1;
        // Tensor a: ne = [64, 3] (PyTorch [3, 64] reversed), Q4_0, offset 0.
        assert_eq!((u64_at(o), file[o + 8]), (1, b'a'));
        o += 9;
        assert_eq!((u32_at(o), u64_at(o + 4), u64_at(o + 12)), (2, 64, 3));
        o += 20;
        assert_eq!((u32_at(o), u64_at(o + 4)), (2, 0));
        o += 12;
        // Tensor b: ne = [5, 3, 2], F32, offset 108 padded to 128.
        o += 9;
        assert_eq!(
            (u32_at(o), u64_at(o + 4), u64_at(o + 12), u64_at(o + 20)),
            (3, 5, 3, 2)
        );
        o += 28;
        assert_eq!((u32_at(o), u64_at(o + 4)), (0, 128));
        o += 12;
        let data = padded(o, 32);
        assert_eq!(data % 32, 0);
        assert!(file[o..data].iter().all(|&z| z == 0));
        assert_eq!(&file[data..data + 108], &a[..]);
        assert!(file[data + 108..data + 128].iter().all(|&z| z == 0));
        assert_eq!(&file[data + 128..data + 248], &b[..]);
        assert_eq!(file.len(), data + 256); // 120 bytes padded to 128
    }

    #[test]
    fn gguf_bad_row_length_is_an_error() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let err = quantize(&[0.5; 33], ty).unwrap_err().to_string();
            assert!(err.contains("33") && err.contains(&ty.to_string()), "{err}");
            // A [4, 16] tensor has 64 values (two blocks for `quantize`), but its rows of 16
            // (ggml's ne[0]) cannot be cut into blocks of 32: the writer refuses it.
            let infos = [TensorInfo::new("blk.0.ffn_up.weight", &[4, 16], ty)];
            let err = GgufWriter::new(Vec::new(), Path::new("m.gguf"), &[], &infos)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("blk.0.ffn_up.weight") && err.contains("16") && err.contains("m.gguf"),
                "{err}"
            );
            assert!(!err.contains('\n'));
        }
        // A non-finite value cannot be block-quantized.
        let mut x = [0.5f32; 32];
        x[7] = f32::NAN;
        let err = quantize(&x, GgmlType::Q8_0).unwrap_err().to_string();
        assert!(err.contains("index 7"), "{err}");
        // dequantize checks the byte count.
        assert!(dequantize(&[0; 33], GgmlType::Q8_0, 32).is_err());
    }

    #[test]
    fn gguf_writer_checks_declarations_and_order() {
        let path = Path::new("m.gguf");
        let t = |name: &str, shape: &[usize]| TensorInfo::new(name, shape, GgmlType::F16);
        let kv = |k: &str, v: Value| (k.to_owned(), v);
        let new = |md: &[(String, Value)], ts: &[TensorInfo]| {
            GgufWriter::new(Vec::new(), path, md, ts)
                .err()
                .map(|e| e.to_string())
        };
        let err = new(&[kv("a.b", 1u32.into()), kv("a.b", 2u32.into())], &[]).unwrap();
        assert!(err.contains("a.b"), "{err}");
        let err = new(&[kv(ALIGNMENT_KEY, 48u32.into())], &[]).unwrap();
        assert!(err.contains(ALIGNMENT_KEY), "{err}");
        let err = new(&[kv(ALIGNMENT_KEY, 64i32.into())], &[]).unwrap();
        assert!(err.contains(ALIGNMENT_KEY), "{err}");
        let err = new(&[], &[t("x", &[2]), t("x", &[3])]).unwrap();
        assert!(err.contains("x"), "{err}");
        let long = "t".repeat(64);
        assert!(new(&[], &[t(&long, &[2])]).unwrap().contains(&long));
        assert!(new(&[], &[t("x", &[1, 1, 1, 1, 1])]).unwrap().contains("x"));
        assert!(new(&[], &[t("x", &[2, 0])]).unwrap().contains("x"));

        let mut w = GgufWriter::new(Vec::new(), path, &[], &[t("a", &[2]), t("b", &[3])]).unwrap();
        let err = w.write_tensor("b", &[0; 6]).unwrap_err().to_string();
        assert!(
            err.contains("b") && err.contains("next declared tensor is a"),
            "{err}"
        );
        let err = w.write_tensor("a", &[0; 6]).unwrap_err().to_string();
        assert!(err.contains("takes 4 bytes, got 6"), "{err}");
        w.write_tensor("a", &[0; 4]).unwrap();
        let err = w.finish().err().unwrap().to_string();
        assert!(
            err.contains("1 of 2") && err.contains("b is missing"),
            "{err}"
        );

        // A custom alignment is honoured: the data starts at a multiple of 64.
        let md = [kv(ALIGNMENT_KEY, 64u32.into())];
        let mut w = GgufWriter::new(Vec::new(), path, &md, &[t("a", &[2])]).unwrap();
        w.write_tensor("a", &[1, 2, 3, 4]).unwrap();
        let file = w.finish().unwrap();
        assert_eq!(file.len() % 64, 0);
        assert_eq!(&file[file.len() - 64..file.len() - 60], &[1, 2, 3, 4]);
    }

    #[test]
    fn gguf_values_encode() {
        let mut buf = Vec::new();
        Value::from(vec!["ab".to_owned(), String::new()]).put_payload(&mut buf);
        let mut want = 8u32.to_le_bytes().to_vec();
        want.extend(2u64.to_le_bytes());
        want.extend(2u64.to_le_bytes());
        want.extend(b"ab");
        want.extend(0u64.to_le_bytes());
        assert_eq!(buf, want);
        assert_eq!(Value::from(vec![1.5f32]).type_id(), 9);
        assert_eq!(Array::F64(Vec::new()).elem_type_id(), 12);
        assert_eq!(Value::from(true).type_id(), 7);
        assert_eq!(Value::from(-1i64).type_id(), 11);
    }

    /// A file under the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("phitune-gguf-test-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Reading gguf-py's files gives exactly the keys and tensors the fixture records.
    #[test]
    fn gguf_reader_reads_gguf_py_reference() {
        let doc = fixture_json();
        for file in doc["writer"].as_array().unwrap() {
            let name = file["file"].as_str().unwrap();
            let path = PathBuf::from(fixture(name));
            let bytes = std::fs::read(&path).unwrap();
            let g = GgufFile::open(&path).unwrap();
            assert_eq!(g.path, path);
            assert_eq!(g.version, 3, "{name}");
            let alignment = file["alignment"].as_u64().unwrap() as usize;
            assert_eq!(g.alignment, alignment, "{name}");
            assert_eq!(g.data_start % alignment as u64, 0, "{name}");

            let metadata: Vec<(String, Value)> = file["metadata"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["key"].as_str().unwrap().to_owned(), json_value(e)))
                .collect();
            assert_eq!(g.metadata, metadata, "{name}");
            for (key, value) in &metadata {
                assert_eq!(g.get(key), Some(value), "{name} {key}");
            }
            assert_eq!(g.get("no.such.key"), None);
            assert_eq!(g.get("test.u8"), Some(&Value::U8(200)));

            let tensors = file["tensors"].as_array().unwrap();
            assert_eq!(g.tensors.len(), tensors.len(), "{name}");
            // gguf-py packs the data in header order, each tensor padded to the alignment.
            let mut offset = g.data_start;
            for (t, want) in g.tensors.iter().zip(tensors) {
                let tname = want["name"].as_str().unwrap();
                let shape: Vec<usize> = want["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                let ty = GgmlType::from_name(want["type"].as_str().unwrap()).unwrap();
                assert_eq!(t.info, TensorInfo::new(tname, &shape, ty), "{name}");
                assert_eq!(g.tensor(tname), Some(t));
                assert_eq!(t.offset, offset, "{name} {tname}");
                let x = f32s(want["input_f32_le"].as_str().unwrap());
                assert_eq!(t.numel(), x.len());
                // The recorded bytes: gguf-py's encoding of the input, which `quantize`
                // reproduces bit for bit (gguf_writer_matches_gguf_py_reference).
                let encoded = quantize(&x, ty).unwrap();
                assert_eq!(t.n_bytes, encoded.len(), "{name} {tname}");
                let raw = g.read_raw(tname).unwrap();
                assert_eq!(raw, encoded, "{name} {tname}");
                let start = t.offset as usize;
                assert_eq!(&bytes[start..start + t.n_bytes], &raw[..]);
                let values = g.read_f32(tname).unwrap();
                let want_values = dequantize(&encoded, ty, x.len()).unwrap();
                assert_eq!(bits(&values), bits(&want_values), "{name} {tname}");
                if ty == GgmlType::F32 {
                    assert_eq!(bits(&values), bits(&x));
                }
                offset += padded(t.n_bytes, alignment) as u64;
            }
            assert_eq!(offset, bytes.len() as u64, "{name}");
            assert_eq!(g.tensor("missing"), None);
            let err = g.read_f32("missing").unwrap_err().to_string();
            assert!(err.contains("missing") && err.contains(name), "{err}");
        }
    }

    fn every_value_type() -> Vec<(String, Value)> {
        let kv = |k: &str, v: Value| (k.to_owned(), v);
        vec![
            kv("general.architecture", "phi2".into()),
            kv(ALIGNMENT_KEY, 64u32.into()),
            kv("t.u8", 255u8.into()),
            kv("t.i8", (-128i8).into()),
            kv("t.u16", 65535u16.into()),
            kv("t.i16", (-1i16).into()),
            kv("t.u32", u32::MAX.into()),
            kv("t.i32", i32::MIN.into()),
            kv("t.f32", (-0.0f32).into()),
            kv("t.bool", true.into()),
            kv("t.string", "".into()),
            kv("t.u64", u64::MAX.into()),
            kv("t.i64", i64::MIN.into()),
            kv("t.f64", f64::MIN_POSITIVE.into()),
            kv("a.u8", vec![0u8, 1, 255].into()),
            kv("a.i8", vec![-1i8, 2].into()),
            kv("a.u16", vec![7u16].into()),
            kv("a.i16", vec![-7i16, 8].into()),
            kv("a.u32", Vec::<u32>::new().into()),
            kv("a.i32", vec![1i32, -2, 3].into()),
            kv("a.f32", vec![1.5f32, f32::INFINITY].into()),
            kv("a.bool", vec![true, false, true].into()),
            kv(
                "a.string",
                vec!["é✓".to_owned(), String::new(), "x\ny".into()].into(),
            ),
            kv("a.string_empty", Vec::<String>::new().into()),
            kv("a.u64", vec![u64::MAX].into()),
            kv("a.i64", vec![i64::MIN, 0].into()),
            kv("a.f64", vec![0.1f64, -2.0].into()),
        ]
    }

    /// What GgufWriter writes, GgufFile reads back: keys, infos, bytes.
    #[test]
    fn gguf_reader_round_trip() {
        let metadata = every_value_type();
        let infos = [
            TensorInfo::new("token_embd.weight", &[3, 64], GgmlType::Q8_0),
            TensorInfo::new("blk.0.attn_qkv.weight", &[2, 1, 2, 32], GgmlType::Q4_0),
            TensorInfo::new("blk.0.ln.weight", &[5], GgmlType::F32),
            TensorInfo::new("blk.0.ln.bias", &[2, 3, 1], GgmlType::F16),
            TensorInfo::new("output.weight", &[7, 3], GgmlType::BF16),
        ];
        let encoded: Vec<Vec<u8>> = infos
            .iter()
            .enumerate()
            .map(|(i, t)| quantize(&signal(t.shape.iter().product(), i as u64), t.ty).unwrap())
            .collect();
        let mut w = GgufWriter::new(Vec::new(), Path::new("rt.gguf"), &metadata, &infos).unwrap();
        for (t, b) in infos.iter().zip(&encoded) {
            w.write_tensor(&t.name, b).unwrap();
        }
        let file = TempFile::new("roundtrip.gguf", &w.finish().unwrap());
        let g = GgufFile::open(&file.0).unwrap();
        assert_eq!((g.version, g.alignment), (3, 64));
        assert_eq!(g.metadata, metadata);
        let got: Vec<TensorInfo> = g.tensors.iter().map(|t| t.info.clone()).collect();
        assert_eq!(got, infos);
        for (t, b) in g.tensors.iter().zip(&encoded) {
            assert_eq!(t.offset % 64, 0);
            assert_eq!(&g.read_raw(&t.info.name).unwrap(), b);
            let want = dequantize(b, t.info.ty, t.numel()).unwrap();
            assert_eq!(bits(&g.read_f32(&t.info.name).unwrap()), bits(&want));
        }

        // No tensors, no keys: a header alone.
        let empty = GgufWriter::new(Vec::new(), Path::new("e.gguf"), &[], &[])
            .unwrap()
            .finish()
            .unwrap();
        let file = TempFile::new("empty.gguf", &empty);
        let g = GgufFile::open(&file.0).unwrap();
        assert!(g.metadata.is_empty() && g.tensors.is_empty());
        assert_eq!((g.alignment, g.data_start), (32, 32));
    }

    /// A small file and the byte offsets of its header fields (checked below).
    fn small_file() -> Vec<u8> {
        let metadata = vec![
            ("general.architecture".to_owned(), Value::from("x")),
            ("a.arr".to_owned(), Value::from(vec![1u32, 2, 3])),
        ];
        let infos = [
            TensorInfo::new("w", &[2, 32], GgmlType::Q8_0), // 68 bytes
            TensorInfo::new("b", &[3], GgmlType::F32),      // 12 bytes
        ];
        let mut w = GgufWriter::new(Vec::new(), Path::new("s.gguf"), &metadata, &infos).unwrap();
        w.write_tensor("w", &quantize(&signal(64, 3), GgmlType::Q8_0).unwrap())
            .unwrap();
        w.write_tensor("b", &quantize(&[1.0, 2.0, 3.0], GgmlType::F32).unwrap())
            .unwrap();
        w.finish().unwrap()
    }
    // Offsets in small_file(): the counts, the first key's length, the first value's type, the
    // array's element type and count, tensor w's n_dims, type and offset, tensor b's type and
    // offset; the data starts at 192 and the last tensor ends at 192 + 96 + 12.
    const N_TENSORS: usize = 8;
    const N_KV: usize = 16;
    const KEY0_LEN: usize = 24;
    const VALUE0_TYPE: usize = 52;
    const ARR_ELEM: usize = 82;
    const ARR_COUNT: usize = 86;
    const W_NDIMS: usize = 115;
    const W_TYPE: usize = 135;
    const W_OFFSET: usize = 139;
    const B_OFFSET: usize = 172;
    const DATA_END: usize = 300;

    fn put_u32(f: &mut [u8], at: usize, v: u32) {
        f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(f: &mut [u8], at: usize, v: u64) {
        f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Opens `bytes` as a file named after `case`; the error message, which must name the file
    /// and be one line.
    fn open_err(case: &str, bytes: &[u8]) -> String {
        let file = TempFile::new(&format!("{case}.gguf"), bytes);
        let err = match GgufFile::open(&file.0) {
            Ok(g) => panic!("{case}: opened, {} tensors", g.tensors.len()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&file.0.display().to_string()), "{case}: {err}");
        assert!(!err.contains('\n'), "{case}: {err}");
        err
    }

    #[test]
    fn gguf_reader_small_file_layout() {
        let f = small_file();
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        assert_eq!(
            (u64_at(N_TENSORS), u64_at(N_KV), u64_at(KEY0_LEN)),
            (2, 2, 20)
        );
        assert_eq!(
            (u32_at(VALUE0_TYPE), u32_at(ARR_ELEM), u64_at(ARR_COUNT)),
            (8, 4, 3)
        );
        assert_eq!(
            (u32_at(W_NDIMS), u32_at(W_TYPE), u64_at(W_OFFSET)),
            (2, 8, 0)
        );
        assert_eq!((u32_at(B_OFFSET - 4), u64_at(B_OFFSET)), (0, 96));
        assert_eq!(f.len(), 320);
        let file = TempFile::new("small.gguf", &f);
        let g = GgufFile::open(&file.0).unwrap();
        assert_eq!(g.data_start, 192);
        let b = g.tensor("b").unwrap();
        assert_eq!((b.offset + b.n_bytes as u64) as usize, DATA_END);
        assert_eq!(g.read_f32("b").unwrap(), [1.0, 2.0, 3.0]);
    }

    /// Every prefix of a file: an error naming the file while any header field or tensor byte
    /// is missing, the whole file's contents once only the final padding is.
    #[test]
    fn gguf_reader_truncated_files() {
        let f = small_file();
        let full = GgufFile::parse(&f[..], f.len() as u64, Path::new("t.gguf")).unwrap();
        let file = TempFile::new("prefix.gguf", &[]);
        let shown_path = file.0.display().to_string();
        for len in 0..f.len() {
            std::fs::write(&file.0, &f[..len]).unwrap();
            match GgufFile::open(&file.0) {
                Ok(g) => {
                    assert!(len >= DATA_END, "prefix of {len} bytes opened");
                    assert_eq!(g.metadata, full.metadata);
                    assert_eq!(g.tensors, full.tensors);
                    assert_eq!(g.read_f32("b").unwrap(), [1.0, 2.0, 3.0]);
                }
                Err(e) => {
                    let err = e.to_string();
                    assert!(len < DATA_END, "prefix of {len} bytes: {err}");
                    assert!(err.contains(&shown_path) && !err.contains('\n'), "{err}");
                }
            }
        }
        // A file truncated after opening: the read fails, naming the file and tensor.
        std::fs::write(&file.0, &f).unwrap();
        let g = GgufFile::open(&file.0).unwrap();
        std::fs::write(&file.0, &f[..250]).unwrap();
        let err = g.read_raw("b").unwrap_err().to_string();
        assert!(err.contains(&shown_path) && err.contains("\"b\""), "{err}");
    }

    #[test]
    fn gguf_reader_refuses_corrupt_headers() {
        let f = small_file();
        let corrupt = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut g = f.clone();
            edit(&mut g);
            g
        };

        let err = open_err("magic", &corrupt(&|g| g[0] ^= 0xff));
        assert!(err.contains("not a GGUF file"), "{err}");
        let err = open_err("tiny", b"GG");
        assert!(err.contains("2 bytes"), "{err}");
        let err = open_err("version", &corrupt(&|g| put_u32(g, 4, 4)));
        assert!(err.contains("version 4"), "{err}");
        let err = open_err("bigendian", &corrupt(&|g| put_u32(g, 4, 3u32.swap_bytes())));
        assert!(err.contains("big-endian"), "{err}");

        for n in [(1 << 20) + 1, 1 << 40, u64::MAX] {
            let err = open_err("n_tensors", &corrupt(&|g| put_u64(g, N_TENSORS, n)));
            assert!(err.contains(&format!("{n} tensors")), "{err}");
            let err = open_err("n_kv", &corrupt(&|g| put_u64(g, N_KV, n)));
            assert!(err.contains(&format!("{n} metadata keys")), "{err}");
        }
        // Counts within the limits but beyond the file's bytes: the parse reads on into what
        // follows and fails on whatever it finds there.
        open_err(
            "n_tensors_eof",
            &corrupt(&|g| put_u64(g, N_TENSORS, 1 << 20)),
        );
        open_err("n_kv_eof", &corrupt(&|g| put_u64(g, N_KV, 1000)));

        for n in [u64::MAX, 1 << 40, 321] {
            let err = open_err("key_len", &corrupt(&|g| put_u64(g, KEY0_LEN, n)));
            assert!(err.contains(&n.to_string()), "{err}");
        }
        // The first value, a string, claiming the rest of the file and more.
        let err = open_err(
            "value_len",
            &corrupt(&|g| put_u64(g, VALUE0_TYPE + 4, 1 << 62)),
        );
        assert!(err.contains("general.architecture"), "{err}");
        let err = open_err("array_len", &corrupt(&|g| put_u64(g, ARR_COUNT, u64::MAX)));
        assert!(err.contains("a.arr") && err.contains("elements"), "{err}");
        let err = open_err("array_eof", &corrupt(&|g| put_u64(g, ARR_COUNT, 1000)));
        assert!(err.contains("a.arr") && err.contains("truncated"), "{err}");
        let err = open_err("value_type", &corrupt(&|g| put_u32(g, VALUE0_TYPE, 13)));
        assert!(err.contains("unknown value type 13"), "{err}");
        let err = open_err("elem_type", &corrupt(&|g| put_u32(g, ARR_ELEM, 99)));
        assert!(err.contains("unknown value type 99"), "{err}");
        let err = open_err("nested", &corrupt(&|g| put_u32(g, ARR_ELEM, 9)));
        assert!(err.contains("array of arrays"), "{err}");
        // "x" -> "\xff": not UTF-8.
        let err = open_err("utf8", &corrupt(&|g| g[64] = 0xff));
        assert!(err.contains("UTF-8"), "{err}");
        // The first value's type turned into bool, its byte (the string length's) into 2.
        let err = open_err(
            "bool",
            &corrupt(&|g| {
                put_u32(g, VALUE0_TYPE, 7);
                g[VALUE0_TYPE + 4] = 2;
            }),
        );
        assert!(err.contains("bool stored as 2"), "{err}");

        let err = open_err("n_dims", &corrupt(&|g| put_u32(g, W_NDIMS, 5)));
        assert!(
            err.contains("\"w\"") && err.contains("5 dimensions"),
            "{err}"
        );
        let err = open_err("ggml_type", &corrupt(&|g| put_u32(g, W_TYPE, 12)));
        assert!(
            err.contains("\"w\"") && err.contains("type 12") && err.contains("Q4_K"),
            "{err}"
        );
        let err = open_err("ggml_type_bad", &corrupt(&|g| put_u32(g, W_TYPE, 1000)));
        assert!(err.contains("\"w\"") && err.contains("type 1000"), "{err}");
        // F32 -> Q8_0: rows of 3 values are not whole blocks.
        let err = open_err("block", &corrupt(&|g| put_u32(g, B_OFFSET - 4, 8)));
        assert!(err.contains("\"b\"") && err.contains("blocks"), "{err}");
        // A dimension so large that the size overflows.
        let err = open_err("huge_dim", &corrupt(&|g| put_u64(g, W_NDIMS + 12, 1 << 62)));
        assert!(
            err.contains("\"w\"") && err.contains("larger than the file"),
            "{err}"
        );
        let err = open_err("misaligned", &corrupt(&|g| put_u64(g, B_OFFSET, 100)));
        assert!(
            err.contains("\"b\"") && err.contains("alignment 32"),
            "{err}"
        );
        let err = open_err("past_end", &corrupt(&|g| put_u64(g, B_OFFSET, 128)));
        assert!(
            err.contains("\"b\"") && err.contains("past the end"),
            "{err}"
        );
        let err = open_err(
            "offset_overflow",
            &corrupt(&|g| put_u64(g, B_OFFSET, u64::MAX - 31)),
        );
        assert!(
            err.contains("\"b\"") && err.contains("past the end"),
            "{err}"
        );
        // Tensor b renamed to w.
        let err = open_err(
            "dup_tensor",
            &corrupt(&|g| g[B_OFFSET - 4 - 8 - 4 - 1] = b'w'),
        );
        assert!(err.contains("\"w\" appears twice"), "{err}");

        // Duplicate keys: "k.b" renamed to "k.a" (key lengths at 24 and 40, keys at 32 and 48).
        let md = [
            ("k.a".to_owned(), Value::U8(1)),
            ("k.b".to_owned(), Value::U8(2)),
        ];
        let mut dup = GgufWriter::new(Vec::new(), Path::new("d.gguf"), &md, &[])
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(&dup[48..51], b"k.b");
        dup[50] = b'a';
        let err = open_err("dup_key", &dup);
        assert!(err.contains("\"k.a\" appears twice"), "{err}");

        // A bad general.alignment.
        let md = [(ALIGNMENT_KEY.to_owned(), Value::U32(64))];
        let aligned = GgufWriter::new(Vec::new(), Path::new("a.gguf"), &md, &[])
            .unwrap()
            .finish()
            .unwrap();
        // key length at 24, key (17 bytes) at 32, type at 49, value at 53.
        let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut g = aligned.clone();
            edit(&mut g);
            g
        };
        let err = open_err("align_48", &bad(&|g| put_u32(g, 53, 48)));
        assert!(err.contains(ALIGNMENT_KEY), "{err}");
        let err = open_err("align_0", &bad(&|g| put_u32(g, 53, 0)));
        assert!(err.contains(ALIGNMENT_KEY), "{err}");
        let err = open_err("align_i32", &bad(&|g| put_u32(g, 49, 5)));
        assert!(err.contains(ALIGNMENT_KEY), "{err}");

        // A missing file.
        let err = GgufFile::open(Path::new("/nonexistent/x.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.gguf"), "{err}");
    }

    /// Corrupting any single byte of the header never panics.
    #[test]
    fn gguf_reader_survives_any_header_byte() {
        let f = small_file();
        for at in 0..192 {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut g = f.clone();
                g[at] = v;
                let _ = GgufFile::parse(&g[..], g.len() as u64, Path::new("x.gguf"));
            }
        }
    }
}
