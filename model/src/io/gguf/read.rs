//! The GGUF reader: a header checked against the file's size and fixed limits before anything is
//! allocated, then one tensor at a time.

use std::path::{Path, PathBuf};

use super::quants::ggml_type_name;
use super::{
    ALIGNMENT_KEY, Array, DEFAULT_ALIGNMENT, GgmlType, MAGIC, MAX_DIMS, TensorInfo, Value,
    dequantize,
};
use crate::error::{Error, Result};

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
    /// Name, type and shape in PyTorch order (ggml's `ne` reversed), as [`GgufWriter`](super::GgufWriter) takes it.
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

    /// One tensor's encoded bytes, as [`quantize`](super::quantize) gives them (a positioned read of the file).
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

#[cfg(test)]
mod tests;
